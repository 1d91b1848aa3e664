"""Review of 283efb5: streaming-input sessions next to our real scheduler-side connector
(MarketplaceConnector, in place: the real facade, MarketplaceScheduler and ExportLedger)
inside vLLM 0.26's real Scheduler / AsyncScheduler (no model, no workers, no registry: the
holder channel's publish/unpublish are recorded here). Sessions (resumable requests) get
streaming updates and ends at random, mixed with plain requests whose prompts share prefixes
with sessions' current tokens, with the *stale* token sequences sessions had before vLLM
dropped their last sampled token (these hit blocks cached under stale hashes: vLLM's bug),
with each other and with a few families; a small pool preempts; aborts; prefix-cache resets;
sync, async, async with deferred frees.

The KV model is content-addressed: the KV a step writes at position p is
cid(KV it reads at p - 1, token at p), where the KV at p - 1 is what the step computed
itself or what the block in the request's table holds at that moment (an unwritten slot
poisons). So KV computed on top of a wrong prefix (a stale-hash hit) is wrong too, which a
model that checks only the writer's token ids does not see. Checked: every published
(key, location) whose generation is still the block's holds exactly the cid chain of the
key's tokens, at publish time and after every step."""

from __future__ import annotations

import itertools
import os
import random

import msgspec
import pytest
import torch

from kvmkt_connector.hashing import BlockKeyer, KeyScope
from kvmkt_connector.transport.generations import decode_locations
from tests.unit.vllm_objects import LAYER, engine_config, ours

BS = 16


