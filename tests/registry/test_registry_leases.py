"""Lease bounds and lease lifetime: a client cannot make the registry hold unbounded leases,
and the leases of a connection end when it closes (their locations go back to the holder).
The books on their own, then a live registry, then the connector's importer against it."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from registry_helpers import chain, import_planner, import_tokens, namespace, wait_until

from kvmkt_connector.registry.client import RegistryError
from kvmkt_connector.registry.index import PrefixRegistry
from kvmkt_connector.registry.leases import (
    MAX_LEASED_BLOCKS_PER_CONNECTION,
    MAX_LEASES_PER_CONNECTION,
    LeaseLimits,
)
from kvmkt_connector.registry.protocol import LEASE_LIMIT
from kvmkt_connector.registry.records import RequestRejected

NS = namespace("leases")


def _keys(n: int) -> list[bytes]:
    return [f"k{i:06d}".encode().ljust(16, b".") for i in range(n)]


def _refused(fn) -> str:
    with pytest.raises(RequestRejected) as err:
        fn()
    assert err.value.code == LEASE_LIMIT
    return err.value.message


def test_leases_are_bounded_per_owner_and_in_total() -> None:
    limits = LeaseLimits(per_owner_leases=3, per_owner_blocks=10, total_leases=5, total_blocks=14)
    reg = PrefixRegistry(100, lease_limits=limits)
    a = reg.register_holder(namespace=NS, name="a", pid=1).holder_id
    keys = _keys(20)
    reg.publish(a, keys, list(range(20)))
    first = [reg.lease(NS, keys[:2], 60_000, owner=1) for _ in range(3)]
    assert "holds 3 leases (at most 3)" in _refused(lambda: reg.lease(NS, keys[:1], 60_000, owner=1))
    assert "on 0 blocks, 11 more would exceed 10" in _refused(
        lambda: reg.lease(NS, keys[:11], 60_000, owner=2))
    reg.lease(NS, keys[:4], 60_000, owner=2)
    reg.lease(NS, keys[:1], 60_000, owner=2)  # 5 leases on 11 blocks in all
    assert "5 leases are active (at most 5)" in _refused(
        lambda: reg.lease(NS, keys[:1], 60_000, owner=3))
    assert reg.lease(NS, _keys(30)[25:], 60_000, owner=3) is None  # no match: no refusal
    reg.release_leases([first[0].lease_id])
    assert "cover 9 blocks, 6 more would exceed 14" in _refused(
        lambda: reg.lease(NS, keys[:6], 60_000, owner=3))
    assert reg.lease(NS, keys[:5], 60_000, owner=3) is not None  # exactly at the bound
    assert reg.active_leases == 5 and reg.leases.leased_blocks == 14
    assert reg.leases.owner_leases(1) == 2 and reg.leases.owner_leases(3) == 1
    assert reg.counters.leases_refused == 4 and reg.counters.leases_granted == 6


def test_ending_an_owners_leases_hands_retiring_locations_back() -> None:
    reg = PrefixRegistry(100)
    a = reg.register_holder(namespace=NS, name="a", pid=1).holder_id
    keys = _keys(6)
    reg.publish(a, keys, list(range(6)))
    mine = [reg.lease(NS, keys[:4], 60_000, owner=7) for _ in range(2)]
    other = reg.lease(NS, keys[:2], 60_000, owner=8)
    assert reg.unpublish(a, list(range(6))) == ([4, 5], 4)
    assert reg.end_leases_of(7) == 2 and reg.end_leases_of(7) == 0
    assert sorted(reg.sync(a)) == [2, 3]  # 0 and 1 stay: owner 8 still leases them
    reg.release_leases([m.lease_id for m in mine])  # already ended: ignored
    reg.release_leases([other.lease_id])
    assert sorted(reg.sync(a)) == [0, 1]
    assert reg.active_leases == 0 and reg.leases.leased_blocks == 0
    assert reg.holder(a).leased == 0


def test_released_leases_do_not_pile_up_until_their_deadline() -> None:
    reg = PrefixRegistry(100)
    a = reg.register_holder(namespace=NS, name="a", pid=1).holder_id
    keys = _keys(2)
    reg.publish(a, keys, [0, 1])
    keep = reg.lease(NS, keys, 600_000, owner=1)
    for _ in range(20_000):  # 10-minute leases, released at once: each left a heap item
        reg.release_leases([reg.lease(NS, keys, 600_000, owner=2).lease_id])
    assert reg.active_leases == 1 and reg.leases.heap_size <= 2 * 1 + 64 + 1
    reg.release_leases([keep.lease_id])


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_a_lease_flood_is_refused_and_ends_with_its_connection(start_registry) -> None:
    """The reviewer's probe: one client takes 10-minute leases on 20k blocks again and
    again. It gets the per-connection bound and then refusals (registry memory stays put),
    and when it disconnects the holder gets back what it had withdrawn under those leases."""
    registry = start_registry("--capacity", "100000")
    n = 20_000
    keys = chain(NS, list(range(4 * n)))
    holder = registry.connect("holder")
    holder.register_holder(NS, "holder", b"", b"d")
    for i in range(0, n, 5000):
        holder.publish(keys[i : i + 5000], list(range(i, i + 5000)))
    flooder = registry.connect("flooder", timeout_s=30)
    rss_before = _rss_kib(registry.proc.pid)
    bound = MAX_LEASED_BLOCKS_PER_CONNECTION // n
    for _ in range(bound):
        assert len(flooder.lease(NS, keys, 600_000).locations) == n
    refusals = []
    for _ in range(bound // 2):
        with pytest.raises(RegistryError) as err:
            flooder.lease(NS, keys, 600_000)
        refusals.append(err.value)
    assert {e.code for e in refusals} == {LEASE_LIMIT}
    assert "release leases first" in refusals[0].message
    status = holder.status()
    assert status.active_leases == bound
    grown_kib = _rss_kib(registry.proc.pid) - rss_before
    print(f"\n{bound} leases of {n} blocks + {len(refusals)} refused: RSS +{grown_kib} KiB")
    assert grown_kib < 48 * 1024
    # Another connection still gets leases (the bound is per connection).
    with registry.connect("other") as other:
        assert other.lease(NS, keys[:8], 1000) is not None
    # The holder withdraws everything: all of it waits on the flooder's leases...
    assert holder.unpublish(list(range(n))) == ([], n)
    assert holder.sync() == []
    flooder.close()  # ... which end with its connection, not in 10 minutes
    wait_until(lambda: holder.status().active_leases == 0, 2.0)
    assert sorted(holder.sync()) == list(range(n))


def test_the_importer_takes_a_lease_refusal_as_a_miss(registry) -> None:
    """ImportPlanner + RegistryLink against a live registry: at the lease bound a lookup
    falls back to prefill, counted as a miss (not as an outage), on the same connection."""
    from kvmkt_connector.hashing import PrefixKeys

    bs, root = 4, b"importer-root"
    tokens = list(range(100, 100 + 16 * bs))
    keys = PrefixKeys(root, bs).extend(tokens)
    holder = registry.connect("holder")
    holder.register_holder(NS, "holder", b"", b"d")
    holder.publish(keys, list(range(len(keys))))
    planner, link = import_planner(registry.socket_path, bs)
    stats = planner._stats

    def request(rid: str) -> SimpleNamespace:
        return SimpleNamespace(request_id=rid, num_tokens=len(tokens) + 1,
                               all_token_ids=tokens + [7], kv_transfer_params=None)  # fmt: skip

    def match(rid: str) -> int:
        return import_tokens(planner, request(rid), PrefixKeys(root, bs), NS, 0)

    assert match("r0") == len(tokens)  # a lease on the whole prefix
    epoch = link.epoch
    held = [link.call(lambda c: c.lease(NS, keys[:1], 60_000))
            for _ in range(MAX_LEASES_PER_CONNECTION - 1)]  # fmt: skip
    assert all(g is not None for g in held)
    counts = dict(stats.data["c"])
    t0 = time.monotonic()
    assert match("r1") == 0  # refused: prefill normally
    assert time.monotonic() - t0 < 0.5
    after = stats.data["c"]
    assert after.get("fallback_miss", 0) == counts.get("fallback_miss", 0) + 1
    assert after.get("fallback_registry_unavailable", 0) == counts.get(
        "fallback_registry_unavailable", 0)  # fmt: skip
    assert link.epoch == epoch and match("r1") == 0  # same connection, still refused
    link.call(lambda c: c.release_leases([held[0].lease_id]))
    assert match("r2") == len(tokens)
    with registry.connect("watch") as watch:
        assert watch.status().active_leases == MAX_LEASES_PER_CONNECTION
        link.close()  # the importer's connection goes: so do all its leases
        wait_until(lambda: watch.status().active_leases == 0, 2.0)
