"""``KvEventFeed`` against a real registry and a real exporter channel: announce, retract
everything when the registry goes, announce again after the exporter publishes again to a
new registry (its token ids included), never count our own exports, and judge each holder's
descriptor once, not per poll."""

from __future__ import annotations

import time
from array import array

from registry_helpers import BLOCK_SIZE, chain, namespace, wait_until
from vllm.distributed.kv_events import BlockRemoved, BlockStored
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.holder_channel import HolderChannel, HolderRegistration
from kvmkt_connector.connector.kv_events import KvEventFeed
from kvmkt_connector.registry.protocol import BlockTokens

NS = namespace("feed")
TOKENS = list(range(7, 7 + 6 * BLOCK_SIZE))


def tokens_of(keys: list[bytes]) -> list[BlockTokens]:
    return [BlockTokens(k, keys[i - 1] if i else b"",
                        array("I", TOKENS[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]).tobytes())
            for i, k in enumerate(keys)]  # fmt: skip


class Announced:
    """Applies a feed's events in order, as a router would."""

    def __init__(self, feed: KvEventFeed) -> None:
        self.feed = feed
        self.live: dict = {}
        self.removed = 0

    def __call__(self) -> dict:
        for e in self.feed.take_events():
            if isinstance(e, BlockStored):
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
