"""Staged exports through vLLM 0.26's real Scheduler (no model, no workers): a save the
workers have not run yet survives blocks that the step's own forward writes (our workers
save before the forward; the fourth review's reproducer: e10d751 dropped it), and stops
before blocks a MultiConnector sibling loads into in that step (not ordered after it)."""

from __future__ import annotations

import os

import msgspec
import pytest
import torch

BS = 16
R0_LEN = 6 * BS - 1


def _staged_scheduler(tiny_model_dir, tmp_path, nblocks, sibling=False):
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from kvmkt_connector.compat import KVLayoutSpec
    from kvmkt_connector.connector.facade import MarketplaceConnector
    from kvmkt_connector.connector.metadata import MarketplaceHandshake
    from kvmkt_connector.transport.descriptors import HostShmDescriptor
    from tests.unit.vllm_objects import LAYER, engine_config, multi, ours

    conn = ours(tmp_path)
    if sibling:
        conn = multi([conn, {"kv_connector": "AsyncSibling", "kv_role": "kv_both",
                             "kv_connector_module_path": "tests.unit.review2_sibling"}],
                     "recompute")
    cfg = engine_config(tiny_model_dir, conn, max_num_batched_tokens=512,
                        max_num_seqs=8, enable_prefix_caching=True)
    cfg.cache_config.num_gpu_blocks = nblocks
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=16, dtype=torch.float32)
    kvc = KVCacheConfig(num_blocks=nblocks, kv_cache_tensors=[],
                        kv_cache_groups=[KVCacheGroupSpec([LAYER], spec)])
    sched = Scheduler(cfg, kvc, StructuredOutputManager(cfg), block_size=BS)
    (mine,) = [c for c in getattr(sched.connector, "_connectors", [sched.connector])
               if isinstance(c, MarketplaceConnector)]
    ours_sched = mine._scheduler
    page = 2 * 2 * 16 * 4 * BS
    layout = KVLayoutSpec("CPU_ATTN", "NHD", "torch.float32", 1, page, 1, 1)
    desc = HostShmDescriptor(os.path.join(tmp_path, "shm"), 32, [page * 32])
    ours_sched.on_startup_handshakes({0: MarketplaceHandshake(
        0, layout, msgspec.msgpack.encode(desc), 32, "host_shm")})
    assert ours_sched._ledger is not None and ours_sched._ledger.staged
    return cfg, sched, ours_sched


def _step(sched, saves):
    """One step with a made-up output (no worker reports); its save jobs go to ``saves``."""
    from vllm.v1.outputs import ModelRunnerOutput

    so = sched.schedule()
    saves.extend(so.kv_connector_metadata.saves)
    ids = list(so.num_scheduled_tokens)
    sampled = [[] if sched.requests[r].is_prefill_chunk else [7] for r in ids]
    sched.update_from_output(so, ModelRunnerOutput(
        req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
        sampled_token_ids=sampled))
    return so


