"""``LookupTableWriter``: the registry's side of the shared-memory lookup table.

The format, and the reader clients use, are in ``lookup_table``. The registry is the only
writer: ``PrefixRegistry`` tells it (as its KeyListener) which (key, holder) pairs start or
stop being listed, and it keeps the file in step.

Space is reserved whole when a table file is made (``posix_fallocate``): a sparse file on
a full tmpfs (/dev/shm) would kill the registry with SIGBUS at its first write to a page
not backed yet, and auto-start would restart it into the same death. So a table that
cannot be made raises ``OSError`` up front, and ``create_table`` then tries the socket's
directory, else gives none (the registry serves without: clients ask over the socket). A
rebuild that finds no space for a bigger file re-lays the keys in the file it has. Until it
can grow, keys it cannot hold where readers look (past ``MAX_FILL``, or more than
``PROBE_LIMIT`` slots from home) are left out: hints miss them (a missed reuse, never a
wrong import).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
from collections.abc import Callable

import numpy as np

from . import paths
from .lookup_table import (
    ALL_BITS,
    GENERATION_OFFSET,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    MAX_PROBE_OFFSET,
    MIN_SLOTS,
    PROBE_LIMIT,
    SLOT_BYTES,
    VERSION,
    fingerprint,
)

log = logging.getLogger(__name__)

MAX_FILL = 0.9  # used slots at most when the table cannot grow: probes must meet an empty one
GROW_RETRY_FRACTION = 8  # after a failed growth, retry once n_slots / this many keys came


def slots_for_capacity(capacity_blocks: int) -> int:
    """A power of two of at least 2x the capacity: load stays under 1/2 before tombstones."""
    n_slots = MIN_SLOTS
    while n_slots < 2 * capacity_blocks:
        n_slots *= 2
    return n_slots


def create_table(socket_path: str, capacity_blocks: int) -> LookupTableWriter | None:
    """The registry's table: in /dev/shm, else next to the socket, else none (logged)."""
    failures = []
    for path in dict.fromkeys(
        (paths.lookup_table_path(socket_path), paths.fallback_lookup_table_path(socket_path))
    ):
        try:
            return LookupTableWriter(path, capacity_blocks)
        except OSError as exc:
            failures.append(str(exc))
            log.warning("cannot create the lookup table: %s", exc)
    log.warning(
        "serving without a lookup table (%s): clients ask over the socket instead, one round "
        "trip per lookup; free space in %s (e.g. a larger --shm-size) and restart the registry",
        "; ".join(failures), paths.SHM_DIR,
    )  # fmt: skip
    return None


def _new_file(path: str, n_slots: int, generation: int) -> tuple[mmap.mmap, str]:
    """A zero-filled (all slots empty) table in a temporary file next to ``path``; every
    page reserved. Raises OSError (ENOSPC: the directory's filesystem is full)."""
    tmp_path = f"{path}.tmp{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp_path)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp_path, flags, 0o600)
    size = HEADER_BYTES + n_slots * SLOT_BYTES
    try:
        os.posix_fallocate(fd, 0, size)  # not ftruncate: a sparse file can SIGBUS us later
        mm = mmap.mmap(fd, size)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise OSError(
            exc.errno, f"cannot reserve {size} bytes for a lookup table in "
            f"{os.path.dirname(path)}: {exc.strerror}",
        ) from exc  # fmt: skip
    finally:
        os.close(fd)
    HEADER.pack_into(mm, 0, MAGIC, VERSION, 0, n_slots, generation, os.getpid())
    return mm, tmp_path


