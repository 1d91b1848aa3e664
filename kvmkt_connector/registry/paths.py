"""Where the registry's socket, lock, log and lookup table live, and who may touch them.

Everything sits in one owner-only directory: the socket's mode alone does not protect it on
every platform, a 0700 directory that we own does.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable

SOCKET_ENV = "KVMKT_REGISTRY_SOCKET"
SOCKET_NAME = "registry.sock"
LOCK_NAME = "registry.lock"
LOG_NAME = "registry.log"
SHM_DIR = "/dev/shm"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


class UnsafePathError(RuntimeError):
    """A registry directory exists but is not private to this user."""


def default_socket_path() -> str:
    """``$KVMKT_REGISTRY_SOCKET``, else ``$XDG_RUNTIME_DIR/kvmkt/``, else ``/tmp/kvmkt-<uid>/``."""
    explicit = os.environ.get(SOCKET_ENV)
    if explicit:
        return os.path.abspath(explicit)
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir and os.path.isdir(runtime_dir):
        return os.path.join(runtime_dir, "kvmkt", SOCKET_NAME)
    return os.path.join("/tmp", f"kvmkt-{os.getuid()}", SOCKET_NAME)


def check_socket_path(socket_path: str) -> str:
    """Absolute form of ``socket_path``; raises ValueError if AF_UNIX cannot bind it."""
    path = os.path.abspath(socket_path)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"socket path is {len(os.fsencode(path))} bytes, AF_UNIX allows "
            f"{MAX_SOCKET_PATH_BYTES}: {path}"
        )
    return path


def ensure_private_dir(path: str) -> str:
    """Create ``path`` with mode 0700 if missing; refuse it unless we own it and it is private.

    An existing directory is never chmod-ed: if it is shared (``/tmp`` itself, say), the
    caller picked the wrong place and should hear so instead of us changing its mode.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UnsafePathError(f"cannot create registry directory {path}: {exc}") from exc
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"registry directory {path} is not a directory (or is a symlink)")
    if st.st_uid != os.getuid():
        raise UnsafePathError(
            f"registry directory {path} is owned by uid {st.st_uid}, not by us ({os.getuid()})"
        )
    if st.st_mode & 0o077:
        raise UnsafePathError(
            f"registry directory {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be "
            "private (0700): pick another socket path or tighten it"
        )
    return path


def socket_dir(socket_path: str) -> str:
    return os.path.dirname(os.path.abspath(socket_path))


def lock_path(socket_path: str) -> str:
    return os.path.join(socket_dir(socket_path), LOCK_NAME)


def log_path(socket_path: str) -> str:
    return os.path.join(socket_dir(socket_path), LOG_NAME)


def lookup_table_path(socket_path: str) -> str:
    """Per-server name in /dev/shm (tmpfs: no disk writeback), else next to the socket."""
    if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK):
        digest = hashlib.sha256(os.fsencode(os.path.abspath(socket_path))).hexdigest()[:16]
        return os.path.join(SHM_DIR, f"kvmkt-{os.getuid()}-{digest}.table")
    return fallback_lookup_table_path(socket_path)


def fallback_lookup_table_path(socket_path: str) -> str:
    return os.path.join(socket_dir(socket_path), "registry.table")


def unlink_owned_file(path: str) -> bool:
    """Unlink ``path`` if it is a regular file owned by us; never follows symlinks."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        return False
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


def holder_dir() -> str:
    """Where holders create their shared-memory files: /dev/shm, else /tmp."""
    return holder_file_dirs()[0]


def holder_file(directory: str, pid: int, tag: str) -> str:
    """Path of a shared-memory file a holder process creates (export region, generation
    table). The name carries the pid, so a registry can remove a dead process's files even
    after the registry that knew them died too (``stale_holder_files``)."""
    return os.path.join(directory, f"kvmkt-{os.getuid()}-holder-{pid}-{tag}")


def is_holder_file(path: str) -> bool:
    """Whether ``path`` names a holder file of this user (no other path is ever unlinked
    on a holder's behalf). The pid in the name is the creating process's (a worker of the
    holder's engine), used by ``stale_holder_files``."""
    directory, name = os.path.split(path)
    return (
        os.path.isabs(path)
        and os.path.normpath(path) == path
        and directory in holder_file_dirs()
        and name.startswith(f"kvmkt-{os.getuid()}-holder-")
    )


def holder_file_pid(path: str) -> int | None:
    """The creating process of a holder file named by ``holder_file``, else None."""
    prefix = f"kvmkt-{os.getuid()}-holder-"
    name = os.path.basename(path)
    pid = name[len(prefix):].split("-", 1)[0] if name.startswith(prefix) else ""
    return int(pid) if pid.isdigit() else None


def holder_file_dirs() -> list[str]:
    return [d for d in (SHM_DIR, "/tmp") if os.path.isdir(d)]


def stale_holder_files(pid_alive: Callable[[int], bool]) -> list[str]:
    """Holder files of this user whose process is gone."""
    stale = []
    for directory in holder_file_dirs():
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            pid = holder_file_pid(os.path.join(directory, name))
            if pid is not None and not pid_alive(pid):
                stale.append(os.path.join(directory, name))
    return stale
