"""Checked calls into the CUDA driver and NVRTC through cuda-python (``cuda.bindings``).

Every call's return code is checked; a failure raises ``TransferError`` naming the call,
so the caller can turn it into load errors (vLLM recomputes the blocks).
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from typing import Any

from kvmkt_connector.transport.descriptors import TransferError

IPC_HANDLE_BYTES = 64
_NATIVE_DIRS = (
    os.path.join(os.path.dirname(__file__), "..", "..", "native"),  # source checkout
    os.path.join(os.path.dirname(__file__), "native"),  # installed copy, if packaged
)


def _driver():
    from cuda.bindings import driver

    return driver


def check(result: Any, what: str) -> Any:
    """Unpack a cuda.bindings result tuple, raising TransferError unless it succeeded."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise TransferError(f"{what} failed: {err!r}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def init() -> None:
    try:
        check(_driver().cuInit(0), "cuInit")
    except TransferError:
        raise
    except Exception as e:  # no driver library, no cuda-python
        raise TransferError(f"CUDA driver unavailable: {e}") from e


def _ptr(value: int) -> Any:
    return _driver().CUdeviceptr(int(value))


def allocation_range(ptr: int) -> tuple[int, int]:
    """(base, size) of the driver allocation that contains ``ptr``."""
    base, size = check(_driver().cuMemGetAddressRange(_ptr(ptr)), "cuMemGetAddressRange")
    return int(base), int(size)


def ipc_handle(base: int) -> bytes:
    """The IPC handle of the allocation starting at ``base`` (legacy cudaMalloc memory)."""
    handle = check(_driver().cuIpcGetMemHandle(_ptr(base)), "cuIpcGetMemHandle")
    return ctypes.string_at(handle.getPtr(), IPC_HANDLE_BYTES)


def open_ipc_handle(blob: bytes) -> int:
    """Map another process's allocation into ours; peer access is enabled as needed."""
    driver = _driver()
    handle = driver.CUipcMemHandle()
    ctypes.memmove(handle.getPtr(), blob, IPC_HANDLE_BYTES)
    flags = driver.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
    return int(check(driver.cuIpcOpenMemHandle(handle, flags), "cuIpcOpenMemHandle"))


def close_ipc_handle(ptr: int) -> None:
    check(_driver().cuIpcCloseMemHandle(_ptr(ptr)), "cuIpcCloseMemHandle")


def host_register(ptr: int, size: int) -> int:
    """Page-lock host memory (e.g. a mapped /dev/shm file) and map it into the device's
    address space; returns the address kernels use for it."""
    driver = _driver()
    flags = driver.CU_MEMHOSTREGISTER_DEVICEMAP | driver.CU_MEMHOSTREGISTER_PORTABLE
    check(driver.cuMemHostRegister(ptr, size, flags), "cuMemHostRegister")
    try:
        return int(check(driver.cuMemHostGetDevicePointer(ptr, 0), "cuMemHostGetDevicePointer"))
    except TransferError:
        host_unregister(ptr)
        raise


def host_unregister(ptr: int) -> None:
    check(_driver().cuMemHostUnregister(ptr), "cuMemHostUnregister")


def device_uuid(ordinal: int) -> str:
    driver = _driver()
    dev = check(driver.cuDeviceGet(ordinal), "cuDeviceGet")
    uuid = check(driver.cuDeviceGetUuid(dev), "cuDeviceGetUuid")
    return ctypes.string_at(uuid.getPtr(), 16).hex()


def memory_type_is_legacy(ptr: int) -> bool:
    """False for VMM (cuMemCreate) memory, which legacy IPC handles cannot export."""
    driver = _driver()
    attr = driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE
    return bool(check(driver.cuPointerGetAttribute(attr, _ptr(ptr)), "cuPointerGetAttribute"))


def native_source(name: str) -> str:
    for folder in _NATIVE_DIRS:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                return f.read()
    raise TransferError(f"native source {name} not found in {_NATIVE_DIRS}")


def compile_cubin(source_name: str, arch: str, defines: tuple[str, ...] = ()) -> bytes:
    """Compile ``native/<source_name>`` with NVRTC for ``arch`` (e.g. "sm_90");
    ``defines`` are "NAME=VALUE" macros."""
    from cuda.bindings import nvrtc

    src = native_source(source_name).encode()
    prog = check(nvrtc.nvrtcCreateProgram(src, source_name.encode(), 0, [], []), "nvrtcCreateProgram")
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
    opts += [f"-D{d}".encode() for d in defines]
    err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
    if int(err) != 0:
        log_size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = b" " * log_size
        check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        raise TransferError(f"NVRTC could not compile {source_name}: {log.decode(errors='replace')}")
    size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
    cubin = b" " * size
    check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    check(nvrtc.nvrtcDestroyProgram(prog), "nvrtcDestroyProgram")
    return cubin


@cache
def compile_kernel(source_name: str, kernel: str, arch: str, defines: tuple[str, ...] = ()) -> Any:
    """Compile and load ``kernel`` of ``native/<source_name>`` into the current context."""
    cubin = compile_cubin(source_name, arch, defines)
    image = ctypes.c_char_p(cubin)  # keeps the bytes alive and gives their address
    address = ctypes.cast(image, ctypes.c_void_p).value
    module = check(_driver().cuModuleLoadData(address), "cuModuleLoadData")
    return check(_driver().cuModuleGetFunction(module, kernel.encode()), "cuModuleGetFunction")


def driver_version() -> int:
    """The driver's CUDA version, e.g. 12040 for 12.4."""
    return int(check(_driver().cuDriverGetVersion(), "cuDriverGetVersion"))


def nvrtc_version() -> int:
    """NVRTC's CUDA version in the driver's format (12040 for 12.4)."""
    from cuda.bindings import nvrtc

    major, minor = check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    return 1000 * int(major) + 10 * int(minor)


def launch_with_parameter(function: Any, grid: int, block: int, stream: int, param: Any) -> None:
    """Launch a kernel whose one parameter is the bytes of ``param`` (a contiguous numpy
    array laid out as the kernel's struct). The driver copies them during this call, so
    ``param`` may be reused or freed as soon as it returns."""
    import numpy as np

    pointers = np.array([param.ctypes.data], dtype=np.uintp)  # the void** kernelParams
    driver = _driver()
    check(
        driver.cuLaunchKernel(function, grid, 1, 1, block, 1, 1, 0, driver.CUstream(stream),
                              pointers, 0),
        "cuLaunchKernel",
    )


def launch(function: Any, grid: int, block: int, stream: int, args: list[tuple[int, Any]]) -> None:
    """Launch ``function`` on ``stream`` with (value, ctypes type) arguments."""
    values = tuple(v for v, _ in args)
    types = tuple(t for _, t in args)
    driver = _driver()
    check(
        driver.cuLaunchKernel(
            function, grid, 1, 1, block, 1, 1, 0, driver.CUstream(stream), (values, types), 0
        ),
        "cuLaunchKernel",
    )
