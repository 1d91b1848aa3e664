"""Found while reviewing 8e668ec, NOT caused by it (the export path it shows predates it):
vLLM 0.26 streaming-input sessions (resumable requests) keep a stale block hash, and the
in-place export then published a wrong KV page. Fixed since: blocks vLLM gives a session
are not exported (ExportLedger._tainted) until allocated anew; without that fix this test
fails as below.

vLLM's ``_update_request_as_session`` drops the session's last sampled token (it has no KV)
and appends the next chunk's prompt, but leaves ``request.block_hashes`` alone. When that
sampled token completed a block, the block's hash still covers it; once the new chunk's first
token is computed into that block, vLLM caches the block under the stale hash. A later request
whose prompt continues with the *dropped* token gets it as a prefix hit (vLLM's own bug: that
request reads KV of another token at that position). When that request finishes before the
session (so the block is not listed yet), ExportLedger keys the block by the request's own
tokens and publishes it: other instances import a page whose KV is not the key's."""

from __future__ import annotations

from vllm import SamplingParams
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request

from kvmkt_connector.transport.generations import decode_locations
from tests.unit.test_ledger_vllm_sim import BS, _Sim


class _Quiet(_Sim):
    def check_all(self, when):  # (the sim's KV model is not fed by this driver)
        pass


def test_block_cached_under_a_stale_session_hash_is_not_published(tiny_model_dir, tmp_path):
    sim = _Quiet(tiny_model_dir, tmp_path, 0, False, False, nblocks=40)
    published: dict[int, bytes] = {}
    sim.chan.publish = lambda keys, locs, *a, **k: published.update(zip(locs, keys, strict=True))
    sched = sim.sched

    def step(token):
        so = sched.schedule()
        # What MarketplaceScheduler.update_state_after_alloc does for each request vLLM
        # admits (here: new or resumed this step) that is a session.
        admitted = [r.req_id for r in so.scheduled_new_reqs] + list(
            so.scheduled_cached_reqs.resumed_req_ids)
        for rid in admitted:
            if sched.requests[rid].resumable:
                sim.ledger.on_session_allocated(
                    rid, list(sched.kv_cache_manager.get_block_ids(rid)[0]))
        sim.ledger.tick(so)
        ids = list(so.num_scheduled_tokens)
        sched.update_from_output(so, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=[[token] for _ in ids]))
        sim.ledger.on_step_acked(sim.ledger.step)
        sim.ledger.tick(None)

    prompt = list(range(1000, 1000 + BS - 1))
    session = Request("s", list(prompt), SamplingParams(max_tokens=1, ignore_eos=True), None,
                      block_hasher=sim.hasher, resumable=True)
    sim.reqs["s"] = session
    sched.add_request(session)
    step(555)  # the first chunk samples 555: block 0 is full, hashed over prompt + [555]
    sched.add_request(Request("s", list(range(2000, 2020)),
                              SamplingParams(max_tokens=50, ignore_eos=True), None,
                              block_hasher=sim.hasher, resumable=True))
    for _ in range(3):
        step(7)  # 555 dropped; position 15 of block 0 now holds the KV of token 2000
    wrote = list(session.all_token_ids[:BS])
    assert wrote[-1] == 2000
    block0 = sched.kv_cache_manager.get_block_ids("s")[0][0]

    other = Request("r", prompt + [555] + list(range(3000, 3010)),
                    SamplingParams(max_tokens=1, ignore_eos=True), None, block_hasher=sim.hasher)
    sim.reqs["r"] = other
    sched.add_request(other)
    step(7)  # r: a prefix hit on block 0 (vLLM's bug), finishes while the session runs on
    for _ in range(2):
        sim.ledger.on_step_acked(sim.ledger.step + 5)
        sim.ledger.tick(None)
    keys_of_wrote = sim.keyer.keys(wrote)
    for loc, key in published.items():
        (block,), _ = decode_locations([loc])
        if int(block) == block0:
            assert key == keys_of_wrote[0], (
                f"block {block0} published under the key of {prompt[-1:]}+[555]; its KV at "
                f"position {BS - 1} is of token {wrote[-1]}")
