"""One kernel launch copies every page of a load: native/page_copy.cu's ``kvmkt_copy_blocks``.

A ``SegmentTable`` says where block 0 of each KV segment lives on both sides and the
stride between blocks; it is built once per peer (a holder's mapped KV cache, or a
host-memory region mapped into the device's address space) and kept on the GPU. A copy then
ships only the two block-id lists (8 bytes per block), and the kernel computes the address
of each page. Used by ``cuda_ipc`` (peer GPU memory) and by ``host_shm`` on GPUs (page-locked
host memory read or written directly by the kernel, at PCIe speed, without a gather on the
CPU).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvmkt_connector.transport import cuda_driver as cu
from kvmkt_connector.transport.descriptors import TransferError


class SegmentTable:
    """int64 [n_segments, 4]: source block 0, source stride, destination block 0,
    destination stride (bytes). ``host`` stays readable for benchmarks."""

    def __init__(self, host: np.ndarray, device: torch.device) -> None:
        self.host = np.ascontiguousarray(host, dtype=np.int64)
        self._pinned = torch.from_numpy(self.host).pin_memory()  # source of the async H2D
        self.on_device = self._pinned.to(device, non_blocking=True)  # on the current stream

    @classmethod
    def build(cls, src_start: Sequence[int], src_stride: Sequence[int],
              dst_start: Sequence[int], dst_stride: Sequence[int], device: torch.device) -> SegmentTable:
        return cls(np.stack([np.asarray(v, dtype=np.int64)
                             for v in (src_start, src_stride, dst_start, dst_stride)], axis=1), device)

    @property
    def num_segments(self) -> int:
        return int(self.host.shape[0])


class PageCopier:
    def __init__(self, device: torch.device, unroll: int = 4, threads: int = 512,
                 blocks_per_sm: int = 8, streaming: bool = False) -> None:
        """``unroll``, ``threads``, ``blocks_per_sm``, ``streaming`` (evict-first loads and
        stores): the kernel's shape (see ``benchmarks/transport_bench.py --sweep``)."""
        self.device = device
        major, minor = torch.cuda.get_device_capability(device)
        arch = f"sm_{major}{minor}"
        defines = (f"UNROLL={unroll}", f"MAX_THREADS={threads}", f"STREAMING={int(streaming)}")
        self._blocks_kernel = cu.compile_kernel("page_copy.cu", "kvmkt_copy_blocks", arch, defines)
        self._pages_kernel = cu.compile_kernel("page_copy.cu", "kvmkt_copy_pages", arch, defines)
        self._threads = threads
        self._max_grid = torch.cuda.get_device_properties(device).multi_processor_count * blocks_per_sm

    @staticmethod
    def block_ids(src: Sequence[int], dst: Sequence[int], src_limit: int, dst_limit: int) -> np.ndarray:
        """int32 [2, n] of checked ids: a bad id never becomes a wild read or write."""
        if len(src) != len(dst):
            raise TransferError("source and destination block lists differ in length")
        ids = np.empty((2, len(src)), dtype=np.int64)
        ids[0], ids[1] = src, dst
        if ids.size:
            if ids[1].min() < 0 or ids[1].max() >= dst_limit:
                raise TransferError("destination block out of range")
            if ids[0].min() < 0 or ids[0].max() >= src_limit:
                raise TransferError("source block out of range")
        return ids.astype(np.int32)

    def copy(self, table: SegmentTable, ids: np.ndarray, page_bytes: int) -> tuple[torch.cuda.Event, Any]:
        """Enqueue on the current stream; returns its event and what must live until then."""
        if page_bytes % 16:
            raise TransferError("pages must be a multiple of 16 bytes")
        pinned = torch.from_numpy(ids).pin_memory()
        on_device = pinned.to(self.device, non_blocking=True)
        self.launch(table, on_device, page_bytes)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event, (pinned, on_device, table)

    def launch(self, table: SegmentTable, ids_on_device: torch.Tensor, page_bytes: int) -> None:
        """The kernel alone, on the current stream, with the block ids already on the GPU."""
        n_blocks = int(ids_on_device.shape[1])
        n_pages = n_blocks * table.num_segments
        if n_pages:
            cu.launch(
                self._blocks_kernel, max(1, min(n_pages, self._max_grid)), self._threads,
                torch.cuda.current_stream(self.device).cuda_stream,
                [(table.on_device.data_ptr(), ctypes.c_void_p),
                 (ids_on_device.data_ptr(), ctypes.c_void_p),
                 (n_blocks, ctypes.c_uint32), (table.num_segments, ctypes.c_uint32),
                 (page_bytes, ctypes.c_uint64)],
            )

    def copy_addresses(self, src: np.ndarray, dst: np.ndarray, page_bytes: int) -> tuple[torch.cuda.Event, Any]:
        """The same with every page address given (the benchmark's baseline)."""
        stream = torch.cuda.current_stream(self.device)
        addresses = torch.from_numpy(np.stack([src, dst]).astype(np.int64)).pin_memory()
        on_device = addresses.to(self.device, non_blocking=True)
        n_pages = int(src.size)
        if n_pages:
            cu.launch(
                self._pages_kernel, max(1, min(n_pages, self._max_grid)), self._threads,
                stream.cuda_stream,
                [(on_device[0].data_ptr(), ctypes.c_void_p), (on_device[1].data_ptr(), ctypes.c_void_p),
                 (page_bytes, ctypes.c_uint64), (n_pages, ctypes.c_uint32)],
            )
        event = torch.cuda.Event()
        event.record(stream)
        return event, (addresses, on_device)
