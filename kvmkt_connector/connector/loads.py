"""Worker side, importing: run load jobs asynchronously and say when each one is over.

A job arrives in ``start_load_kv`` and is issued at once, so it overlaps the forward passes
of other requests: ``cuda_ipc`` pages are copied by one kernel on a side CUDA stream,
``host_shm`` slots by a worker thread. The destination blocks belong to a request vLLM
keeps parked until we report it, so nothing else reads or writes them meanwhile; the side
stream first waits for the work already queued on the compute stream, which may still
write blocks vLLM freed and gave to this request.

A job is over when its copy is (``poll``, from ``get_finished``). Then its tags are checked
again (block generations for in-place pages, slot keys for staged ones) and, for in-place
pages, that the holder is still alive: a copy that might have read anything but the
published pages is reported failed, and vLLM recomputes those blocks. Every job is
reported exactly once, successful or failed: vLLM waits for that, also for aborted requests.
An issued copy always ends (a bounded memcpy or kernel), so no request waits forever; a test
stall (``stall_s``) is bounded by the request's own parameter. A job whose ``src`` is shorter
than its ``dst`` (its lease came back shorter than vLLM allocated for) copies that many
blocks and reports the rest as load errors, whatever the copy's outcome.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import torch

from kvmkt_connector.connector.metadata import LoadJob
from kvmkt_connector.logs import get_logger, trace
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.transport.descriptors import (
    CudaIpcDescriptor,
    HolderDescriptor,
    HostShmDescriptor,
    TransferError,
    process_alive,
)
from kvmkt_connector.transport.generations import MappedTables, decode_locations
from kvmkt_connector.transport.layout import KVPageLayout

logger = get_logger(__name__)
_MAX_TABLES = 16


@dataclass(eq=False)
class _Load:
    job: LoadJob
    t0: float
    holder: HolderDescriptor | None = None  # decoded once per job (see _holder)
    src: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # job.src
    issue_at: float = 0.0  # > 0: not issued yet (test stall)
    is_done: Callable[[], bool] = lambda: True
    check: Callable[[], None] = lambda: None  # raises TransferError if the copy is suspect
    keep: list[Any] = field(default_factory=list)  # objects the copy uses until it ends


@dataclass
class LoadResults:
    """What ``poll`` found over: request ids to report, failed destination blocks."""

    finished_requests: set[str] = field(default_factory=set)
    failed_blocks: set[int] = field(default_factory=set)
    done_jobs: list[int] = field(default_factory=list)
    failed_jobs: list[int] = field(default_factory=list)


class LoadRunner:
    def __init__(self, layout: KVPageLayout, rank: int, stats: MarketplaceStats,
                 ipc_importer: Any = None, shm_importer: Any = None) -> None:
        self._layout, self._rank, self._stats = layout, rank, stats
        self._ipc, self._shm = ipc_importer, shm_importer
        self._cuda = layout.device.type == "cuda"
        self._stream = torch.cuda.Stream(layout.device) if self._cuda else None
        self._thread = (cf.ThreadPoolExecutor(1, thread_name_prefix="kvmkt-load")
                        if shm_importer is not None else None)
        self._loads: list[_Load] = []
        self._failed_now: list[tuple[LoadJob, str]] = []
        self._nothing_to_copy: list[LoadJob] = []  # nothing leased: only errors to report
        self._tables = MappedTables(_MAX_TABLES)
        self._holders: dict[bytes, HolderDescriptor] = {}
        self.last_wait_ns = 0  # how long the last poll waited for copies (see HookTimes)

    # ------------------------------------------------------------ issue

    def submit(self, job: LoadJob) -> None:
        if job.fault is not None and job.fault_rank not in (-1, self._rank):
            job = msgspec.structs.replace(job, fault=None, stall_s=0.0)  # another rank's
        if not job.src:
            self._nothing_to_copy.append(job)
            return
        try:
            load = _Load(job, time.perf_counter(), src=np.asarray(job.src, dtype=np.int64))
            load.holder = self._holder(job.descriptor)
            self._precheck(load)
        except Exception as e:
            self._failed_now.append((job, f"{type(e).__name__}: {e}"))
            return
        if job.fault == "fail":
            self._failed_now.append((job, "injected failure"))
        elif job.stall_s > 0:
            load.issue_at = time.monotonic() + job.stall_s
            self._loads.append(load)
        else:
            self._issue(load)

    def _holder(self, blob: bytes) -> HolderDescriptor:
        """Decoded descriptors, by blob: every load from a holder carries the same one."""
        holder = self._holders.get(blob)
        if holder is None:
            holder = HolderDescriptor.decode(blob)
            while len(self._holders) >= _MAX_TABLES:
                self._holders.pop(next(iter(self._holders)))
            self._holders[blob] = holder
        return holder

    def _precheck(self, load: _Load) -> None:
        """In-place pages rewritten since the lease: do not even copy (the check after the
        copy is the one that matters; a test stall sits between the two)."""
        job, holder = load.job, load.holder
        assert holder is not None
        if holder.generations is not None and job.fault != "stall_unchecked":
            table = self._tables.get(holder.generations.path, holder.generations.num_blocks)
            if table.unchanged_prefix(load.src) < load.src.size:
                raise TransferError("the holder rewrote pages before the copy")

    def _issue(self, load: _Load) -> None:
        job = load.job
        load.issue_at = 0.0
        trace(logger, job.request_id, "issue")
        try:
            holder = load.holder
            assert holder is not None
            desc = holder.ranks[self._rank]
            src = load.src
            if job.fault == "first_page":  # the prototype's bug: every page from block 0
                src = np.full_like(src, src[0])
            if isinstance(desc, CudaIpcDescriptor) and self._ipc is not None:
                self._issue_ipc(load, holder, desc, src)
            elif isinstance(desc, HostShmDescriptor) and self._shm is not None:
                self._issue_shm(load, desc, src)
            else:
                raise TransferError(f"holder offers {type(desc).__name__}, we do not")
        except Exception as e:  # any failure: these blocks are recomputed, serving goes on
            self._failed_now.append((job, f"{type(e).__name__}: {e}"))
            return
        self._loads.append(load)

    def _issue_ipc(self, load: _Load, holder: HolderDescriptor, desc: CudaIpcDescriptor,
                   src: np.ndarray) -> None:
        job = load.job
        if holder.generations is None:
            raise TransferError("in-place holder without a generation table")
        table = self._tables.get(holder.generations.path, holder.generations.num_blocks)
        blocks, _ = decode_locations(src)
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self._layout.device))
        with torch.cuda.stream(self._stream):
            event = self._ipc.load(desc, blocks, job.dst[: len(blocks)])
            trace(logger, job.request_id, "launched")
            if job.fault == "zero":
                self._zero(job.dst[: len(blocks)])
                event.record(self._stream)
        load.is_done = event.query

        def check() -> None:
            if job.fault != "stall_unchecked" and table.unchanged_prefix(load.src) < load.src.size:
                raise TransferError("the holder rewrote pages during the copy")
            if not process_alive(desc.pid):
                raise TransferError("the holder died during the copy")
        load.check = check

    def _issue_shm(self, load: _Load, desc: HostShmDescriptor, src: np.ndarray) -> None:
        job = load.job
        slots, _ = decode_locations(src)
        keys = job.keys if job.fault != "first_page" else [job.keys[0]] * len(job.keys)
        dst = job.dst[: len(slots)]
        ready = None
        if self._cuda:  # the blocks may still be written by work queued before this step
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self._layout.device))

        def copy() -> None:
            if self._stream is None:
                self._shm.load(desc, slots.tolist(), keys, dst)
            else:
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(ready)
                    self._shm.load(desc, slots.tolist(), keys, dst)
                    if job.fault == "zero":
                        self._zero(dst)
                    self._stream.synchronize()
                return
            if job.fault == "zero":
                self._zero(dst)

        assert self._thread is not None
        future = self._thread.submit(copy)
        load.is_done = future.done
        load.check = lambda: future.result()  # re-raises the copy's (or key check's) error

    def _zero(self, dst: list[int]) -> None:
        idx = torch.tensor(dst, dtype=torch.int64, device=self._layout.device)
        for view in self._layout.views:
            view.index_fill_(0, idx, 0)

    # ------------------------------------------------------------ completion

    def poll(self, wait_s: float = 0.0) -> LoadResults:
        """Jobs that are over; with ``wait_s``, first wait that long at most for the copies
        in flight (used in steps that run no forward: nothing else would wait)."""
        start = time.monotonic()
        deadline = start + wait_s
        while any(not x.issue_at and not x.is_done() for x in self._loads):
            now = time.monotonic()
            if now >= deadline:
                break
            # Only yield the GIL for the first 5 ms: a 16k-token copy is over in ~1.5 ms,
            # and even a 0.1 ms sleep costs a 16k import ~0.1 ms of its TTFT.
            time.sleep(0 if now - start < 0.005 else 0.0001)
        now = time.monotonic()
        self.last_wait_ns = int((now - start) * 1e9) if wait_s else 0
        due = [x for x in self._loads if x.issue_at and now >= x.issue_at]
        if due:
            self._loads = [x for x in self._loads if x not in due]
            for load in due:
                self._issue(load)  # back in self._loads, or failed now
        out = LoadResults()
        for job, why in self._failed_now:
            self._report(out, job, why)
        for job in self._nothing_to_copy:
            self._report(out, job, None)
        self._failed_now, self._nothing_to_copy = [], []
        still = []
        for load in self._loads:
            if load.issue_at or not load.is_done():
                still.append(load)
                continue
            try:
                load.check()
            except Exception as e:
                self._report(out, load.job, f"{type(e).__name__}: {e}")
                continue
            self._report(out, load.job, None)
            self._stats.observe("import_seconds", time.perf_counter() - load.t0)
        self._loads = still
        if self._ipc is not None:
            self._ipc.sweep()
        self._tables.sweep()  # tables of holders that went
        return out

    def _report(self, out: LoadResults, job: LoadJob, failure: str | None) -> None:
        trace(logger, job.request_id, "copied" if failure is None else "copy failed")
        out.finished_requests.add(job.request_id)
        if failure is None:
            out.done_jobs.append(job.job_id)
            out.failed_blocks.update(job.dst[len(job.src) :])  # not leased: vLLM prefills them
            return
        logger.warning(
            "kvmkt: import of %d blocks from holder %d failed (%s); they will be recomputed",
            len(job.dst), job.holder_id, failure,
        )
        out.failed_jobs.append(job.job_id)
        out.failed_blocks.update(job.dst)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        if self._cuda:
            torch.cuda.synchronize(self._layout.device)
        self._tables.close()
