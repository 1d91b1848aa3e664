"""Connector stats reach offline `LLM`, which records a step's stats only if the step has
request outputs (vLLM 0.26 llm_engine.py): driven through vLLM's real Scheduler and
AsyncScheduler (no engine, no worker), in the order EngineCore runs them.

A 150-token prompt is prefilled in 64-token chunks, so its first two steps output nothing;
the scheduler half counts one lookup per step (as imports confirmed in such steps do). Every
count must come out, once, and only with a step that outputs (or still wait, if no step
output since it was counted).
"""

from __future__ import annotations

import pytest

from kvmkt_connector.connector.metadata import MarketplaceHandshake
from tests.unit.vllm_objects import engine_config, kv_cache_config, ours

CHUNK = 64
PROMPT = 150


def _scheduler(tiny_model_dir, tmp_path, async_scheduling: bool):
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    cfg = engine_config(tiny_model_dir, ours(tmp_path), max_num_batched_tokens=CHUNK,
                        max_num_seqs=4, enable_prefix_caching=False)
    cfg.cache_config.num_gpu_blocks = 64
    cls = AsyncScheduler if async_scheduling else Scheduler
    sched = cls(cfg, kv_cache_config(), StructuredOutputManager(cfg), block_size=16,
                log_stats=True)
    # What vLLM's start-up handshake would bring from a worker that cannot share: the
    # scheduler half then stops waiting for layouts.
    sched.connector.set_xfer_handshake_metadata({0: MarketplaceHandshake(
        tp_rank=0, layout=None, descriptor=None, export_slots=0, transport="",
        problem="unit test: no workers")})
    return sched


def _runner_output(so, sampled: dict[str, list[int]]):
    from vllm.v1.outputs import ModelRunnerOutput

    ids = list(so.num_scheduled_tokens)
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=[sampled.get(r, []) for r in ids])


def _request(rid: str, n: int, max_tokens: int = 2, stop: int | None = None):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    sp = SamplingParams(max_tokens=max_tokens, stop_token_ids=[stop] if stop else None)
    return Request(rid, list(range(3, 3 + n)), sp, None)


def _emitted(outputs: dict) -> list[tuple[int, bool]]:
    """(lookups in this step's stats, whether the step has request outputs)."""
    out = []
    for eco in outputs.values():
        stats = eco.scheduler_stats
        data = (stats.kv_connector_stats or {}) if stats is not None else {}
        out.append((data.get("c", {}).get("lookups", 0), bool(eco.outputs)))
    return out


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("stop", [False, True], ids=["length", "stop-token"])
def test_stats_go_out_only_with_steps_that_output(tiny_model_dir, tmp_path, async_scheduling,
                                                  stop):
    """Counted at schedule time and at update time (as imports confirmed there are). With a
    stop token the request ends in a step after which async scheduling has already
    scheduled another for it: that one outputs nothing."""
    sched = _scheduler(tiny_model_dir, tmp_path, async_scheduling)
    half = sched.connector._scheduler  # the scheduler object behind the facade
    try:
        sched.add_request(_request("r", PROMPT, max_tokens=50 if stop else 2,
                                   stop=9 if stop else None))
        counted, emitted, queue, computed, samples = 0, [], [], 0, 0
        depth = 2 if async_scheduling else 1  # EngineCore's batch queue under async scheduling
        for _ in range(20):
            if sched.has_requests() and len(queue) < depth:
                so = sched.schedule()
                half.stats.count("lookups")
                counted += 1
                n = so.num_scheduled_tokens.get("r", 0)
                computed += n
                sampled = {}
                if n and computed >= PROMPT:  # the model samples once the prompt is done
                    samples += 1
                    sampled = {"r": [9 if stop and samples == 3 else 7]}
                queue.append((so, sampled))
                continue
            if not queue:
                break
            so, sampled = queue.pop(0)
            half.stats.count("lookups")
            counted += 1
            emitted += _emitted(sched.update_from_output(so, _runner_output(so, sampled)))
        assert any(not outputs for _, outputs in emitted)  # chunk steps were there
        assert all(outputs for n, outputs in emitted if n), f"stats of a step without output: {emitted}"
        # what the trailing steps without output counted waits for the next step that
        # outputs (none here): held, not lost
        held = half.stats.data["c"].get("lookups", 0)
        assert sum(n for n, _ in emitted) + held == counted, f"lost: {emitted}, held {held}"
    finally:
        sched.shutdown()
