"""CPU simulation of PageCopier.launch -> cuLaunchKernel -> native/page_copy.cu's
``kvmkt_copy_blocks`` (no GPU, no driver).

A fake ``cuda.bindings.driver`` receives the real ``launch_with_parameter``'s kernelParams
(a buffer of one void*), copies the struct's bytes at the call (as the driver does), and
queues the launch; the queue then "runs" in stream order after ``launch`` returned: each
launch's bytes are decoded exactly as the kernel reads them (segs at +0, page_bytes at +8,
n_blocks at +16, n_segs at +20, source ids at +24, destination ids at +24 + 4 *
INLINE_BLOCKS, INLINE_BLOCKS being the -D the copier compiled with), the grid-stride loop
enumerates the pages, and each page is copied inside a flat byte array standing for device
memory. Fuzzed against a reference copy: every requested page lands exactly once, nothing
else is written, no address leaves its region.
"""

from __future__ import annotations

import ctypes
import re
import struct
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvmkt_connector.transport import cuda_driver as cu  # noqa: E402
from kvmkt_connector.transport.descriptors import TransferError  # noqa: E402
from kvmkt_connector.transport.page_copy import LaunchParameter, PageCopier  # noqa: E402

BASE = 0x7F00_0000_0000  # simulated device addresses start here (never 0)
MAX_GRID = 4 * 8  # 4 SMs x blocks_per_sm=8


class FakeKernel:
    def __init__(self, name: str, defines: tuple[str, ...]) -> None:
        d = dict(x.split("=", 1) for x in defines)
        self.name, self.inline = name, int(d["INLINE_BLOCKS"])
        self.param_bytes = 24 + 8 * self.inline  # the struct's size (static_assert in the .cu)


class FakeDriver:
    """Stands in for cuda.bindings.driver: cuLaunchKernel copies the one parameter's bytes
    through the void* that kernelParams' buffer holds, as the real driver does."""

    def __init__(self, lazy: bool = False) -> None:
        self.queue: list[tuple[FakeKernel, int, int, int, bytes]] = []
        self.lazy = lazy

    @staticmethod
    def CUstream(s):  # noqa: N802
        return s

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shm, stream, kernel_params, extra):  # noqa: N802
        assert (gy, gz, by, bz, shm, extra) == (1, 1, 1, 1, 0, 0)
        view = memoryview(kernel_params).cast("B")  # cuda-python: PyBUF_SIMPLE -> void**
        assert view.nbytes == ctypes.sizeof(ctypes.c_void_p), "kernelParams must hold 1 pointer"
        (ptr,) = struct.unpack("P", view.tobytes())
        raw = ctypes.string_at(ptr, f.param_bytes)  # the driver's copy, during the call
        self.queue.append((f, gx, bx, stream, raw))
        return (0,)


class FakeTable:
    def __init__(self, host: np.ndarray, address: int) -> None:
        self.host = host
        self.on_device = SimpleNamespace(data_ptr=lambda: address)

    @property
    def num_segments(self) -> int:
        return int(self.host.shape[0])


class FakeEvent:
    def record(self, stream) -> None:
        self.recorded = stream


@pytest.fixture
def fake_cuda(monkeypatch):
    driver = FakeDriver()
    monkeypatch.setattr(cu, "_driver", lambda: driver)
    monkeypatch.setattr(cu, "driver_version", lambda: 12080)
    monkeypatch.setattr(cu, "nvrtc_version", lambda: 13000)
    monkeypatch.setattr(cu, "compile_kernel", lambda src, name, arch, defines=(): FakeKernel(name, defines))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(multi_processor_count=4))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0xABC))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    return driver


