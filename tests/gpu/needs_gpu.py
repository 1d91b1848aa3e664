"""What every GPU test module needs, checked at its import: skip cleanly without it."""

from __future__ import annotations

import pytest


def cuda_gpu_count() -> int:
    """Skip the calling module unless a CUDA GPU and the CUDA build of vLLM are here;
    return how many GPUs there are."""
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 1:
        pytest.skip("needs a CUDA GPU", allow_module_level=True)
    try:
        import vllm.platforms
    except ImportError:
        pytest.skip("needs vLLM", allow_module_level=True)
    if not vllm.platforms.current_platform.is_cuda():
        pytest.skip("needs the CUDA build of vLLM", allow_module_level=True)
    return torch.cuda.device_count()
