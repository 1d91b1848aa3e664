"""The exporter's side of the registry, on a background thread.

Publishing thousands of keys keeps the (single-threaded) registry busy for milliseconds;
done inline in ``request_finished`` that time would be added to the request's latency and
stall the scheduler loop. So the holder connection lives on one thread of its own: the
scheduler queues publish/reclaim/unpublish operations and, once per step, collects what
came back (locations the registry released, publishes that failed). Nothing the scheduler
does waits for it.

The thread also syncs released locations periodically, and re-registers after losing the
registry (``generation`` counts registrations; the exporter then publishes again what it
still offers).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.logs import get_logger
from kvmkt_connector.registry.client import RegistryClient

logger = get_logger(__name__)


@dataclass
class HolderRegistration:
    namespace: bytes
    name: str
    fingerprint: bytes
    descriptor: bytes
    cleanup_paths: list[str] = field(default_factory=list)


@dataclass
class ChannelEvent:
    """Something the scheduler must apply to its export ledger."""

    kind: str  # released | published | publish_failed | publish_unknown | publish_stale
    locations: list[int]
    generation: int


class HolderChannel:
    def __init__(self, cfg: MarketplaceConfig, client_name: str, reg: HolderRegistration) -> None:
        self._cfg = cfg
        self._client_name = client_name
        self._reg = reg
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._events: queue.SimpleQueue[ChannelEvent] = queue.SimpleQueue()
        self._client: RegistryClient | None = None
        self._stop = threading.Event()
        self.generation = 0
        self.holder_id: int | None = None
        self.holder_bit: int | None = None
        self.connected = False
        self._thread = threading.Thread(target=self._run, name="kvmkt-holder", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ scheduler thread

    def publish(self, keys: list[bytes], locations: list[int]) -> None:
        self._ops.put(("publish", keys, locations, self.generation))

    def reclaim(self, count: int) -> None:
        self._ops.put(("reclaim", count))

    def unpublish(self, locations: list[int]) -> None:
        self._ops.put(("unpublish", locations))

    def take_events(self) -> list[ChannelEvent]:
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def close(self) -> None:
        self._stop.set()
        self._ops.put(("stop",))
        self._thread.join(5)

    # ------------------------------------------------------------ background thread

    def _run(self) -> None:
        interval = max(self._cfg.registry_sync_interval_ms, 10) / 1000
        next_sync = 0.0
        while not self._stop.is_set():
            try:
                op = self._ops.get(timeout=interval)
            except queue.Empty:
                op = None
            if op is not None and op[0] == "stop":
                break
            client = self._connected()
            if client is None:
                self._not_done(op)
                continue
            if op is not None:
                try:
                    self._apply(client, op)
                except Exception as e:  # the outcome is unknown: see _not_done
                    logger.warning("kvmkt: registry holder connection lost: %s", e)
                    self._drop()
                    self._not_done(op, unknown=True)
                    continue
            if time.monotonic() >= next_sync:
                next_sync = time.monotonic() + interval
                try:
                    self._emit("released", client.sync())
                except Exception as e:
                    logger.warning("kvmkt: registry holder connection lost: %s", e)
                    self._drop()
        self._drop()

    def _apply(self, client: RegistryClient, op: tuple) -> None:
        if op[0] == "publish":
            _, keys, locations, generation = op
            if generation != self.generation:  # queued before a re-registration
                self._emit("publish_stale", locations, generation)
                return
            released = client.publish(keys, locations)
            self._emit("published", locations)
            self._emit("released", released)
        elif op[0] == "reclaim":
            self._emit("released", client.reclaim(op[1]))
        elif op[0] == "unpublish":
            released, _ = client.unpublish(op[1])  # leased ones come back through sync
            self._emit("released", released)

    def _not_done(self, op: tuple | None, unknown: bool = False) -> None:
        """``op`` did not (certainly) happen. Nothing to undo: pages are checked by their tag
        when copied, and after re-registering the ledger publishes again what it offers."""
        if op is not None and op[0] == "publish":
            self._emit("publish_unknown" if unknown else "publish_failed", op[2], op[3])

    def _emit(self, kind: str, locations: list[int], generation: int | None = None) -> None:
        """Events carry the registration they are about (a publish: the one it was queued
        under), so the ledger never applies an old registration's news to a new one."""
        if locations:
            gen = self.generation if generation is None else generation
            self._events.put(ChannelEvent(kind, list(locations), gen))

    def _connected(self) -> RegistryClient | None:
        if self._client is not None:
            return self._client
        try:
            client = RegistryClient.connect(
                self._cfg.registry_socket, client_name=self._client_name,
                autostart=self._cfg.registry_autostart,
                timeout_s=self._cfg.registry_timeout_ms / 1000,
            )
            r = self._reg
            accepted = client.register_holder(
                r.namespace, r.name, r.fingerprint, r.descriptor, r.cleanup_paths
            )
        except Exception as e:
            if self.connected or self.generation == 0:
                logger.warning("kvmkt: cannot register as holder (%s); retrying in %.0f s",
                               e, self._cfg.registry_retry_s)
            self.connected = False
            self._stop.wait(self._cfg.registry_retry_s)
            return None
        self._client = client
        self.holder_id, self.holder_bit = accepted.holder_id, accepted.holder_bit
        self.generation += 1
        self.connected = True
        logger.info("kvmkt: registered with the registry as holder %d (%s)", accepted.holder_id, r.name)
        return client

    def _drop(self) -> None:
        self.connected = False
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
