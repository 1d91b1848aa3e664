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
