"""Review of 8e668ec: a TokenRun now keeps the finished request's ``all_token_ids`` (vLLM's
ConstantList over ``request._all_token_ids``) and the channel's thread makes the bytes later
(in-place: once the steps in flight at the finish ended; staged: once the workers' copy is
done, possibly steps later; then whenever the channel thread gets to the queued op).

So this must hold: after vLLM 0.26 calls request_finished, it never changes that request's
token ids. Checked next to vLLM's real Scheduler / AsyncScheduler (the driver of
test_ledger_vllm_sim.py): chunked prefill, preemption, aborts with steps in flight,
force-preempting prefix-cache resets, deferred block freeing, streaming-input sessions
(resumable requests, whose tokens vLLM *does* rewrite between chunks) and, with the sync
scheduler, speculative decoding (drafts, rejections). For every finished request, at the end:
its token ids are the ones it had when it finished, and every TokenRun the ledger handed the
channel yields exactly the bytes 283e1df made at the finish."""

from __future__ import annotations

import pytest

from kvmkt_connector.connector.holder_channel import TokenRun, block_tokens
from kvmkt_connector.hashing import token_bytes
from tests.unit.test_ledger_vllm_sim import BS, _Sim


class _Recorder:
    """Wraps the sim's channel: keeps each publish's TokenRuns, converted only at the end."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.generation = 0
        self.publishes: list[tuple[list[bytes], list]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def publish(self, keys, locations, epoch=0, tokens=None, parents=None):
        self.publishes.append((list(keys), list(tokens or [])))
        self.inner.publish(keys, locations, epoch, tokens, parents)


class _TokenSim(_Sim):
    def __init__(self, *a, streaming: bool, spec: int, **kw) -> None:
        super().__init__(*a, **kw)
        self.chan = self.ledger._channel = _Recorder(self.chan)
        self.at_finish: dict[str, tuple[int, list[int]]] = {}  # rid -> (id of list, tokens)
        self.run_tokens: dict[int, list[int]] = {}  # id(TokenRun) -> request tokens at finish
        self.streaming, self.spec = streaming, spec
        self.sessions: list[str] = []
        self.stream_updates = 0
        reset = self.sched.reset_prefix_cache

        def reset_unless_sessions_wait(*a, **kw):  # (their blocks stay: vLLM's reset fails)
            from vllm.v1.request import RequestStatus

            if not any(q.resumable and q.status != RequestStatus.RUNNING
                       for q in self.sched.requests.values()):
                return reset(*a, **kw)
            return False

        self.sched.reset_prefix_cache = reset_unless_sessions_wait
        if spec:
            self.sched.num_spec_tokens = spec
            self.sched.num_lookahead_tokens = spec

    def check_all(self, when):  # (spec decode writes KV of rejected drafts: not modelled)
        if not self.spec:
            super().check_all(when)

    def _finished(self, request):
        rid = request.request_id
        assert request.is_finished()
        assert rid not in self.at_finish, f"request_finished twice for {rid}"
        self.at_finish[rid] = (id(request._all_token_ids), list(request._all_token_ids))
        waiting0 = len(self.ledger._waiting)
        out = super()._finished(request)
        for w in list(self.ledger._waiting)[waiting0:]:
            run = w[5]
            assert isinstance(run, TokenRun)
            assert run.token_ids._x is request._all_token_ids  # (what the change relies on)
            self.run_tokens[id(run)] = list(request._all_token_ids)
        return out

    def add(self, k):
        from vllm import SamplingParams
        from vllm.v1.request import Request

        rng = self.rng
        live = [s for s in self.sessions if s in self.sched.requests
                and not self.sched.requests[s].is_finished()]
        if self.streaming and live and rng.random() < 0.5:  # the next chunk of a session
            rid = rng.choice(live)
            last = rng.random() < 0.25
            req = Request(rid, [rng.randrange(3, 30000) for _ in range(rng.randrange(1, 40))],
                          SamplingParams(max_tokens=rng.randrange(1, 12), ignore_eos=True), None,
                          block_hasher=self.hasher, resumable=not last)
            self.stream_updates += 1
            self.sched.add_request(req)
            return
        if self.streaming and rng.random() < 0.4:  # a new session
            fam = rng.choice(self.families)
            prompt = fam[: rng.randrange(0, len(fam) + 1)] + [
                rng.randrange(3, 30000) for _ in range(rng.randrange(1, 40))]
            req = Request(f"s{k}", prompt,
                          SamplingParams(max_tokens=rng.randrange(1, 12), ignore_eos=True), None,
                          block_hasher=self.hasher, resumable=True)
            self.reqs[req.request_id] = req
            self.sessions.append(req.request_id)
            self.sched.add_request(req)
            return
        super().add(k)

    def schedule(self):
        super().schedule()
        if self.spec:  # accepted drafts: up to 1 + the scheduled spec tokens sampled
            so, step, writes, sampled = self.queue[-1]
            for rid in sampled:
                drafts = so.scheduled_spec_decode_tokens.get(rid) or []
                extra = self.rng.randint(0, len(drafts))
                sampled[rid] = sampled[rid] + [self.rng.randrange(3, 30000) for _ in range(extra)]

    def execute_and_update(self):
        so = self.queue[0][0]
        super().execute_and_update()
        if self.spec:
            from vllm.v1.outputs import DraftTokenIds

            ids = [r for r in so.num_scheduled_tokens if r in self.sched.requests]
            self.sched.update_draft_token_ids(DraftTokenIds(
                ids, [[self.rng.randrange(3, 30000) for _ in range(self.spec)] for _ in ids]))

    def verify(self):
        for rid, (list_id, toks) in self.at_finish.items():
            req = self.reqs[rid]
            assert id(req._all_token_ids) == list_id
            assert list(req._all_token_ids) == toks, f"{rid}: token ids changed after finish"
        n = 0
        for keys, runs in self.chan.publishes:
            lazy = block_tokens(runs, keys)
            eager = []
            wanted = set(keys)
            for t in runs:
                toks = self.run_tokens[id(t)]
                lo = t.positions[0]
                blob = token_bytes(toks[lo * BS : (t.positions[-1] + 1) * BS])
                eager += [(k, p, blob[(i - lo) * 4 * BS : (i - lo + 1) * 4 * BS])
                          for k, p, i in zip(t.keys, t.parents, t.positions, strict=True)
                          if k in wanted]
            assert [(b.key, b.parent, b.tokens) for b in lazy] == eager
            for b in lazy:  # the bytes are the key's own tokens' last block
                ref = self.key_tokens[b.key]
                assert b.tokens == token_bytes(list(ref[-BS:]))
                n += 1
        return n


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["sync", "async", "async-defer", "sync-spec", "async-stream",
                                  "sync-stream"])
def test_finished_requests_token_ids_never_change(tiny_model_dir, tmp_path, seed, mode):
    sim = _TokenSim(tiny_model_dir, tmp_path, seed, mode.startswith("async"), "defer" in mode,
                    nblocks=28 + seed % 3 * 10, streaming="stream" in mode,
                    spec=2 if "spec" in mode else 0)
    sim.run(1200)
    described = sim.verify()
    assert len(sim.at_finish) > 20 and described > 0, (len(sim.at_finish), described)
    if "stream" in mode:
        assert sim.stream_updates > 5
    sim.gens.close()
