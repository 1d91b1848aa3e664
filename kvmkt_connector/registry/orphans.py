"""Files of holders and registries that died: which ones to remove, and when.

A holder's shared-memory files (export region, generation table) pin memory until they are
unlinked, and a SIGKILLed process cannot unlink its own. The registry removes only files
named by ``paths.holder_file`` (a registration naming any other path is refused) and the
lookup tables of dead registries, and only once the process that made them is gone: a
holder that merely lost its connection still serves its files. A dropped holder's files
wait for both its own pid (as it registered it) and the pid in each file's name: a pid in
a registration is only the client's word, and must not get a live process's files removed.
"""

from __future__ import annotations

import logging
import os

from . import paths
from .lookup_writer import stale_tables

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not yet reaped by its parent) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            state = stat_file.read().rpartition(b")")[2].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no procfs: fall back to a signal-0 probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def remove_stale_files(socket_path: str) -> list[str]:
    """At start-up: files of holders that died while no registry (or a crashed one) watched
    them, and tables of registries that died (SIGKILL) at any socket path (8 MB each).
    Returns the paths removed."""
    table_dir = os.path.dirname(paths.lookup_table_path(socket_path))
    stale = paths.stale_holder_files(pid_alive) + stale_tables(table_dir, pid_alive)
    removed = [p for p in stale if paths.unlink_owned_file(p)]
    if removed:
        log.info("removed %d files of dead holders and registries: %s", len(removed),
                 ", ".join(removed))
    return removed


class OrphanedFiles:
    """Files of dropped holders, removed once their process is gone (a killed process can
    look alive for a moment while it exits, so each sweep checks again)."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, list[str]]] = []  # (pid, files)

    def add(self, pid: int, files: list[str]) -> None:
        self._pending.append((pid, list(files)))

    def sweep(self, live_paths: set[str]) -> None:
        """Unlink the files of dead processes; forget those a holder registered again with
        (``live_paths``: it still uses them)."""
        still = []
        for pid, files in self._pending:
            files = [f for f in files if f not in live_paths]
            if not files:
                continue
            if pid_alive(pid):
                still.append((pid, files))
                continue
            creators = {f: paths.holder_file_pid(f) for f in files}
            busy = [f for f in files if creators[f] is not None and pid_alive(creators[f])]
            for path in files:
                if path not in busy:
                    paths.unlink_owned_file(path)
            if busy:
                still.append((pid, busy))
        self._pending = still
