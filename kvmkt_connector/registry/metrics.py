"""Prometheus exposition of the registry's counters (``--metrics-port``).

A custom collector reads the registry's scalar counters at scrape time, so the hot path
never touches prometheus_client. The scrape runs on prometheus_client's HTTP thread while
the service loop mutates state; it only reads ints and ``len()``s, which the GIL keeps
consistent enough for monitoring (no iteration over structures being changed).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .index import PrefixRegistry


class RegistryCollector:
    def __init__(self, registry: PrefixRegistry) -> None:
        self._registry = registry

    def describe(self) -> list[Any]:
        return []  # unchecked collector: the families are built at collect time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        registry, counters = self._registry, self._registry.counters
        gauges = [
            ("kvmkt_registry_holders", "Registered holders (vLLM instances).",
             registry.holder_count),
            ("kvmkt_registry_published_blocks", "Blocks listed by all holders.",
             registry.published_blocks),
            ("kvmkt_registry_capacity_blocks", "Most blocks the registry lists at once.",
             registry.capacity_blocks),
            ("kvmkt_registry_active_leases", "Leases granted and not yet released or expired.",
             registry.active_leases),
            ("kvmkt_registry_leased_blocks", "Blocks the active leases cover (with repeats).",
             registry.leases.leased_blocks),
        ]  # fmt: skip
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        totals = [
            ("kvmkt_registry_lookups", "Lookup RPCs answered.", counters.lookups),
            ("kvmkt_registry_lease_requests", "Lease RPCs answered.", counters.lease_requests),
            ("kvmkt_registry_leases_granted", "Lease RPCs that granted a lease.",
             counters.leases_granted),
            ("kvmkt_registry_blocks_leased", "Blocks covered by granted leases.",
             counters.blocks_leased),
            ("kvmkt_registry_leases_refused",
             "Lease RPCs refused: the caller or everyone held too many leases.",
             counters.leases_refused),
            ("kvmkt_registry_blocks_released_lru", "Blocks released to make room (capacity).",
             counters.blocks_released_lru),
            ("kvmkt_registry_holders_lost", "Holders dropped (connection closed or pid gone).",
             counters.holders_lost),
            ("kvmkt_registry_slow_clients_dropped",
             "Connections dropped for leaving too many replies unread.",
             counters.slow_clients_dropped),
        ]  # fmt: skip
        for name, doc, value in totals:
            yield CounterMetricFamily(name, doc, value=value)  # exposed as <name>_total


def start_metrics_server(registry: PrefixRegistry, port: int) -> Any:
    """Serve /metrics on 127.0.0.1:``port`` from a private CollectorRegistry.

    Returns the HTTP server (has ``shutdown()``). Port 0 picks a free port
    (``server.server_port``).
    """
    from prometheus_client import CollectorRegistry, start_http_server

    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(RegistryCollector(registry))
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=collectors)
    return server
