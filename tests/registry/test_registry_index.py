"""PrefixRegistry on its own (no I/O): the edge cases of every operation."""

from __future__ import annotations

import random

import pytest

from kvmkt_connector.registry.index import PrefixRegistry
from kvmkt_connector.registry.leases import MAX_LEASE_TTL_MS
from kvmkt_connector.registry.protocol import MAX_HOLDERS
from kvmkt_connector.registry.records import RequestRejected

NS = b"N" * 16
OTHER_NS = b"O" * 16


def keys(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}{i:04d}".encode().ljust(16, b".") for i in range(n)]


class ManualClock:
    def __init__(self) -> None:
        self.now_ns = 1_000_000_000

    def __call__(self) -> int:
        return self.now_ns

    def advance_ms(self, ms: int) -> None:
        self.now_ns += ms * 1_000_000


class ListedPairs:
    """KeyListener keeping the set of (key, bit) pairs it was told are listed."""

    def __init__(self) -> None:
        self.pairs: set[tuple[bytes, int]] = set()

    def key_listed(self, key: bytes, holder_bit: int) -> None:
        assert (key, holder_bit) not in self.pairs
        self.pairs.add((key, holder_bit))

    def key_unlisted(self, key: bytes, holder_bit: int) -> None:
        self.pairs.remove((key, holder_bit))


def make(capacity: int = 1000) -> tuple[PrefixRegistry, ManualClock, ListedPairs]:
    clock, listener = ManualClock(), ListedPairs()
    return PrefixRegistry(capacity, clock=clock, listener=listener), clock, listener


def holder(reg: PrefixRegistry, name: str, ns: bytes = NS) -> int:
    return reg.register_holder(namespace=ns, name=name, pid=1).holder_id


def test_longest_run_picks_the_holder_with_the_longest_run() -> None:
    reg, _, _ = make()
    a, b, c = holder(reg, "a"), holder(reg, "b"), holder(reg, "c")
    chain = keys("k", 10)
    reg.publish(a, chain[:3], [0, 1, 2])
    reg.publish(b, chain[:7], list(range(7)))
    reg.publish(c, chain[:2] + keys("x", 5), list(range(7)))  # diverges after 2
    assert reg.longest_run(NS, chain) == (b, 7)
    assert reg.longest_run(NS, chain[:2]) == (c, 2)  # tie on length: most recently registered
    assert reg.longest_run(NS, chain, exclude_holder=b) == (a, 3)
    assert reg.longest_run(NS, keys("z", 3)) == (None, 0)
    assert reg.longest_run(NS, []) == (None, 0)
    # A run must start at keys[0]: keys 1.. alone are not a prefix match.
    assert reg.longest_run(NS, [keys("z", 1)[0]] + chain[1:]) == (None, 0)
    assert reg.counters.lookups == 6


def test_runs_are_per_holder_not_pieced_together() -> None:
    reg, _, _ = make()
    a, b = holder(reg, "a"), holder(reg, "b")
    chain = keys("k", 6)
    reg.publish(a, chain[:2] + chain[3:4], [0, 1, 3])  # a lacks key 2
    reg.publish(b, chain[:1] + chain[2:6], [0, 2, 3, 4, 5])  # b lacks key 1
    assert reg.longest_run(NS, chain) == (a, 2)


def test_namespaces_are_isolated() -> None:
    reg, _, _ = make()
    a = holder(reg, "a", NS)
    b = holder(reg, "b", OTHER_NS)
    shared = keys("k", 4)  # same bytes published in two namespaces
    reg.publish(a, shared[:2], [0, 1])
    reg.publish(b, shared, [0, 1, 2, 3])
    assert reg.longest_run(NS, shared) == (a, 2)
    assert reg.longest_run(OTHER_NS, shared) == (b, 4)
    assert reg.longest_run(b"Z" * 16, shared) == (None, 0)


