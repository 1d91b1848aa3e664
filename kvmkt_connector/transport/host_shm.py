"""Host shared-memory transport: pages staged in a file under /dev/shm.

The exporting worker copies the pages it publishes from its KV cache into *slots* of its
region (its KV cache is private memory); importing workers map the file and copy slots into
their own KV cache. This is the path for CPU engines and for GPUs without peer access.

File layout: a header page, a key table (16 bytes per slot), then for each KV segment an
array ``(num_slots, segment_bytes)``, each 4 KiB aligned. A slot's key is cleared before its
pages are rewritten and set after, so an importer that sees the expected key before and after
its copy knows the slot held that key's pages throughout. Leases already forbid reuse while
an import runs; the key check turns a broken promise into a load error instead of wrong KV.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
import time

import numpy as np
import torch

from kvmkt_connector.logs import get_logger
from kvmkt_connector.registry.paths import holder_file_pid
from kvmkt_connector.transport import cuda_driver as cu
from kvmkt_connector.transport.descriptors import HostShmDescriptor, TransferError, process_alive
from kvmkt_connector.transport.layout import KVPageLayout
from kvmkt_connector.transport.page_copy import PageCopier, SegmentTable

KEY_BYTES = 16
_MAGIC = b"KVMKTHR1"
_HEADER = struct.Struct("<8sIQ")  # magic, version, num_slots
_VERSION = 1
_ALIGN = 4096
MAX_MAPPED_REGIONS = 16  # importers keep at most this many holders' regions mapped
SWEEP_S = 1.0  # how often an importer looks for regions of holders that went
IDLE_CLOSE_S = 60.0  # a region unused this long is unmapped (re-opened on the next import)
logger = get_logger(__name__)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _file_size(num_slots: int, segment_bytes: list[int]) -> tuple[int, list[int]]:
    offset = _align(_HEADER.size) + _align(num_slots * KEY_BYTES)
    offsets = []
    for nbytes in segment_bytes:
        offsets.append(offset)
        offset += _align(num_slots * nbytes)
    return offset, offsets


def slots_for_budget(budget_bytes: int | None, segment_bytes: list[int], path_dir: str,
                     num_blocks: int) -> int:
    """How many slots fit the byte budget (None: as many as the KV cache has blocks) and
    half of the free space where the file goes."""
    per_slot = sum(segment_bytes) + KEY_BYTES
    st = os.statvfs(path_dir)
    free = st.f_bavail * st.f_frsize
    budget = num_blocks * per_slot if budget_bytes is None else budget_bytes
    return max(0, min(budget, free // 2) // per_slot)


class HostPageRegion:
    """A mapped region file; ``keys`` and ``segments`` are views into the shared memory."""

    def __init__(self, descriptor: HostShmDescriptor, fd: int, owner: bool) -> None:
        self.descriptor = descriptor
        self.owner = owner
        self.inode = 0  # set by open(): a file replaced under the same path is another one
        size, offsets = _file_size(descriptor.num_slots, descriptor.segment_bytes)
        try:
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        magic, version, num_slots = _HEADER.unpack_from(self._mmap, 0)
        if owner:
            _HEADER.pack_into(self._mmap, 0, _MAGIC, _VERSION, descriptor.num_slots)
        elif (magic, version, num_slots) != (_MAGIC, _VERSION, descriptor.num_slots):
            self._mmap.close()
            raise TransferError(f"{descriptor.path} is not a matching kvmkt page region")
        self._size, self.offsets = size, offsets
        self.device_base = 0  # > 0 once registered with CUDA (see register_with_cuda)
        key_off = _align(_HEADER.size)
        self.keys = np.frombuffer(
            self._mmap, dtype=np.uint8, count=descriptor.num_slots * KEY_BYTES, offset=key_off
        ).reshape(descriptor.num_slots, KEY_BYTES)
        self.segments = [
            torch.frombuffer(self._mmap, dtype=torch.uint8, count=descriptor.num_slots * n, offset=o)
            .view(descriptor.num_slots, n)
            for n, o in zip(descriptor.segment_bytes, offsets, strict=True)
        ]

    @classmethod
    def create(cls, path: str, num_slots: int, segment_bytes: list[int]) -> HostPageRegion:
        size, _ = _file_size(num_slots, segment_bytes)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserve the memory now: a sparse file on a full /dev/shm would SIGBUS the
            # worker at its first write. ENOSPC here just means no export region.
            os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return cls(HostShmDescriptor(path, num_slots, list(segment_bytes)), fd, owner=True)

    @classmethod
    def open(cls, descriptor: HostShmDescriptor) -> HostPageRegion:
        try:
            fd = os.open(descriptor.path, os.O_RDWR)
        except OSError as e:
            raise TransferError(f"cannot open page region {descriptor.path}: {e}") from e
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_size < _file_size(
            descriptor.num_slots, descriptor.segment_bytes
        )[0]:
            os.close(fd)
            raise TransferError(f"{descriptor.path} is not a page region of this user")
        region = cls(descriptor, fd, owner=False)
        region.inode = st.st_ino
        return region

    def register_with_cuda(self) -> int:
        """Page-lock the mapping and map it into the GPU's address space (once): the copy
        kernel then reads or writes the slots directly, at PCIe speed, with no CPU gather."""
        if not self.device_base:
            view = np.frombuffer(self._mmap, dtype=np.uint8, count=1)
            self._host_base = int(view.ctypes.data)
            del view
            self.device_base = cu.host_register(self._host_base, self._size)
        return self.device_base

    def close(self) -> None:
        if self.device_base:  # before unmapping: CUDA must let go of the pages first
            try:
                cu.host_unregister(self._host_base)
            except TransferError as e:
                logger.warning("kvmkt: %s stays page-locked: %s", self.descriptor.path, e)
            self.device_base = 0
        self.keys = None  # type: ignore[assignment]
        self.segments = []
        # A view may still be alive somewhere; then the mapping goes with the process.
        with contextlib.suppress(BufferError):
            self._mmap.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.descriptor.path)


def _index(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64, device=device)


def _gpu_copier(layout: KVPageLayout) -> PageCopier | None:
    """The page-copy kernel for a KV cache on a GPU whose segments share one page size."""
    if layout.device.type != "cuda" or len(set(layout.segment_bytes)) != 1:
        return None
    try:
        return PageCopier(layout.device)
    except Exception as e:  # no NVRTC / driver: the CPU gather path still works
        logger.warning("kvmkt: host_shm without the copy kernel (%s): slower staging", e)
        return None


class _DirectCopies:
    """Region <-> KV cache copies by the page-copy kernel through the registered mapping."""

    def __init__(self, layout: KVPageLayout) -> None:
        self.layout = layout
        self.copier = _gpu_copier(layout)
        self._tables: dict[str, SegmentTable] = {}

    def table(self, region: HostPageRegion, to_region: bool) -> SegmentTable | None:
        """The segment table for copies into (``to_region``) or out of the region; None if
        the region cannot be registered (then the caller stages through the CPU)."""
        if self.copier is None:
            return None
        key = f"{region.descriptor.path}:{to_region}"
        table = self._tables.get(key)
        if table is None:
            try:
                base = region.register_with_cuda()
            except TransferError as e:
                logger.warning("kvmkt: cannot page-lock %s (%s): slower staging",
                               region.descriptor.path, e)
                self.copier = None
                return None
            lay = self.layout
            slots = ([base + o for o in region.offsets], region.descriptor.segment_bytes)
            local = ([v.data_ptr() for v in lay.views], [s.block_stride for s in lay.segments])
            src, dst = (local, slots) if to_region else (slots, local)
            table = self._tables[key] = SegmentTable.build(*src, *dst, lay.device)
        return table

    def copy(self, table: SegmentTable, src: list[int], dst: list[int], src_limit: int,
             dst_limit: int) -> None:
        assert self.copier is not None
        ids = PageCopier.block_ids(src, dst, src_limit, dst_limit)
        event, _keep = self.copier.copy(table, ids, self.layout.segment_bytes[0])
        event.synchronize()  # the slot keys are checked or set only after the pages moved

    def forget(self, path: str) -> None:
        for key in [k for k in self._tables if k.rsplit(":", 1)[0] == path]:
            del self._tables[key]


class HostShmExporter:
    """Worker side of an exporting instance: KV cache pages -> region slots."""

    def __init__(self, layout: KVPageLayout, region: HostPageRegion) -> None:
        if region.descriptor.segment_bytes != layout.segment_bytes:
            raise ValueError("page region does not match the KV layout")
        self.layout, self.region = layout, region
        self._direct = _DirectCopies(layout)
        self._direct.table(region, to_region=True)  # page-lock now (seconds per 10 GB), not at the first save

    def save(self, block_ids: list[int], slots: list[int], keys: list[bytes]) -> None:
        slot_idx = np.asarray(slots, dtype=np.int64)
        self.region.keys[slot_idx] = 0  # invalidate before rewriting
        table = self._direct.table(self.region, to_region=True)
        if table is not None:  # on the current stream: after the forwards that wrote them
            self._direct.copy(table, block_ids, slots, self.layout.num_blocks,
                              self.region.descriptor.num_slots)
        else:
            blocks = _index(block_ids, self.layout.device)
            slots_t = _index(slots, torch.device("cpu"))
            for view, staged in zip(self.layout.views, self.region.segments, strict=True):
                staged.index_copy_(0, slots_t, view.index_select(0, blocks).cpu())
        self.region.keys[slot_idx] = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 16)


class HostShmImporter:
    """Worker side of an importing instance: holders' region slots -> KV cache pages.

    A mapped region pins its file's memory even after the holder died and the file was
    unlinked, so a background thread closes, within ``SWEEP_S``, regions whose file is gone
    or replaced or whose creator died, and those unused for ``IDLE_CLOSE_S`` (an idle
    engine runs no steps, so this cannot wait for the next load). A lock keeps it from
    closing a region a copy is reading.
    """

    def __init__(self, layout: KVPageLayout) -> None:
        self.layout = layout
        self._regions: dict[str, HostPageRegion] = {}
        self._direct = _DirectCopies(layout)
        self._last_used: dict[str, float] = {}
        self._lock = threading.Lock()  # the sweeper closes regions: never under a copy
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    @property
    def mapped_regions(self) -> int:
        return len(self._regions)

    def _region(self, descriptor: HostShmDescriptor) -> HostPageRegion:
        region = self._regions.pop(descriptor.path, None)
        if region is None or region.descriptor != descriptor:
            if region is not None:
                self._close(region)
            if descriptor.segment_bytes != self.layout.segment_bytes:
                raise TransferError("holder's page segments differ from ours")
            region = HostPageRegion.open(descriptor)
            while len(self._regions) >= MAX_MAPPED_REGIONS:  # e.g. regions of dead holders
                self._forget_locked(next(iter(self._regions)))
            if self._sweeper is None:
                self._sweeper = threading.Thread(target=self._sweep_loop, daemon=True,
                                                 name="kvmkt-shm-sweep")
                self._sweeper.start()
        self._regions[descriptor.path] = region  # most recently used last
        self._last_used[descriptor.path] = time.monotonic()
        return region

    def _close(self, region: HostPageRegion) -> None:
        self._direct.forget(region.descriptor.path)
        region.close()

    def load(
        self, descriptor: HostShmDescriptor, slots: list[int], keys: list[bytes], block_ids: list[int]
    ) -> None:
        """Copy and wait (on the current stream when on a GPU): the slot keys are checked
        before and after, so a slot rewritten meanwhile fails the load."""
        with self._lock:
            self._load(descriptor, slots, keys, block_ids)

    def _load(
        self, descriptor: HostShmDescriptor, slots: list[int], keys: list[bytes], block_ids: list[int]
    ) -> None:
        region = self._region(descriptor)
        if max(slots) >= descriptor.num_slots or min(slots) < 0:
            raise TransferError("slot out of range")
        slot_idx = np.asarray(slots, dtype=np.int64)
        expected = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 16)
        if not np.array_equal(region.keys[slot_idx], expected):
            raise TransferError("holder's slots no longer hold the leased pages")
        table = self._direct.table(region, to_region=False)
        if table is not None:
            self._direct.copy(table, slots, block_ids, descriptor.num_slots,
                              self.layout.num_blocks)
        else:
            blocks = _index(block_ids, self.layout.device)
            slots_t = _index(slots, torch.device("cpu"))
            for view, staged in zip(self.layout.views, region.segments, strict=True):
                view.index_copy_(0, blocks, staged.index_select(0, slots_t).to(view.device))
        if not np.array_equal(region.keys[slot_idx], expected):
            raise TransferError("holder rewrote slots during the copy")

    def sweep(self, now: float | None = None) -> list[str]:
        """Close the regions of holders that are gone (or idle); returns their paths."""
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [path for path, region in self._regions.items()
                    if now - self._last_used[path] > IDLE_CLOSE_S or not _still_there(region)]
            for path in gone:
                self._forget_locked(path)
        return gone

    def _sweep_loop(self) -> None:
        if self.layout.device.type == "cuda":  # unregistering page-locked regions needs our context
            torch.cuda.set_device(self.layout.device)
        while not self._stop.wait(SWEEP_S):
            try:
                self.sweep()
            except Exception as e:  # housekeeping must never end: log and go on
                logger.warning("kvmkt: host_shm sweep failed: %s", e)

    def forget(self, path: str) -> None:
        with self._lock:
            self._forget_locked(path)

    def _forget_locked(self, path: str) -> None:
        region = self._regions.pop(path, None)
        self._last_used.pop(path, None)
        if region is not None:
            self._close(region)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for path in list(self._regions):
                self._forget_locked(path)


def _still_there(region: HostPageRegion) -> bool:
    """The region's file is the one we mapped and the process that made it lives."""
    try:
        if os.stat(region.descriptor.path).st_ino != region.inode:
            return False
    except OSError:
        return False
    pid = holder_file_pid(region.descriptor.path)
    return pid is None or process_alive(pid)
