"""Found by review 5 (older than the deferral; fixed in scheduler._sibling_loads).

Staged (host_shm) under MultiConnector: ``MarketplaceScheduler._sibling_loads`` counts the
blocks a sibling loads synchronously as ``num_computed_tokens // block_size - first``:
a load that ends inside a block (vLLM does not require external tokens to be block-aligned)
writes that last, partial block too, but it is left out of ``drop_pending_saves``. A save
job sent in the same step (not ordered after the sibling's load, by the ledger's own model)
then copies that block while the sibling writes into it, and the slot is published under
the finished request's key.

Run: PYTHONPATH=. python -m pytest -q tests/unit/test_staged_sibling_partial_block.py
"""

from __future__ import annotations

from tests.unit.test_staged_saves_vllm_sim import BS, _staged_scheduler


def test_staged_save_skips_the_partial_block_a_sync_sibling_load_writes(tiny_model_dir,
                                                                       tmp_path):
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
    saves, recving, finished = [], set(), {}
    led = ours_sched._ledger
    orf = led.on_request_finished

    def on_request_finished(request, block_ids, *a, **kw):
        finished[getattr(request, "request_id", "r1")] = list(block_ids)
        return orf(request, block_ids, *a, **kw)
    led.on_request_finished = on_request_finished

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
        # r2 needs all 11 blocks, r1's freed ones among them (its first two last); a sibling
        # loads synchronously 152 tokens: 9 whole blocks and half of the 10th (r1's 2nd)
        review2_sibling.CLAIMS["r2"] = 10 * BS - 8
        review2_sibling.SYNC.add("r2")
        sched.add_request(Request("r2", list(range(5000, 5000 + 10 * BS + 3)),
                                  SamplingParams(max_tokens=1, ignore_eos=True), None,
                                  block_hasher=hasher))
        step()
        ((_, blocks, n_ext),) = review2_sibling.ALLOCATED
        assert n_ext % BS, "the test needs a load that ends inside a block"
        written = set(blocks[: -(-n_ext // BS)])  # every block the load writes
        (r1_blocks,) = finished.values()
        assert written & set(r1_blocks[:4]), "the test needs r1's blocks given to the sibling"
        copied = [b for job in saves for b in job.src]
        assert not written & set(copied), (
            f"blocks {sorted(written & set(copied))} were saved in the step a sibling loads "
            f"into them (the last one only partly: {blocks[n_ext // BS]})")
    finally:
        sched.shutdown()
