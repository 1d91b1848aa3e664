"""The offer feed (``Offers``): tokens published with blocks, and their listing changes."""

from __future__ import annotations

from array import array

import pytest
from registry_helpers import BLOCK_SIZE, chain, namespace, wait_until

from kvmkt_connector.registry.client import RegistryError
from kvmkt_connector.registry.offers import OfferCatalog
from kvmkt_connector.registry.protocol import BlockTokens

NS = namespace("offers")
OTHER_NS = namespace("offers-other")
TOKENS = list(range(100, 124))  # 6 blocks


def described(ns: bytes, tokens: list[int]) -> tuple[list[bytes], list[BlockTokens]]:
    keys = chain(ns, tokens)
    blocks = [
        BlockTokens(k, keys[i - 1] if i else b"",
                    array("I", tokens[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]).tobytes())
        for i, k in enumerate(keys)
    ]  # fmt: skip
    return keys, blocks


def holder(registry, name: str, ns: bytes = NS):
    client = registry.connect(name)
    client.register_holder(ns, name, b"fp", b"desc-" + name.encode())
    return client


def test_feed_snapshot_changes_and_holder_death(registry) -> None:
    keys, blocks = described(NS, TOKENS)
    a = holder(registry, "a")
    a.publish(keys, list(range(len(keys))), blocks)
    b = holder(registry, "b", OTHER_NS)  # another namespace: never in NS's feed
    okeys, oblocks = described(OTHER_NS, TOKENS)
    b.publish(okeys, list(range(len(okeys))), oblocks)
    reader = registry.connect("reader")

    feed = reader.offers(NS)
    assert feed.snapshot and not feed.more
    assert [c.key for c in feed.changes] == keys
    assert all(c.listed and c.holder_bit == a.holder_bit for c in feed.changes)
    assert [c.block for c in feed.changes] == blocks  # tokens and parents as published
    assert [(h.holder_id, h.descriptor) for h in feed.holders] == [(a.holder_id, b"desc-a")]

    nothing = reader.offers(NS, feed.feed_id, feed.cursor)
    assert not nothing.snapshot and nothing.changes == []

    a.unpublish([4, 5])  # withdraws the last two blocks
    feed2 = reader.offers(NS, feed.feed_id, nothing.cursor)
    assert [(c.key, c.listed) for c in feed2.changes] == [(keys[4], False), (keys[5], False)]

    a.close()  # the holder dies: everything it listed goes
    removed: list[bytes] = []
    cursor = feed2.cursor

    def gone() -> bool:
        nonlocal cursor
        more = reader.offers(NS, feed.feed_id, cursor)
        cursor = more.cursor
        removed.extend(c.key for c in more.changes if not c.listed)
        return len(removed) >= 4

    wait_until(gone, 5.0)
    assert sorted(removed) == sorted(keys[:4])
    assert reader.offers(NS).changes == []  # a fresh snapshot is empty too


def test_bounds_gap_and_restart_mean_snapshot() -> None:
    catalog = OfferCatalog(max_described=3, max_changes=4)
    keys, blocks = described(NS, TOKENS)
    bits = {k: [0] for k in keys}
    catalog.describe(NS, blocks, lambda k: bits[k])
    assert catalog.described_blocks == 3  # the rest are never announced
    cursor, snapshot, more, changes = catalog.read(NS, catalog.feed_id, 0, 10)
    assert not snapshot and [c.key for c in changes] == keys[:3]  # 3 changes kept of 4
    cursor, snapshot, more, changes = catalog.read(NS, catalog.feed_id, 0, 2)
    assert more and len(changes) == 2 and cursor == 2  # cut at max_changes
    for bit in (1, 2, 3):  # 3 more changes: change 1 falls out of the kept window
        catalog.key_listed(keys[0], bit)
    assert catalog.read(NS, catalog.feed_id, 0, 10)[1]  # too old: a snapshot
    assert catalog.read(NS, catalog.feed_id + 1, cursor, 10)[1]  # another registry's feed
    snap = catalog.read(NS, 0, 0, 10)[3]
    assert sorted((c.key, c.holder_bit) for c in snap) == sorted(
        [(keys[0], b) for b in range(4)] + [(keys[1], 0), (keys[2], 0)]
    )
    for bit in range(4):
        catalog.key_unlisted(keys[0], bit)
    assert catalog.described_blocks == 2  # tokens are dropped with the last listing


@pytest.mark.parametrize("bad", [
    BlockTokens(b"x" * 16, b"", b"\0" * 16),  # a key not in this publish
    BlockTokens(b"k" * 16, b"p", b"\0" * 16),  # short parent
    BlockTokens(b"k" * 16, b"", b"\0" * 15),  # not whole uint32s
    BlockTokens(b"k" * 16, b"", b""),  # no tokens
])
def test_bad_block_tokens_are_refused(registry, bad: BlockTokens) -> None:
    a = holder(registry, "a")
    with pytest.raises(RegistryError):
        a.publish([b"k" * 16], [1], [bad])
    reader = registry.connect("r")
    assert reader.lookup(NS, [b"k" * 16]) == (None, 0)  # the whole publish was refused
    assert reader.offers(NS).changes == []
    a.publish([b"k" * 16], [1])  # the connection is still usable
