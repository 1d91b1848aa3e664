"""Page geometry read off KV cache tensors shaped the way vLLM 0.26 backends shape them."""

import pytest
import torch

from kvmkt_connector.transport.layout import KVPageLayout, UnsupportedKVLayout, describe_kv_tensor

NB, H, BS, D = 10, 2, 16, 8


def _fa_nhd():
    # FLASH_ATTN: logical (nb, H, bs, 2D), physical (nb, bs, H, 2D)
    return torch.randn(NB, BS, H, 2 * D).permute(0, 2, 1, 3)


def _page_bytes(t_block: torch.Tensor) -> bytes:
    return t_block.contiguous().numpy().tobytes()


@pytest.mark.parametrize("make", [
    _fa_nhd,
    lambda: torch.randn(NB, H, BS, 2 * D),  # CPU_ATTN / HND
])
def test_blocks_first_is_one_segment_per_layer(make):
    t = make()
    (seg,) = describe_kv_tensor("l0", t, NB)
    assert seg.nbytes == seg.block_stride == H * BS * 2 * D * 4
    layout = KVPageLayout({"l0": t, "l1": make()}, NB)
    assert layout.num_layers == 2 and layout.block_bytes == 2 * seg.nbytes
    # The view's row b is exactly block b's bytes in physical order.
    storage = t.untyped_storage()
    raw = bytes(storage)[seg.block_stride * 3: seg.block_stride * 4]
    assert layout.views[0][3].numpy().tobytes() == raw


def test_kv_split_layout_gives_two_segments():
    t = torch.randn(2, NB, BS, H, D)  # (2, num_blocks, ...): K and V apart
    segs = describe_kv_tensor("l0", t, NB)
    assert len(segs) == 2
    assert segs[1].offset - segs[0].offset == NB * BS * H * D * 4
    layout = KVPageLayout({"l0": t}, NB)
    assert layout.views[1][4].numpy().tobytes() == _page_bytes(t[1, 4])


def test_kernel_blocks_are_merged_into_scheduler_blocks():
    t = torch.randn(NB * 2, H, BS // 2, 2 * D)  # kernel block = half a scheduler block
    (seg,) = describe_kv_tensor("l0", t, NB)
    assert seg.kernel_blocks == 2 and seg.nbytes == H * BS * 2 * D * 4
    layout = KVPageLayout({"l0": t}, NB)
    assert layout.views[0][2].numpy().tobytes() == _page_bytes(t[4:6])


def test_aliased_layers_are_copied_once():
    t = torch.randn(NB, H, BS, 2 * D)
    layout = KVPageLayout({"a": t, "b": t, "c": torch.randn(NB, H, BS, 2 * D)}, NB)
    assert layout.layer_names == ["a", "c"]


@pytest.mark.parametrize("t", [
    torch.randn(4, NB, BS, 2 * D),  # blocks not outermost, not a K/V split
    torch.randn(NB + 1, H, BS, 2 * D),  # not a multiple of num_blocks
    torch.randn(NB, H, BS, 4 * D)[..., ::2],  # a block is not dense
])
def test_unsupported_layouts_are_refused_with_the_shape(t):
    with pytest.raises(UnsupportedKVLayout, match="shape"):
        describe_kv_tensor("layer.7", t, NB)


def test_mixed_dtypes_are_refused():
    with pytest.raises(UnsupportedKVLayout, match="dtypes"):
        KVPageLayout({"a": torch.randn(NB, H, BS, 2 * D),
                      "b": torch.randn(NB, H, BS, 2 * D).half()}, NB)
