"""The in-place ExportLedger next to vLLM 0.26's real Scheduler / AsyncScheduler (no engine,
no worker): random prompts sharing prefixes, chunked prefill, preemption (a small pool),
aborts while steps are in flight, prefix-cache resets that force-preempt, with and without
deferred block freeing. A model of the KV cache records, per block slot, which request's
position the executed steps last wrote. Checked:

- the change's claim: when a request finishes, each of its blocks the ledger lists is listed
  under this request's own key at that position (what lets the export skip them);
- nothing published is ever wrong: every published (key, location) whose generation is
  still the block's holds exactly that key's KV, at publish time and after every step.
"""

from __future__ import annotations

import random

import pytest

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.exporter import ExportLedger
from kvmkt_connector.hashing import BlockKeyer, KeyScope
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.transport.generations import GenerationTable, decode_locations
from tests.unit.vllm_objects import LAYER, engine_config

BS = 16
NS = b"N" * 16


class _Channel:
    generation = 0

    def __init__(self, sim):
        self.sim = sim
        self.published: dict[int, bytes] = {}

    def watch_resets(self, epoch):
        pass

    def publish(self, keys, locations, epoch=0, tokens=None, parents=None):
        for k, loc in zip(keys, locations, strict=True):
            self.sim.check_valid(loc, k, "at publish")
            self.published[loc] = k

    def unpublish(self, locations):
        for loc in locations:
            self.published.pop(loc, None)

    def reclaim(self, count):
        pass

    def take_events(self):
        return []

    def close(self):
        pass


