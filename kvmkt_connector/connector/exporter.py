"""Scheduler side, exporting: offer our computed prefix blocks to other instances.

When a request finishes we publish its full blocks that completed steps wrote. We never
hold vLLM blocks for it (no ``BlockPool.touch``): vLLM's resets, preemptions and memory
pressure see exactly the cache they would see without the connector. Instead every
published page carries a tag that importers check after their copy:

- ``in place`` (cuda_ipc): importers read our KV cache blocks directly. The tag is the
  block's generation (``transport.generations``), bumped here whenever vLLM allocates the
  block again, before the forward that writes it runs; a rewritten block is withdrawn from
  the registry at the same moment. A finished request's blocks are published only once
  every step scheduled before it finished has ended (the workers acknowledge steps): an
  aborted request can hold prefix hits on blocks that another request's chunk, still in
  flight, is writing.
- ``staged`` (host_shm): the worker copies the blocks into slots of a shared region (in the
  next step, before any forward could rewrite them). The tag is the slot's key, cleared
  before a slot is restaged. Slots are reused once the registry released them, or at once
  after a cache reset (an importer still copying one then fails its key check).

Locations are ``generation << 32 | index`` in both modes, so the registry's answers about an
old use of a block or slot are never taken for its current one.

A copy whose tag changed is reported failed and recomputed, so the registry only steers
importers: losing it, or a lease running out, cannot make anyone read a wrong page. After
the holder re-registers (registry restart) the channel publishes everything offered again.

Registry traffic goes through ``HolderChannel`` (a background thread): publishing never
delays a request; what the registry answers is applied once per scheduler step in ``tick``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from itertools import compress, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.block_writes import ResetWatch, rewritten_blocks
from kvmkt_connector.connector.holder_channel import HolderChannel, TokenRun
from kvmkt_connector.connector.importer import ConfirmedImport
from kvmkt_connector.connector.metadata import SaveJob
from kvmkt_connector.hashing import KeySource, PrefixKeys
from kvmkt_connector.logs import get_logger
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.transport.generations import (
    GenerationTable,
    decode_locations,
    encode_locations,
    next_generations,
)

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = get_logger(__name__)


class FinishedRequest(NamedTuple):
    """What the ledger reads of a finished request (``on_request_finished_later``)."""

    num_computed_tokens: int
    num_in_flight_tokens: int
    num_tokens: int
    all_token_ids: Sequence[int]


class ExportLedger:
    def __init__(
        self,
        cfg: MarketplaceConfig,
        block_size: int,
        channel: HolderChannel,
        stats: MarketplaceStats,
        pool: BlockPool,
        staged_slots: int | None = None,
        generations: GenerationTable | None = None,
    ) -> None:
        """Staged (host_shm): ``staged_slots`` slots; in place (cuda_ipc): ``generations``."""
        assert (staged_slots is None) != (generations is None)
        self._cfg = cfg
        self._bs = block_size
        self._channel = channel
        self._stats = stats
        self._pool = pool
        self._gens = generations
        self.staged = staged_slots is not None
        self._exporting = True
        # Streaming-input sessions (vLLM's resumable requests): vLLM 0.26 keeps a session's
        # block hashes when it drops the last sampled token of a chunk, so a block it wrote
        # can be cached under a hash of other tokens, and a request that hits it holds KV
        # that is not its tokens'. Blocks a session was given to write (not its prefix hits)
        # are not exported, by anyone and from that position on, until vLLM allocates them
        # anew to another request (which evicts the stale hash).
        self._sessions: set[str] = set()
        self._tainted: set[int] = set()
        self._warned_sessions = False
        self._free_slots = list(range(staged_slots or 0))[::-1]  # pop() gives slot 0 first
        self._slot_generation = np.zeros(staged_slots or 0, dtype=np.uint32)
        # index (block id or slot) -> (key, published location); staged: also while staging
        self._listed: dict[int, tuple[bytes, int]] = {}
        self._index_of: dict[bytes, int] = {}  # key -> index
        # job -> keys, slots, parent keys
        # Token ids go with an export's publish, for instances' KV events (kv_events.py)
        self._staging: dict[int, tuple[list[bytes], list[int], list[bytes], TokenRun | None]] = {}
        self._cancelled: set[int] = set()  # staging jobs whose pages must not be published
        self._pending_jobs: list[SaveJob] = []
        # A reset bumps every generation (copies in flight fail their check) at once, even
        # when the channel's thread notices it first (an exporter whose scheduler is idle).
        self._resets = ResetWatch(pool, self._gens.bump_all if self._gens else None)
        self._epoch = 0  # resets seen by this ledger; exports are stamped with it
        channel.watch_resets(self._resets.check)
        self._next_job = 0
        self.step = 0  # sequence number of the step being scheduled
        self._acked = -1  # every step up to this one has ended (workers said so)
        # in place: (first step scheduled after the finish, keys, blocks, locations, parents,
        # token ids, ``_forgets`` then)
        self._waiting: deque[
            tuple[int, list[bytes], list[int], list[int], list[bytes], TokenRun | None, int]
        ] = deque()  # fmt: skip
        self._forgets = 0  # calls of _forget that took something off the books
        # finished requests whose export waits for the ledger's next touch (see
        # ``on_request_finished_later``)
        self._finished: deque[tuple[FinishedRequest, list[int], PrefixKeys, bool,
                                    ConfirmedImport | None]] = deque()  # fmt: skip

    # ------------------------------------------------------------ export

    def on_request_finished_later(
        self, request: Request, block_ids: list[int], keys: PrefixKeys, describe: bool = False,
        known: ConfirmedImport | None = None,
    ) -> None:  # fmt: skip
        """``on_request_finished`` at the ledger's next touch: vLLM sends a step's outputs
        only after every ``request_finished`` has returned, and a 16k-token export's books
        (about 1 ms) would sit in that request's latency. Deferring changes nothing: vLLM
        reallocates the blocks only in ``schedule()``, and every call that tells the ledger
        of an allocation (and ``tick``) first settles what was deferred, in order; the
        request's counts are read now."""
        if not self._exporting:
            return
        if getattr(request, "resumable", False):  # a session's Request lives on and changes
            self._settle_finished()
            self.on_request_finished(request, block_ids, keys, describe, known)
            return
        done = FinishedRequest(request.num_computed_tokens, request.num_in_flight_tokens,
                               request.num_tokens, request.all_token_ids)
        self._finished.append((done, list(block_ids), keys, describe, known))

    def _settle_finished(self) -> None:
        while self._finished:
            self.on_request_finished(*self._finished.popleft())

    def on_request_finished(
        self, request: Request, block_ids: list[int], keys: PrefixKeys, describe: bool = False,
        known: ConfirmedImport | None = None,
    ) -> None:  # fmt: skip
        """``describe``: send the blocks' token ids along (only for KV that token ids alone
        determine: no cache salt, no LoRA), so other instances can announce them.
        ``known``: a confirmed import into this request (its keys are used as they are)."""
        if not self._exporting:
            return
        # Export only KV that completed steps wrote: async scheduling advances
        # num_computed_tokens when a step is scheduled, and the last sampled token has no
        # KV yet. An aborted request whose import is not confirmed is skipped by the caller.
        written = request.num_computed_tokens - request.num_in_flight_tokens
        n = min(len(block_ids), min(written, request.num_tokens - 1) // self._bs)
        if n and self._tainted and not self._tainted.isdisjoint(block_ids[:n]):
            tainted = self._tainted
            n = next(i for i, b in enumerate(block_ids[:n]) if b in tainted)
            self._stats.count("export_skipped_session")  # (per request)
        if n == 0:
            return
        # (Set operations first: a 16k-token export is a thousand blocks, and per-block
        # Python here runs on vLLM's scheduler thread before the request's output goes out.)
        fresh: Sequence[int] = range(n)
        if not self.staged and not self._listed.keys().isdisjoint(block_ids[:n]):
            # In place, a block we list holds this prefix's KV at this position already:
            # vLLM shared it with this request by hash, and any rewrite would have withdrawn
            # it. So it is listed under this very key; only the others need keys (a prefix
            # hit of 16k tokens then costs no hashing here).
            listed = self._listed
            fresh = [i for i in range(n) if block_ids[i] not in listed]
            if not fresh:
                return
        # In place, the tags of the request's blocks (read once: checking a confirmed
        # import's keys needs them, and so does the publish).
        tags = None
        if self._gens is not None and known is not None and not known.verified:
            tags = self._gens.locations(block_ids[:n])
        usable = self._usable_keys(known, block_ids, tags)
        source = KeySource(keys, request.all_token_ids, n, fresh, usable)
        fresh_keys = source.take(fresh)
        new, new_keys = fresh, fresh_keys
        if not self._index_of.keys().isdisjoint(fresh_keys):  # some listed at other blocks
            index_of = self._index_of
            kept = [(i, k) for i, k in zip(fresh, fresh_keys, strict=True) if k not in index_of]
            new, new_keys = [i for i, _ in kept], [k for _, k in kept]
        if self.staged:  # slots are a hard limit; only a prefix is useful: keep the first
            m = self._make_room(len(new))
            new, new_keys = new[:m], new_keys[:m]
        if not new:
            return
        # importers lease by tail key: each key goes with its parent's
        if isinstance(new, range):
            first_parent = source.take([new[0] - 1])[0] if new[0] else b""
            parents = [first_parent, *new_keys[:-1]]
            blocks = block_ids[new[0] : new[-1] + 1]
        else:
            key_at = dict(zip(new, new_keys, strict=True))
            missing = [i - 1 for i in new if i and i - 1 not in key_at]
            key_at.update(zip(missing, source.take(missing), strict=True))
            parents = [key_at[i - 1] if i else b"" for i in new]
            blocks = [block_ids[i] for i in new]
        run = None
        if describe:  # (the channel's thread makes the BlockTokens: see TokenRun)
            # Imported pages too: their exporter may withdraw them before we publish, and
            # the registry keeps a block's tokens only while some holder lists it.
            run = TokenRun(new_keys, parents, list(new) if isinstance(new, range) else new,
                           request.all_token_ids, self._bs)
        if self.staged:
            slots = [self._free_slots.pop() for _ in new]
            idx = np.asarray(slots, dtype=np.int64)
            self._slot_generation[idx] = next_generations(self._slot_generation[idx])
            locations = encode_locations(idx, self._slot_generation[idx])
            job = SaveJob(self._next_job, blocks, slots, new_keys)
            self._next_job += 1
            self._staging[job.job_id] = (new_keys, slots, parents, run)
            self._pending_jobs.append(job)
            self._remember(new_keys, slots, locations)  # published once the copy is done
        else:
            assert self._gens is not None  # (none of these blocks is listed: see above)
            if tags is not None and isinstance(new, range):
                locations = tags[new[0] : new[-1] + 1]
            else:
                locations = self._gens.locations(blocks)
            clean = self._remember(new_keys, blocks, locations)
            self._waiting.append((self.step + 1, new_keys, blocks, locations, parents, run,
                                  self._forgets if clean else -1))
        self._update_gauges()

    def _usable_keys(self, known: ConfirmedImport | None, block_ids: list[int],
                     tags: list[int] | None = None) -> tuple[int, list[bytes]] | None:  # fmt: skip
        """The leading part of a confirmed import's keys that still name this request's
        blocks: all of them when verified; else only while the block at that position is
        the one the copy wrote and its tag has not moved (a preempted request may have
        recomputed a position elsewhere, and the holder's word covers only its own page).
        ``tags``: the current locations of the leading ``block_ids``, if read already."""
        if known is None:
            return None
        if known.verified:
            return known.first, known.keys
        if known.locations is None or self._gens is None:
            return None
        at = block_ids[known.first : known.first + len(known.dst)]
        # (Whole-list comparisons first: they run in C, and the usual answer is "all".)
        same = len(at) if at == known.dst else 0  # leading positions still held by the
        while same < len(at) and at[same] == known.dst[same]:  # blocks the copy wrote
            same += 1
        if tags is not None and known.first + same <= len(tags):
            now = tags[known.first : known.first + same]
        else:
            now = self._gens.locations(at[:same])
        good = same if now == known.locations[:same] else 0  # ... whose tags have not moved
        while good < same and now[good] == known.locations[good]:
            good += 1
        return known.first, known.keys[:good]

    def _make_room(self, wanted: int) -> int:
        """How many of ``wanted`` slots are free now; asks the registry to free the rest."""
        short = wanted - len(self._free_slots)
        if short > 0:
            self._channel.reclaim(short)
        return min(wanted, len(self._free_slots))

    def _remember(self, keys: list[bytes], indices: list[int], locations: list[int]) -> bool:
        """False if an index was listed already or is given twice (vLLM gives neither):
        then an entry changed without being forgotten, which counts as forgetting."""
        before = len(self._listed)
        self._index_of.update(zip(keys, indices, strict=True))
        self._listed.update(zip(indices, zip(keys, locations, strict=True), strict=True))
        if len(self._listed) - before == len(indices):
            return True
        self._forgets += 1
        return False

    def has_pending(self) -> bool:
        return bool(self._finished or self._pending_jobs or self._staging or self._waiting)

    def wants_ack(self) -> bool:
        return bool(self._waiting)

    def on_step_acked(self, step: int) -> None:
        self._acked = max(self._acked, step)

    def _publish_settled(self) -> None:
        """Publish what waited for the steps in flight at its finish to end, unless it was
        rewritten or withdrawn meanwhile (then it is no longer listed as it was)."""
        keys, locations, parents, runs = [], [], [], []
        listed = self._listed
        while self._waiting and self._waiting[0][0] <= self._acked:
            _, ks, blocks, locs, ps, run, forgets = self._waiting.popleft()
            # Entries change only by being forgotten (a block is listed again only after
            # that), so with nothing forgotten since its finish all of it is as it was; else
            # compare (in C first: the usual answer is still "all").
            if forgets == self._forgets or list(map(listed.get, blocks)) == list(
                    zip(ks, locs, strict=True)):
                keys += ks
                locations += locs
                parents += ps
            else:
                for k, b, loc, p in zip(ks, blocks, locs, ps, strict=True):
                    if listed.get(b) == (k, loc):
                        keys.append(k)
                        locations.append(loc)
                        parents.append(p)
            if run is not None:
                runs.append(run)
        if keys:  # (the channel describes only the keys published)
            self._channel.publish(keys, locations, self._epoch, runs, parents)

    def take_jobs(self) -> list[SaveJob]:
        jobs, self._pending_jobs = self._pending_jobs, []
        return jobs

    def on_saves_done(self, job_ids: list[int], failed: bool = False) -> None:
        for job_id in job_ids:
            staged = self._staging.pop(job_id, None)
            if staged is None:
                continue
            keys, slots, parents, run = staged
            if failed or job_id in self._cancelled:
                self._forget(slots)
            else:
                locations = [self._listed[s][1] for s in slots]
                self._channel.publish(keys, locations, self._epoch, [run] if run else [],
                                      parents)
            self._cancelled.discard(job_id)
        self._update_gauges()

    # ------------------------------------------------------------ what vLLM rewrites

    def on_blocks_rewritten(self, block_ids: list[int]) -> None:
        """vLLM will write these blocks (a step or an import we just planned): bump their
        generations before that write can start, and stop offering them. (Staged: our
        workers copy a step's saves before its forward and its loads.)"""
        self._settle_finished()
        if self._gens is None or not block_ids:
            return
        self._gens.bump(block_ids)
        self._withdraw(block_ids)

    def drop_pending_saves(self, block_ids: list[int]) -> None:
        """Staged: another connector loads into these blocks in the step whose metadata
        carries our saves (a MultiConnector sibling), not ordered after our copies. A save
        not sent yet keeps only its blocks before the first of them; the rest's slots are
        freed. (Saves sent in earlier steps are over: workers run steps in order, and a
        save returns once its copy has ended.)"""
        self._settle_finished()
        if not self._pending_jobs or not block_ids:
            return
        loaded = set(block_ids)
        keep = []
        for job in self._pending_jobs:
            if loaded.isdisjoint(job.src):
                keep.append(job)
                continue
            cut = next(i for i, b in enumerate(job.src) if b in loaded)
            keys, slots, parents, run = self._staging.pop(job.job_id)
            self._forget(slots[cut:])
            if cut:
                self._staging[job.job_id] = (keys[:cut], slots[:cut], parents[:cut], run)
                keep.append(SaveJob(job.job_id, job.src[:cut], job.dst[:cut], job.keys[:cut]))
            else:
                self._cancelled.discard(job.job_id)
        self._pending_jobs = keep

    def _withdraw(self, indices: list[int]) -> None:
        """Stop listing those listed (in place); the registry's answer needs no waiting for."""
        locations = self._forget(indices)
        if locations:
            self._channel.unpublish(locations)

    # ------------------------------------------------------------ release

    def _forget(self, indices: list[int]) -> list[int]:
        """Not offered any more: in place, nothing else to do; staged, the slot is free.
        Returns the locations the forgotten ones were listed at. (Passes over ``indices``
        that run in C: an import's allocation can rewrite thousands of listed blocks, in the
        step that parks the request.)"""
        listed = self._listed
        if listed.keys().isdisjoint(indices):  # (the usual case)
            return []
        popped = list(map(listed.pop, indices, repeat(None)))  # (key, location) or None
        gone = list(filter(None, popped))  # (not held, or already released: never free a
        if not gone:  # slot twice; an index listed twice in ``indices`` pops once)
            return []
        self._forgets += 1
        index_of = self._index_of
        deque(map(index_of.pop, map(itemgetter(0), gone), repeat(None)), maxlen=0)
        if self.staged:
            self._free_slots.extend(compress(indices, popped))
        self._stats.count("released_blocks", len(gone))
        return list(map(itemgetter(1), gone))

    def _released(self, locations: list[int]) -> None:
        """The registry no longer lists these locations (LRU, reclaim, unpublish)."""
        indices, _ = decode_locations(locations)
        self._forget([i for i, loc in zip(indices.tolist(), locations, strict=True)
                      if self._listed.get(i, (b"", -1))[1] == loc])

    def tick(self, scheduler_output: SchedulerOutput | None = None) -> None:
        """Once per scheduler step, before the step's forward is sent to the workers."""
        self._settle_finished()
        if scheduler_output is not None:
            self.step += 1
            rewritten = rewritten_blocks(scheduler_output, self._bs)
            self.on_blocks_rewritten(rewritten)
            if self._tainted or self._sessions:  # (allocated anew: no stale hash left)
                self._tainted.difference_update(rewritten)
                self._tainted.update(rewritten_blocks(scheduler_output, self._bs, self._sessions))
        epoch = self._resets.check()
        if epoch != self._epoch:  # the channel withdraws from the registry by itself
            self._epoch = epoch
            logger.info("kvmkt: prefix cache was reset: withdrawing %d exported pages",
                        len(self._listed))
            self.withdraw_all(unpublish=False, bump=False)  # (ResetWatch bumped)
        self._publish_settled()
        # Releases of an older registration apply too: the channel no longer offers them
        # (nor publishes them again), and a location names one use of a block or slot.
        for event in self._channel.take_events():
            if event.kind == "published":
                self._stats.count("exported_blocks", len(event.locations))
            elif event.kind == "released":
                self._released(event.locations)
        self._update_gauges()

    def on_session_allocated(self, request_id: str, block_ids: list[int]) -> None:
        """vLLM admitted a streaming-input session (again: each chunk is admitted anew)
        with these blocks to write or load into: see ``_sessions``."""
        self._settle_finished()
        if not self._warned_sessions:
            self._warned_sessions = True
            logger.info("kvmkt: streaming-input session %s: blocks of sessions (and prefix "
                        "hits on them) are not exported", request_id)
        self._sessions.add(request_id)
        self._tainted.update(block_ids)

    def on_session_finished(self, request_id: str) -> None:
        self._sessions.discard(request_id)  # (its blocks stay tainted until reallocated)

    def on_blocks_given_anew(self, block_ids: list[int]) -> None:
        """vLLM allocated these blocks to a request that is not a session (our import's
        destination; the step's own allocations are handled in ``tick``): no stale hash."""
        self._settle_finished()
        if self._tainted:
            self._tainted.difference_update(block_ids)

    def _staging_slots(self) -> set[int]:
        return {s for _, slots, _, _ in self._staging.values() for s in slots}

    def _update_gauges(self) -> None:
        self._stats.gauge("exported_pages", len(self._listed))

    def withdraw_all(self, unpublish: bool = True, bump: bool = True) -> None:
        """Nothing published so far may be read any more (a cache reset)."""
        self._settle_finished()
        if self._gens is not None and bump:
            self._gens.bump_all()  # copies in flight fail their check
        self._cancelled.update(self._staging)
        self._waiting.clear()
        staging = self._staging_slots()
        locations = self._forget([i for i in self._listed if i not in staging])
        if locations and unpublish:
            self._channel.unpublish(locations)
        self._update_gauges()

    def stop_exporting(self) -> None:
        self._exporting = False
        self.withdraw_all()

    def shutdown(self) -> None:
        """Engine exit: our connection closing withdraws everything from the registry."""
        self._finished.clear()
        if self._gens is not None:
            self._gens.bump_all()
        self._channel.close()
        if self._gens is not None:
            self._gens.close()
