"""ExportLedger against vLLM's own BlockPool and Request, a real registry process and the real
HolderChannel thread: exports hold no blocks, rewritten blocks are withdrawn and their
generations bumped, resets withdraw everything, a restarted registry gets it all again."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
from vllm import SamplingParams
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.request import Request, RequestStatus

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.block_writes import rewritten_blocks
from kvmkt_connector.connector.exporter import ExportLedger
from kvmkt_connector.connector.holder_channel import HolderChannel, HolderRegistration
from kvmkt_connector.connector.importer import ConfirmedImport
from kvmkt_connector.hashing import BlockKeyer, KeyScope
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.registry.client import RegistryClient
from kvmkt_connector.transport.generations import GenerationTable

BS = 16
NS = b"N" * 16


_REGISTRIES: dict[str, subprocess.Popen] = {}


def _start_registry(sock: str) -> None:
    _REGISTRIES[sock] = subprocess.Popen(
        [sys.executable, "-m", "kvmkt_connector.registry", "serve", "--socket", sock],
        stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.fixture
def registry():
    d = tempfile.mkdtemp(dir="/tmp")
    os.chmod(d, 0o700)
    sock = os.path.join(d, "r.sock")
    _start_registry(sock)
    yield sock
    proc = _REGISTRIES.pop(sock)
    proc.terminate()
    proc.wait(10)


def _request(rid: str, tokens: list[int], status=RequestStatus.FINISHED_LENGTH_CAPPED) -> Request:
    req = Request(rid, tokens, SamplingParams(max_tokens=1), None)
    req.num_computed_tokens = len(tokens)
    req.append_output_token_ids(7)  # finished after sampling one token
    req.status = status
    return req


def _ledger(sock, pool, staged=None, tmp=None):
    cfg = MarketplaceConfig(registry_socket=sock, registry_autostart=False,
                            registry_sync_interval_ms=20, registry_retry_s=0.1)
    channel = HolderChannel(cfg, "test", HolderRegistration(NS, "exporter", b"", b""))
    deadline = time.monotonic() + 10
    while not channel.connected:
        assert time.monotonic() < deadline, "holder did not register"
        time.sleep(0.01)
    gens = None
    if staged is None:
        gens = GenerationTable.create(os.path.join(tmp, "gen"), pool.num_gpu_blocks)
    return ExportLedger(cfg, BS, channel, MarketplaceStats(), pool, staged, gens), channel


_IDLE = SimpleNamespace(
    scheduled_new_reqs=[],
    scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[],
                                          resumed_req_ids=set()))


def _settle(ledger, until, timeout=5.0):
    """Run empty steps (each acknowledged by the "workers") until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline
        ledger.tick(_IDLE)
        ledger.on_step_acked(ledger.step)
        time.sleep(0.02)


def _steps(ledger, n):
    """``n`` empty steps, each acknowledged by the "workers"."""
    for _ in range(n):
        ledger.tick(_IDLE)
        ledger.on_step_acked(ledger.step)
        time.sleep(0.02)


def _export(ledger, pool, rid, n_blocks, seed, status=RequestStatus.FINISHED_LENGTH_CAPPED):
    tokens = [(seed * 1000 + i) % 50000 for i in range(n_blocks * BS + 5)]
    blocks = pool.get_new_blocks(n_blocks + 1)
    req = _request(rid, tokens, status)
    keys = BlockKeyer(NS, BS).start(KeyScope())
    ledger.on_request_finished(req, [b.block_id for b in blocks], keys)
    pool.free_blocks(blocks)  # the request finishes: its blocks go back to vLLM
    return BlockKeyer(NS, BS).keys(tokens)[:n_blocks], blocks


def test_in_place_export_holds_no_blocks_and_rewrites_withdraw(registry, tmp_path):
    pool = BlockPool(num_gpu_blocks=201, enable_caching=True, hash_block_size=BS)
    ledger, channel = _ledger(registry, pool, tmp=str(tmp_path))
    free_before = pool.get_num_free_blocks()
    keys, blocks = _export(ledger, pool, "r1", 40, seed=1)
    assert all(b.ref_cnt == 0 for b in blocks) and pool.get_num_free_blocks() == free_before
    reader = GenerationTable.open(str(tmp_path / "gen"), pool.num_gpu_blocks)
    with RegistryClient.connect(registry, client_name="q", autostart=False) as q:
        _settle(ledger, lambda: q.lookup(NS, keys)[1] == 40)
        grant = q.lease(NS, keys, ttl_ms=60_000)
        assert reader.unchanged_prefix(grant.locations) == 40
        # vLLM gives blocks 10.. of the prefix to a new request: a step will write them
        ledger.tick(_new_req_output([b.block_id for b in blocks[10:]]))
        # an importer holding the lease now sees the rewrite (even though it leased first)
        assert reader.unchanged_prefix(grant.locations) == 10
        _settle(ledger, lambda: q.lookup(NS, keys)[1] == 10)  # withdrawn from the registry
    reader.close()
    ledger.shutdown()


