"""``RegistryClient``: a blocking, thread-safe client of the node's prefix registry.

Requests may be pipelined: ``post`` sends one and returns a ``PendingReply`` whose
``result()`` reads replies, in order, up to its own; every other call sends and then waits
(reading the replies of earlier posts first). A lock spans each send and each read. The
importer posts its lease while vLLM allocates the request's blocks, and its releases
without ever waiting for them. Any transport failure (connect, timeout, lost connection, a reply that makes no sense) raises
``RegistryUnavailable`` and leaves the client broken: callers make a new one. An
``ErrorReply`` raises ``RegistryError``; the client stays usable unless the server closed
the connection with it (bad_frame, bad_version).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

import msgspec

from . import paths
from .autostart import ensure_registry
from .errors import RegistryError, RegistryUnavailable
from .framing import FrameError, decode_reply, encode_frame, frame_length
from .lookup_table import LookupTable
from .protocol import (
    FRAME_HEADER_BYTES,
    PROTOCOL_VERSION,
    BlockTokens,
    ErrorReply,
    Hello,
    HelloReply,
    HolderAccepted,
    HolderInfo,
    HolderList,
    Lease,
    LeaseChain,
    LeaseGranted,
    ListHolders,
    Lookup,
    LookupResult,
    NoMatch,
    OfferFeed,
    Offers,
    Ok,
    Publish,
    Published,
    Reclaim,
    Reclaimed,
    RegisterHolder,
    RegistryStatus,
    ReleaseLeases,
    Reply,
    Status,
    Sync,
    Synced,
    Unpublish,
    Unpublished,
)

__all__ = ["PendingReply", "RegistryClient", "RegistryError", "RegistryUnavailable"]

log = logging.getLogger(__name__)
_R = TypeVar("_R", bound=msgspec.Struct)
_FATAL_CODES = frozenset({"bad_frame", "bad_version"})  # the server closes after these
_RECV_BYTES = 64 << 10


class PendingReply(Generic[_R]):
    """The reply to a posted request, read on demand (replies arrive in request order)."""

    __slots__ = ("_client", "_expected", "_name", "_reply", "_error", "done", "detached")

    def __init__(self, client: RegistryClient, request_name: str, expected: tuple) -> None:
        self._client, self._name, self._expected = client, request_name, expected
        self._reply: _R | None = None
        self._error: Exception | None = None
        self.done = False
        self.detached = False  # nobody will ask: an error is only logged

    def result(self) -> _R:
        """The reply; raises what ``_call`` would have (RegistryError, RegistryUnavailable)."""
        if not self.done:
            self._client._read_until(self)
        if self._error is not None:
            raise self._error
        return self._reply  # type: ignore[return-value]

    def _settle(self, reply: Reply | None, error: Exception | None = None,
                quiet: bool = False) -> None:
        """Returns normally; a reply that makes no sense sets an error (and the caller
        closes the connection: see ``_read_until``)."""
        self.done = True
        if error is None and isinstance(reply, ErrorReply):
            error = RegistryError(reply.code, reply.message)
        elif error is None and not isinstance(reply, self._expected):
            error = RegistryUnavailable(f"registry answered {type(reply).__name__} to {self._name}")
        self._reply, self._error = (None, error) if error is not None else (reply, None)
        if error is not None and self.detached and not quiet:
            log.warning("kvmkt: %s got no good reply (nobody waits for it): %s", self._name, error)


class RegistryClient:
    def __init__(self, sock: socket.socket, socket_path: str, client_name: str) -> None:
        self.socket_path = socket_path
        self.client_name = client_name
        self.holder_id: int | None = None
        self.holder_bit: int | None = None
        self.server_pid: int | None = None
        self.lookup_table_path = ""
        self._sock: socket.socket | None = sock
        self._lock = threading.Lock()
        self._rbuf = bytearray()
        self._table: LookupTable | None = None
        self._unread: deque[PendingReply] = deque()  # posted, in order; replies not read

    @classmethod
    def connect(
        cls,
        socket_path: str | None = None,
        *,
        client_name: str,
        autostart: bool = True,
        timeout_s: float = 1.0,
    ) -> RegistryClient:
        """Connect and say Hello; with ``autostart`` start a registry if none runs.

        Every failure, a bad socket path or an unsafe socket directory included, raises
        RegistryUnavailable (with the reason in its message).
        """
        try:
            path = paths.check_socket_path(socket_path or paths.default_socket_path())
        except ValueError as exc:
            raise RegistryUnavailable(str(exc)) from exc
        try:
            return cls._connect_once(path, client_name, timeout_s)
        except RegistryUnavailable:
            if not autostart:
                raise
        # None listened, or one was exiting for idleness just as we came: start one.
        try:
            ensure_registry(path, timeout_s=max(10.0, timeout_s))
        except (OSError, RuntimeError) as exc:  # UnsafePathError is a RuntimeError
            raise RegistryUnavailable(f"cannot start a registry at {path}: {exc}") from exc
        return cls._connect_once(path, client_name, timeout_s)

    @classmethod
    def _connect_once(cls, path: str, client_name: str, timeout_s: float) -> RegistryClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise RegistryUnavailable(f"cannot connect to registry at {path}: {exc}") from exc
        client = cls(sock, path, client_name)
        hello = client._call(Hello(PROTOCOL_VERSION, client_name, os.getpid()), HelloReply)
        client.server_pid = hello.server_pid
        client.lookup_table_path = hello.lookup_table_path
        return client

    # ------------------------------------------------------------ holder side

    def register_holder(
        self,
        namespace: bytes,
        name: str,
        fingerprint: bytes,
        descriptor: bytes,
        cleanup_paths: Sequence[str] = (),
    ) -> HolderAccepted:
        request = RegisterHolder(
            namespace=namespace, name=name, pid=os.getpid(), fingerprint=fingerprint,
            descriptor=descriptor, cleanup_paths=list(cleanup_paths),
        )  # fmt: skip
        accepted = self._call(request, HolderAccepted)
        self.holder_id, self.holder_bit = accepted.holder_id, accepted.holder_bit
        return accepted

    def publish(
        self, keys: Sequence[bytes], locations: Sequence[int], tokens: Sequence[BlockTokens] = (),
        parents: Sequence[bytes] = (),
    ) -> list[int]:  # fmt: skip
        """List entries (``tokens``: of some of them, for KV events; ``parents``: none or one
        per key); returns locations the registry released (reusable now)."""
        msg = Publish(list(keys), list(locations), list(tokens), list(parents))
        return self._call(msg, Published).released

    def reclaim(self, count: int) -> list[int]:
        return self._call(Reclaim(count), Reclaimed).released

    def unpublish(self, locations: Sequence[int]) -> tuple[list[int], int]:
        """Returns (released now, number still leased that come back later via sync)."""
        reply = self._call(Unpublish(list(locations)), Unpublished)
        return reply.released, reply.pending

    def sync(self) -> list[int]:
        return self._call(Sync(), Synced).released

    # ------------------------------------------------------------ importer side

    def lookup(self, namespace: bytes, keys: Sequence[bytes]) -> tuple[int | None, int]:
        reply = self._call(Lookup(namespace, list(keys)), LookupResult)
        return reply.holder_id, reply.num_blocks

    def longest_run_hint(self, keys: Sequence[bytes]) -> int:
        """Shared-memory estimate of ``lookup(...)[1]`` without an RPC (excludes us).

        A hint: confirm with ``lease`` before importing anything.
        """
        table = self._table
        if table is None:
            table = self._open_table()
        return table.longest_run(keys, self.holder_bit)

    def run_bound_hint(self, keys: Sequence[bytes], exclude_bit: int | None = None) -> int:
        """Upper bound of ``longest_run_hint`` in O(log n) probes (the connector's fast path:
        it asks ``lease`` for ``keys[:bound]``, which answers the exact run). Skips our own
        holder bit, or ``exclude_bit`` when this connection is not the holder. A registry
        without a lookup table (no space for one) gets ``len(keys)``: the lease decides."""
        if not self.lookup_table_path:
            return len(keys)
        table = self._table
        if table is None:
            table = self._open_table()
        return table.run_upper_bound(keys, self.holder_bit if exclude_bit is None else exclude_bit)

    def lease(
        self, namespace: bytes, keys: Sequence[bytes], ttl_ms: int, min_blocks: int = 1,
        exclude_holder: int | None = None,
    ) -> LeaseGranted | None:
        request = Lease(namespace, list(keys), ttl_ms, min_blocks, exclude_holder)
        reply = self._call(request, LeaseGranted, NoMatch)
        return None if isinstance(reply, NoMatch) else reply

    def lease_chain(
        self, namespace: bytes, tail: bytes, blocks: int, ttl_ms: int, head_parent: bytes = b"",
        exclude_holder: int | None = None,
    ) -> LeaseGranted | None:  # fmt: skip
        reply = self._call(LeaseChain(namespace, tail, blocks, ttl_ms, head_parent, exclude_holder),
                           LeaseGranted, NoMatch)
        return None if isinstance(reply, NoMatch) else reply

    def post_lease_chain(
        self, namespace: bytes, tail: bytes, blocks: int, ttl_ms: int, head_parent: bytes = b"",
        exclude_holder: int | None = None,
    ) -> PendingReply:  # fmt: skip
        """``lease_chain`` without waiting: ``result()`` is a LeaseGranted or a NoMatch."""
        return self.post(LeaseChain(namespace, tail, blocks, ttl_ms, head_parent, exclude_holder),
                         LeaseGranted, NoMatch)

    def release_leases(self, lease_ids: Sequence[int]) -> None:
        self._call(ReleaseLeases(list(lease_ids)), Ok)

    def drain(self) -> None:
        """Wait until the registry answered everything posted (so handled it, in order)."""
        if self._unread:
            self._read_until(self._unread[-1])

    def release_leases_later(self, lease_ids: Sequence[int]) -> None:
        """Send the release; its reply is read (and dropped) by a later call."""
        self.post(ReleaseLeases(list(lease_ids)), Ok).detached = True

    # ------------------------------------------------------------ diagnostics

    def list_holders(self) -> list[HolderInfo]:
        return self._call(ListHolders(), HolderList).holders

    def post_list_holders(self) -> PendingReply:
        """``list_holders`` without waiting: ``result()`` is a HolderList."""
        return self.post(ListHolders(), HolderList)

    def ready(self, pending: PendingReply) -> bool:
        """Whether ``pending``'s reply is in (then ``result()`` returns at once): reads the
        replies that have begun to arrive, never waits for one that has not."""
        while not pending.done:
            sock = self._sock
            if sock is None:
                return True  # (result() reports the closed connection)
            try:
                readable, _, _ = select.select([sock], [], [], 0)
            except (OSError, ValueError):
                return True
            if not readable:
                return False
            self._read_until(self._unread[0])  # (a reply comes in one send: no real wait)
        return True

    def offers(
        self, namespace: bytes, feed_id: int = 0, cursor: int = 0, max_changes: int = 4096,
        after: int = 0,
    ) -> OfferFeed:  # fmt: skip
        return self._call(Offers(namespace, feed_id, cursor, max_changes, after), OfferFeed)

    def status(self) -> RegistryStatus:
        return self._call(Status(), RegistryStatus)

    @property
    def broken(self) -> bool:
        return self._sock is None

    def peer_closed(self) -> bool:
        """Whether the registry closed this connection (it died or restarted), without
        blocking: its lookup table is then stale, and our holder bit may be someone else's.
        (With no reply outstanding, a readable socket here means EOF or junk;
        ``select`` first: a recv on a socket with a timeout would wait that long.)"""
        sock = self._sock
        if sock is None:
            return True
        while self._unread:  # replies we posted for are not junk: read those that came
            try:
                readable, _, _ = select.select([sock], [], [], 0)
            except (OSError, ValueError):
                return True
            if not readable:
                return False  # still to come: the connection is in use (reading finds EOF)
            self._read_until(self._unread[0])  # (a closed peer closes the socket)
            sock = self._sock
            if sock is None:
                return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # closed under us
            return True

    def close(self) -> None:
        with self._lock:
            self._close_socket()
        self._table = None

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _open_table(self) -> LookupTable:
        if not self.lookup_table_path:
            raise RegistryUnavailable("the registry offers no lookup table")
        try:
            self._table = LookupTable.open(self.lookup_table_path)
        except (OSError, ValueError) as exc:
            raise RegistryUnavailable(f"cannot map the lookup table: {exc}") from exc
        return self._table

    def _call(self, request: msgspec.Struct, *expected: type[_R]) -> _R:
        return self.post(request, *expected).result()

    def post(self, request: msgspec.Struct, *expected: type) -> PendingReply:
        """Send ``request``; its reply is read by ``result()`` (or by any later call)."""
        try:
            frame = encode_frame(request)
        except FrameError as exc:  # our request is too big: the caller's problem, not fatal
            raise RegistryError("bad_request", str(exc)) from exc
        pending: PendingReply = PendingReply(self, type(request).__name__, expected)
        with self._lock:
            if self._sock is None:
                raise RegistryUnavailable("registry client is closed or broken; reconnect")
            try:
                self._sock.sendall(frame)
            except OSError as exc:  # socket.timeout is an OSError
                self._close_socket()
                raise RegistryUnavailable(f"registry connection failed: {exc}") from exc
            self._unread.append(pending)
        return pending

    def _read_until(self, pending: PendingReply) -> None:
        """Read replies in order until ``pending`` has its own."""
        with self._lock:
            while not pending.done:
                if self._sock is None or not self._unread:
                    pending._settle(None, RegistryUnavailable("registry connection was closed"))
                    return
                head = self._unread[0]
                try:
                    reply = self._read_reply()
                except (OSError, FrameError) as exc:  # socket.timeout is an OSError
                    self._close_socket()
                    pending._settle(None, RegistryUnavailable(f"registry connection failed: {exc}"))
                    return
                self._unread.popleft()
                head._settle(reply)
                if isinstance(head._error, RegistryUnavailable) or (
                    isinstance(reply, ErrorReply) and reply.code in _FATAL_CODES
                ):
                    self._close_socket()  # the stream cannot be trusted any more

    def _read_reply(self) -> Reply:
        buf, sock = self._rbuf, self._sock
        while len(buf) < FRAME_HEADER_BYTES:
            self._recv_some(sock, buf)
        end = FRAME_HEADER_BYTES + frame_length(buf)
        while len(buf) < end:
            self._recv_some(sock, buf)
        payload = bytes(buf[FRAME_HEADER_BYTES:end])
        del buf[:end]
        return decode_reply(payload)

    @staticmethod
    def _recv_some(sock: socket.socket, buf: bytearray) -> None:
        chunk = sock.recv(_RECV_BYTES)
        if not chunk:
            raise ConnectionResetError("registry closed the connection")
        buf += chunk

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._rbuf.clear()
        for pending in self._unread:  # their replies will never come (a detached release
            # needs none: the registry ends a closed connection's leases)
            pending._settle(None, RegistryUnavailable("registry connection was closed"), quiet=True)
        self._unread.clear()
