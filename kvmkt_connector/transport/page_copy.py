"""One kernel launch copies every page of a load: native/page_copy.cu's ``kvmkt_copy_blocks``.

A ``SegmentTable`` says where block 0 of each KV segment lives on both sides and the
stride between blocks; it is built once per peer (a holder's mapped KV cache, or a
host-memory region mapped into the device's address space) and kept on the GPU. A copy then
ships only the two block-id lists (8 bytes per block), inside the launch's own parameter
(up to 3,968 blocks per launch, a 16k-token import needs 1,024): no page-locked staging, no
separate host-to-device copy, nothing to keep alive once the launch call returns. The
kernel computes the address of each page. Used by ``cuda_ipc`` (peer GPU memory) and by
``host_shm`` on GPUs (page-locked host memory read or written directly by the kernel, at
PCIe speed, without a gather on the CPU).
"""

from __future__ import annotations

import contextlib
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


_PARAM_HEADER = 3  # int64 words before the ids: segment table, page bytes, two counts


def inline_capacity(cuda_version: int) -> int:
    """Blocks per launch: kernel parameters may hold 32,764 bytes from CUDA 12.1 on (driver
    and compiler both: pass the lower of their versions), 4,096 before (the kernel's struct
    is 24 bytes plus 8 per block)."""
    limit = 32764 if cuda_version >= 12010 else 4096
    return min(3968, limit // 8 - _PARAM_HEADER)


class LaunchParameter:
    """The bytes of native/page_copy.cu's ``InlineBlocks`` for one launch of up to
    ``capacity`` blocks: two int64, two uint32, then ``capacity`` source ids and
    ``capacity`` destination ids, int32 (the .cu asserts the size; tests/unit check the
    field offsets against NVRTC's PTX)."""

    def __init__(self, capacity: int, segments: int, page_bytes: int, table_ptr: int) -> None:
        self.capacity = capacity
        self.array = np.empty(_PARAM_HEADER + capacity, dtype=np.int64)
        self.array[0], self.array[1] = table_ptr, page_bytes
        self._words = self.array.view(np.int32)
        self._words[5] = segments

    def fill(self, src: np.ndarray, dst: np.ndarray) -> int:
        """Put ``len(src)`` <= capacity blocks in; returns how many."""
        k, first = len(src), 2 * _PARAM_HEADER
        if k > self.capacity or len(dst) != k:
            raise TransferError("launch parameter: wrong number of block ids")
        self._words[4] = k
        self._words[first : first + k] = src
        self._words[first + self.capacity : first + self.capacity + k] = dst
        return k


class PageCopier:
    def __init__(self, device: torch.device, unroll: int = 4, threads: int = 512,
                 blocks_per_sm: int = 8, streaming: bool = False,
                 inline_blocks: int | None = None) -> None:
        """``unroll``, ``threads``, ``blocks_per_sm``, ``streaming`` (evict-first loads and
        stores): the kernel's shape (see ``benchmarks/transport_bench.py --sweep``).
        ``inline_blocks``: blocks per launch, at most what driver and NVRTC allow (tests lower it
        to exercise loads of several launches)."""
        self.device = device
        major, minor = torch.cuda.get_device_capability(device)
        arch = f"sm_{major}{minor}"
        cap = inline_capacity(min(cu.driver_version(), cu.nvrtc_version()))
        self.inline_blocks = cap if inline_blocks is None else max(1, min(inline_blocks, cap))
        defines = (f"UNROLL={unroll}", f"MAX_THREADS={threads}", f"STREAMING={int(streaming)}",
                   f"INLINE_BLOCKS={self.inline_blocks}")
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
            if ids.max() >= 1 << 31:  # the kernel's ids are int32: never wrap one
                raise TransferError("block id beyond 32 bits")
        return ids.astype(np.int32)

    def copy(self, table: SegmentTable, ids: np.ndarray, page_bytes: int) -> tuple[torch.cuda.Event, Any]:
        """Enqueue on the current stream; returns its event and what must live until then."""
        self.launch(table, ids, page_bytes)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event, table

    def launch(self, table: SegmentTable, ids: np.ndarray, page_bytes: int) -> None:
        """The kernel alone, on the current stream: ``ids`` int32 [2, n] from ``block_ids``."""
        if page_bytes % 16:
            raise TransferError("pages must be a multiple of 16 bytes")
        n_blocks, chunk = int(ids.shape[1]), self.inline_blocks
        if not n_blocks or not table.num_segments:
            return
        current = torch.cuda.current_stream(self.device)
        param = LaunchParameter(chunk, table.num_segments, page_bytes, table.on_device.data_ptr())
        for start in range(0, n_blocks, chunk):
            k = param.fill(ids[0, start : start + chunk], ids[1, start : start + chunk])
            try:  # the driver copies the parameter during the call: the next chunk may overwrite it
                cu.launch_with_parameter(self._blocks_kernel,
                                         max(1, min(k * table.num_segments, self._max_grid)),
                                         self._threads, current.cuda_stream, param.array)
            except Exception:
                if start:  # this load's earlier launches are queued: the caller reports the
                    # load failed and vLLM may reuse its blocks, so they must have ended
                    with contextlib.suppress(Exception):
                        current.synchronize()
                raise

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
