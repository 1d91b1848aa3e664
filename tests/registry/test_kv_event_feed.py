"""``KvEventFeed`` against a real registry and a real exporter channel: announce, retract
everything when the registry goes, announce again after the exporter publishes again to a
new registry (its token ids included), never count our own exports, and judge each holder's
descriptor once, not per poll. Its bounds (answers per round, one answer's events waiting
until taken) with a registry larger than several answers, a vLLM prefix-cache reset (on
vLLM's own BlockPool), and a holder that starts to count."""

from __future__ import annotations

import time
from array import array

from registry_helpers import BLOCK_SIZE, chain, namespace, wait_until
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.block_writes import ResetWatch
from kvmkt_connector.connector.holder_channel import HolderChannel, HolderRegistration
from kvmkt_connector.connector.kv_events import KvEventFeed
from kvmkt_connector.registry.protocol import MAX_OFFER_CHANGES, BlockTokens, publish_chunks

NS = namespace("feed")
TOKENS = list(range(7, 7 + 6 * BLOCK_SIZE))


def tokens_of(keys: list[bytes]) -> list[BlockTokens]:
    return [BlockTokens(k, keys[i - 1] if i else b"",
                        array("I", TOKENS[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]).tobytes())
            for i, k in enumerate(keys)]  # fmt: skip


