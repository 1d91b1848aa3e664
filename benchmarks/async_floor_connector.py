"""The fastest connector vLLM 0.26 allows, for timing only: it moves no KV at all.

A request whose ``kv_transfer_params`` carry ``{"kvmkt_floor": "async", "floor_tokens": N}``
is told that N tokens of its prompt (block-aligned, beyond its local hits, at most all but
its last token) come from outside, asynchronously (``(n, True)``, as MarketplaceConnector
does), and its workers report it loaded in the very step that got the job. With "sync" the
same tokens are claimed synchronously (``(n, False)``, as vLLM's DecodeBenchConnector does).
The blocks keep whatever they held: the output is meaningless, its time is not. So an
"async" request's time to first token is the floor of any asynchronous import on this vLLM
(its scheduler parks the request, then promotes it steps later); "sync" is that of a
synchronous one. ``benchmarks/ttft_bench.py --floor`` runs it as engine F.

    {"kv_connector": "AsyncFloorConnector", "kv_role": "kv_both",
     "kv_connector_module_path": "benchmarks.async_floor_connector"}

With KVMKT_TRACE=hooks its hooks are timed as MarketplaceConnector's are (``kvmkt-hooks``
spans, same names), so ``trace_breakdown.py`` can set F's steps beside B's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvmkt_connector.logs import HookTimes, get_logger, trace_gc

logger = get_logger(__name__)


@dataclass
class FloorMetadata(KVConnectorMetadata):
    loaded: list[str] = field(default_factory=list)  # async claims to report this step


class AsyncFloorConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._bs = vllm_config.cache_config.block_size
        self._claimed: set[str] = set()  # scheduler: asked once per request
        self._allocated: list[str] = []  # scheduler: async claims allocated this step
        self._to_report: set[str] = set()  # worker
        self._times = HookTimes(logger, "floor")
        trace_gc(logger)  # (as our scheduler does: the breakdown counts collections alike)
        if self._times.enabled:  # the same hook names as MarketplaceConnector's spans
            for hook, name in (("get_num_new_matched_tokens", "match"),
                               ("update_state_after_alloc", "after_alloc"),
                               ("build_connector_meta", "build_meta"),
                               ("request_finished", "request_finished"),
                               ("start_load_kv", "start_load_kv"),
                               ("get_finished", "get_finished")):
                fn = getattr(self, hook)
                setattr(self, hook, lambda *a, _fn=fn, _n=name, **kw: self._times.run(
                    _n, lambda: _fn(*a, **kw)))

    # ------------------------------------------------------------ scheduler

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                                   ) -> tuple[int, bool]:  # fmt: skip
        params = request.kv_transfer_params or {}
        mode = params.get("kvmkt_floor")
        if mode not in ("async", "sync") or request.request_id in self._claimed:
            return 0, False
        self._claimed.add(request.request_id)
        upto = min(int(params.get("floor_tokens", 0)), request.num_tokens - 1)
        n = upto // self._bs * self._bs - num_computed_tokens
        return (n, mode == "async") if n > 0 else (0, False)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int):
        params = request.kv_transfer_params or {}
        if num_external_tokens and params.get("kvmkt_floor") == "async":
            self._allocated.append(request.request_id)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        loaded, self._allocated = self._allocated, []
        return FloorMetadata(loaded)

    def request_finished(self, request: Any, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:  # fmt: skip
        self._claimed.discard(request.request_id)
        return False, None

    # ------------------------------------------------------------ worker

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, FloorMetadata)
        self._to_report.update(meta.loaded)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done, self._to_report = self._to_report, set()
        return None, done or None

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:  # fmt: skip
        pass

    def wait_for_save(self) -> None:
        pass
