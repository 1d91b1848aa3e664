"""``OfferView`` and ``build_events``: which blocks are announced, and as which vLLM events;
``holder_readable``: which holders count at all."""

from __future__ import annotations

from array import array

from vllm.distributed.kv_events import BlockRemoved, BlockStored
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from kvmkt_connector.connector.offer_view import OfferView, build_events, holder_readable
from kvmkt_connector.hashing import BlockKeyer
from kvmkt_connector.registry.protocol import BlockTokens, OfferChange
from kvmkt_connector.transport.descriptors import (
    CudaIpcDescriptor,
    GenerationsDescriptor,
    HolderDescriptor,
    HostShmDescriptor,
)
from kvmkt_connector.transport.generations import GenerationTable

BS = 4
NS = b"n" * 16


def blocks_of(tokens: list[int]) -> list[BlockTokens]:
    keys = BlockKeyer(NS, BS).keys(tokens)
    return [BlockTokens(k, keys[i - 1] if i else b"", array("I", tokens[i * BS:(i + 1) * BS]).tobytes())
            for i, k in enumerate(keys)]


def listed(blocks, bit):
    return [OfferChange(b.key, bit, True, b) for b in blocks]


def unlisted(blocks, bit):
    return [OfferChange(b.key, bit, False) for b in blocks]


A, B, ME = 0, 1, 2
PREFIX = blocks_of(list(range(16)))  # 4 blocks


def test_a_run_one_usable_holder_lists_from_block_0() -> None:
    view = OfferView(max_blocks=100)
    # Children first, then the root: announced only once the run from block 0 is whole,
    # and in chain order.
    assert view.apply(listed(PREFIX[1:], A), frozenset({A, B})) == []
    ops = view.apply(listed(PREFIX[:1], A), frozenset({A, B}))
    assert ops == [(True, b.key) for b in PREFIX]
    events = build_events(ops, view.blocks, BS, "KVMKT")
    assert len(events) == 1 and isinstance(events[0], BlockStored)
    ev = events[0]
    assert ev.token_ids == list(range(16)) and ev.parent_block_hash is None
    assert ev.block_hashes == [maybe_convert_block_hash(b.key) for b in PREFIX]
    assert (ev.medium, ev.block_size, ev.lora_id) == ("KVMKT", BS, None)

    # B lists blocks 0..1 too; A withdraws block 2: 2 and 3 go, 0..1 stay (A and B).
    assert view.apply(listed(PREFIX[:2], B), frozenset({A, B})) == []
    ops = view.apply(unlisted(PREFIX[2:3], A), frozenset({A, B}))
    assert sorted(ops) == sorted([(False, PREFIX[2].key), (False, PREFIX[3].key)])
    events = build_events(ops, view.blocks, BS, "KVMKT")
    assert len(events) == 1 and isinstance(events[0], BlockRemoved)
    # A dies: B still serves 0..1.
    assert view.apply(unlisted(PREFIX[:2] + PREFIX[3:], A), frozenset({B})) == []
    assert list(view.announced) == [PREFIX[0].key, PREFIX[1].key]


def test_own_and_unreadable_holders_never_count_and_snapshots_diff() -> None:
    view = OfferView(max_blocks=100)
    assert view.apply(listed(PREFIX, ME), frozenset({A})) == []  # our own exports
    ops = view.apply(listed(PREFIX[:2], A), frozenset({A}))
    assert ops == [(True, PREFIX[0].key), (True, PREFIX[1].key)]
    # A becomes unusable (e.g. another transport): all retracted.
    assert sorted(view.apply([], frozenset())) == sorted([(False, b.key) for b in PREFIX[:2]])
    assert view.apply([], frozenset({A})) == [(True, PREFIX[0].key), (True, PREFIX[1].key)]
    # A snapshot (registry restart) with blocks 0 and 2 of A, gathered into a fresh view:
    # block 1 is retracted (2 hangs on it), block 0 is not announced again.
    fresh = OfferView(max_blocks=100)
    assert fresh.apply(listed(PREFIX[:1] + PREFIX[2:3], A), frozenset({A})) == [
        (True, PREFIX[0].key)
    ]
    assert view.replace(fresh) == [(False, PREFIX[1].key)]
    assert list(view.announced) == [PREFIX[0].key] and PREFIX[2].key in view.blocks
    assert view.apply(listed(PREFIX[1:2], A), frozenset({A})) == [
        (True, PREFIX[1].key), (True, PREFIX[2].key)
    ]


def test_the_cap_counts_only_blocks_a_usable_holder_lists() -> None:
    """Our own exports and unreadable holders' blocks are never announced, so they must not
    fill the view: with 4 blocks at most, 4 of our own and 4 of an unreadable holder's
    came first, then a neighbour's chain of 4 (it used to announce nothing)."""
    view = OfferView(max_blocks=4)
    other = blocks_of(list(range(100, 116)))
    assert view.apply(listed(PREFIX, ME) + listed(other, B), frozenset({A})) == []
    ops = view.apply(listed(blocks_of(list(range(50, 66))), A), frozenset({A}))
    assert len(ops) == 4 and len(view.announced) == 4


