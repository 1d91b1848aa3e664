"""Scheduler side, exporting: offer our computed prefix blocks to other instances.

When a request finishes we publish its full, computed blocks. What keeps a published page
valid while someone may read it depends on the transport:

- ``staged`` (host_shm): the worker copies the blocks into slots of a shared export region.
  The blocks are pinned (``BlockPool.touch``) only until that copy is done; the slots are
  what we publish.
- ``in place`` (cuda_ipc): importers read our KV cache directly, so the published blocks
  stay pinned until the registry lets them go. The budget, ``max_pinned_fraction`` of the
  cache, is soft: a finished request's prefix is published whole (a truncated prefix would
  make importers recompute the rest) and the overshoot, at most one request's blocks, is
  given back within a few steps by reclaiming the registry's least recently leased entries.
  Pinned blocks stay in our own prefix cache, so they still serve us too.

Either way we reuse a location only after the registry released it, and the registry never
releases a leased entry: that is the whole lifetime protocol. If the registry is lost,
leases it granted may still be running, so everything we had published is quarantined for
``lease_ttl_s`` before reuse.

Registry traffic goes through ``HolderChannel`` (a background thread): publishing never
delays a request; what the registry answers (released locations, failed publishes) is
applied once per scheduler step in ``tick``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.holder_channel import HolderChannel
from kvmkt_connector.connector.metadata import SaveJob
from kvmkt_connector.hashing import PrefixKeys
from kvmkt_connector.logs import get_logger
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.registry.index import MAX_LEASE_TTL_MS

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.request import Request

logger = get_logger(__name__)
# Pages whose listing became unknown are kept untouched for the longest lease the registry
# grants (it caps every TTL at this, whatever TTL an importer asks for).
QUARANTINE_S = MAX_LEASE_TTL_MS / 1000




class ExportLedger:
    def __init__(
        self,
        cfg: MarketplaceConfig,
        block_size: int,
        channel: HolderChannel,
        stats: MarketplaceStats,
        pool: BlockPool,
        staged_slots: int | None,
    ) -> None:
        """``staged_slots``: slots of the export region (host_shm), None for in-place export."""
        self._cfg = cfg
        self._bs = block_size
        self._channel = channel
        self._stats = stats
        self._pool = pool
        self.staged = staged_slots is not None
        self._capacity = (
            staged_slots if staged_slots is not None
            else int(cfg.max_pinned_fraction * pool.num_gpu_blocks)
        )
        self._free_slots = list(range(staged_slots or 0))[::-1]  # pop() gives slot 0 first
        self._location_of: dict[bytes, int] = {}  # published or being staged
        self._key_at: dict[int, bytes] = {}
        self._pinned: dict[int, KVCacheBlock] = {}  # in place: location == block id
        self._staging: dict[int, tuple[list[KVCacheBlock], list[bytes], list[int]]] = {}
        self._pending_jobs: list[SaveJob] = []
        self._quarantine: list[tuple[float, list[int]]] = []
        self._quarantined: set[int] = set()
        self._next_reclaim = 0.0
        self._generation = channel.generation
        self._next_job = 0

    # ------------------------------------------------------------ export

    def stop_exporting(self) -> None:
        self._capacity = 0

    def on_request_finished(self, request: Request, block_ids: list[int], keys: PrefixKeys) -> None:
        if self._capacity == 0:
            return
        # Export only KV that completed steps wrote: async scheduling advances
        # num_computed_tokens when a step is scheduled (an aborted request may still have a
        # prefill chunk in flight), and the last sampled token has no KV yet. An aborted
        # request whose import copy is not confirmed yet is skipped by the caller.
        written = request.num_computed_tokens - request.num_in_flight_tokens
        done_tokens = min(written, request.num_tokens - 1)
        n = min(len(block_ids), done_tokens // self._bs)
        if n == 0 or not self._channel.connected:
            return
        self._check_generation()
        all_keys = keys.extend(request.all_token_ids, upto=n * self._bs)[:n]
        if not self.staged:
            # A quarantined block is still pinned for an old lease: not ours to list again
            # until released; the run an importer could use ends there.
            q = next((i for i in range(n) if block_ids[i] in self._quarantined), n)
            n = q
        new = [i for i in range(n) if all_keys[i] not in self._location_of]
        if self.staged:  # slots are a hard limit; only a prefix is useful: keep the first
            new = new[: self._make_room(len(new))]
        if not new:
            return
        new_keys = [all_keys[i] for i in new]
        blocks = [self._pool.blocks[block_ids[i]] for i in new]
        self._pool.touch(blocks)  # pin: not reused while staged / published
        if self.staged:
            slots = [self._free_slots.pop() for _ in new]
            job = SaveJob(self._next_job, [block_ids[i] for i in new], slots, new_keys)
            self._next_job += 1
            self._staging[job.job_id] = (blocks, new_keys, slots)
            self._pending_jobs.append(job)
            self._remember(new_keys, slots)
        else:
            locations = [b.block_id for b in blocks]
            for b in blocks:
                self._pinned[b.block_id] = b
            self._remember(new_keys, locations)
            self._publish(new_keys, locations)
        self._update_gauges()

    def _make_room(self, wanted: int) -> int:
        """How many of ``wanted`` fit now; asks the registry to free the rest for later."""
        short = wanted - (self._capacity - self._used())
        if short > 0:
            self._channel.reclaim(short)
        return max(0, min(wanted, self._capacity - self._used()))

    def _used(self) -> int:
        return len(self._key_at) + len(self._quarantined)

    def _enforce_budget(self) -> None:
        """In-place mode: ask the registry to release what is pinned beyond the budget
        (at most once per sync interval, so answers in flight are not asked for twice)."""
        over = self._used() - self._capacity
        now = time.monotonic()
        if over > 0 and now >= self._next_reclaim:
            self._next_reclaim = now + self._cfg.registry_sync_interval_ms / 1000
            self._channel.reclaim(over)

    def _remember(self, keys: list[bytes], locations: list[int]) -> None:
        for key, loc in zip(keys, locations, strict=True):
            self._location_of[key] = loc
            self._key_at[loc] = key

    def _publish(self, keys: list[bytes], locations: list[int]) -> None:
        self._channel.publish(keys, locations)

    def has_pending(self) -> bool:
        return bool(self._pending_jobs or self._staging)

    def take_jobs(self) -> list[SaveJob]:
        jobs, self._pending_jobs = self._pending_jobs, []
        return jobs

    def on_saves_done(self, job_ids: list[int], failed: bool = False) -> None:
        for job_id in job_ids:
            staged = self._staging.pop(job_id, None)
            if staged is None:
                continue
            blocks, keys, slots = staged
            self._pool.free_blocks(blocks)  # the slots hold a copy now
            if failed:
                self._forget(slots)
            else:
                self._publish(keys, slots)
        self._update_gauges()

    # ------------------------------------------------------------ release

    def _forget(self, locations: list[int]) -> None:
        """The registry no longer lists these locations: they are ours to reuse."""
        unpin = []
        for loc in locations:
            key = self._key_at.pop(loc, None)
            if key is not None:
                self._location_of.pop(key, None)
            elif loc in self._quarantined:
                self._quarantined.discard(loc)
            else:
                continue  # not held (already released): never free a location twice
            if self.staged:
                self._free_slots.append(loc)
            elif loc in self._pinned:
                unpin.append(self._pinned.pop(loc))
        if unpin:
            self._pool.free_blocks(unpin)
        self._stats.count("released_blocks", len(locations))

    def _check_generation(self) -> None:
        """After the holder re-registered, what we published before may still be leased by
        importers of the old registry: keep those pages untouched for a lease TTL."""
        if self._channel.generation == self._generation:
            return
        self._generation = self._channel.generation
        gone = [loc for loc in self._key_at if loc not in self._staging_slots()]
        if gone:
            logger.warning(
                "kvmkt: re-registered with the registry; %d exported pages stay untouched for "
                "%.0f s in case an importer still reads them", len(gone), QUARANTINE_S,
            )
            self._quarantine_locations(gone)

    def _quarantine_locations(self, locations: list[int]) -> None:
        """Unlist ``locations`` here but keep them (pinned / their slots unused) for the
        longest lease any importer can hold, then reuse them."""
        held = [loc for loc in locations if loc in self._key_at]
        for loc in held:
            self._location_of.pop(self._key_at.pop(loc), None)
        self._quarantined.update(held)
        if held:
            self._quarantine.append((time.monotonic() + QUARANTINE_S, held))

    def _staging_slots(self) -> set[int]:
        return {s for _, _, slots in self._staging.values() for s in slots}

    def tick(self) -> None:
        """Once per scheduler step: apply the registry's answers, end quarantines."""
        self._check_generation()
        for event in self._channel.take_events():
            if event.kind == "published":
                self._stats.count("exported_blocks", len(event.locations))
            elif event.generation != self._generation:
                continue  # an older registration's news: its pages are quarantined
            elif event.kind in ("released", "publish_failed"):  # certainly not listed
                self._forget(event.locations)
            elif event.kind == "publish_unknown":  # maybe listed, maybe leased: wait
                self._quarantine_locations(event.locations)
        self._check_generation()
        now = time.monotonic()
        while self._quarantine and self._quarantine[0][0] <= now:
            self._forget(self._quarantine.pop(0)[1])
        if not self.staged:
            self._enforce_budget()
        self._update_gauges()

    def _update_gauges(self) -> None:
        pinned = len(self._pinned) + sum(len(b) for b, _, _ in self._staging.values())
        self._stats.gauge("pinned_blocks", pinned)
        self._stats.gauge("exported_pages", len(self._key_at))

    def withdraw_all(self) -> bool:
        """Unpublish everything (reset_cache); False if leased pages must stay for now."""
        locations = [loc for loc in self._key_at if loc not in self._staging_slots()]
        if not locations:
            return True
        result = self._channel.unpublish_and_wait(locations, self._cfg.registry_timeout_ms / 1000)
        if result is None:
            return False
        _, pending = result
        self.tick()  # the channel reported the released locations as events: apply them
        return pending == 0

    def shutdown(self) -> None:
        """Engine exit: our connection closing withdraws everything from the registry."""
        self._channel.close()
        pins = list(self._pinned.values()) + [b for blocks, _, _ in self._staging.values() for b in blocks]
        if pins:
            self._pool.free_blocks(pins)
        self._pinned.clear()
        self._staging.clear()
