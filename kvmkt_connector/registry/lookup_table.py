"""Shared-memory lookup table: which holders list a key, readable without an RPC.

The format and the clients' reader (``LookupTable``) are here; the registry service is the
only writer (``lookup_writer``). Clients map the file read-only, so the scheduler's
per-request "how much of this prompt could I import?" costs a few memory reads instead of
a socket round trip (~55 us p50, 100-200 us p99 for a Python RPC on a small box).

**Answers are hints.** The writer updates slots while readers read, without locks, so a
reader can see a torn or stale state: a key just published may look absent, one just
withdrawn may look present, and during a rebuild the old table stays visible for a moment.
That can only make a hint wrong, never an import: before importing anything the caller asks
``Lease`` over the socket, which answers from the authoritative ``PrefixRegistry`` and pins
what it returns. A wrong hint costs a wasted RPC or a missed reuse, nothing more.

Layout (little-endian), file mode 0600:
    header, 64 bytes: magic b"KVMKTLT1", u32 version, u32 max_probe, u64 n_slots (power of
    two), u64 generation, u64 server_pid, padding
    n_slots x 16 bytes: u64 fingerprint, u64 holder mask

fingerprint = key[:8] as a little-endian u64 with bit 63 set (0 marks an empty slot);
mask bit b = the holder with ``holder_bit`` b lists the key. Linear probing from slot
``fingerprint & (n_slots - 1)``; no key sits more than ``max_probe`` slots past its home.
A key whose mask drops to 0 keeps its fingerprint as a tombstone (a probe must walk past
it) unless it ends a probe chain, in which case it is cleared. Too many tombstones, or a
probe chain longer than ``PROBE_LIMIT``, trigger a rebuild into a new file that is renamed
over the path; the old file's generation is then bumped so readers know to re-open.
A registry that cannot make a table (no space) runs without one: ``HelloReply`` then names
none, and clients ask over the socket.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import threading
from collections.abc import Sequence

import numpy as np

from .protocol import KEY_BYTES

if sys.byteorder != "little":  # pragma: no cover - the slot views below assume it
    raise ImportError("kvmkt_connector.registry.lookup_table needs a little-endian host")

MAGIC = b"KVMKTLT1"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ")
HEADER_BYTES = 64
SLOT_BYTES = 16
GENERATION_OFFSET = 24
MAX_PROBE_OFFSET = 12
FINGERPRINT_BIT = 1 << 63
PROBE_LIMIT = 32  # a longer chain makes the writer rebuild (bigger), so readers stay bounded
MIN_SLOTS = 1024
# Below this many keys a plain loop over the slots beats numpy's per-call overhead (see
# the micro-benchmark benchmarks/registry_bench.py prints; crossover ~16-24 keys here).
NUMPY_MIN_KEYS = 20
ALL_BITS = (1 << 64) - 1
# Slots per key probed in one vectorized step: one or two cache lines. At the table's load
# (under 1/2 live) most keys sit within it; the rest are probed one by one when they matter.
_WINDOW = 4
_WINDOW_OFFSETS = np.arange(_WINDOW, dtype=np.uint64)


def fingerprint(key: bytes) -> int:
    return int.from_bytes(key[:8], "little") | FINGERPRINT_BIT


class _Mapping:
    """One mapped version of the table file (immutable; replaced whole on re-open)."""

    __slots__ = ("mm", "generation", "n_slots", "fps", "masks", "cells")

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                raise PermissionError(f"lookup table {path} is not private to this user")
            if st.st_size < HEADER_BYTES:
                raise ValueError(f"lookup table {path} is truncated")
            self.mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        magic, version, _, n_slots, generation, _ = HEADER.unpack_from(self.mm, 0)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"{path} is not a version-{VERSION} kvmkt lookup table")
        if n_slots & (n_slots - 1) or st.st_size != HEADER_BYTES + n_slots * SLOT_BYTES:
            raise ValueError(f"lookup table {path} has an inconsistent size")
        self.generation = generation
        self.n_slots = n_slots
        slots = np.frombuffer(self.mm, dtype="<u8", offset=HEADER_BYTES).reshape(n_slots, 2)
        self.fps = slots[:, 0]
        self.masks = slots[:, 1]
        self.cells = memoryview(self.mm)[HEADER_BYTES:].cast("Q")

    def max_probe(self) -> int:
        return min(struct.unpack_from("<I", self.mm, MAX_PROBE_OFFSET)[0], PROBE_LIMIT)

    def current(self) -> bool:
        return struct.unpack_from("<Q", self.mm, GENERATION_OFFSET)[0] == self.generation


class LookupTable:
    """A client's read-only view; safe to share between threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._reopen_lock = threading.Lock()
        self._mapping = _Mapping(path)

    @classmethod
    def open(cls, path: str) -> LookupTable:
        return cls(path)

    def close(self) -> None:
        # Nothing to unmap by hand: numpy views pin the mmap; it goes with the last reference.
        pass

    def longest_run(self, keys: Sequence[bytes], exclude_bit: int | None = None) -> int:
        """Length of the leading run of ``keys`` that one holder (not ``exclude_bit``) lists."""
        if not keys:
            return 0
        mapping = self._current_mapping()
        allowed = ALL_BITS if exclude_bit is None else ALL_BITS & ~(1 << exclude_bit)
        # Most prompts match nothing: settle that with one scalar probe before numpy's
        # fixed per-call cost.
        if len(keys) < NUMPY_MIN_KEYS or _run_scalar(mapping, keys[:1], allowed) == 0:
            return _run_scalar(mapping, keys, allowed)
        return _run_numpy(mapping, keys, allowed)

    def holder_mask(self, key: bytes) -> int:
        """Bit ``b`` set: the holder with bit ``b`` lists ``key`` (a hint, like the rest)."""
        return _holders_of(self._current_mapping(), key, ALL_BITS)

    def run_upper_bound(self, keys: Sequence[bytes], exclude_bit: int | None = None) -> int:
        """A bound ``>= longest_run(keys)`` from O(log n) probes instead of n.

        Searches on "a holder of keys[0] also lists keys[i]", which holds for every i below
        the true run; each i found false is at or past the run's end, so the answer never
        falls short. Chains are published as prefixes, so the bound is nearly always the
        run itself; a lease over ``keys[:bound]`` returns the exact run either way.
        Gallops back from the end first, then bisects: a prompt is mostly a shared prefix
        plus a short new part, so the run usually ends a few blocks before the last key
        (~2 log2(new blocks) probes instead of log2(n); at worst about twice log2(n)).
        """
        if not keys:
            return 0
        mapping = self._current_mapping()
        allowed = ALL_BITS if exclude_bit is None else ALL_BITS & ~(1 << exclude_bit)
        first = _holders_of(mapping, keys[0], allowed)
        if not first:
            return 0
        if _holders_of(mapping, keys[-1], first):
            return len(keys)
        lo, hi = 0, len(keys) - 1  # true at lo, false at hi
        step = 1
        while hi - step > lo:
            mid = hi - step
            if _holders_of(mapping, keys[mid], first):
                lo = mid
                break
            hi, step = mid, step * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _holders_of(mapping, keys[mid], first):
                lo = mid
            else:
                hi = mid
        return hi

    def _current_mapping(self) -> _Mapping:
        mapping = self._mapping
        if mapping.current():
            return mapping
        with self._reopen_lock:
            if self._mapping is mapping:  # another thread may have re-opened already
                self._mapping = _Mapping(self.path)
            return self._mapping


