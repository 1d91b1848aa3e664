"""``OfferCatalog``: the tokens of published blocks and a feed of their listing changes.

Instances turn this feed into vLLM KV events (``connector.kv_events``): a cluster router
(llm-d) keys blocks by their token ids, which our block keys cannot be turned back into, so
exporters send the tokens along with a publish (``Publish.tokens``) and the catalog keeps
them while some holder lists the block.

Bounds: at most ``max_described`` blocks have tokens (others are listed as usual but never
announced); the feed keeps the last ``max_changes`` changes (a reader that fell further
behind gets a snapshot); one reply carries at most ``MAX_OFFER_CHANGES`` changes and
``MAX_OFFER_TOKEN_BYTES`` token bytes.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice

from .protocol import (
    KEY_BYTES,
    MAX_BLOCK_TOKEN_BYTES,
    MAX_OFFER_CHANGES,
    MAX_OFFER_TOKEN_BYTES,
    BlockTokens,
    OfferChange,
)
from .records import KeyListener, RequestRejected


@dataclass(slots=True)
class _Described:
    namespace: bytes
    block: BlockTokens
    bits: set[int] = field(default_factory=set)  # holders listing it now


class ListenerFanout:
    """Several ``KeyListener``s behind the registry's one."""

    def __init__(self, *listeners: KeyListener | None) -> None:
        self._listeners = [x for x in listeners if x is not None]

    def key_listed(self, key: bytes, holder_bit: int) -> None:
        for listener in self._listeners:
            listener.key_listed(key, holder_bit)

    def key_unlisted(self, key: bytes, holder_bit: int) -> None:
        for listener in self._listeners:
            listener.key_unlisted(key, holder_bit)


class OfferCatalog:
    """A ``KeyListener`` of the registry: records (namespace, key, holder bit, listed)
    changes of described blocks, numbered from 1 (the cursor names the last one read)."""

    def __init__(self, max_described: int = 65_536, max_changes: int = 65_536) -> None:
        self.feed_id = secrets.randbits(62) + 1  # never 0, the "no feed yet" of Offers
        self._max_described = max_described
        self._described: dict[bytes, _Described] = {}
        self._changes: deque[tuple[int, bytes, bytes, int, bool]] = deque(maxlen=max_changes)
        self._seq = 0

    @property
    def described_blocks(self) -> int:
        return len(self._described)

    # ------------------------------------------------------------ holders' side

    @staticmethod
    def check(blocks: Sequence[BlockTokens], published: Sequence[bytes]) -> None:
        """Refuse malformed ``Publish.tokens`` (before anything of that publish is applied)."""
        allowed = set(published)
        for block in blocks:
            if len(block.key) != KEY_BYTES or len(block.parent) not in (0, KEY_BYTES):
                raise RequestRejected("bad_request", "BlockTokens key/parent must be 16 bytes")
            if len(block.tokens) % 4 or not 0 < len(block.tokens) <= MAX_BLOCK_TOKEN_BYTES:
                raise RequestRejected("bad_request", "BlockTokens.tokens: 1..4096 uint32")
            if block.key not in allowed:
                raise RequestRejected("bad_request", "BlockTokens for a key not published here")

    def describe(
        self, namespace: bytes, blocks: Sequence[BlockTokens],
        holder_bits: Callable[[bytes], list[int]],
    ) -> None:  # fmt: skip
        """Tokens of blocks just published (checked with ``check`` before the publish);
        ``holder_bits(key)``: who lists it now."""
        for block in blocks:
            if block.key in self._described or len(self._described) >= self._max_described:
                continue
            bits = holder_bits(block.key)
            if not bits:  # already evicted again: nothing to offer
                continue
            self._described[block.key] = _Described(namespace, block, set(bits))
            for bit in bits:
                self._record(namespace, block.key, bit, True)

    def key_listed(self, key: bytes, holder_bit: int) -> None:
        described = self._described.get(key)
        if described is not None and holder_bit not in described.bits:
            described.bits.add(holder_bit)
            self._record(described.namespace, key, holder_bit, True)

    def key_unlisted(self, key: bytes, holder_bit: int) -> None:
        described = self._described.get(key)
        if described is None or holder_bit not in described.bits:
            return
        described.bits.discard(holder_bit)
        self._record(described.namespace, key, holder_bit, False)
        if not described.bits:
            del self._described[key]

    def _record(self, namespace: bytes, key: bytes, bit: int, listed: bool) -> None:
        self._seq += 1
        self._changes.append((self._seq, namespace, key, bit, listed))

    # ------------------------------------------------------------ readers' side

    def read(
        self, namespace: bytes, feed_id: int, cursor: int, max_changes: int
    ) -> tuple[int, bool, bool, list[OfferChange]]:
        """(cursor, snapshot, more, changes) for an ``Offers`` request."""
        limit = max(1, min(max_changes, MAX_OFFER_CHANGES))
        first = self._changes[0][0] if self._changes else self._seq + 1
        if feed_id != self.feed_id or cursor > self._seq or cursor < first - 1:
            return self._seq, True, False, self._snapshot(namespace, limit)
        out: list[OfferChange] = []
        budget = MAX_OFFER_TOKEN_BYTES
        for seq, ns, key, bit, listed in islice(self._changes, cursor - first + 1, None):
            if len(out) >= limit or budget <= 0:
                return cursor, False, True, out
            cursor = seq
            if ns != namespace:
                continue
            block = None
            if listed:
                described = self._described.get(key)
                if described is None or bit not in described.bits:
                    continue  # unlisted again later: that change follows
                block = described.block
                budget -= len(block.tokens)
            out.append(OfferChange(key, bit, listed, block))
        return self._seq, False, False, out

    def _snapshot(self, namespace: bytes, limit: int) -> list[OfferChange]:
        """Up to ``limit`` listings, parents before children (described in publish order;
        a block whose parent was cut is simply not servable to the reader)."""
        out: list[OfferChange] = []
        budget = MAX_OFFER_TOKEN_BYTES
        for key, described in self._described.items():
            if described.namespace != namespace:
                continue
            for bit in sorted(described.bits):
                if len(out) >= limit or budget <= 0:
                    return out
                out.append(OfferChange(key, bit, True, described.block))
            budget -= len(described.block.tokens)
        return out
