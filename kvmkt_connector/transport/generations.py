"""Block generations: how an importer knows an in-place page was not rewritten under it.

With in-place export (``cuda_ipc``) importers read the exporter's own KV cache blocks, and
the exporter pins nothing: vLLM may hand a published block to another request at any time.
So every block has a generation in a small shared-memory file the exporter's scheduler
writes and importers map read-only. The exporter bumps a block's generation when vLLM
allocates it, in ``build_connector_meta``, i.e. before the forward that writes it is even
sent to the workers. A published location carries the generation it was published at
(``location = generation << 32 | block``).

An importer copies a page and only then compares the block's generation with the one in
its location. Unchanged means no write into the block was scheduled before the copy ended,
so the copy read the published KV. Changed means the pages may be torn: the load is
reported failed and vLLM recomputes them (loads are asynchronous, so that is a safe path).
Generations only grow, so a block that held the same key again later cannot pass for the
old one.

File layout (little-endian): 64-byte header (magic, version, num_blocks), then one u32 per
block. Importers keep the tables they read in a ``MappedTables`` (scheduler and workers alike).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
import time
from collections.abc import Sequence

import numpy as np

from kvmkt_connector.transport.descriptors import TransferError

_MAGIC = b"KVMKTGN1"
_HEADER = struct.Struct("<8sIQ")
_HEADER_BYTES = 64
BLOCK_BITS = 32
_BLOCK_MASK = (1 << BLOCK_BITS) - 1
_GEN_MASK = (1 << 31) - 1  # keeps locations positive int64


def encode_locations(blocks: np.ndarray, generations: np.ndarray) -> list[int]:
    return ((generations.astype(np.int64) << BLOCK_BITS) | blocks.astype(np.int64)).tolist()


def next_generations(generations: np.ndarray) -> np.ndarray:
    """Generations after one more rewrite (31 bits: locations stay positive int64)."""
    return (generations + 1) & _GEN_MASK


def decode_locations(locations: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(block ids, generations) of published locations."""
    loc = np.asarray(locations, dtype=np.int64)
    return loc & _BLOCK_MASK, (loc >> BLOCK_BITS).astype(np.uint32)


class GenerationTable:
    """One exporter's block generations, mapped from ``path``."""

    def __init__(self, path: str, num_blocks: int, fd: int, writable: bool) -> None:
        self.path, self.num_blocks, self.writable = path, num_blocks, writable
        size = _HEADER_BYTES + 4 * num_blocks
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            if os.fstat(fd).st_size < size:
                raise TransferError(f"{path} is too small for {num_blocks} blocks")
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        magic, _, n = _HEADER.unpack_from(self._mmap, 0)
        if not writable and (magic, n) != (_MAGIC, num_blocks):
            self._mmap.close()
            raise TransferError(f"{path} is not a generation table of {num_blocks} blocks")
        self.generations = np.frombuffer(self._mmap, dtype=np.uint32, count=num_blocks,
                                         offset=_HEADER_BYTES)
        self._gens_mv = memoryview(self.generations).cast("B").cast("I")
        # Bumps are read-modify-writes from two threads (a cache reset's bump_all may run
        # on the holder channel's): unlocked, one could write back a generation the other
        # had moved past. Readers need no lock (either value is a valid tag then).
        self._bump_lock = threading.Lock()

    @classmethod
    def create(cls, path: str, num_blocks: int) -> GenerationTable:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, _HEADER_BYTES + 4 * num_blocks)  # no SIGBUS later
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        table = cls(path, num_blocks, fd, writable=True)
        _HEADER.pack_into(table._mmap, 0, _MAGIC, 1, num_blocks)
        return table

    @classmethod
    def open(cls, path: str, num_blocks: int) -> GenerationTable:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise TransferError(f"cannot open generation table {path}: {e}") from e
        if os.fstat(fd).st_uid != os.getuid():
            os.close(fd)
            raise TransferError(f"{path} is not a generation table of this user")
        return cls(path, num_blocks, fd, writable=False)

    # ------------------------------------------------------------ exporter

    def bump(self, block_ids: list[int] | np.ndarray) -> None:
        """Blocks about to be rewritten: no location published before stays valid."""
        if len(block_ids):  # (a block listed twice gets the same new value twice)
            idx = np.asarray(block_ids, dtype=np.int64)
            with self._bump_lock:
                self.generations[idx] = next_generations(self.generations[idx])

    def bump_all(self) -> None:
        with self._bump_lock:
            if self.generations is not None:  # (closed: the engine is shutting down)
                self.generations[:] = next_generations(self.generations)

    def locations(self, block_ids: list[int]) -> list[int]:
        """The current locations of these blocks. (Callers hold lists; past a few dozen
        ids numpy's conversions cost less than a Python loop: 25 against 45 us for 1,024.)"""
        if len(block_ids) < 64:
            gens, num_blocks = self._gens_mv, self.num_blocks
            if block_ids and (min(block_ids) < 0 or max(block_ids) >= num_blocks):
                raise IndexError("block id out of range")
            return [(gens[b] << BLOCK_BITS) | b for b in block_ids]
        idx = np.fromiter(block_ids, dtype=np.int64, count=len(block_ids))
        if idx.min() < 0 or idx.max() >= self.num_blocks:
            raise IndexError("block id out of range")
        return ((self.generations[idx].astype(np.int64) << BLOCK_BITS) | idx).tolist()

    # ------------------------------------------------------------ importer

    def unchanged_prefix(self, locations: Sequence[int] | np.ndarray) -> int:
        """How many leading locations still name the page they were published for."""
        blocks, gens = decode_locations(locations)
        if blocks.size and (blocks.max() >= self.num_blocks or blocks.min() < 0):
            return 0
        stale = np.flatnonzero(self.generations[blocks] != gens)
        return int(stale[0]) if stale.size else len(locations)

    def close(self) -> None:
        with self._bump_lock:
            self.generations = None  # type: ignore[assignment]
        self._gens_mv.release()
        with contextlib.suppress(BufferError):
            self._mmap.close()
        if self.writable:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class MappedTables:
    """Neighbours' generation tables an importer reads, mapped once per path: at most
    ``limit`` (the oldest mapped goes first), and those whose file is gone (its holder died
    and the registry removed it, or it exited) are dropped by ``sweep``, which the owner
    calls often (every step) and which looks at most once per ``interval_s``. A dropped
    table is not closed, as a copy in flight may still check it: it is unmapped once
    unreferenced."""

    def __init__(self, limit: int = 16, interval_s: float = 1.0) -> None:
        self._limit, self._interval_s = limit, interval_s
        self._tables: dict[str, GenerationTable] = {}
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, path: str) -> bool:
        return path in self._tables

    def get(self, path: str, num_blocks: int) -> GenerationTable:
        """The table at ``path``, mapped now if needed; raises TransferError."""
        table = self._tables.get(path)
        if table is None:
            table = GenerationTable.open(path, num_blocks)
            while len(self._tables) >= self._limit:
                self._tables.pop(next(iter(self._tables)))
            self._tables[path] = table
        return table

    def sweep(self, now: float | None = None) -> list[str]:
        """Drop tables whose file is gone (checked at most once per interval); their paths."""
        now = time.monotonic() if now is None else now
        if now < self._next_sweep or not self._tables:
            return []
        self._next_sweep = now + self._interval_s
        gone = [p for p in self._tables if not os.path.exists(p)]
        for path in gone:
            del self._tables[path]
        return gone

    def close(self) -> None:
        for table in self._tables.values():
            table.close()
        self._tables.clear()
