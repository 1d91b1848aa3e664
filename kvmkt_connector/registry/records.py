"""Records of ``PrefixRegistry``'s state (holders, entries, leases, counters) and the checks
of request fields they are made from."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .protocol import KEY_BYTES, NAMESPACE_BYTES


class RequestRejected(Exception):
    """A request the registry refuses; ``code`` is the protocol's ErrorReply code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_keys(keys: Sequence[bytes]) -> None:
    for key in keys:
        if len(key) != KEY_BYTES:
            raise RequestRejected("bad_request", f"keys must be {KEY_BYTES} bytes, got {len(key)}")


def check_locations(locations: Sequence[int]) -> None:
    """Locations are opaque to the registry, but importers decode them as int64."""
    if locations and (min(locations) < -(1 << 63) or max(locations) >= 1 << 63):
        raise RequestRejected("bad_request", "locations must be int64")


def check_parents(parents: Sequence[bytes], keys: Sequence[bytes]) -> None:
    """``parents`` is empty (none known) or one per key, each a key or b"" (none)."""
    if parents and len(parents) != len(keys):
        raise RequestRejected("bad_request", f"{len(keys)} keys but {len(parents)} parents")
    for parent in parents:
        if parent and len(parent) != KEY_BYTES:
            raise RequestRejected("bad_request", f"parents must be {KEY_BYTES} bytes or empty")


def check_namespace(namespace: bytes) -> None:
    if len(namespace) != NAMESPACE_BYTES:
        raise RequestRejected(
            "bad_request", f"namespace must be {NAMESPACE_BYTES} bytes, got {len(namespace)}"
        )


class KeyListener(Protocol):
    """Told when a (key, holder) pair starts or stops being listed (the lookup table)."""

    def key_listed(self, key: bytes, holder_bit: int) -> None: ...

    def key_unlisted(self, key: bytes, holder_bit: int) -> None: ...


class Entry:
    __slots__ = ("holder", "key", "location", "parent", "lease_count", "retiring", "dead")

    def __init__(self, holder: Holder, key: bytes, location: int, parent: bytes = b"") -> None:
        self.holder = holder
        self.key = key
        self.location = location
        self.parent = parent  # key of the block before it; b"": a first block, or not published
        self.lease_count = 0
        self.retiring = False  # withdrawn while leased: location released when leases end
        self.dead = False  # no longer the holder's (released, overwritten, holder gone)


@dataclass(slots=True, eq=False)
class Holder:
    """One registered instance: identity, transport descriptor and its entries."""

    holder_id: int  # unique for the registry's lifetime, grows with registration time
    bit: int  # its bit in the lookup table; reused after the holder is dropped
    name: str
    pid: int
    namespace: bytes
    fingerprint: bytes
    descriptor: bytes
    cleanup_paths: list[str]
    by_location: dict[int, Entry] = field(default_factory=dict)  # retiring ones included
    lru: OrderedDict[Entry, None] = field(default_factory=OrderedDict)  # listed, unleased
    released: dict[int, None] = field(default_factory=dict)  # to deliver, oldest first
    listed: int = 0  # entries visible to lookups
    leased: int = 0  # entries with a live lease (retiring ones included)
    lease_ids: set[int] = field(default_factory=set)


class Lease:
    __slots__ = ("lease_id", "holder", "entries", "expires_at_ns", "owner")

    def __init__(
        self, lease_id: int, holder: Holder, entries: list[Entry], expires: int, owner: int = 0
    ) -> None:
        self.lease_id = lease_id
        self.holder = holder
        self.entries = entries
        self.expires_at_ns = expires
        self.owner = owner  # the connection that took it (its leases end when it closes)


@dataclass(slots=True)
class RegistryCounters:
    """Monotonic counters for ``Status`` and Prometheus."""

    lookups: int = 0
    lease_requests: int = 0
    leases_granted: int = 0
    leases_refused: int = 0  # over a LeaseLimits bound (leases.py)
    blocks_leased: int = 0
    blocks_released_lru: int = 0
    holders_lost: int = 0
    slow_clients_dropped: int = 0  # connections over the reply backlog (service.py)
