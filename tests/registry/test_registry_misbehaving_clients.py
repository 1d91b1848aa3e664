"""Broken or hostile clients get the documented error (or a close); others keep being served."""

from __future__ import annotations

import os
import socket
import struct
import urllib.request

import msgspec
import pytest
from registry_helpers import chain, namespace, wait_until

from kvmkt_connector.registry.client import RegistryError
from kvmkt_connector.registry.framing import decode_reply, encode_frame, frame_length
from kvmkt_connector.registry.paths import holder_file, holder_file_dirs
from kvmkt_connector.registry.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    BlockTokens,
    ErrorReply,
    Hello,
    HelloReply,
    Offers,
    Publish,
    RegistryStatus,
    Status,
)

NS = namespace("robust")


class RawConnection:
    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(socket_path)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, message: msgspec.Struct):
        self.send(encode_frame(message))
        return self.reply()

    def reply(self):
        """The next reply, or None if the server closed the connection."""
        header = self._read(4)
        if header is None:
            return None
        payload = self._read(frame_length(header))
        return decode_reply(payload)

    def closed_by_server(self) -> bool:
        return self._read(1) is None

    def hello(self) -> None:
        assert isinstance(self.request(Hello(PROTOCOL_VERSION, "raw", os.getpid())), HelloReply)

    def _read(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def frame_of(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


@pytest.fixture
def served(registry):
    """A holder with a 6-block chain and a well-behaved client that checks the answer."""
    keys = chain(NS, list(range(24)))
    owner = registry.connect("owner")
    owner.register_holder(NS, "owner", b"", b"")
    owner.publish(keys, list(range(6)))
    good = registry.connect("good")

    def still_served() -> None:
        assert good.lookup(NS, keys) == (owner.holder_id, 6)
        assert good.longest_run_hint(keys) == 6

    still_served()
    return registry, still_served


def expect_error_then_close(conn: RawConnection, code: str) -> None:
    reply = conn.reply()
    assert isinstance(reply, ErrorReply) and reply.code == code, reply
    assert conn.closed_by_server()


def test_truncated_frame_then_close(served) -> None:
    registry, still_served = served
    conn = RawConnection(registry.socket_path)
    conn.hello()
    frame = encode_frame(Status())
    conn.send(frame[:-2])
    conn.close()
    still_served()


def test_truncated_frame_left_hanging_does_not_block_others(served) -> None:
    registry, still_served = served
    conn = RawConnection(registry.socket_path)
    conn.hello()
    conn.send(struct.pack(">I", 1000) + b"\x81")  # announces 1000 bytes, sends 1
    still_served()
    conn.close()


@pytest.mark.parametrize("greeted", [True, False])
def test_oversized_length_header(served, greeted: bool) -> None:
    registry, still_served = served
    conn = RawConnection(registry.socket_path)
    if greeted:
        conn.hello()
    conn.send(struct.pack(">I", MAX_FRAME_BYTES + 1))
    expect_error_then_close(conn, "bad_frame")
    still_served()


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1\xc1\xc1 not msgpack",
        b"",
        msgspec.msgpack.encode({"op": "frobnicate", "x": 1}),  # unknown op: does not decode
        msgspec.msgpack.encode({"op": "lookup", "namespace": 5}),  # wrong field types
        encode_frame(Status())[4:] + b"\x00",  # trailing junk
    ],
    ids=["garbage", "empty", "unknown-op", "bad-fields", "trailing-junk"],
)
def test_undecodable_payload(served, payload: bytes) -> None:
    registry, still_served = served
    conn = RawConnection(registry.socket_path)
    conn.hello()
    conn.send(frame_of(payload))
    expect_error_then_close(conn, "bad_frame")
    still_served()


def test_wrong_protocol_version(served) -> None:
    registry, still_served = served
    conn = RawConnection(registry.socket_path)
    conn.send(encode_frame(Hello(PROTOCOL_VERSION + 1, "future", os.getpid())))
    expect_error_then_close(conn, "bad_version")
    still_served()


def test_request_before_hello_keeps_the_connection(served) -> None:
    registry, still_served = served
    conn = RawConnection(registry.socket_path)
    reply = conn.request(Status())
    assert isinstance(reply, ErrorReply) and reply.code == "no_hello"
    conn.hello()
    assert isinstance(conn.request(Status()), RegistryStatus)
    still_served()


