"""Scheduler side, importing: find a neighbour's prefix, lease it, plan the copy.

Loading is asynchronous (``get_num_new_matched_tokens`` returns ``(n, True)``): vLLM
allocates the request's blocks and parks it in WAITING_FOR_REMOTE_KVS; the workers copy
the pages while other requests run and report the request in ``get_finished`` when the copy
is over, successful or not. Only a confirmed copy counts as imported. A failed one is
reported as load errors while the request is still parked: vLLM then keeps the valid prefix
(nothing of ours), caches nothing we wrote, and prefills the rest as for any new request.
A request whose import failed is not offered another one.

The lease overlaps vLLM's allocation: ``match`` answers the shared-memory table's bound and
posts the lease; the reply is read when the step's jobs are made (``take_jobs``), after
vLLM allocated the blocks. Should the grant come back shorter (a holder evicted blocks in
between, or its pages changed), the job copies what was granted and reports the rest as
load errors: vLLM then caches the copied prefix and prefills the rest, as after a failure.

A hit is capped at ``num_tokens - 1`` tokens, block-aligned: vLLM must still compute at
least one token to sample from. Every path that is unsure (no match, registry down, stale
pages, copy failed) answers 0 or reports the blocks failed, so vLLM recomputes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.metadata import LoadJob
from kvmkt_connector.connector.registry_link import RegistryLink
from kvmkt_connector.hashing import KeyProbe, PrefixKeys
from kvmkt_connector.logs import get_logger, trace, trace_wait, waits_traced
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.registry.client import PendingReply
from kvmkt_connector.registry.leases import MAX_LEASE_RUN
from kvmkt_connector.registry.protocol import LeaseGranted

if TYPE_CHECKING:
    from vllm.v1.request import Request

logger = get_logger(__name__)

# Test-only faults (``allow_fault_injection``). Corruptions, for negative controls: "zero"
# blanks the imported pages, "first_page" copies the holder's first page everywhere (the
# prototype's bug). Failure paths: "fail" reports the copy failed without copying; "stall"
# issues the copy ``kvmkt_stall_s`` later (an exporter can die or rewrite the pages in
# between); "stall_unchecked" does the same but skips the tag check after the copy (it shows
# what that check catches). "short" uses half the lease, as when a lease comes back shorter
# than the table promised. Permuting pages would not do as a control: keys carry their
# rotary position, so later tokens see the same set of keys in any order.
FAULTS = ("zero", "first_page", "fail", "stall", "stall_unchecked", "short")
_WAIT_AFTER_EMPTY_S = 60.0  # after a promise whose lease gave nothing: lookups wait this long


@dataclass
class _LeaseAsked:
    """A LeaseChain posted by ``match``, read once vLLM allocated (or asked again)."""

    reply: PendingReply
    request: Request
    probe: KeyProbe
    keys: PrefixKeys
    namespace: bytes
    limit: int  # the most blocks the request could import


@dataclass
class _RequestImport:
    start_block: int  # the local prefix-cache frontier the lease was taken at
    lease: LeaseGranted | None
    keys: list[bytes]  # keys of the usable leased blocks
    epoch: int  # the registry connection that granted the lease
    usable: int = 0  # leased blocks whose pages are still the published ones (asked: promised)
    job_id: int | None = None  # the copy planned or in flight
    imported_tokens: int = 0  # confirmed
    # the last confirmed import (see ``exported_keys``)
    confirmed: ConfirmedImport | None = None
    failed: bool = False  # an import failed: this request prefills from now on
    asked: _LeaseAsked | None = None  # the lease reply not read yet


@dataclass(frozen=True)
class ConfirmedImport:
    """What a confirmed copy wrote: the lease's keys for blocks ``first ..`` of the request,
    copied into ``dst``. ``verified``: every key was checked against ours (staged slots), so
    they are the request's own keys at those positions whatever block holds them later.
    Otherwise (in place: spot checks) a key stands only for the page copied under it:
    ``locations`` are ``dst``'s tags right after the copy (None: not known), and a block
    still tagged so still holds that page."""

    first: int
    keys: list[bytes]
    dst: list[int]
    verified: bool
    locations: list[int] | None


@dataclass
class _Planned:
    job_id: int
    request_id: str
    dst: list[int]
    fault: tuple[str | None, float, int]  # test faults only: fault, stall, TP rank (-1: all)


@dataclass
class _Inflight:
    epoch: int
    lease_id: int | None  # None: nothing was leased (the job only reports its blocks)
    request_id: str
    tokens: int
    blocks: int
    start_block: int = 0
    keys: list[bytes] | None = None  # of the blocks copied
    dst: list[int] | None = None  # where they were copied


class ImportPlanner:
    def __init__(
        self, cfg: MarketplaceConfig, block_size: int, link: RegistryLink, stats: MarketplaceStats,
        usable: Callable[[bytes, list[int]], int | None],
    ) -> None:
        """``usable(descriptor, locations)``: how many leading pages of that holder are still
        the published ones (0 if stale); None if our workers cannot read that holder."""
        self._usable = usable
        self._cfg = cfg
        self._block_size = block_size
        self._link = link
        self._stats = stats
        self._min_blocks = max(1, -(-cfg.min_import_tokens // block_size))
        self._requests: dict[str, _RequestImport] = {}
        self._planned: list[_Planned] = []  # allocated this step; jobs made in take_jobs
        self._wait_for_leases_until = 0.0  # (monotonic) see take_jobs
        self._inflight: dict[int, _Inflight] = {}  # by job id
        self._next_job = 0
        self.block_bytes = 0  # KV bytes of one block on all ranks (known after the handshake)
        # Whether our workers check each copied page's key (staged slots): then a lease's keys
        # must all be ours, not the holder's word (see _ours); set from the workers' transport.
        self.verify_all_keys = True
        # In place: the current tags of our blocks (the export's generation table), to tell
        # later whether a confirmed import's blocks still hold what it copied.
        self.block_locations: Callable[[list[int]], list[int]] | None = None
        self._trace_waits = waits_traced()

    # ------------------------------------------------------------ lookup + lease

    def match(
        self, request: Request, keys: PrefixKeys, namespace: bytes, num_local_tokens: int
    ) -> int:
        """Tokens beyond ``num_local_tokens`` we will load: the table's bound, with the lease
        asked for (read in ``take_jobs``), or, asked again, what the lease granted."""
        bs = self._block_size
        start, limit = num_local_tokens // bs, (request.num_tokens - 1) // bs
        limit = min(limit, start + MAX_LEASE_RUN)  # the most one lease covers
        state = self._requests.get(request.request_id)
        if state is not None:
            if state.failed or state.job_id is not None:
                return 0
            if state.asked is not None:
                self._settle(state)  # not admitted last time: the reply is in by now
            if state.lease is not None:
                if state.start_block == start and self._lease_fresh(state):
                    return state.usable * bs  # re-query of a request not admitted yet
                self._release(state)  # stale: frontier moved, lease ageing or gone
        if limit - start < self._min_blocks:
            return 0
        trace(logger, request.request_id, "lookup")
        probe = keys.probe(request.all_token_ids, start, limit)
        self._stats.count("lookups")
        hint = self._link.hint(probe)  # bisects: hashes only the keys it looks at
        trace(logger, request.request_id, "keyed")
        if hint is None:  # no registry: counted as such, not as a miss
            return 0
        if hint < self._min_blocks:
            self._stats.count("fallback_miss")
            return 0
        own = self._link.own_holder_id
        ttl_ms = int(self._cfg.lease_ttl_s * 1000)
        tail, head_parent = probe[hint - 1], probe.block_key(start - 1) if start else b""
        reply = self._link.call(
            lambda c: c.post_lease_chain(namespace, tail, hint, ttl_ms, head_parent, own)
        )
        if reply is None:
            return 0
        prev = self._requests.get(request.request_id)
        state = _RequestImport(
            start, None, [], self._link.epoch, hint,
            imported_tokens=prev.imported_tokens if prev else 0,
            asked=_LeaseAsked(reply, request, probe, keys, namespace, limit - start),
        )  # fmt: skip
        self._requests[request.request_id] = state
        # The hint is no bound without a table; and after a promise came back empty, a miss
        # costs less when it is known now than after a step parked in WAITING_FOR_REMOTE_KVS.
        if not self._link.has_table() or time.monotonic() < self._wait_for_leases_until:
            self._settle(state)
            return state.usable * bs if state.lease is not None else 0
        return hint * bs

    def _settle(self, state: _RequestImport) -> None:
        """Read the lease asked for; keep the part whose pages are still the published ones
        (``state.lease`` None: nothing usable)."""
        asked, state.asked = state.asked, None
        assert asked is not None
        request, hint = asked.request, state.usable
        state.usable, state.keys = 0, []
        if self._trace_waits:
            t0, c0 = time.monotonic_ns(), time.thread_time_ns()
            reply = self._link.result(asked.reply)
            trace_wait(logger, f"lease-reply:{request.request_id}", t0, c0)
        else:
            reply = self._link.result(asked.reply)
        trace(logger, request.request_id, "granted")
        chain = reply if isinstance(reply, LeaseGranted) else None
        grant = self._checked(chain, asked, state, hint)
        if grant is not chain:  # leased anew, on the connection we have now
            state.epoch = self._link.epoch
        if grant is None:
            self._stats.count("fallback_miss")
            return
        try:
            n = self._usable(grant.descriptor, grant.locations)
        except Exception as e:  # whatever a holder published: never into vLLM's scheduler
            logger.warning("kvmkt: holder %d's pages cannot be checked (%s); prefilling",
                           grant.holder_id, e)
            n = 0
        if n is None or n < self._min_blocks:  # another transport, or rewritten pages
            self._release_ids([(state.epoch, grant.lease_id)])
            self._stats.count("fallback_incompatible" if n is None else "fallback_miss")
            return
        n = min(n, hint)
        trace(logger, request.request_id, f"leased {n}")
        self._stats.count("hits_full" if n == asked.limit else "hits_partial")
        state.lease, state.keys, state.usable = grant, grant.keys[:n], n

    def _checked(
        self, grant: LeaseGranted | None, asked: _LeaseAsked, state: _RequestImport, hint: int
    ) -> LeaseGranted | None:  # fmt: skip
        """The chain lease if it is whole and ours; else the longest run leased by every key
        (the holder's parent links give the chain: see ``_ours``)."""
        request, probe, keys, start = asked.request, asked.probe, asked.keys, state.start_block
        if grant is not None:
            if (len(grant.keys) == len(grant.locations) == hint
                    and self._ours(grant, probe, keys, request, start)):
                return grant
            logger.warning("kvmkt: holder %d's parent links do not match the keys of request "
                           "%s; leasing by every key instead", grant.holder_id,
                           request.request_id)
            self._release_ids([(state.epoch, grant.lease_id)])
        ttl_ms = int(self._cfg.lease_ttl_s * 1000)
        own = self._link.own_holder_id
        limit = start + len(probe)
        candidates = keys.extend(request.all_token_ids, upto=limit * self._block_size)[start:limit]
        return self._link.call(
            lambda c: c.lease(asked.namespace, candidates[:hint], ttl_ms, self._min_blocks, own)
        )

    def _ours(self, grant: LeaseGranted, probe: KeyProbe, keys: PrefixKeys, request: Request,
              start: int) -> bool:
        """Whether a chain grant names our keys. An honest holder's links from our tail key
        are our keys (a key commits to its prefix), and a holder is trusted as far as its key
        -> page entries are. Copies that check each page's key (``verify_all_keys``: staged
        slots) need every key to be ours, so they are all computed; in-place copies get spot
        checks (every block below 16, else 9 to 12 of them), which catch links mixed up
        anywhere but between two of them."""
        n = len(grant.keys)
        if self.verify_all_keys:
            mine = keys.extend(request.all_token_ids, upto=(start + n) * self._block_size)
            return grant.keys == mine[start : start + n]
        return all(grant.keys[i] == probe[i] for i in {n - 1, *range(0, n, max(1, n // 8))})

    def _lease_fresh(self, state: _RequestImport) -> bool:
        """Leases only steer (pages are checked after the copy); re-lease an ageing one, or
        one of a closed registry connection (its leases ended with it), so the holder's
        entries are not released under a request about to load."""
        lease = state.lease
        return (lease is not None and state.epoch == self._link.epoch
                and lease.expires_at_ns - time.monotonic_ns() > 0.5 * self._cfg.lease_ttl_s * 1e9)

    def _release(self, state: _RequestImport) -> None:
        if state.asked is not None:  # asked, never used: read the reply to end its lease
            reply, state.asked = self._link.result(state.asked.reply), None
            if isinstance(reply, LeaseGranted):
                self._release_ids([(state.epoch, reply.lease_id)])
        if state.lease is not None:
            self._release_ids([(state.epoch, state.lease.lease_id)])
            state.lease = None

    def _release_ids(self, leases: list[tuple[int, int | None]]) -> None:
        """Release leases of the current registry connection (older ones died with theirs),
        without waiting for the registry's answer."""
        ids = [i for epoch, i in leases if epoch == self._link.epoch and i is not None]
        self._link.release_later(ids)

    # ------------------------------------------------------------ plan

    def on_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int
                 ) -> list[int] | None:  # fmt: skip
        """vLLM allocated the request's blocks: plan the copy into them (the job is made in
        ``take_jobs``, once the lease is read); returns the blocks it may write."""
        state = self._requests.get(request.request_id)
        if state is None or (state.lease is None and state.asked is None):
            return None
        if num_external_tokens == 0:  # vLLM did not take our tokens this time
            self._release(state)
            return None
        n = min(num_external_tokens // self._block_size, state.usable)
        dst = block_ids[state.start_block : state.start_block + n]
        self._planned.append(
            _Planned(self._next_job, request.request_id, dst, self._fault_for(request))
        )
        state.job_id = self._next_job
        self._next_job += 1
        trace(logger, request.request_id, "allocated")
        return dst

    def _fault_for(self, request: Request) -> tuple[str | None, float, int]:
        if not self._cfg.allow_fault_injection:
            return None, 0.0, -1
        params = request.kv_transfer_params or {}
        fault = params.get("kvmkt_fault")
        if fault not in FAULTS:
            return None, 0.0, -1
        try:
            return (fault, float(params.get("kvmkt_stall_s", 0.0)),
                    int(params.get("kvmkt_fault_rank", -1)))
        except (TypeError, ValueError):  # never let a malformed test parameter into vLLM
            return None, 0.0, -1

    def take_jobs(self) -> list[LoadJob]:
        """This step's copy jobs. A lease shorter than what vLLM allocated for (the table's
        bound promised more) copies its part; the rest of ``dst`` is reported as load errors
        and vLLM prefills it."""
        planned, self._planned = self._planned, []
        jobs = []
        for plan in planned:
            state = self._requests.get(plan.request_id)
            if state is None:  # (not in vLLM: a request ends between steps, not inside one)
                continue
            if state.asked is not None:
                self._settle(state)
            lease, n = state.lease, min(len(plan.dst), state.usable)
            if lease is None:
                n = 0
            elif plan.fault[0] == "short":
                n //= 2
            if n < len(plan.dst):
                logger.info("kvmkt: request %s: %d of the %d blocks promised are leased; the "
                            "rest is prefilled", plan.request_id, n, len(plan.dst))
            if n == 0:
                # vLLM gets every block back and, with nothing computed, would ask us again:
                # this request prefills from now on, and for a while lookups wait for their
                # lease (a neighbour we cannot read would otherwise be promised every time).
                state.failed = True
                self._wait_for_leases_until = time.monotonic() + _WAIT_AFTER_EMPTY_S
            fault, stall_s, fault_rank = plan.fault if n else (None, 0.0, -1)
            jobs.append(LoadJob(
                job_id=plan.job_id,
                request_id=plan.request_id,
                holder_id=lease.holder_id if lease else -1,
                descriptor=lease.descriptor if lease else b"",
                src=lease.locations[:n] if lease else [],
                dst=plan.dst,
                keys=state.keys[:n],
                fault=fault,
                stall_s=stall_s,
                fault_rank=fault_rank,
            ))  # fmt: skip
            self._inflight[plan.job_id] = _Inflight(
                state.epoch, lease.lease_id if lease else None, plan.request_id,
                n * self._block_size, n, state.start_block, state.keys[:n], plan.dst[:n],
            )  # fmt: skip
            state.lease = None  # the lease is the job's now
        return jobs

    def on_jobs_done(self, job_ids: list[int], failed: bool = False) -> None:
        """Every worker reported these jobs (any failure on any rank makes one failed)."""
        done = [(j, self._inflight.pop(j)) for j in job_ids if j in self._inflight]
        self._release_ids([(job.epoch, job.lease_id) for _, job in done])
        for job_id, job in done:
            trace(logger, job.request_id, "failed" if failed else "confirmed")
            state = self._requests.get(job.request_id)
            if failed:
                self._stats.count("fallback_load_error", job.blocks)
            else:
                self._stats.count("imported_tokens", job.tokens)
                self._stats.count("imported_bytes", job.blocks * self.block_bytes)
            if state is not None and state.job_id == job_id:
                state.job_id = None
                state.failed = state.failed or failed
                state.imported_tokens += 0 if failed else job.tokens
                if not failed and job.blocks and job.keys is not None and job.dst is not None:
                    tags = self.block_locations
                    state.confirmed = ConfirmedImport(
                        job.start_block, job.keys, job.dst, self.verify_all_keys,
                        tags(job.dst) if tags is not None else None,
                    )  # fmt: skip

    def has_pending_load(self, request_id: str) -> bool:
        """Whether a copy into this request's blocks is not confirmed done yet."""
        return any(job.request_id == request_id for job in self._inflight.values()) or any(
            plan.request_id == request_id for plan in self._planned
        )

    def on_request_finished(self, request_id: str) -> tuple[int, ConfirmedImport | None]:
        """Release what the request still holds; return the tokens it imported and
        ``exported_keys``. A copy still in flight (an abort) keeps its lease until the
        workers report it."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return 0, None
        self._release(state)
        return state.imported_tokens, self.exported_keys(state)

    def exported_keys(self, state: _RequestImport) -> ConfirmedImport | None:
        """Keys the export of this request may take as they are, without hashing its prompt
        again: those of its last confirmed import. They are the lease's, checked against
        ours as that copy required (all of them for staged slots, spot checks for in-place
        pages: see ``_ours``), so re-offering the imported pages under them trusts the
        holder no further than importing them did; the ledger uses an unverified key only
        for the very page copied under it (``ConfirmedImport``), never for a block the
        request computed itself after a preemption."""
        return state.confirmed

    def shutdown(self) -> None:
        """Our registry connection closes next, which ends its leases (asked ones too)."""
        leases = [(s.epoch, s.lease.lease_id) for s in self._requests.values() if s.lease]
        leases += [(job.epoch, job.lease_id) for job in self._inflight.values()]
        self._release_ids(leases)
        self._requests.clear()
        self._inflight.clear()
        self._planned.clear()
