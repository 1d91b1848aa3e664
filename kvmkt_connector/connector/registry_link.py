"""The scheduler's importing connection to the node-local registry (hint, lease, release).

The registry is an optimisation, never a dependency: when it cannot be reached every call
here returns ``None`` (the caller falls back to normal prefill). Where no registry listens
a connect fails at once, so the link tries again a moment later (a restarted registry is
used within a fraction of a second); only a registry that answers slowly (a timeout) makes it stay
away for ``registry_retry_s``, so a hung registry costs one timeout per period, not one per
request. Exporting goes through ``HolderChannel`` (its own connection,
on a background thread); lookups here skip that holder, i.e. this instance itself.

A registry that works but lends no more leases now (``lease_limit``: this connection or all
hold too many) is no outage: the call returns None, which the importer counts as a miss
(``fallback_miss``), and the connection stays. The leases of a connection end when it
closes, so a reconnect gives them up (they only steered: pages are checked after a copy).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TypeVar

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.holder_channel import HolderChannel
from kvmkt_connector.logs import get_logger
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.registry.client import (
    PendingReply,
    RegistryClient,
    RegistryError,
    RegistryUnavailable,
)
from kvmkt_connector.registry.protocol import LEASE_LIMIT

logger = get_logger(__name__)
T = TypeVar("T")


class RegistryLink:
    def __init__(self, cfg: MarketplaceConfig, client_name: str, stats: MarketplaceStats) -> None:
        self._cfg = cfg
        self._client_name = client_name
        self._stats = stats
        self._client: RegistryClient | None = None
        self._retry_at = 0.0
        self._down_since: float | None = None
        self._refused_logged_at = -float("inf")  # lease_limit refusals: log once a minute
        # Bumped per connection: lease ids mean something only to the registry that
        # granted them (a restarted one numbers leases anew).
        self.epoch = 0
        self.holder: HolderChannel | None = None  # this instance's exports, to skip

    @property
    def own_holder_id(self) -> int | None:
        return self.holder.holder_id if self._same_registry() else None

    @property
    def own_holder_bit(self) -> int | None:
        return self.holder.holder_bit if self._same_registry() else None

    def _same_registry(self) -> bool:
        """Our exporter is registered with the registry we look up in: its id and bit mean
        us there (a restarted registry hands them out anew; until our exporter registers
        again, none of its pages are listed there to skip)."""
        client = self._client
        return (self.holder is not None and client is not None
                and self.holder.registry_pid == client.server_pid)

    def _connected(self) -> RegistryClient | None:
        if self._client is not None:
            return self._client
        now = time.monotonic()
        if now < self._retry_at:
            return None
        t0 = time.monotonic()
        try:
            # No auto-start here: this runs on the scheduler's thread, and starting a registry
            # can take seconds. The exporter's background channel starts one when needed.
            client = RegistryClient.connect(
                self._cfg.registry_socket,
                client_name=self._client_name,
                autostart=False,
                timeout_s=self._cfg.registry_timeout_ms / 1000,
            )
            self._client = client
            self.epoch += 1
        except Exception as e:  # unreachable, refused, unsafe socket dir: never fatal
            self._down(f"cannot use the registry: {e}", time.monotonic() - t0)
            return None
        if self._down_since is not None:
            logger.info("kvmkt: registry reachable again after %.1f s",
                        time.monotonic() - self._down_since)
            self._down_since = None
        return self._client

    def _down(self, why: str, failed_after_s: float = 0.0) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        self._client = None
        delay = self._cfg.retry_delay(failed_after_s)
        self._retry_at = time.monotonic() + delay
        if self._down_since is None:  # say it once per outage
            self._down_since = time.monotonic()
            logger.warning("kvmkt: %s; requests prefill normally until it is back "
                           "(next try in %.1f s)", why, delay)

    def call(self, fn: Callable[[RegistryClient], T]) -> T | None:
        """``fn(client)``, or None if the registry is unreachable or refuses. A connection
        found broken is replaced once at once: after a registry restart the first request
        already reaches the new one."""
        for attempt in (0, 1):
            client = self._connected()
            if client is None:
                break
            t0 = time.monotonic()
            try:
                return fn(client)
            except RegistryUnavailable as e:
                took = time.monotonic() - t0
                self._down(f"lost the registry: {e}", took)
                if attempt == 0 and took < 0.05:  # a closed connection, not a hung registry:
                    self._retry_at = 0.0  # a slow one must not cost two timeouts per request
                    continue
            except RegistryError as e:
                if self._refused(e):
                    return None
            break
        self._stats.count("fallback_registry_unavailable")
        return None

    def result(self, pending: PendingReply[T]) -> T | None:
        """A posted request's reply, or None as ``call`` would give (not retried: what it
        asked for was meant for the connection that went)."""
        t0 = time.monotonic()
        try:
            return pending.result()
        except RegistryUnavailable as e:
            if self._client is not None and self._client.broken:  # (ours, or one before it)
                took = time.monotonic() - t0
                self._down(f"lost the registry: {e}", took)
                if took < 0.05:  # closed, not hung: a new registry may listen already
                    self._retry_at = 0.0
        except RegistryError as e:
            if self._refused(e):
                return None
        self._stats.count("fallback_registry_unavailable")
        return None

    @property
    def connected(self) -> bool:
        return self._client is not None

    def ready(self, pending: PendingReply[T]) -> bool:
        """Whether ``result(pending)`` would return without waiting (asked on the current
        connection: see ``connected`` and ``epoch``)."""
        client = self._client
        return client is not None and client.ready(pending)

    def release_later(self, lease_ids: list[int]) -> None:
        """Release without waiting for the answer (a lease only steers: nothing depends on
        when the registry ends it, and a lost connection ends it anyway)."""
        client = self._client
        if client is None or not lease_ids:
            return
        try:
            client.release_leases_later(lease_ids)
        except (RegistryUnavailable, RegistryError) as e:
            logger.info("kvmkt: could not release leases %s: %s", lease_ids, e)

    def flush(self) -> None:
        """Wait until the registry handled what we posted (tests and benchmarks)."""
        if self._client is not None:
            with contextlib.suppress(RegistryUnavailable):
                self._client.drain()

    def has_table(self) -> bool:
        """Whether hints come from the registry's lookup table (else they are no bound)."""
        client = self._client
        return client is not None and bool(client.lookup_table_path)

    def _refused(self, e: RegistryError) -> bool:
        """Log a refusal; True if it is no outage (the registry lends no more for now)."""
        if e.code == LEASE_LIMIT:
            self._note_refusal(e)
            return True
        logger.warning("kvmkt: registry refused a request: %s", e)
        return False

    def _note_refusal(self, e: RegistryError) -> None:
        now = time.monotonic()
        if now - self._refused_logged_at >= 60.0:
            self._refused_logged_at = now
            logger.warning("kvmkt: the registry lends no more leases now (%s); such requests "
                           "prefill normally", e.message)

    def hint(self, keys: list[bytes]) -> int | None:
        """Shared-memory bound on the longest run (no round trip; >= the exact run, which
        the lease then returns); 0 when unknown; None (counted) when no registry is reachable."""
        client = self._connected()
        # A restarted registry's table is stale (peer_closed never waits for posted replies)
        if client is not None and client.peer_closed():
            self._down("the registry closed our connection", 0.0)
            self._retry_at = 0.0  # a new one may listen already
            client = self._connected()
        if client is None:
            self._stats.count("fallback_registry_unavailable")
            return None
        try:
            return client.run_bound_hint(keys, exclude_bit=self.own_holder_bit)
        except Exception as e:  # a torn or re-mapped table: the lease would decide anyway
            logger.debug("kvmkt: lookup hint failed: %s", e)
            return 0

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
