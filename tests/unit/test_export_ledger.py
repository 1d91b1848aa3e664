"""ExportLedger against vLLM's own BlockPool and Request, a real registry process and the real
HolderChannel thread: pins, the soft budget of in-place export, leases blocking release."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest
from vllm import SamplingParams
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.request import Request, RequestStatus

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.exporter import ExportLedger
from kvmkt_connector.connector.holder_channel import HolderChannel, HolderRegistration
from kvmkt_connector.hashing import BlockKeyer, KeyScope
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.registry.client import RegistryClient

BS = 16
NS = b"N" * 16


@pytest.fixture
def registry():
    d = tempfile.mkdtemp(dir="/tmp")
    os.chmod(d, 0o700)
    sock = os.path.join(d, "r.sock")
    proc = subprocess.Popen([sys.executable, "-m", "kvmkt_connector.registry", "serve",
                             "--socket", sock], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield sock
    proc.terminate()
    proc.wait(10)


def _request(rid: str, tokens: list[int], status=RequestStatus.FINISHED_LENGTH_CAPPED) -> Request:
    req = Request(rid, tokens, SamplingParams(max_tokens=1), None)
    req.num_computed_tokens = len(tokens)
    req.append_output_token_ids(7)  # finished after sampling one token
    req.status = status
    return req


def _ledger(sock, pool, fraction=0.25, staged=None):
    cfg = MarketplaceConfig(registry_socket=sock, registry_autostart=False,
                            max_pinned_fraction=fraction, registry_sync_interval_ms=20)
    channel = HolderChannel(cfg, "test", HolderRegistration(NS, "exporter", b"", b""))
    deadline = time.monotonic() + 10
    while not channel.connected:
        assert time.monotonic() < deadline, "holder did not register"
        time.sleep(0.01)
    return ExportLedger(cfg, BS, channel, MarketplaceStats(), pool, staged), channel


def _settle(ledger, until, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline
        ledger.tick()
        time.sleep(0.02)


def _export(ledger, pool, rid, n_blocks, seed, status=RequestStatus.FINISHED_LENGTH_CAPPED):
    tokens = [(seed * 1000 + i) % 50000 for i in range(n_blocks * BS + 5)]
    blocks = pool.get_new_blocks(n_blocks + 1)
    req = _request(rid, tokens, status)
    keys = BlockKeyer(NS, BS).start(KeyScope())
    ledger.on_request_finished(req, [b.block_id for b in blocks], keys)
    pool.free_blocks(blocks)  # the request's own reference goes, our pins stay
    return keys.keys[:n_blocks], blocks


def test_in_place_export_publishes_whole_prefixes_and_enforces_the_budget(registry):
    pool = BlockPool(num_gpu_blocks=201, enable_caching=True, hash_block_size=BS)
    ledger, channel = _ledger(registry, pool, fraction=0.25)  # budget: 50 blocks
    free_before = pool.get_num_free_blocks()
    keys, blocks = _export(ledger, pool, "r1", 40, seed=1)
    assert all(b.ref_cnt == 1 for b in blocks[:40]) and blocks[40].ref_cnt == 0
    with RegistryClient.connect(registry, client_name="q", autostart=False) as q:
        _settle(ledger, lambda: q.lookup(NS, keys)[1] == 40)
        # A 30-block prefix over the 50-block budget is still published whole ...
        keys2, _ = _export(ledger, pool, "r2", 30, seed=2)
        _settle(ledger, lambda: q.lookup(NS, keys2)[1] == 30)
        # ... and the overshoot is reclaimed from the least recently used entries: r1's.
        _settle(ledger, lambda: ledger._used() <= 50)
        assert q.lookup(NS, keys2)[1] == 30
        assert q.lookup(NS, keys)[1] < 40
        # Pins follow the registry: what is no longer listed is back in the free queue.
        pinned = sum(b.ref_cnt for b in pool.blocks if not b.is_null)
        assert pinned == ledger._used() <= 50
        assert pool.get_num_free_blocks() == free_before - pinned
    channel.close()


def test_leased_pages_are_not_released_until_the_lease_ends(registry):
    pool = BlockPool(num_gpu_blocks=101, enable_caching=True, hash_block_size=BS)
    ledger, channel = _ledger(registry, pool, fraction=0.2)  # budget: 20 blocks
    keys, blocks = _export(ledger, pool, "r1", 20, seed=3)
    with RegistryClient.connect(registry, client_name="q", autostart=False) as q:
        _settle(ledger, lambda: q.lookup(NS, keys)[1] == 20)
        grant = q.lease(NS, keys, ttl_ms=60_000)
        assert grant is not None and len(grant.locations) == 20
        _export(ledger, pool, "r2", 20, seed=4)  # 20 over budget, but r1 is leased
        time.sleep(0.3)
        for _ in range(10):
            ledger.tick()
            time.sleep(0.02)
        assert all(b.ref_cnt == 1 for b in blocks[:20]), "a leased page was unpinned"
        q.release_leases([grant.lease_id])
        _settle(ledger, lambda: ledger._used() <= 20)
    channel.close()


def test_staged_export_truncates_to_free_slots_and_stages_copies(registry):
    pool = BlockPool(num_gpu_blocks=101, enable_caching=True, hash_block_size=BS)
    ledger, channel = _ledger(registry, pool, staged=8)
    keys, blocks = _export(ledger, pool, "r1", 12, seed=5)
    (job,) = ledger.take_jobs()
    assert len(job.src) == 8 and job.src == [b.block_id for b in blocks[:8]]
    assert all(b.ref_cnt == 1 for b in blocks[:8]) and blocks[8].ref_cnt == 0
    ledger.on_saves_done([job.job_id])
    assert all(b.ref_cnt == 0 for b in blocks[:8])  # unpinned once copied
    with RegistryClient.connect(registry, client_name="q", autostart=False) as q:
        _settle(ledger, lambda: q.lookup(NS, keys)[1] == 8)
    channel.close()


def test_blocks_of_steps_still_in_flight_are_not_exported(registry):
    """An aborted request can finish while a prefill chunk of it is still in flight (async
    scheduling counts scheduled tokens as computed): only blocks below what completed steps
    wrote are pinned and published."""
    pool = BlockPool(num_gpu_blocks=101, enable_caching=True, hash_block_size=BS)
    ledger, channel = _ledger(registry, pool)
    tokens = [(7000 + i) % 50000 for i in range(10 * BS + 5)]
    blocks = pool.get_new_blocks(11)
    req = _request("r-abort", tokens, RequestStatus.FINISHED_ABORTED)
    req.num_in_flight_tokens = 4 * BS + 5  # the last chunk is scheduled, not yet run
    keys = BlockKeyer(NS, BS).start(KeyScope())
    ledger.on_request_finished(req, [b.block_id for b in blocks], keys)
    assert [b.ref_cnt for b in blocks] == [2] * 6 + [1] * 5  # request's ref + our pin
    pool.free_blocks(blocks)
    with RegistryClient.connect(registry, client_name="q", autostart=False) as q:
        _settle(ledger, lambda: q.status().published_blocks == 6)
    channel.close()
