"""The CUDA sources in native/ compile with NVRTC (no GPU needed), so a typo never reaches
the GPU host. Skips where NVRTC is not installed."""

import pytest

from kvmkt_connector.transport.descriptors import TransferError


def test_page_copy_kernel_compiles_for_hopper():
    pytest.importorskip("cuda.bindings.nvrtc")
    from kvmkt_connector.transport.cuda_driver import compile_cubin

    try:
        cubin = compile_cubin("page_copy.cu", "sm_90")
    except TransferError as e:
        if "NVRTC could not compile" in str(e):
            raise
        pytest.skip(f"NVRTC unavailable: {e}")
    except Exception as e:  # library not found
        pytest.skip(f"NVRTC unavailable: {e}")
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000


def _ptx_param_bytes(inline_blocks: int) -> int:
    """The byte size of kvmkt_copy_blocks's one parameter, as NVRTC lays it out."""
    import re

    from cuda.bindings import nvrtc

    from kvmkt_connector.transport.cuda_driver import native_source

    prog = nvrtc.nvrtcCreateProgram(native_source("page_copy.cu").encode(), b"page_copy.cu",
                                    0, [], [])[1]
    opts = [b"--gpu-architecture=compute_90", b"--std=c++17", f"-DINLINE_BLOCKS={inline_blocks}".encode()]
    if int(nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]) != 0:
        pytest.fail("page_copy.cu does not compile")
    ptx = b" " * nvrtc.nvrtcGetPTXSize(prog)[1]
    nvrtc.nvrtcGetPTX(prog, ptx)
    m = re.search(rb"kvmkt_copy_blocks_param_0\[(\d+)\]", ptx)
    assert m, "kvmkt_copy_blocks has no by-value struct parameter"
    return int(m.group(1))


@pytest.mark.parametrize("capacity", [7, 509, 3968])
def test_launch_parameter_matches_the_kernel_struct(capacity):
    """The host packs exactly as many bytes as the kernel's parameter has, each field where
    the struct puts it (a drift would make the kernel read wrong block ids)."""
    pytest.importorskip("cuda.bindings.nvrtc")
    import struct

    import numpy as np

    from kvmkt_connector.transport.page_copy import LaunchParameter

    try:
        size = _ptx_param_bytes(capacity)
    except Exception as e:  # library not found
        pytest.skip(f"NVRTC unavailable: {e}")
    param = LaunchParameter(capacity, segments=64, page_bytes=65536, table_ptr=0x7F00_0000_1000)
    assert param.array.nbytes == size
    src, dst = np.arange(5, dtype=np.int32) + 100, np.arange(5, dtype=np.int32) + 900
    assert param.fill(src[: min(5, capacity)], dst[: min(5, capacity)]) == min(5, capacity)
    raw = param.array.tobytes()
    k = min(5, capacity)
    assert struct.unpack_from("<QQII", raw, 0) == (0x7F00_0000_1000, 65536, k, 64)
    assert struct.unpack_from(f"<{k}i", raw, 24) == tuple(range(100, 100 + k))
    assert struct.unpack_from(f"<{k}i", raw, 24 + 4 * capacity) == tuple(range(900, 900 + k))


def test_launch_parameter_refuses_more_ids_than_it_holds():
    import numpy as np

    from kvmkt_connector.transport.page_copy import LaunchParameter

    param = LaunchParameter(4, segments=2, page_bytes=16, table_ptr=0)
    with pytest.raises(TransferError, match="wrong number"):
        param.fill(np.zeros(5, np.int32), np.zeros(5, np.int32))
    with pytest.raises(TransferError, match="wrong number"):
        param.fill(np.zeros(3, np.int32), np.zeros(2, np.int32))


def test_inline_capacity_fits_the_drivers_parameter_limit():
    from kvmkt_connector.transport.page_copy import inline_capacity

    assert inline_capacity(12040) == 3968 and 24 + 8 * 3968 <= 32764
    assert inline_capacity(12000) == 509 and 24 + 8 * 509 <= 4096
