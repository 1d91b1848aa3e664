"""kvmkt_fault_rank limits a worker-side test fault to one TP rank; without it every
fault behaves as before on every rank; "short" stays scheduler-side."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvmkt_connector.connector.importer import FAULTS, ImportPlanner
from kvmkt_connector.connector.loads import LoadRunner
from kvmkt_connector.connector.metadata import LoadJob
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.transport.descriptors import HolderDescriptor
from kvmkt_connector.transport.generations import encode_locations
from kvmkt_connector.transport.host_shm import HostPageRegion, HostShmExporter, HostShmImporter
from kvmkt_connector.transport.layout import KVPageLayout
from tests.unit.test_load_runner import NB, _caches, _drain

STALL = 0.25


@pytest.mark.parametrize("fault", ["zero", "first_page", "fail", "stall", "stall_unchecked"])
@pytest.mark.parametrize("fault_rank", [-1, 0, 1, 7])
@pytest.mark.parametrize("rank", [0, 1])
def test_a_fault_hits_its_rank_only(tmp_path, fault, fault_rank, rank):
    src = _caches(seed=1)
    region = HostPageRegion.create(os.path.join(tmp_path, "region"), 8,
                                   KVPageLayout(src, NB).segment_bytes)
    exporter = HostShmExporter(KVPageLayout(src, NB), region)
    keys = [bytes([i + 1]) * 16 for i in range(3)]
    exporter.save([3, 4, 5], [0, 1, 2], keys)
    dst = _caches(fill=0.0)
    importer = HostShmImporter(KVPageLayout(dst, NB))
    runner = LoadRunner(KVPageLayout(dst, NB), rank, MarketplaceStats(), shm_importer=importer)
    desc = HolderDescriptor([region.descriptor, region.descriptor]).encode()  # two ranks
    job = LoadJob(0, "req-0", 1, desc, encode_locations(np.arange(3), np.ones(3, np.uint32)),
                  [10, 11, 12], keys, fault=fault,
                  stall_s=STALL if fault.startswith("stall") else 0.0, fault_rank=fault_rank)
    t0 = time.monotonic()
    runner.submit(job)
    out = _drain(runner, 1)
    took = time.monotonic() - t0
    hit = fault_rank in (-1, rank)
    if fault == "fail" and hit:
        assert out.failed_jobs == [0] and out.failed_blocks == {10, 11, 12}
    else:
        assert out.done_jobs == [0] and not out.failed_blocks
    if fault.startswith("stall"):
        assert (took >= STALL) == hit
    for name in src:
        got = dst[name][[10, 11, 12]]
        if hit and fault == "zero":
            assert not got.any()
        elif hit and fault == "first_page":
            assert torch.equal(got, src[name][[3, 3, 3]])
        elif hit and fault == "fail":
            assert not got.any()
        else:
            assert torch.equal(got, src[name][[3, 4, 5]])
    runner.close()
    importer.close()  # (its sweeper thread must not free tensors at interpreter exit)
    region.close()


@pytest.mark.parametrize("params, expect", [
    ({}, (None, 0.0, -1)),
    ({"kvmkt_fault": "stall", "kvmkt_stall_s": 0.5}, ("stall", 0.5, -1)),
    ({"kvmkt_fault": "zero", "kvmkt_fault_rank": 1}, ("zero", 0.0, 1)),
    ({"kvmkt_fault": "bogus", "kvmkt_fault_rank": 1}, (None, 0.0, -1)),
    ({"kvmkt_fault": "zero", "kvmkt_fault_rank": None}, (None, 0.0, -1)),  # malformed: none
    ({"kvmkt_fault": "stall", "kvmkt_stall_s": "soon"}, (None, 0.0, -1)),
])
def test_fault_for(params, expect):
    planner = SimpleNamespace(_cfg=SimpleNamespace(allow_fault_injection=True))
    req = SimpleNamespace(kv_transfer_params=params)
    assert ImportPlanner._fault_for(planner, req) == expect
    planner._cfg.allow_fault_injection = False
    assert ImportPlanner._fault_for(planner, req) == (None, 0.0, -1)


def test_faults_list_unchanged():
    assert FAULTS == ("zero", "first_page", "fail", "stall", "stall_unchecked", "short")
