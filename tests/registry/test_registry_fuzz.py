"""Fuzz: 10,000+ random and mutated frames from several connections at once against a live
registry, while a valid holder and a valid importer keep working and 64 more clients sit
halfway through a frame. The daemon must stay up, answer every valid request correctly,
and keep its memory bounded."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time

import msgspec
from registry_helpers import chain, namespace

from kvmkt_connector.registry.framing import encode_frame
from kvmkt_connector.registry.protocol import (
    PROTOCOL_VERSION,
    Hello,
    Lease,
    Lookup,
    Publish,
    RegisterHolder,
    ReleaseLeases,
    Unpublish,
)

FRAMES = 10_000
FUZZERS = 4
STALLED_CLIENTS = 64
NS = namespace("fuzz")
_OPS = ["hello", "register_holder", "publish", "lookup", "lease", "release_leases", "reclaim",
        "unpublish", "sync", "list_holders", "status", "nonsense"]


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 2 else 6)
    return [
        lambda: rng.randrange(-(1 << 63), 1 << 63),
        lambda: rng.random() * 1e9,
        lambda: rng.randbytes(rng.choice([0, 1, 15, 16, 17, 64])),
        lambda: "s" * rng.randrange(40),
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: [_random_value(rng, depth + 1) for _ in range(rng.randrange(6))],
        lambda: {str(rng.randrange(5)): _random_value(rng, depth + 1) for _ in range(3)},
        lambda: [rng.randbytes(16) for _ in range(rng.randrange(300))],
    ][kind]()


def _valid_but_misplaced(rng: random.Random) -> bytes:
    """Well-formed requests sent where they make no sense (no Hello, not a holder, ...)."""
    keys = [rng.randbytes(16) for _ in range(rng.randrange(1, 50))]
    msg = rng.choice([
        Publish(keys, list(range(len(keys)))),
        Publish(keys, [-1] * (len(keys) + 1)),
        Lookup(NS, keys),
        Lease(NS, keys, rng.choice([-5, 0, 1, 10 ** 12]), rng.randrange(-3, 3)),
        ReleaseLeases([rng.randrange(-(1 << 63), 1 << 63) for _ in range(5)]),
        Unpublish([rng.randrange(-10, 10) for _ in range(5)]),
        # cleanup paths the registry must refuse (it would unlink them when this "holder"
        # goes); none of them exists, so even a failing registry harms nothing
        RegisterHolder(rng.randbytes(rng.choice([0, 16, 99])), "x", rng.randrange(-5, 5),
                       b"", b"", [rng.choice(["relative", "/tmp/../tmp/kvmkt-fuzz-none",
                                              "/tmp/kvmkt-fuzz-none"])]),
        Hello(rng.randrange(-3, 5), "again", 1),
    ])
    return encode_frame(msg)


def _fuzz_frame(rng: random.Random) -> bytes:
    choice = rng.randrange(7)
    if choice == 0:  # random bytes under a plausible length
        body = rng.randbytes(rng.randrange(0, 300))
        return struct.pack(">I", len(body)) + body
    if choice == 1:  # a map with a known or unknown tag and fields of random types
        fields = {"op": rng.choice(_OPS)}
        for name in ("keys", "locations", "namespace", "ttl_ms", "count", "lease_ids",
                     "protocol_version", "pid", "client", "min_blocks", "exclude_holder"):
            if rng.random() < 0.4:
                fields[name] = _random_value(rng)
        body = msgspec.msgpack.encode(fields)
        return struct.pack(">I", len(body)) + body
    if choice == 2:  # huge or absurd lengths (>= 1 << 31: negative as a signed int)
        return struct.pack(">I", rng.choice([0xFFFFFFFF, 1 << 31, (8 << 20) + 1, 0]))
    if choice == 6:  # a small frame whose msgpack claims a huge (or "negative") container
        head = rng.choice([b"\xdd", b"\xdf", b"\xc6", b"\xdb"])  # array32 map32 bin32 str32
        body = b"\x82\xa2op" + rng.choice([b"\xa6lookup", b"\xa5lease"]) + b"\xa4keys" + head
        body += struct.pack(">I", rng.choice([0xFFFFFFFF, 1 << 31, 1 << 28])) + rng.randbytes(8)
        return struct.pack(">I", len(body)) + body
    if choice == 3:  # truncated: the header promises more than comes
        body = rng.randbytes(rng.randrange(1, 100))
        return struct.pack(">I", len(body) + rng.randrange(1, 1000)) + body
    if choice == 4:  # a valid frame with bytes flipped
        frame = bytearray(_valid_but_misplaced(rng))
        for _ in range(rng.randrange(1, 4)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        return bytes(frame)
    return _valid_but_misplaced(rng)


def _fuzzer(socket_path: str, seed: int, frames: int, sent: list[int]) -> None:
    rng = random.Random(seed)
    sock = None
    for _ in range(frames):
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(2)
            sock.connect(socket_path)
            if rng.random() < 0.7:  # usually greet first, so later frames reach dispatch
                sock.sendall(encode_frame(Hello(PROTOCOL_VERSION, "fuzz", os.getpid())))
        try:
            sock.sendall(_fuzz_frame(rng))
            sock.setblocking(False)
            try:
                while sock.recv(65536):  # drain replies; "" means the server closed
                    pass
                sock.close()
                sock = None
            except BlockingIOError:
                pass
            finally:
                if sock is not None:
                    sock.setblocking(True)
                    sock.settimeout(2)
        except OSError:  # closed by the server (bad frame): the documented answer
            sock.close()
            sock = None
        sent[0] += 1
        if rng.random() < 0.05 and sock is not None:  # sometimes just vanish mid-stream
            sock.close()
            sock = None
    if sock is not None:
        sock.close()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_fuzzed_frames_never_hurt_valid_clients(registry):
    keys = chain(NS, list(range(64 * 4)))[:64]
    holder = registry.connect("holder")
    holder.register_holder(NS, "holder", b"", b"desc")
    holder.publish(keys, list(range(64)))
    importer = registry.connect("importer")
    rss_before = _rss_kb(registry.proc.pid)
    errors: list[str] = []
    answered = [0]
    stop = threading.Event()

    def valid_traffic() -> None:
        while not stop.is_set():
            try:
                grant = importer.lease(NS, keys, 10_000)
                if grant is None or grant.locations != list(range(64)):
                    errors.append(f"wrong lease: {grant}")
                else:
                    importer.release_leases([grant.lease_id])
                if importer.lookup(NS, keys[:10]) != (grant.holder_id, 10):
                    errors.append("wrong lookup")
                holder.publish(keys[:1], [0])  # a holder request now and then
                answered[0] += 1
            except Exception as e:  # noqa: BLE001 - any failure of a valid client counts
                errors.append(f"{type(e).__name__}: {e}")
                return

    # Many clients at once besides the fuzzers: connections that greet and then stall
    # halfway through a frame, kept open the whole time.
    stalled = []
    for _ in range(STALLED_CLIENTS):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(registry.socket_path)
        frame = encode_frame(Lookup(NS, keys))
        sock.sendall(encode_frame(Hello(PROTOCOL_VERSION, "stalled", os.getpid()))
                     + frame[: len(frame) // 2])
        stalled.append(sock)
    sent = [[0] for _ in range(FUZZERS)]
    threads = [threading.Thread(target=_fuzzer, args=(registry.socket_path, i, FRAMES // FUZZERS, sent[i]))
               for i in range(FUZZERS)]
    good = threading.Thread(target=valid_traffic)
    good.start()
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    fuzz_s = time.monotonic() - t0
    time.sleep(1.0)  # the server works through what the fuzzers left in its buffers
    stop.set()
    good.join(30)
    total = sum(s[0] for s in sent)
    assert registry.proc.poll() is None, "the registry died"
    with registry.connect("late") as late:  # a new client is served with them all open
        assert late.lookup(NS, keys[:5]) == (importer.lease(NS, keys, 1000).holder_id, 5)
    for sock in stalled:
        sock.close()
    assert not errors, errors[:5]
    assert total >= FRAMES and answered[0] > 0
    assert importer.lookup(NS, keys) == (importer.lease(NS, keys, 1000).holder_id, 64)
    growth = _rss_kb(registry.proc.pid) - rss_before
    print(f"\nfuzz: {total} frames in {fuzz_s:.1f} s, {answered[0]} valid "
          f"rounds answered, registry RSS +{growth} KiB")
    assert growth < 64 * 1024, f"registry memory grew by {growth} KiB"