def test_holder_requests_from_a_non_holder(served) -> None:
    registry, still_served = served
    conn = RawConnection(registry.socket_path)
    conn.hello()
    reply = conn.request(Publish([b"k" * 16], [1]))
    assert isinstance(reply, ErrorReply) and reply.code == "not_holder"
    assert isinstance(conn.request(Status()), RegistryStatus)  # still open
    still_served()
    # Through the client: a RegistryError, and the client stays usable.
    client = registry.connect("not-a-holder")
    for call in (lambda: client.sync(), lambda: client.reclaim(1), lambda: client.unpublish([1])):
        with pytest.raises(RegistryError) as err:
            call()
        assert err.value.code == "not_holder"
    assert client.status().published_blocks == 6


def test_nonsense_requests_get_bad_request(served) -> None:
    registry, still_served = served
    holder = registry.connect("holder")
    holder.register_holder(NS, "holder", b"", b"")
    cases = [
        lambda: holder.publish([b"k" * 16, b"j" * 16], [1]),  # lengths differ
        lambda: holder.publish([b"short"], [1]),
        lambda: holder.lease(NS, [b"k" * 16], ttl_ms=0),
        lambda: holder.register_holder(NS, "twice", b"", b""),
        lambda: holder.reclaim(-1),
    ]
    for call in cases:
        with pytest.raises(RegistryError) as err:
            call()
        assert err.value.code == "bad_request"
    assert holder.publish([b"k" * 16], [1]) == []  # the connection is fine
    still_served()
    # The registry unlinks cleanup paths when a holder dies: only the holder's own files
    # (kvmkt-<uid>-holder-<pid>-* in a holder-file directory) are accepted.
    own = holder_file(holder_file_dirs()[0], os.getpid(), "ok")
    for path in ("rel/path", "/etc/passwd", os.path.dirname(own) + "/../etc/passwd",
                 os.path.join(os.path.dirname(own), "kvmkt-other-name"),
                 holder_file("/var/tmp", os.getpid(), "elsewhere")):
        with pytest.raises(RegistryError) as err:
            registry.connect("x").register_holder(NS, "x", b"", b"", cleanup_paths=[path])
        assert err.value.code == "bad_request"
    assert registry.connect("y").register_holder(NS, "y", b"", b"", cleanup_paths=[own])


def test_many_requests_in_one_write_are_answered_in_order(served) -> None:
    registry, still_served = served
    conn = RawConnection(registry.socket_path)
    frames = encode_frame(Hello(PROTOCOL_VERSION, "pipelined", os.getpid()))
    frames += b"".join(encode_frame(Status()) for _ in range(50))
    conn.send(frames)
    assert isinstance(conn.reply(), HelloReply)
    assert all(isinstance(conn.reply(), RegistryStatus) for _ in range(50))
    still_served()


def _peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_a_client_that_pipelines_without_reading_is_dropped(start_registry) -> None:
    """Each Offers request (~40 bytes) asks for a ~1.3 MB reply: 128 of them in one write
    would make an unbounded registry buffer ~170 MB; it stops at its 16 MiB backlog."""
    port = _free_port()
    registry = start_registry("--metrics-port", str(port))
    keys = [i.to_bytes(16, "little") for i in range(4096)]
    owner = registry.connect("owner")
    owner.register_holder(NS, "owner", b"", b"")
    owner.publish(keys, list(range(len(keys))),
                  [BlockTokens(k, b"", bytes(256)) for k in keys])  # fmt: skip
    good = registry.connect("good")
    assert len(good.offers(NS).changes) == len(keys)
    before = _peak_rss_bytes(registry.proc.pid)

    greedy = RawConnection(registry.socket_path)
    greedy.hello()
    greedy.send(b"".join(encode_frame(Offers(NS)) for _ in range(128)))  # never reads

    wait_until(lambda: _scrape(port).get("kvmkt_registry_slow_clients_dropped_total") == 1, 10)
    assert _drained_to_the_end(greedy.sock)
    grown = _peak_rss_bytes(registry.proc.pid) - before
    assert grown < 40 << 20, f"registry peak RSS grew by {grown >> 20} MiB"
    assert registry.proc.poll() is None
    assert good.lookup(NS, keys) == (owner.holder_id, len(keys))  # the others are served
    assert len(good.offers(NS).changes) == len(keys)
    greedy.close()


def _drained_to_the_end(sock: socket.socket) -> bool:
    """Whether the peer closed: what reached our buffer, then EOF (or a reset)."""
    sock.settimeout(5)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return {line.split()[0]: float(line.split()[1])
                for line in response.read().decode().splitlines()
                if line.startswith("kvmkt_registry_")}  # fmt: skip
