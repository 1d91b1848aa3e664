"""Which announced blocks follow from the registry's offer feed (``OfferView``), as which vLLM
events (``build_events``), and which holders count at all (``holder_readable``); the feed
thread that drives them is ``kv_events.KvEventFeed``.

What counts as importable mirrors a lease: a run of blocks from block 0, at least
``min_import_tokens`` long, that one holder other than us lists entirely, from a holder
whose pages our workers can read. Only such holders' listings are kept, so the view's cap
(``kv_events_max_blocks``) is spent on blocks it could announce, not on our own exports or
on unreadable holders' (the feed re-reads a snapshot if a holder it skipped turns usable).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from kvmkt_connector.registry.protocol import OfferChange
from kvmkt_connector.transport.descriptors import (
    CudaIpcDescriptor,
    HolderDescriptor,
    HostShmDescriptor,
    TransferError,
)
from kvmkt_connector.transport.generations import GenerationTable

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent

_TRANSPORT_OF = {"cuda_ipc": CudaIpcDescriptor, "host_shm": HostShmDescriptor}


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
    as (stored?, key) in an order a router can follow (a block after its parent). It keeps
    at most ``max_blocks`` blocks, each listed by a usable holder when it came.

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
        self.overflowed = False  # a listing was dropped for the cap: only a snapshot has it

    def apply(self, changes: list[OfferChange], usable: frozenset[int]) -> list[tuple[bool, bytes]]:
        """``usable``: the holders whose listings count (not us, pages we can read)."""
        ops: list[tuple[bool, bytes]] = []
        self._apply(changes, usable, ops)
        return ops

    def replace(self, fresh: OfferView) -> list[tuple[bool, bytes]]:
        """Become ``fresh`` (built from a whole snapshot): what it announces differently,
        removals first, then stores parents first; what both announce is not repeated."""
        ops = [(False, k) for k in self.announced if k not in fresh.announced]
        ops += [(True, k) for k in fresh.announced if k not in self.announced]
        self.__dict__.update(fresh.__dict__)
        return ops

    def room_again(self) -> bool:
        """Listings were dropped for the cap and a tenth of it is free again."""
        return self.overflowed and len(self.blocks) <= self._max_blocks * 9 // 10

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
                if change.holder_bit not in usable:  # ours or unreadable: never kept
                    continue
                if key not in self.blocks:
                    if change.block is None:
                        continue
                    if len(self.blocks) >= self._max_blocks:
                        self.overflowed = True
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
