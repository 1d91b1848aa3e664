"""PrefixRegistry and the shared-memory lookup table it feeds stay in step.

Random operation sequences (holders registering and going, publishes with repeated keys and
reused locations, unpublish, reclaim, leases taken, released, expired and ended with their
connection, capacity eviction); after each one the index's own invariants hold and the
table answers, for the keys in play, exactly the holders the index lists them under. Some
runs churn enough keys to rebuild the table, some give it no space to grow (rebuilt in
place). After the reviewer's probe for issue 9 (index_state_fuzz.py)."""

from __future__ import annotations

import errno
import os
import random

import pytest

from kvmkt_connector.registry.index import PrefixRegistry
from kvmkt_connector.registry.leases import LeaseLimits
from kvmkt_connector.registry.lookup_table import LookupTable
from kvmkt_connector.registry.lookup_writer import LookupTableWriter
from kvmkt_connector.registry.records import RequestRejected

OPS = ["register", "drop", "publish", "publish", "publish", "unpublish", "reclaim", "lease",
       "lease", "release", "close", "tick", "sync"]  # fmt: skip
# Keeps the registry near capacity, so eviction churns keys through the table: tombstones
# pile up in its probe chains until it is rebuilt.
CHURN_OPS = ["register", "drop", *["publish"] * 12, "unpublish", "lease", "release", "close", "tick"]


def _check_index(reg: PrefixRegistry) -> dict[bytes, int]:
    """The index's invariants; returns key -> mask of the holder bits listing it."""
    listing = reg._listing  # noqa: SLF001 - the structure under test
    total = sum(len(hs) for ns in listing.values() for hs in ns.values())
    assert total == reg.published_blocks == len(reg._lru) <= reg.capacity_blocks  # noqa: SLF001
    book = reg.leases._leases  # noqa: SLF001
    holds: dict[int, int] = {}  # id(entry) -> active leases on it
    for lease in book.values():
        for entry in lease.entries:
            holds[id(entry)] = holds.get(id(entry), 0) + 1
    assert reg.leases.leased_blocks == sum(len(lease.entries) for lease in book.values())
    for h in reg.holders():
        listed = [e for e in h.by_location.values() if not e.retiring]
        assert h.listed == len(listed) == len(h.lru)
        assert h.leased == sum(1 for e in h.by_location.values() if e.lease_count)
        assert all(e.lease_count == holds.get(id(e), 0) for e in h.by_location.values())
        assert all(e.lease_count for e in h.by_location.values() if e.retiring)
        assert not set(h.released) & set(h.by_location)
        assert h.lease_ids == {i for i, lease in book.items() if lease.holder is h}
    want: dict[bytes, int] = {}
    for ns in listing.values():
        for key, holders in ns.items():
            for entry in holders.values():
                want[key] = want.get(key, 0) | 1 << entry.holder.bit
    return want


def _run(
    seed: int, ops: int, pool_size: int, capacity: int, path: str, churn: bool = False
) -> LookupTableWriter:
    rng = random.Random(seed)
    kinds, batch = (CHURN_OPS, 40) if churn else (OPS, 8)
    clock = [0]
    table = LookupTableWriter(path, capacity)
    limits = LeaseLimits(per_owner_leases=6, per_owner_blocks=30, total_leases=12, total_blocks=50)
    reg = PrefixRegistry(capacity, clock=lambda: clock[0], listener=table, lease_limits=limits)
    reader = LookupTable.open(path)
    namespaces = [bytes([i]) * 16 for i in range(2)]
    pool = [rng.randbytes(16) for _ in range(pool_size)]
    holders: list[int] = []
    leases: list[int] = []
    for step in range(ops):
        op = rng.choice(kinds) if holders else "register"
        touched = []
        try:
            if op == "register":
                ns = rng.choice(namespaces)
                holders.append(reg.register_holder(namespace=ns, name="h", pid=1).holder_id)
            elif op == "drop":
                reg.drop_holder(holders.pop(rng.randrange(len(holders))))
            elif op == "publish":
                n = rng.randrange(1, batch + 1)
                touched = [rng.choice(pool) for _ in range(n)]  # repeats included
                locations = [rng.randrange(-2, 5 * batch) for _ in range(n)]
                reg.publish(rng.choice(holders), touched, locations)
            elif op == "unpublish":
                locations = [rng.randrange(-2, 40) for _ in range(rng.randrange(1, 8))]
                reg.unpublish(rng.choice(holders), locations)
            elif op == "reclaim":
                reg.reclaim(rng.choice(holders), rng.randrange(0, 6))
            elif op == "lease":
                start = rng.randrange(pool_size)
                touched = pool[start : start + rng.randrange(1, 6)]
                grant = reg.lease(rng.choice(namespaces), touched, rng.randrange(1, 60),
                                  rng.randrange(1, 3), rng.choice([None, *holders]),
                                  owner=rng.randrange(1, 4))  # fmt: skip
                if grant is not None:
                    leases.append(grant.lease_id)
            elif op == "release" and leases:
                reg.release_leases([leases.pop(rng.randrange(len(leases)))])
            elif op == "close":  # a connection went: its leases end
                reg.end_leases_of(rng.randrange(1, 4))
            elif op == "tick":
                clock[0] += rng.randrange(0, 30) * 1_000_000
                reg.expire_leases()
            elif op == "sync":
                reg.sync(rng.choice(holders))
        except RequestRejected as exc:
            assert exc.code in ("lease_limit", "full"), exc
        want = _check_index(reg)
        # The table agrees on what the op touched, on a sample, and on every key now and then.
        sample = pool if step % 50 == 0 else touched + rng.sample(pool, min(20, pool_size))
        for key in sample:
            assert reader.holder_mask(key) == want.get(key, 0), (seed, step, op)
    assert table.dropped_keys == 0
    return table


@pytest.mark.parametrize(
    ("seed", "ops", "pool_size", "capacity", "no_space"),
    [(s, 1500, 40, 200, False) for s in range(4)]  # crowded keys, many holders per key
    + [(s, 1500, 12, 6, False) for s in range(4, 6)]  # capacity eviction all the time
    + [(6, 2000, 5000, 500, False), (7, 2000, 5000, 500, True)],  # churn: table rebuilds
)
def test_lookup_table_answers_what_the_index_lists(
    seed, ops, pool_size, capacity, no_space, socket_dir, monkeypatch
) -> None:
    path = os.path.join(socket_dir, "t.table")
    if no_space:  # the first file is made; every later one finds the file system full
        real = os.posix_fallocate
        made = []

        def fallocate(fd: int, offset: int, length: int) -> None:
            if made:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            made.append(length)
            real(fd, offset, length)

        monkeypatch.setattr(os, "posix_fallocate", fallocate)
    churn = pool_size > 2 * capacity
    table = _run(seed, ops, pool_size, capacity, path, churn)
    if churn:
        assert (table.in_place_rebuilds if no_space else table.rebuilds) >= 1
    table.close()
