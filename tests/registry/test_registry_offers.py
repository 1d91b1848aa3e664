"""The offer feed (``Offers``): tokens published with blocks, their listing changes, and
snapshots in pages that a new reader follows to the whole state."""

from __future__ import annotations

from array import array

import pytest
from registry_helpers import BLOCK_SIZE, chain, namespace, wait_until

from kvmkt_connector.registry.client import RegistryError
from kvmkt_connector.registry.framing import encode_frame
from kvmkt_connector.registry.offers import OfferCatalog
from kvmkt_connector.registry.protocol import (
    MAX_BLOCK_TOKEN_BYTES,
    MAX_FRAME_BYTES,
    MAX_OFFER_CHANGES,
    MAX_OFFER_TOKEN_BYTES,
    BlockTokens,
    OfferFeed,
    publish_chunks,
)

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


def test_a_block_listed_again_without_tokens_stays_described(registry) -> None:
    """A second holder listing described blocks without their tokens: the description
    stays while either lists them, with the second holder's bit, and goes when neither does
    (an importer's re-offer still sends the tokens: the exporter may withdraw first)."""
    keys, blocks = described(NS, TOKENS)
    a = holder(registry, "exporter")
    a.publish(keys, list(range(len(keys))), blocks)
    b = holder(registry, "importer")
    b.publish(keys, list(range(100, 100 + len(keys))))  # the re-offer: no tokens
    reader = registry.connect("reader")
    feed = reader.offers(NS)
    assert {(c.key, c.holder_bit) for c in feed.changes if c.listed} == {
        (k, bit) for k in keys for bit in (a.holder_bit, b.holder_bit)}
    a.unpublish(list(range(len(keys))))  # the exporter evicts them
    now = reader.offers(NS)
    assert [(c.key, c.holder_bit, c.block) for c in now.changes] == [
        (k, b.holder_bit, blk) for k, blk in zip(keys, blocks, strict=True)]
    b.unpublish(list(range(100, 100 + len(keys))))
    assert reader.offers(NS).changes == []


def test_bounds_gap_and_restart_mean_snapshot() -> None:
    catalog = OfferCatalog(max_described=3, max_changes=4)
    keys, blocks = described(NS, TOKENS)
    bits = {k: [0] for k in keys}
    catalog.describe(NS, blocks, lambda k: bits[k])
    assert catalog.described_blocks == 3  # the rest are never announced
    feed = catalog.read(NS, catalog.feed_id, 0, 10)
    assert not feed.snapshot and [c.key for c in feed.changes] == keys[:3]  # 3 changes kept of 4
    feed = catalog.read(NS, catalog.feed_id, 0, 2)
    assert feed.more and len(feed.changes) == 2 and feed.cursor == 2  # cut at max_changes
    for bit in (1, 2, 3):  # 3 more changes: change 1 falls out of the kept window
        catalog.key_listed(keys[0], bit)
    assert catalog.read(NS, catalog.feed_id, 0, 10).snapshot  # too old: a snapshot
    assert catalog.read(NS, catalog.feed_id + 1, feed.cursor, 10).snapshot  # another registry's
    snap = catalog.read(NS, 0, 0, 10).changes
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


