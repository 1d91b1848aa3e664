"""The exporter's side of the registry, on a background thread.

Publishing thousands of keys keeps the (single-threaded) registry busy for milliseconds;
done inline in ``request_finished`` that time would be added to the request's latency and
stall the scheduler loop. So the holder connection lives on one thread of its own: the
scheduler queues publish/reclaim/unpublish operations and, once per step, collects what
came back (locations the registry released, publishes that failed). Nothing the scheduler
does waits for it.

The thread also syncs released locations periodically, and re-registers after losing the
registry (a restarted one, or one it starts itself). It keeps the set of entries it has
offered (every publish, unpublish and release passes through it, in order), so right after
registering again it publishes them all: an idle exporter, whose scheduler does not step,
is found again within a second of the registry's return. Large publishes go in chunks
(``protocol.publish_chunks``): all an instance offers does not fit in one frame. A
registry that is there but fails the registration (or the publishing again) is tried
again after a pause that doubles up to 5 s, not in a tight loop.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.hashing import token_bytes
from kvmkt_connector.logs import get_logger, trace_wait, waits_traced
from kvmkt_connector.registry.client import RegistryClient
from kvmkt_connector.registry.protocol import (
    PUBLISH_CHUNK_BYTES,
    BlockTokens,
    location_chunks,
    publish_chunks,
)

logger = get_logger(__name__)
_BACKOFF_MIN_S = 0.2
_BACKOFF_MAX_S = 5.0


@dataclass(frozen=True)
class TokenRun:
    """The token ids of an export's blocks: the blocks at ``positions`` (ascending) of a
    finished request whose whole token sequence is ``token_ids`` (vLLM no longer changes
    it). The channel's thread makes the BlockTokens of those it publishes, bytes included,
    not vLLM's scheduler thread (an export of 16k tokens describes a thousand blocks)."""

    keys: list[bytes]
    parents: list[bytes]
    positions: list[int]
    token_ids: Sequence[int]
    block_size: int


def block_tokens(tokens: list, keys: list[bytes]) -> list[BlockTokens]:
    """BlockTokens of ``keys`` from ``tokens`` (BlockTokens, or TokenRuns)."""
    wanted = set(keys)
    out = []
    for t in tokens:
        if isinstance(t, BlockTokens):
            out.append(t)
            continue
        if not t.positions:
            continue
        bs, first = t.block_size, t.positions[0]
        blob = token_bytes(t.token_ids[first * bs : (t.positions[-1] + 1) * bs])
        step = 4 * bs
        out += [BlockTokens(k, p, blob[(i - first) * step : (i - first + 1) * step])
                for k, p, i in zip(t.keys, t.parents, t.positions, strict=True) if k in wanted]
    return out


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

    kind: str  # released | published
    locations: list[int]


