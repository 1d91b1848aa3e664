"""Connector metrics: one table of definitions drives both the stats object and Prometheus.

Scheduler and workers record into a ``MarketplaceStats``; vLLM ships its ``data`` dict to the
front end every step (only with log stats on), sums the workers' and the scheduler's, logs
``reduce()`` each interval, and feeds ``MarketplacePromMetrics.observe`` for ``/metrics``
(``vllm serve``) and ``LLM.get_metrics()`` (offline, ``disable_log_stats=False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)

# short name -> (type, Prometheus name, help). Counters are per-interval deltas in ``data``.
METRICS: dict[str, tuple[str, str, str]] = {
    "lookups": (COUNTER, "vllm:kvmkt_lookups_total", "Prefix lookups in the registry."),
    "hits_full": (COUNTER, "vllm:kvmkt_hits_full_total",
                  "Lookups that covered every block the request could import."),
    "hits_partial": (COUNTER, "vllm:kvmkt_hits_partial_total",
                     "Lookups that found a shorter prefix than the request could import."),
    "imported_tokens": (COUNTER, "vllm:kvmkt_imported_tokens_total",
                        "Prompt tokens whose KV was imported instead of computed."),
    "imported_bytes": (COUNTER, "vllm:kvmkt_imported_bytes_total",
                       "KV bytes copied into this instance (all TP ranks)."),
    "exported_blocks": (COUNTER, "vllm:kvmkt_exported_blocks_total",
                        "Blocks this instance published for others."),
    "released_blocks": (COUNTER, "vllm:kvmkt_released_blocks_total",
                                "Published blocks this instance withdrew (rewritten, reset, registry LRU)."),
    "export_skipped_session": (COUNTER, "vllm:kvmkt_export_skipped_session_total",
                                      "Finished requests whose export stopped at a block of a "
                                      "streaming-input session (vLLM may cache those under "
                                      "stale hashes)."),
    "fallback_miss": (COUNTER, "vllm:kvmkt_fallback_miss_total",
                      "Lookups that found nothing to import (normal prefill)."),
    "fallback_incompatible": (COUNTER, "vllm:kvmkt_fallback_incompatible_total",
                              "Requests or instances that cannot share (config, LoRA, mm)."),
    "fallback_load_error": (COUNTER, "vllm:kvmkt_fallback_load_error_total",
                            "Blocks whose import failed and were recomputed."),
    "fallback_registry_unavailable": (COUNTER, "vllm:kvmkt_fallback_registry_unavailable_total",
                                      "Lookups or exports skipped: registry unreachable."),
    "exported_pages": (GAUGE, "vllm:kvmkt_exported_pages",
                       "Pages this instance currently offers to others."),
    "mapped_regions": (GAUGE, "vllm:kvmkt_mapped_regions",
                       "Neighbours' page regions (host_shm files, CUDA IPC allocations) mapped."),
    "import_seconds": (HISTOGRAM, "vllm:kvmkt_import_seconds",
                       "Time to copy one import job's pages (per worker)."),
}


@dataclass
class MarketplaceStats(KVConnectorStats):
    """``data``: {"c": {name: delta}, "g": {name: value}, "h": {name: [observations]}}."""

    data: dict[str, Any] = field(default_factory=lambda: {"c": {}, "g": {}, "h": {}})

    def __post_init__(self) -> None:
        for k in ("c", "g", "h"):
            self.data.setdefault(k, {})

    def count(self, name: str, n: int | float = 1) -> None:
        c = self.data["c"]
        c[name] = c.get(name, 0) + n

    def gauge(self, name: str, value: float) -> None:
        self.data["g"][name] = value

    def observe(self, name: str, value: float) -> None:
        self.data["h"].setdefault(name, []).append(value)

    def reset(self) -> None:
        self.data = {"c": {}, "g": {}, "h": {}}

    def take(self) -> MarketplaceStats | None:
        """This interval's stats (None if nothing happened); gauges persist, the rest resets."""
        if self.is_empty():
            return None
        out = MarketplaceStats({"c": self.data["c"], "g": dict(self.data["g"]), "h": self.data["h"]})
        self.data = {"c": {}, "g": self.data["g"], "h": {}}
        return out

    def aggregate(self, other: KVConnectorStats) -> MarketplaceStats:
        o = other.data
        for name, n in o.get("c", {}).items():
            self.count(name, n)
        for name, v in o.get("g", {}).items():
            # Gauges of different processes (scheduler, ranks) describe different things:
            # the largest reading is the one that matters for "how much is held back".
            self.data["g"][name] = max(v, self.data["g"].get(name, v))
        for name, values in o.get("h", {}).items():
            self.data["h"].setdefault(name, []).extend(values)
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self.data["c"])
        out.update(self.data["g"])
        for name, values in self.data["h"].items():
            if values:
                out[f"{name}_avg"] = round(sum(values) / len(values), 6)
        return out

    def is_empty(self) -> bool:
        return not (self.data["c"] or self.data["h"] or self.data["g"])


class MarketplacePromMetrics(KVConnectorPromMetrics):
    """Creates one Prometheus metric per definition and per engine."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._metrics: dict[str, dict[int, Any]] = {}
        for short, (kind, prom_name, doc) in METRICS.items():
            if kind == COUNTER:
                # prometheus_client appends _total itself.
                metric = self._counter_cls(
                    name=prom_name.removesuffix("_total"), documentation=doc, labelnames=labelnames
                )
            elif kind == GAUGE:
                metric = self._gauge_cls(
                    name=prom_name, documentation=doc, labelnames=labelnames,
                    multiprocess_mode="mostrecent",
                )
            else:
                metric = self._histogram_cls(
                    name=prom_name, documentation=doc, labelnames=labelnames, buckets=_SECONDS
                )
            self._metrics[short] = {
                idx: metric.labels(*values) for idx, values in per_engine_labelvalues.items()
            }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, n in transfer_stats_data.get("c", {}).items():
            if name in self._metrics:
                self._metrics[name][engine_idx].inc(n)
        for name, v in transfer_stats_data.get("g", {}).items():
            if name in self._metrics:
                self._metrics[name][engine_idx].set(v)
        for name, values in transfer_stats_data.get("h", {}).items():
            if name in self._metrics:
                for v in values:
                    self._metrics[name][engine_idx].observe(v)
