"""Leasing a run by its last key (``LeaseChain``): the registry follows the parent links its
holder published, all of the run or nothing; the importer checks the links against keys
of its own and leases by every key when they are not whole or do not match."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from registry_helpers import namespace

from kvmkt_connector.registry.index import PrefixRegistry
from kvmkt_connector.registry.records import RequestRejected

NS = namespace("chains")


def _keys(label: str, n: int) -> list[bytes]:
    return [f"{label}{i:05d}".encode().ljust(16, b".") for i in range(n)]


def _parents(keys: list[bytes]) -> list[bytes]:
    return [b""] + keys[:-1]


def _holder(reg: PrefixRegistry, name: str) -> int:
    return reg.register_holder(namespace=NS, name=name, pid=1).holder_id


def test_a_whole_chain_is_leased_from_its_last_key() -> None:
    reg = PrefixRegistry(1000)
    a = _holder(reg, "a")
    keys = _keys("a", 12)
    reg.publish(a, keys[:5], [50 + i for i in range(5)], _parents(keys)[:5])
    reg.publish(a, keys[5:], [50 + i for i in range(5, 12)], _parents(keys)[5:])  # a later step
    grant = reg.lease_chain(NS, keys[-1], 12, 1000)
    assert grant.keys == keys and grant.locations == [50 + i for i in range(12)]
    assert reg.active_leases == 1 and reg.holder(a).leased == 12
    part = reg.lease_chain(NS, keys[9], 4, 1000)  # a run that starts past block 0
    assert part.keys == keys[6:10]
    assert reg.lease_chain(NS, keys[9], 11, 1000) is None  # block 9 has only 9 before it
    assert reg.lease_chain(NS, keys[-1], 12, 1000, exclude_holder=a) is None
    with pytest.raises(RequestRejected):
        reg.lease_chain(NS, b"short", 1, 1000)


def test_a_broken_or_unlinked_chain_is_no_match() -> None:
    reg = PrefixRegistry(1000)
    a = _holder(reg, "a")
    keys = _keys("a", 8)
    reg.publish(a, keys, list(range(8)), _parents(keys))
    reg.unpublish(a, [3])  # a block in the middle goes
    assert reg.lease_chain(NS, keys[-1], 8, 1000) is None
    assert reg.lease_chain(NS, keys[-1], 4, 1000).keys == keys[4:]
    unlinked = _keys("u", 4)
    reg.publish(a, unlinked, list(range(10, 14)))  # published without parents
    assert reg.lease_chain(NS, unlinked[-1], 4, 1000) is None
    assert reg.lease_chain(NS, unlinked[-1], 1, 1000).keys == unlinked[-1:]
    assert reg.lease(NS, unlinked, 1000).keys == unlinked  # by every key, as before


def test_the_chain_comes_from_one_holder_that_lists_all_of_it() -> None:
    reg = PrefixRegistry(1000)
    a, b = _holder(reg, "a"), _holder(reg, "b")
    keys = _keys("k", 6)
    reg.publish(a, keys, list(range(6)), _parents(keys))
    reg.publish(b, keys[3:], list(range(3)), _parents(keys)[3:])  # b lacks the first half
    grant = reg.lease_chain(NS, keys[-1], 6, 1000)  # b is newer but broken: a answers
    assert grant.holder_id == a and grant.locations == list(range(6))
    assert reg.lease_chain(NS, keys[-1], 3, 1000).holder_id == b  # newest holder first
    assert reg.lease_chain(NS, keys[-1], 6, 1000, exclude_holder=a) is None


def test_parent_cycles_cannot_make_a_walk_longer_than_the_listing() -> None:
    """A holder can publish any links; a cycle must not make the registry walk (or lease)
    more entries than that holder lists."""
    reg = PrefixRegistry(1000)
    a = _holder(reg, "a")
    x, y = _keys("c", 2)
    reg.publish(a, [x, y], [0, 1], [y, x])
    assert reg.lease_chain(NS, y, 10**9, 1000) is None  # answered at once
    assert reg.lease_chain(NS, y, 3, 1000) is None
    assert len(reg.lease_chain(NS, y, 2, 1000).keys) == 2


def test_a_republish_updates_the_links() -> None:
    reg = PrefixRegistry(1000)
    a = _holder(reg, "a")
    keys = _keys("r", 4)
    reg.publish(a, keys, list(range(4)))  # no links yet
    assert reg.lease_chain(NS, keys[-1], 4, 1000) is None
    reg.publish(a, keys, list(range(4)), _parents(keys))  # same locations, now linked
    assert reg.lease_chain(NS, keys[-1], 4, 1000).keys == keys


# ---------------------------------------------------------------- the importer


def _planner(registry, bs: int):
    from kvmkt_connector.config import MarketplaceConfig
    from kvmkt_connector.connector.importer import ImportPlanner
    from kvmkt_connector.connector.registry_link import RegistryLink
    from kvmkt_connector.metrics import MarketplaceStats

    cfg = MarketplaceConfig(registry_socket=registry.socket_path, registry_autostart=False,
                            min_import_tokens=bs)  # fmt: skip
    stats = MarketplaceStats()
    link = RegistryLink(cfg, "importer", stats)
    return ImportPlanner(cfg, bs, link, stats, usable=lambda _d, locations: len(locations)), link


def _request(rid: str, tokens: list[int]) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, num_tokens=len(tokens), all_token_ids=tokens,
                           kv_transfer_params=None)  # fmt: skip


def test_the_importer_leases_by_the_last_key_and_hashes_no_key_list(registry) -> None:
    """A chat-shaped prompt: a published 40-block prefix, then a user turn nobody has. The
    planner bisects to the prefix's end, leases it by its last key and never computes the
    list of all keys (PrefixKeys stays empty)."""
    from kvmkt_connector.hashing import PrefixKeys

    bs, root = 4, b"chain-root"
    shared = list(range(1000, 1000 + 40 * bs))
    keys = PrefixKeys(root, bs).extend(shared)
    holder = registry.connect("holder")
    holder.register_holder(NS, "holder", b"", b"d")
    holder.publish(keys, list(range(100, 140)), parents=_parents(keys))
    planner, link = _planner(registry, bs)
    prompt = shared + list(range(7, 7 + 9 * bs + 1))
    mine = PrefixKeys(root, bs)
    assert planner.match(_request("r0", prompt), mine, NS, 0) == 40 * bs
    assert mine.keys == []  # no key list was computed
    state = planner._requests["r0"]
    assert state.keys == keys and state.lease.locations == list(range(100, 140))
    # A local prefix-cache hit on the first 10 blocks: the lease starts there.
    assert planner.match(_request("r1", prompt), PrefixKeys(root, bs), NS, 10 * bs) == 30 * bs
    assert planner._requests["r1"].keys == keys[10:]
    link.close()
    holder.close()


def test_links_that_do_not_match_the_prompt_are_not_trusted(registry, caplog) -> None:
    """A holder whose last block links into another prefix: the walk is whole but names
    other keys. The importer sees its own first key differ, leases by every key instead and
    gets the true run."""
    from kvmkt_connector.hashing import PrefixKeys

    bs, root = 4, b"liar-root"
    tokens = list(range(5000, 5000 + 16 * bs))
    keys = PrefixKeys(root, bs).extend(tokens)
    other = PrefixKeys(root, bs).extend(list(range(9000, 9000 + 15 * bs)))
    holder = registry.connect("holder")
    holder.register_holder(NS, "liar", b"", b"d")
    holder.publish(other, list(range(15)), parents=_parents(other))
    lying = _parents(keys)
    lying[-1] = other[-1]  # the last block "follows" the other prefix
    holder.publish(keys, list(range(100, 116)), parents=lying)
    planner, link = _planner(registry, bs)
    mine = PrefixKeys(root, bs)
    with caplog.at_level(logging.WARNING):
        assert planner.match(_request("r0", tokens + [1]), mine, NS, 0) == 16 * bs
    assert "parent links do not match" in caplog.text
    state = planner._requests["r0"]
    assert state.keys == keys and state.lease.locations == list(range(100, 116))
    with registry.connect("watch") as watch:  # the lease on the wrong chain was given back
        assert watch.status().active_leases == 1
    link.close()
    holder.close()
