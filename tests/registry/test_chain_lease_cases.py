"""Chain leases, cases from the second review: KeyProbe.block_key against the key list, the
spot-check positions, legitimate runs that head_parent must not break, and the holes it
found (each test failed before its fix): a location past int64 crashing match() or a
worker, the importer not capping its run at MAX_LEASE_RUN."""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest
from registry_helpers import (
    import_planner,
    import_tokens,
    linked_holder,
    namespace,
    parents,
    planner_request,
)

from kvmkt_connector.connector.importer import ImportPlanner
from kvmkt_connector.hashing import PrefixKeys
from kvmkt_connector.registry import index
from kvmkt_connector.registry.framing import FrameError, encode_frame
from kvmkt_connector.registry.index import PrefixRegistry
from kvmkt_connector.registry.protocol import Lease

NS = namespace("review2")




def _live_planner(registry, bs, verify_all_keys, usable=None):
    return import_planner(registry.socket_path, bs, verify_all_keys, usable)


# ------------------------------------------------------------------ sound: KeyProbe


@pytest.mark.parametrize("seed", range(30))
def test_probe_block_key_matches_the_key_list(seed):
    """block_key(b) for every b < end, whatever PrefixKeys held before the probe (0, fewer,
    more blocks than ``first`` or ``end``) and when PrefixKeys is extended after it."""
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 16])
    n = rng.randint(1, 60)
    tokens = [rng.randrange(1 << 32) for _ in range(n * bs + rng.randint(0, bs - 1))]
    full = PrefixKeys(b"r", bs).extend(tokens)
    pre = PrefixKeys(b"r", bs)
    pre.extend(tokens, upto=rng.randint(0, n) * bs)
    first = rng.randint(0, n)
    end = rng.randint(first, n + 3)
    probe = pre.probe(tokens, first, end)
    order = list(range(min(end, n)))
    rng.shuffle(order)
    for j, b in enumerate(order):
        if j == len(order) // 2:
            pre.extend(tokens, upto=rng.randint(0, n) * bs)  # (the importer's verify path)
        assert probe.block_key(b) == full[b], (b, first, end)
    with pytest.raises(IndexError):
        probe.block_key(max(first, min(end, n)))


# ------------------------------------------------------------------ sound: spot checks


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9, 10, 15, 16, 17, 23, 64, 100, 1000])
def test_spot_check_positions(n):
    """In-place: which grant positions _ours compares. Always 0 and n-1; every position
    while n < 16; 9..12 positions past that (as the README says)."""
    planner = ImportPlanner.__new__(ImportPlanner)
    planner.verify_all_keys = False
    mine = [i.to_bytes(16, "big") for i in range(n)]
    caught = []
    for j in range(n):
        lie = list(mine)
        lie[j] = b"\xff" * 16
        ok = planner._ours(SimpleNamespace(keys=lie), mine, None, None, 0)
        caught.append(not ok)
    assert planner._ours(SimpleNamespace(keys=mine), mine, None, None, 0)
    assert caught[0] and caught[-1]
    if n < 16:
        assert all(caught)
    else:
        assert 9 <= sum(caught) <= 12, sum(caught)


# ------------------------------------------------------------------ sound: head_parent


@pytest.mark.parametrize("verify_all_keys", [False, True], ids=["in-place", "staged"])
@pytest.mark.parametrize("start", [0, 1, 7])
@pytest.mark.parametrize("run", [1, 2, 9])
def test_head_parent_legit_runs(registry, verify_all_keys, start, run):
    """Runs from block 0 (parent b""), runs past a local hit, 1-block runs: leased by chain,
    and with the same PrefixKeys re-queried after it was extended further."""
    bs, root = 2, b"hp-root"
    tokens = list(range(100, 100 + (start + run) * bs)) + [7] * (3 * bs)
    keys = PrefixKeys(root, bs).extend(tokens, upto=(start + run) * bs)
    holder = linked_holder(registry, NS, keys)
    planner, link = _live_planner(registry, bs, verify_all_keys)
    calls = []
    orig = link.call
    link.call = lambda fn: calls.append(fn.__code__.co_names) or orig(fn)
    mine = PrefixKeys(root, bs)
    mine.extend(tokens, upto=(start + run + 2) * bs)  # extended earlier, past the run
    assert import_tokens(planner, planner_request("r", tokens), mine, NS, start * bs) == run * bs
    assert planner._requests["r"].keys == keys[start:]
    assert not any("lease" in names and "lease_chain" not in names for names in calls), calls
    link.close()
    holder.close()


def test_parentless_middle_block_falls_back_to_every_key(registry):
    bs, root = 2, b"pl-root"
    tokens = list(range(300, 300 + 10 * bs)) + [1]
    keys = PrefixKeys(root, bs).extend(tokens)
    links = parents(keys)
    links[5] = b""
    holder = linked_holder(registry, NS, keys, links=links)
    planner, link = _live_planner(registry, bs, False)
    assert import_tokens(planner, planner_request("r", tokens), PrefixKeys(root, bs), NS, 0) == 10 * bs
    assert planner._requests["r"].keys == keys
    link.close()
    holder.close()