class HolderChannel:
    def __init__(
        self, cfg: MarketplaceConfig, client_name: str, reg: HolderRegistration,
        chunk_bytes: int = PUBLISH_CHUNK_BYTES,
    ) -> None:  # fmt: skip
        """``chunk_bytes``: most bytes of one Publish/Unpublish message (tests lower it)."""
        self._cfg = cfg
        self._chunk_bytes = chunk_bytes
        self._failures = 0  # registrations in a row that failed once connected
        self._warned_unreachable = False
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
        # location -> (key, parent key) (channel thread only)
        self._offered: dict[int, tuple[bytes, bytes]] = {}
        # key -> BlockTokens sent with its publish, sent again when publishing again (kept
        # for offered keys; stale ones are pruned when they outnumber those)
        self._tokens: dict[bytes, Any] = {}
        # Cache resets (see exporter.ResetWatch): checked here too, so an exporter whose
        # scheduler does not step after a reset still withdraws at once.
        self._reset_epoch: Callable[[], int] = lambda: 0
        self._epoch = 0
        self._trace_waits = waits_traced()
        self._thread = threading.Thread(target=self._run, name="kvmkt-holder", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ scheduler thread

    def watch_resets(self, epoch: Callable[[], int]) -> None:
        """``epoch()`` counts cache resets (thread-safe)."""
        self._reset_epoch = epoch

    def publish(
        self, keys: list[bytes], locations: list[int], epoch: int = 0, tokens: list | None = None,
        parents: list[bytes] | None = None,
    ) -> None:  # fmt: skip
        """Offer pages the ledger knew under cache epoch ``epoch`` (older: dropped);
        ``tokens``: ``BlockTokens`` or ``TokenRun``s describing some of them (sent again
        when publishing again);
        ``parents``: per key, the key before it (b"" for a first block)."""
        self._ops.put(("publish", keys, locations, epoch, tokens or [],
                       parents or [b""] * len(keys)))

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
            self._check_reset()
            client = self._connected()
            if client is None:
                self._not_done(op)
                if not self._park_queued():
                    break
                continue
            if op is not None:
                try:
                    if self._trace_waits:  # (this thread's work holds the GIL from vLLM's)
                        t0, c0 = time.monotonic_ns(), time.thread_time_ns()
                        self._apply(client, op)
                        trace_wait(logger, f"channel-{op[0]}", t0, c0)
                    else:
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

    def _check_reset(self) -> int:
        """The cache epoch now: a publish of another one is dropped (older) or kept. Called
        again right before judging one: the ledger may have noticed a reset since."""
        epoch = self._reset_epoch()
        if epoch == self._epoch:
            return epoch
        self._epoch = epoch
        if self._offered:  # nothing offered before the reset may be found any more
            self._ops.put(("unpublish", list(self._offered)))
            self._offered.clear()
            self._tokens.clear()
        return epoch

    def _apply(self, client: RegistryClient, op: tuple) -> None:
        if op[0] == "publish":
            _, keys, locations, epoch, tokens, parents = op
            if epoch != self._check_reset():  # pages from before a cache reset
                return
            tokens = block_tokens(tokens, keys)
            self._offered.update(zip(locations, zip(keys, parents, strict=True), strict=True))
            self._remember_tokens(tokens)
            self._publish(client, keys, locations, tokens, parents, count=True)
        elif op[0] == "reclaim":
            self._emit("released", client.reclaim(op[1]))
        elif op[0] == "unpublish":
            # (this thread holds the GIL from vLLM's while it runs Python: no loop per page)
            deque(map(self._offered.pop, op[1], repeat(None)), maxlen=0)
            pending = 0
            for part in location_chunks(op[1], self._chunk_bytes):
                # Leased ones come back via sync. What is released now is not news to the
                # ledger, which forgot these locations before asking (and a location names
                # one use of a block or slot: a later listing of it is another location),
                # so it gets no event: an import's allocation withdraws a thousand of them.
                _, n = client.unpublish(part)
                pending += n
            # (an import's allocation withdraws a thousand pages: a line each only at debug)
            logger.debug("kvmkt: withdrew %d pages (%d still leased)", len(op[1]), pending)

    def _publish(self, client: RegistryClient, keys: list[bytes], locations: list[int],
                 tokens: list, parents: list[bytes], count: bool = False) -> None:
        """In chunks; each chunk's reply is applied before the next is sent, so a connection
        lost midway loses no released locations. ``count``: new exports (not a republish)."""
        for msg in publish_chunks(keys, locations, tokens, self._chunk_bytes, parents):
            released = client.publish(msg.keys, msg.locations, msg.tokens, msg.parents)
            if count:
                self._emit("published", msg.locations)
            self._emit("released", released)

    def _park_queued(self) -> bool:
        """No registry: every queued op is remembered for the next registration now (one
        per retry pause would let the queue grow without bound). False: asked to stop."""
        while True:
            try:
                op = self._ops.get_nowait()
            except queue.Empty:
                return True
            if op[0] == "stop":
                return False
            self._not_done(op)

    @property
    def registry_pid(self) -> int | None:
        """The registry process our registration (holder id and bit) belongs to."""
        client = self._client
        return client.server_pid if client is not None and self.connected else None

    def _not_done(self, op: tuple | None, unknown: bool = False) -> None:
        """``op`` did not (certainly) happen: remember what it meant to offer, so the next
        registration publishes it. Nothing else to undo: pages are checked by their tag.
        ``unknown``: ``_apply`` already recorded it (and chunks of it may have been answered:
        what they released is not offered again)."""
        if op is None:
            return
        if op[0] == "publish" and not unknown and op[3] == self._check_reset():
            self._offered.update(zip(op[2], zip(op[1], op[5], strict=True), strict=True))
            self._remember_tokens(block_tokens(op[4], op[1]))
        elif op[0] == "unpublish":
            for loc in op[1]:
                self._offered.pop(loc, None)

    def _remember_tokens(self, tokens: list) -> None:
        self._tokens.update((t.key, t) for t in tokens)
        if len(self._tokens) > 2 * len(self._offered) + 1024:
            offered = {key for key, _ in self._offered.values()}
            self._tokens = {k: t for k, t in self._tokens.items() if k in offered}

    def _emit(self, kind: str, locations: list[int]) -> None:
        if not locations:
            return
        if kind == "released":
            for loc in locations:
                self._offered.pop(loc, None)
        self._events.put(ChannelEvent(kind, list(locations)))

    def _connected(self) -> RegistryClient | None:
        if self._client is not None:
            return self._client
        t0 = time.monotonic()
        try:
            client = RegistryClient.connect(
                self._cfg.registry_socket, client_name=self._client_name,
                autostart=self._cfg.registry_autostart,
                timeout_s=self._cfg.registry_timeout_ms / 1000,
            )
        except Exception as e:  # none listens (retried soon: a new one is used at once)
            delay = self._cfg.retry_delay(time.monotonic() - t0)
            if self.connected or not self._warned_unreachable:  # once per outage
                logger.warning("kvmkt: cannot register as holder (%s); retrying in %.1f s",
                               e, delay)
                self._warned_unreachable = True
            self.connected = False
            self._stop.wait(delay)
            return None
        r = self._reg
        try:
            accepted = client.register_holder(
                r.namespace, r.name, r.fingerprint, r.descriptor, r.cleanup_paths
            )
            self.holder_id, self.holder_bit = accepted.holder_id, accepted.holder_bit
            self.generation += 1
            if self._offered:
                locations = list(self._offered)
                keys = [self._offered[loc][0] for loc in locations]
                parents = [self._offered[loc][1] for loc in locations]
                tokens = [t for t in map(self._tokens.get, keys) if t is not None]
                self._publish(client, keys, locations, tokens, parents)
                logger.info("kvmkt: published %d offered pages again", len(locations))
        except Exception as e:
            # A registry that answers but fails us would fail us again at once: back off.
            with contextlib.suppress(Exception):
                client.close()
            self.connected = False
            self._failures += 1
            delay = max(min(_BACKOFF_MIN_S * 2 ** (self._failures - 1), _BACKOFF_MAX_S),
                        self._cfg.retry_delay(time.monotonic() - t0))
            logger.warning("kvmkt: registering as holder failed (%s); retrying in %.1f s",
                           e, delay)
            self._stop.wait(delay)
            return None
        self._failures = 0
        self._client = client
        self.connected = True
        self._warned_unreachable = False
        logger.info("kvmkt: registered with the registry as holder %d (%s)", accepted.holder_id, r.name)
        return client

    def _drop(self) -> None:
        self.connected = False
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
