"""How an importer reaches a holder's pages: one descriptor per TP rank of the holder.

The registry stores a holder's descriptor as opaque bytes and hands it out with every lease;
only the transports read it.
"""

from __future__ import annotations

import msgspec


class TransferError(RuntimeError):
    """A page copy did not happen or cannot be trusted; the pages must be recomputed."""


def process_alive(pid: int) -> bool:
    """Whether a holder process still runs (same PID namespace: one node, one registry)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class HostShmDescriptor(msgspec.Struct, frozen=True, tag="host_shm"):
    """Pages staged in a shared host-memory file (CPU engines, GPUs without peer access)."""

    path: str
    num_slots: int
    segment_bytes: list[int]


class CudaIpcSegment(msgspec.Struct, frozen=True, array_like=True):
    allocation: int  # index into CudaIpcDescriptor.handles
    offset: int  # bytes from the allocation's base to block 0 of this segment
    block_stride: int
    nbytes: int


class CudaIpcDescriptor(msgspec.Struct, frozen=True, tag="cuda_ipc"):
    """Pages read in place from the holder's KV cache allocations over CUDA IPC."""

    device_uuid: str
    pid: int
    handles: list[bytes]  # cudaIpcMemHandle_t of each KV cache allocation
    segments: list[CudaIpcSegment]
    num_blocks: int  # valid source block ids are below this


RankDescriptor = HostShmDescriptor | CudaIpcDescriptor


class GenerationsDescriptor(msgspec.Struct, frozen=True):
    """The holder's block generation table (in-place export; see ``generations``)."""

    path: str
    num_blocks: int


class HolderDescriptor(msgspec.Struct, frozen=True):
    ranks: list[RankDescriptor]  # index: TP rank
    generations: GenerationsDescriptor | None = None  # in-place export only

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @staticmethod
    def decode(blob: bytes) -> HolderDescriptor:
        return msgspec.msgpack.decode(blob, type=HolderDescriptor)