def test_bounded_and_branches_become_separate_events() -> None:
    view = OfferView(max_blocks=3)
    ops = view.apply(listed(PREFIX, A), frozenset({A}))
    assert [k for _, k in ops] == [b.key for b in PREFIX[:3]]  # the 4th is never known
    branch = blocks_of(list(range(8)) + [99] * 4)  # shares blocks 0..1 with PREFIX
    view2 = OfferView(max_blocks=100)
    ops = view2.apply(listed(PREFIX[:2] + branch[2:] + PREFIX[2:], A), frozenset({A}))
    events = build_events(ops, view2.blocks, BS, "M")
    # Two chains off block 1 (in either order): one event each, a block after its parent.
    assert len(events) == 2 and events[0].parent_block_hash is None
    seen: dict = {None: None}
    for e in events:
        parent = e.parent_block_hash
        assert parent in seen
        for i, h in enumerate(e.block_hashes):
            seen[h] = (parent, e.token_ids[i * BS:(i + 1) * BS])
            parent = h
    h = maybe_convert_block_hash
    want = {b.key: b for b in PREFIX + branch[2:]}
    assert {k: v for k, v in seen.items() if k is not None} == {
        h(k): (h(b.parent) if b.parent else None, list(memoryview(b.tokens).cast("I")))
        for k, b in want.items()
    }


def test_runs_shorter_than_an_import_are_not_announced() -> None:
    view = OfferView(max_blocks=100, min_run=2)  # min_import_tokens of 2 blocks
    assert view.apply(listed(PREFIX[:1], A), frozenset({A})) == []  # 1 block: recomputed
    ops = view.apply(listed(PREFIX[1:3], A), frozenset({A}))
    assert ops == [(True, b.key) for b in PREFIX[:3]]  # parents first
    assert view.apply(unlisted(PREFIX[2:3], A), frozenset({A})) == [(False, PREFIX[2].key)]
    ops = view.apply(unlisted(PREFIX[1:2], A), frozenset({A}))
    assert sorted(ops) == sorted([(False, PREFIX[1].key), (False, PREFIX[0].key)])
    assert view.announced == {}
    # A long chain is announced and retracted without walking it per block.
    long = blocks_of(list(range(4 * 2000)))
    view = OfferView(max_blocks=5000, min_run=2)
    assert len(view.apply(listed(long, A), frozenset({A}))) == 2000
    assert len(view.apply(unlisted(long[:1], A), frozenset({A}))) == 2000


def test_a_child_listed_as_its_unannounced_parent_goes_is_not_announced() -> None:
    """One poll lists block 1 and unlists block 0 (never announced alone: a run needs 2
    blocks): nothing is announced and the view does not trip over the parent's stale
    state (it used to raise KeyError and resync from a snapshot)."""
    view = OfferView(max_blocks=100, min_run=2)
    assert view.apply(listed(PREFIX[:1], A), frozenset({A})) == []
    assert view.apply(listed(PREFIX[1:2], A) + unlisted(PREFIX[:1], A), frozenset({A})) == []
    assert list(view.announced) == []
    # The parent comes back: the run of 2 is announced, parent first.
    assert view.apply(listed(PREFIX[:1], A), frozenset({A})) == [(True, PREFIX[0].key),
                                                                 (True, PREFIX[1].key)]


def test_readable_holders_are_those_a_lease_could_use(tmp_path) -> None:
    staged = HolderDescriptor([HostShmDescriptor("/dev/shm/x", 4, [64])] * 2).encode()
    assert holder_readable(staged, "host_shm", 2)
    assert not holder_readable(staged, "cuda_ipc", 2)  # another transport
    assert not holder_readable(staged, "host_shm", 1)  # another TP size
    assert not holder_readable(b"\x01junk", "host_shm", 2)
    # In place: the importer checks the holder's generation table after every copy, so a
    # holder whose table it cannot open (gone, another user's, not a table) is no source.
    table = GenerationTable.create(str(tmp_path / "gen"), 8)
    ipc = [CudaIpcDescriptor("GPU-0", 1, [b"h"], [], 8)]

    def in_place(path: str, num_blocks: int = 8) -> bytes:
        return HolderDescriptor(ipc, GenerationsDescriptor(path, num_blocks)).encode()

    try:
        assert holder_readable(in_place(table.path), "cuda_ipc", 1)
        assert not holder_readable(in_place(table.path, 9), "cuda_ipc", 1)  # not its table
        assert not holder_readable(in_place(str(tmp_path / "gone")), "cuda_ipc", 1)
        (tmp_path / "empty").write_bytes(b"")
        assert not holder_readable(in_place(str(tmp_path / "empty")), "cuda_ipc", 1)
    finally:
        table.close()
    assert not holder_readable(in_place(table.path), "cuda_ipc", 1)  # the holder went
