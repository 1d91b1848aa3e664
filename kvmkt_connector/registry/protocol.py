"""Wire protocol of the node-local prefix registry.

Transport: an owner-only Unix stream socket. Each message is a frame: a 4-byte big-endian
length, then that many bytes of msgpack (msgspec) holding one tagged Struct below. A client
sends one request and reads one reply; requests on one connection are answered in order.

Every connection starts with ``Hello``; a wrong ``protocol_version`` gets an
``ErrorReply(code="bad_version")`` and the connection is closed. A frame longer than
``MAX_FRAME_BYTES`` or a payload that does not decode gets ``ErrorReply(code="bad_frame")``
and a closed connection (the stream can no longer be trusted); a request that decodes but
makes no sense (e.g. ``Publish`` from a connection that is not a holder) gets an
``ErrorReply`` and the connection stays open. The service keeps serving everyone else.

Concepts:
- namespace: 16 bytes, the compatibility fingerprint's digest. Entries of different
  namespaces never match.
- key: 16 bytes naming a full KV block (see ``kvmkt_connector.hashing``); keys already
  include the namespace, so a key is unique node-wide.
- holder: a connection that registered with ``RegisterHolder`` (one vLLM instance). Its
  entries and the leases on them vanish when the connection closes (process death).
- location: an int that only the holder's transport understands (a page slot or block id).
- descriptor: opaque bytes from the holder's transport telling importers how to reach its
  pages (shm path, CUDA IPC handles ...). The registry stores and returns it untouched.
- lease: a promise that the leased entries' locations are not released (so not reused by
  their holder) before ``expires_at_ns`` (CLOCK_MONOTONIC), an explicit release, or the
  close of the connection that took it. A connection, and all together, hold a bounded
  number (``registry/leases.py``); past that a ``Lease`` gets ``ErrorReply(code=
  "lease_limit")`` and the connection stays open.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

PROTOCOL_VERSION = 5  # 2: Publish.tokens, Offers; 3: paged Offers snapshots (after);
# 4: Publish.parents, LeaseChain, LeaseGranted.keys; 5: LeaseChain.head_parent
MAX_FRAME_BYTES = 8 << 20
FRAME_HEADER_BYTES = 4
KEY_BYTES = 16
NAMESPACE_BYTES = 16
MAX_HOLDERS = 64  # holder bits of the shared-memory lookup table
MAX_OFFER_CHANGES = 4096  # per OfferFeed reply
MAX_OFFER_TOKEN_BYTES = 2 << 20  # token bytes per OfferFeed reply (well under a frame)
MAX_BLOCK_TOKEN_BYTES = 4 * 4096  # BlockTokens.tokens
# A holder sends a large Publish/Unpublish (e.g. everything it offers, after registering
# again) in messages of at most this many bytes: well under a frame, and short enough that
# the single-threaded registry serves other clients between them.
PUBLISH_CHUNK_BYTES = 1 << 20


class _Msg(msgspec.Struct, tag_field="op", forbid_unknown_fields=True):
    pass


# ---------------------------------------------------------------- requests


class Hello(_Msg, tag="hello"):
    protocol_version: int
    client: str  # free text for logs and `kvmkt status`
    pid: int


class RegisterHolder(_Msg, tag="register_holder"):
    """Make this connection a holder of KV pages in ``namespace``."""

    namespace: bytes
    name: str
    pid: int
    fingerprint: bytes  # the holder's full compat fingerprint (opaque), for diagnostics
    descriptor: bytes  # opaque transport descriptor handed to importers with each lease
    cleanup_paths: list[str] = []  # files the registry unlinks if this holder dies


class BlockTokens(msgspec.Struct, array_like=True, frozen=True):
    """The tokens of one published block, so instances can announce it to cluster routers
    (vLLM KV events carry token ids). The registry cannot check them against the key."""

    key: bytes
    parent: bytes  # key of the block before it; b"" for a prefix's first block
    tokens: bytes  # its token ids, little-endian uint32


class Publish(_Msg, tag="publish"):
    """List (key -> location) entries of the calling holder."""

    keys: list[bytes]
    locations: list[int]
    tokens: list[BlockTokens] = []  # optional, for some of ``keys`` (see ``Offers``)
    parents: list[bytes] = []  # empty, or per key the key before it (b"" for a first
    # block): lets importers lease a run by its last key (``LeaseChain``)


class Lookup(_Msg, tag="lookup"):
    """Longest run of ``keys`` (from keys[0]) that one holder other than the caller has."""

    namespace: bytes
    keys: list[bytes]
    exclude_holder: int | None = None  # also skip this holder (an instance's own, asked
    # from its non-holder connection)


class Lease(_Msg, tag="lease"):
    """Lookup plus a lease on the run found, if it has at least ``min_blocks`` entries."""

    namespace: bytes
    keys: list[bytes]
    ttl_ms: int
    min_blocks: int = 1
    exclude_holder: int | None = None  # as in Lookup


class LeaseChain(_Msg, tag="lease_chain"):
    """Lease the ``blocks`` entries ending at ``tail``, found by following the parents one
    holder published; all of them or ``NoMatch``. The importer then hashes its prompt once
    instead of once per block (``Lease`` needs every key)."""

    namespace: bytes
    tail: bytes
    blocks: int
    ttl_ms: int
    head_parent: bytes = b""  # the parent the first leased block must have (the caller's key
    # of the block before the run; b"" when the run starts at block 0)
    exclude_holder: int | None = None  # as in Lookup


class ReleaseLeases(_Msg, tag="release_leases"):
    lease_ids: list[int]


class Reclaim(_Msg, tag="reclaim"):
    """Release up to ``count`` of the caller's least recently leased, unleased entries."""

    count: int


