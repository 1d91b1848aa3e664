"""Leasing a run by its last key (``LeaseChain``): the registry follows the parent links its
holder published, all of the run or nothing; the importer checks the links against keys
of its own and leases by every key when they are not whole or do not match."""

from __future__ import annotations

import logging

import pytest
from registry_helpers import (
    import_planner,
    import_tokens,
    linked_holder,
    namespace,
    parents,
    planner_request,
)

from kvmkt_connector.registry import index
from kvmkt_connector.registry.framing import encode_frame
from kvmkt_connector.registry.index import PrefixRegistry
from kvmkt_connector.registry.leases import MAX_LEASE_RUN
from kvmkt_connector.registry.protocol import LeaseGranted
from kvmkt_connector.registry.records import RequestRejected

NS = namespace("chains")


def _keys(label: str, n: int) -> list[bytes]:
    return [f"{label}{i:05d}".encode().ljust(16, b".") for i in range(n)]



def _holder(reg: PrefixRegistry, name: str) -> int:
    return reg.register_holder(namespace=NS, name=name, pid=1).holder_id


def test_a_whole_chain_is_leased_from_its_last_key() -> None:
    reg = PrefixRegistry(1000)
    a = _holder(reg, "a")
    keys = _keys("a", 12)
    reg.publish(a, keys[:5], [50 + i for i in range(5)], parents(keys)[:5])
    reg.publish(a, keys[5:], [50 + i for i in range(5, 12)], parents(keys)[5:])  # a later step
    grant = reg.lease_chain(NS, keys[-1], 12, 1000)
    assert grant.keys == keys and grant.locations == [50 + i for i in range(12)]
    assert reg.active_leases == 1 and reg.holder(a).leased == 12
    part = reg.lease_chain(NS, keys[9], 4, 1000, head_parent=keys[5])  # past block 0
    assert part.keys == keys[6:10]
    assert reg.lease_chain(NS, keys[9], 4, 1000) is None  # it must start where asked
    assert reg.lease_chain(NS, keys[9], 4, 1000, head_parent=keys[4]) is None
    assert reg.lease_chain(NS, keys[9], 11, 1000) is None  # block 9 has only 9 before it
    assert reg.lease_chain(NS, keys[-1], 12, 1000, exclude_holder=a) is None
    with pytest.raises(RequestRejected):
        reg.lease_chain(NS, b"short", 1, 1000)


def test_a_broken_or_unlinked_chain_is_no_match() -> None:
    reg = PrefixRegistry(1000)
    a = _holder(reg, "a")
    keys = _keys("a", 8)
    reg.publish(a, keys, list(range(8)), parents(keys))
    reg.unpublish(a, [3])  # a block in the middle goes
    assert reg.lease_chain(NS, keys[-1], 8, 1000) is None
    assert reg.lease_chain(NS, keys[-1], 4, 1000, head_parent=keys[3]).keys == keys[4:]
    unlinked = _keys("u", 4)
    reg.publish(a, unlinked, list(range(10, 14)))  # published without parents
    assert reg.lease_chain(NS, unlinked[-1], 4, 1000) is None
    assert reg.lease_chain(NS, unlinked[-1], 1, 1000).keys == unlinked[-1:]  # (parent b"")
    assert reg.lease(NS, unlinked, 1000).keys == unlinked  # by every key, as before


def test_the_chain_comes_from_one_holder_that_lists_all_of_it() -> None:
    reg = PrefixRegistry(1000)
    a, b = _holder(reg, "a"), _holder(reg, "b")
    keys = _keys("k", 6)
    reg.publish(a, keys, list(range(6)), parents(keys))
    reg.publish(b, keys[3:], list(range(3)), parents(keys)[3:])  # b lacks the first half
    grant = reg.lease_chain(NS, keys[-1], 6, 1000)  # b is newer but broken: a answers
    assert grant.holder_id == a and grant.locations == list(range(6))
    assert reg.lease_chain(NS, keys[-1], 3, 1000, head_parent=keys[2]).holder_id == b  # newest
    assert reg.lease_chain(NS, keys[-1], 6, 1000, exclude_holder=a) is None


def test_parent_cycles_are_never_leased() -> None:
    """A holder can publish any links. A walk is bounded by what the holder lists and by
    MAX_LEASE_RUN, and a cycle never ends at the caller's head, so it is never leased."""
    reg = PrefixRegistry(10_000)
    a = _holder(reg, "a")
    filler = _keys("f", 5000)
    reg.publish(a, filler, list(range(100, 5100)))
    x, y = _keys("c", 2)
    reg.publish(a, [x, y], [0, 1], [y, x])
    assert reg.lease_chain(NS, y, 10**9, 1000) is None  # answered at once
    assert reg.lease_chain(NS, y, reg.holder(a).listed, 1000) is None  # walked, not leased
    assert reg.lease_chain(NS, y, 2, 1000) is None
    assert reg.lease_chain(NS, y, 2, 1000, head_parent=y) is not None  # (only if asked for)
    assert reg.active_leases == 1


