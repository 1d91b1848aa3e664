"""A registry that starts removes the shared-memory files of holders that died while no
registry watched them (the previous one was SIGKILLed), and leaves live holders' files."""

from __future__ import annotations

import os
import subprocess
import sys

from kvmkt_connector.registry.paths import holder_file, holder_file_dirs


def test_starting_registry_removes_dead_holders_files(start_registry):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    directory = holder_file_dirs()[0]
    stale = holder_file(directory, dead.pid, "abcd-gen")
    live = holder_file(directory, os.getpid(), "abcd-r0")
    for path in (stale, live):
        with open(path, "wb") as f:
            f.write(b"x" * 4096)
    try:
        server = start_registry("--capacity", "100")
        with server.connect() as c:
            c.status()  # the server is up: its start-up sweep ran
        assert not os.path.exists(stale), "a dead holder's file outlived it"
        assert os.path.exists(live), "a live holder's file was removed"
    finally:
        for path in (stale, live):
            if os.path.exists(path):
                os.unlink(path)