class Unpublish(_Msg, tag="unpublish"):
    """Withdraw the caller's entries at ``locations``; leased ones are released later."""

    locations: list[int]


class Sync(_Msg, tag="sync"):
    """Collect the caller's locations the registry released since the last reply."""


class ListHolders(_Msg, tag="list_holders"):
    pass


class Offers(_Msg, tag="offers"):
    """What changed in ``namespace``'s listings of blocks with known tokens since ``cursor``
    of feed ``feed_id``. A feed id that is not the registry's (0 at first, or a restarted
    registry) or a cursor older than the changes it keeps gets a snapshot instead, in pages
    (see ``OfferFeed``)."""

    namespace: bytes
    feed_id: int = 0
    cursor: int = 0
    max_changes: int = 4096  # capped at MAX_OFFER_CHANGES
    after: int = 0  # the last page's ``after``: its snapshot's next page


class Status(_Msg, tag="status"):
    pass


Request = (
    Hello
    | RegisterHolder
    | Publish
    | Lookup
    | Lease
    | LeaseChain
    | ReleaseLeases
    | Reclaim
    | Unpublish
    | Sync
    | ListHolders
    | Offers
    | Status
)

# ---------------------------------------------------------------- replies


class HelloReply(_Msg, tag="hello_reply"):
    protocol_version: int
    server_pid: int
    lookup_table_path: str  # shared-memory lookup table (read-only for clients), "" if none


class HolderAccepted(_Msg, tag="holder_accepted"):
    holder_id: int
    holder_bit: int  # this holder's bit in the lookup table's holder masks


class Published(_Msg, tag="published"):
    accepted: int
    released: list[int]  # caller's locations no longer listed: reusable by the caller now


class LookupResult(_Msg, tag="lookup_result"):
    holder_id: int | None
    num_blocks: int


class LeaseGranted(_Msg, tag="lease_granted"):
    lease_id: int
    holder_id: int
    holder_name: str
    descriptor: bytes
    locations: list[int]  # one per leased key, in key order
    expires_at_ns: int  # time.monotonic_ns() deadline
    keys: list[bytes] = []  # the leased keys, in order


class NoMatch(_Msg, tag="no_match"):
    pass


class Ok(_Msg, tag="ok"):
    pass


class Reclaimed(_Msg, tag="reclaimed"):
    released: list[int]


class Unpublished(_Msg, tag="unpublished"):
    released: list[int]  # reusable now
    pending: int  # leased; their locations come back in a later reply's ``released``


class Synced(_Msg, tag="synced"):
    released: list[int]


class HolderInfo(msgspec.Struct):
    holder_id: int
    name: str
    pid: int
    namespace: bytes
    fingerprint: bytes
    published_blocks: int
    leased_blocks: int


class OfferChange(msgspec.Struct, array_like=True):
    key: bytes
    holder_bit: int  # which holder (a bit is reused only after its holder's entries went)
    listed: bool  # False: that holder no longer lists it
    block: BlockTokens | None = None  # with listed=True


