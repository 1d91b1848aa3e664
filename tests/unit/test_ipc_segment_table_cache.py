"""Review 6: CudaIpcImporter._segment_table and PageCopier's launch parameters, on the CPU
(fake driver calls, no GPU).

- the same decoded descriptor, its handle closed by the sweep and re-opened at another
  address: the table is rebuilt from the new bases (never the stale one);
- an equal but distinct descriptor object, then the first one again: right table;
- a bad descriptor after a good one is still refused, every time;
- a second holder whose handles reuse the first one's mapped address after a close.
- one PageCopier, launches alternating between tables of the same device address with
  other segment counts / page sizes and of another address with the same shape: every
  launch's bytes carry its own table, page size, segment count (fake driver as in
  test_launch_parameter_sim).

Run: PYTHONPATH=. python -m pytest -q tests/unit/test_ipc_segment_table_cache.py
"""

from __future__ import annotations

import struct
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvmkt_connector.transport import cuda_driver as cu  # noqa: E402
from kvmkt_connector.transport import cuda_ipc  # noqa: E402
from kvmkt_connector.transport.descriptors import (  # noqa: E402
    CudaIpcDescriptor,
    CudaIpcSegment,
    TransferError,
)
from kvmkt_connector.transport.page_copy import PageCopier  # noqa: E402
from tests.unit.test_launch_parameter_sim import Device, FakeTable, fake_cuda  # noqa: E402,F401


class FakeTableBuilt:
    def __init__(self, src_start, src_stride, dst_start, dst_stride, device):
        self.src_start = list(src_start)


@pytest.fixture
def importer(monkeypatch):
    addrs = iter(range(0x1000_0000, 0x9000_0000, 0x100_0000))
    opened = {}

    def open_ipc_handle(h):
        opened[h] = next(addrs)
        return opened[h]

    monkeypatch.setattr(cu, "open_ipc_handle", open_ipc_handle)
    monkeypatch.setattr(cu, "close_ipc_handle", lambda ptr: None)
    monkeypatch.setattr(cuda_ipc.SegmentTable, "build",
                        classmethod(lambda cls, *a: FakeTableBuilt(*a)))
    imp = object.__new__(cuda_ipc.CudaIpcImporter)
    imp.layout = SimpleNamespace(device=torch.device("cpu"))
    imp._local_start, imp._local_stride, imp._local_bytes = [0, 0], [64, 64], [32, 32]
    imp._page_bytes = 32
    imp._mapped, imp._seg_tables = {}, {}
    imp._inflight, imp._next_sweep = [], 0.0
    imp._lock = threading.RLock()
    imp._stop = threading.Event()
    imp._sweeper = object()  # no thread
    return imp, opened


def _desc(handles, pid=1, nbytes=32):
    segs = [CudaIpcSegment(0, 0, 64, nbytes), CudaIpcSegment(len(handles) - 1, 4096, 64, nbytes)]
    return CudaIpcDescriptor("u", pid, list(handles), segs, 10)


def _want(desc, opened):
    return [opened[desc.handles[s.allocation]] + s.offset for s in desc.segments]


def test_stale_table_never_used_after_remap(importer, monkeypatch):
    imp, opened = importer
    d = _desc([b"h1", b"h2"])
    t1 = imp._segment_table(d)
    assert t1.src_start == _want(d, opened)
    assert imp._segment_table(d) is t1  # cached
    # the sweep closes h1 (idle), then the next load re-opens it elsewhere
    imp._mapped[b"h1"][1] = time.monotonic() - 10 * cuda_ipc.IDLE_CLOSE_S
    monkeypatch.setattr(cuda_ipc, "process_alive", lambda pid: True)
    imp._sweep_locked()
    assert b"h1" not in imp._mapped and not imp._seg_tables
    t2 = imp._segment_table(d)  # same descriptor object: key kept, bases re-read
    assert t2 is not t1 and t2.src_start == _want(d, opened)
    # mapping changed behind the cache without the sweep (defensive): bases compare
    imp._mapped[b"h2"][0] += 0x10
    opened[b"h2"] += 0x10
    t3 = imp._segment_table(d)
    assert t3 is not t2 and t3.src_start == _want(d, opened)


def test_equal_distinct_descriptors_and_bad_ones(importer):
    imp, opened = importer
    d1, d1b, d2 = _desc([b"h1", b"h2"]), _desc([b"h1", b"h2"]), _desc([b"h3"], pid=2)
    a = imp._segment_table(d1)
    b = imp._segment_table(d2)
    assert b.src_start == _want(d2, opened)
    assert imp._segment_table(d1b) is a and imp._segment_table(d1) is a
    bad = _desc([b"h4"], nbytes=48)
    for _ in range(2):
        with pytest.raises(TransferError):
            imp._segment_table(bad)
    assert imp._segment_table(d1) is a  # a refused one changes nothing


def test_shared_launch_parameter_follows_each_table(fake_cuda):  # noqa: F811
    copier = PageCopier(torch.device("cuda", 0), inline_blocks=3)
    rng = np.random.default_rng(5)
    shapes = [(1, 16), (3, 48), (1, 16), (2, 16), (2, 64), (1, 16)]
    for n_segs, pb in shapes:
        dev = Device(rng, n_segs, 9, 9, pb)
        addr = 0x7F00_0000_0000  # every table at the same device address (allocator reuse)
        table = FakeTable(dev.table.host, addr)
        n = int(rng.integers(1, 8))
        ids = PageCopier.block_ids(rng.integers(0, 9, n).tolist(),
                                   rng.choice(9, n, replace=False).tolist(), 9, 9)
        fake_cuda.queue.clear()
        copier.launch(table, ids, pb)
        for j, (_, _, _, _, raw) in enumerate(fake_cuda.queue):
            segs, page_bytes = struct.unpack_from("<qQ", raw, 0)
            k, ns = struct.unpack_from("<II", raw, 16)
            assert (segs, page_bytes, ns) == (addr, pb, n_segs)
            assert k == min(3, n - 3 * j)
            got = np.frombuffer(raw, "<i4", offset=24, count=6)
            assert list(got[:k]) == list(ids[0, 3 * j : 3 * j + k])
            assert list(got[3 : 3 + k]) == list(ids[1, 3 * j : 3 * j + k])
    # another address, same shape: a new header
    fake_cuda.queue.clear()
    copier.launch(FakeTable(np.zeros((1, 4), np.int64), 0x5000), ids[:, :1], 64)
    assert struct.unpack_from("<q", fake_cuda.queue[0][4], 0)[0] == 0x5000
