"""What vLLM writes behind the export's back, seen from the scheduler: the blocks a step
may write (from its ``SchedulerOutput``), and prefix-cache resets (from any thread)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.sched.output import SchedulerOutput


class ResetWatch:
    """Notices vLLM prefix-cache resets from any thread: ``BlockPool.reset_prefix_cache``
    replaces the pool's hash map. ``epoch`` counts the resets seen. ``on_reset`` runs once
    per reset, in whichever thread notices it first (twice would invalidate exports made
    between the two)."""

    def __init__(self, pool: BlockPool, on_reset: Callable[[], None] | None = None) -> None:
        self._pool = pool
        self._seen = pool.cached_block_hash_to_block
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self.epoch = 0

    def check(self) -> int:
        with self._lock:
            current = self._pool.cached_block_hash_to_block
            if current is not self._seen:
                self._seen = current
                self.epoch += 1
                if self._on_reset is not None:
                    self._on_reset()
            return self.epoch


def rewritten_blocks(out: SchedulerOutput, block_size: int, only: set[str] | None = None
                     ) -> list[int]:  # fmt: skip
    """Blocks the step described by ``out`` may write: all newly allocated ones, but not a
    new request's prefix-cache hits (blocks below its computed tokens are only read).
    ``only``: those of these requests (streaming-input sessions, see ``_sessions``)."""
    ids: list[int] = []
    for req in out.scheduled_new_reqs:
        if only is None or req.req_id in only:
            ids += req.block_ids[0][req.num_computed_tokens // block_size :]
    cached = out.scheduled_cached_reqs
    for rid, new, computed in zip(
        cached.req_ids, cached.new_block_ids, cached.num_computed_tokens, strict=True
    ):
        if new and (only is None or rid in only):
            skip = computed // block_size if rid in cached.resumed_req_ids else 0
            ids += new[0][skip:]
    if only is None:  # both are new blocks of the requests above already; listed so no
        ids += getattr(out, "new_block_ids_to_zero", None) or []  # write is ever missed
    return ids