def many(n: int, token_bytes: int = 16, start: int = 0) -> list[BlockTokens]:
    """``n`` unrelated one-block prefixes (keys need not be real for the catalog)."""
    return [BlockTokens(i.to_bytes(16, "big"), b"", i.to_bytes(4, "little") * (token_bytes // 4))
            for i in range(start, start + n)]  # fmt: skip


def follow(read, between=lambda page: None) -> tuple[set, list[OfferFeed]]:
    """What a new reader ends up with, (key, holder bit) listed, reading while ``more``:
    ``read(feed_id, cursor, after)`` answers an Offers request; ``between(page number)`` may
    change the catalog after each snapshot page. Also returns the snapshot's pages."""
    feed = read(0, 0, 0)
    assert feed.snapshot
    pages = [feed]
    state = {(c.key, c.holder_bit) for c in feed.changes}
    while feed.more:
        if feed.after:
            between(len(pages))
        paging = feed.after
        feed = read(feed.feed_id, feed.cursor, feed.after)
        assert not feed.snapshot  # the same snapshot goes on, or changes since it
        if paging:
            pages.append(feed)
        for c in feed.changes:
            (state.add if c.listed else state.discard)((c.key, c.holder_bit))
    return state, pages


def test_a_new_reader_gets_every_listing_of_a_large_registry(start_registry) -> None:
    """6,000 listings: a new reader used to get 4,096 of them with more=False, then only
    later changes (it never learnt the rest)."""
    registry = start_registry("--capacity", "10000")
    a = holder(registry, "a")
    blocks = many(6000)
    for msg in publish_chunks([b.key for b in blocks], list(range(6000)), blocks):
        a.publish(msg.keys, msg.locations, msg.tokens)
    reader = registry.connect("reader")

    def read(feed_id: int, cursor: int, after: int) -> OfferFeed:
        if not after:  # as a reader of protocol 2 would ask
            return reader.offers(NS, feed_id, cursor)
        return reader.offers(NS, feed_id, cursor, after=after)

    state, pages = follow(read)
    assert state == {(b.key, a.holder_bit) for b in blocks}
    assert [len(p.changes) for p in pages] == [4096, 1904]  # no listing twice, none lost


def test_pages_of_a_snapshot_that_changes_meanwhile() -> None:
    catalog = OfferCatalog()
    blocks = many(6000)
    catalog.describe(NS, blocks, lambda k: [0])
    catalog.describe(OTHER_NS, many(3000, start=10_000), lambda k: [1])  # not NS's

    def read(feed_id: int, cursor: int, after: int) -> OfferFeed:
        return catalog.read(NS, feed_id, cursor, MAX_OFFER_CHANGES, after)

    state, pages = follow(read)
    assert state == {(b.key, 0) for b in blocks} and len(pages) == 2
    assert pages[0].more and pages[0].after and not pages[1].more and not pages[1].after
    assert read(pages[1].feed_id, pages[1].cursor, 0).changes == []

    # The catalog changes while a reader pages: what it ends up with is the state then.
    listed = {(b.key, 0) for b in blocks}
    newer = many(100, start=6000)

    def churn(page: int) -> None:
        for key in (blocks[10].key, blocks[5000].key):  # one already read, one not yet
            catalog.key_unlisted(key, 0)
            listed.discard((key, 0))
        catalog.key_listed(blocks[4500].key, 3)  # another holder lists one not yet read
        listed.add((blocks[4500].key, 3))
        catalog.describe(NS, newer, lambda k: [2])  # published meanwhile
        listed.update((b.key, 2) for b in newer)

    state, pages = follow(read, churn)
    assert len(pages) == 2 and state == listed


def test_snapshot_pages_stay_within_the_token_budget() -> None:
    """Tokens travel with every listing: 3 holders of 4 KiB blocks used to make a first
    page of 1,536 listings, 6 MiB of tokens (the budget counted each block once)."""
    catalog = OfferCatalog()
    blocks = many(2000, token_bytes=4096)
    catalog.describe(NS, blocks, lambda k: [0, 1, 2])
    state, pages = follow(lambda f, c, after: catalog.read(NS, f, c, MAX_OFFER_CHANGES, after))
    assert state == {(b.key, bit) for b in blocks for bit in range(3)}
    for page in pages:
        assert sum(len(c.block.tokens) for c in page.changes) <= MAX_OFFER_TOKEN_BYTES
        assert len(page.changes) <= MAX_OFFER_CHANGES
        assert len(encode_frame(page)) < MAX_FRAME_BYTES
    # A page holds whole blocks: a block's listings never straddle two pages.
    assert all(len(p.changes) % 3 == 0 for p in pages)
    # Read as changes (a reader that follows from the start): the same budget, give or
    # take one block.
    feed = catalog.read(NS, catalog.feed_id, 0, MAX_OFFER_CHANGES)
    assert feed.more and not feed.snapshot
    tokens = sum(len(c.block.tokens) for c in feed.changes)
    assert tokens <= MAX_OFFER_TOKEN_BYTES + MAX_BLOCK_TOKEN_BYTES


def test_a_paged_snapshot_starts_over_when_its_changes_are_gone() -> None:
    """A reader that pages slower than the feed keeps changes could not fix what changed
    meanwhile: it gets a new snapshot, not a stale one."""
    catalog = OfferCatalog(max_changes=100)
    blocks = many(5000)
    catalog.describe(NS, blocks, lambda k: [0])
    first = catalog.read(NS, 0, 0, MAX_OFFER_CHANGES)
    assert first.after
    for bit in range(1, 102):  # 101 changes: the snapshot's first later change is gone
        catalog.key_listed(blocks[-1].key, bit)
    again = catalog.read(NS, first.feed_id, first.cursor, MAX_OFFER_CHANGES, first.after)
    assert again.snapshot and again.after and again.cursor > first.cursor
    # Nonsense (a page after the snapshot's own change): a new snapshot too.
    assert catalog.read(NS, again.feed_id, again.cursor, 10, again.cursor + 1).snapshot
