"""``RegistryServer``: the registry's Unix-socket service.

A single-threaded ``selectors`` loop: non-blocking sockets, one incremental frame decoder
and one output buffer per connection. Requests are answered in order from
``PrefixRegistry``; the shared-memory lookup table is kept in step through the registry's
KeyListener hook. Being single-threaded is what makes the registry's state consistent
without locks; every request is O(keys it names), so one slow client cannot stall others
for long. What one connection can make us buffer is bounded: incoming, one frame
(``MAX_FRAME_BYTES``) plus one read; outgoing, ``MAX_BACKLOG_BYTES`` of replies it has not
read: past that (a client that pipelines requests and reads slowly or never) it is
disconnected, with a log line and ``kvmkt_registry_slow_clients_dropped_total``. The check
runs after every reply, since one read of small requests can ask for many large replies.

Crash-only: an unexpected exception while handling a request ends the service (socket and
lookup table removed) instead of serving from a state that may be inconsistent, since a
wrong lease would let an importer copy pages their holder already reused. All registry
state is soft: clients reconnect (auto-start brings up a fresh registry) and re-register.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import selectors
import signal
import socket
import struct
import time

from . import paths
from .dispatch import RequestDispatcher, Session
from .framing import FrameDecoder, FrameError, decode_request, encode_frame
from .index import PrefixRegistry
from .lookup_writer import LookupTableWriter, create_table
from .offers import ListenerFanout, OfferCatalog
from .orphans import OrphanedFiles, pid_alive, remove_stale_files
from .protocol import MAX_FRAME_BYTES, ErrorReply, Reply

log = logging.getLogger(__name__)

DEFAULT_CAPACITY_BLOCKS = 262_144
LEASE_SWEEP_S = 0.1
PID_CHECK_S = 0.5
RECV_BYTES = 256 << 10
MAX_BACKLOG_BYTES = 2 * MAX_FRAME_BYTES  # unread replies before we give up on a client
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class _Connection(Session):
    __slots__ = ("sock", "peer_pid", "decoder", "out", "writing")

    def __init__(self, sock: socket.socket, peer_pid: int, owner: int) -> None:
        super().__init__(owner)
        self.sock = sock
        # The kernel's word on who connected, in our pid namespace (0 if not visible from
        # it); unlike Hello/RegisterHolder's pid it cannot be wrong or in another namespace.
        self.peer_pid = peer_pid
        self.decoder = FrameDecoder()
        self.out = bytearray()  # encoded replies not yet sent
        self.writing = False  # registered for EVENT_WRITE


class RegistryServer:
    def __init__(
        self,
        socket_path: str,
        *,
        capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        idle_exit_s: float | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.socket_path = paths.check_socket_path(socket_path)
        self.idle_exit_s = idle_exit_s
        self.metrics_port = metrics_port
        self.metrics_server = None
        self._capacity_blocks = capacity_blocks
        self._selector = selectors.DefaultSelector()
        self._closed = False
        self._listener: socket.socket | None = None
        self._socket_ino = 0
        self._table: LookupTableWriter | None = None
        self.registry: PrefixRegistry | None = None
        self._dispatcher: RequestDispatcher | None = None
        self._orphaned_files = OrphanedFiles()
        self._conns: dict[int, _Connection] = {}
        self._accepted = 0  # connections so far: each one's lease owner id
        self._stop = False
        self._idle_since = time.monotonic()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind the socket and create the lookup table; the server accepts from here on."""
        paths.ensure_private_dir(paths.socket_dir(self.socket_path))
        self._remove_stale_socket()
        try:
            self._bind()
        except BaseException:
            self.close()
            raise
        table = self._table.path if self._table else "none"
        log.info("registry serving on %s (table %s)", self.socket_path, table)

    def _bind(self) -> None:
        remove_stale_files(self.socket_path)  # first: they may be what fills /dev/shm
        self._table = create_table(self.socket_path, self._capacity_blocks)
        offers = OfferCatalog()
        self.registry = PrefixRegistry(
            self._capacity_blocks, listener=ListenerFanout(self._table, offers)
        )
        table_path = self._table.path if self._table else ""  # none: clients ask by RPC
        self._dispatcher = RequestDispatcher(self.registry, table_path, offers)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        os.chmod(self.socket_path, 0o600)
        self._socket_ino = os.stat(self.socket_path).st_ino
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, None)
        if self.metrics_port is not None:
            from .metrics import start_metrics_server

            self.metrics_server = start_metrics_server(self.registry, self.metrics_port)

    def serve_forever(self) -> None:
        next_sweep = next_pid_check = time.monotonic()
        while not self._stop:
            now = time.monotonic()
            if now >= next_sweep:
                self.registry.expire_leases()
                next_sweep = now + LEASE_SWEEP_S
            if now >= next_pid_check:
                self._drop_dead_holders()
                next_pid_check = now + PID_CHECK_S
            if self._idle_expired(now) and self._exit_if_still_idle():
                break
            timeout = max(0.0, min(next_sweep, next_pid_check) - time.monotonic())
            for key, events in self._selector.select(timeout):
                if key.data is None:
                    self._accept()
                    continue
                conn: _Connection = key.data
                if events & selectors.EVENT_WRITE:
                    self._flush(conn)
                if events & selectors.EVENT_READ and conn.sock.fileno() in self._conns:
                    self._on_readable(conn)

    def stop(self) -> None:
        """Ask the loop to finish (signal-handler safe)."""
        self._stop = True

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _signum, _frame: self.stop())

    def close(self) -> None:
        """Close every connection, unlink our socket (if still ours) and the lookup table."""
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns.values()):
            self._close(conn)
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
            try:  # another server may have replaced a socket we lost: leave that one alone
                if os.stat(self.socket_path).st_ino == self._socket_ino:
                    os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        if self._table is not None:
            self._table.close(unlink=True)
            self._table = None
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None
        self._selector.close()

    # ------------------------------------------------------------ setup helpers

    def _remove_stale_socket(self) -> None:
        if not os.path.exists(self.socket_path):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.socket_path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            os.unlink(self.socket_path)  # nobody listens: a crashed server's leftover
        else:
            raise RuntimeError(f"a registry already serves {self.socket_path}")
        finally:
            probe.close()

    # ------------------------------------------------------------ connections

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                log.warning("accept failed: %s", exc)
                return
            peer_pid, uid, _ = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if uid not in (os.getuid(), 0):
                sock.close()
                continue
            sock.setblocking(False)
            self._accepted += 1
            conn = _Connection(sock, peer_pid, self._accepted)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _on_readable(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        if conn.closing:
            return  # already failed: ignore what follows
        try:
            payloads = conn.decoder.feed(data)
        except FrameError as exc:
            self._fail(conn, "bad_frame", str(exc))
            return
        for payload in payloads:
            try:
                request = decode_request(payload)
            except FrameError as exc:
                self._fail(conn, "bad_frame", str(exc))
                return
            try:
                reply = self._dispatcher.handle(conn, request)
            except Exception as exc:  # a request we did not foresee: that client goes
                log.exception("request %s failed", type(request).__name__)
                self._fail(conn, "bad_request", f"{type(exc).__name__}: {exc}")
                return
            self._send(conn, reply)
            if conn.closing:
                break
            if len(conn.out) > MAX_BACKLOG_BYTES:
                self._flush(conn)  # sends what the peer takes; drops it if still over
                if self._conns.get(conn.sock.fileno()) is not conn:
                    return  # closed: nothing of what follows may reach the registry
        self._flush(conn)

    def _fail(self, conn: _Connection, code: str, message: str) -> None:
        """Reply with an error, then close: the stream can no longer be trusted."""
        self._send(conn, ErrorReply(code=code, message=message))
        conn.closing = True
        self._flush(conn)

    def _send(self, conn: _Connection, reply: Reply) -> None:
        try:
            conn.out += encode_frame(reply)
        except FrameError as exc:  # e.g. a HolderList too big for one frame
            conn.out += encode_frame(ErrorReply(code="bad_request", message=str(exc)))

    def _flush(self, conn: _Connection) -> None:
        if conn.sock.fileno() not in self._conns:
            return
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            del conn.out[:sent]
        if not conn.out and conn.closing:
            self._close(conn)
            return
        if len(conn.out) > MAX_BACKLOG_BYTES:
            log.warning("dropping client %r (pid %d): %d bytes of replies it does not read",
                        conn.client, conn.pid, len(conn.out))
            self.registry.counters.slow_clients_dropped += 1
            self._close(conn)
            return
        want_write = bool(conn.out)
        if want_write != conn.writing:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self._selector.modify(conn.sock, events, conn)
            conn.writing = want_write

    def _close(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        if fd < 0 or self._conns.get(fd) is not conn:
            return
        if conn.holder_id is not None:
            self._drop_holder(conn)
        # Nobody can release this connection's leases any more; ending them is safe since
        # leases only steer: importers check every page's tag after their copy.
        self.registry.end_leases_of(conn.owner)
        del self._conns[fd]
        self._selector.unregister(conn.sock)
        conn.sock.close()
        if not self._conns:
            self._idle_since = time.monotonic()

    def _drop_holder(self, conn: _Connection) -> None:
        holder = self.registry.drop_holder(conn.holder_id)
        conn.holder_id = None
        if holder is None:
            return
        self._orphaned_files.add(holder.pid, holder.cleanup_paths)
        self._unlink_orphaned_files()
        log.info("holder %d (%s, pid %d) dropped", holder.holder_id, holder.name, holder.pid)

    def _drop_dead_holders(self) -> None:
        """Catch holders whose process died while their socket lives on (an inherited fd)."""
        for conn in list(self._conns.values()):
            if conn.holder_id is not None and conn.peer_pid and not pid_alive(conn.peer_pid):
                self._close(conn)
        self._unlink_orphaned_files()

    def _unlink_orphaned_files(self) -> None:
        self._orphaned_files.sweep({p for h in self.registry.holders() for p in h.cleanup_paths})

    def _idle_expired(self, now: float) -> bool:
        return (
            self.idle_exit_s is not None
            and not self._conns
            and (now - self._idle_since >= self.idle_exit_s)
        )

    def _exit_if_still_idle(self) -> bool:
        """Leave only while no auto-starter holds the lock and nobody waits in the backlog."""
        try:
            lock_fd = os.open(paths.lock_path(self.socket_path), os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            # Our socket's directory went (a cleaned /tmp): no client can reach us any more,
            # and staying would keep the lookup table in /dev/shm forever.
            log.info("socket directory gone and no client for %.1f s: exiting", self.idle_exit_s)
            self.close()
            return True
        except OSError:
            return False
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            return False  # someone is (re)starting the registry right now: stay
        try:
            self._accept()
            if self._conns:
                return False
            log.info("no client for %.1f s: exiting", self.idle_exit_s)
            self.close()  # unlinks the socket while we hold the lock
            return True
        finally:
            os.close(lock_fd)

