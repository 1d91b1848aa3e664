"""``OfferCatalog``: the tokens of published blocks and a feed of their listing changes.

Instances turn this feed into vLLM KV events (``connector.kv_events``): a cluster router
(llm-d) keys blocks by their token ids, which our block keys cannot be turned back into, so
exporters send the tokens along with a publish (``Publish.tokens``) and the catalog keeps
them while some holder lists the block.

Bounds: at most ``max_described`` blocks have tokens (others are listed as usual but never
announced); the feed keeps the last ``max_changes`` changes (a reader that fell further
behind gets a snapshot); one reply carries at most ``MAX_OFFER_CHANGES`` changes (a snapshot
page: whole blocks, at least one) and ``MAX_OFFER_TOKEN_BYTES`` token bytes (plus one block's
in a page of changes; tokens travel with every listing, so a block listed by n holders counts
n times).

Snapshots come in pages, each bounded like any reply: a snapshot is the listings at change
``cursor`` (its first page says ``snapshot``); a reader passes ``cursor`` and the page's
``after`` back until ``after`` is 0, then reads the changes since ``cursor`` as usual, which
fix whatever changed while it paged. Pages go through described blocks in the order of their
first listing (``_Described.since``), which a page resumes after by bisection.
"""

from __future__ import annotations

import secrets
from bisect import bisect_right
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
    OfferFeed,
)
from .records import KeyListener, RequestRejected


@dataclass(slots=True)
class _Described:
    namespace: bytes
    block: BlockTokens
    since: int  # seq of its first listing: its place in snapshots
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
        self._order: list[int] = []  # ``since`` of described blocks, ascending; gone ones linger
        self._by_since: dict[int, bytes] = {}  # since -> key, described blocks only

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
            since = self._seq + 1
            self._described[block.key] = _Described(namespace, block, since, set(bits))
            self._order.append(since)
            self._by_since[since] = block.key
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
            del self._by_since[described.since]
            if len(self._order) > 2 * len(self._by_since) + 1024:  # amortized O(1) per block
                self._order = [s for s in self._order if s in self._by_since]

    def _record(self, namespace: bytes, key: bytes, bit: int, listed: bool) -> None:
        self._seq += 1
        self._changes.append((self._seq, namespace, key, bit, listed))

    # ------------------------------------------------------------ readers' side

    def read(
        self, namespace: bytes, feed_id: int, cursor: int, max_changes: int, after: int = 0
    ) -> OfferFeed:
        """The answer to an ``Offers`` request (its ``holders`` left empty)."""
        limit = max(1, min(max_changes, MAX_OFFER_CHANGES))
        first = self._changes[0][0] if self._changes else self._seq + 1
        kept = feed_id == self.feed_id and first - 1 <= cursor <= self._seq
        if not kept or not 0 <= after <= cursor:
            # Unknown feed or too far behind; or a snapshot whose later changes are no longer
            # all kept (the reader could not fix what changed while it paged): start over.
            return self._snapshot(namespace, self._seq, 0, limit)
        if after:
            return self._snapshot(namespace, cursor, after, limit)
        out: list[OfferChange] = []
        budget = MAX_OFFER_TOKEN_BYTES
        for seq, ns, key, bit, listed in islice(self._changes, cursor - first + 1, None):
            if len(out) >= limit or budget <= 0:
                return OfferFeed(self.feed_id, cursor, False, True, out, [])
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
        return OfferFeed(self.feed_id, self._seq, False, False, out, [])

    def _snapshot(self, namespace: bytes, taken: int, after: int, limit: int) -> OfferFeed:
        """The page of the snapshot at change ``taken`` that follows the block whose
        ``since`` is ``after`` (0: the first page). Blocks described after ``taken`` are
        left to the changes that follow it. Parents come before children (publish order; a
        block whose parent was cut is simply not servable to the reader)."""
        out: list[OfferChange] = []
        budget = MAX_OFFER_TOKEN_BYTES  # whole blocks; one costs at most 64 x 16 KiB
        start, order = after, self._order
        for i in range(bisect_right(order, after), len(order)):  # (islice would skip one by one)
            since = order[i]
            if since > taken:
                break
            key = self._by_since.get(since)
            if key is None:  # gone since
                continue
            described = self._described[key]
            if described.namespace != namespace:
                continue
            cost = len(described.block.tokens) * len(described.bits)
            if out and (len(out) + len(described.bits) > limit or cost > budget):
                return OfferFeed(self.feed_id, taken, start == 0, True, out, [], after)
            out += [OfferChange(key, bit, True, described.block) for bit in sorted(described.bits)]
            budget -= cost
            after = since
        # The last page: changes since ``taken`` follow right away, if any.
        return OfferFeed(self.feed_id, taken, start == 0, taken < self._seq, out, [])
