"""Scheduler side, importing: find a neighbour's prefix, lease it, plan the copy.

Loading is synchronous (``get_num_new_matched_tokens`` returns ``(n, False)``): the worker
copies the pages in ``start_load_kv`` on the current stream, before the forward that reads
them. A copy over NVLink or shared memory takes far less than the prefill it replaces, so
parking requests in WAITING_FOR_REMOTE_KVS (async) would buy nothing; sync loads also need
no per-layer hooks, which keeps full CUDA graphs usable.

A hit is capped at ``num_tokens - 1`` tokens, block-aligned: vLLM must still compute at
least one token to sample from. Every path that is unsure (no match, registry down, lease
lost, copy failed) answers 0 or reports the blocks as failed, so vLLM recomputes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.metadata import LoadJob
from kvmkt_connector.connector.registry_link import RegistryLink
from kvmkt_connector.hashing import PrefixKeys
from kvmkt_connector.logs import get_logger
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.registry.protocol import LeaseGranted

if TYPE_CHECKING:
    from vllm.v1.request import Request

logger = get_logger(__name__)

# Test-only corruptions of imported pages. (Permuting pages within a prefix would not do:
# keys carry their rotary position, so later tokens see the same set of keys in any order.)
FAULTS = ("zero", "first_page")


@dataclass
class _RequestImport:
    start_block: int  # the local prefix-cache frontier the lease was taken at
    lease: LeaseGranted | None
    keys: list[bytes]  # keys of the leased blocks
    epoch: int  # the registry connection that granted the lease
    imported_tokens: int = 0


class ImportPlanner:
    def __init__(
        self, cfg: MarketplaceConfig, block_size: int, link: RegistryLink, stats: MarketplaceStats,
        can_read: Callable[[bytes], bool],
    ) -> None:
        """``can_read(descriptor)``: whether our workers can copy from that holder."""
        self._can_read = can_read
        self._cfg = cfg
        self._block_size = block_size
        self._link = link
        self._stats = stats
        self._min_blocks = max(1, -(-cfg.min_import_tokens // block_size))
        self._requests: dict[str, _RequestImport] = {}
        self._pending: list[LoadJob] = []
        self._inflight: dict[int, tuple[int, int, str]] = {}  # job -> (epoch, lease, request)
        self._next_job = 0

    # ------------------------------------------------------------ lookup + lease

    def match(
        self, request: Request, keys: PrefixKeys, namespace: bytes, num_local_tokens: int
    ) -> int:
        """Tokens beyond ``num_local_tokens`` we will load; holds a lease on them."""
        bs = self._block_size
        start, limit = num_local_tokens // bs, (request.num_tokens - 1) // bs
        state = self._requests.get(request.request_id)
        if state is not None and state.lease is not None:
            if state.start_block == start and self._lease_fresh(state.lease):
                return len(state.lease.locations) * bs  # re-query of an unscheduled request
            self._release(state)  # stale: the frontier moved or the lease is ageing
        if limit - start < self._min_blocks:
            return 0
        candidates = keys.extend(request.all_token_ids, upto=limit * bs)[start:limit]
        self._stats.count("lookups")
        hint = self._link.hint(candidates)
        if hint < self._min_blocks:
            self._stats.count("fallback_miss")
            return 0
        ttl_ms = int(self._cfg.lease_ttl_s * 1000)
        own = self._link.own_holder_id
        grant = self._link.call(
            lambda c: c.lease(namespace, candidates[:hint], ttl_ms, self._min_blocks, own)
        )
        if grant is None:
            self._stats.count("fallback_miss")
            return 0
        if not self._can_read(grant.descriptor):  # e.g. its pages are on another transport
            self._link.call(lambda c: c.release_leases([grant.lease_id]))
            self._stats.count("fallback_incompatible")
            return 0
        n = len(grant.locations)
        self._stats.count("hits_full" if n == limit - start else "hits_partial")
        self._requests[request.request_id] = _RequestImport(
            start, grant, candidates[:n], self._link.epoch
        )
        return n * bs

    def _lease_fresh(self, lease: LeaseGranted) -> bool:
        left_s = (lease.expires_at_ns - time.monotonic_ns()) / 1e9
        return left_s > self._cfg.lease_margin_s

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

    def on_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        state = self._requests.get(request.request_id)
        if state is None or state.lease is None:
            return
        if num_external_tokens == 0:  # vLLM did not take our tokens this time
            self._release(state)
            return
        lease = state.lease
        n = min(num_external_tokens // self._block_size, len(lease.locations))
        dst = block_ids[state.start_block : state.start_block + n]
        fault = self._fault_for(request)
        if not self._lease_fresh(lease):
            fault = "lease_lost"  # the worker reports these blocks failed: recomputed
            self._stats.count("fallback_lease_lost")
        job = LoadJob(
            job_id=self._next_job,
            holder_id=lease.holder_id,
            descriptor=lease.descriptor,
            src=lease.locations[:n],
            dst=dst,
            keys=state.keys[:n],
            fault=fault,
        )
        self._next_job += 1
        self._pending.append(job)
        self._inflight[job.job_id] = (state.epoch, lease.lease_id, request.request_id)
        state.lease = None  # now owned by the in-flight job
        state.imported_tokens += n * self._block_size
        self._stats.count("imported_tokens", n * self._block_size)

    def _fault_for(self, request: Request) -> str | None:
        if not self._cfg.allow_fault_injection:
            return None
        params = request.kv_transfer_params or {}
        fault = params.get("kvmkt_fault")
        return fault if fault in FAULTS else None

    def take_jobs(self) -> list[LoadJob]:
        jobs, self._pending = self._pending, []
        return jobs

    def on_jobs_done(self, job_ids: list[int]) -> None:
        done = [self._inflight.pop(j) for j in job_ids if j in self._inflight]
        self._release_ids([(epoch, lease) for epoch, lease, _ in done])

    def has_pending_load(self, request_id: str) -> bool:
        """Whether a copy into this request's blocks is not confirmed done yet."""
        return any(rid == request_id for _, _, rid in self._inflight.values())

    def on_request_finished(self, request_id: str) -> int:
        """Release what the request still holds; return the tokens it imported."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return 0
        self._release(state)
        return state.imported_tokens

    def shutdown(self) -> None:
        leases = [(s.epoch, s.lease.lease_id) for s in self._requests.values() if s.lease]
        leases += [(epoch, lease) for epoch, lease, _ in self._inflight.values()]
        self._release_ids(leases)
        self._requests.clear()
        self._inflight.clear()
