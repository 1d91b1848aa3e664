"""``PrefixRegistry``: the registry's authoritative state, as a pure in-memory state machine.

No I/O here, so every rule is unit-testable and the service stays a thin dispatcher. Every
operation costs O(keys or entries it touches); nothing is rebuilt or rewritten wholesale.

Structures:
- ``_listing[namespace][key][holder_id] -> Entry``: the live, non-retiring entries, which
  are what lookups see.
- ``holder.by_location[location] -> Entry``: every entry of a holder, including retiring
  ones (unpublished or replaced while leased) whose location must stay reserved.
- ``_lru`` (global) and ``holder.lru``: listed entries, least recently published or leased
  first. Capacity eviction and ``reclaim`` take unleased entries from the front; a leased
  one found there is moved to the back instead (it is in use), so each is skipped once.
- ``_book`` (``leases.LeaseBook``): lease id -> entries, deadline (``clock()`` ns) and
  owner (a connection), within ``LeaseLimits``; expired leases are ended lazily at the start
  of every operation and by the service's sweep, an owner's when its connection closes.
- ``holder.released``: locations the registry let go of (capacity eviction, ended leases of
  retiring entries, replacements), handed to the holder in its next reply that carries
  ``released``. An ordered dict, so a location re-published before delivery is withdrawn.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from . import records
from .leases import MAX_LEASE_RUN, LeaseBook, LeaseLimits, check_lease_terms
from .protocol import MAX_HOLDERS, HolderInfo, LeaseGranted
from .records import Entry, Holder, KeyListener, Lease, RegistryCounters, RequestRejected


class PrefixRegistry:
    """Holders, their (key -> location) entries, leases and the capacity bound."""

    def __init__(
        self,
        capacity_blocks: int,
        *,
        clock: Callable[[], int] = time.monotonic_ns,
        listener: KeyListener | None = None,
        lease_limits: LeaseLimits | None = None,
    ) -> None:
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self.counters = RegistryCounters()
        self._clock = clock
        self._listener = listener
        self._holders: dict[int, Holder] = {}
        self._free_bits = list(range(MAX_HOLDERS - 1, -1, -1))  # pop() gives the lowest
        self._next_holder_id = 1
        self._listing: dict[bytes, dict[bytes, dict[int, Entry]]] = {}
        self._listed_total = 0
        self._lru: OrderedDict[Entry, None] = OrderedDict()
        self._book = LeaseBook(lease_limits or LeaseLimits())

    # ------------------------------------------------------------ views

    @property
    def published_blocks(self) -> int:
        return self._listed_total

    @property
    def active_leases(self) -> int:
        return len(self._book)

    @property
    def leases(self) -> LeaseBook:
        return self._book

    @property
    def holder_count(self) -> int:
        return len(self._holders)

    def holder(self, holder_id: int) -> Holder:
        holder = self._holders.get(holder_id)
        if holder is None:
            raise RequestRejected("not_holder", f"holder {holder_id} is not registered")
        return holder

    def holders(self) -> list[Holder]:
        return list(self._holders.values())

    def holder_bits(self, namespace: bytes, key: bytes) -> list[int]:
        """Bits of the holders listing ``key`` now."""
        holders = self._listing.get(namespace, {}).get(key)
        return [entry.holder.bit for entry in holders.values()] if holders else []

    def holder_infos(self) -> list[HolderInfo]:
        return [
            HolderInfo(h.holder_id, h.name, h.pid, h.namespace, h.fingerprint, h.listed, h.leased)
            for h in self._holders.values()
        ]

    # ------------------------------------------------------------ holders

    def register_holder(
        self, *, namespace: bytes, name: str, pid: int, fingerprint: bytes = b"",
        descriptor: bytes = b"", cleanup_paths: Sequence[str] = (),
    ) -> Holder:  # fmt: skip
        records.check_namespace(namespace)
        if not self._free_bits:
            raise RequestRejected("full", f"the registry already has {MAX_HOLDERS} holders")
        holder = Holder(
            self._next_holder_id, self._free_bits.pop(), name, pid, bytes(namespace),
            bytes(fingerprint), bytes(descriptor), list(cleanup_paths),
        )  # fmt: skip
        self._next_holder_id += 1
        self._holders[holder.holder_id] = holder
        return holder

    def drop_holder(self, holder_id: int) -> Holder | None:
        """Forget a holder (its connection closed or its process died) and all its entries.

        Leases on its entries are dropped too (they were all on this holder); no location is
        queued for release since nobody is left to receive it. Its bit becomes reusable.
        """
        holder = self._holders.pop(holder_id, None)
        if holder is None:
            return None
        for entry in holder.by_location.values():
            if not entry.retiring:
                self._unlist(entry)
            entry.dead = True
        holder.by_location.clear()
        holder.released.clear()
        for lease_id in holder.lease_ids:
            self._book.pop(lease_id)  # nothing to end: its entries went with the holder
        holder.lease_ids.clear()
        self._free_bits.append(holder.bit)
        self._free_bits.sort(reverse=True)
        self.counters.holders_lost += 1
        return holder

    # ------------------------------------------------------------ publishing

    def publish(
        self, holder_id: int, keys: Sequence[bytes], locations: Sequence[int],
        parents: Sequence[bytes] = (),
    ) -> tuple[int, list[int]]:  # fmt: skip
        """List ``keys[i]`` at ``locations[i]``; return (accepted, locations released now).
        ``parents[i]``: the key before ``keys[i]`` in its prefix (see ``lease_chain``)."""
        holder = self.holder(holder_id)
        if len(keys) != len(locations):
            raise RequestRejected("bad_request", f"{len(keys)} keys but {len(locations)} locations")
        records.check_keys(keys)
        records.check_locations(locations)
        records.check_parents(parents, keys)
        self._expire()
        hid = holder.holder_id
        batch: list[Entry] = []
        for i, (key, location) in enumerate(zip(keys, locations, strict=True)):
            # Looked up afresh each time: unlisting may drop an emptied namespace's dict.
            ns_listing = self._listing.get(holder.namespace)
            holders_of_key = ns_listing.get(key) if ns_listing else None
            current = holders_of_key.get(hid) if holders_of_key else None
            if current is not None and current.location == location:
                if parents:
                    current.parent = parents[i]
                self._lru.move_to_end(current)  # a re-publish counts as a use
                holder.lru.move_to_end(current)
                batch.append(current)
                continue
            occupant = holder.by_location.get(location)
            if occupant is not None:
                # The holder put a new block at a location we still list (or keep reserved
                # for a lease): the old entry is stale. Not released: the location is in use.
                self._forget(occupant)
            if current is not None:  # same key at a new location: the old one goes
                self._withdraw(current)
            holder.released.pop(location, None)  # re-used before we told it: not released
            entry = Entry(holder, key, location, parents[i] if parents else b"")
            holder.by_location[location] = entry
            self._list(entry)
            batch.append(entry)
        self._evict_over_capacity()
        accepted = sum(1 for entry in batch if not entry.dead and not entry.retiring)
        return accepted, self.take_released(holder)

    def unpublish(self, holder_id: int, locations: Sequence[int]) -> tuple[list[int], int]:
        """Withdraw entries; return (released now, how many wait for their leases to end)."""
        holder = self.holder(holder_id)
        self._expire()
        pending = 0
        for location in locations:
            entry = holder.by_location.get(location)
            if entry is None:
                continue
            if entry.retiring:
                pending += 1
                continue
            self._withdraw(entry)
            pending += entry.retiring
        return self.take_released(holder), pending

    def reclaim(self, holder_id: int, count: int) -> list[int]:
        """Release up to ``count`` of the holder's least recently used, unleased entries."""
        holder = self.holder(holder_id)
        if count < 0:
            raise RequestRejected("bad_request", f"count must be >= 0, got {count}")
        self._expire()
        self._release_unleased(holder.lru, count)
        return self.take_released(holder)

    def sync(self, holder_id: int) -> list[int]:
        holder = self.holder(holder_id)
        self._expire()
        return self.take_released(holder)

    def take_released(self, holder: Holder) -> list[int]:
        released = list(holder.released)
        holder.released.clear()
        return released

    # ------------------------------------------------------------ lookups and leases

    def longest_run(
        self, namespace: bytes, keys: Sequence[bytes], exclude_holder: int | None = None
    ) -> tuple[int | None, int]:
        """(holder_id, n): the longest run ``keys[:n]`` that one holder lists entirely."""
        self.counters.lookups += 1
        self._expire()
        holder, run = self._best_run(namespace, keys, exclude_holder)
        return (holder.holder_id if holder else None), run

    def lease(
        self, namespace: bytes, keys: Sequence[bytes], ttl_ms: int, min_blocks: int = 1,
        exclude_holder: int | None = None, owner: int = 0,
    ) -> LeaseGranted | None:  # fmt: skip
        """Lease the longest run if it has at least ``min_blocks`` entries, else None.
        ``owner``: who takes it (a connection); over its ``LeaseLimits``: ``lease_limit``."""
        check_lease_terms(ttl_ms, min_blocks)
        self.counters.lease_requests += 1
        now = self._expire()
        holder, run = self._best_run(namespace, keys[:MAX_LEASE_RUN], exclude_holder)
        if holder is None or run < min_blocks:
            return None
        ns_listing = self._listing[namespace]
        hid = holder.holder_id
        return self._grant(holder, [ns_listing[key][hid] for key in keys[:run]], now, ttl_ms, owner)

    def lease_chain(
        self, namespace: bytes, tail: bytes, blocks: int, ttl_ms: int, head_parent: bytes = b"",
        exclude_holder: int | None = None, owner: int = 0,
    ) -> LeaseGranted | None:  # fmt: skip
        """Lease the ``blocks`` entries that end at ``tail``, found through the parents
        their holder published (the importer then hashes its prompt once instead of once per
        block); the first of them must have ``head_parent`` as its parent. One holder must
        list the whole chain, else None: the caller asks ``lease`` with every key. A key
        commits to its whole prefix, so an honest holder's links from the importer's tail key
        are the importer's own keys (the importer checks some of them)."""
        check_lease_terms(ttl_ms, blocks)
        records.check_keys([tail])
        records.check_parents([head_parent], [tail])
        if blocks > MAX_LEASE_RUN:
            return None
        self.counters.lease_requests += 1
        now = self._expire()
        ns_listing = self._listing.get(namespace)
        holders_of_tail = ns_listing.get(tail) if ns_listing else None
        for hid in sorted(holders_of_tail or (), reverse=True):  # most recent holder first
            entry = holders_of_tail[hid]
            if hid == exclude_holder or blocks > entry.holder.listed:  # (bounds the walk,
                continue  # whatever links the holder sent)
            chain = [entry]
            while len(chain) < blocks and entry.parent:
                holders_of_key = ns_listing.get(entry.parent)
                entry = holders_of_key.get(hid) if holders_of_key else None
                if entry is None:
                    break
                chain.append(entry)
            if len(chain) == blocks and entry.parent == head_parent:  # (a cycle's walk ends
                chain.reverse()  # at a block that is not the caller's first)
                return self._grant(self._holders[hid], chain, now, ttl_ms, owner)
        return None

    def _grant(
        self, holder: Holder, entries: list[Entry], now: int, ttl_ms: int, owner: int
    ) -> LeaseGranted:
        try:
            self._book.check(owner, len(entries))
        except RequestRejected:
            self.counters.leases_refused += 1
            raise
        lru, holder_lru = self._lru, holder.lru
        for entry in entries:
            if entry.lease_count == 0:
                holder.leased += 1
            entry.lease_count += 1
            lru.move_to_end(entry)  # leasing is a use
            holder_lru.move_to_end(entry)
        lease = self._book.add(holder, entries, now + ttl_ms * 1_000_000, owner)
        holder.lease_ids.add(lease.lease_id)
        self.counters.leases_granted += 1
        self.counters.blocks_leased += len(entries)
        return LeaseGranted(
            lease_id=lease.lease_id,
            holder_id=holder.holder_id,
            holder_name=holder.name,
            descriptor=holder.descriptor,
            locations=[entry.location for entry in entries],
            expires_at_ns=lease.expires_at_ns,
            keys=[entry.key for entry in entries],
        )

    def release_leases(self, lease_ids: Sequence[int]) -> None:
        """End leases; unknown or already ended ids are ignored (idempotent)."""
        self._expire()
        for lease_id in lease_ids:
            lease = self._book.pop(lease_id)
            if lease is not None:
                self._end_lease(lease)

    def end_leases_of(self, owner: int) -> int:
        """End every lease ``owner`` took (its connection closed: nobody can release them
        any more); their entries' locations go back to the holders. Returns how many."""
        leases = self._book.pop_owner(owner)
        for lease in leases:
            self._end_lease(lease)
        return len(leases)

    def expire_leases(self) -> None:
        self._expire()

    # ------------------------------------------------------------ internals

    def _best_run(
        self, namespace: bytes, keys: Sequence[bytes], exclude_holder: int | None
    ) -> tuple[Holder | None, int]:
        ns_listing = self._listing.get(namespace)
        if not ns_listing or not keys:
            return None, 0
        first = ns_listing.get(keys[0])
        if not first:
            return None, 0
        candidates = [hid for hid in first if hid != exclude_holder]
        if not candidates:
            return None, 0
        run = 1
        for key in keys[1:]:
            holders_of_key = ns_listing.get(key)
            if not holders_of_key:
                break
            if len(candidates) == 1:  # the common case: skip building lists
                if candidates[0] not in holders_of_key:
                    break
            else:
                survivors = [hid for hid in candidates if hid in holders_of_key]
                if not survivors:
                    break
                candidates = survivors
            run += 1
        # Every survivor holds the whole run; holder ids grow with registration time, so the
        # largest id is the most recently registered (likely the warmest cache).
        return self._holders[max(candidates)], run

    def _list(self, entry: Entry) -> None:
        holder = entry.holder
        ns_listing = self._listing.setdefault(holder.namespace, {})
        ns_listing.setdefault(entry.key, {})[holder.holder_id] = entry
        self._lru[entry] = None
        holder.lru[entry] = None
        holder.listed += 1
        self._listed_total += 1
        if self._listener is not None:
            self._listener.key_listed(entry.key, holder.bit)

    def _unlist(self, entry: Entry) -> None:
        """Hide a listed entry from lookups and from the LRUs."""
        holder = entry.holder
        ns_listing = self._listing[holder.namespace]
        holders_of_key = ns_listing[entry.key]
        del holders_of_key[holder.holder_id]
        if not holders_of_key:
            del ns_listing[entry.key]
            if not ns_listing:
                del self._listing[holder.namespace]
        del self._lru[entry]
        del holder.lru[entry]
        holder.listed -= 1
        self._listed_total -= 1
        if self._listener is not None:
            self._listener.key_unlisted(entry.key, holder.bit)

    def _withdraw(self, entry: Entry) -> None:
        """Unlist; release the location now if unleased, else when its last lease ends."""
        self._unlist(entry)
        if entry.lease_count:
            entry.retiring = True
        else:
            self._release(entry)

    def _release(self, entry: Entry) -> None:
        holder = entry.holder
        del holder.by_location[entry.location]
        entry.dead = True
        holder.released[entry.location] = None

    def _forget(self, entry: Entry) -> None:
        """Drop an entry without releasing its location (the holder re-used it)."""
        if not entry.retiring:
            self._unlist(entry)
        if entry.lease_count:
            entry.holder.leased -= 1
        del entry.holder.by_location[entry.location]
        entry.dead = True

    def _evict_over_capacity(self) -> None:
        # Leased entries were all listed before this publish, so they alone never exceed
        # the capacity: while over it, an unleased entry is left to evict.
        over = self._listed_total - self.capacity_blocks
        if over > 0:
            self.counters.blocks_released_lru += self._release_unleased(self._lru, over)

    def _release_unleased(self, lru, limit: int) -> int:
        """Withdraw up to ``limit`` of the least recently used entries of ``lru`` that no
        lease holds (leased ones move to the back); return how many."""
        released = 0
        for _ in range(len(lru)):  # each entry is looked at once at most
            if released >= limit:
                break
            entry = next(iter(lru))
            if entry.lease_count:
                lru.move_to_end(entry)
                continue
            self._withdraw(entry)
            released += 1
        return released

    def _end_lease(self, lease: Lease) -> None:
        lease.holder.lease_ids.discard(lease.lease_id)
        for entry in lease.entries:
            entry.lease_count -= 1
            if entry.lease_count or entry.dead:
                continue
            entry.holder.leased -= 1
            if entry.retiring:
                self._release(entry)

    def _expire(self) -> int:
        now = self._clock()
        for lease in self._book.pop_expired(now):
            self._end_lease(lease)
        return now