class Device:
    """Flat simulated device memory: the segment table, then per segment a source and a
    destination region (strides larger than a page, different on the two sides)."""

    def __init__(self, rng, n_segs, src_blocks, dst_blocks, page_bytes) -> None:
        self.page_bytes = page_bytes
        self.src_stride = [page_bytes * int(rng.integers(1, 4)) for _ in range(n_segs)]
        self.dst_stride = [page_bytes * int(rng.integers(1, 4)) for _ in range(n_segs)]
        size = 32 * max(n_segs, 1) + 64
        self.src_start, self.dst_start, self.regions = [], [], []
        for s in range(n_segs):
            self.src_start.append(BASE + size)
            self.regions.append((BASE + size, BASE + size + src_blocks * self.src_stride[s]))
            size += src_blocks * self.src_stride[s] + 16 * int(rng.integers(1, 4))
            self.dst_start.append(BASE + size)
            self.regions.append((BASE + size, BASE + size + dst_blocks * self.dst_stride[s]))
            size += dst_blocks * self.dst_stride[s] + 16 * int(rng.integers(1, 4))
        self.mem = rng.integers(0, 256, size, dtype=np.uint8)
        host = np.stack([np.asarray(v, dtype=np.int64) for v in
                         (self.src_start, self.src_stride, self.dst_start, self.dst_stride)], axis=1)
        host = host.reshape(n_segs, 4)
        self.table_addr = BASE
        self.mem[: host.nbytes] = np.frombuffer(host.tobytes(), dtype=np.uint8)
        self.table = FakeTable(host, self.table_addr)
        self.writes: dict[int, int] = {}

    def read_i64(self, addr: int, n: int) -> np.ndarray:
        off = addr - BASE
        assert off >= 0 and off + 8 * n <= self.mem.size, "segment table read out of bounds"
        return np.frombuffer(self.mem[off : off + 8 * n].tobytes(), dtype="<i8")

    def check_page(self, addr: int, write: bool) -> None:
        assert addr % 16 == 0, f"unaligned page address {addr:#x}"
        ok = any(lo <= addr and addr + self.page_bytes <= hi for lo, hi in self.regions)
        assert ok, f"{'write' if write else 'read'} outside every region at {addr:#x}"

    def run(self, kernel: FakeKernel, grid: int, raw: bytes) -> None:
        """kvmkt_copy_blocks, read as the .cu reads its __grid_constant__ InlineBlocks."""
        assert len(raw) == 24 + 8 * kernel.inline
        segs, page_bytes = struct.unpack_from("<qQ", raw, 0)
        n_blocks, n_segs = struct.unpack_from("<II", raw, 16)
        ids = np.frombuffer(raw, dtype="<i4", offset=24, count=2 * kernel.inline)
        assert grid >= 1
        n_pages = n_blocks * n_segs
        pages = [p for b in range(grid) for p in range(b, n_pages, grid)]  # grid-stride loop
        assert sorted(pages) == list(range(n_pages))
        src_addr, dst_addr = [], []
        for p in pages:
            seg = p // n_blocks
            i = p - seg * n_blocks
            g = self.read_i64(segs + 32 * seg, 4)
            s = int(g[0]) + int(ids[i]) * int(g[1])
            d = int(g[2]) + int(ids[kernel.inline + i]) * int(g[3])
            self.check_page(s, write=False)
            self.check_page(d, write=True)
            src_addr.append(s - BASE)
            dst_addr.append(d - BASE)
            self.writes[d] = self.writes.get(d, 0) + 1
        n_bytes = (page_bytes // 16) * 16
        if pages:  # one launch's pages run concurrently: every read before any write
            cols = np.arange(n_bytes)
            data = self.mem[np.asarray(src_addr)[:, None] + cols]
            self.mem[np.asarray(dst_addr)[:, None] + cols] = data


def _expected(dev: Device, src_ids, dst_ids) -> np.ndarray:
    out = dev.mem.copy()
    pb = dev.page_bytes
    for seg in range(len(dev.src_start)):
        for s, d in zip(src_ids, dst_ids, strict=True):
            so = dev.src_start[seg] + int(s) * dev.src_stride[seg] - BASE
            do = dev.dst_start[seg] + int(d) * dev.dst_stride[seg] - BASE
            out[do : do + pb] = dev.mem[so : so + pb]
    return out


def _sizes(cap: int, rng) -> list[int]:
    return sorted({0, 1, max(cap - 1, 1), cap, cap + 1, 2 * cap, 2 * cap + 1,
                   int(rng.integers(1, 3 * cap + 2))})


def _one_load(driver: FakeDriver, copier: PageCopier, rng, n: int, n_segs: int, page_bytes: int) -> None:
    src_blocks, dst_blocks = max(n // 2, 1) + int(rng.integers(0, 5)), n + int(rng.integers(0, 5))
    dev = Device(rng, n_segs, src_blocks, max(dst_blocks, 1), page_bytes)
    src_ids = rng.integers(0, src_blocks, n)  # sources may repeat
    dst_ids = rng.choice(max(dst_blocks, 1), size=n, replace=False)  # destinations may not
    ids = PageCopier.block_ids(src_ids.tolist(), dst_ids.tolist(), src_blocks, max(dst_blocks, 1))
    want = _expected(dev, src_ids, dst_ids)
    driver.queue.clear()
    event, keep = copier.copy(dev.table, ids, page_bytes)
    assert keep is dev.table and isinstance(event, FakeEvent)
    cap = copier.inline_blocks
    launches = list(driver.queue)
    assert len(launches) == (-(-n // cap) if n and n_segs else 0)
    for j, (kernel, grid, block, stream, raw) in enumerate(launches):
        k = min(cap, n - j * cap)
        assert kernel.name == "kvmkt_copy_blocks" and kernel.inline == cap
        assert (block, stream) == (copier._threads, 0xABC)
        assert grid == max(1, min(k * n_segs, MAX_GRID))
        assert struct.unpack_from("<II", raw, 16) == (k, n_segs)
        dev.run(kernel, grid, raw)  # stream order, after launch() returned
    assert np.array_equal(dev.mem, want), "pages differ from the reference copy"
    expected_writes = {dev.dst_start[s] + int(d) * dev.dst_stride[s]
                       for s in range(n_segs) for d in dst_ids}
    assert set(dev.writes) == expected_writes and all(v == 1 for v in dev.writes.values())


@pytest.mark.parametrize("inline_blocks", [1, 2, 3, 7, 64, 509, None])
def test_fuzzed_loads_match_a_reference_copy(fake_cuda, inline_blocks) -> None:
    copier = PageCopier(torch.device("cuda", 0), inline_blocks=inline_blocks)
    assert copier.inline_blocks == (3968 if inline_blocks is None else inline_blocks)
    rng = np.random.default_rng(1000 + (inline_blocks or 0))
    for n in _sizes(copier.inline_blocks, rng):
        for n_segs in (1, 2, 3):
            page_bytes = int(rng.choice([16, 48, 64]))
            _one_load(fake_cuda, copier, rng, n, n_segs, page_bytes)


def test_no_segments_no_blocks_no_launch(fake_cuda) -> None:
    copier = PageCopier(torch.device("cuda", 0), inline_blocks=4)
    rng = np.random.default_rng(3)
    _one_load(fake_cuda, copier, rng, 10, 0, 32)
    _one_load(fake_cuda, copier, rng, 0, 2, 32)
    with pytest.raises(TransferError, match="multiple of 16"):
        copier.launch(FakeTable(np.zeros((1, 4), np.int64), BASE), np.zeros((2, 3), np.int32), 24)
    assert fake_cuda.queue == []


def test_inline_blocks_are_clamped_to_what_the_driver_allows(fake_cuda, monkeypatch) -> None:
    assert PageCopier(torch.device("cuda", 0), inline_blocks=0).inline_blocks == 1
    assert PageCopier(torch.device("cuda", 0), inline_blocks=10**6).inline_blocks == 3968
    monkeypatch.setattr(cu, "driver_version", lambda: 12000)
    copier = PageCopier(torch.device("cuda", 0))
    assert copier.inline_blocks == 509 and copier._blocks_kernel.param_bytes <= 4096
    monkeypatch.setattr(cu, "driver_version", lambda: 13000)
    monkeypatch.setattr(cu, "nvrtc_version", lambda: 12000)  # an older compiler limits it too
    assert PageCopier(torch.device("cuda", 0)).inline_blocks == 509
    _one_load(fake_cuda, copier, np.random.default_rng(4), 1200, 2, 16)


def test_the_simulation_sees_a_parameter_read_after_the_launch_call(fake_cuda, monkeypatch) -> None:
    """Negative control: were the parameter read when the kernel runs rather than during
    cuLaunchKernel, every launch of a multi-launch load would see the last chunk's ids and
    the reference comparison fails (reusing LaunchParameter relies on the driver's copy)."""
    seen = []
    monkeypatch.setattr(cu, "launch_with_parameter",
                        lambda f, grid, block, stream, param: seen.append((f, grid, param)))
    copier = PageCopier(torch.device("cuda", 0), inline_blocks=5)
    rng = np.random.default_rng(9)
    dev = Device(rng, 2, 40, 40, 32)
    s, d = rng.integers(0, 40, 23), rng.choice(40, 23, replace=False)
    want = _expected(dev, s, d)
    copier.launch(dev.table, PageCopier.block_ids(s.tolist(), d.tolist(), 40, 40), 32)
    assert len(seen) == 5 and all(p is seen[0][2] for _, _, p in seen)  # one buffer, reused
    for f, grid, param in seen:
        dev.run(f, grid, param.tobytes())  # bytes as they are *now*
    assert not np.array_equal(dev.mem, want)


def test_launch_with_parameter_hands_the_driver_one_pointer_to_the_bytes(fake_cuda) -> None:
    param = LaunchParameter(3, segments=2, page_bytes=64, table_ptr=BASE)
    param.fill(np.array([1, 2, 3], np.int32), np.array([7, 8, 9], np.int32))
    kernel = FakeKernel("kvmkt_copy_blocks", ("INLINE_BLOCKS=3",))
    cu.launch_with_parameter(kernel, 5, 128, 0xABC, param.array)
    (f, grid, block, stream, raw), = fake_cuda.queue
    assert (grid, block, stream) == (5, 128, 0xABC) and raw == param.array.tobytes()


def test_block_ids_at_or_above_2_31_are_refused_not_wrapped() -> None:
    """The kernel's ids are int32: an id that passes the range check against a limit of
    2^31 or more must not be cast silently (2^32 + 3 would become block 3)."""
    with pytest.raises(TransferError, match="beyond 32 bits"):
        PageCopier.block_ids([0], [2**32 + 3], 1, 2**33)
    with pytest.raises(TransferError, match="beyond 32 bits"):
        PageCopier.block_ids([2**31], [0], 2**33, 1)
    assert PageCopier.block_ids([2**31 - 1], [0], 2**31, 1).tolist() == [[2**31 - 1], [0]]


def test_a_launch_failing_mid_load_waits_for_the_launches_before_it(fake_cuda, monkeypatch) -> None:
    """If the second launch of a load fails, the first is already queued: the caller will
    report the load failed and vLLM may reuse the blocks, so launch() first waits for it."""
    synced = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(
        cuda_stream=0xABC, synchronize=lambda: synced.append(True)))
    real = fake_cuda.cuLaunchKernel
    calls = []

    def flaky(*a):
        calls.append(a)
        return real(*a) if len(calls) < 2 else (700,)  # 700: an illegal address

    monkeypatch.setattr(fake_cuda, "cuLaunchKernel", flaky)
    copier = PageCopier(torch.device("cuda", 0), inline_blocks=4)
    dev = Device(np.random.default_rng(2), 1, 20, 20, 32)
    ids = PageCopier.block_ids(list(range(10)), list(range(10)), 20, 20)
    with pytest.raises(TransferError, match="cuLaunchKernel"):
        copier.copy(dev.table, ids, 32)
    assert len(calls) == 2 and synced == [True]
    synced.clear()
    calls.clear()
    calls.append("first launch fails")  # a failure before anything was queued: no wait
    with pytest.raises(TransferError):
        copier.copy(dev.table, ids, 32)
    assert synced == []


def _ptx(source: str, inline_blocks: int) -> str:
    from cuda.bindings import nvrtc

    prog = nvrtc.nvrtcCreateProgram(source.encode(), b"page_copy.cu", 0, [], [])[1]
    opts = [b"--gpu-architecture=compute_90", b"--std=c++17", f"-DINLINE_BLOCKS={inline_blocks}".encode()]
    if int(nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]) != 0:
        pytest.fail("page_copy.cu does not compile")
    ptx = b" " * nvrtc.nvrtcGetPTXSize(prog)[1]
    nvrtc.nvrtcGetPTX(prog, ptx)
    text = ptx.decode()
    return text[text.index(".entry kvmkt_copy_blocks"):]


def _header_loads(body: str) -> dict[int, str]:
    """Byte offset -> PTX load type of each fixed-offset read of the struct."""
    base = re.search(r"mov\.b64\s+(%rd\d+), kvmkt_copy_blocks_param_0;", body).group(1)
    out = {}
    for m in re.finditer(r"ld\.param\.(\S+)\s+[^\[\n]*\[(?:kvmkt_copy_blocks_param_0|"
                         + re.escape(base) + r")(?:\+(\d+))?\];", body):
        out[int(m.group(2) or 0)] = m.group(1)
    return out


@pytest.mark.parametrize("inline_blocks", [7, 3968])
def test_field_offsets_in_the_ptx_are_where_launch_parameter_writes(inline_blocks) -> None:
    """Stronger than the size check in test_native: a reorder of the header fields keeps
    sizeof (and the static_assert) but moves page_bytes and the counts."""
    pytest.importorskip("cuda.bindings.nvrtc")
    try:
        body = _ptx(cu.native_source("page_copy.cu"), inline_blocks)
    except Exception as e:  # library not found
        pytest.skip(f"NVRTC unavailable: {e}")
    loads = _header_loads(body)
    assert loads.get(0) == "u64" and loads.get(8) == "u64", loads  # segs, page_bytes
    assert loads.get(16, "").endswith("u32"), loads  # n_blocks (, n_segs)
    assert re.search(r"add\.s64\s+%rd\d+, %rd\d+, 24;", body)  # source ids at +24
    assert re.search(rf"add\.s64\s+%rd\d+, %rd\d+, {4 * inline_blocks};", body)  # dst ids after them
    swapped = cu.native_source("page_copy.cu").replace(
        "    unsigned long long page_bytes;\n    unsigned int n_blocks;\n    unsigned int n_segs;\n",
        "    unsigned int n_blocks;\n    unsigned int n_segs;\n    unsigned long long page_bytes;\n")
    moved = _header_loads(_ptx(swapped, inline_blocks))
    assert moved.get(16) == "u64" and moved != loads  # the check above would see it


def test_cuda_python_reads_the_pointer_array_as_void_pp(monkeypatch) -> None:
    """The installed cuda-python's own kernelParams helper (buffer protocol -> void**),
    fed what launch_with_parameter builds: its void** is the array's data, whose one entry
    is the struct's address (no copy, so the array must live through the call: it does)."""
    driver = pytest.importorskip("cuda.bindings.driver")
    helper = getattr(driver, "_HelperKernelParams", None)
    if helper is None:
        pytest.skip("cuda-python without _HelperKernelParams")
    seen = []

    def launch(f, gx, gy, gz, bx, by, bz, shm, stream, kernel_params, extra):
        h = helper(kernel_params)
        seen.append(ctypes.string_at(ctypes.c_void_p.from_address(h.ckernelParams).value, f.param_bytes))
        return (0,)

    monkeypatch.setattr(cu, "_driver", lambda: SimpleNamespace(CUstream=lambda s: s, cuLaunchKernel=launch))
    param = LaunchParameter(5, segments=3, page_bytes=4096, table_ptr=BASE)
    param.fill(np.arange(4, dtype=np.int32), np.arange(4, dtype=np.int32) + 50)
    cu.launch_with_parameter(FakeKernel("kvmkt_copy_blocks", ("INLINE_BLOCKS=5",)), 1, 32, 0, param.array)
    assert seen == [param.array.tobytes()]