class Announced:
    """Applies a feed's events in order, as a router would (llm-d: AllBlocksCleared clears
    all of the pod's blocks, whatever their medium)."""

    def __init__(self, feed: KvEventFeed) -> None:
        self.feed = feed
        self.live: dict = {}
        self.removed = 0

    def __call__(self, events: list | None = None) -> dict:
        for e in self.feed.take_events() if events is None else events:
            if isinstance(e, AllBlocksCleared):
                self.live.clear()
            elif isinstance(e, BlockStored):
                assert e.medium == "KVMKT" and e.block_size == BLOCK_SIZE
                assert e.parent_block_hash is None or e.parent_block_hash in self.live
                for i, h in enumerate(e.block_hashes):
                    self.live[h] = e.token_ids[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
            elif isinstance(e, BlockRemoved):
                for h in e.block_hashes:
                    self.removed += h in self.live
                    self.live.pop(h, None)
        return self.live


def test_feed_follows_the_registry(start_registry) -> None:
    reg = start_registry()
    cfg = MarketplaceConfig(registry_socket=reg.socket_path, registry_autostart=False,
                            kv_events_interval_ms=50, registry_sync_interval_ms=20,
                            min_import_tokens=2 * BLOCK_SIZE)
    keys = chain(NS, TOKENS)
    exporter = HolderChannel(cfg, "a", HolderRegistration(NS, "a", b"fp", b"desc-a"))
    ours = HolderChannel(cfg, "b", HolderRegistration(NS, "b", b"fp", b"desc-b"))
    asked: dict[bytes, int] = {}

    def readable(d: bytes) -> bool:  # opens a holder's files in the connector: asked once
        asked[d] = asked.get(d, 0) + 1
        return d == b"desc-a"

    feed = KvEventFeed(
        cfg, "b", NS, BLOCK_SIZE, readable=readable,
        own_bit=lambda: ours.holder_bit if ours.connected else None,
    )  # fmt: skip
    seen = Announced(feed)
    try:
        wait_until(lambda: exporter.connected and ours.connected, 10)
        ours.publish(keys, list(range(6)), 0, tokens_of(keys))  # our own: never announced
        exporter.publish(keys[:4], list(range(4)), 0, tokens_of(keys[:4]))
        wanted = {maybe_convert_block_hash(k): TOKENS[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
                  for i, k in enumerate(keys[:4])}  # fmt: skip
        wait_until(lambda: seen() == wanted, 10)

        reg.stop()  # no registry, no imports: everything is retracted
        wait_until(lambda: not seen(), 10)
        assert seen.removed == 4

        start_registry()  # same socket: both channels register and publish again
        wait_until(lambda: seen() == wanted, 10)

        # A connector reset (weights may have changed): this instance imports nothing any
        # more, so it retracts everything and announces nothing new.
        feed.stop_announcing()
        assert not seen()
        exporter.publish(keys[4:], [4, 5], 0, tokens_of(keys)[4:])
        time.sleep(0.5)  # ten feed intervals
        assert not seen()
        # Dozens of polls, two registries: each holder's descriptor was judged once.
        assert asked.get(b"desc-a") == 1 and max(asked.values()) == 1
    finally:
        feed.shutdown()
        exporter.close()
        ours.close()


def one_block_prefixes(n: int, start: int = 0) -> list[BlockTokens]:
    return [BlockTokens(i.to_bytes(16, "big"), b"", i.to_bytes(4, "little") * BLOCK_SIZE)
            for i in range(start, start + n)]  # fmt: skip


def publish(client, blocks: list[BlockTokens], first_location: int = 0) -> None:
    keys = [b.key for b in blocks]
    for msg in publish_chunks(keys, range(first_location, first_location + len(keys)), blocks):
        client.publish(msg.keys, msg.locations, msg.tokens)


def manual_feed(reg, **kw) -> KvEventFeed:
    """A feed whose thread never polls by itself (an hour's interval): the test runs its
    rounds with ``poll_round``, as the thread would."""
    cfg = MarketplaceConfig(registry_socket=reg.socket_path, registry_autostart=False,
                            kv_events_interval_ms=3_600_000, min_import_tokens=BLOCK_SIZE,
                            kv_events_max_blocks=50_000)  # fmt: skip
    kw.setdefault("readable", lambda d: True)
    return KvEventFeed(cfg, "b", NS, BLOCK_SIZE, **kw)


def test_rounds_are_bounded_and_events_wait_to_be_taken(start_registry) -> None:
    """33,000 listings need 9 answers: a round reads 8, and announces nothing before the
    snapshot is whole; then one answer's events wait until taken, and no round reads while
    they do (a feed used to read 4,096 of them and nothing more)."""
    reg = start_registry("--capacity", "60000")
    a = reg.connect("a", timeout_s=30)
    a.register_holder(NS, "a", b"fp", b"desc-a")
    publish(a, one_block_prefixes(33_000))
    feed = manual_feed(reg)
    seen = Announced(feed)
    try:
        assert feed.poll_round() == 8 and not feed.has_pending()
        assert feed.poll_round() == 1 and feed.has_pending()  # the last page
        assert feed.poll_round() == 0  # its events wait
        assert len(seen()) == 33_000

        # 5,000 more listings: two answers of changes, each announced only once the events
        # of the one before were taken.
        publish(a, one_block_prefixes(5_000, start=33_000), first_location=33_000)
        taken = []
        for _ in range(2):
            assert feed.poll_round() == 1 and feed.has_pending()
            assert feed.poll_round() == 0
            taken.append(len(seen()))
        assert taken == [33_000 + MAX_OFFER_CHANGES, 38_000]
        assert feed.poll_round() == 1 and not feed.has_pending()  # nothing new
    finally:
        feed.shutdown()
        a.close()


def test_a_prefix_cache_reset_announces_everything_again(start_registry) -> None:
    """vLLM publishes its block pool's AllBlocksCleared, then the connector's events, in the
    same batch; llm-d clears the pod's KVMKT entries too on it. What holds must be announced
    again after it, including what a pending retraction left (it used to stay cleared)."""
    reg = start_registry()
    a = reg.connect("a")
    a.register_holder(NS, "a", b"fp", b"desc-a")
    keys = chain(NS, TOKENS)[:4]
    a.publish(keys, [0, 1, 2, 3], tokens_of(keys))
    pool = BlockPool(num_gpu_blocks=8, enable_caching=True, hash_block_size=BLOCK_SIZE,
                     enable_kv_cache_events=True)  # fmt: skip
    feed = manual_feed(reg, resets=ResetWatch(pool).check)
    router = Announced(feed)

    def step() -> list:  # what vLLM's scheduler publishes after a step, in its order
        events = pool.take_events() + list(feed.take_events())
        router(events)
        return events

    try:
        feed.poll_round()
        step()
        hashes = [maybe_convert_block_hash(k) for k in keys]
        assert list(router.live) == hashes
        a.unpublish([3])
        feed.poll_round()  # block 3's retraction waits for a step
        assert pool.reset_prefix_cache()
        events = step()
        assert isinstance(events[0], AllBlocksCleared)
        assert all(isinstance(e, BlockStored) and e.medium == "KVMKT" for e in events[1:])
        assert list(router.live) == hashes[:3]
        assert step() == []  # once per reset
    finally:
        feed.shutdown()
        a.close()


def test_a_holder_that_starts_to_count_is_read_again(start_registry) -> None:
    """Listings of holders that do not count (ours, unreadable ones) are not kept; if such
    a holder's bit starts to count (here: our own bit went to a neighbour), the feed reads
    a snapshot again instead of missing that holder's blocks for good."""
    reg = start_registry()
    a = reg.connect("a")
    a.register_holder(NS, "a", b"fp", b"desc-a")
    publish(a, one_block_prefixes(10))
    own = {"bit": a.holder_bit}
    feed = manual_feed(reg, own_bit=lambda: own["bit"])
    seen = Announced(feed)
    try:
        feed.poll_round()
        assert not seen()
        own["bit"] = 63
        feed.poll_round()
        assert len(seen()) == 10
    finally:
        feed.shutdown()
        a.close()


def test_listings_dropped_at_the_cap_are_announced_once_there_is_room(start_registry) -> None:
    """The view holds ``kv_events_max_blocks`` blocks: listings past it are dropped, and
    no later change brings them back. Once removals free a tenth of the cap, the feed
    reads a snapshot again and announces them."""
    reg = start_registry()
    a = reg.connect("a", timeout_s=30)
    a.register_holder(NS, "a", b"fp", b"desc-a")
    cfg = MarketplaceConfig(registry_socket=reg.socket_path, registry_autostart=False,
                            kv_events_interval_ms=3_600_000, min_import_tokens=BLOCK_SIZE,
                            kv_events_max_blocks=10)  # fmt: skip
    feed = KvEventFeed(cfg, "b", NS, BLOCK_SIZE, readable=lambda d: True)
    seen = Announced(feed)
    try:
        publish(a, one_block_prefixes(10))
        for _ in range(3):
            feed.poll_round()
            seen()
        assert len(seen()) == 10
        publish(a, one_block_prefixes(5, start=10), first_location=10)  # past the cap
        for _ in range(3):
            feed.poll_round()
            assert len(seen()) == 10
        a.unpublish(list(range(5)))  # room for the five dropped ones
        for _ in range(4):
            feed.poll_round()
            seen()
        want = {maybe_convert_block_hash(b.key) for b in one_block_prefixes(10, start=5)}
        assert set(seen()) == want
    finally:
        feed.shutdown()
        a.close()