def test_lease_pins_entries_until_release() -> None:
    reg, _, _ = make()
    a, b = holder(reg, "a"), holder(reg, "b")
    chain = keys("k", 4)
    reg.publish(a, chain, [10, 11, 12, 13])
    assert reg.lease(NS, chain, ttl_ms=1000, min_blocks=5, exclude_holder=b) is None
    grant = reg.lease(NS, chain[:3], ttl_ms=1000, exclude_holder=b)
    assert grant is not None
    assert (grant.holder_id, grant.locations) == (a, [10, 11, 12])
    assert reg.holder(a).leased == 3 and reg.active_leases == 1
    assert reg.reclaim(a, 10) == [13]  # only the unleased entry
    released, pending = reg.unpublish(a, [10, 11, 12])
    assert (released, pending) == ([], 3)
    assert reg.longest_run(NS, chain) == (None, 0)  # retiring entries no longer count
    assert reg.sync(a) == []
    reg.release_leases([grant.lease_id])
    reg.release_leases([grant.lease_id, 999])  # idempotent, unknown ids ignored
    assert sorted(reg.sync(a)) == [10, 11, 12]
    assert reg.holder(a).leased == 0 and reg.active_leases == 0
    assert reg.counters.leases_granted == 1 and reg.counters.lease_requests == 2
    assert reg.counters.blocks_leased == 3


def test_lease_expiry_releases_retiring_entries() -> None:
    reg, clock, _ = make()
    a = holder(reg, "a")
    chain = keys("k", 2)
    reg.publish(a, chain, [0, 1])
    grant = reg.lease(NS, chain, ttl_ms=500)
    assert grant is not None and grant.expires_at_ns == clock.now_ns + 500_000_000
    assert reg.unpublish(a, [0]) == ([], 1)
    clock.advance_ms(499)
    reg.expire_leases()
    assert reg.sync(a) == [] and reg.active_leases == 1
    clock.advance_ms(1)
    assert reg.sync(a) == [0]  # expired lazily on this very call
    assert reg.active_leases == 0
    assert reg.reclaim(a, 5) == [1]  # the other entry is unleased again


def test_overlapping_leases_hold_until_the_last_ends() -> None:
    reg, clock, _ = make()
    a = holder(reg, "a")
    chain = keys("k", 2)
    reg.publish(a, chain, [0, 1])
    first = reg.lease(NS, chain, ttl_ms=100)
    reg.lease(NS, chain[:1], ttl_ms=1000)
    assert reg.unpublish(a, [0, 1]) == ([], 2)
    reg.release_leases([first.lease_id])
    assert reg.sync(a) == [1]
    clock.advance_ms(1000)
    assert reg.sync(a) == [0]


def test_lease_arguments_are_checked() -> None:
    reg, _, _ = make()
    for ttl, min_blocks in ((0, 1), (MAX_LEASE_TTL_MS + 1, 1), (10, 0)):
        with pytest.raises(RequestRejected) as err:
            reg.lease(NS, keys("k", 1), ttl_ms=ttl, min_blocks=min_blocks)
        assert err.value.code == "bad_request"


def test_capacity_evicts_least_recently_used_unleased_entries() -> None:
    reg, _, _ = make(capacity=4)
    a, b = holder(reg, "a"), holder(reg, "b")
    ka, kb = keys("a", 3), keys("b", 3)
    assert reg.publish(a, ka, [0, 1, 2]) == (3, [])
    grant = reg.lease(NS, ka[:1], ttl_ms=1000, exclude_holder=b)  # pins a's location 0
    assert grant is not None
    accepted, released = reg.publish(b, kb, [0, 1, 2])
    assert (accepted, released) == (3, [])
    assert reg.published_blocks == 4
    assert reg.counters.blocks_released_lru == 2
    assert reg.sync(a) == [1, 2]  # a learns in its next reply; the leased one survived
    assert reg.longest_run(NS, ka) == (a, 1)
    # Leasing or re-publishing an entry makes it young again; ending a lease does not.
    reg.release_leases([grant.lease_id])
    reg.lease(NS, kb[:1], ttl_ms=1)
    reg.publish(b, kb[2:3], [2])
    assert reg.publish(a, keys("c", 2), [5, 6]) == (2, [0])  # a's own, in its own reply
    assert reg.published_blocks == 4
    assert reg.sync(b) == [1]


def test_a_publish_bigger_than_capacity_keeps_its_newest_entries() -> None:
    reg, _, _ = make(capacity=3)
    a = holder(reg, "a")
    accepted, released = reg.publish(a, keys("k", 5), [0, 1, 2, 3, 4])
    assert (accepted, released) == (3, [0, 1])
    assert reg.published_blocks == 3