def _new_req_output(blocks, computed_tokens=0):
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(block_ids=(blocks,), num_computed_tokens=computed_tokens)],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[],
                                              num_computed_tokens=[], resumed_req_ids=set()))


def test_in_place_pages_wait_for_the_steps_in_flight_at_finish(registry, tmp_path):
    """An aborted request may hold prefix hits on blocks another request's chunk, still in
    flight, is writing: nothing is published before the workers acknowledged a step
    scheduled after the finish, and a block rewritten meanwhile is never published."""
    pool = BlockPool(num_gpu_blocks=101, enable_caching=True, hash_block_size=BS)
    ledger, channel = _ledger(registry, pool, tmp=str(tmp_path))
    ledger.tick(_IDLE)  # step 1 is in flight when the request finishes
    keys, blocks = _export(ledger, pool, "r1", 8, seed=9, status=RequestStatus.FINISHED_ABORTED)
    with RegistryClient.connect(registry, client_name="q", autostart=False) as q:
        ledger.on_step_acked(1)  # step 1 ends: not enough, step 2 was not scheduled yet
        ledger.tick(_new_req_output([b.block_id for b in blocks[6:8]]))  # step 2 rewrites 6, 7
        time.sleep(0.3)
        assert q.lookup(NS, keys)[1] == 0
        assert ledger.wants_ack()
        ledger.on_step_acked(2)
        _settle(ledger, lambda: q.lookup(NS, keys)[1] == 6)  # blocks 0..5 only
        time.sleep(0.2)
        assert q.status().published_blocks == 6
    ledger.shutdown()


def test_rewritten_blocks_skips_only_prefix_hits():
    out = SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(block_ids=([1, 2, 3, 4],), num_computed_tokens=2 * BS + 3)],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=["run", "resumed"], new_block_ids=[([7],), ([8, 9, 10],)],
            num_computed_tokens=[100, BS], resumed_req_ids={"resumed"}),
        new_block_ids_to_zero=[11])
    assert sorted(rewritten_blocks(out, BS)) == [3, 4, 7, 9, 10, 11]


def test_prefix_cache_reset_withdraws_everything(registry, tmp_path):
    pool = BlockPool(num_gpu_blocks=101, enable_caching=True, hash_block_size=BS)
    ledger, channel = _ledger(registry, pool, tmp=str(tmp_path))
    keys, _ = _export(ledger, pool, "r1", 20, seed=3)
    reader = GenerationTable.open(str(tmp_path / "gen"), pool.num_gpu_blocks)
    with RegistryClient.connect(registry, client_name="q", autostart=False) as q:
        _settle(ledger, lambda: q.lookup(NS, keys)[1] == 20)
        grant = q.lease(NS, keys, ttl_ms=60_000)
        assert pool.reset_prefix_cache()  # no block is held: vLLM's reset succeeds
        # No scheduler step follows (an idle exporter): the channel thread notices alone.
        deadline = time.monotonic() + 2
        while q.status().published_blocks or reader.unchanged_prefix(grant.locations):
            assert time.monotonic() < deadline, "a reset without a step left exports listed"
            time.sleep(0.02)
        ledger.tick(_IDLE)  # the ledger's own books follow at its next step
        assert not ledger.has_pending() and not ledger._listed
    reader.close()
    ledger.shutdown()


def test_a_restarted_registry_gets_every_export_again(registry, tmp_path):
    pool = BlockPool(num_gpu_blocks=101, enable_caching=True, hash_block_size=BS)
    ledger, channel = _ledger(registry, pool, tmp=str(tmp_path))
    keys, _ = _export(ledger, pool, "r1", 12, seed=6)
    with RegistryClient.connect(registry, client_name="q", autostart=False) as q:
        _settle(ledger, lambda: q.lookup(NS, keys)[1] == 12)
    _REGISTRIES[registry].kill()
    _REGISTRIES[registry].wait(10)
    os.unlink(registry)
    _start_registry(registry)
    deadline = time.monotonic() + 10
    while True:
        ledger.tick(_IDLE)
        try:
            with RegistryClient.connect(registry, client_name="q", autostart=False) as q:
                if q.lookup(NS, keys)[1] == 12:
                    break
        except Exception:
            pass
        assert time.monotonic() < deadline, "exports were not published again"
        time.sleep(0.05)
    ledger.shutdown()