class _Sim:
    def __init__(self, tiny_model_dir, tmp_path, seed, async_scheduling, defer, nblocks):
        import torch
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        self.rng = random.Random(seed)
        cfg = engine_config(tiny_model_dir, None, max_num_batched_tokens=64, max_num_seqs=4,
                            enable_prefix_caching=True)
        cfg.cache_config.num_gpu_blocks = nblocks
        spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=16, dtype=torch.float32)
        kvc = KVCacheConfig(num_blocks=nblocks, kv_cache_tensors=[],
                            kv_cache_groups=[KVCacheGroupSpec([LAYER], spec)])
        cls = AsyncScheduler if async_scheduling else Scheduler
        self.sched = cls(cfg, kvc, StructuredOutputManager(cfg), block_size=BS)
        self.sched.defer_block_free = defer
        hash_fn = get_hash_fn_by_name(cfg.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self.hasher = get_request_block_hasher(BS, hash_fn)
        self.depth = 2 if async_scheduling else 1
        pool = self.sched.kv_cache_manager.block_pool
        self.gens = GenerationTable.create(str(tmp_path / f"gen{seed}"), nblocks)
        self.chan = _Channel(self)
        self.ledger = ExportLedger(MarketplaceConfig(registry_autostart=False), BS, self.chan,
                                   MarketplaceStats(), pool, None, self.gens)
        self.keyer = BlockKeyer(NS, BS)
        self.reqs = {}
        self.key_tokens: dict[bytes, tuple] = {}
        self.writer: dict[int, list] = {}
        self.queue = []
        self.skipped = self.finished = self.exported_fresh = 0
        self.sched._connector_finished = self._finished
        self.families = [[self.rng.randrange(3, 30000) for _ in range(6 * BS)] for _ in range(3)]

    # ---------------------------------------------------------------- model of the KV cache

    def check_valid(self, loc, key, when):
        (block,), (gen,) = decode_locations([loc])
        block, gen = int(block), int(gen)
        if int(self.gens.generations[block]) != gen:
            return  # an importer's tag check rejects it
        ref = self.key_tokens[key]
        i = len(ref) // BS - 1
        slots = self.writer.get(block)
        assert slots is not None, f"{when}: block {block} never written, listed as {key.hex()}"
        for j, w in enumerate(slots):
            assert w is not None, f"{when}: block {block} slot {j} never written"
            rid, p = w
            toks = self.reqs[rid].all_token_ids
            assert p == i * BS + j and len(toks) > p and list(toks[: p + 1]) == list(ref[: p + 1]), (
                f"{when}: WRONG KV: block {block} published as position {i} of {key.hex()[:8]}, "
                f"slot {j} holds {rid}@{p}")

    def _keys(self, req):
        toks = list(req.all_token_ids)
        keys = self.keyer.keys(toks)
        for i, k in enumerate(keys):
            self.key_tokens.setdefault(k, tuple(toks[: (i + 1) * BS]))
        return keys

    def _finished(self, request):
        block_ids = self.sched.kv_cache_manager.get_block_ids_for_computed_tokens(
            request.request_id, request.num_computed_tokens)[0]
        self.finished += 1
        if block_ids:
            keys = self._keys(request)
            written = request.num_computed_tokens - request.num_in_flight_tokens
            n = min(len(block_ids), min(written, request.num_tokens - 1) // BS)
            for i in range(n):
                listed = self.ledger._listed.get(block_ids[i])
                if listed is not None:
                    self.skipped += 1
                    assert listed[0] == keys[i], (
                        f"CLAIM BROKEN: {request.request_id} block {block_ids[i]} at {i} is "
                        f"listed under another key")
            before = len(self.ledger._listed)
            self.ledger.on_request_finished(request, list(block_ids),
                                            self.keyer.start(KeyScope()), True)
            self.exported_fresh += len(self.ledger._listed) - before
        return False, None

    # ---------------------------------------------------------------- driving vLLM

    def add(self, k):
        from vllm import SamplingParams
        from vllm.v1.request import Request

        rng = self.rng
        fam = rng.choice(self.families)
        prompt = fam[: rng.randrange(0, len(fam) + 1)] + [
            rng.randrange(3, 30000) for _ in range(rng.randrange(1, 70))]
        sp = SamplingParams(max_tokens=rng.randrange(1, 40), ignore_eos=True)
        req = Request(f"r{k}", prompt, sp, None, block_hasher=self.hasher)
        self.reqs[req.request_id] = req
        self.sched.add_request(req)

    def schedule(self):
        so = self.sched.schedule()
        self.ledger.tick(so)
        writes, sampled = [], {}
        for rid, n in so.num_scheduled_tokens.items():
            req = self.reqs[rid]
            blocks = list(self.sched.kv_cache_manager.get_block_ids(rid)[0])
            writes.append((rid, blocks, req.num_computed_tokens - n, n))
            if not req.is_prefill_chunk:
                sampled[rid] = [self.rng.choice([100, 101, self.rng.randrange(3, 30000)])]
        self.queue.append((so, self.ledger.step, writes, sampled))

    def execute_and_update(self):
        from vllm.v1.outputs import ModelRunnerOutput

        so, step, writes, sampled = self.queue.pop(0)
        for rid, blocks, start, n in writes:  # the forward runs: KV written
            for p in range(start, start + n):
                self.writer.setdefault(blocks[p // BS], [None] * BS)[p % BS] = (rid, p)
        ids = list(so.num_scheduled_tokens)
        out = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                sampled_token_ids=[sampled.get(r, []) for r in ids])
        self.sched.update_from_output(so, out)
        self.ledger.on_step_acked(step)  # the workers report the step
        self.check_all("after a step")

    def check_all(self, when):
        for loc, key in list(self.chan.published.items()):
            self.check_valid(loc, key, when)

    def run(self, ops):
        from vllm.v1.request import RequestStatus

        rng, k = self.rng, 0
        for _ in range(ops):
            x = rng.random()
            live = [r for r, q in self.reqs.items() if not q.is_finished()]
            if x < 0.12 or not live:
                self.add(k)
                k += 1
            elif x < 0.16 and live:
                self.sched.finish_requests(rng.choice(live), RequestStatus.FINISHED_ABORTED)
            elif x < 0.165:
                if self.queue and (self.sched.defer_block_free or rng.random() < 0.5):
                    continue  # (deferred frees hold blocks: vLLM's reset fails then)
                self.sched.reset_prefix_cache(reset_running_requests=True)
            elif self.sched.has_requests() and len(self.queue) < self.depth and x < 0.6:
                self.schedule()
            elif self.queue:
                self.execute_and_update()
            elif self.sched.has_requests():
                self.schedule()
        while self.queue:
            self.execute_and_update()
        for _ in range(3):
            self.ledger.tick(None)
        self.check_all("at the end")


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("mode", ["sync", "async", "async-defer"])
def test_ledger_next_to_vllm_scheduler(tiny_model_dir, tmp_path, seed, mode):
    sim = _Sim(tiny_model_dir, tmp_path, seed, mode != "sync", mode == "async-defer",
               nblocks=28 + seed % 3 * 10)
    sim.run(1500)
    assert sim.finished > 20 and sim.skipped > 0 and sim.chan.published, (
        sim.finished, sim.skipped, len(sim.chan.published))
    print(mode, seed, "finished", sim.finished, "skipped", sim.skipped, "fresh", sim.exported_fresh,
          "published", len(sim.chan.published), "preempted", sum(q.num_preemptions for q in sim.reqs.values()))
    sim.gens.close()
