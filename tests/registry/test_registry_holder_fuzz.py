"""Fuzz the holder side: clients that register validly (a real namespace, a cleanup path the
registry accepts) and then send random and mutated Publish / Unpublish / Reclaim / Sync /
Lease / ReleaseLeases frames: keys of wrong lengths, repeated keys and locations, locations
at the ends of int64 and uint64, locations that do not match the keys, token lists that do
not match them, absurd counts, TTLs and min_blocks, other holders' and made-up lease ids,
and frames with bytes flipped. Meanwhile a valid holder and importer keep being answered.

Checked: every well-formed request is answered on an open connection (no internal error);
a holder only ever gets back locations it published; grants respect min_blocks, the keys
asked and the excluded holder; nothing raises in the registry (its log); and once the
fuzzers have gone, their entries, holder bits and leases are gone too, from the index and
from the shared-memory table."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time

from registry_helpers import chain, namespace, wait_until

from kvmkt_connector.registry import paths
from kvmkt_connector.registry.framing import FrameDecoder, decode_reply, encode_frame
from kvmkt_connector.registry.protocol import (
    FRAME_HEADER_BYTES,
    MAX_BLOCK_TOKEN_BYTES,
    PROTOCOL_VERSION,
    BlockTokens,
    ErrorReply,
    Hello,
    HolderAccepted,
    Lease,
    LeaseGranted,
    NoMatch,
    Publish,
    Published,
    Reclaim,
    Reclaimed,
    RegisterHolder,
    ReleaseLeases,
    Sync,
    Synced,
    Unpublish,
    Unpublished,
)

FUZZERS = 4
FRAMES = 4000  # per fuzzer
VALID_NS, FUZZ_NS = namespace("valid"), namespace("fuzz-holders")
FILL_NS = namespace("filler")
INTS = [0, 1, 2, 7, 63, -1, -(1 << 63), (1 << 63) - 1, (1 << 64) - 1, 1 << 32, (1 << 62) + 5]
ALLOWED_ERRORS = {"bad_request", "lease_limit"}  # for a well-formed request of a holder


class _Conn:
    """A raw connection: one frame out, one reply back (None: the registry closed it)."""

    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)  # a registry that stalls fails the test, it does not hang
        self.sock.connect(socket_path)
        self.decoder = FrameDecoder()

    def call(self, frame: bytes):
        try:
            self.sock.sendall(frame)
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    return None
                payloads = self.decoder.feed(data)
                if payloads:
                    assert len(payloads) == 1, "one reply per request"
                    return decode_reply(payloads[0])
        except (ConnectionResetError, BrokenPipeError):
            return None

    def close(self) -> None:
        self.sock.close()


class _Fuzzer:
    def __init__(self, socket_path: str, seed: int, pool: list[bytes], valid: list[bytes],
                 errors: list[str]) -> None:  # fmt: skip
        self.socket_path, self.rng, self.errors = socket_path, random.Random(seed), errors
        self.pool, self.valid, self.seed = pool, valid, seed
        self.conn: _Conn | None = None
        self.registrations = self.granted = self.answered = 0

    def register(self) -> None:
        self.conn = _Conn(self.socket_path)
        # Nobody's file: a path the registry accepts (it would unlink it once we are gone).
        cleanup = paths.holder_file(paths.holder_dir(), os.getpid(), f"fuzz{self.seed}-none")
        self.conn.call(encode_frame(Hello(PROTOCOL_VERSION, "fuzz-holder", os.getpid())))
        reply = self.conn.call(encode_frame(RegisterHolder(
            FUZZ_NS, f"fuzz{self.seed}", os.getpid(), b"f", b"d", [cleanup])))
        assert isinstance(reply, HolderAccepted), reply
        self.holder_id = reply.holder_id
        self.published: set[int] = set()  # every location a Publish of ours listed
        self.tainted = False  # a mutated frame was taken as a request: locations unknown
        self.leases: list[int] = []
        self.registrations += 1

    # ------------------------------------------------------------ requests

    def _keys(self, source: list[bytes], most: int) -> list[bytes]:
        """Mostly a run of ``source`` (what a holder publishes, an importer leases), else
        random picks; now and then one key of a wrong length."""
        rng = self.rng
        if rng.random() < 0.7:
            start = rng.randrange(len(source))
            keys = source[start : start + rng.randrange(0, most)]
        else:
            keys = [rng.choice(source) for _ in range(rng.randrange(0, most))]
        if keys and rng.random() < 0.1:
            keys[rng.randrange(len(keys))] = rng.randbytes(rng.choice([0, 1, 15, 17, 32]))
        return keys

    def _location(self) -> int:
        rng = self.rng
        return rng.choice(INTS) if rng.random() < 0.2 else rng.randrange(-2, 80)

    def _tokens(self, keys: list[bytes]) -> list[BlockTokens]:
        rng, out = self.rng, []
        for _ in range(rng.randrange(0, 4)):
            key = rng.choice(keys) if keys and rng.random() < 0.7 else rng.randbytes(16)
            parent = rng.choice([b"", rng.choice(self.pool), rng.randbytes(5)])
            n = rng.choice([0, 4, 6, 16, 64, MAX_BLOCK_TOKEN_BYTES, MAX_BLOCK_TOKEN_BYTES + 4])
            out.append(BlockTokens(key, parent, rng.randbytes(n)))
        return out

    def request(self):
        rng = self.rng
        kind = rng.choice(["publish"] * 4 + ["unpublish", "reclaim", "sync", "lease", "lease",
                                             "release"])  # fmt: skip
        if kind == "publish":
            keys = self._keys(self.pool, 40)
            if keys and rng.random() < 0.3:
                keys += rng.choices(keys, k=rng.randrange(1, 5))  # repeats
            locations = [self._location() for _ in keys]
            if rng.random() < 0.1:  # not one location per key
                locations = locations[:-1] if locations and rng.random() < 0.5 else locations + [3]
            tokens = self._tokens(keys) if rng.random() < 0.3 else []
            return Publish(keys, locations, tokens)
        if kind == "unpublish":
            known = list(self.published)
            return Unpublish([rng.choice(known) if known and rng.random() < 0.6 else self._location()
                              for _ in range(rng.randrange(0, 30))])  # fmt: skip
        if kind == "reclaim":
            return Reclaim(rng.choice([-1, 0, 1, 3, 50, 1 << 40, (1 << 63) - 1]))
        if kind == "sync":
            return Sync()
        if kind == "lease":
            ns = rng.choice([FUZZ_NS] * 6 + [VALID_NS] * 2 + [b"short", FUZZ_NS + b"x"])
            keys = self._keys(self.valid if ns == VALID_NS else self.pool, 30)
            ttl = rng.choice([1, 5, 1000, 1000, 600_000] * 3 + [-1, 0, 600_001, (1 << 63) - 1])
            min_blocks = rng.choice([1, 1, 1, 2, 5] * 3 + [-1, 0, 1000, 1 << 62])
            exclude = rng.choice([None, None, self.holder_id, 1, (1 << 63) - 1, -5])
            return Lease(ns, keys, ttl, min_blocks, exclude)
        ids = [rng.choice(self.leases) for _ in range(2) if self.leases]
        return ReleaseLeases(ids + [rng.choice(INTS) for _ in range(rng.randrange(0, 3))])

    # ------------------------------------------------------------ answers

    def check(self, req, reply) -> None:
        where = f"fuzzer {self.seed}: {type(req).__name__} -> {reply!r}"[:400]
        if isinstance(reply, ErrorReply):
            if reply.code not in ALLOWED_ERRORS:
                self.errors.append(where)
            return
        released = getattr(reply, "released", None)
        if isinstance(reply, Published):
            self.published.update(req.locations)
            if not 0 <= reply.accepted <= len(req.keys):
                self.errors.append(where)
        if released is not None and not self.tainted and not set(released) <= self.published:
            self.errors.append(f"{where}: released locations it never published")
        if isinstance(reply, Unpublished) and not 0 <= reply.pending <= len(req.locations):
            self.errors.append(where)
        if isinstance(reply, LeaseGranted):
            self.granted += 1
            self.leases.append(reply.lease_id)
            n = len(reply.locations)
            if not (max(1, req.min_blocks) <= n <= len(req.keys)) or (
                    req.exclude_holder is not None and reply.holder_id == req.exclude_holder):
                self.errors.append(where)
        expected = {Publish: Published, Unpublish: Unpublished, Reclaim: Reclaimed,
                    Sync: Synced, Lease: (LeaseGranted, NoMatch)}.get(type(req))  # fmt: skip
        if expected is not None and not isinstance(reply, expected):
            self.errors.append(f"{where}: unexpected reply")

    def run(self, frames: int) -> None:
        rng = self.rng
        try:
            for _ in range(frames):
                if self.conn is None or rng.random() < 0.01:  # now and then: go and come back
                    if self.conn is not None:
                        self.conn.close()
                    self.register()
                req = self.request()
                frame = encode_frame(req)
                mutated = rng.random() < 0.1
                if mutated:  # bytes flipped in the payload (a wrong length header would
                    frame = bytearray(frame)  # only make the registry wait for more)
                    for _ in range(rng.randrange(1, 4)):
                        frame[rng.randrange(FRAME_HEADER_BYTES, len(frame))] = rng.randrange(256)
                    frame = bytes(frame)
                reply = self.conn.call(frame)
                self.answered += 1
                # Only a frame that no longer decodes may close the connection (bad_frame).
                closing = isinstance(reply, ErrorReply) and reply.code == "bad_frame"
                if reply is None or closing:
                    if reply is None or not mutated:
                        self.errors.append(f"fuzzer {self.seed}: {reply} after {req!r}"[:400])
                    self.conn.close()
                    self.conn = None
                elif mutated:
                    self.tainted = self.tainted or not isinstance(reply, ErrorReply)
                else:
                    self.check(req, reply)
        except Exception as e:  # noqa: BLE001 - a stalled or broken registry fails the test
            self.errors.append(f"fuzzer {self.seed}: {type(e).__name__}: {e}")
        finally:
            if self.conn is not None:
                self.conn.close()


def test_fuzzed_holder_requests_never_hurt_valid_clients(start_registry) -> None:
    registry = start_registry("--capacity", "200")  # fuzzers overflow it: eviction runs
    rng = random.Random(0)
    valid_keys = chain(VALID_NS, list(range(64 * 4)))
    pool = [rng.randbytes(16) for _ in range(120)]
    holder = registry.connect("valid-holder")
    holder.register_holder(VALID_NS, "valid-holder", b"", b"desc")
    holder.publish(valid_keys, list(range(64)))
    importer = registry.connect("valid-importer")
    # How far the fuzzers' own publishes fill the registry depends on how their threads
    # interleave (a closed connection drops a holder's entries): a valid holder goes over
    # the capacity now and then, so LRU eviction runs during every fuzz.
    filler = registry.connect("filler")
    filler.register_holder(FILL_NS, "filler", b"", b"desc")
    filler_keys = chain(FILL_NS, list(range(150 * 4)))
    errors: list[str] = []
    rounds, full, none = [0], [0], [0]
    stop = threading.Event()

    def valid_traffic() -> None:
        while not stop.is_set():
            try:
                if rounds[0] % 25 == 0:
                    filler.publish(filler_keys, list(range(150)))
                # The fuzzers' publishes may evict ours (capacity) between these two calls:
                # then a grant is shorter or none, but still a prefix of ours, and what the
                # registry hands back to our holder was ours.
                released = holder.publish(valid_keys, list(range(64)))
                grant = importer.lease(VALID_NS, valid_keys, 10_000)
                if not set(released) <= set(range(64)) or grant is not None and (
                        grant.holder_id != holder.holder_id
                        or grant.locations != list(range(len(grant.locations)))):
                    errors.append(f"valid client: released {released}, grant {grant}")
                elif grant is None:
                    none[0] += 1
                else:
                    full[0] += len(grant.locations) == 64
                    importer.release_leases([grant.lease_id])
                rounds[0] += 1
            except Exception as e:  # noqa: BLE001 - any failure of a valid client counts
                errors.append(f"valid client: {type(e).__name__}: {e}")
                return

    fuzzers = [_Fuzzer(registry.socket_path, seed, pool, valid_keys, errors)
               for seed in range(FUZZERS)]  # fmt: skip
    threads = [threading.Thread(target=f.run, args=(FRAMES,)) for f in fuzzers]
    good = threading.Thread(target=valid_traffic)
    t0 = time.monotonic()
    good.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    good.join(30)
    fuzz_s = time.monotonic() - t0
    assert registry.proc.poll() is None, "the registry died"
    assert not errors, errors[:5]
    assert full[0] > 0 and all(f.registrations > 1 and f.granted > 0 for f in fuzzers)
    # The fuzzers are gone: so are their holders, entries, leases and table bits.
    filler.close()
    holder.publish(valid_keys, list(range(64)))
    wait_until(lambda: holder.status().active_leases == 0 and len(holder.status().holders) == 1, 2.0)
    status = holder.status()
    assert [h.holder_id for h in status.holders] == [holder.holder_id]
    assert status.published_blocks == 64 and status.holders_lost >= FUZZERS
    assert status.blocks_released_lru > 0  # the fuzzers' publishes went over the capacity
    assert importer.lease(VALID_NS, valid_keys, 1000).locations == list(range(64))
    assert importer.longest_run_hint(valid_keys) == 64
    assert all(importer.longest_run_hint([key]) == 0 for key in pool)
    print(f"\nholder fuzz: {sum(f.answered for f in fuzzers)} frames in {fuzz_s:.1f} s, "
          f"{sum(f.granted for f in fuzzers)} leases granted to fuzzers, "
          f"{sum(f.registrations for f in fuzzers)} registrations, {rounds[0]} valid rounds "
          f"({full[0]} with the full run, {none[0]} with none), "
          f"{status.blocks_released_lru} blocks evicted")
    registry.proc.send_signal(signal.SIGTERM)
    log = registry.proc.stdout.read().decode(errors="replace")
    assert "Traceback" not in log and "failed" not in log, log[-3000:]
