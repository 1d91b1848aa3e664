"""Where the bytes of one KV block live, read off the tensors vLLM registers.

Both transports move whole pages: for scheduler block ``b`` and each *segment* of a layer,
the bytes ``[base + b * block_stride, + segment_bytes)``. A page copy is layout-agnostic as
long as both sides have the same layout, which the compatibility fingerprint guarantees.

vLLM 0.26's FLASH_ATTN, FLASHINFER, TRITON_ATTN and CPU_ATTN caches are blocks-first with
K|V packed in the last dim: one segment per layer. A ``(2, num_blocks, ...)`` cache (K and V
apart) gives two segments per layer. Anything else is refused with the shape in the error.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import torch


class UnsupportedKVLayout(ValueError):
    """The KV cache tensors do not have a layout we can copy page by page."""


class SegmentGeometry(msgspec.Struct, frozen=True):
    """One contiguous piece of every block of one layer."""

    layer: str  # first layer name backed by this memory
    offset: int  # bytes from the tensor's storage start to block 0 of this segment
    block_stride: int  # bytes between scheduler blocks b and b+1
    nbytes: int  # bytes of this segment in one block
    kernel_blocks: int  # attention-kernel blocks per scheduler block (their order matters)


def _dense_inner_bytes(shape: list[int], strides: list[int], elt: int) -> int | None:
    """Bytes of the dims ``shape`` if they form one dense chunk, else None."""
    dims = sorted((s, n) for s, n in zip(strides, shape, strict=True) if n > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return None
        expected *= size
    return expected * elt


def describe_kv_tensor(name: str, t: torch.Tensor, num_blocks: int) -> list[SegmentGeometry]:
    """The segments of one layer's KV cache tensor holding ``num_blocks`` scheduler blocks."""
    shape, strides, elt = list(t.shape), list(t.stride()), t.element_size()

    def fail(why: str) -> UnsupportedKVLayout:
        return UnsupportedKVLayout(
            f"KV cache of layer {name!r} has shape {tuple(shape)} and strides "
            f"{tuple(strides)} ({t.dtype}); {why}. kvmkt-connector supports blocks-first "
            "caches (FLASH_ATTN, FLASHINFER, TRITON_ATTN, CPU_ATTN) and (2, num_blocks, ...) "
            "K/V-split caches."
        )

    order = sorted(range(t.dim()), key=lambda d: strides[d], reverse=True)
    outer_dims: list[int] = []
    block_dim = order[0]
    if shape[block_dim] == 2 and t.dim() > 1 and shape[order[1]] % num_blocks == 0:
        outer_dims, block_dim = [order[0]], order[1]  # K and V stored apart
    if shape[block_dim] % num_blocks != 0:
        raise fail(f"no dimension with a multiple of num_blocks={num_blocks} outermost")
    kernel_per_block = shape[block_dim] // num_blocks
    inner = [d for d in range(t.dim()) if d != block_dim and d not in outer_dims]
    inner_bytes = _dense_inner_bytes([shape[d] for d in inner], [strides[d] for d in inner], elt)
    if inner_bytes is None:
        raise fail("a block's data is not one dense chunk")
    kernel_stride = strides[block_dim] * elt
    if kernel_per_block > 1 and inner_bytes != kernel_stride:
        raise fail("kernel blocks of one scheduler block are not adjacent")
    base = t.storage_offset() * elt
    outer = [(0, 1)] if not outer_dims else [(strides[outer_dims[0]] * elt, shape[outer_dims[0]])]
    seg_bytes = inner_bytes * kernel_per_block
    block_stride = kernel_stride * kernel_per_block
    segments = []
    for outer_stride, count in outer:
        for k in range(count):
            segments.append(
                SegmentGeometry(name, base + k * outer_stride, block_stride, seg_bytes, kernel_per_block)
            )
    # The last byte of the last block must lie inside the storage.
    end = max(s.offset + (num_blocks - 1) * s.block_stride + s.nbytes for s in segments)
    if end > t.untyped_storage().nbytes():
        raise fail("blocks would extend past the tensor's storage")
    return segments


class KVPageLayout:
    """All segments of one worker's KV cache, with byte views the transports copy through."""

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int) -> None:
        if not kv_caches:
            raise UnsupportedKVLayout("no KV cache tensors were registered")
        self.num_blocks = num_blocks
        self.segments: list[SegmentGeometry] = []
        self.views: list[torch.Tensor] = []  # per segment: uint8 (num_blocks, nbytes)
        self.layer_names: list[str] = []
        seen: dict[tuple[int, int], str] = {}
        dtypes = set()
        for name, t in kv_caches.items():
            # KV-sharing layers alias one tensor: copy its pages once.
            alias_key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if alias_key in seen:
                continue
            seen[alias_key] = name
            self.layer_names.append(name)
            dtypes.add(t.dtype)
            storage = torch.empty(0, dtype=torch.uint8, device=t.device)
            storage.set_(t.untyped_storage())
            for seg in describe_kv_tensor(name, t, num_blocks):
                self.segments.append(seg)
                view = storage.as_strided((num_blocks, seg.nbytes), (seg.block_stride, 1), seg.offset)
                self.views.append(view)
        if len(dtypes) != 1:
            raise UnsupportedKVLayout(f"KV caches mix dtypes {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        self.device = next(iter(kv_caches.values())).device
        self.segments_per_layer = len(self.segments) // len(self.layer_names)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def block_bytes(self) -> int:
        """Bytes of one scheduler block across all layers and segments."""
        return sum(s.nbytes for s in self.segments)

    @property
    def layer_page_bytes(self) -> int:
        """Bytes of one scheduler block of the first layer (all its segments)."""
        return sum(s.nbytes for s in self.segments[: self.segments_per_layer])

    @property
    def kernel_blocks_per_block(self) -> int:
        return self.segments[0].kernel_blocks

    @property
    def segment_bytes(self) -> list[int]:
        return [s.nbytes for s in self.segments]
