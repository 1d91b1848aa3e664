"""Start the node's registry on demand, exactly once however many instances race to do it.

``ensure_registry`` is cheap when a registry already listens (one connect). Otherwise it
takes ``flock`` on ``<dir>/registry.lock``, looks again (the lock holder before us may have
just started one), replaces a stale socket file and spawns a detached server that exits
after ``idle_exit_s`` without clients. The server's idle exit takes the same lock, so it
never leaves while someone is starting or about to reuse it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import subprocess
import sys
import threading
import time

from . import paths
from .errors import RegistryUnavailable

DEFAULT_IDLE_EXIT_S = 60.0
_POLL_S = 0.02


def registry_listening(socket_path: str, timeout_s: float = 1.0) -> bool:
    """True if something accepts on ``socket_path``; False if nothing listens there.

    Other failures (a timeout: a live but overloaded server) raise RegistryUnavailable, so
    that nobody mistakes a busy registry for a dead one and replaces its socket.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout_s)
    try:
        probe.connect(socket_path)
        return True
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise RegistryUnavailable(f"cannot probe registry at {socket_path}: {exc}") from exc
    finally:
        probe.close()


def ensure_registry(
    socket_path: str | None = None,
    timeout_s: float = 10.0,
    *,
    idle_exit_s: float = DEFAULT_IDLE_EXIT_S,
) -> str:
    """Make sure a registry listens on ``socket_path``; return the path."""
    path = paths.check_socket_path(socket_path or paths.default_socket_path())
    if registry_listening(path):
        return path
    deadline = time.monotonic() + timeout_s
    paths.ensure_private_dir(paths.socket_dir(path))
    lock_fd = os.open(paths.lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _lock(lock_fd, deadline, path)
        if registry_listening(path):
            return path
        if os.path.lexists(path):  # nobody listens and we hold the lock: a stale leftover
            os.unlink(path)
        server = _spawn(path, idle_exit_s)
        while not registry_listening(path):
            if server.poll() is not None:
                raise RegistryUnavailable(
                    f"registry exited with status {server.returncode} while starting; "
                    f"see {paths.log_path(path)}"
                )
            if time.monotonic() > deadline:
                raise RegistryUnavailable(f"registry did not start within {timeout_s} s")
            time.sleep(_POLL_S)
        return path
    finally:
        os.close(lock_fd)  # releases the flock


def _lock(lock_fd: int, deadline: float, path: str) -> None:
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RegistryUnavailable(
                    f"timed out waiting for {paths.lock_path(path)}"
                ) from None
            time.sleep(_POLL_S)


def _spawn(path: str, idle_exit_s: float) -> subprocess.Popen[bytes]:
    # The child runs from "/" (it must not pin the caller's cwd), so make our package
    # importable from wherever it is, installed or not.
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    log_flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    log_fd = os.open(paths.log_path(path), log_flags, 0o600)
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "kvmkt_connector.registry", "serve", "--socket", path,
             "--idle-exit-s", str(idle_exit_s)],
            stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
            start_new_session=True, cwd="/", env=env, close_fds=True,
        )  # fmt: skip
    finally:
        os.close(log_fd)
    # Reap it whenever it exits, so it never lingers as our zombie (which looks alive to
    # os.kill(pid, 0)).
    threading.Thread(target=server.wait, name="kvmkt-registry-reaper", daemon=True).start()
    return server