def test_republishing_a_key_at_a_new_location_releases_the_old_one() -> None:
    reg, _, listener = make()
    a = holder(reg, "a")
    (key,) = keys("k", 1)
    reg.publish(a, [key], [7])
    assert reg.publish(a, [key], [7]) == (1, [])  # same place: a refresh
    assert reg.publish(a, [key], [8]) == (1, [7])
    grant = reg.lease(NS, [key], ttl_ms=1000)
    assert grant.locations == [8]
    assert reg.publish(a, [key], [9]) == (1, [])  # 8 is leased: released later
    assert reg.lease(NS, [key], ttl_ms=1000).locations == [9]
    reg.release_leases([grant.lease_id])
    assert reg.sync(a) == [8]
    assert listener.pairs == {(key, reg.holder(a).bit)}


def test_republishing_a_location_under_a_new_key_drops_the_stale_entry() -> None:
    reg, _, _ = make()
    a = holder(reg, "a")
    old, new = keys("k", 2)
    reg.publish(a, [old], [3])
    assert reg.publish(a, [new], [3]) == (1, [])  # location 3 is in use: not released
    assert reg.longest_run(NS, [old]) == (None, 0)
    assert reg.longest_run(NS, [new]) == (a, 1)
    assert reg.holder(a).listed == 1


def test_a_location_published_again_before_its_release_was_delivered_stays_listed() -> None:
    reg, _, _ = make(capacity=1)
    a, b = holder(reg, "a"), holder(reg, "b")
    k0, k1 = keys("k", 2)
    reg.publish(a, [k0], [0])
    reg.publish(b, [k1], [0])  # evicts a's entry: location 0 is queued for a
    # a, not told yet, re-publishes the block it still has at 0: the queued release is void.
    assert reg.publish(a, [k0], [0]) == (1, [])
    assert reg.longest_run(NS, [k0]) == (a, 1)
    assert reg.sync(a) == []
    assert reg.sync(b) == [0]


def test_reclaim_returns_oldest_unleased_first() -> None:
    reg, _, _ = make()
    a = holder(reg, "a")
    chain = keys("k", 5)
    reg.publish(a, chain, [0, 1, 2, 3, 4])
    reg.lease(NS, chain[:1], ttl_ms=1000)  # 0 is leased (and so young again)
    reg.publish(a, chain[1:2], [1])  # 1 re-published: young
    assert reg.reclaim(a, 2) == [2, 3]
    assert reg.reclaim(a, 0) == []
    assert reg.reclaim(a, 10) == [4, 1]
    with pytest.raises(RequestRejected):
        reg.reclaim(a, -1)


def test_drop_holder_removes_its_entries_and_leases_and_frees_its_bit() -> None:
    reg, _, listener = make()
    a, b = holder(reg, "a"), holder(reg, "b")
    bit_a = reg.holder(a).bit
    chain = keys("k", 3)
    reg.publish(a, chain, [0, 1, 2])
    reg.publish(b, chain[:1], [0])
    grant = reg.lease(NS, chain, ttl_ms=1000, exclude_holder=b)
    reg.unpublish(a, [2])  # retiring under the lease
    dropped = reg.drop_holder(a)
    assert dropped is not None and dropped.name == "a"
    assert reg.drop_holder(a) is None
    assert reg.longest_run(NS, chain) == (b, 1)
    assert reg.active_leases == 0
    reg.release_leases([grant.lease_id])  # harmless
    assert reg.published_blocks == 1
    assert all(bit != bit_a for _, bit in listener.pairs)
    c = holder(reg, "c")
    assert reg.holder(c).bit == bit_a  # lowest free bit is reused
    assert reg.counters.holders_lost == 1
    with pytest.raises(RequestRejected) as err:
        reg.sync(a)
    assert err.value.code == "not_holder"


def test_holder_limit() -> None:
    reg, _, _ = make()
    ids = [holder(reg, f"h{i}") for i in range(MAX_HOLDERS)]
    assert sorted(reg.holder(h).bit for h in ids) == list(range(MAX_HOLDERS))
    with pytest.raises(RequestRejected) as err:
        holder(reg, "one too many")
    assert err.value.code == "full"
    reg.drop_holder(ids[5])
    assert reg.holder(holder(reg, "again")).bit == 5


