"""Scheduler side, importing: find a neighbour's prefix, lease it, plan the copy.

Loading is asynchronous (``get_num_new_matched_tokens`` returns ``(n, True)``): vLLM
allocates the request's blocks and parks it in WAITING_FOR_REMOTE_KVS; the workers copy
the pages while other requests run and report the request in ``get_finished`` when the copy
is over, successful or not. Only a confirmed copy counts as imported. A failed one is
reported as load errors while the request is still parked: vLLM then keeps the valid prefix
(nothing of ours), caches nothing we wrote, and prefills the rest as for any new request.
A request whose import failed is not offered another one.

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
from kvmkt_connector.logs import get_logger, trace
from kvmkt_connector.metrics import MarketplaceStats
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
# what that check catches). Permuting pages would not do as a control: keys carry their
# rotary position, so later tokens see the same set of keys in any order.
FAULTS = ("zero", "first_page", "fail", "stall", "stall_unchecked")


@dataclass
class _RequestImport:
    start_block: int  # the local prefix-cache frontier the lease was taken at
    lease: LeaseGranted | None
    keys: list[bytes]  # keys of the usable leased blocks
    epoch: int  # the registry connection that granted the lease
    usable: int = 0  # leased blocks whose pages are still the published ones
    job_id: int | None = None  # the copy in flight
    imported_tokens: int = 0  # confirmed
    failed: bool = False  # an import failed: this request prefills from now on


@dataclass
class _Inflight:
    epoch: int
    lease_id: int
    request_id: str
    tokens: int
    blocks: int


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
        self._pending: list[LoadJob] = []
        self._inflight: dict[int, _Inflight] = {}  # by job id
        self._next_job = 0
        self.block_bytes = 0  # KV bytes of one block on all ranks (known after the handshake)
        # Whether our workers check each copied page's key (staged slots): then a lease's keys
        # must all be ours, not the holder's word (see _ours); set from the workers' transport.
        self.verify_all_keys = True

    # ------------------------------------------------------------ lookup + lease

    def match(
        self, request: Request, keys: PrefixKeys, namespace: bytes, num_local_tokens: int
    ) -> int:
        """Tokens beyond ``num_local_tokens`` we will load; holds a lease on them."""
        bs = self._block_size
        start, limit = num_local_tokens // bs, (request.num_tokens - 1) // bs
        limit = min(limit, start + MAX_LEASE_RUN)  # the most one lease covers
        state = self._requests.get(request.request_id)
        if state is not None:
            if state.failed or state.job_id is not None:
                return 0
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
        grant = self._lease(probe, keys, request, namespace, start, hint)
        if grant is None:
            self._stats.count("fallback_miss")
            return 0
        trace(logger, request.request_id, "granted")
        try:
            n = self._usable(grant.descriptor, grant.locations)
        except Exception as e:  # whatever a holder published: never into vLLM's scheduler
            logger.warning("kvmkt: holder %d's pages cannot be checked (%s); prefilling",
                           grant.holder_id, e)
            n = 0
        if n is None or n < self._min_blocks:  # another transport, or rewritten pages
            self._link.call(lambda c: c.release_leases([grant.lease_id]))
            self._stats.count("fallback_incompatible" if n is None else "fallback_miss")
            return 0
        trace(logger, request.request_id, f"leased {n}")
        self._stats.count("hits_full" if n == limit - start else "hits_partial")
        prev = self._requests.get(request.request_id)
        self._requests[request.request_id] = _RequestImport(
            start, grant, grant.keys[:n], self._link.epoch, n,
            imported_tokens=prev.imported_tokens if prev else 0,
        )
        return n * bs

    def _lease(
        self, probe: KeyProbe, keys: PrefixKeys, request: Request, namespace: bytes,
        start: int, hint: int,
    ) -> LeaseGranted | None:  # fmt: skip
        """Lease ``probe[:hint]`` by its last key (the holder's parent links give the rest);
        if that chain is not whole or not ours, lease the longest run of every key."""
        ttl_ms = int(self._cfg.lease_ttl_s * 1000)
        own = self._link.own_holder_id
        tail, head_parent = probe[hint - 1], probe.block_key(start - 1) if start else b""
        grant = self._link.call(
            lambda c: c.lease_chain(namespace, tail, hint, ttl_ms, head_parent, own)
        )
        if grant is not None:
            if (len(grant.keys) == len(grant.locations) == hint
                    and self._ours(grant, probe, keys, request, start)):
                return grant
            logger.warning("kvmkt: holder %d's parent links do not match the keys of request "
                           "%s; leasing by every key instead", grant.holder_id,
                           request.request_id)
            self._link.call(lambda c: c.release_leases([grant.lease_id]))
        limit = start + len(probe)
        candidates = keys.extend(request.all_token_ids, upto=limit * self._block_size)[start:limit]
        return self._link.call(
            lambda c: c.lease(namespace, candidates[:hint], ttl_ms, self._min_blocks, own)
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
        if state.lease is not None:
            self._release_ids([(state.epoch, state.lease.lease_id)])
            state.lease = None

    def _release_ids(self, leases: list[tuple[int, int]]) -> None:
        """Release leases of the current registry connection; older ones died with theirs."""
        ids = [lease_id for epoch, lease_id in leases if epoch == self._link.epoch]
        if ids:
            self._link.call(lambda c: c.release_leases(ids))

    # ------------------------------------------------------------ plan

    def on_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int) -> LoadJob | None:
        """vLLM allocated the request's blocks: the copy job for them, if we still load."""
        state = self._requests.get(request.request_id)
        if state is None or state.lease is None:
            return None
        if num_external_tokens == 0:  # vLLM did not take our tokens this time
            self._release(state)
            return None
        lease = state.lease
        n = min(num_external_tokens // self._block_size, state.usable)
        fault, stall_s = self._fault_for(request)
        job = LoadJob(
            job_id=self._next_job,
            request_id=request.request_id,
            holder_id=lease.holder_id,
            descriptor=lease.descriptor,
            src=lease.locations[:n],
            dst=block_ids[state.start_block : state.start_block + n],
            keys=state.keys[:n],
            fault=fault,
            stall_s=stall_s,
        )
        self._next_job += 1
        self._pending.append(job)
        trace(logger, request.request_id, "allocated")
        self._inflight[job.job_id] = _Inflight(
            state.epoch, lease.lease_id, request.request_id, n * self._block_size, n
        )
        state.lease, state.job_id = None, job.job_id  # the lease is the job's now
        return job

    def _fault_for(self, request: Request) -> tuple[str | None, float]:
        if not self._cfg.allow_fault_injection:
            return None, 0.0
        params = request.kv_transfer_params or {}
        fault = params.get("kvmkt_fault")
        if fault not in FAULTS:
            return None, 0.0
        return fault, float(params.get("kvmkt_stall_s", 0.0))

    def take_jobs(self) -> list[LoadJob]:
        jobs, self._pending = self._pending, []
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

    def has_pending_load(self, request_id: str) -> bool:
        """Whether a copy into this request's blocks is not confirmed done yet."""
        return any(job.request_id == request_id for job in self._inflight.values())

    def on_request_finished(self, request_id: str) -> int:
        """Release what the request still holds; return the tokens it imported. A copy
        still in flight (an abort) keeps its lease until the workers report it."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return 0
        self._release(state)
        return state.imported_tokens

    def shutdown(self) -> None:
        leases = [(s.epoch, s.lease.lease_id) for s in self._requests.values() if s.lease]
        leases += [(job.epoch, job.lease_id) for job in self._inflight.values()]
        self._release_ids(leases)
        self._requests.clear()
        self._inflight.clear()
