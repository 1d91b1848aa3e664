"""A full /dev/shm: the lookup table reserves its space up front, so no space is a clean
error (or a table that stops growing), never a SIGBUS later; a registry with no room for a
table anywhere serves without one and clients ask over the socket.

On real tiny tmpfs file systems where a private mount namespace can be had (``unshare``),
else by making ``posix_fallocate`` fail the way it does on a full file system."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from registry_helpers import namespace, subprocess_env, wait_until

from kvmkt_connector.registry.autostart import registry_listening
from kvmkt_connector.registry.client import RegistryClient, RegistryUnavailable
from kvmkt_connector.registry.lookup_table import LookupTable
from kvmkt_connector.registry.lookup_writer import MAX_FILL, LookupTableWriter

SCRIPT = Path(__file__).with_name("table_space_script.py")


def _no_space(fd: int, offset: int, length: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_table_without_space_is_refused_up_front(socket_dir, monkeypatch) -> None:
    monkeypatch.setattr(os, "posix_fallocate", _no_space)
    with pytest.raises(OSError) as err:
        LookupTableWriter(os.path.join(socket_dir, "t.table"), 100_000)
    assert err.value.errno == errno.ENOSPC
    assert socket_dir in str(err.value) and "reserve" in str(err.value)
    assert os.listdir(socket_dir) == []  # no temporary file left


def test_a_table_that_cannot_grow_keeps_answering(socket_dir, monkeypatch) -> None:
    rng = random.Random(3)
    writer = LookupTableWriter(os.path.join(socket_dir, "t.table"), 300)  # 1024 slots
    reader = LookupTable.open(writer.path)
    monkeypatch.setattr(os, "posix_fallocate", _no_space)  # from now on: no room to grow
    keys = [rng.randbytes(16) for _ in range(1200)]
    for key in keys:
        writer.key_listed(key, 3)
    # Re-laid in place; past MAX_FILL (or out of readers' reach) the rest is left out: a
    # hint misses those, no more.
    assert writer.n_slots == 1024 and writer.rebuilds == 0 and writer.in_place_rebuilds >= 1
    assert writer.dropped_keys >= len(keys) - int(1024 * MAX_FILL)
    present = [k for k in keys if reader.holder_mask(k)]
    assert len(present) == len(keys) - writer.dropped_keys
    assert all(reader.holder_mask(k) == 1 << 3 for k in present)
    gone, kept = present[: len(present) * 3 // 4], present[len(present) * 3 // 4 :]
    for key in gone:  # tombstones: the table stays full until they are cleared in place
        writer.key_unlisted(key, 3)
    compactions = writer.in_place_rebuilds
    for _ in range(3):  # churn
        fresh = [rng.randbytes(16) for _ in range(200)]
        for key in fresh:
            writer.key_listed(key, 4)
        for key in fresh:
            writer.key_unlisted(key, 4)
    assert writer.in_place_rebuilds > compactions
    for key in fresh:  # with the tombstones gone there is room for every key again
        writer.key_listed(key, 4)
    assert all(reader.holder_mask(k) == 1 << 4 for k in fresh)
    assert all(reader.holder_mask(k) == 0 for k in gone)
    assert all(reader.holder_mask(k) == 1 << 3 for k in kept)
    monkeypatch.undo()  # space again: the next attempt grows the table
    more = [rng.randbytes(16) for _ in range(1500)]
    for key in more:
        writer.key_listed(key, 5)
    assert writer.rebuilds >= 1 and writer.n_slots > 1024
    reader = LookupTable.open(writer.path)
    assert all(reader.holder_mask(k) == 1 << 5 for k in more)
    writer.close()


def test_on_real_full_tmpfs_file_systems(socket_dir) -> None:
    """Tiny tmpfs mounts in a private mount namespace (user namespaces needed)."""
    unshare = shutil.which("unshare")
    probe = unshare and subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if not probe or probe.returncode != 0:
        pytest.skip("no unprivileged mount namespace here (unshare --user --mount)")
    tiny, sock_dir = os.path.join(socket_dir, "tiny"), os.path.join(socket_dir, "reg")
    os.mkdir(tiny)
    os.mkdir(sock_dir, 0o700)
    proc = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", sys.executable, str(SCRIPT), tiny,
         sock_dir], env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, f"rc {proc.returncode} (-7: SIGBUS): {proc.stderr[-2000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["big"] == errno.ENOSPC and out["left_behind"] == []
    # Grown once (2048 slots fit in 64 KiB), then re-laid in place with the rest left out.
    assert (out["n_slots"], out["rebuilds"]) == (2048, 1) and out["in_place"] >= 1, out
    assert out["dropped"] >= 3000 - int(2048 * MAX_FILL)
    assert out["dropped"] == 3000 - out["listed"]  # every key kept is found
    # the unlisted keys are gone, the others still found (which of the random keys the
    # full table had room for is chance: no fixed share)
    assert out["wrong_after_unlist"] == 0 and out["after_unlist"] == out["listed_kept"]
    assert out["table_path"] == "" and out["bound"] == 8 and out["leased"] == list(range(8))
    assert "no lookup table" in out["hint"]
    assert "serving without a lookup table" in proc.stderr and "/dev/shm" in proc.stderr


def test_a_registry_with_no_room_for_a_table_serves_without_one() -> None:
    """A registry process whose every table fails to reserve space (as on a full /dev/shm
    and a full socket directory) starts, says so, and answers over the socket."""
    directory = tempfile.mkdtemp(prefix="kvs-", dir="/tmp")
    sock = os.path.join(directory, "registry.sock")
    code = ("import errno, os, sys\n"
            "def no_space(*_): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "os.posix_fallocate = no_space\n"
            "from kvmkt_connector.registry.runner import serve\n"
            "serve(sys.argv[1], capacity_blocks=1000)\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, sock], env=subprocess_env(),
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(lambda: registry_listening(sock) or proc.poll() is not None, 15)
        assert proc.poll() is None, proc.stderr.read()
        ns = namespace("nospace")
        keys = [bytes([i]) * 16 for i in range(1, 9)]
        with RegistryClient.connect(sock, client_name="h", autostart=False) as holder, \
                RegistryClient.connect(sock, client_name="i", autostart=False) as importer:
            holder.register_holder(ns, "h", b"", b"d")
            holder.publish(keys, list(range(8)))
            assert importer.lookup_table_path == ""
            assert importer.run_bound_hint(keys) == 8  # the lease answers instead
            assert importer.lease(ns, keys, 1000).locations == list(range(8))
            assert importer.lookup(ns, keys[:3]) == (holder.holder_id, 3)
            with pytest.raises(RegistryUnavailable):
                importer.longest_run_hint(keys)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)
    assert "serving without a lookup table" in err and "/dev/shm" in err
