"""Shared-memory lookup table: which holders list a key, readable without an RPC.

The registry service is the only writer; clients map the file read-only, so the scheduler's
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
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import sys
import threading
from collections.abc import Callable, Sequence

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
_ALL_BITS = (1 << 64) - 1
# Slots per key probed in one vectorized step: one or two cache lines. At the table's load
# (under 1/2 live) most keys sit within it; the rest are probed one by one when they matter.
_WINDOW = 4
_WINDOW_OFFSETS = np.arange(_WINDOW, dtype=np.uint64)


def fingerprint(key: bytes) -> int:
    return int.from_bytes(key[:8], "little") | FINGERPRINT_BIT


def slots_for_capacity(capacity_blocks: int) -> int:
    """A power of two of at least 2x the capacity: load stays under 1/2 before tombstones."""
    n_slots = MIN_SLOTS
    while n_slots < 2 * capacity_blocks:
        n_slots *= 2
    return n_slots


def _new_file(path: str, n_slots: int, generation: int) -> tuple[mmap.mmap, str]:
    """A zero-filled (all slots empty) table in a temporary file next to ``path``."""
    tmp_path = f"{path}.tmp{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp_path)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp_path, flags, 0o600)
    try:
        size = HEADER_BYTES + n_slots * SLOT_BYTES
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    HEADER.pack_into(mm, 0, MAGIC, VERSION, 0, n_slots, generation, os.getpid())
    return mm, tmp_path


def _linear_probe_layout(fps: np.ndarray, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Slots for distinct fingerprints inserted into an empty table, vectorized.

    Sorted by home slot h, linear probing puts the i-th key at p_i = max(h_i, p_(i-1) + 1),
    i.e. p_i = i + max_(j<=i)(h_j - j). Keys pushed past the last slot (``p >= n_slots``)
    are returned unplaced for the caller to insert one by one (they wrap to the start).
    Returns (order, positions): key ``order[k]`` goes to ``positions[k]``.
    """
    homes = (fps & np.uint64(n_slots - 1)).astype(np.int64)
    order = np.argsort(homes, kind="stable")
    rank = np.arange(len(fps), dtype=np.int64)
    positions = rank + np.maximum.accumulate(homes[order] - rank)
    return order, positions


def stale_tables(directory: str, pid_alive: Callable[[int], bool]) -> list[str]:
    """This user's lookup tables in ``directory`` whose server is gone (a SIGKILLed registry
    cannot unlink its table, and one at another socket path never replaces it), and
    temporary files its rebuild left. The server's pid is in the header (tables) or the
    name (temporaries); a file we cannot read as a table is left alone."""
    prefix = f"kvmkt-{os.getuid()}-"
    stale = []
    try:
        names = os.listdir(directory)
    except OSError:
        return stale
    for name in names:
        if not name.startswith(prefix) or ".table" not in name or "-holder-" in name:
            continue
        path = os.path.join(directory, name)
        tail = name.rpartition(".table")[2]
        if tail.startswith(".tmp") and tail[4:].isdigit():
            pid = int(tail[4:])
        elif tail == "":
            try:
                with open(path, "rb", opener=_nofollow) as f:
                    magic, _, _, _, _, pid = HEADER.unpack(f.read(HEADER.size))
            except (OSError, struct.error):
                continue
            if magic != MAGIC:
                continue
        else:
            continue
        if not pid_alive(pid):
            stale.append(path)
    return stale


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


