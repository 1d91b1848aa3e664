"""Under MultiConnector, a sibling connector (OffloadingConnector, LMCache, NIXL) that loads
a request's prefix writes blocks our ledger may still list: vLLM gives a block it evicts
from its prefix cache to the load, and neither the request's allocation (our facade is told
0 external tokens) nor the step that finally schedules it (the loaded blocks lie below its
computed tokens: "only read") said that they are written. A listed page is then rewritten
under its old generation: an importer would copy the sibling's KV under our key.

Real vLLM 0.26 Scheduler with the real MultiConnector([MarketplaceConnector, sibling]); no
model, no workers: the sibling's load is reported done by the test."""

from __future__ import annotations

import pytest

from tests.unit import review2_sibling
from tests.unit.test_review2_multi_session_taint import BS, _scheduler
from tests.unit.vllm_objects import run_step


@pytest.mark.parametrize("asynchronous", [True, False])
def test_blocks_a_sibling_loads_into_are_withdrawn_first(tiny_model_dir, tmp_path, asynchronous):
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    nblocks = 12
    cfg, sched, ours_sched = _scheduler(tiny_model_dir, tmp_path, nblocks)
    ledger = ours_sched._ledger
    gens = ledger._gens
    hash_fn = get_hash_fn_by_name(cfg.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(BS, hash_fn)
    recving: set[str] = set()
    review2_sibling.SYNC.clear()
    review2_sibling.ALLOCATED.clear()

    def step():
        so = run_step(sched, recving)
        ledger.on_step_acked(ledger.step)  # (what our workers report)
        return so

    try:
        first = Request("r1", list(range(1000, 1000 + 5 * BS)),
                        SamplingParams(max_tokens=1, ignore_eos=True), None, block_hasher=hasher)
        sched.add_request(first)
        while sched.has_requests():
            step()
        for _ in range(3):
            step()
        listed = dict(ledger._listed)  # block -> (key, location)
        assert len(listed) == 5, listed
        # A new prompt a sibling holds: it loads all but the last token, into blocks vLLM
        # takes from its free queue, r1's (evicted from the prefix cache) among them.
        prompt = list(range(5000, 5000 + 10 * BS))
        review2_sibling.CLAIMS["r2"] = 9 * BS
        if not asynchronous:
            review2_sibling.SYNC.add("r2")
        sched.add_request(Request("r2", prompt, SamplingParams(max_tokens=1, ignore_eos=True),
                                  None, block_hasher=hasher))
        step()
        ((rid, blocks, n_ext),) = review2_sibling.ALLOCATED
        loaded = blocks[: n_ext // BS]
        reused = sorted(set(loaded) & set(listed))
        assert reused, f"the test needs r1's blocks reused: loaded {loaded}, r1 {sorted(listed)}"
        if asynchronous:
            recving.add("r2")  # the sibling's workers wrote r2's KV into them
        while sched.has_requests():
            step()
        # (r2's own export may list them again, under r2's keys: that is right)
        still = [b for b in reused if ledger._listed.get(b, (b"",))[0] == listed[b][0]
                 and ledger._listed[b][1] == gens.locations([b])[0]]
        assert not still, (
            f"blocks {still} hold the KV the sibling loaded for r2, yet our ledger still lists "
            f"them under r1's keys at their current generation: an importer would read them")
    finally:
        sched.shutdown()