def test_staged_export_truncates_to_free_slots_and_holds_no_blocks(registry):
    pool = BlockPool(num_gpu_blocks=101, enable_caching=True, hash_block_size=BS)
    ledger, channel = _ledger(registry, pool, staged=8)
    keys, blocks = _export(ledger, pool, "r1", 12, seed=5)
    (job,) = ledger.take_jobs()
    assert len(job.src) == 8 and job.src == [b.block_id for b in blocks[:8]]
    assert all(b.ref_cnt == 0 for b in blocks)
    ledger.on_saves_done([job.job_id])
    with RegistryClient.connect(registry, client_name="q", autostart=False) as q:
        _settle(ledger, lambda: q.lookup(NS, keys)[1] == 8)
    channel.close()


def test_blocks_of_steps_still_in_flight_are_not_exported(registry, tmp_path):
    """An aborted request can finish while a prefill chunk of it is still in flight (async
    scheduling counts scheduled tokens as computed): only blocks below what completed steps
    wrote are published."""
    pool = BlockPool(num_gpu_blocks=101, enable_caching=True, hash_block_size=BS)
    ledger, channel = _ledger(registry, pool, tmp=str(tmp_path))
    tokens = [(7000 + i) % 50000 for i in range(10 * BS + 5)]
    blocks = pool.get_new_blocks(11)
    req = _request("r-abort", tokens, RequestStatus.FINISHED_ABORTED)
    req.num_in_flight_tokens = 4 * BS + 5  # the last chunk is scheduled, not yet run
    keys = BlockKeyer(NS, BS).start(KeyScope())
    ledger.on_request_finished(req, [b.block_id for b in blocks], keys)
    pool.free_blocks(blocks)
    with RegistryClient.connect(registry, client_name="q", autostart=False) as q:
        _settle(ledger, lambda: q.status().published_blocks == 6)
    ledger.shutdown()


def test_in_place_export_hashes_only_what_it_does_not_list(registry, tmp_path):
    """A request ending on blocks the ledger lists (a prefix hit) hashes nothing and publishes
    nothing again; a longer one on the same blocks publishes only its new tail, under the
    keys and parents a full hash gives; a confirmed import's keys are taken as they are
    (shown with a deliberately different key: the import was trusted with that KV)."""
    pool = BlockPool(num_gpu_blocks=201, enable_caching=True, hash_block_size=BS)
    ledger, channel = _ledger(registry, pool, tmp=str(tmp_path))
    tokens = [(31 * i) % 50000 for i in range(300 * BS)]
    full = BlockKeyer(NS, BS).keys(tokens)
    blocks = [b.block_id for b in pool.get_new_blocks(140)]
    first = BlockKeyer(NS, BS).start(KeyScope())
    ledger.on_request_finished(_request("a", tokens[: 100 * BS + 3]), blocks[:101], first)
    with RegistryClient.connect(registry, client_name="q", autostart=False) as q:
        _settle(ledger, lambda: q.lookup(NS, full[:100])[1] == 100)
        hit = BlockKeyer(NS, BS).start(KeyScope())
        ledger.on_request_finished(_request("b", tokens[: 100 * BS + 3]), blocks[:101], hit)
        assert hit.keys == [] and not ledger.has_pending()  # all listed: no hashing, no publish
        longer = BlockKeyer(NS, BS).start(KeyScope())
        ledger.on_request_finished(_request("c", tokens[: 103 * BS + 3]), blocks[:104], longer)
        assert longer.keys == []  # three new blocks: hashed one by one, not the whole prompt
        _settle(ledger, lambda: q.lookup(NS, full[:103])[1] == 103)
        assert q.status().published_blocks == 103
        # Blocks 103.. were imported under a lease: its keys are used, not recomputed, for
        # the blocks the copy wrote as long as their tags have not moved.
        known = full[103:130]
        odd = bytes(16 * [7])
        known[10] = odd  # (not this prompt's key: proves the lease's keys are what is used)
        dst = blocks[103:130]
        tags = ledger._gens.locations(dst)
        moved = ConfirmedImport(103, known, dst, False, tags)
        ledger.on_blocks_rewritten([dst[20]])  # block 123 was written again since the copy
        ledger.on_request_finished(_request("d", tokens[: 131 * BS + 3]), blocks[:131],
                                   BlockKeyer(NS, BS).start(KeyScope()), known=moved)
        _settle(ledger, lambda: q.lookup(NS, full[:113])[1] == 113)
        assert q.lookup(NS, full[:113] + [odd])[1] == 114
        assert q.lookup(NS, full[:131])[1] == 113  # the real key 113 was never published
        # ... but from 123 on (moved) the keys are our own again: hashed
        listed = {b: k for b, (k, _) in ledger._listed.items()}
        assert [listed[b] for b in blocks[123:131]] == full[123:131]
        # A request that recomputed those positions elsewhere (preempted) gets no lease keys
        other = blocks[131:140] + [b.block_id for b in pool.get_new_blocks(1)]
        ledger.on_request_finished(
            _request("e", tokens[: 141 * BS + 3]), blocks[:131] + other,
            BlockKeyer(NS, BS).start(KeyScope()),
            known=ConfirmedImport(131, [odd] * 10, blocks[180:190], False, tags[:10]))
        listed = {b: k for b, (k, _) in ledger._listed.items()}
        assert [listed[b] for b in other] == full[131:141]
    ledger.shutdown()


