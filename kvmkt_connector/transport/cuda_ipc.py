"""CUDA IPC transport: read a neighbour's KV cache pages in place, GPU to GPU.

Exporter: each KV cache allocation is exported once as a legacy CUDA IPC handle, and each
segment is described by (allocation, offset of block 0, block stride, bytes). Raw device
pointers mean nothing in another process; handles do.

Importer: opens each handle once (``CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS``: the mapping goes
over NVLink when the GPUs differ; the exporter's GPU need not be visible to this process)
and caches the mapping. A load is one ``PeerCopyPlan`` run by one kernel launch on the
current stream (the importer's side stream; see connector/loads.py): the kernel computes
each page's addresses from the block ids and a per-holder segment table kept on the GPU,
so a load ships two block-id lists (in the launch's parameter), not an address per page.
Mappings of exporters that died or stayed unused are closed once no copy uses them.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvmkt_connector.logs import get_logger
from kvmkt_connector.transport import cuda_driver as cu
from kvmkt_connector.transport.descriptors import (
    CudaIpcDescriptor,
    CudaIpcSegment,
    TransferError,
    process_alive,
)
from kvmkt_connector.transport.layout import KVPageLayout
from kvmkt_connector.transport.page_copy import PageCopier, SegmentTable

IDLE_CLOSE_S = 60.0
logger = get_logger(__name__)


def describe_exports(layout: KVPageLayout) -> CudaIpcDescriptor:
    """IPC handles and geometry of our KV cache. Raises TransferError if not exportable."""
    if layout.device.type != "cuda":
        raise TransferError("cuda_ipc needs the KV cache on a CUDA device")
    cu.init()
    allocations: dict[int, int] = {}
    handles: list[bytes] = []
    segments = []
    for seg, view in zip(layout.segments, layout.views, strict=True):
        ptr = view.data_ptr()
        base, _ = cu.allocation_range(ptr)
        if base not in allocations:
            if not cu.memory_type_is_legacy(base):
                raise TransferError(
                    "the KV cache is not legacy-IPC capable (cumem allocator / sleep mode or "
                    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)"
                )
            allocations[base] = len(handles)
            handles.append(cu.ipc_handle(base))
        segments.append(CudaIpcSegment(allocations[base], ptr - base, seg.block_stride, seg.nbytes))
    if any(s.nbytes % 16 or s.offset % 16 or s.block_stride % 16 for s in segments):
        raise TransferError("KV pages are not 16-byte aligned")
    device = layout.device.index if layout.device.index is not None else torch.cuda.current_device()
    return CudaIpcDescriptor(cu.device_uuid(device), os.getpid(), handles, segments,
                             layout.num_blocks)


class PeerCopyPlan:
    """One load: the holder's segment table and the checked block ids (page ``p`` is block
    ``p % num_blocks`` of segment ``p // num_blocks``)."""

    def __init__(self, table: SegmentTable, blocks: np.ndarray, page_bytes: int) -> None:
        self.table = table
        self.blocks = blocks  # int32 [2, n_blocks]: source ids, destination ids
        self.page_bytes = page_bytes

    @property
    def num_pages(self) -> int:
        return self.table.num_segments * int(self.blocks.shape[1])

    def addresses(self) -> tuple[np.ndarray, np.ndarray]:
        """Source and destination address of every page, in kernel order (benchmarks)."""
        g, b = self.table.host, self.blocks.astype(np.int64)
        return ((g[:, 0:1] + b[0][None, :] * g[:, 1:2]).ravel(),
                (g[:, 2:3] + b[1][None, :] * g[:, 3:4]).ravel())


