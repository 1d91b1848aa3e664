"""CUDA IPC transport: read a neighbour's KV cache pages in place, GPU to GPU.

Exporter: each KV cache allocation is exported once as a legacy CUDA IPC handle, and each
segment is described by (allocation, offset of block 0, block stride, bytes). Raw device
pointers mean nothing in another process; handles do.

Importer: opens each handle once (``CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS``: the mapping goes
over NVLink when the GPUs differ; the exporter's GPU need not be visible to this process)
and caches the mapping. A load is one ``PeerCopyPlan``: the source and destination address
of every (segment, block), built with numpy and executed by one kernel launch per page size
on the current stream (the importer's side stream; see connector/loads.py).
Mappings of exporters that died or stayed unused are closed once no copy uses them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time

import numpy as np
import torch

from kvmkt_connector.transport import cuda_driver as cu
from kvmkt_connector.transport.descriptors import (
    CudaIpcDescriptor,
    CudaIpcSegment,
    TransferError,
    process_alive,
)
from kvmkt_connector.transport.layout import KVPageLayout

IDLE_CLOSE_S = 60.0
_BLOCK_THREADS = 512


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
    """Source and destination address of every page one load copies."""

    def __init__(self, src: np.ndarray, dst: np.ndarray, page_bytes: int) -> None:
        self.src, self.dst, self.page_bytes = src, dst, page_bytes

    @property
    def num_pages(self) -> int:
        return int(self.src.size)


class CudaIpcImporter:
    def __init__(self, layout: KVPageLayout) -> None:
        self.layout = layout
        # Our own segments, with ``offset`` holding the absolute address of block 0.
        self._local = [CudaIpcSegment(0, v.data_ptr(), s.block_stride, s.nbytes)
                       for s, v in zip(layout.segments, layout.views, strict=True)]
        self._mapped: dict[bytes, list] = {}  # handle -> [ptr, last_used, pid]
        self._inflight: list[tuple[torch.cuda.Event, list[bytes], tuple]] = []
        self._next_sweep = 0.0
        device = layout.device
        major, minor = torch.cuda.get_device_capability(device)
        self._kernel = cu.compile_kernel("page_copy.cu", "kvmkt_copy_pages", f"sm_{major}{minor}")

    def _bases(self, desc: CudaIpcDescriptor) -> list[int]:
        now = time.monotonic()
        bases = []
        for handle in desc.handles:
            entry = self._mapped.get(handle)
            if entry is None:
                entry = self._mapped[handle] = [cu.open_ipc_handle(handle), now, desc.pid]
            entry[1] = now
            bases.append(entry[0])
        return bases

    def plan(self, desc: CudaIpcDescriptor, src_blocks: list[int], dst_blocks: list[int]) -> PeerCopyPlan:
        if len(desc.segments) != len(self._local) or any(
            r.nbytes != loc.nbytes for r, loc in zip(desc.segments, self._local, strict=True)
        ):
            raise TransferError("holder's KV segments differ from ours")
        bases = self._bases(desc)
        src_b = np.asarray(src_blocks, dtype=np.int64)
        dst_b = np.asarray(dst_blocks, dtype=np.int64)
        if dst_b.size and (dst_b.min() < 0 or dst_b.max() >= self.layout.num_blocks):
            raise TransferError("destination block out of range")
        if src_b.size and (src_b.min() < 0 or src_b.max() >= desc.num_blocks):
            raise TransferError("source block out of the holder's range")  # never read wild
        r_start = np.array([bases[s.allocation] + s.offset for s in desc.segments], dtype=np.int64)
        r_stride = np.array([s.block_stride for s in desc.segments], dtype=np.int64)
        l_start = np.array([s.offset for s in self._local], dtype=np.int64)
        l_stride = np.array([s.block_stride for s in self._local], dtype=np.int64)
        src = (r_start[:, None] + src_b[None, :] * r_stride[:, None]).ravel()
        dst = (l_start[:, None] + dst_b[None, :] * l_stride[:, None]).ravel()
        sizes = {s.nbytes for s in self._local}
        if len(sizes) != 1:
            raise TransferError("segments of different sizes are not supported")
        return PeerCopyPlan(src, dst, sizes.pop())

    def execute(self, plan: PeerCopyPlan, handles: list[bytes]) -> torch.cuda.Event:
        """Enqueue the copy on the current stream; the event completes with it."""
        stream = torch.cuda.current_stream(self.layout.device)
        addresses = torch.from_numpy(np.stack([plan.src, plan.dst])).pin_memory()
        on_device = addresses.to(self.layout.device, non_blocking=True)
        grid = max(1, min(plan.num_pages, 132 * 8))
        cu.launch(
            self._kernel, grid, _BLOCK_THREADS, stream.cuda_stream,
            [(on_device[0].data_ptr(), ctypes.c_void_p), (on_device[1].data_ptr(), ctypes.c_void_p),
             (plan.page_bytes, ctypes.c_uint64), (plan.num_pages, ctypes.c_uint32)],
        )
        event = torch.cuda.Event()
        event.record(stream)
        # The address buffers must outlive the copy; the mappings must too (see sweep).
        self._inflight.append((event, list(handles), (addresses, on_device)))
        return event

    def load(self, desc: CudaIpcDescriptor, src_blocks: list[int], dst_blocks: list[int]) -> torch.cuda.Event:
        return self.execute(self.plan(desc, src_blocks, dst_blocks), desc.handles)

    @property
    def mapped_handles(self) -> int:
        """Holders' KV cache allocations mapped now (a soak checks this stays flat)."""
        return len(self._mapped)

    def sweep(self) -> None:
        """Close mappings of dead or idle exporters that no copy in flight uses (checked at
        most once a second: it runs every step)."""
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

    def close(self) -> None:
        torch.cuda.synchronize(self.layout.device)
        self._inflight.clear()
        for ptr, _, _ in self._mapped.values():
            with contextlib.suppress(TransferError):
                cu.close_ipc_handle(ptr)
        self._mapped.clear()