def test_a_lease_reply_fits_a_frame(monkeypatch) -> None:
    """A grant carries a location and a key per block: at MAX_LEASE_RUN blocks of the worst
    sizes it still fits a frame, and a Lease of more keys leases at most that many."""
    worst = LeaseGranted(2**62, 2**62, "h" * 256, b"d" * 4096, [2**63 - 1] * MAX_LEASE_RUN,
                         2**63 - 1, [b"k" * 16] * MAX_LEASE_RUN)
    encode_frame(worst)
    monkeypatch.setattr(index, "MAX_LEASE_RUN", 5)
    reg = PrefixRegistry(1000)
    a = _holder(reg, "a")
    keys = _keys("m", 9)
    reg.publish(a, keys, list(range(9)), parents(keys))
    assert reg.lease(NS, keys, 1000).keys == keys[:5]
    assert reg.lease_chain(NS, keys[4], 5, 1000) is not None
    assert reg.lease_chain(NS, keys[5], 6, 1000) is None


def test_a_republish_updates_the_links() -> None:
    reg = PrefixRegistry(1000)
    a = _holder(reg, "a")
    keys = _keys("r", 4)
    reg.publish(a, keys, list(range(4)))  # no links yet
    assert reg.lease_chain(NS, keys[-1], 4, 1000) is None
    reg.publish(a, keys, list(range(4)), parents(keys))  # same locations, now linked
    assert reg.lease_chain(NS, keys[-1], 4, 1000).keys == keys


# ---------------------------------------------------------------- the importer


def _planner(registry, bs: int, verify_all_keys: bool = True):
    return import_planner(registry.socket_path, bs, verify_all_keys)



@pytest.mark.parametrize("verify_all_keys", [False, True], ids=["in-place", "staged"])
def test_the_importer_leases_by_the_last_key(registry, verify_all_keys) -> None:
    """A chat-shaped prompt: a published 40-block prefix, then a user turn nobody has. The
    planner bisects to the prefix's end and leases it by its last key. For in-place copies
    it never computes the list of all keys (PrefixKeys stays empty); for staged ones, whose
    workers check each page's key, it computes the leased keys to check the grant."""
    from kvmkt_connector.hashing import PrefixKeys

    bs, root = 4, b"chain-root"
    shared = list(range(1000, 1000 + 40 * bs))
    keys = PrefixKeys(root, bs).extend(shared)
    holder = linked_holder(registry, NS, keys, list(range(100, 140)))
    planner, link = _planner(registry, bs, verify_all_keys)
    prompt = shared + list(range(7, 7 + 9 * bs + 1))
    mine = PrefixKeys(root, bs)
    assert import_tokens(planner, planner_request("r0", prompt), mine, NS, 0) == 40 * bs
    assert mine.keys == (keys if verify_all_keys else [])
    state = planner._requests["r0"]
    assert state.keys == keys and state.lease.locations == list(range(100, 140))
    # A local prefix-cache hit on the first 10 blocks: the lease starts there.
    assert import_tokens(planner, planner_request("r1", prompt), PrefixKeys(root, bs), NS, 10 * bs) == 30 * bs
    assert planner._requests["r1"].keys == keys[10:]
    link.close()
    holder.close()


def _lied_to(registry, caplog, verify_all_keys: bool, lie) -> None:
    """A holder publishes a 16-block prompt with the links ``lie(holder, keys, other)``
    returns (``other``: keys of another prefix, which ``lie`` may publish too); the importer
    must see the lie, lease by every key instead, get the true run and give the wrong
    chain's lease back."""
    from kvmkt_connector.hashing import PrefixKeys

    bs, root = 4, b"liar-root"
    tokens = list(range(5000, 5000 + 16 * bs))
    keys = PrefixKeys(root, bs).extend(tokens)
    other = PrefixKeys(root, bs).extend(list(range(9000, 9000 + 15 * bs)))
    holder = registry.connect("holder")
    holder.register_holder(NS, "liar", b"", b"d")
    holder.publish(keys, list(range(100, 116)), parents=lie(holder, keys, other))
    planner, link = _planner(registry, bs, verify_all_keys)
    with caplog.at_level(logging.WARNING):
        assert import_tokens(planner, planner_request("r0", tokens + [1]), PrefixKeys(root, bs), NS, 0) == 16 * bs
    assert "parent links do not match" in caplog.text
    state = planner._requests["r0"]
    assert state.keys == keys and state.lease.locations == list(range(100, 116))
    with registry.connect("watch") as watch:
        assert watch.status().active_leases == 1
    link.close()
    holder.close()


@pytest.mark.parametrize("verify_all_keys", [False, True], ids=["in-place", "staged"])
def test_links_that_do_not_match_the_prompt_are_not_trusted(registry, caplog, verify_all_keys) -> None:
    """The last block links into another prefix: the walk is whole but names other keys
    (the first of them not ours), for in-place and staged importers alike."""

    def lie(holder, keys, other):
        holder.publish(other, list(range(200, 215)), parents=parents(other))
        return parents(keys)[:-1] + [other[-1]]

    _lied_to(registry, caplog, verify_all_keys, lie)


def test_staged_copies_trust_no_link_they_did_not_check(registry, caplog) -> None:
    """Links that lie at block 2 only (K2 "follows" O1, which "follows" K0): the chain is
    whole and the spot-checked keys are right. Staged copies check each page against the
    plan's keys, so the plan must hold our own keys: the importer computes them, sees the
    lie and leases by every key. (Found by review: the plan held the holder's.)"""

    def lie(holder, keys, other):
        holder.publish([other[1]], [200], parents=[keys[0]])
        links = parents(keys)
        links[2] = other[1]
        return links

    _lied_to(registry, caplog, True, lie)
