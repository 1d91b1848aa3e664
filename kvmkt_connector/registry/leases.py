"""``LeaseBook``: the registry's leases by id, deadline and owner, within fixed bounds.

A lease costs the registry a record plus a reference per leased block, and keeps another
instance's entries from being released. Unbounded, one client asking for 10-minute leases
in a loop grows the registry without limit (a probe: +179 MiB for 600 leases of 20k
blocks), so a lease that would put its owner (one connection) or everyone over
``LeaseLimits`` is refused with ``lease_limit``; the connector's importer takes that as "no
match" and prefills normally. Leases end on release, at their deadline, with their holder,
or with the connection that took them (``pop_owner``: nobody is left to release them).

Only the books are kept here; what a lease does to entries is ``PrefixRegistry``'s.
"""

from __future__ import annotations

import heapq
import secrets
from collections.abc import Sequence

import msgspec

from .protocol import LEASE_LIMIT
from .records import Entry, Holder, Lease, RequestRejected

# A scheduler holds one lease per request it is admitting or loading into. vLLM 0.26 admits
# requests that load asynchronously outside max_num_seqs and the token budget, so a burst of
# requests on one shared prefix can hold thousands at once (each over at most its KV cache's
# blocks). Worst case about 16 bytes of registry memory per leased block, i.e. ~16 MiB per
# connection and ~64 MiB in all, plus ~0.3 KiB per lease (~20 MiB at the total bound).
MAX_LEASES_PER_CONNECTION = 16_384
MAX_LEASED_BLOCKS_PER_CONNECTION = 1 << 20
MAX_LEASES = 65_536
MAX_LEASED_BLOCKS = 1 << 22
MAX_LEASE_TTL_MS = 10 * 60 * 1000  # a lease pins another instance's pages: keep it bounded
# Blocks of one lease (4M tokens at block size 16): its reply (~27 bytes a block: location
# and key) must fit a frame, and a chain walk must stay short whatever links a holder sent.
MAX_LEASE_RUN = 1 << 18


def check_lease_terms(ttl_ms: int, min_blocks: int) -> None:
    if not 0 < ttl_ms <= MAX_LEASE_TTL_MS:
        raise RequestRejected("bad_request", f"ttl_ms must be in 1..{MAX_LEASE_TTL_MS}")
    if min_blocks < 1:
        raise RequestRejected("bad_request", f"min_blocks must be >= 1, got {min_blocks}")


class LeaseLimits(msgspec.Struct, frozen=True):
    per_owner_leases: int = MAX_LEASES_PER_CONNECTION
    per_owner_blocks: int = MAX_LEASED_BLOCKS_PER_CONNECTION
    total_leases: int = MAX_LEASES
    total_blocks: int = MAX_LEASED_BLOCKS


class _Usage:
    __slots__ = ("lease_ids", "blocks")

    def __init__(self) -> None:
        self.lease_ids: set[int] = set()
        self.blocks = 0


class LeaseBook:
    def __init__(self, limits: LeaseLimits) -> None:
        self.limits = limits
        self.leased_blocks = 0  # sum of the active leases' lengths
        self._leases: dict[int, Lease] = {}
        self._heap: list[tuple[int, int]] = []  # (deadline, id); ended ones linger lazily
        self._owners: dict[int, _Usage] = {}
        # Lease ids start at a random 62-bit value: an importer that kept an id across a
        # registry restart must not release somebody else's lease with it.
        self._next_id = secrets.randbits(62)

    def __len__(self) -> int:
        return len(self._leases)

    def owner_leases(self, owner: int) -> int:
        usage = self._owners.get(owner)
        return len(usage.lease_ids) if usage else 0

    @property
    def heap_size(self) -> int:
        return len(self._heap)

    def check(self, owner: int, blocks: int) -> None:
        """Refuse (``lease_limit``) a lease of ``blocks`` that would cross a bound."""
        lim, usage = self.limits, self._owners.get(owner) or _Usage()
        over = [
            (len(usage.lease_ids) + 1 > lim.per_owner_leases,
             f"this connection holds {len(usage.lease_ids)} leases (at most {lim.per_owner_leases})"),
            (usage.blocks + blocks > lim.per_owner_blocks,
             f"this connection holds leases on {usage.blocks} blocks, {blocks} more would "
             f"exceed {lim.per_owner_blocks}"),
            (len(self._leases) + 1 > lim.total_leases,
             f"{len(self._leases)} leases are active (at most {lim.total_leases})"),
            (self.leased_blocks + blocks > lim.total_blocks,
             f"leases cover {self.leased_blocks} blocks, {blocks} more would exceed "
             f"{lim.total_blocks}"),
        ]  # fmt: skip
        for crossed, why in over:
            if crossed:
                raise RequestRejected(LEASE_LIMIT, f"{why}: release leases first")

    def add(self, holder: Holder, entries: list[Entry], expires_at_ns: int, owner: int) -> Lease:
        lease = Lease(self._next_id, holder, entries, expires_at_ns, owner)
        self._next_id += 1
        self._leases[lease.lease_id] = lease
        usage = self._owners.setdefault(owner, _Usage())
        usage.lease_ids.add(lease.lease_id)
        usage.blocks += len(entries)
        self.leased_blocks += len(entries)
        heapq.heappush(self._heap, (expires_at_ns, lease.lease_id))
        return lease

    def pop(self, lease_id: int) -> Lease | None:
        """Forget an active lease (None if unknown or already ended)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return None
        usage = self._owners[lease.owner]
        usage.lease_ids.discard(lease_id)
        usage.blocks -= len(lease.entries)
        if not usage.lease_ids:
            del self._owners[lease.owner]
        self.leased_blocks -= len(lease.entries)
        # Ended leases stay in the heap until their deadline; when they outnumber the live
        # ones (leases released early, long TTLs) drop them, or the heap grows without bound.
        if len(self._heap) > 2 * len(self._leases) + 64:
            self._heap = [item for item in self._heap if item[1] in self._leases]
            heapq.heapify(self._heap)
        return lease

    def pop_expired(self, now_ns: int) -> list[Lease]:
        heap, out = self._heap, []
        while heap and heap[0][0] <= now_ns:
            lease = self.pop(heapq.heappop(heap)[1])
            heap = self._heap  # pop() may have compacted it
            if lease is not None:
                out.append(lease)
        return out

    def pop_owner(self, owner: int) -> list[Lease]:
        usage = self._owners.get(owner)
        ids: Sequence[int] = sorted(usage.lease_ids) if usage else ()
        return [lease for lease in map(self.pop, ids) if lease is not None]
