"""A registry that starts removes the shared-memory files of holders that died while no
registry watched them (the previous one was SIGKILLed), and leaves live holders' files;
a dropped holder's files go only once the processes named in them are gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from registry_helpers import RegistryProcess, wait_until

from kvmkt_connector.registry.client import RegistryClient
from kvmkt_connector.registry.paths import holder_file, holder_file_dirs
from kvmkt_connector.registry.protocol import HolderAccepted, RegisterHolder


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


def test_starting_registry_removes_a_sigkilled_registrys_lookup_table(socket_dir):
    """A SIGKILLed registry cannot unlink its lookup table (8 MB in /dev/shm); the next
    registry to start on the node does, whatever socket it serves, and leaves a live
    registry's table alone."""
    first = RegistryProcess(os.path.join(socket_dir, "a.sock"), "--capacity", "100")
    live = RegistryProcess(os.path.join(socket_dir, "b.sock"), "--capacity", "100")
    try:
        with first.connect() as c:
            dead_table = c.lookup_table_path
        with live.connect() as c:
            live_table = c.lookup_table_path
        tmp_left = f"{live_table}.tmp{first.proc.pid}"  # a rebuild cut short by the kill
        open(tmp_left, "wb").close()
        assert os.path.exists(dead_table) and dead_table != live_table
        first.proc.kill()
        first.proc.wait(10)
        assert os.path.exists(dead_table), "the killed registry's table is gone already"
        third = RegistryProcess(os.path.join(socket_dir, "c.sock"), "--capacity", "100")
        try:
            with third.connect() as c:
                c.status()  # up: its start-up sweep ran
                own = c.lookup_table_path
            assert not os.path.exists(dead_table), "a dead registry's table outlived it"
            assert not os.path.exists(tmp_left)
            assert os.path.exists(live_table) and os.path.exists(own)
        finally:
            third.stop()
    finally:
        first.stop()
        live.stop()


def test_a_registration_cannot_get_a_live_process_files_removed(registry):
    """The pid in RegisterHolder is the client's word: a holder that says it is a dead
    process and names a live process's file must not get that file removed when it goes;
    the file of a process that died is removed."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    directory = holder_file_dirs()[0]
    live, gone = holder_file(directory, os.getpid(), "liar-r0"), holder_file(directory, dead.pid, "g")
    for path in (live, gone):
        with open(path, "wb") as f:
            f.write(b"x")
    try:
        with RegistryClient.connect(registry.socket_path, client_name="liar", autostart=False) as c:
            c._call(RegisterHolder(namespace=b"n" * 16, name="liar", pid=dead.pid,
                                   fingerprint=b"", descriptor=b"", cleanup_paths=[live, gone]),
                    HolderAccepted)  # fmt: skip
        wait_until(lambda: not os.path.exists(gone), 2.0)
        time.sleep(0.6)  # another of the registry's sweeps (every 0.5 s)
        assert os.path.exists(live), "a live process's file was removed"
    finally:
        for path in (live, gone):
            if os.path.exists(path):
                os.unlink(path)