def _run_scalar(mapping: _Mapping, keys: Sequence[bytes], allowed: int) -> int:
    running = allowed
    for i, key in enumerate(keys):
        running &= _holders_of(mapping, key, allowed)
        if not running:
            return i
    return len(keys)


def _run_numpy(mapping: _Mapping, keys: Sequence[bytes], allowed: int) -> int:
    """Probe every key's first slots at once; keys further down their chain go scalar."""
    joined = b"".join(keys)
    n = len(keys)
    if len(joined) != n * KEY_BYTES:
        raise ValueError(f"every key must be {KEY_BYTES} bytes")
    wanted = np.frombuffer(joined, dtype="<u8")[0::2] | np.uint64(FINGERPRINT_BIT)
    max_probe = mapping.max_probe()
    width = min(max_probe + 1, _WINDOW)
    window = (wanted[:, None] + _WINDOW_OFFSETS[:width]) & np.uint64(mapping.n_slots - 1)
    seen = mapping.fps[window]
    # A key sits before the first empty slot of its chain, so a match anywhere in the
    # window is the key (torn reads aside: then the hint is just wrong).
    hit = seen == wanted[:, None]
    holders = np.bitwise_or.reduce(np.where(hit, mapping.masks[window], 0), axis=1)
    holders &= np.uint64(allowed)
    resolved: set[int] = set()
    while True:
        broken = np.flatnonzero(np.bitwise_and.accumulate(holders) == 0)
        if not broken.size:
            return n
        first = int(broken[0])
        # The run ends here unless this key's window was all taken without a match: then
        # it may sit further down its chain. Only such a run-ending key is worth a look.
        if (
            holders[first]
            or width > max_probe
            or first in resolved
            or hit[first].any()
            or not seen[first].all()
        ):
            return first
        resolved.add(first)
        holders[first] = _holders_of(mapping, keys[first], allowed)


def _holders_of(mapping: _Mapping, key: bytes, allowed: int) -> int:
    cells, slot_mask = mapping.cells, mapping.n_slots - 1
    fp = int.from_bytes(key[:8], "little") | FINGERPRINT_BIT
    slot = fp & slot_mask
    for _ in range(mapping.max_probe() + 1):
        current = cells[2 * slot]
        if current == fp:
            return cells[2 * slot + 1] & allowed
        if current == 0:
            return 0
        slot = (slot + 1) & slot_mask
    return 0
