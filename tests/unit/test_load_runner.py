"""LoadRunner (the worker's asynchronous imports) over a real host-shm page region: every job
is reported exactly once, with its destination blocks failed when the copy cannot be
trusted, and the pages of a successful one are the exporter's."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from kvmkt_connector.connector.loads import LoadResults, LoadRunner
from kvmkt_connector.connector.metadata import LoadJob
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.transport.descriptors import HolderDescriptor
from kvmkt_connector.transport.generations import encode_locations
from kvmkt_connector.transport.host_shm import HostPageRegion, HostShmExporter, HostShmImporter
from kvmkt_connector.transport.layout import KVPageLayout

NB, H, BS, D = 16, 2, 16, 8


def _caches(fill=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = (lambda: torch.full((NB, H, BS, 2 * D), fill)) if fill is not None else (
        lambda: torch.randn(NB, H, BS, 2 * D, generator=g))
    return {f"layer{i}": make() for i in range(2)}


def _setup(tmp_path):
    src = _caches(seed=1)
    src_layout = KVPageLayout(src, NB)
    region = HostPageRegion.create(os.path.join(tmp_path, "region"), 8, src_layout.segment_bytes)
    exporter = HostShmExporter(src_layout, region)
    dst = _caches(fill=0.0)
    layout = KVPageLayout(dst, NB)
    importer = HostShmImporter(layout)
    runner = LoadRunner(layout, 0, MarketplaceStats(), shm_importer=importer)
    return src, dst, region, exporter, runner, importer


def _job(job_id, region, slots, dst, keys, **kw):
    return LoadJob(job_id, f"req-{job_id}", 1, HolderDescriptor([region.descriptor]).encode(),
                   encode_locations(np.asarray(slots), np.ones(len(slots), np.uint32)),
                   dst, keys, **kw)


def _drain(runner, jobs, timeout=10.0) -> LoadResults:
    total = LoadResults()
    deadline = time.monotonic() + timeout
    while len(total.finished_requests) < jobs:
        assert time.monotonic() < deadline, f"only {total.finished_requests} reported"
        out = runner.poll(wait_s=0.01)
        assert not (out.finished_requests & total.finished_requests), "reported twice"
        total.finished_requests |= out.finished_requests
        total.failed_blocks |= out.failed_blocks
        total.done_jobs += out.done_jobs
        total.failed_jobs += out.failed_jobs
    for _ in range(5):  # nothing more comes
        out = runner.poll()
        assert not out.finished_requests and not out.done_jobs and not out.failed_jobs
    return total


def test_each_job_is_reported_once_and_good_pages_arrive(tmp_path):
    src, dst, region, exporter, runner, importer = _setup(str(tmp_path))
    keys = [bytes([i + 1]) * 16 for i in range(6)]
    exporter.save([3, 4, 5, 6, 7, 8], list(range(6)), keys)
    runner.submit(_job(0, region, [0, 1, 2], [10, 11, 12], keys[:3]))  # good
    runner.submit(_job(1, region, [3, 4], [1, 2], keys[3:5], fault="fail"))  # injected
    runner.submit(_job(2, region, [5], [14], [b"\x99" * 16]))  # slot holds another key
    runner.submit(_job(3, region, [3, 4], [5, 6], keys[3:5], fault="stall", stall_s=0.3))
    t0 = time.monotonic()
    first = runner.poll()
    assert "req-3" not in first.finished_requests  # stalled: not issued yet
    rest = _drain(runner, 4 - len(first.finished_requests))  # (copies may be over already)
    assert time.monotonic() - t0 >= 0.3
    assert first.finished_requests | rest.finished_requests == {f"req-{i}" for i in range(4)}
    done = sorted(first.done_jobs + rest.done_jobs)
    failed = sorted(first.failed_jobs + rest.failed_jobs)
    assert done == [0, 3] and failed == [1, 2]
    assert first.failed_blocks | rest.failed_blocks == {1, 2, 14}
    for name in src:
        assert torch.equal(dst[name][[10, 11, 12]], src[name][[3, 4, 5]])
        assert torch.equal(dst[name][[5, 6]], src[name][[6, 7]])
    runner.close()
    importer.close()  # its sweeper thread must not free tensors at interpreter exit
    region.close()


def test_a_slot_restaged_during_a_stall_is_caught(tmp_path):
    """The exporter reuses the slot between lease and copy: the key check fails the job."""
    src, dst, region, exporter, runner, importer = _setup(str(tmp_path))
    keys = [b"\x01" * 16, b"\x02" * 16]
    exporter.save([1, 2], [0, 1], keys)
    runner.submit(_job(0, region, [0, 1], [4, 5], keys, fault="stall", stall_s=0.2))
    exporter.save([9, 10], [0, 1], [b"\x07" * 16, b"\x08" * 16])  # restaged meanwhile
    out = _drain(runner, 1)
    assert out.failed_jobs == [0] and out.failed_blocks == {4, 5}
    runner.close()
    importer.close()  # its sweeper thread must not free tensors at interpreter exit
    region.close()
