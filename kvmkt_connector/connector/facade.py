"""MarketplaceConnector: the class vLLM instantiates; a thin facade over one half.

vLLM builds one SCHEDULER-role instance in EngineCore and one WORKER-role instance per
worker process. Each builds only its half (``MarketplaceScheduler`` or
``MarketplaceWorker``) and forwards the hooks of that role; the other role's hooks are
never called on it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.metadata import MarketplaceConnectorMetadata, MarketplaceHandshake
from kvmkt_connector.logs import HookTimes, get_logger
from kvmkt_connector.metrics import MarketplacePromMetrics, MarketplaceStats
from kvmkt_connector.plugin import register as register_connector_name

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = get_logger(__name__)


def _undo_deferred_block_free(scheduler: Any, connector: MarketplaceConnector) -> None:
    """vLLM 0.26 defers returning a finished or preempted request's blocks while a step that
    wrote them is in flight, whenever a consumer connector runs with async scheduling: a
    connector copying on its own stream or over the network could otherwise write a freed
    block before that step is done. Its side effect: ``reset_prefix_cache(
    reset_running_requests=True)`` fails whenever a step is in flight (the preempted
    requests' blocks are not back yet). We do not need the deferral: our copies run on a
    stream that first waits for everything the compute stream has queued (loads.py). So when
    we are the scheduler's only connector (called from its __init__), vLLM behaves as it
    does without a connector. Under MultiConnector the scheduler's connector is not us and
    the deferral stays, since a sibling may need it."""
    if getattr(scheduler, "connector", None) is connector and getattr(
        scheduler, "defer_block_free", False
    ):
        scheduler.defer_block_free = False
        logger.info("kvmkt: block frees are not deferred (our loads are stream-ordered)")


def _multi_connector_parent() -> Any:
    """The MultiConnector constructing us, if any (its __init__ is a few frames up; it
    keeps the top-level config, the one vLLM's scheduler reads). vLLM hands a child only
    a copy of the config with the child's own kv_transfer_config."""
    from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import MultiConnector

    frame = sys._getframe(1)
    for _ in range(4):
        frame = frame.f_back
        if frame is None:
            return None
        if isinstance(frame.f_locals.get("self"), MultiConnector):
            return frame.f_locals["self"]
    return None


def _ensure_recompute_policy(tc: Any, imports: bool) -> None:
    """Our imports are asynchronous and a failed one is reported as load errors: only
    kv_load_failure_policy "recompute" turns that into a normal prefill ("fail" fails the
    request). vLLM reads the policy of the top-level kv_transfer_config right after
    building the scheduler-side connector."""
    parent = _multi_connector_parent()
    if parent is None:  # we are the top level
        if tc.kv_load_failure_policy != "recompute":
            tc.kv_load_failure_policy = "recompute"
            logger.info("kvmkt: kv_load_failure_policy set to 'recompute' (was 'fail')")
        return
    top = parent._vllm_config.kv_transfer_config
    if imports and top.kv_load_failure_policy != "recompute":
        # Not switched for the siblings: it would change how their failures end.
        raise ValueError(
            "MarketplaceConnector under MultiConnector needs the top-level "
            "kv_transfer_config.kv_load_failure_policy to be \"recompute\" (it is "
            f"{top.kv_load_failure_policy!r}): a failed marketplace import is reported as a "
            "load error, and \"fail\" would fail the request instead of recomputing it. Set "
            "\"kv_load_failure_policy\": \"recompute\" next to \"kv_connector\": "
            "\"MultiConnector\" (or give MarketplaceConnector kv_role \"kv_producer\" or "
            "kv_connector_extra_config enable_import=false, so it never imports)."
        )


class MarketplaceConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        tc = self._kv_transfer_config
        cfg = MarketplaceConfig.from_extra_config(tc.kv_connector_extra_config)
        self._scheduler = None
        self._worker = None
        # KVMKT_TRACE / KVMKT_PROFILE: how long our hooks run, and where
        self._hooks = HookTimes(logger, "scheduler" if role == KVConnectorRole.SCHEDULER else "worker")
        # Alone, vLLM's handshake channel brings the workers' layouts to the scheduler at
        # startup (an idle engine registers its exports before any request). Under
        # MultiConnector that channel carries one child's data to every child, so layouts
        # then travel in the worker metadata of the first step instead.
        self._parent = _multi_connector_parent()
        self._alone = self._parent is None
        if role == KVConnectorRole.SCHEDULER:
            from kvmkt_connector.connector.scheduler import MarketplaceScheduler

            imports = cfg.enable_import and tc.kv_role in ("kv_consumer", "kv_both")
            _ensure_recompute_policy(tc, imports)  # a failed import costs a recompute only
            self._scheduler = MarketplaceScheduler(vllm_config, cfg, kv_cache_config)
        else:
            from kvmkt_connector.connector.worker import MarketplaceWorker

            export = cfg.enable_export and tc.kv_role in ("kv_producer", "kv_both")
            self._worker = MarketplaceWorker(vllm_config, cfg, kv_cache_config.num_blocks, export)

    def _timed(self, hook: str, fn: Any, *args: Any, **kw: Any) -> Any:
        return self._hooks.run(hook, fn, *args, **kw) if self._hooks.enabled else fn(*args)

    # ================================================================ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> Any:
        if self._worker is None or not self._alone:
            return None
        return self._worker.handshake()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, MarketplaceConnectorMetadata)
        self._timed("start_load_kv", self._worker.run_jobs, meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: their requests run only once they are done

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kw: Any
    ) -> None:
        return  # exports copy finished blocks in start_load_kv, not layer by layer

    def wait_for_save(self) -> None:
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # (sending, recving): we never delay freeing blocks, so never "sending".
        if self._worker is None:
            return None, None
        return None, self._timed("get_finished", self._worker.get_finished,
                                 waited_ns=self._worker.last_wait_ns)

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._worker is None:
            return set()
        return self._timed("load_errors", self._worker.take_load_errors)

    def build_connector_worker_meta(self):
        if self._worker is None:
            return None
        return self._timed("worker_meta", self._worker.take_worker_meta)

    def get_kv_connector_stats(self) -> MarketplaceStats | None:
        half = self._worker or self._scheduler
        return self._timed("stats", half.take_stats) if half is not None else None

    def mapped_regions(self) -> int:
        """Neighbours' regions this worker maps now (what ``vllm:kvmkt_mapped_regions``
        reports at a step): tests read it through ``collective_rpc``, which needs no step."""
        return self._worker.mapped_regions() if self._worker is not None else 0

    def shutdown(self) -> None:
        self._hooks.flush(final=True)
        half = self._worker or self._scheduler
        if half is not None:
            half.shutdown()

    # ================================================================ scheduler side

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        handshakes = {r: m for r, m in metadata.items() if isinstance(m, MarketplaceHandshake)}
        if self._alone and handshakes:
            self._scheduler.on_startup_handshakes(handshakes)

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        # vLLM's Scheduler calls this from its __init__, or under MultiConnector calls our
        # parent's, which calls ours. Its KV event publisher lets kv_events.py publish
        # while the engine is idle (it does not step then, so nothing takes our events).
        frame = sys._getframe(1)
        top = self if self._alone else self._parent
        if not self._alone and frame.f_locals.get("self") is top and frame.f_back is not None:
            frame = frame.f_back
        caller = frame.f_locals.get("self")
        sched = caller if getattr(caller, "connector", None) is top else None
        self._scheduler.bind_gpu_block_pool(
            gpu_block_pool, getattr(sched, "kv_event_publisher", None)
        )
        _undo_deferred_block_free(sched, self)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._timed("match", self._scheduler.get_num_new_matched_tokens, request,
                           num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        # (Also when we import nothing: under MultiConnector a sibling may load into them,
        # and the export ledger must stop offering what they held; see the scheduler.)
        block_ids = blocks.get_block_ids()[0]
        self._timed("after_alloc", self._scheduler.update_state_after_alloc, request, block_ids,
                    num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._timed("build_meta", self._scheduler.build_connector_meta, scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._timed("connector_output", self._scheduler.update_connector_output, connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return False, self._timed("request_finished", self._scheduler.request_finished, request,
                                  block_ids)

    def take_events(self):
        if self._scheduler is None:
            return ()
        return self._timed("take_events", self._scheduler.take_events)

    def has_pending_push_work(self) -> bool:
        # Exports are copied one step after their request finished (and KV events wait to
        # be taken); keep the engine stepping until they are out, even when no request is
        # left.
        return self._scheduler is not None and self._scheduler.has_pending_exports()

    def reset_cache(self) -> bool | None:
        return self._scheduler.reset_cache() if self._scheduler is not None else None

    # ================================================================ metrics

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> MarketplaceStats:
        return MarketplaceStats(data=data) if data is not None else MarketplaceStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return MarketplacePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


# Under MultiConnector the front end rebuilds each child's stats by class name
# (KVConnectorFactory.get_connector_class_by_name): make ours resolve also when it was
# loaded through kv_connector_module_path without the plugin entry point.
register_connector_name()