class SessionSim:
    def __init__(self, tiny_model_dir, tmp_path, seed, mode, nblocks):
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        from kvmkt_connector.compat import KVLayoutSpec
        from kvmkt_connector.connector.metadata import MarketplaceHandshake
        from kvmkt_connector.transport.descriptors import CudaIpcDescriptor, CudaIpcSegment

        self.rng = random.Random(seed)
        cfg = engine_config(tiny_model_dir, ours(tmp_path), max_num_batched_tokens=64,
                            max_num_seqs=6, enable_prefix_caching=True)
        cfg.cache_config.num_gpu_blocks = nblocks
        spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=16, dtype=torch.float32)
        kvc = KVCacheConfig(num_blocks=nblocks, kv_cache_tensors=[],
                            kv_cache_groups=[KVCacheGroupSpec([LAYER], spec)])
        cls = AsyncScheduler if mode != "sync" else Scheduler
        self.sched = cls(cfg, kvc, StructuredOutputManager(cfg), block_size=BS)
        self.sched.defer_block_free = mode == "async-defer"
        self.depth = 1 if mode == "sync" else 2
        self.ours = self.sched.connector._scheduler
        page = 2 * 2 * 16 * 4 * BS
        layout = KVLayoutSpec("FLASH_ATTN", "NHD", "torch.float32", 1, page, 1, 1)
        desc = CudaIpcDescriptor("GPU-review2", os.getpid(), [b"\0" * 64],
                                 [CudaIpcSegment(0, 0, page, page * nblocks)], nblocks)
        self.ours.on_startup_handshakes({0: MarketplaceHandshake(
            0, layout, msgspec.msgpack.encode(desc), 0, "cuda_ipc")})
        self.ledger = self.ours._ledger
        assert self.ledger is not None
        self.gens = self.ledger._gens
        self.ledger._channel.publish = self._publish
        self.ledger._channel.unpublish = self._unpublish
        self.published: dict[int, bytes] = {}
        self.keyer = BlockKeyer(self.ours._namespace, BS)
        finished = self.ours.request_finished

        def request_finished(request, block_ids):
            self._register(request.all_token_ids)
            self.finished += 1
            return finished(request, block_ids)
        self.ours.request_finished = request_finished
        hash_fn = get_hash_fn_by_name(cfg.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self.hasher = get_request_block_hasher(BS, hash_fn)
        # KV model
        self.intern: dict[tuple, int] = {}
        self.poison = itertools.count(-1, -1)
        self.content: dict[int, list[int | None]] = {}
        self.key_tokens: dict[bytes, tuple] = {}
        self.key_truth: dict[bytes, list[int]] = {}
        # driving
        self.reqs = {}
        self.sessions: dict[str, int] = {}  # live session -> its max_tokens
        self.snap: dict[str, list[int]] = {}
        self.stale_views: list[list[int]] = []
        self.histories: list[list[int]] = []
        self.queue = []
        self.sample_at: dict[tuple[str, int], int] = {}
        self.k = 0
        self.finished = self.publishes = self.stale_hits = self.updates = 0
        self.families = [[self.rng.randrange(3, 30000) for _ in range(5 * BS)] for _ in range(2)]

    # ------------------------------------------------------------ KV model

    def cid(self, prev, tok):
        key = (prev, tok)
        c = self.intern.get(key)
        if c is None:
            c = self.intern[key] = len(self.intern) + 1
        return c

    def _register(self, tokens):
        tokens = list(tokens)
        for i, k in enumerate(self.keyer.keys(tokens, KeyScope())):
            self.key_tokens.setdefault(k, tuple(tokens[: (i + 1) * BS]))

    def truth(self, key):
        t = self.key_truth.get(key)
        if t is None:
            toks = self.key_tokens[key]
            c, chain = None, []
            for tok in toks:
                c = self.cid(c, tok)
                chain.append(c)
            t = self.key_truth[key] = chain[-BS:]
        return t

    def check_valid(self, loc, key, when):
        (block,), (gen,) = decode_locations([loc])
        block, gen = int(block), int(gen)
        if int(self.gens.generations[block]) != gen:
            return  # an importer's tag check rejects it
        assert key in self.key_tokens, f"{when}: published key {key.hex()[:8]} of no request"
        have = self.content.get(block, [None] * BS)
        want = self.truth(key)
        assert have == want, (
            f"{when}: WRONG KV: block {block} published as {key.hex()[:8]} (tokens ending "
            f"{self.key_tokens[key][-4:]}); slots differing: "
            f"{[j for j in range(BS) if have[j] != want[j]]}")

    def _publish(self, keys, locations, epoch=0, tokens=None, parents=None):
        for k, loc in zip(keys, locations, strict=True):
            self.check_valid(loc, k, "at publish")
            self.published[loc] = k
            self.publishes += 1

    def _unpublish(self, locations):
        for loc in locations:
            self.published.pop(loc, None)

    def check_all(self, when):
        for loc, key in list(self.published.items()):
            self.check_valid(loc, key, when)

    # ------------------------------------------------------------ driving vLLM

    def _sp(self, max_tokens):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    def _prompt(self):
        rng = self.rng
        x = rng.random()
        live = [s for s in self.sessions if s in self.sched.requests]
        if x < 0.35 and self.stale_views:
            base = list(rng.choice(self.stale_views[-8:]))  # continues with a dropped token
        elif x < 0.55 and live:
            base = list(self.reqs[rng.choice(live)].all_token_ids)
            base = base[: rng.randrange(1, len(base) + 1)]
        elif x < 0.75 and self.histories:
            base = list(rng.choice(self.histories[-10:]))
            base = base[: rng.randrange(1, len(base) + 1)]
        else:
            fam = rng.choice(self.families)
            base = fam[: rng.randrange(0, len(fam) + 1)]
        return base + [rng.randrange(3, 30000) for _ in range(rng.randrange(1, 30))]

    def add_plain(self):
        from vllm.v1.request import Request

        req = Request(f"r{self.k}", self._prompt(), self._sp(self.rng.randrange(1, 12)), None,
                      block_hasher=self.hasher)
        self.k += 1
        self.reqs[req.request_id] = req
        self.sched.add_request(req)

    def add_session(self):
        from vllm.v1.request import Request

        mt = self.rng.randrange(1, 6)
        prompt = self._prompt()
        req = Request(f"s{self.k}", prompt, self._sp(mt), None, block_hasher=self.hasher,
                      resumable=True)
        self.k += 1
        self.reqs[req.request_id] = req
        self.sessions[req.request_id] = mt
        self.snap[req.request_id] = list(req.all_token_ids)
        self.sched.add_request(req)

    def session_update(self, end=False):
        from vllm.v1.request import Request

        live = [s for s in self.sessions if s in self.sched.requests]
        if not live:
            return
        rid = self.rng.choice(live)
        req = self.reqs[rid]
        if req.streaming_queue and req.streaming_queue[-1] is None:
            return  # already ending
        if req.num_tokens > 400:
            end = True
        rng = self.rng
        toks = [rng.randrange(3, 30000) for _ in range(rng.randrange(1, 40))]
        self.updates += 1
        self.sched.add_request(Request(rid, toks, self._sp(self.sessions[rid]), None,
                                       block_hasher=self.hasher, resumable=not end))
        self.note_sessions()

    def note_sessions(self):
        """A session whose tokens changed other than by growing lost its last sampled token:
        its old token ids are what a stale block hash of it covers."""
        for rid in list(self.sessions):
            req = self.reqs[rid]
            now = list(req.all_token_ids)
            old = self.snap.get(rid, [])
            if now[: len(old)] != old:
                self.stale_views.append(old)
                self.histories.append(old)
            self.snap[rid] = now
            if req.is_finished():
                self.histories.append(now)
                del self.sessions[rid]

    def schedule(self):
        so = self.sched.schedule()
        step = self.ledger.step
        for new in so.scheduled_new_reqs:  # (statistics: prefix hits on wrong KV, vLLM's bug)
            toks = list(self.reqs[new.req_id].all_token_ids)
            c = None
            for p in range(new.num_computed_tokens):
                c = self.cid(c, toks[p])
                have = self.content.get(new.block_ids[0][p // BS], [None] * BS)[p % BS]
                if have is not None and have != c:
                    self.stale_hits += 1
                    break
        writes, sampled = [], {}
        for rid, n in so.num_scheduled_tokens.items():
            req = self.reqs[rid]
            blocks = list(self.sched.kv_cache_manager.get_block_ids(rid)[0])
            writes.append((rid, blocks, req.num_computed_tokens - n, n))
            if not req.is_prefill_chunk:
                sampled[rid] = [self.rng.choice([100, 101, self.rng.randrange(3, 30000)])]
                self.sample_at[(rid, req.num_computed_tokens)] = sampled[rid][0]
        self.queue.append((so, step, writes, sampled))

    def execute_and_update(self):
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        from kvmkt_connector.connector.metadata import MarketplaceWorkerMetadata

        so, step, writes, sampled = self.queue.pop(0)
        for rid, blocks, start, n in writes:  # the forward runs: KV written
            toks = self.reqs[rid].all_token_ids
            prev = None
            for p in range(start, start + n):
                if p == 0:
                    ctx = None
                elif p - 1 >= start:
                    ctx = prev
                else:
                    ctx = self.content.get(blocks[(p - 1) // BS], [None] * BS)[(p - 1) % BS]
                    if ctx is None:
                        ctx = next(self.poison)
                # (past its tokens: an aborted request's last sample, never appended)
                tok = toks[p] if p < len(toks) else self.sample_at[(rid, p)]
                prev = self.cid(ctx, tok)
                self.content.setdefault(blocks[p // BS], [None] * BS)[p % BS] = prev
        ids = list(so.num_scheduled_tokens)
        kvo = KVConnectorOutput(kv_connector_worker_meta=MarketplaceWorkerMetadata(
            acked_step=step))
        out = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                sampled_token_ids=[sampled.get(r, []) for r in ids],
                                kv_connector_output=kvo)
        self.sched.update_from_output(so, out)
        self.note_sessions()
        self.check_all("after a step")

    def run(self, ops):
        from vllm.v1.request import RequestStatus

        rng = self.rng
        for _ in range(ops):
            x = rng.random()
            live = [r for r in self.sched.requests]
            if x < 0.07 or not live:
                self.add_plain()
            elif x < 0.10 and len(self.sessions) < 3:
                self.add_session()
            elif x < 0.16:
                self.session_update(end=rng.random() < 0.15)
            elif x < 0.18 and live:
                rid = rng.choice(live)
                self.sched.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
                self.note_sessions()
            elif x < 0.183:
                if self.queue and (self.sched.defer_block_free or rng.random() < 0.5):
                    continue
                if any(r.status in (RequestStatus.WAITING_FOR_STREAMING_REQ,)
                       or (r.status == RequestStatus.WAITING and r.num_computed_tokens)
                       for r in self.sched.requests.values()):
                    continue  # (blocks held outside running: vLLM's reset would fail)
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

    def close(self):
        self.sched.shutdown()


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mode", ["sync", "async", "async-defer"])
def test_sessions_next_to_vllm_scheduler(tiny_model_dir, tmp_path, seed, mode):
    sim = SessionSim(tiny_model_dir, tmp_path, seed, mode, nblocks=30 + seed % 3 * 10)
    try:
        sim.run(1500)
        print(mode, seed, "finished", sim.finished, "publishes", sim.publishes, "updates",
              sim.updates, "stale views", len(sim.stale_views), "hits on wrong KV",
              sim.stale_hits, "tainted", len(sim.ledger._tainted))
        assert sim.finished > 20 and sim.publishes > 0 and sim.updates > 5
    finally:
        sim.close()


def test_a_session_on_a_shared_prefix_does_not_stop_everyone_elses_exports(tiny_model_dir,
                                                                           tmp_path):
    """Availability, not correctness: a session that prefix-hits a system prompt others use
    taints those (correct, read-only for it) blocks, and every later request on that prompt
    then exports nothing, not even the blocks it wrote itself, for as long as vLLM keeps the
    prompt cached (a hot prefix: for good). Only the blocks a session writes can be cached
    under a stale hash of it; its hits already hold the KV of their hashes."""
    from vllm.v1.request import Request

    sim = SessionSim(tiny_model_dir, tmp_path, 0, "sync", nblocks=60)
    try:
        system = [sim.rng.randrange(3, 30000) for _ in range(4 * BS)]

        def run(req):
            sim.reqs[req.request_id] = req
            sim.sched.add_request(req)
            while sim.sched.has_requests():
                sim.schedule()
                sim.execute_and_update()

        def plain(rid):
            return Request(rid, system + [sim.rng.randrange(3, 30000) for _ in range(3 * BS)],
                           sim._sp(2), None, block_hasher=sim.hasher)

        run(plain("a"))
        session = Request("s", system + [7] * 5, sim._sp(1), None, block_hasher=sim.hasher,
                          resumable=True)
        sim.reqs["s"] = session
        sim.sched.add_request(session)
        sim.schedule()
        sim.execute_and_update()  # the session hit the system prompt; it waits for input
        b = plain("b")
        run(b)
        for _ in range(3):
            sim.ledger.tick(None)
        mine = sim.keyer.keys(list(b.all_token_ids), KeyScope())[4:7]
        listed_keys = {key for key, _ in sim.ledger._listed.values()}
        assert set(mine) <= listed_keys, (
            f"b's own blocks 4..6 (written by b, after the system prompt) are not exported: "
            f"tainted {sorted(sim.ledger._tainted)}, listed {sorted(sim.ledger._listed)}")
    finally:
        sim.close()