def test_bad_requests_are_rejected() -> None:
    reg, _, _ = make()
    with pytest.raises(RequestRejected):
        reg.register_holder(namespace=b"short", name="x", pid=1)
    a = holder(reg, "a")
    with pytest.raises(RequestRejected):
        reg.publish(a, keys("k", 2), [0])
    with pytest.raises(RequestRejected):
        reg.publish(a, [b"too short"], [0])
    assert reg.published_blocks == 0


def brute_force_run(reg: PrefixRegistry, ns: bytes, chain: list[bytes], exclude: int | None):
    """Best (run, holder_id) from the holders' by_location maps, the slow obvious way."""
    best = (0, None)
    for h in reg.holders():
        if h.holder_id == exclude or h.namespace != ns:
            continue
        held = {e.key for e in h.by_location.values() if not e.retiring}
        run = 0
        while run < len(chain) and chain[run] in held:
            run += 1
        if run and (run, h.holder_id) > best:
            best = (run, h.holder_id)
    return best


@pytest.mark.parametrize(
    ("seed", "pool_size", "capacity"),
    [(s, 30, 40) for s in range(4)] + [(s, 8, 6) for s in range(4)],
)
def test_random_operations_keep_every_invariant(seed: int, pool_size: int, capacity: int) -> None:
    rng = random.Random(seed)
    reg, clock, listener = make(capacity=capacity)
    pool = keys("p", pool_size)
    live: list[int] = []
    leases: list[int] = []
    next_location: dict[int, int] = {}
    for _ in range(1500):
        op = rng.random()
        if op < 0.05 or not live:
            if reg.holder_count < 6:
                h = holder(reg, "h", rng.choice([NS, OTHER_NS]))
                live.append(h)
                next_location[h] = 0
        elif op < 0.08:
            reg.drop_holder(live.pop(rng.randrange(len(live))))
        elif op < 0.45:
            h = rng.choice(live)
            start = rng.randrange(len(pool))
            batch = pool[start : start + rng.randrange(1, 8)]
            locations = []
            for _ in batch:
                locations.append(next_location[h])
                next_location[h] += 1
            reg.publish(h, batch, locations)
        elif op < 0.6:
            chain = pool[rng.randrange(len(pool)) :][: rng.randrange(1, 12)]
            exclude = rng.choice([None, *live])
            ns = rng.choice([NS, OTHER_NS])
            grant = reg.lease(ns, chain, ttl_ms=rng.randrange(1, 50), exclude_holder=exclude)
            if grant:
                leases.append(grant.lease_id)
        elif op < 0.7 and leases:
            reg.release_leases([leases.pop(rng.randrange(len(leases)))])
        elif op < 0.8:
            h = rng.choice(live)
            reg.unpublish(h, [rng.randrange(next_location[h] + 1) for _ in range(3)])
        elif op < 0.88:
            reg.reclaim(rng.choice(live), rng.randrange(4))
        else:
            clock.advance_ms(rng.randrange(20))
            reg.sync(rng.choice(live))
        # Invariants: capacity, listener == listed pairs, counts, and lookups == brute force.
        assert reg.published_blocks <= capacity
        listed = {
            (e.key, h.bit) for h in reg.holders() for e in h.by_location.values() if not e.retiring
        }
        assert listener.pairs == listed
        assert reg.published_blocks == len(listed)
        for h in reg.holders():
            assert h.leased == sum(1 for e in h.by_location.values() if e.lease_count)
            assert h.listed == sum(1 for e in h.by_location.values() if not e.retiring)
            assert all(e.lease_count for e in h.by_location.values() if e.retiring)
            assert not set(h.released) & set(h.by_location)
        chain = pool[rng.randrange(len(pool)) :][:10]
        exclude = rng.choice([None, *live])
        ns = rng.choice([NS, OTHER_NS])
        holder_id, run = reg.longest_run(ns, chain, exclude)
        assert (run, holder_id) == brute_force_run(reg, ns, chain, exclude)
