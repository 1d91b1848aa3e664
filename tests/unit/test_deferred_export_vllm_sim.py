"""Review 5 of 5d2be37 (on_request_finished_later): the in-place ledger next to vLLM 0.26's
real Scheduler / AsyncScheduler (test_ledger_vllm_sim's model of the KV cache), finishing
requests through ``on_request_finished_later``; and the same run differentially against
the direct ``on_request_finished`` (the pre-change behaviour): what the channel is told
(publish / unpublish, in order, with epochs) must be identical tick by tick.

Run: PYTHONPATH=. python -m pytest -q tests/unit/test_deferred_export_vllm_sim.py
"""

from __future__ import annotations

import pytest

from kvmkt_connector.hashing import KeyScope
from tests.unit.test_ledger_vllm_sim import _Sim


class _LogSim(_Sim):
    def __init__(self, *a, later: bool, **kw):
        super().__init__(*a, **kw)
        self.later = later
        self.log: list = []
        chan = self.chan
        pub, unpub = chan.publish, chan.unpublish

        def publish(keys, locations, epoch=0, tokens=None, parents=None):
            self.log.append(("pub", self.ledger.step, tuple(keys), tuple(locations), epoch,
                             tuple(parents or ())))
            pub(keys, locations, epoch, tokens, parents)

        def unpublish(locations):
            self.log.append(("unpub", self.ledger.step, tuple(locations)))
            unpub(locations)

        chan.publish, chan.unpublish = publish, unpublish
        tick = self.ledger.tick

        def logged_tick(so=None):
            tick(so)
            self.log.append(("tick", self.ledger.step, len(self.ledger._listed),
                             self.ledger.has_pending()))
        self.ledger.tick = logged_tick

    def _finished(self, request):
        if not self.later:
            return super()._finished(request)
        block_ids = self.sched.kv_cache_manager.get_block_ids_for_computed_tokens(
            request.request_id, request.num_computed_tokens)[0]
        self.finished += 1
        if block_ids:
            self._keys(request)
            self.ledger.on_request_finished_later(request, list(block_ids),
                                                  self.keyer.start(KeyScope()), True)
        return False, None


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mode", ["sync", "async", "async-defer"])
def test_later_same_as_direct_next_to_vllm(tiny_model_dir, tmp_path, seed, mode):
    runs = []
    for later in (False, True):
        (tmp_path / str(later)).mkdir()
        sim = _LogSim(tiny_model_dir, tmp_path / str(later), seed, mode != "sync",
                      mode == "async-defer", nblocks=28 + seed % 3 * 10, later=later)
        sim.run(1500)  # (checks every published page against the KV model)
        assert not sim.ledger._finished
        runs.append(sim)
        sim.gens.close()
    old, new = runs
    assert old.chan.published and old.finished > 20
    assert len(old.log) == len(new.log)
    for i, (a, b) in enumerate(zip(old.log, new.log, strict=True)):
        assert a == b, f"op {i}: direct {a[:2]}.. vs later {b[:2]}..\n{a}\n{b}"
