"""Host shared-memory transport: pages move between two processes, and stale slots are caught."""

import multiprocessing as mp
import os

import pytest
import torch

from kvmkt_connector.transport.descriptors import TransferError
from kvmkt_connector.transport.host_shm import HostPageRegion, HostShmExporter, HostShmImporter
from kvmkt_connector.transport.layout import KVPageLayout

NB, H, BS, D = 12, 2, 16, 8


def _caches(seed):
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}": torch.randn(NB, H, BS, 2 * D, generator=g) for i in range(3)}


def _import_in_child(descriptor, slots, keys, dst, q):
    caches = {f"layer{i}": torch.zeros(NB, H, BS, 2 * D) for i in range(3)}
    importer = HostShmImporter(KVPageLayout(caches, NB))
    try:
        importer.load(descriptor, slots, keys, dst)
        q.put({n: t.numpy().copy() for n, t in caches.items()})
    except TransferError as e:
        q.put(str(e))
    importer.close()


def _run_child(*args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_import_in_child, args=(*args, q))
    p.start()
    out = q.get(timeout=60)
    p.join(30)
    return out


@pytest.fixture
def region(tmp_path):
    layout = KVPageLayout(_caches(0), NB)
    path = f"/dev/shm/kvmkt-test-{os.getpid()}-{tmp_path.name}"
    r = HostPageRegion.create(path, 8, layout.segment_bytes)
    yield r
    r.close()
    assert not os.path.exists(path)


def test_pages_cross_processes_byte_exact(region):
    src = _caches(0)
    exporter = HostShmExporter(KVPageLayout(src, NB), region)
    keys = [bytes([i]) * 16 for i in range(3)]
    exporter.save([5, 1, 9], [0, 7, 3], keys)
    got = _run_child(region.descriptor, [7, 3, 0], [keys[1], keys[2], keys[0]], [2, 4, 6])
    assert isinstance(got, dict)
    for name, arr in got.items():
        t = torch.from_numpy(arr)
        assert torch.equal(t[2], src[name][1]) and torch.equal(t[4], src[name][9])
        assert torch.equal(t[6], src[name][5])
        untouched = [b for b in range(NB) if b not in (2, 4, 6)]
        assert not t[untouched].any()


def test_stale_slot_is_refused(region):
    exporter = HostShmExporter(KVPageLayout(_caches(0), NB), region)
    exporter.save([0], [2], [b"A" * 16])
    exporter.save([1], [2], [b"B" * 16])  # slot reused for another block
    err = _run_child(region.descriptor, [2], [b"A" * 16], [0])
    assert "no longer hold" in err


def test_missing_region_is_a_transfer_error(region):
    import msgspec
    gone = msgspec.structs.replace(region.descriptor, path="/dev/shm/kvmkt-does-not-exist")
    err = _run_child(gone, [0], [b"A" * 16], [0])
    assert "cannot open" in err


def test_layout_mismatch_is_refused(region):
    importer = HostShmImporter(KVPageLayout({"x": torch.zeros(NB, H, BS, D)}, NB))
    with pytest.raises(TransferError, match="segments differ"):
        importer.load(region.descriptor, [0], [b"A" * 16], [0])



def _mapped_inodes() -> set[int]:
    with open("/proc/self/maps") as f:
        return {int(line.split()[4]) for line in f if "kvmkt" in line}


def test_regions_of_gone_holders_are_unmapped_within_seconds():
    """An importer unmaps a region (which pins its memory even once unlinked) within
    seconds when its file is unlinked or replaced, or when the process named in it died,
    with no further import to trigger it; a live holder's region stays mapped."""
    import subprocess
    import sys
    import time

    from kvmkt_connector.registry.paths import holder_file

    layout = KVPageLayout(_caches(0), NB)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = f"test{os.getpid()}"
    pids = {"unlinked": os.getpid(), "replaced": os.getpid(), "dead": dead.pid,
            "live": os.getpid()}
    regions = {name: HostPageRegion.create(holder_file("/dev/shm", pid, tag + name), 4,
                                           layout.segment_bytes)
               for name, pid in pids.items()}
    importer = HostShmImporter(KVPageLayout(_caches(1), NB))
    try:
        inodes = {}
        for name, r in regions.items():
            HostShmExporter(layout, r).save([3], [1], [b"K" * 16])
            importer.load(r.descriptor, [1], [b"K" * 16], [0])
            inodes[name] = os.stat(r.descriptor.path).st_ino
        assert importer.mapped_regions == 4 and set(inodes.values()) <= _mapped_inodes()
        regions["dead"].owner = False  # its creator "died": the file stays, nobody unlinks it
        for name in ("unlinked", "replaced", "dead"):
            regions[name].close()
        path = regions["replaced"].descriptor.path
        regions["replaced"] = HostPageRegion.create(path, 4, layout.segment_bytes)
        gone = {inodes[n] for n in ("unlinked", "replaced", "dead")}
        t0 = time.monotonic()
        while gone & _mapped_inodes():
            assert time.monotonic() - t0 < 5, "regions of gone holders still mapped after 5 s"
            time.sleep(0.1)
        assert importer.mapped_regions == 1 and inodes["live"] in _mapped_inodes()
    finally:
        importer.close()
        regions["dead"].owner = True
        for r in regions.values():
            r.close()
        os.path.exists(regions["dead"].descriptor.path) and os.unlink(regions["dead"].descriptor.path)