@pytest.mark.parametrize("how", ["admitted", "decode_growth"])
def test_staged_save_survives_blocks_the_forward_writes(tiny_model_dir, tmp_path, how):
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    nblocks = 12  # 11 usable
    cfg, sched, ours_sched = _staged_scheduler(tiny_model_dir, tmp_path, nblocks)
    hash_fn = get_hash_fn_by_name(cfg.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(BS, hash_fn)
    saves = []

    def step():
        return _step(sched, saves)

    def req(rid, first, n, max_tokens=1):
        return Request(rid, list(range(first, first + n)),
                       SamplingParams(max_tokens=max_tokens, ignore_eos=True), None,
                       block_hasher=hasher)

    try:
        if how == "decode_growth":
            # r0 decodes (6 blocks of 11); r1 takes the other 5; r0 needs a 7th block in
            # the step right after r1 finished: vLLM takes it from r1's freed blocks.
            sched.add_request(req("r0", 9000, R0_LEN, max_tokens=50))
            step()  # r0's prefill
        # r1: full blocks to export (5 when r0 decodes: vLLM hands out the last one it
        # freed first, and r0 needs one block in the step after r1 has finished)
        sched.add_request(req("r1", 1000, 5 * BS if how == "decode_growth" else 4 * BS + 1))
        while "r1" in sched.requests:
            step()
        # r1 finished in the output just processed: its export (the first: save job 0) is
        # booked at the ledger's next touch, in the next step, and its save goes with it.
        assert ours_sched._ledger.has_pending() and not saves, "r1 exported nothing"
        if how == "admitted":
            # a new prompt that needs all 11 blocks: vLLM hands out r1's freed ones
            sched.add_request(req("r2", 5000, 10 * BS + 3))
        step()
        step()
        r1_jobs = [j for j in saves if j.job_id == 0]
        assert r1_jobs and len(r1_jobs[0].src) == (4 if how == "admitted" else 5), (
            f"r1's save job (blocks {r1_jobs[0].src if r1_jobs else None}) never went whole to "
            f"the workers: cut because this step's forward writes some of its blocks, although "
            f"the worker saves before the forward and no sibling connector exists")
    finally:
        sched.shutdown()


@pytest.mark.parametrize(("asynchronous", "claim"), [(True, 10 * BS), (False, 10 * BS),
                                                      (False, 10 * BS - 8)])
def test_staged_save_stops_before_blocks_a_sibling_loads_into(tiny_model_dir, tmp_path,
                                                              asynchronous, claim):
    """``claim`` 10 * BS - 8: a synchronous load that ends inside a block writes that block
    too (review 5)."""
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    from tests.unit import review2_sibling
    from tests.unit.vllm_objects import run_step

    nblocks = 12  # 11 usable
    cfg, sched, ours_sched = _staged_scheduler(tiny_model_dir, tmp_path, nblocks, sibling=True)
    hash_fn = get_hash_fn_by_name(cfg.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(BS, hash_fn)
    review2_sibling.SYNC.clear()
    review2_sibling.ALLOCATED.clear()
    saves, recving = [], set()

    def step():
        so = run_step(sched, recving)
        saves.extend(so.kv_connector_metadata.metadata[0].saves)
        return so

    try:
        sched.add_request(Request("r1", list(range(1000, 1000 + 4 * BS + 1)),
                                  SamplingParams(max_tokens=1, ignore_eos=True), None,
                                  block_hasher=hasher))
        while "r1" in sched.requests:
            step()
        # r1's export is booked at the ledger's next touch (the next step): its 4 full blocks
        ((_, r1_blocks, *_),) = ours_sched._ledger._finished
        r1_src = r1_blocks[:4]
        # r2 needs all 11 blocks, r1's freed ones among them; a sibling loads all but its
        # last block (or half of the one before), in the step whose metadata carries r1's save
        review2_sibling.CLAIMS["r2"] = claim
        if not asynchronous:
            review2_sibling.SYNC.add("r2")
        sched.add_request(Request("r2", list(range(5000, 5000 + 10 * BS + 3)),
                                  SamplingParams(max_tokens=1, ignore_eos=True), None,
                                  block_hasher=hasher))
        step()
        ((_, blocks, n_ext),) = review2_sibling.ALLOCATED
        loaded = set(blocks[: -(-n_ext // BS)])  # (a block it loads part of, too)
        assert loaded & set(r1_src), "the test needs r1's blocks given to the sibling"
        copied = [b for job in saves for b in job.src]
        assert not loaded & set(copied), (
            f"blocks {sorted(loaded & set(copied))} were saved in the step a sibling loads "
            f"into them")
        cut = next(i for i, b in enumerate(r1_src) if b in loaded)
        assert copied == r1_src[:cut]  # the save's part before them still goes out
        led = ours_sched._ledger
        assert len(led._free_slots) + len(led._listed) == 32
    finally:
        sched.shutdown()


@pytest.mark.parametrize("failed_first", [True, False])
def test_a_save_one_rank_failed_is_not_published(tiny_model_dir, tmp_path, failed_first):
    """Two tensor-parallel ranks report one save in different steps, one of them failed:
    the pages are not published (the job's slots go back), whichever report comes first."""
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from kvmkt_connector.connector.metadata import MarketplaceWorkerMetadata

    cfg, sched, ours_sched = _staged_scheduler(tiny_model_dir, tmp_path, 12)
    hash_fn = get_hash_fn_by_name(cfg.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(BS, hash_fn)
    ours_sched._world = 2  # (what a TP=2 engine's scheduler counts)
    saves = []

    def step():
        _step(sched, saves)

    def report(**kw):
        ours_sched.update_connector_output(
            KVConnectorOutput(kv_connector_worker_meta=MarketplaceWorkerMetadata(**kw)))

    try:
        sched.add_request(Request("r1", list(range(1000, 1000 + 4 * BS + 1)),
                                  SamplingParams(max_tokens=1, ignore_eos=True), None,
                                  block_hasher=hasher))
        while "r1" in sched.requests:
            step()
        step()  # the export is booked and its save sent
        (job,) = saves
        led = ours_sched._ledger
        first, second = ({"saves_failed": {job.job_id: 1}}, {"saves_done": {job.job_id: 1}})
        report(**(first if failed_first else second))
        assert set(job.dst) <= set(led._listed)  # (staging: the slots are taken)
        report(**(second if failed_first else first))
        assert not set(job.dst) & set(led._listed), "a save one rank failed was published"
        assert set(job.dst) <= set(led._free_slots)
    finally:
        sched.shutdown()
