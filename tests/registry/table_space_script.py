"""Run inside a private mount namespace by test_registry_table_space.py (not collected):
mounts tiny tmpfs file systems, then drives the lookup table writer and a registry on them
and prints one JSON line of what happened. Before the writer reserved its files' space,
the first part died of SIGBUS."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import threading

from kvmkt_connector.registry import paths
from kvmkt_connector.registry.client import RegistryClient, RegistryUnavailable
from kvmkt_connector.registry.lookup_table import LookupTable
from kvmkt_connector.registry.lookup_writer import LookupTableWriter
from kvmkt_connector.registry.service import RegistryServer


def mount_tmpfs(path: str, size: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
                   check=True)  # fmt: skip


def writer_on_a_small_tmpfs(directory: str, out: dict) -> None:
    mount_tmpfs(directory, "64k")  # room for a 1024-slot table, then a 2048-slot one
    try:
        big = LookupTableWriter(os.path.join(directory, "big.table"), 100_000)  # 3 MiB
    except OSError as exc:
        out["big"] = exc.errno
    else:  # the old sparse file: writing the keys is what used to kill us
        out["big"] = "created"
        for _ in range(100_000):
            big.key_listed(os.urandom(16), 0)
    out["left_behind"] = sorted(os.listdir(directory))
    writer = LookupTableWriter(os.path.join(directory, "small.table"), 300)
    rng = random.Random(3000)  # the same keys every run: their probe layout decides the rebuilds
    keys = [rng.randbytes(16) for _ in range(3000)]
    for key in keys:
        writer.key_listed(key, 1)
    reader = LookupTable.open(writer.path)
    out["listed"] = sum(reader.holder_mask(k) == 2 for k in keys)
    out["listed_kept"] = sum(reader.holder_mask(k) == 2 for k in keys[1::2])
    for key in keys[::2]:  # churn: tombstones, compacted in place (no room to grow)
        writer.key_unlisted(key, 1)
    out["after_unlist"] = sum(reader.holder_mask(k) == 2 for k in keys)
    out["wrong_after_unlist"] = sum(reader.holder_mask(k) != 0 for k in keys[::2])
    out.update(rebuilds=writer.rebuilds, in_place=writer.in_place_rebuilds,
               dropped=writer.dropped_keys, n_slots=writer.n_slots)  # fmt: skip


def registry_without_space(socket_dir: str, out: dict) -> None:
    mount_tmpfs(paths.SHM_DIR, "4k")  # a full /dev/shm ...
    mount_tmpfs(socket_dir, "4k")  # ... and a full socket directory
    server = RegistryServer(os.path.join(socket_dir, "registry.sock"), capacity_blocks=1000)
    server.start()
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        ns, keys = b"n" * 16, [bytes([i]) * 16 for i in range(1, 9)]
        holder = RegistryClient.connect(server.socket_path, client_name="h", autostart=False)
        holder.register_holder(ns, "h", b"", b"d")
        holder.publish(keys, list(range(8)))
        importer = RegistryClient.connect(server.socket_path, client_name="i", autostart=False)
        out["table_path"] = importer.lookup_table_path
        out["bound"] = importer.run_bound_hint(keys)
        grant = importer.lease(ns, keys, 1000)
        out["leased"] = grant.locations if grant else None
        try:
            importer.longest_run_hint(keys)
        except RegistryUnavailable as exc:
            out["hint"] = str(exc)
    finally:
        server.stop()
        thread.join(10)
        server.close()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    out: dict = {}
    writer_on_a_small_tmpfs(sys.argv[1], out)
    registry_without_space(sys.argv[2], out)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
