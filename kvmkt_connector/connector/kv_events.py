"""KV events for cluster routers: what this instance can import from its node's marketplace.

A KV-cache-aware router (llm-d's indexer) learns from each instance's vLLM KV events which
prefixes it holds, per medium. With ``kv_events_config`` on, this instance also announces,
under medium ``kv_events_medium`` ("KVMKT"), the blocks a neighbour offers that it could
import: ``BlockStored`` when one becomes importable, ``BlockRemoved`` when it stops being so
(withdrawn, evicted, holder dead, registry lost), each through the connector's
``take_events`` (vLLM publishes them with its own events after every step).

What counts as importable mirrors a lease: a run of blocks from block 0, at least
``min_import_tokens`` long, that one holder other than us lists entirely, in our namespace
(interchangeable KV), from a holder whose pages our workers can read (our transport, its
generation table openable), described with its token ids (no cache salt, no LoRA). Nothing
is announced while our own exporter is not registered (its exports could not be told apart
from a neighbour's). The registry's offer feed (``Offers``) gives the listing changes;
``OfferView`` keeps, per block, the holders that list it and all its ancestors.

Hashes: a block's ``block_hash`` is its kvmkt key (16 bytes) as vLLM formats its own (the
low 64 bits as an int by default): not vLLM's seed-dependent hash, so not comparable to
this instance's GPU events. Routers key blocks by ``token_ids`` chained through
``parent_block_hash`` (llm-d does), which are exact.

Bounds: the view knows at most ``kv_events_max_blocks`` blocks (more are not announced);
the registry is asked at most once per ``kv_events_interval_ms`` (at most 4096 changes per
answer); a new poll waits until the last one's events were taken, so what waits is at most
one poll's worth. An idle engine does not step, so nothing would take them: the feed
thread then publishes them itself through the scheduler's publisher, alone or under
MultiConnector (one lock hands each event to exactly one of the two paths).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.logs import get_logger
from kvmkt_connector.registry.client import RegistryClient
from kvmkt_connector.registry.protocol import OfferChange, OfferFeed
from kvmkt_connector.transport.descriptors import (
    CudaIpcDescriptor,
    HolderDescriptor,
    HostShmDescriptor,
    TransferError,
)
from kvmkt_connector.transport.generations import GenerationTable

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent

logger = get_logger(__name__)
_TRANSPORT_OF = {"cuda_ipc": CudaIpcDescriptor, "host_shm": HostShmDescriptor}
_POLLS_PER_ROUND = 8  # "more" answers fetched back to back, then wait for the interval


def holder_readable(descriptor: bytes, transport: str, world: int) -> bool:
    """Whether our workers could import from a holder with that descriptor, as a lease
    would find it (the scheduler's ``_usable``): its ranks in our transport and, for pages
    read in place, its generation table openable (not another user's, not gone). Opens a
    file: ``KvEventFeed`` caches the answer per descriptor."""
    try:
        holder = HolderDescriptor.decode(descriptor)
    except msgspec.DecodeError:
        return False
    want = _TRANSPORT_OF.get(transport)
    if len(holder.ranks) != world or any(type(d) is not want for d in holder.ranks):
        return False
    if holder.generations is None:
        return True
    try:
        GenerationTable.open(holder.generations.path, holder.generations.num_blocks).close()
    except (TransferError, OSError, ValueError):  # not a table we can map
        return False
    return True


class OfferView:
    """Which blocks are importable; ``apply`` returns the announcements that changes cause,
    as (stored?, key) in an order a router can follow (a block after its parent).

    ``via[k]``: the usable holders that list ``k`` and all its ancestors. A block is
    announced when it is part of such a run of at least ``min_run`` blocks (shorter matches
    are recomputed: ``min_import_tokens``): ``_support[k]`` counts the reasons, itself being
    deep enough plus its announced children, so a change walks up only while it flips one.
    """

    def __init__(self, max_blocks: int, min_run: int = 1) -> None:
        self._max_blocks = max_blocks
        self._min_run = max(1, min_run)
        self._reset()

    def _reset(self) -> None:
        self.blocks: dict[bytes, Any] = {}  # key -> BlockTokens
        self._bits: dict[bytes, set[int]] = {}  # key -> holders listing it
        self._children: dict[bytes, set[bytes]] = {}  # parent key -> known children
        self.via: dict[bytes, frozenset[int]] = {}
        self._depth: dict[bytes, int] = {}  # of keys in via (block 0: 0)
        self._support: dict[bytes, int] = {}  # announced key -> reasons (> 0)
        self._parent_of: dict[bytes, bytes] = {}  # announced key -> parent (b"": none)
        self.announced: dict[bytes, None] = {}  # in announcement order
        self._usable: frozenset[int] = frozenset()

    def apply(
        self, changes: list[OfferChange], usable: frozenset[int], snapshot: bool = False
    ) -> list[tuple[bool, bytes]]:
        if snapshot:
            old = self.announced
            self._reset()
            self._apply(changes, usable, [])
            return [(False, k) for k in old if k not in self.announced] + [
                (True, k) for k in self.announced if k not in old
            ]
        ops: list[tuple[bool, bytes]] = []
        self._apply(changes, usable, ops)
        return ops

    def withdraw_all(self) -> list[tuple[bool, bytes]]:
        ops = [(False, k) for k in self.announced]
        self._reset()
        return ops

    def _apply(self, changes: list[OfferChange], usable: frozenset[int], ops: list) -> None:
        dirty: list[bytes] = []
        if usable != self._usable:  # a holder came or went, or we registered ourselves
            self._usable = usable
            dirty += [k for k, b in self.blocks.items() if not b.parent]
        for change in changes:
            key = change.key
            if change.listed:
                if key not in self.blocks:
                    if len(self.blocks) >= self._max_blocks or change.block is None:
                        continue
                    self.blocks[key] = change.block
                    self._bits[key] = set()
                    self._children.setdefault(change.block.parent, set()).add(key)
                self._bits[key].add(change.holder_bit)
            else:
                bits = self._bits.get(key)
                if bits is None:
                    continue
                bits.discard(change.holder_bit)
                if not bits:  # nobody lists it: forget it (children stay known)
                    parent = self.blocks.pop(key).parent
                    del self._bits[key]
                    siblings = self._children.get(parent)
                    if siblings is not None:
                        siblings.discard(key)
                        if not siblings:
                            del self._children[parent]
            dirty.append(key)
        for key in dirty:
            self._refresh(key, ops)

    def _refresh(self, key: bytes, ops: list) -> None:
        """Recompute ``via`` for ``key`` and, where it changed, for its descendants
        (depth first, so a chain's announcements come out in order)."""
        stack = [key]
        while stack:
            k = stack.pop()
            block = self.blocks.get(k)
            new: frozenset[int] = frozenset()
            if block is not None:
                new = frozenset(self._bits[k]) & self._usable
                if new and block.parent:  # a parent gone in this same batch holds nothing
                    parent_via = self.via.get(block.parent) if block.parent in self.blocks else None
                    new &= parent_via or frozenset()
            old = self.via.get(k, frozenset())
            if new == old:
                continue
            if new:
                self.via[k] = new
            else:
                del self.via[k]
            if new and not old:
                depth = self._depth[block.parent] + 1 if block.parent else 0
                self._depth[k] = depth
                if depth + 1 >= self._min_run:
                    self._support_add(k, ops)
            elif old and not new and self._depth.pop(k) + 1 >= self._min_run:
                self._support_remove(k, ops)
            stack.extend(self._children.get(k, ()))

    def _support_add(self, key: bytes, ops: list) -> None:
        """``key`` ends a run long enough: it and its ancestors are announced."""
        fresh: list[bytes] = []
        k = key
        while k:
            n = self._support.get(k, 0)
            self._support[k] = n + 1
            if n:
                break
            fresh.append(k)
            parent = self.blocks[k].parent  # in via, so known
            self._parent_of[k] = parent
            k = parent
        for k in reversed(fresh):  # parents first
            self.announced[k] = None
            ops.append((True, k))

    def _support_remove(self, key: bytes, ops: list) -> None:
        k = key
        while k:
            n = self._support[k] - 1
            if n:
                self._support[k] = n
                break
            del self._support[k]
            del self.announced[k]
            ops.append((False, k))
            k = self._parent_of.pop(k)


def build_events(
    ops: list[tuple[bool, bytes]], blocks: dict[bytes, Any], block_size: int, medium: str
) -> list[KVCacheEvent]:
    """vLLM events for ``ops``: consecutive stores along one chain share a BlockStored,
    consecutive removals a BlockRemoved."""
    from vllm.distributed.kv_events import BlockRemoved, BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    events: list[Any] = []
    prev: bytes | None = None
    for stored, key in ops:
        h = maybe_convert_block_hash(key)
        if not stored:
            if events and isinstance(events[-1], BlockRemoved):
                events[-1].block_hashes.append(h)
            else:
                events.append(BlockRemoved(block_hashes=[h], medium=medium, group_idx=0))
            prev = None
            continue
        block = blocks[key]  # announced now, so known
        tokens = list(memoryview(block.tokens).cast("I"))
        if prev is not None and block.parent == prev and isinstance(events[-1], BlockStored):
            events[-1].block_hashes.append(h)
            events[-1].token_ids.extend(tokens)
        else:
            parent = maybe_convert_block_hash(block.parent) if block.parent else None
            events.append(BlockStored(
                block_hashes=[h], parent_block_hash=parent, token_ids=tokens,
                block_size=block_size, lora_id=None, medium=medium, lora_name=None,
                group_idx=0,
            ))  # fmt: skip
        prev = key
    return events


class KvEventFeed:
    """Polls the registry's offer feed on a thread of its own; ``take_events`` hands vLLM
    what changed."""

    def __init__(
        self, cfg: MarketplaceConfig, client_name: str, namespace: bytes, block_size: int,
        readable: Callable[[bytes], bool], own_bit: Callable[[], int | None] | None = None,
        publisher: Any = None,
    ) -> None:  # fmt: skip
        """``own_bit``: our holder bit while registered, else None (then nothing is
        announced: our own exports must never count); None if we do not export."""
        assert cfg.kv_events_medium
        self._cfg = cfg
        self._client_name = client_name
        self._namespace = namespace
        self._block_size = block_size
        self._readable = readable
        self._own_bit = own_bit
        self._publisher = publisher  # the scheduler's, for idle engines; None: steps only
        self._view = OfferView(cfg.kv_events_max_blocks, -(-cfg.min_import_tokens // block_size))
        self._interval = cfg.kv_events_interval_ms / 1000
        self._lock = threading.Lock()  # orders pending events, take_events and flushes
        self._pending: list[Any] = []
        self._pending_since = 0.0
        self._readable_cache: dict[bytes, bool] = {}
        self._feed_id = 0
        self._cursor = 0
        self._client: RegistryClient | None = None
        self._poll_lock = threading.Lock()  # a poll and its view update vs stop_announcing
        self._stopping = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvmkt-kv-events", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ scheduler thread

    def take_events(self) -> list[KVCacheEvent]:
        with self._lock:
            events, self._pending = self._pending, []
        return events

    def has_pending(self) -> bool:
        return bool(self._pending)

    def stop_announcing(self) -> None:
        """This instance will not import any more (connector reset): retract everything.
        The thread stays, to publish the retractions if the engine is idle."""
        with self._poll_lock:
            self._stopping = True
            self._emit(self._view.withdraw_all())

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(5)

    # ------------------------------------------------------------ feed thread

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._flush_if_idle()
            if self._pending:  # backpressure: one poll's events wait at most
                continue
            for _ in range(_POLLS_PER_ROUND):
                with self._poll_lock:
                    if self._stopping or self._stop.is_set():
                        break
                    try:
                        more = self._poll()
                    except Exception:  # a bug: announce nothing rather than stale blocks
                        logger.exception("kvmkt: KV events failed; retracting all")
                        self._drop()
                        self._emit(self._view.withdraw_all())
                        more = False
                if not more:
                    break
        self._drop()

    def _poll(self) -> bool:
        """One Offers round trip; True if the registry has more right away."""
        own = self._own_bit() if self._own_bit is not None else None
        if self._own_bit is not None and own is None:
            # Our exporter is not registered (starting, or it lost the registry): we could
            # not tell our own exports apart, so announce nothing until it is; then start
            # over from a snapshot.
            self._drop()
            self._emit(self._view.withdraw_all())
            return False
        try:
            if self._client is None:
                self._client = RegistryClient.connect(
                    self._cfg.registry_socket, client_name=f"{self._client_name}/events",
                    autostart=False, timeout_s=self._cfg.registry_timeout_ms / 1000,
                )  # fmt: skip
                self._feed_id = 0  # a new connection may be a new registry: start over
            feed = self._client.offers(self._namespace, self._feed_id, self._cursor)
        except Exception as e:  # no registry, no imports: nothing is importable any more
            if self._client is not None or self._view.announced:
                logger.info("kvmkt: KV events: registry unreachable (%s): retracting %d "
                            "announced blocks", e, len(self._view.announced))
            self._drop()
            self._emit(self._view.withdraw_all())
            return False
        self._apply(feed, own)
        return feed.more

    def _apply(self, feed: OfferFeed, own: int | None) -> None:
        usable = frozenset(
            h.holder_bit for h in feed.holders
            if h.holder_bit != own and self._readable_holder(h.descriptor)
        )  # fmt: skip
        ops = self._view.apply(feed.changes, usable, feed.snapshot)
        self._feed_id, self._cursor = feed.feed_id, feed.cursor
        self._emit(ops)

    def _readable_holder(self, descriptor: bytes) -> bool:
        ok = self._readable_cache.get(descriptor)
        if ok is None:
            if len(self._readable_cache) > 256:
                self._readable_cache.clear()
            ok = self._readable_cache[descriptor] = self._readable(descriptor)
        return ok

    def _emit(self, ops: list[tuple[bool, bytes]]) -> None:
        if not ops:
            return
        events = build_events(ops, self._view.blocks, self._block_size, self._cfg.kv_events_medium)
        with self._lock:
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.extend(events)

    def _flush_if_idle(self) -> None:
        """Events no step took for a whole interval: the engine is idle; publish them. A
        step that took earlier events has published them long before (same few lines)."""
        if self._publisher is None:
            return
        from vllm.distributed.kv_events import KVEventBatch

        with self._lock:  # a step's take_events waits, so its batch is published after
            if not self._pending or time.monotonic() - self._pending_since < self._interval:
                return
            events, self._pending = self._pending, []
            try:
                self._publisher.publish(KVEventBatch(ts=time.time(), events=events))
            except Exception as e:  # a publisher shutting down: the events are lost anyway
                logger.debug("kvmkt: KV events: idle publish failed: %s", e)

    def _drop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):  # already broken
                self._client.close()
            self._client = None
