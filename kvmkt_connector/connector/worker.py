"""Worker side: register the KV cache, stage exports, copy imports, report what happened.

All copies run in ``start_load_kv``, before the forward that reads the imported blocks
(vLLM calls it in every step, also in steps without a forward). A job whose copy fails is
reported through ``get_block_ids_with_load_errors`` and vLLM recomputes those blocks.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec
import torch

from kvmkt_connector.compat import KVLayoutSpec
from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.metadata import (
    LoadJob,
    MarketplaceConnectorMetadata,
    MarketplaceHandshake,
    MarketplaceWorkerMetadata,
    SaveJob,
    descriptor_digest,
)
from kvmkt_connector.logs import get_logger
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.transport.descriptors import (
    CudaIpcDescriptor,
    HolderDescriptor,
    HostShmDescriptor,
    RankDescriptor,
    TransferError,
)
from kvmkt_connector.transport.host_shm import (
    HostPageRegion,
    HostShmExporter,
    HostShmImporter,
    slots_for_budget,
)
from kvmkt_connector.transport.layout import KVPageLayout, UnsupportedKVLayout

logger = get_logger(__name__)


def _tp_rank() -> int:
    from vllm.distributed.parallel_state import get_tp_group

    try:
        return get_tp_group().rank_in_group
    except AssertionError:  # no TP group (single process tests)
        return 0


def _region_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"


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
        self._layout: KVPageLayout | None = None
        self._spec: KVLayoutSpec | None = None
        self._problem = ""
        self._transport = ""  # "cuda_ipc" | "host_shm" once registered
        self._export_desc: RankDescriptor | None = None
        self._region: HostPageRegion | None = None
        self._exporter: HostShmExporter | None = None
        self._importer: HostShmImporter | None = None
        self._ipc_importer = None  # CudaIpcImporter
        self._gpu_loads: list[tuple[int, Any, float]] = []  # (job id, event, start time)
        self._load_errors: set[int] = set()
        self._done = MarketplaceWorkerMetadata()

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
        folder = _region_dir()
        slots = slots_for_budget(self._cfg.host_region_bytes, layout.segment_bytes, folder)
        if slots == 0:
            logger.warning("kvmkt: no room for an export region in %s: not exporting", folder)
            return
        engine = self._vllm_config.kv_transfer_config.engine_id
        path = os.path.join(folder, f"kvmkt-{os.getuid()}-{engine[:16]}-{os.getpid()}-r{self._rank}")
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
        for descriptor in meta.probes:
            self._probe(descriptor)
        for job in meta.saves:
            self._save(job)
        for job in meta.loads:
            self._load(job)

    def _probe(self, descriptor: bytes) -> None:
        digest = descriptor_digest(descriptor)
        try:
            rank_desc = HolderDescriptor.decode(descriptor).ranks[self._rank]
            if isinstance(rank_desc, CudaIpcDescriptor) and self._ipc_importer is not None:
                self._ipc_importer.probe(rank_desc)
            elif isinstance(rank_desc, HostShmDescriptor) and self._importer is not None:
                self._importer.probe(rank_desc)
            else:
                raise TransferError(f"holder offers {type(rank_desc).__name__}, we use {self._transport}")
        except Exception as e:
            logger.warning("kvmkt: cannot read a holder's pages from this worker (%s): "
                           "not importing from it", e)
            self._done.probes_failed[digest] = 1
            return
        self._done.probes_ok[digest] = 1

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

    def _load(self, job: LoadJob) -> None:
        if job.fault == "lease_lost" or not self._transport or self._layout is None:
            self._done.loads_done[job.job_id] = 1
            self._fail(job, "lease lost" if job.fault == "lease_lost" else "no transport")
            return
        t0 = time.perf_counter()
        event = None
        try:
            rank_desc = HolderDescriptor.decode(job.descriptor).ranks[self._rank]
            src, keys = job.src, job.keys
            if job.fault == "first_page":  # the prototype's bug: every page from block 0
                src, keys = [src[0]] * len(src), [keys[0]] * len(keys)
            if isinstance(rank_desc, CudaIpcDescriptor) and self._ipc_importer is not None:
                event = self._ipc_importer.load(rank_desc, src, job.dst)
            elif isinstance(rank_desc, HostShmDescriptor) and self._importer is not None:
                self._importer.load(rank_desc, src, keys, job.dst)
            else:
                raise TransferError(f"holder offers {type(rank_desc).__name__}, we use {self._transport}")
        except Exception as e:  # any failure: these blocks are recomputed, serving goes on
            self._done.loads_done[job.job_id] = 1
            self._fail(job, f"{type(e).__name__}: {e}")
            return
        if job.fault == "zero":
            idx = torch.tensor(job.dst, dtype=torch.int64, device=self._layout.device)
            for view in self._layout.views:
                view.index_fill_(0, idx, 0)
        self._stats.count("imported_bytes", len(job.dst) * self._layout.block_bytes)
        if event is None:  # host copies are done when load() returns
            self._done.loads_done[job.job_id] = 1
            self._stats.observe("import_seconds", time.perf_counter() - t0)
        else:  # done when the GPU says so: only then may the holder reuse the pages
            self._gpu_loads.append((job.job_id, event, t0))

    def _fail(self, job: LoadJob, why: str) -> None:
        logger.warning(
            "kvmkt: import of %d blocks from holder %d failed (%s); they will be recomputed",
            len(job.dst), job.holder_id, why,
        )
        self._load_errors.update(job.dst)

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def _poll_gpu_loads(self) -> None:
        still = []
        for job_id, event, t0 in self._gpu_loads:
            if event.query():
                self._done.loads_done[job_id] = 1
                self._stats.observe("import_seconds", time.perf_counter() - t0)
            else:
                still.append((job_id, event, t0))
        self._gpu_loads = still
        if self._ipc_importer is not None:
            self._ipc_importer.sweep()

    def take_worker_meta(self) -> MarketplaceWorkerMetadata | None:
        self._poll_gpu_loads()
        done, self._done = self._done, MarketplaceWorkerMetadata()
        if (done.loads_done or done.saves_done or done.saves_failed or done.probes_ok
                or done.probes_failed):
            return done
        return None

    def take_stats(self) -> MarketplaceStats | None:
        return self._stats.take()

    def shutdown(self) -> None:
        if self._ipc_importer is not None:
            self._ipc_importer.close()
        if self._importer is not None:
            self._importer.close()
        if self._region is not None:
            self._region.close()
            self._region = None
