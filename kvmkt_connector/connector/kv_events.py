"""KV events for cluster routers: what this instance can import from its node's marketplace.

A KV-cache-aware router (llm-d's indexer) learns from each instance's vLLM KV events which
prefixes it holds, per medium. With ``kv_events_config`` on, this instance also announces,
under medium ``kv_events_medium`` ("KVMKT"), the blocks a neighbour offers that it could
import: ``BlockStored`` when one becomes importable, ``BlockRemoved`` when it stops being so
(withdrawn, evicted, holder dead, registry lost), each through the connector's
``take_events`` (vLLM publishes them with its own events after every step).

What counts as importable mirrors a lease: a run of blocks from block 0, at least
``min_import_tokens`` long, that one holder other than us lists entirely, in our namespace
(interchangeable KV), from a holder whose pages our workers can read (our transport, its
generation table openable), described with its token ids (no cache salt, no LoRA). Nothing
is announced while our own exporter is not registered (its exports could not be told apart
from a neighbour's). The registry's offer feed (``Offers``) gives the listing changes;
``offer_view.OfferView`` keeps, per block, the holders that list it and all its ancestors.
A snapshot (at start, after a reconnect, or after falling behind) comes in pages: they are
gathered into a fresh view, which replaces the announced one once the last page is in (no
retraction of what later pages hold).

A vLLM prefix-cache reset makes vLLM publish ``AllBlocksCleared``, which llm-d takes as the
end of all of this pod's blocks, ours included: the ``take_events`` of the step that
publishes it (vLLM puts the connector's events after the KV cache manager's) announces
everything again.

Hashes: a block's ``block_hash`` is its kvmkt key (16 bytes) as vLLM formats its own (the
low 64 bits as an int by default): not vLLM's seed-dependent hash, so not comparable to
this instance's GPU events. Routers key blocks by ``token_ids`` chained through
``parent_block_hash`` (llm-d does), which are exact.

Bounds: the view knows at most ``kv_events_max_blocks`` blocks (more are not announced).
Every ``kv_events_interval_ms`` the thread reads at most ``_POLLS_PER_ROUND`` answers (each at
most 4096 changes and about 2 MiB of tokens), none while events wait, and stops at the first
answer that left events: so what waits is one answer's events (they concern at most twice
``kv_events_max_blocks`` blocks: those announced before and after it), plus retracting all
when the registry or our exporter goes. A snapshot of n listings thus takes about
n / (8 x 4096) intervals. An idle engine does not step, so nothing would take events: the
feed thread then publishes them itself through the scheduler's publisher, alone or under
MultiConnector (one lock hands each event to exactly one of the two paths).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.offer_view import OfferView, build_events
from kvmkt_connector.logs import get_logger
from kvmkt_connector.registry.client import RegistryClient
from kvmkt_connector.registry.protocol import OfferFeed

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent

logger = get_logger(__name__)
_POLLS_PER_ROUND = 8  # answers read back to back at most, then wait for the interval


class KvEventFeed:
    """Polls the registry's offer feed on a thread of its own; ``take_events`` hands vLLM
    what changed."""

    def __init__(
        self, cfg: MarketplaceConfig, client_name: str, namespace: bytes, block_size: int,
        readable: Callable[[bytes], bool], own_bit: Callable[[], int | None] | None = None,
        publisher: Any = None, resets: Callable[[], int] | None = None,
    ) -> None:  # fmt: skip
        """``own_bit``: our holder bit while registered, else None (then nothing is
        announced: our own exports must never count); None if we do not export.
        ``resets``: how many prefix-cache resets vLLM's block pool had (``ResetWatch``)."""
        assert cfg.kv_events_medium
        self._cfg = cfg
        self._client_name = client_name
        self._namespace = namespace
        self._block_size = block_size
        self._readable = readable
        self._own_bit = own_bit
        self._publisher = publisher  # the scheduler's, for idle engines; None: steps only
        self._resets = resets
        self._reset_epoch = resets() if resets is not None else 0
        self._min_run = -(-cfg.min_import_tokens // block_size)
        self._view = OfferView(cfg.kv_events_max_blocks, self._min_run)
        self._interval = cfg.kv_events_interval_ms / 1000
        self._lock = threading.Lock()  # the view vs pending events, take_events and flushes
        self._pending: list[Any] = []
        self._pending_since = 0.0
        self._readable_cache: dict[bytes, bool] = {}
        self._client: RegistryClient | None = None
        self._start_over()
        self._poll_lock = threading.Lock()  # a poll and its view update vs stop_announcing
        self._stopping = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvmkt-kv-events", daemon=True)
        self._thread.start()

    def _start_over(self) -> None:
        """The next answer is a snapshot (a new connection may be a new registry)."""
        self._feed_id = self._cursor = self._after = 0
        self._staging: OfferView | None = None  # a snapshot's pages so far
        self._holder_bits: frozenset[int] = frozenset()  # in the last answer
        self._usable: frozenset[int] = frozenset()  # of those, whose listings count

    # ------------------------------------------------------------ scheduler thread

    def take_events(self) -> list[KVCacheEvent]:
        with self._lock:
            epoch = self._resets() if self._resets is not None else 0
            if epoch != self._reset_epoch:
                # vLLM reset its prefix cache: this step's batch holds its AllBlocksCleared
                # before what we return (vLLM 0.26 scheduler.update_from_output), and llm-d
                # clears the whole pod on it, our blocks too: announce what holds now (it
                # covers what was pending).
                self._reset_epoch = epoch
                ops = [(True, k) for k in self._view.announced]  # parents first
                self._pending = build_events(
                    ops, self._view.blocks, self._block_size, self._cfg.kv_events_medium
                )
            events, self._pending = self._pending, []
        return events

    def has_pending(self) -> bool:
        return bool(self._pending)

    def stop_announcing(self) -> None:
        """This instance will not import any more (connector reset): retract everything.
        The thread stays, to publish the retractions if the engine is idle."""
        with self._poll_lock:
            self._stopping = True
            self._update(self._view.withdraw_all)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(5)

    # ------------------------------------------------------------ feed thread

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._flush_if_idle()
            self.poll_round()
        self._drop()

    def poll_round(self) -> int:
        """What the thread does every interval: read answers while the registry has more,
        at most ``_POLLS_PER_ROUND``, none while events wait to be taken, and stop at the
        first answer that left events (backpressure: one answer's events wait at most).
        Returns the number of answers read."""
        polls = 0
        while polls < _POLLS_PER_ROUND and not self._pending:
            with self._poll_lock:
                if self._stopping or self._stop.is_set():
                    break
                polls += 1
                try:
                    more = self._poll()
                except Exception:  # a bug: announce nothing rather than stale blocks
                    logger.exception("kvmkt: KV events failed; retracting all")
                    self._drop()
                    self._update(self._view.withdraw_all)
                    more = False
            if not more:
                break
        return polls

    def _poll(self) -> bool:
        """One Offers round trip; True if the registry has more right away."""
        own = self._own_bit() if self._own_bit is not None else None
        if self._own_bit is not None and own is None:
            # Our exporter is not registered (starting, or it lost the registry): we could
            # not tell our own exports apart, so announce nothing until it is; then start
            # over from a snapshot.
            self._drop()
            self._update(self._view.withdraw_all)
            return False
        try:
            if self._client is None:
                self._client = RegistryClient.connect(
                    self._cfg.registry_socket, client_name=f"{self._client_name}/events",
                    autostart=False, timeout_s=self._cfg.registry_timeout_ms / 1000,
                )  # fmt: skip
                self._start_over()
            feed = self._client.offers(self._namespace, self._feed_id, self._cursor,
                                       after=self._after)  # fmt: skip
        except Exception as e:  # no registry, no imports: nothing is importable any more
            if self._client is not None or self._view.announced:
                logger.info("kvmkt: KV events: registry unreachable (%s): retracting %d "
                            "announced blocks", e, len(self._view.announced))
            self._drop()
            self._update(self._view.withdraw_all)
            return False
        return self._apply(feed, own)

    def _apply(self, feed: OfferFeed, own: int | None) -> bool:
        holders = {h.holder_bit: h.descriptor for h in feed.holders}
        usable = frozenset(b for b, d in holders.items() if b != own and self._readable_holder(d))
        # The view skips listings of holders that do not count; one we knew that counts now
        # (our own bit went to a neighbour, a table became readable) may have been skipped.
        skipped = bool((usable - self._usable) & self._holder_bits)
        self._holder_bits, self._usable = frozenset(holders), usable
        self._feed_id, self._cursor, self._after = feed.feed_id, feed.cursor, feed.after
        if feed.snapshot:
            self._staging = OfferView(self._cfg.kv_events_max_blocks, self._min_run)
        if self._staging is None:
            self._update(lambda: self._view.apply(feed.changes, usable))
        else:
            self._staging.apply(feed.changes, usable)
            if not feed.after:  # the last page: announce what changed as a whole
                staging, self._staging = self._staging, None
                self._update(lambda: self._view.replace(staging))
        # Listings dropped at the cap come back only with a snapshot: read one once there
        # is room (one that overflows again waits for room again: bounded by the churn).
        if skipped or (self._staging is None and self._view.room_again()):
            self._start_over()  # the snapshot replaces the view: nothing flaps
            return True
        return feed.more

    def _readable_holder(self, descriptor: bytes) -> bool:
        ok = self._readable_cache.get(descriptor)
        if ok is None:
            if len(self._readable_cache) > 256:
                self._readable_cache.clear()
            ok = self._readable_cache[descriptor] = self._readable(descriptor)
        return ok

    def _update(self, change: Callable[[], list[tuple[bool, bytes]]]) -> None:
        """Apply ``change`` to the view and queue its events, as one step for take_events
        (which may announce the whole view again)."""
        with self._lock:
            ops = change()
            if not ops:
                return
            events = build_events(
                ops, self._view.blocks, self._block_size, self._cfg.kv_events_medium
            )
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.extend(events)

    def _flush_if_idle(self) -> None:
        """Events no step took for a whole interval: the engine is idle; publish them. A
        step that took earlier events has published them long before (same few lines)."""
        if self._publisher is None:
            return
        from vllm.distributed.kv_events import KVEventBatch

        with self._lock:  # a step's take_events waits, so its batch is published after
            if not self._pending or time.monotonic() - self._pending_since < self._interval:
                return
            events, self._pending = self._pending, []
            try:
                self._publisher.publish(KVEventBatch(ts=time.time(), events=events))
            except Exception as e:  # a publisher shutting down: the events are lost anyway
                logger.debug("kvmkt: KV events: idle publish failed: %s", e)

    def _drop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):  # already broken
                self._client.close()
            self._client = None
