"""Which step outputs may carry the scheduler half's stats.

Offline ``LLM`` records a step's stats only if the step has request outputs (vLLM 0.26
llm_engine.py): stats handed out with any other step are dropped. So they wait for such a
step. The gate remembers, per scheduled step in order (async scheduling schedules step N+1
before step N's output is processed), the requests that sample in it; per request, the
token count at which it samples; and for requests that ended, at which processed output (a
request that stopped in step N outputs nothing in step N+1, scheduled before N was
processed; an aborted one outputs nothing at all).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

_MAX_STEPS = 64  # scheduled steps whose outputs are not processed yet (async: one or two)


class StatsGate:
    def __init__(self) -> None:
        self._output_steps: deque[tuple[str, ...]] = deque(maxlen=_MAX_STEPS)
        self._sample_at: dict[str, int] = {}
        self._updates = 0  # step outputs processed so far
        self._ended_at: dict[str, tuple[int, bool]] = {}  # request -> (update, aborted)

    def on_asked(self, request_id: str, num_tokens: int) -> None:
        """vLLM looked the request up: it samples once ``num_tokens`` are computed."""
        self._sample_at[request_id] = num_tokens

    def on_step(self, out: SchedulerOutput, runs: bool) -> bool:
        """A step was scheduled (``runs``: it computes tokens); True if it samples for
        some request, i.e. its output will carry request outputs."""
        samplers = _samplers(out, self._sample_at) if runs else ()
        self._output_steps.append(samplers)
        return bool(samplers)

    def on_request_finished(self, request_id: str, aborted: bool) -> None:
        if self._sample_at.pop(request_id, None) is not None:
            self._ended_at[request_id] = (self._updates, aborted)

    def on_output(self) -> bool:
        """Called once per processed step output, oldest first: True if that output has
        request outputs. A request that ended while this output was processed (it
        stopped) did output in it."""
        samplers = self._output_steps.popleft() if self._output_steps else ()
        now, ended = self._updates, self._ended_at
        self._updates += 1
        outputs = any(ended.get(r, (now, False)) == (now, False) for r in samplers)
        if len(ended) > 256:  # no queued step names a request that ended long ago
            self._ended_at = {r: e for r, e in ended.items() if e[0] >= now - 8}
        return outputs


def _samplers(out: SchedulerOutput, sample_at: dict[str, int]) -> tuple[str, ...]:
    """The requests a scheduled step samples for: those whose computed plus scheduled
    tokens reach the count at which they sample (a chunk of a long prefill does not).
    Requests never looked up count as not sampling: their stats wait a step more."""
    sched, never = out.num_scheduled_tokens, 1 << 62
    got = [r.req_id for r in out.scheduled_new_reqs
           if r.num_computed_tokens + sched.get(r.req_id, 0) >= sample_at.get(r.req_id, never)]
    cached = out.scheduled_cached_reqs
    got += [rid for rid, done in zip(cached.req_ids, cached.num_computed_tokens, strict=False)
            if done + sched.get(rid, 0) >= sample_at.get(rid, never)]
    return tuple(got)