class OfferHolder(msgspec.Struct, array_like=True):
    holder_bit: int
    holder_id: int
    descriptor: bytes  # as in LeaseGranted: lets an importer tell whether it can read it


class OfferFeed(_Msg, tag="offer_feed"):
    """A snapshot is the listings at change ``cursor`` (listed=True only), in pages: the
    first says ``snapshot`` (forget the old state); while ``after`` is not 0, pass it back
    with ``cursor`` for the next page, which answers with ``snapshot`` False (one that says
    True started over). After the last page, the changes since ``cursor`` follow as usual and
    fix what changed meanwhile (a listing may come twice)."""

    feed_id: int
    cursor: int  # pass it back in the next Offers
    snapshot: bool  # the first page of a snapshot: forget the old state
    more: bool  # cut at a bound: ask again for the rest
    changes: list[OfferChange]
    holders: list[OfferHolder]  # the namespace's holders now
    after: int = 0  # not 0: a snapshot page, more follow (see above)


class HolderList(_Msg, tag="holder_list"):
    holders: list[HolderInfo]


class RegistryStatus(_Msg, tag="registry_status"):
    server_pid: int
    uptime_s: float
    capacity_blocks: int
    published_blocks: int
    active_leases: int
    holders: list[HolderInfo]
    lookups: int
    lease_requests: int
    leases_granted: int
    blocks_leased: int
    blocks_released_lru: int
    holders_lost: int


# ErrorReply.code of a lease refused because the caller (or everyone) holds too many
# leases (registry/leases.py): the registry works, it only lends no more for now.
LEASE_LIMIT = "lease_limit"


class ErrorReply(_Msg, tag="error"):
    # bad_frame | bad_version | no_hello | not_holder | bad_request | full | lease_limit
    code: str
    message: str


Reply = (
    HelloReply
    | HolderAccepted
    | Published
    | LookupResult
    | LeaseGranted
    | NoMatch
    | Ok
    | Reclaimed
    | Unpublished
    | Synced
    | HolderList
    | OfferFeed
    | RegistryStatus
    | ErrorReply
)


# ---------------------------------------------------------------- chunking

_MSG_OVERHEAD = 128  # tag, field names, list headers
_LOCATION_BYTES = 9  # msgpack int64


def publish_chunks(
    keys: Sequence[bytes], locations: Sequence[int], tokens: Sequence[BlockTokens] = (),
    max_bytes: int = PUBLISH_CHUNK_BYTES, parents: Sequence[bytes] = (),
) -> list[Publish]:
    """``Publish`` messages listing ``keys[i]`` at ``locations[i]`` (with ``parents[i]`` when
    given), in order, each encoding to at most ``max_bytes`` (an upper bound per entry, not
    an encode per try); a block's tokens travel with its key (the registry refuses tokens of
    keys not in the same Publish), tokens of keys not listed are left out. One message if
    ``keys`` is empty."""
    if len(keys) != len(locations) or (parents and len(parents) != len(keys)):
        raise ValueError(f"{len(keys)} keys, {len(locations)} locations, {len(parents)} parents")
    by_key = {t.key: t for t in tokens}
    out: list[Publish] = []
    start, size, chunk_tokens = 0, _MSG_OVERHEAD, []

    def cut(end: int) -> Publish:
        return Publish(list(keys[start:end]), list(locations[start:end]), chunk_tokens,
                       list(parents[start:end]) if parents else [])

    for i, key in enumerate(keys):
        block = by_key.pop(key, None)
        cost = len(key) + 5 + _LOCATION_BYTES  # bin header + key, int
        if parents:
            cost += len(parents[i]) + 5
        if block is not None:  # array header + 3 bin headers and bodies
            cost += 16 + len(block.key) + len(block.parent) + len(block.tokens)
        if i > start and size + cost > max_bytes:
            out.append(cut(i))
            start, size, chunk_tokens = i, _MSG_OVERHEAD, []
        size += cost
        if block is not None:
            chunk_tokens.append(block)
    out.append(cut(len(keys)))
    return out


def location_chunks(locations: Sequence[int], max_bytes: int = PUBLISH_CHUNK_BYTES) -> list[list[int]]:
    """``locations`` cut into lists that each fit an ``Unpublish`` of at most ``max_bytes``."""
    n = max(1, (max_bytes - _MSG_OVERHEAD) // _LOCATION_BYTES)
    return [list(locations[i : i + n]) for i in range(0, len(locations), n)] or [[]]
