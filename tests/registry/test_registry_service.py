"""The registry service over its real socket, with holders in other processes."""

from __future__ import annotations

import os
import random
import time

import pytest
from registry_helpers import chain, namespace, wait_until

from kvmkt_connector.registry.client import RegistryClient, RegistryError
from kvmkt_connector.registry.paths import holder_file, holder_file_dirs

NS = namespace("service")
OTHER_NS = namespace("other")
BASE = list(range(40))  # 10 blocks
BRANCH = BASE[:16] + [900 + t for t in range(24)]  # shares 4 blocks with BASE


def holder_client(registry, name: str, ns: bytes = NS) -> RegistryClient:
    client = registry.connect(name)
    client.register_holder(ns, name, b"fp-" + name.encode(), b"desc-" + name.encode())
    return client


def test_longest_run_answers(registry) -> None:
    full, branch = chain(NS, BASE), chain(NS, BRANCH)
    h1 = holder_client(registry, "h1")
    h1.publish(full[:3], [10, 11, 12])
    h2 = holder_client(registry, "h2")
    h2.publish(full[:8], list(range(20, 28)))
    h3 = holder_client(registry, "h3")
    h3.publish(branch, list(range(30, 40)))
    h4 = holder_client(registry, "h4", OTHER_NS)
    h4.publish(chain(OTHER_NS, BASE), list(range(10)))
    q = registry.connect("query")

    assert q.lookup(NS, full) == (h2.holder_id, 8)
    assert q.lookup(NS, branch) == (h3.holder_id, 10)
    assert q.lookup(NS, full[:4]) == (h3.holder_id, 4)  # h2 and h3 tie: newest wins
    assert q.lookup(NS, full[:5] + branch[5:]) == (h2.holder_id, 5)  # partial run
    assert h2.lookup(NS, full) == (h3.holder_id, 4)  # the caller never finds itself
    assert h3.lookup(NS, branch) == (h2.holder_id, 4)
    assert q.lookup(NS, chain(NS, [5, 6, 7, 8])) == (None, 0)
    # Namespaces are isolated, even when asked with the other namespace's keys.
    assert q.lookup(OTHER_NS, chain(OTHER_NS, BASE)) == (h4.holder_id, 10)
    assert q.lookup(OTHER_NS, full) == (None, 0)
    assert q.lookup(NS, chain(OTHER_NS, BASE)) == (None, 0)

    grant = q.lease(NS, full, ttl_ms=5000)
    assert grant is not None
    assert (grant.holder_id, grant.holder_name, grant.descriptor) == (
        h2.holder_id,
        "h2",
        b"desc-h2",
    )
    assert grant.locations == list(range(20, 28))
    assert grant.expires_at_ns > time.monotonic_ns()
    # h2 withdraws blocks 4..7 while they are leased: they retire and stop counting.
    assert h2.unpublish(list(range(24, 28))) == ([], 4)
    assert q.lookup(NS, full) == (h3.holder_id, 4)
    assert q.lease(NS, full, ttl_ms=5000, min_blocks=5) is None
    q.release_leases([grant.lease_id])
    assert sorted(h2.sync()) == list(range(24, 28))
    status = q.status()
    assert (status.lease_requests, status.leases_granted, status.blocks_leased) == (2, 1, 8)


def test_hint_agrees_with_rpc_from_another_process(registry, holders) -> None:
    full, branch = chain(NS, BASE), chain(NS, BRANCH)
    rng = random.Random(11)
    a = holders(registry.socket_path, NS, "A", full[:8])
    holders(registry.socket_path, NS, "B", branch)
    mover = holder_client(registry, "mover")
    mover.publish(full, list(range(10)))
    me = holder_client(registry, "me")  # a holder too: its own entries must not count
    me.publish(full + branch, list(range(20)))
    queries = [
        full, full[:1], full[:3], branch, branch[:6], full[:4] + branch[4:],
        full[:5] + [rng.randbytes(16)] + full[6:], [rng.randbytes(16) for _ in range(64)],
        full + chain(NS, BASE + list(range(100, 200))),  # long: the numpy path
    ]  # fmt: skip

    def check(expect_full: int) -> None:
        for keys in queries:
            assert me.longest_run_hint(keys) == me.lookup(NS, keys)[1]
        assert me.longest_run_hint(full) == expect_full

    check(10)
    mover.unpublish([9, 8, 7])
    check(8)
    mover.unpublish(list(range(7)))
    check(8)  # A still has 8
    a.kill()
    wait_until(lambda: me.lookup(NS, full)[1] == 4, 2.0)
    check(4)  # only B's shared 4 blocks are left
    mover.publish(full[:6], list(range(6)))
    check(6)


