"""Worker side: register the KV cache, stage exports, run imports, report what happened.

Jobs arrive in ``start_load_kv`` (vLLM calls it in every step, also in steps without a
forward). Exports are staged there, before the step's forward could rewrite their blocks.
Imports run asynchronously (``loads.LoadRunner``); ``get_finished`` reports the requests
whose copies are over, and ``get_block_ids_with_load_errors`` (called right after it, in
the same step) the blocks of those that failed, which vLLM then recomputes.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
import torch

from kvmkt_connector.compat import KVLayoutSpec
from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.loads import LoadRunner
from kvmkt_connector.connector.metadata import (
    MarketplaceConnectorMetadata,
    MarketplaceHandshake,
    MarketplaceWorkerMetadata,
    SaveJob,
)
from kvmkt_connector.logs import get_logger, trace
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.registry.paths import holder_dir, holder_file
from kvmkt_connector.transport.descriptors import RankDescriptor, TransferError
from kvmkt_connector.transport.host_shm import (
    HostPageRegion,
    HostShmExporter,
    HostShmImporter,
    slots_for_budget,
)
from kvmkt_connector.transport.layout import KVPageLayout, UnsupportedKVLayout

logger = get_logger(__name__)
# In a step without a forward, wait up to this long for the copies it issued (a 30k-token
# import over NVLink takes ~10 ms): reported now, their requests run a step earlier.
_IDLE_WAIT_S = 0.02


def _tp_rank() -> int:
    from vllm.distributed.parallel_state import get_tp_group

    try:
        return get_tp_group().rank_in_group
    except AssertionError:  # no TP group (single process tests)
        return 0


class MarketplaceWorker:
    def __init__(
        self, vllm_config: Any, cfg: MarketplaceConfig, num_blocks: int, export: bool
    ) -> None:
        self._vllm_config = vllm_config
        self._cfg = cfg
        self._num_blocks = num_blocks
        self._export = export
        self._rank = _tp_rank()
        self._stats = MarketplaceStats()
        self._stats_go_out = True
        self._layout: KVPageLayout | None = None
        self._spec: KVLayoutSpec | None = None
        self._problem = ""
        self._transport = ""  # "cuda_ipc" | "host_shm" once registered
        self._export_desc: RankDescriptor | None = None
        self._region: HostPageRegion | None = None
        self._exporter: HostShmExporter | None = None
        self._importer: HostShmImporter | None = None
        self._ipc_importer = None  # CudaIpcImporter
        self._loads: LoadRunner | None = None
        self._load_errors: set[int] = set()
        self._finished: set[str] = set()
        self._idle_step = False
        self._done = MarketplaceWorkerMetadata()
        self._trace = os.environ.get("KVMKT_TRACE") == "1"

    # ------------------------------------------------------------ setup

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        try:
            self._register(kv_caches)
        except Exception as e:  # never take the engine down: just do not share
            self._problem = self._problem or f"{type(e).__name__}: {e}"
            logger.error("kvmkt: sharing disabled on this worker: %s", self._problem)
            self._transport = ""

    def _register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if any(not isinstance(t, torch.Tensor) for t in kv_caches.values()):
            raise UnsupportedKVLayout("a layer's KV cache is not one tensor (hybrid/Mamba model)")
        try:
            layout = KVPageLayout(kv_caches, self._num_blocks)
        except UnsupportedKVLayout as e:
            self._problem = str(e)
            logger.error("kvmkt: sharing disabled on this worker: %s", e)
            return
        self._layout = layout
        self._spec = KVLayoutSpec(
            attention_backend=self._backend_name(),
            kv_layout=self._cache_layout(),
            kv_dtype=str(layout.dtype).removeprefix("torch."),
            num_layers=layout.num_layers,
            page_bytes=layout.layer_page_bytes,
            segments_per_page=layout.segments_per_layer,
            kernel_blocks_per_block=layout.kernel_blocks_per_block,
        )
        if layout.device.type == "cuda" and self._cfg.transport in ("auto", "cuda_ipc"):
            try:
                self._setup_cuda_ipc(layout)
            except (TransferError, ImportError, RuntimeError) as e:
                if self._cfg.transport == "cuda_ipc":
                    self._problem = f"cuda_ipc transport unavailable: {e}"
                    logger.error("kvmkt: %s", self._problem)
                    return
                logger.warning("kvmkt: cuda_ipc unavailable (%s); using host shared memory", e)
        if not self._transport:
            if self._cfg.transport == "cuda_ipc":
                self._problem = "transport cuda_ipc needs the KV cache on a CUDA device"
                return
            self._setup_host_shm(layout)
        self._loads = LoadRunner(layout, self._rank, self._stats, self._ipc_importer,
                                 self._importer)
        logger.info(
            "kvmkt: worker %d shares %d layers x %d blocks (%d B/page, %s) over %s%s",
            self._rank, layout.num_layers, self._num_blocks, layout.layer_page_bytes,
            self._spec.attention_backend, self._transport,
            f", export slots: {self._region.descriptor.num_slots}" if self._region else "",
        )

    def _setup_cuda_ipc(self, layout: KVPageLayout) -> None:
        from kvmkt_connector.transport.cuda_ipc import CudaIpcImporter, describe_exports

        self._ipc_importer = CudaIpcImporter(layout)  # compiles the copy kernel
        if self._export:
            self._export_desc = describe_exports(layout)
        self._transport = "cuda_ipc"

    def _setup_host_shm(self, layout: KVPageLayout) -> None:
        self._importer = HostShmImporter(layout)
        self._transport = "host_shm"
        if self._export:
            self._open_export_region(layout)

    def _open_export_region(self, layout: KVPageLayout) -> None:
        folder = holder_dir()
        slots = slots_for_budget(self._cfg.host_region_bytes, layout.segment_bytes, folder,
                                 layout.num_blocks)
        if slots == 0:
            logger.warning("kvmkt: no room for an export region in %s: not exporting", folder)
            return
        engine = self._vllm_config.kv_transfer_config.engine_id
        path = holder_file(folder, os.getpid(), f"{engine[:16]}-r{self._rank}")
        self._region = HostPageRegion.create(path, slots, layout.segment_bytes)
        self._exporter = HostShmExporter(layout, self._region)
        self._export_desc = self._region.descriptor

    def _backend_name(self) -> str:
        try:
            from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends

            return ",".join(b.get_name() for b in get_current_attn_backends(self._vllm_config))
        except Exception:  # best effort: the page geometry is compared too
            return "unknown"

    @staticmethod
    def _cache_layout() -> str:
        try:
            from vllm.v1.attention.backends.utils import get_kv_cache_layout

            return str(get_kv_cache_layout())
        except Exception:
            return "unknown"

    def handshake(self) -> MarketplaceHandshake:
        descriptor = None
        if self._export_desc is not None:
            descriptor = msgspec.msgpack.encode(self._export_desc)
        return MarketplaceHandshake(
            tp_rank=self._rank,
            layout=self._spec if not self._problem else None,
            descriptor=descriptor,
            export_slots=0 if self._region is None else self._region.descriptor.num_slots,
            transport=self._transport,
            problem=self._problem,
        )

    # ------------------------------------------------------------ per step

    def run_jobs(self, meta: MarketplaceConnectorMetadata) -> None:
        if self._trace:
            trace(logger, "-", f"worker-start loads={len(meta.loads)} idle={meta.idle_step}")
        self._idle_step = meta.idle_step and bool(meta.loads)
        self._stats_go_out = meta.outputs
        if meta.ack:  # this step's output then carries worker metadata, so vLLM hands it on
            self._done.acked_step = meta.step
        if meta.want_layout:  # startup: the scheduler learns our layout from this step's output
            self._done.handshakes[self._rank] = self.handshake()
        for save in meta.saves:
            self._save(save)
        for job in meta.loads:  # issued after the saves: they may read blocks a load writes
            if self._loads is None:
                self._done.loads_failed[job.job_id] = 1
                self._load_errors.update(job.dst)
                self._finished.add(job.request_id)
            else:
                self._loads.submit(job)

    def _save(self, job: SaveJob) -> None:
        ok = False
        if self._exporter is not None:
            try:
                self._exporter.save(job.src, job.dst, job.keys)
                ok = True
            except Exception as e:  # never let an export break serving
                logger.warning("kvmkt: export of %d blocks failed: %s", len(job.src), e)
        target = self._done.saves_done if ok else self._done.saves_failed
        target[job.job_id] = 1

    def get_finished(self) -> set[str] | None:
        """Requests whose loads are over on this worker (their failures go out with
        ``take_load_errors``, which vLLM calls next, in the same step)."""
        if self._loads is not None:
            res = self._loads.poll(wait_s=_IDLE_WAIT_S if self._idle_step else 0.0)
            self._idle_step = False
            self._finished |= res.finished_requests
            self._load_errors |= res.failed_blocks
            for job_id in res.done_jobs:
                self._done.loads_done[job_id] = 1
            for job_id in res.failed_jobs:
                self._done.loads_failed[job_id] = 1
        finished, self._finished = self._finished, set()
        if self._trace:
            trace(logger, "-", f"worker-finished reported={len(finished)}")
        return finished or None

    def last_wait_ns(self) -> int:
        """How long the last ``get_finished`` waited for copies."""
        return self._loads.last_wait_ns if self._loads is not None else 0

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_worker_meta(self) -> MarketplaceWorkerMetadata | None:
        done, self._done = self._done, MarketplaceWorkerMetadata()
        return done if done else None

    def take_stats(self) -> MarketplaceStats | None:
        """Stats go out only with a step that outputs for some request (offline LLM drops
        the others'; see the scheduler's ``_output_steps``); until then they accumulate."""
        if not self._stats_go_out:
            return None
        mapped = self.mapped_regions()
        if mapped or "mapped_regions" in self._stats.data["g"]:
            self._stats.gauge("mapped_regions", mapped)
        return self._stats.take()

    def mapped_regions(self) -> int:
        """Neighbours' regions this worker maps now (they must go with their holders)."""
        n = self._importer.mapped_regions if self._importer is not None else 0
        return n + (self._ipc_importer.mapped_handles if self._ipc_importer is not None else 0)

    def shutdown(self) -> None:
        if self._loads is not None:
            self._loads.close()
        if self._ipc_importer is not None:
            self._ipc_importer.close()
        if self._importer is not None:
            self._importer.close()
        if self._region is not None:
            self._region.close()
            self._region = None