class LookupTableWriter:
    """The service's side: one per server, fed by ``PrefixRegistry`` as its KeyListener."""

    def __init__(self, path: str, capacity_blocks: int) -> None:
        self.path = path
        self.rebuilds = 0
        self._generation = 1
        self._live = 0  # slots whose mask is non-zero
        self._tombstones = 0  # slots with a fingerprint and mask 0
        self._max_probe = 0
        self._mm, tmp_path = _new_file(path, slots_for_capacity(capacity_blocks), 1)
        os.replace(tmp_path, path)
        self._attach(self._mm)

    @property
    def n_slots(self) -> int:
        return self._n_slots

    @property
    def live_keys(self) -> int:
        return self._live

    def key_listed(self, key: bytes, holder_bit: int) -> None:
        fp = fingerprint(key)
        slot = self._find(fp)
        cells = self._cells
        if cells[2 * slot] != fp:
            slot = self._claim(slot, fp)
        if cells[2 * slot + 1] == 0:
            self._live += 1
            self._tombstones -= 1
        cells[2 * slot + 1] |= 1 << holder_bit
        if (
            self._max_probe > PROBE_LIMIT
            or (self._live + self._tombstones) * 10 > self._n_slots * 7
        ):
            self._rebuild()

    def key_unlisted(self, key: bytes, holder_bit: int) -> None:
        fp = fingerprint(key)
        slot = self._find(fp)
        cells = self._cells
        if cells[2 * slot] != fp or cells[2 * slot + 1] == 0:
            return
        mask = cells[2 * slot + 1] & ~(1 << holder_bit) & _ALL_BITS
        cells[2 * slot + 1] = mask
        if mask == 0:
            self._live -= 1
            self._tombstones += 1
            self._clear_chain_tail(slot)

    def close(self, unlink: bool = True) -> None:
        self._cells.release()
        self._mm.close()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    # -------------------------------------------------------- internals

    def _attach(self, mm: mmap.mmap) -> None:
        self._n_slots = HEADER.unpack_from(mm, 0)[3]
        self._cells = memoryview(mm)[HEADER_BYTES:].cast("Q")

    def _find(self, fp: int) -> int:
        """The slot holding ``fp``, else the first reusable slot on its probe chain."""
        cells, slot_mask = self._cells, self._n_slots - 1
        slot = fp & slot_mask
        reusable = -1
        while True:
            current = cells[2 * slot]
            if current == fp:
                return slot
            if current == 0:
                return slot if reusable < 0 else reusable
            if reusable < 0 and cells[2 * slot + 1] == 0:
                reusable = slot  # a tombstone: ours to take if fp is not further on
            slot = (slot + 1) & slot_mask

    def _claim(self, slot: int, fp: int) -> int:
        cells = self._cells
        if cells[2 * slot] == 0:
            self._tombstones += 1  # counted as a tombstone until its first bit is set
        # A reused tombstone keeps its mask 0, so a reader that sees the new fingerprint
        # before its bit is set reads "no holder": a stale hint, never a wrong holder.
        cells[2 * slot] = fp
        probe = (slot - fp) & (self._n_slots - 1)
        if probe > self._max_probe:
            self._max_probe = probe
            struct.pack_into("<I", self._mm, MAX_PROBE_OFFSET, probe)
        return slot

    def _clear_chain_tail(self, slot: int) -> None:
        """Empty tombstones that end a probe chain: no probe has to walk past them."""
        cells, slot_mask = self._cells, self._n_slots - 1
        while cells[2 * ((slot + 1) & slot_mask)] == 0 and cells[2 * slot + 1] == 0:
            if cells[2 * slot] == 0:
                break
            cells[2 * slot] = 0
            self._tombstones -= 1
            slot = (slot - 1) & slot_mask

    def _rebuild(self) -> None:
        """Re-insert the live keys into a fresh file (bigger if needed), rename it in place."""
        old = np.frombuffer(self._mm, dtype="<u8", offset=HEADER_BYTES).reshape(-1, 2)
        live = old[old[:, 1] != 0].copy()
        del old  # release the export so the old mmap can be closed below
        n_slots = self._n_slots
        while len(live) * 2 > n_slots:
            n_slots *= 2
        while True:
            order, positions = _linear_probe_layout(live[:, 0], n_slots)
            placed = positions < n_slots
            homes = live[order, 0] & np.uint64(n_slots - 1)
            probe = int((positions[placed] - homes[placed].astype(np.int64)).max(initial=0))
            if probe <= PROBE_LIMIT // 2:
                break
            n_slots *= 2  # clustered: spread out so probes stay short
        self._generation += 1
        mm, tmp_path = _new_file(self.path, n_slots, self._generation)
        new = np.frombuffer(mm, dtype="<u8", offset=HEADER_BYTES).reshape(-1, 2)
        new[positions[placed]] = live[order[placed]]
        del new
        old_mm = self._mm
        self._cells.release()
        self._mm = mm
        self._attach(mm)
        self._live, self._tombstones, self._max_probe = len(live), 0, probe
        struct.pack_into("<I", mm, MAX_PROBE_OFFSET, probe)
        for fp, holders in live[order[~placed]].tolist():  # the few that wrap around
            slot = self._claim(self._find(fp), fp)
            self._cells[2 * slot + 1] = holders
            self._tombstones -= 1
        os.replace(tmp_path, self.path)
        # Readers of the old file compare this with the generation they mapped: re-open.
        struct.pack_into("<Q", old_mm, GENERATION_OFFSET, self._generation)
        old_mm.close()
        self.rebuilds += 1


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
        allowed = _ALL_BITS if exclude_bit is None else _ALL_BITS & ~(1 << exclude_bit)
        # Most prompts match nothing: settle that with one scalar probe before numpy's
        # fixed per-call cost.
        if len(keys) < NUMPY_MIN_KEYS or _run_scalar(mapping, keys[:1], allowed) == 0:
            return _run_scalar(mapping, keys, allowed)
        return _run_numpy(mapping, keys, allowed)

    def run_upper_bound(self, keys: Sequence[bytes], exclude_bit: int | None = None) -> int:
        """A bound ``>= longest_run(keys)`` from O(log n) probes instead of n.

        Bisects on "a holder of keys[0] also lists keys[i]", which holds for every i below
        the true run; each i found false is at or past the run's end, so the answer never
        falls short. Chains are published as prefixes, so the bound is nearly always the
        run itself; a lease over ``keys[:bound]`` returns the exact run either way.
        """
        if not keys:
            return 0
        mapping = self._current_mapping()
        allowed = _ALL_BITS if exclude_bit is None else _ALL_BITS & ~(1 << exclude_bit)
        first = _holders_of(mapping, keys[0], allowed)
        if not first:
            return 0
        if _holders_of(mapping, keys[-1], first):
            return len(keys)
        lo, hi = 0, len(keys) - 1  # true at lo, false at hi
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
