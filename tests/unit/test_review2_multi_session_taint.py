"""Review of 283efb5 (streaming-input sessions): under MultiConnector, when a *sibling*
connector loads a session's KV asynchronously, our connector's update_state_after_alloc
gets num_external_tokens=0 (MultiConnector passes 0 to every child but the chosen one), so
the facade hands ExportLedger.on_session_allocated an empty block list and the session's
blocks are tainted only at the tick of the step that *schedules* the session. vLLM caches
the loaded blocks when it promotes the request out of WAITING_FOR_REMOTE_KVS, under the
session's (stale) block hashes, and if it cannot allocate the rest in that step (or the
session is aborted before it runs) those blocks sit in the prefix cache, untainted, under a
hash of other tokens. A request that hits them is exported: a wrong KV page.

Real vLLM 0.26 Scheduler with the real MultiConnector([MarketplaceConnector, sibling]); no
model, no workers: the sibling's load is reported done by the test."""

from __future__ import annotations

import os

import msgspec
import torch

from kvmkt_connector.connector.facade import MarketplaceConnector
from kvmkt_connector.hashing import BlockKeyer, KeyScope
from kvmkt_connector.transport.generations import decode_locations
from tests.unit import review2_sibling
from tests.unit.vllm_objects import LAYER, engine_config, multi, ours, run_step

BS = 16


def _scheduler(tiny_model_dir, tmp_path, nblocks):
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from kvmkt_connector.compat import KVLayoutSpec
    from kvmkt_connector.connector.metadata import MarketplaceHandshake
    from kvmkt_connector.transport.descriptors import CudaIpcDescriptor, CudaIpcSegment

    sibling = {"kv_connector": "AsyncSibling", "kv_role": "kv_both",
               "kv_connector_module_path": "tests.unit.review2_sibling"}
    cfg = engine_config(tiny_model_dir, multi([ours(tmp_path), sibling], "recompute"),
                        max_num_batched_tokens=512, max_num_seqs=8, enable_prefix_caching=True)
    cfg.cache_config.num_gpu_blocks = nblocks
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=16, dtype=torch.float32)
    kvc = KVCacheConfig(num_blocks=nblocks, kv_cache_tensors=[],
                        kv_cache_groups=[KVCacheGroupSpec([LAYER], spec)])
    sched = Scheduler(cfg, kvc, StructuredOutputManager(cfg), block_size=BS)
    (mine,) = [c for c in sched.connector._connectors if isinstance(c, MarketplaceConnector)]
    ours_sched = mine._scheduler
    page = 2 * 2 * 16 * 4 * BS
    layout = KVLayoutSpec("FLASH_ATTN", "NHD", "torch.float32", 1, page, 1, 1)
    desc = CudaIpcDescriptor("GPU-review2", os.getpid(), [b"\0" * 64],
                             [CudaIpcSegment(0, 0, page, page * nblocks)], nblocks)
    ours_sched.on_startup_handshakes({0: MarketplaceHandshake(
        0, layout, msgspec.msgpack.encode(desc), 0, "cuda_ipc")})
    assert ours_sched._ledger is not None, "exporting did not start"
    return cfg, sched, ours_sched


def test_sibling_loaded_session_blocks_are_tainted(tiny_model_dir, tmp_path):
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request, RequestStatus

    nblocks = 12
    cfg, sched, ours_sched = _scheduler(tiny_model_dir, tmp_path, nblocks)
    ledger = ours_sched._ledger
    published: list[tuple[bytes, int]] = []
    ledger._channel.publish = lambda keys, locs, *a, **k: published.extend(zip(keys, locs, strict=True))
    hash_fn = get_hash_fn_by_name(cfg.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(BS, hash_fn)
    recving: set[str] = set()

    def step(token=7):
        so = run_step(sched, recving, token)
        ledger.on_step_acked(ledger.step)  # (what our workers report)
        return so

    try:
        # (vLLM keeps a session's max_tokens of its first chunk for every chunk)
        prompt = list(range(1000, 1000 + BS - 5))
        session = Request("s", list(prompt), SamplingParams(max_tokens=5, ignore_eos=True),
                          None, block_hasher=hasher, resumable=True)
        sched.add_request(session)
        for _ in range(5):
            step(555)  # block 0 now hashed over prompt + [555] * 5; the last 555 is dropped
        # (32 tokens: after one decode step all its blocks are full, and so cached, so that
        # vLLM's free queue gives their slots back last)
        sched.add_request(Request("s", list(range(2000, 2032)),
                                  SamplingParams(max_tokens=5, ignore_eos=True), None,
                                  block_hasher=hasher, resumable=True))
        step()
        step()
        assert session.status == RequestStatus.RUNNING
        assert list(session.all_token_ids[BS - 1: BS + 1]) == [2000, 2001]
        # The session is preempted (here by a cache reset, which also drops the stale hash of
        # its old block 0, so that the sibling, not a local hit, supplies it again; under
        # memory pressure the same follows once vLLM has given that block to another) ...
        assert sched.reset_prefix_cache(reset_running_requests=True)
        # ... and on its way back a sibling connector loads its first two blocks (the KV of
        # its own tokens: prompt + [2000, ...]) while a big request takes the rest.
        review2_sibling.CLAIMS["s"] = 2 * BS
        usable = nblocks - 1
        big = Request("big", list(range(9000, 9000 + (usable - 2) * BS - 8)),
                      SamplingParams(max_tokens=4, ignore_eos=True), None, block_hasher=hasher)
        sched.add_request(big)
        step()
        assert session.status == RequestStatus.WAITING_FOR_REMOTE_KVS
        loaded = list(sched.kv_cache_manager.get_block_ids("s")[0])[:2]
        recving.add("s")  # the sibling's workers wrote the session's KV into them
        step()
        step()  # promoted: vLLM caches the loaded blocks under the session's block hashes
        # no room to run it: promoted (PREEMPTED: it was preempted before), not scheduled
        assert session.status == RequestStatus.PREEMPTED and session not in sched.running
        sched.finish_requests("s", RequestStatus.FINISHED_ABORTED)  # the client goes away
        while sched.has_requests():
            step()
        # A plain request whose prompt goes on with the dropped token: vLLM gives it the
        # loaded block 0 (its bug), whose last slot holds the KV of token 2000.
        other = Request("r", prompt + [555] * 5 + list(range(3000, 3020)),
                        SamplingParams(max_tokens=2, ignore_eos=True), None,
                        block_hasher=hasher)
        sched.add_request(other)
        so = step()
        (new,) = so.scheduled_new_reqs
        hit = new.num_computed_tokens
        r_blocks = list(new.block_ids[0])
        while sched.has_requests():
            step()
        for _ in range(3):
            step()
        keyer = BlockKeyer(ours_sched._namespace, BS)
        key_r0 = keyer.keys(prompt + [555] * 5, KeyScope())[0]
        wrong = [(k, loc) for k, loc in published
                 if k == key_r0 and int(decode_locations([loc])[0][0]) in loaded]
        assert not wrong, (
            f"block {loaded[0]} (the sibling loaded the session's KV of prompt+[555]*4+[2000] "
            f"into it) was published under the key of prompt+[555]*5: r hit {hit} tokens on blocks "
            f"{r_blocks[:2]}; tainted now: {sorted(ledger._tainted)}")
    finally:
        sched.shutdown()