def _linear_probe_layout(fps: np.ndarray, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Slots for distinct fingerprints inserted into an empty table, vectorized.

    Sorted by home slot h, linear probing puts the i-th key at p_i = max(h_i, p_(i-1) + 1),
    i.e. p_i = i + max_(j<=i)(h_j - j). Keys pushed past the last slot (``p >= n_slots``)
    are left for the caller to insert one by one (they wrap to the start).
    Returns (order, positions): key ``order[k]`` goes to ``positions[k]``.
    """
    homes = (fps & np.uint64(n_slots - 1)).astype(np.int64)
    order = np.argsort(homes, kind="stable")
    rank = np.arange(len(fps), dtype=np.int64)
    positions = rank + np.maximum.accumulate(homes[order] - rank)
    return order, positions


def _layout_probe(fps: np.ndarray, n_slots: int) -> int:
    """The longest probe of the keys ``_linear_probe_layout`` places without wrapping."""
    order, positions = _linear_probe_layout(fps, n_slots)
    placed = positions < n_slots
    homes = (fps[order] & np.uint64(n_slots - 1)).astype(np.int64)
    return int((positions[placed] - homes[placed]).max(initial=0))


def _place(table: np.ndarray, live: np.ndarray) -> int:
    """Put ``live`` rows (distinct fingerprints, masks) into the empty ``table`` (n x 2
    uint64) where linear probing finds them; returns the longest probe."""
    n_slots = len(table)
    slot_mask = n_slots - 1
    order, positions = _linear_probe_layout(live[:, 0], n_slots)
    placed = positions < n_slots
    homes = (live[order, 0] & np.uint64(slot_mask)).astype(np.int64)
    table[positions[placed]] = live[order[placed]]
    probe = int((positions[placed] - homes[placed]).max(initial=0))
    for fp, mask in live[order[~placed]].tolist():  # the few that wrap around to slot 0
        slot = fp & slot_mask
        while table[slot, 0]:
            slot = (slot + 1) & slot_mask
        table[slot] = (fp, mask)
        probe = max(probe, (slot - fp) & slot_mask)
    return probe


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


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


class LookupTableWriter:
    """The service's side: one per server, fed by ``PrefixRegistry`` as its KeyListener.
    Raises OSError if the file cannot be made (no space)."""

    def __init__(self, path: str, capacity_blocks: int) -> None:
        self.path = path
        self.rebuilds = 0
        self.in_place_rebuilds = 0  # rebuilds that found no space for a bigger file
        self.dropped_keys = 0  # keys left out: full, and no space to grow
        self._generation = 1
        self._live = 0  # slots whose mask is non-zero
        self._tombstones = 0  # slots with a fingerprint and mask 0
        self._max_probe = 0
        self._grow_after = 0  # > 0: keys to come before trying to grow again (no space)
        self._short_of_space = False
        self._mm, tmp_path = _new_file(path, slots_for_capacity(capacity_blocks), 1)
        try:
            os.replace(tmp_path, path)
        except OSError:
            self._mm.close()
            os.unlink(tmp_path)
            raise
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
        if cells[2 * slot] != fp and not self._room_at(slot, fp):
            self.dropped_keys += 1  # cannot grow: hints miss this key
        else:
            if cells[2 * slot] != fp:
                slot = self._claim(slot, fp)
            if cells[2 * slot + 1] == 0:
                self._live += 1
                self._tombstones -= 1
            cells[2 * slot + 1] |= 1 << holder_bit
        if self._grow_after:  # counted on dropped keys too: the rebuild clears tombstones
            self._grow_after -= 1
        elif (
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
        mask = cells[2 * slot + 1] & ~(1 << holder_bit) & ALL_BITS
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
        self._fill_limit = int(self._n_slots * MAX_FILL)
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

    def _room_at(self, slot: int, fp: int) -> bool:
        """Whether a new key may take ``slot``: always, but while growing is put off (no
        space) only within readers' reach, and never the last free slots (probes end at
        an empty one)."""
        if self._cells[2 * slot] == 0 and self._live + self._tombstones >= self._fill_limit:
            return False
        return not self._grow_after or (slot - fp) & (self._n_slots - 1) <= PROBE_LIMIT

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

    def _live_rows(self) -> np.ndarray:
        slots = np.frombuffer(self._mm, dtype="<u8", offset=HEADER_BYTES).reshape(-1, 2)
        return slots[slots[:, 1] != 0].copy()  # a copy: the mmap must not stay exported

    def _rebuild(self) -> None:
        """Re-insert the live keys into a fresh file (bigger if needed), rename it in place;
        without space for it, re-lay them in this file."""
        live = self._live_rows()
        n_slots = self._n_slots
        while len(live) * 2 > n_slots:
            n_slots *= 2
        while _layout_probe(live[:, 0], n_slots) > PROBE_LIMIT // 2:
            n_slots *= 2  # clustered: spread out so probes stay short
        try:
            mm, tmp_path = _new_file(self.path, n_slots, self._generation + 1)
        except OSError as exc:
            self._rebuild_in_place(live, exc)
            return
        new = np.frombuffer(mm, dtype="<u8", offset=HEADER_BYTES).reshape(-1, 2)
        probe = _place(new, live)
        del new  # release the export so the mmap can be closed
        struct.pack_into("<I", mm, MAX_PROBE_OFFSET, probe)
        try:
            os.replace(tmp_path, self.path)
        except OSError as exc:
            mm.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
            self._rebuild_in_place(live, exc)
            return
        self._generation += 1
        old_mm = self._mm
        self._cells.release()
        self._mm = mm
        self._attach(mm)
        self._live, self._tombstones, self._max_probe = len(live), 0, probe
        # Readers of the old file compare this with the generation they mapped: re-open.
        struct.pack_into("<Q", old_mm, GENERATION_OFFSET, self._generation)
        old_mm.close()
        self.rebuilds += 1
        if self._short_of_space:
            log.warning("lookup table %s grows again (%d slots)", self.path, n_slots)
            self._short_of_space = False

    def _rebuild_in_place(self, live: np.ndarray, exc: OSError) -> None:
        """No room for a new file: drop the tombstones by re-laying the live keys in this
        one, and try to grow again only after a while (each try costs O(n_slots)). Keys
        that land out of readers' reach become tombstones (they keep probe chains whole)."""
        n_slots = self._n_slots
        fresh = np.zeros((n_slots, 2), dtype="<u8")
        _place(fresh, live)
        fps, slot_mask = fresh[:, 0], np.uint64(n_slots - 1)
        dist = (np.arange(n_slots, dtype=np.uint64) - (fps & slot_mask)) & slot_mask
        far = (fps != 0) & (dist > PROBE_LIMIT)
        fresh[far, 1] = 0
        probe = int(dist[(fps != 0) & ~far].max(initial=0))
        slots = np.frombuffer(self._mm, dtype="<u8", offset=HEADER_BYTES).reshape(-1, 2)
        # Readers may see a half-copied table for a moment: wrong hints, nothing worse; the
        # larger max_probe meanwhile keeps keys of both layouts within their probes.
        struct.pack_into("<I", self._mm, MAX_PROBE_OFFSET, max(probe, self._max_probe))
        slots[:] = fresh
        del slots
        struct.pack_into("<I", self._mm, MAX_PROBE_OFFSET, probe)
        dropped = int(far.sum())
        self.dropped_keys += dropped
        self._live, self._tombstones, self._max_probe = len(live) - dropped, dropped, probe
        self._grow_after = max(64, self._n_slots // GROW_RETRY_FRACTION)
        self.in_place_rebuilds += 1
        if not self._short_of_space:
            log.warning("lookup table %s cannot grow (%s): keeping %d slots; keys past %d%% "
                        "of them are left out of the hints", self.path, exc, self._n_slots,
                        int(MAX_FILL * 100))
            self._short_of_space = True