def test_staged_save_not_sent_yet_stops_before_blocks_a_sibling_loads_into(registry):
    """A sibling connector (MultiConnector) may load into blocks vLLM takes back from its
    prefix cache in the very step whose metadata carries our save of them: that load is not
    ordered after our copy (the forward is), so the save keeps only the blocks before the
    first such block, and the rest's slots are freed. A rewrite by the forward drops
    nothing (our workers save before the forward)."""
    pool = BlockPool(num_gpu_blocks=101, enable_caching=True, hash_block_size=BS)
    ledger, channel = _ledger(registry, pool, staged=12)
    keys, blocks = _export(ledger, pool, "r1", 6, seed=9)
    keys2, _ = _export(ledger, pool, "r2", 2, seed=11)  # another export, of other blocks
    ledger.on_blocks_rewritten([blocks[5].block_id])  # (the step's forward: saved first)
    ledger.drop_pending_saves([blocks[3].block_id])  # a sibling loads into it
    first, second = ledger.take_jobs()
    assert first.src == [b.block_id for b in blocks[:3]] and len(second.src) == 2
    assert len(ledger._free_slots) == 12 - 5 and len(ledger._listed) == 5
    ledger.on_saves_done([first.job_id, second.job_id])
    with RegistryClient.connect(registry, client_name="q", autostart=False) as q:
        _settle(ledger, lambda: q.status().published_blocks == 5)
        assert q.lookup(NS, keys)[1] == 3 and q.lookup(NS, keys2)[1] == 2
    channel.close()


def test_a_finished_request_is_exported_at_the_ledgers_next_touch(registry, tmp_path):
    """``on_request_finished_later`` (what the scheduler calls: no export work before vLLM
    sends the request's output) books the export at the ledger's next call, in order: a
    block vLLM gives out again in the next ``schedule()`` is never published, the request's
    counts are those of its finish, and a cache reset in between drops the export."""
    pool = BlockPool(num_gpu_blocks=201, enable_caching=True, hash_block_size=BS)
    ledger, _ = _ledger(registry, pool, tmp=str(tmp_path))
    tokens = [(5000 + i) % 50000 for i in range(40 * BS + 5)]
    keys = BlockKeyer(NS, BS).keys(tokens)[:40]
    held = pool.get_new_blocks(41)
    blocks = [b.block_id for b in held]
    req = _request("r1", tokens)
    ledger.on_request_finished_later(req, blocks, BlockKeyer(NS, BS).start(KeyScope()))
    pool.free_blocks(held)  # the request finishes: its blocks go back to vLLM
    assert not ledger._listed and ledger.has_pending()  # nothing done yet
    req.num_computed_tokens = 0  # (what happens to the Request later is not read)
    with RegistryClient.connect(registry, client_name="q", autostart=False) as q:
        # The next schedule() allocates blocks 10.. to a new request (update_state_after_alloc)
        ledger.on_blocks_rewritten(blocks[10:])
        assert sorted(ledger._listed) == sorted(blocks[:10])
        _settle(ledger, lambda: q.lookup(NS, keys)[1] == 10)
        for _ in range(5):  # ... and stays at 10
            _steps(ledger, 3)
            assert q.lookup(NS, keys)[1] == 10
        # A reset between the finish and the ledger's next touch: nothing is offered.
        tokens2 = [(9000 + i) % 50000 for i in range(20 * BS + 5)]
        keys2 = BlockKeyer(NS, BS).keys(tokens2)[:20]
        held = pool.get_new_blocks(21)
        ledger.on_request_finished_later(_request("r2", tokens2), [b.block_id for b in held],
                                         BlockKeyer(NS, BS).start(KeyScope()))
        pool.free_blocks(held)
        assert pool.reset_prefix_cache()
        for _ in range(10):
            _steps(ledger, 3)
            assert q.lookup(NS, keys2)[1] == 0 and q.lookup(NS, keys)[1] == 0
    assert not ledger._listed and not ledger.has_pending()
    ledger.shutdown()
