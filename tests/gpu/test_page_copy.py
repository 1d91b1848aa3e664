"""The page-copy kernel moves exactly the pages it is given, whether a load fits one launch
or needs several (block ids travel inside the launch's parameter, ``inline_blocks`` per
launch). Needs a CUDA GPU (no vLLM): skips cleanly without one."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from kvmkt_connector.transport.descriptors import TransferError  # noqa: E402
from kvmkt_connector.transport.page_copy import PageCopier, SegmentTable  # noqa: E402

pytestmark = pytest.mark.gpu
LAYERS, SRC_BLOCKS, DST_BLOCKS, PAGE_ELEMS = 4, 300, 400, 2048  # bf16: 4 KiB pages


def _caches(num_blocks: int, seed: int | None) -> list[torch.Tensor]:
    out = []
    for i in range(LAYERS):
        t = torch.zeros(num_blocks, PAGE_ELEMS, dtype=torch.bfloat16, device="cuda")
        if seed is not None:
            g = torch.Generator(device="cuda").manual_seed(seed + i)
            t.copy_(torch.randn(num_blocks, PAGE_ELEMS, generator=g, device="cuda"))
        out.append(t)
    return out


def _table(src: list[torch.Tensor], dst: list[torch.Tensor]) -> SegmentTable:
    stride = PAGE_ELEMS * 2
    return SegmentTable.build([t.data_ptr() for t in src], [stride] * LAYERS,
                              [t.data_ptr() for t in dst], [stride] * LAYERS, src[0].device)


@pytest.mark.parametrize("inline_blocks", [None, 7, 64])
def test_pages_land_where_the_ids_say(inline_blocks) -> None:
    src, dst = _caches(SRC_BLOCKS, seed=11), _caches(DST_BLOCKS, seed=None)
    copier = PageCopier(src[0].device, inline_blocks=inline_blocks)
    rng = np.random.default_rng(5)
    n = 250  # 36 launches at 7 per launch, 4 at 64, one at the default
    s = rng.choice(SRC_BLOCKS, size=n, replace=False)
    d = rng.choice(DST_BLOCKS, size=n, replace=False)
    ids = PageCopier.block_ids(s.tolist(), d.tolist(), SRC_BLOCKS, DST_BLOCKS)
    event, _keep = copier.copy(_table(src, dst), ids, PAGE_ELEMS * 2)
    event.synchronize()
    untouched = sorted(set(range(DST_BLOCKS)) - set(d.tolist()))
    for a, b in zip(src, dst, strict=True):
        assert torch.equal(b[torch.as_tensor(d, device="cuda")], a[torch.as_tensor(s, device="cuda")])
        assert not b[torch.as_tensor(untouched, device="cuda")].any()


def test_a_copy_that_moved_nothing_is_detected() -> None:
    """Negative control for the check above: a plan whose ids are shifted by one block
    copies the wrong pages, and the same comparison sees it."""
    src, dst = _caches(SRC_BLOCKS, seed=11), _caches(DST_BLOCKS, seed=None)
    copier = PageCopier(src[0].device, inline_blocks=7)
    s, d = list(range(10, 40)), list(range(100, 130))
    ids = PageCopier.block_ids([x + 1 for x in s], d, SRC_BLOCKS, DST_BLOCKS)
    copier.copy(_table(src, dst), ids, PAGE_ELEMS * 2)[0].synchronize()
    assert not torch.equal(dst[0][100:130], src[0][10:40])


def test_bad_ids_and_pages_are_refused_before_any_launch() -> None:
    src, dst = _caches(8, seed=1), _caches(8, seed=None)
    copier = PageCopier(src[0].device)
    with pytest.raises(TransferError, match="source block out of range"):
        PageCopier.block_ids([8], [0], 8, 8)
    with pytest.raises(TransferError, match="destination block out of range"):
        PageCopier.block_ids([0], [-1], 8, 8)
    with pytest.raises(TransferError, match="differ in length"):
        PageCopier.block_ids([0, 1], [0], 8, 8)
    with pytest.raises(TransferError, match="multiple of 16"):
        copier.copy(_table(src, dst), PageCopier.block_ids([0], [0], 8, 8), 8)
    torch.cuda.synchronize()
    assert not dst[0].any()