# ------------------------------------------------------------------ holes the review found


def test_locations_outside_int64_are_refused_and_a_failing_check_is_a_miss(registry):
    """The registry refuses locations importers cannot decode (they did crash match(), i.e.
    vLLM's scheduler); and whatever makes the importer's page check raise ends in prefill."""
    from kvmkt_connector.registry.client import RegistryError

    bs, root = 2, b"big-root"
    tokens = list(range(10, 10 + 4 * bs)) + [1]
    keys = PrefixKeys(root, bs).extend(tokens)
    holder = registry.connect("holder")
    holder.register_holder(NS, "h", b"", b"d")
    for bad in (2**63, 2**64 - 1):  # (msgpack carries no int below -2^63)
        with pytest.raises(RegistryError, match="locations must be int64"):
            holder.publish(keys, [0, 1, 2, bad], parents=parents(keys))
    holder.publish(keys, [0, 1, 2, 3], parents=parents(keys))

    def broken_check(_desc, _locations):
        raise OverflowError("Python int too large to convert to C long")

    planner, link = _live_planner(registry, bs, False, usable=broken_check)
    try:
        assert import_tokens(planner, planner_request("r", tokens), PrefixKeys(root, bs), NS, 0) == 0
        with registry.connect("watch") as watch:
            assert watch.status().active_leases == 0  # its lease was given back
    finally:
        link.close()
        holder.close()


def test_a_worker_reports_a_job_with_an_undecodable_location_failed(tmp_path):
    """Staged path of the same: _usable takes the lease as is, and LoadRunner.submit builds
    np.asarray(job.src, int64) outside its try, so start_load_kv raises in the worker."""
    import torch

    from kvmkt_connector.connector.loads import LoadRunner
    from kvmkt_connector.connector.metadata import LoadJob
    from kvmkt_connector.metrics import MarketplaceStats
    from kvmkt_connector.transport.descriptors import HolderDescriptor
    from kvmkt_connector.transport.host_shm import HostPageRegion, HostShmImporter
    from kvmkt_connector.transport.layout import KVPageLayout

    layout = KVPageLayout({"l0": torch.zeros(4, 1, 2, 4)}, 4)
    region = HostPageRegion.create(os.path.join(tmp_path, "region"), 2, layout.segment_bytes)
    runner = LoadRunner(layout, 0, MarketplaceStats(), shm_importer=HostShmImporter(layout))
    job = LoadJob(0, "r", 1, HolderDescriptor([region.descriptor]).encode(), [2**63], [1],
                  [b"k" * 16])
    runner.submit(job)  # must report the job failed, not raise
    runner.close()


def test_the_importer_caps_its_run_at_MAX_LEASE_RUN(monkeypatch):
    """hint > MAX_LEASE_RUN: the registry answers every LeaseChain None, so the in-place path
    always hashes every key and leases by Lease (and past ~466k keys the Lease request is
    over MAX_FRAME_BYTES: refused, counted as 'registry unavailable', nothing imported)."""
    from kvmkt_connector.connector import importer

    monkeypatch.setattr(index, "MAX_LEASE_RUN", 5)
    monkeypatch.setattr(importer, "MAX_LEASE_RUN", 5)
    reg = PrefixRegistry(1000)
    hid = reg.register_holder(namespace=NS, name="h", pid=1).holder_id
    bs, root = 2, b"cap-root"
    tokens = list(range(50, 50 + 8 * bs)) + [1]
    keys = PrefixKeys(root, bs).extend(tokens)
    reg.publish(hid, keys, list(range(8)), parents(keys))

    class Client:
        def post_lease_chain(self, ns, tail, blocks, ttl, head_parent=b"", excl=None):
            reply = reg.lease_chain(ns, tail, blocks, ttl, head_parent, excl)
            return SimpleNamespace(result=lambda: reply)

        def lease(self, ns, ks, ttl, mb=1, excl=None):
            return reg.lease(ns, ks, ttl, mb, excl)

    link = SimpleNamespace(own_holder_id=None, epoch=0, call=lambda fn: fn(Client()),
                           hint=lambda probe: len(probe), has_table=lambda: True,
                           result=lambda pending: pending.result(), release_later=lambda ids: None)
    from kvmkt_connector.config import MarketplaceConfig
    from kvmkt_connector.metrics import MarketplaceStats

    planner = ImportPlanner(MarketplaceConfig(min_import_tokens=bs), bs, link,
                            MarketplaceStats(), lambda _d, locs: len(locs))
    planner.verify_all_keys = False
    mine = PrefixKeys(root, bs)
    assert import_tokens(planner, planner_request("r", tokens), mine, NS, 0) == 5 * bs
    with pytest.raises(FrameError):  # (the frame limit, at real sizes)
        encode_frame(Lease(NS, [b"k" * 16] * 470_000, 1000))
    assert mine.keys == [], "in-place lookup hashed every key: the chain was never leasable"