def test_leases_pin_entries_until_release_or_expiry(registry) -> None:
    keys = chain(NS, BASE[:16])  # 4 blocks
    a = holder_client(registry, "a")
    a.publish(keys, [0, 1, 2, 3])
    q = registry.connect("q")
    first = q.lease(NS, keys[:2], ttl_ms=60_000)
    second = q.lease(NS, keys, ttl_ms=300)
    leased_at = time.monotonic()
    assert a.reclaim(10) == []  # everything is leased
    assert a.unpublish([0, 1, 2]) == ([], 3)
    assert a.sync() == []
    assert q.status().active_leases == 2
    # The short lease ends by itself; its retiring block 2 comes back, 0 and 1 stay pinned.
    wait_until(lambda: a.sync() == [2], 2.0)
    assert time.monotonic() - leased_at >= 0.29
    assert a.reclaim(10) == [3]  # no longer leased, so reclaimable
    q.release_leases([first.lease_id])
    assert sorted(a.sync()) == [0, 1]
    q.release_leases([first.lease_id, second.lease_id])  # idempotent
    status = q.status()
    assert (status.active_leases, status.published_blocks) == (0, 0)


def test_capacity_bound_evicts_oldest_unleased(start_registry) -> None:
    registry = start_registry("--capacity", "8")
    a_keys, b_keys = chain(NS, BASE[:24]), chain(NS, BRANCH[:16] + list(range(500, 540)))
    a = holder_client(registry, "a")
    b = holder_client(registry, "b")
    q = registry.connect("q")
    assert a.publish(a_keys, list(range(6))) == []
    pinned = q.lease(NS, a_keys[2:4], ttl_ms=60_000)  # pins a's blocks 2 and 3
    assert pinned is not None and pinned.locations == [2, 3]
    assert b.publish(b_keys[:4], list(range(4))) == []
    assert a.sync() == [0, 1]  # a's two oldest went to make room
    assert q.status().published_blocks == 8
    assert b.publish(b_keys[4:10], list(range(4, 10))) == [0, 1, 2, 3]  # b's own oldest
    assert sorted(a.sync()) == [4, 5]  # leased 2 and 3 survive
    status = q.status()
    assert status.published_blocks == 8
    assert status.blocks_released_lru == 8
    assert q.lookup(NS, a_keys[2:4]) == (a.holder_id, 2)


def test_holder_death_is_noticed_within_two_seconds(registry, holders, socket_dir) -> None:
    full = chain(NS, BASE)
    shm_dir = holder_file_dirs()[0]
    a = holders(registry.socket_path, NS, "A", full, cleanup_paths=[
        holder_file(shm_dir, "{pid}", "a.pages"), holder_file(shm_dir, "{pid}", "link")])
    shm, link = holder_file(shm_dir, a.pid, "a.pages"), holder_file(shm_dir, a.pid, "link")
    decoy = os.path.join(socket_dir, "not-ours")
    for path in (shm, decoy):
        with open(path, "wb") as f:
            f.write(b"x")
    os.symlink(decoy, link)
    q = registry.connect("q")
    assert q.lookup(NS, full) == (a.holder_id, 10)
    assert q.longest_run_hint(full) == 10
    grant = q.lease(NS, full, ttl_ms=60_000)
    assert grant is not None

    killed_at = time.monotonic()
    a.kill()
    wait_until(lambda: q.lookup(NS, full) == (None, 0) and q.longest_run_hint(full) == 0, 2.0)
    assert time.monotonic() - killed_at < 2.0
    assert q.lease(NS, full, ttl_ms=1000) is None
    q.release_leases([grant.lease_id])  # a lease on a dead holder: harmless
    # Its files go once its process is certainly gone (the registry checks every 0.5 s).
    wait_until(lambda: not os.path.exists(shm), 2.0)
    assert time.monotonic() - killed_at < 2.5
    # Only regular files: the symlink stays, the decoy too.
    assert os.path.islink(link) and os.path.exists(decoy)
    os.unlink(link)
    status = q.status()
    assert (status.holders, status.holders_lost, status.active_leases) == ([], 1, 0)


def test_holder_death_with_an_inherited_socket(registry, holders) -> None:
    """The holder dies but a child keeps its connection open: only the pid check sees it."""
    full = chain(NS, BASE)
    a = holders(registry.socket_path, NS, "A", full, fork_child=True)
    q = registry.connect("q")
    assert q.lookup(NS, full) == (a.holder_id, 10)
    killed_at = time.monotonic()
    a.kill()  # the child lives on with the socket
    wait_until(lambda: q.lookup(NS, full) == (None, 0), 2.0)
    assert q.longest_run_hint(full) == 0
    assert time.monotonic() - killed_at < 2.0
    assert q.list_holders() == []


def test_holder_bits_are_reused_and_the_limit_holds(registry) -> None:
    clients = [holder_client(registry, f"h{i}") for i in range(64)]
    assert sorted(c.holder_bit for c in clients) == list(range(64))
    extra = registry.connect("extra")
    with pytest.raises(RegistryError) as err:
        extra.register_holder(NS, "extra", b"", b"")
    assert err.value.code == "full"  # and the connection stays usable:
    freed = clients[17].holder_bit
    clients[17].close()
    wait_until(lambda: len(extra.list_holders()) == 63, 2.0)
    assert extra.register_holder(NS, "extra", b"", b"").holder_bit == freed