class CudaIpcImporter:
    def __init__(self, layout: KVPageLayout, **launch: int) -> None:
        """``launch``: the copy kernel's launch shape (see ``PageCopier``)."""
        self.layout = layout
        self._local_start = [v.data_ptr() for v in layout.views]
        self._local_stride = [s.block_stride for s in layout.segments]
        self._local_bytes = [s.nbytes for s in layout.segments]
        sizes = set(self._local_bytes)
        self._page_bytes = sizes.pop() if len(sizes) == 1 else 0  # 0: not supported
        self._mapped: dict[bytes, list] = {}  # handle -> [ptr, last_used, pid]
        # (holder's handles, segments) -> (their mapped bases, segment table); rebuilt when
        # a handle is mapped again at another address
        self._seg_tables: dict[tuple, tuple[list[int], SegmentTable]] = {}
        self._inflight: list[tuple[torch.cuda.Event, list[bytes], Any]] = []
        self._next_sweep = 0.0
        self._copier = PageCopier(layout.device, **launch)
        # Mappings of a dead exporter keep its whole KV cache allocated: an idle engine (no
        # steps, so no sweep from poll) must still let go within seconds.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def _bases(self, desc: CudaIpcDescriptor) -> list[int]:
        now = time.monotonic()
        bases = []
        for handle in desc.handles:
            entry = self._mapped.get(handle)
            if entry is None:
                entry = self._mapped[handle] = [cu.open_ipc_handle(handle), now, desc.pid]
                self._start_sweeper()
            entry[1] = now
            bases.append(entry[0])
        return bases

    def _segment_table(self, desc: CudaIpcDescriptor) -> SegmentTable:
        if len(desc.segments) != len(self._local_bytes) or any(
            r.nbytes != n for r, n in zip(desc.segments, self._local_bytes, strict=True)
        ):
            raise TransferError("holder's KV segments differ from ours")
        bases = self._bases(desc)
        key = (tuple(desc.handles), tuple(desc.segments))
        cached = self._seg_tables.get(key)
        if cached is not None and cached[0] == bases:
            return cached[1]
        table = SegmentTable.build(
            [bases[s.allocation] + s.offset for s in desc.segments],
            [s.block_stride for s in desc.segments],
            self._local_start, self._local_stride, self.layout.device,
        )
        self._seg_tables[key] = (bases, table)
        return table

    def plan(self, desc: CudaIpcDescriptor, src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> PeerCopyPlan:
        if not self._page_bytes:
            raise TransferError("segments of different sizes are not supported")
        table = self._segment_table(desc)
        ids = PageCopier.block_ids(src_blocks, dst_blocks, desc.num_blocks, self.layout.num_blocks)
        return PeerCopyPlan(table, ids, self._page_bytes)

    def execute(self, plan: PeerCopyPlan, handles: list[bytes]) -> torch.cuda.Event:
        """Enqueue the copy on the current stream; the event completes with it."""
        event, keep = self._copier.copy(plan.table, plan.blocks, plan.page_bytes)
        # The segment table must outlive the copy; the mappings must too (see sweep).
        self._inflight.append((event, list(handles), keep))
        return event

    def launch_only(self, plan: PeerCopyPlan) -> None:
        """The kernel of a prepared plan, no event (benchmarks time it alone)."""
        self._copier.launch(plan.table, plan.blocks, plan.page_bytes)

    def execute_addresses(self, plan: PeerCopyPlan) -> torch.cuda.Event:
        """The same copy with every page address computed on the host (benchmark baseline)."""
        src, dst = plan.addresses()
        event, keep = self._copier.copy_addresses(src, dst, plan.page_bytes)
        self._inflight.append((event, [], keep))
        return event

    def load(self, desc: CudaIpcDescriptor, src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> torch.cuda.Event:
        with self._lock:
            return self.execute(self.plan(desc, src_blocks, dst_blocks), desc.handles)

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep_loop, daemon=True,
                                             name="kvmkt-ipc-sweep")
            self._sweeper.start()

    def _sweep_loop(self) -> None:
        torch.cuda.set_device(self.layout.device)  # the driver calls need our context
        while not self._stop.wait(1.0):
            try:
                self.sweep()
            except Exception as e:  # never let housekeeping take a worker down
                logger.debug("kvmkt: IPC sweep failed: %s", e)

    @property
    def mapped_handles(self) -> int:
        """Holders' KV cache allocations mapped now (a soak checks this stays flat)."""
        return len(self._mapped)

    def sweep(self) -> None:
        """Close mappings of dead or idle exporters that no copy in flight uses (checked at
        most once a second: from every step and from the sweeper thread)."""
        with self._lock:
            self._sweep_locked()

    def _sweep_locked(self) -> None:
        self._inflight = [x for x in self._inflight if not x[0].query()]
        now = time.monotonic()
        if now < self._next_sweep or not self._mapped:
            return
        self._next_sweep = now + 1.0
        busy = {h for _, hs, _ in self._inflight for h in hs}
        alive = {pid: process_alive(pid) for _, _, pid in self._mapped.values()}
        for handle, (ptr, last, pid) in list(self._mapped.items()):
            if handle in busy:
                continue
            if now - last > IDLE_CLOSE_S or not alive[pid]:
                with contextlib.suppress(TransferError):
                    cu.close_ipc_handle(ptr)
                del self._mapped[handle]
                for key in [k for k in self._seg_tables if handle in k[0]]:
                    del self._seg_tables[key]

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        torch.cuda.synchronize(self.layout.device)
        self._inflight.clear()
        for ptr, _, _ in self._mapped.values():
            with contextlib.suppress(TransferError):
                cu.close_ipc_handle(ptr)
        self._mapped.clear()
        self._seg_tables.clear()
