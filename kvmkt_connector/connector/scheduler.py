"""Scheduler side: wires the registry link, the import planner and the export ledger.

Nothing is shared until every worker has reported its KV layout (its MarketplaceHandshake:
through vLLM's handshake channel at startup when we are the only connector, else in the
worker metadata of the first steps): only then is the compatibility fingerprint complete,
and with it the namespace of our keys. Until then, new requests wait (a step).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

import msgspec
from vllm.v1.request import RequestStatus

from kvmkt_connector.compat import (
    CompatFingerprint,
    fingerprint_from_vllm_config,
    sharing_blockers,
)
from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.block_writes import ResetWatch
from kvmkt_connector.connector.exporter import ExportLedger
from kvmkt_connector.connector.holder_channel import HolderChannel, HolderRegistration
from kvmkt_connector.connector.importer import ImportPlanner
from kvmkt_connector.connector.kv_events import KvEventFeed
from kvmkt_connector.connector.lease_check import LeaseCheck
from kvmkt_connector.connector.metadata import (
    MarketplaceConnectorMetadata,
    MarketplaceHandshake,
    MarketplaceWorkerMetadata,
)
from kvmkt_connector.connector.neighbours import NeighbourCheck
from kvmkt_connector.connector.offer_view import holder_readable
from kvmkt_connector.connector.registry_link import RegistryLink
from kvmkt_connector.connector.stats_gate import StatsGate
from kvmkt_connector.hashing import BlockKeyer, KeyScope, PrefixKeys
from kvmkt_connector.logs import get_logger, trace, trace_gc
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.registry.paths import holder_dir, holder_file
from kvmkt_connector.transport.descriptors import (
    GenerationsDescriptor,
    HolderDescriptor,
    HostShmDescriptor,
    RankDescriptor,
)
from kvmkt_connector.transport.generations import GenerationTable

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = get_logger(__name__)
_NEIGHBOUR_CHECK_S = 10.0
# Workers answer the first step that asks for their layout; past this, stop waiting for
# them (a hung or foreign worker must not hold requests back) and serve without sharing.
_LAYOUT_WAIT_S = 30.0


def request_scope(request: Request) -> KeyScope | None:
    """What besides its tokens determines a request's KV; None: do not share it."""
    if request.mm_features or request.prompt_embeds is not None or request.pooling_params:
        return None  # multimodal/embedding inputs are not covered by token keys
    lora = request.lora_request
    if lora is None:
        return KeyScope(request.cache_salt)
    return KeyScope(request.cache_salt, lora.lora_name, lora.lora_path)


def _spec_blockers(kv_cache_config: Any) -> list[str]:
    """Only plain full attention: sliding-window groups hand back null blocks for
    out-of-window positions, MLA and others have pages of another shape."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    specs = [g.kv_cache_spec for g in kv_cache_config.kv_cache_groups]
    bad = [type(s).__name__ for s in specs if type(s) is not FullAttentionSpec
           or getattr(s, "sliding_window", None) or getattr(s, "attention_chunk_size", None)]
    return [f"KV cache spec {', '.join(bad)} (only plain full attention)"] if bad else []


class MarketplaceScheduler:
    def __init__(self, vllm_config: Any, cfg: MarketplaceConfig, kv_cache_config: Any) -> None:
        self._cfg = cfg
        role = vllm_config.kv_transfer_config.kv_role
        self._import = cfg.enable_import and role in ("kv_consumer", "kv_both")
        self._export = cfg.enable_export and role in ("kv_producer", "kv_both")
        self._block_size = vllm_config.cache_config.block_size
        self._world = vllm_config.parallel_config.world_size
        self._base_fp = fingerprint_from_vllm_config(vllm_config)
        self._blockers = sharing_blockers(self._base_fp, len(kv_cache_config.kv_cache_groups))
        self._blockers += _spec_blockers(kv_cache_config)
        if self._blockers:
            logger.warning("kvmkt: sharing disabled: %s", "; ".join(self._blockers))
        engine = vllm_config.kv_transfer_config.engine_id
        self._name = cfg.instance_name or f"{socket.gethostname()}:{os.getpid()}/{engine[:8]}"
        self.stats = MarketplaceStats()
        self._link = RegistryLink(cfg, self._name, self.stats)
        self._pool: BlockPool | None = None
        self._fp: CompatFingerprint | None = None
        self._namespace = b""
        self._keyer: BlockKeyer | None = None
        self._num_blocks = kv_cache_config.num_blocks
        self._leases = LeaseCheck(self._world)
        self._planner = ImportPlanner(cfg, self._block_size, self._link, self.stats,
                                      self._leases.usable)
        self._ledger: ExportLedger | None = None
        self._keys: dict[str, PrefixKeys] = {}
        self._load_reports: dict[int, tuple[int, bool]] = {}  # job -> (ranks, any failed)
        self._save_reports: dict[int, tuple[int, bool]] = {}  # job -> (ranks, any failed)
        self._neighbours = NeighbourCheck(self._link, self.stats, _NEIGHBOUR_CHECK_S)
        self._step_runs = True  # the last scheduled step computes tokens
        self._stats_gate = StatsGate()  # which step outputs may carry our stats
        ev = vllm_config.kv_events_config
        self._kv_events_on = bool(ev and ev.enable_kv_cache_events and cfg.kv_events_medium)
        self._events: KvEventFeed | None = None
        self._event_publisher: Any = None
        self._trace = os.environ.get("KVMKT_TRACE") == "1"
        trace_gc(logger)
        # Startup: workers' handshakes, collected from their worker metadata.
        self._awaiting_layout = not self._blockers and (self._import or self._export)
        self._layout_deadline: float | None = None
        self._handshakes: dict[int, MarketplaceHandshake] = {}
        # Allocated but not scheduled yet: under MultiConnector a sibling may be loading
        # them asynchronously; if such a request ends, its blocks hold unknown KV.
        self._not_run: set[str] = set()
        self._local_hits: dict[str, int] = {}  # request -> local prefix hit tokens, asked
        # Staged: requests allocated this step that we load nothing into -> (first block
        # past their local hits, their blocks from there); see _sibling_loads
        self._allocated: dict[str, tuple[int, list[int]]] = {}

    # ------------------------------------------------------------ startup

    def bind_gpu_block_pool(self, pool: BlockPool, event_publisher: Any = None) -> None:
        """``event_publisher``: vLLM's scheduler's KV event publisher (kv_events.py
        publishes through it while the engine is idle); None if it was not found."""
        self._pool = pool
        self._event_publisher = event_publisher

    def _layout_pending(self) -> bool:
        """Requests wait while the workers' layouts are on their way (the first step of
        the first request), so that this request can import and export as well."""
        if not self._awaiting_layout:
            return False
        now = time.monotonic()
        if self._layout_deadline is None:
            self._layout_deadline = now + _LAYOUT_WAIT_S
        elif now > self._layout_deadline:
            self._awaiting_layout = False
            self.stats.count("fallback_incompatible")
            logger.warning("kvmkt: sharing disabled: workers sent no KV layout in %.0f s "
                           "(ranks heard: %s)", _LAYOUT_WAIT_S, sorted(self._handshakes))
            return False
        return True

    def on_startup_handshakes(self, handshakes: dict[int, MarketplaceHandshake]) -> None:
        """vLLM's handshake channel (we are its only connector): layouts before any step."""
        self._on_handshakes(handshakes)

    def _on_handshakes(self, handshakes: dict[int, MarketplaceHandshake]) -> None:
        if not self._awaiting_layout:
            return
        self._handshakes.update(handshakes)
        if len(self._handshakes) >= self._world:
            self._awaiting_layout = False
            self.set_handshakes(self._handshakes)

    def set_handshakes(self, handshakes: dict[int, MarketplaceHandshake]) -> None:
        if self._blockers:
            return
        problems = [f"rank {r}: {h.problem}" for r, h in handshakes.items() if h.problem]
        layouts = {h.layout for h in handshakes.values()}
        if problems or len(handshakes) != self._world or None in layouts or len(layouts) != 1:
            why = "; ".join(problems) or f"workers reported layouts {layouts}"
            logger.warning("kvmkt: sharing disabled: %s", why)
            return
        layout = layouts.pop()
        self._planner.block_bytes = layout.page_bytes * layout.num_layers * self._world
        self._fp = self._base_fp.with_layout(layout)
        self._namespace = self._fp.digest()
        self._keyer = BlockKeyer(self._namespace, self._block_size)
        logger.info("kvmkt: namespace %s (%s)", self._namespace.hex()[:12], self._name)
        ranks = [handshakes[r] for r in range(self._world)]
        self._leases.transport = ranks[0].transport  # what our workers import with
        self._planner.verify_all_keys = ranks[0].transport != "cuda_ipc"
        if self._export and all(h.descriptor for h in ranks) and self._pool is not None:
            self._start_exporting(ranks)
        if self._kv_events_on and self._import:
            self._start_events()
        self._neighbours.start(self._fp, self._namespace)

    def _start_exporting(self, ranks: list[MarketplaceHandshake]) -> None:
        rank_desc = [msgspec.msgpack.decode(h.descriptor, type=RankDescriptor) for h in ranks]
        staged = all(isinstance(d, HostShmDescriptor) for d in rank_desc)
        cleanup = [d.path for d in rank_desc if isinstance(d, HostShmDescriptor)]
        gens = None
        if not staged:  # in place: importers check our blocks' generations
            # Unique per incarnation: importers cache tables by path, and a file left by a
            # crashed engine must not collide with a new one.
            path = holder_file(holder_dir(), os.getpid(), f"{secrets.token_hex(8)}-gen")
            gens = GenerationTable.create(path, self._num_blocks)
            cleanup.append(path)
        descriptor = HolderDescriptor(
            rank_desc, GenerationsDescriptor(gens.path, self._num_blocks) if gens else None
        )
        channel = HolderChannel(self._cfg, self._name, HolderRegistration(
            namespace=self._namespace,
            name=self._name,
            fingerprint=msgspec.msgpack.encode(self._fp),
            descriptor=descriptor.encode(),
            cleanup_paths=cleanup,
        ))
        self._link.holder = channel  # lookups skip our own exports
        slots = min(h.export_slots for h in ranks) if staged else None
        self._ledger = ExportLedger(
            self._cfg, self._block_size, channel, self.stats, self._pool, slots, gens
        )
        if gens is not None:
            self._planner.block_locations = gens.locations

    def _start_events(self) -> None:
        channel = self._link.holder
        own_bit = None if channel is None else (
            lambda: channel.holder_bit if channel.connected else None
        )  # fmt: skip
        transport, world = self._leases.transport, self._world
        resets = ResetWatch(self._pool).check if self._pool is not None else None
        self._events = KvEventFeed(
            self._cfg, self._name, self._namespace, self._block_size,
            lambda d: holder_readable(d, transport, world), own_bit, self._event_publisher,
            resets,
        )  # fmt: skip
        logger.info("kvmkt: KV events: announcing importable blocks as medium %r",
                    self._cfg.kv_events_medium)

    def take_events(self) -> list:
        return self._events.take_events() if self._events is not None else []

    # ------------------------------------------------------------ per request

    def _prefix_keys(self, request: Request, scope: KeyScope) -> PrefixKeys:
        keys = self._keys.get(request.request_id)
        if keys is None:
            assert self._keyer is not None
            keys = self._keys[request.request_id] = self._keyer.start(scope)
        return keys

    def get_num_new_matched_tokens(
        self, request: Request, num_local: int
    ) -> tuple[int | None, bool]:
        self._stats_gate.on_asked(request.request_id, request.num_tokens)
        self._local_hits[request.request_id] = num_local  # (see update_state_after_alloc)
        trace(logger, request.request_id, f"asked {num_local}")  # (local hits too)
        if self._layout_pending():
            return None, False  # "ask again next step" (vLLM keeps the request waiting)
        if not self._import or self._keyer is None or request.skip_reading_prefix_cache:
            return 0, False
        scope = request_scope(request)
        if scope is None:
            self.stats.count("fallback_incompatible")
            return 0, False
        keys = self._prefix_keys(request, scope)
        n = self._planner.match(request, keys, self._namespace, num_local)
        return n, n > 0  # always asynchronous: see importer.py

    def update_state_after_alloc(self, request: Request, block_ids: list[int], n_ext: int) -> None:
        self._not_run.add(request.request_id)
        # The blocks past its local prefix hits (others wrote those; a session re-admitted
        # with a new chunk, which vLLM asks us nothing about, computed them before) are
        # written before anything reads them: by our import (``dst``), by the step's forward
        # (the step's tick sees those too), or by a sibling connector's load under
        # MultiConnector, which vLLM reports to us nowhere else. So none of them is offered
        # from now on.
        done = self._local_hits.pop(request.request_id, request.num_computed_tokens)
        written = block_ids[done // self._block_size :]
        session = getattr(request, "resumable", False)
        if session and self._ledger is not None:
            self._ledger.on_session_allocated(request.request_id, written)
        dst = self._planner.on_alloc(request, block_ids, n_ext)
        if dst and (not written or written[0] != dst[0]):  # (both start past the local hits)
            written = list(dict.fromkeys([*dst, *written]))
        if written and self._ledger is not None:
            if self._ledger.staged and not dst:
                self._allocated[request.request_id] = (done // self._block_size, written)
            self._ledger.on_blocks_rewritten(written)
            if not session:
                self._ledger.on_blocks_given_anew(written)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> MarketplaceConnectorMetadata:
        if self._trace:
            trace(logger, "-", "meta-start")
        if self._not_run:
            scheduled = scheduler_output.num_scheduled_tokens
            self._not_run = {r for r in self._not_run if r not in scheduled}
        if self._allocated:
            self._sibling_loads(scheduler_output)
        if self._ledger is not None:
            self._ledger.tick(scheduler_output)
        self._leases.sweep()
        if self._neighbours.due():
            self._neighbours.check()
        saves = self._ledger.take_jobs() if self._ledger is not None else []
        self._step_runs = scheduler_output.total_num_scheduled_tokens > 0
        outputs = self._stats_gate.on_step(scheduler_output, self._step_runs)
        step, ack = (self._ledger.step, self._ledger.wants_ack()) if self._ledger else (0, False)
        loads = self._planner.take_jobs()
        if self._trace:  # not a loop over every step's requests unless asked for
            for req in scheduler_output.scheduled_new_reqs:
                trace(logger, req.req_id, f"scheduled {req.num_computed_tokens}")
            trace(logger, "-", f"step-meta tokens={scheduler_output.total_num_scheduled_tokens} "
                               f"loads={len(loads)}")
        return MarketplaceConnectorMetadata(
            loads=loads, saves=saves, idle_step=not self._step_runs, step=step, ack=ack,
            want_layout=self._awaiting_layout, outputs=outputs,
        )

    def _sibling_loads(self, out: SchedulerOutput) -> None:
        """Staged: blocks another connector loads into in this step (under MultiConnector):
        those of a request it parked for an asynchronous load, and those below what a
        request scheduled now counts as computed past its local hits (a synchronous load;
        one that ends inside a block writes that block too). Our saves must not copy them
        (``ExportLedger.drop_pending_saves``)."""
        allocated, self._allocated = self._allocated, {}
        computed = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        computed.update((rid, n) for rid, n in zip(cached.req_ids, cached.num_computed_tokens,
                                                   strict=True) if rid in cached.resumed_req_ids)
        loaded: list[int] = []
        for rid, (first, blocks) in allocated.items():
            n = computed.get(rid)
            loaded += blocks if n is None else blocks[: max(0, -(-n // self._block_size) - first)]
        if loaded and self._ledger is not None:
            self._ledger.drop_pending_saves(loaded)

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        meta = output.kv_connector_worker_meta
        if self._trace:
            trace(logger, "-", "step-output")
        if not isinstance(meta, MarketplaceWorkerMetadata):
            return
        if meta.handshakes:
            self._on_handshakes(meta.handshakes)
        # A job is over once every rank reported it; failed if any rank failed it.
        loads = self._over(self._load_reports, meta.loads_done, meta.loads_failed)
        self._planner.on_jobs_done(loads[False])
        self._planner.on_jobs_done(loads[True], failed=True)
        if self._ledger is not None and meta.acked_step >= 0:
            self._ledger.on_step_acked(meta.acked_step)
        if self._ledger is not None:
            saves = self._over(self._save_reports, meta.saves_done, meta.saves_failed)
            self._ledger.on_saves_done(saves[False])
            self._ledger.on_saves_done(saves[True], failed=True)

    def _over(self, reports: dict[int, tuple[int, bool]], done: dict[int, int],
              failed: dict[int, int]) -> dict[bool, list[int]]:
        """Jobs every rank has now reported, by whether any rank failed them (ranks may
        report one job in different steps)."""
        over: dict[bool, list[int]] = {False: [], True: []}
        for bad_now, counts in ((False, done), (True, failed)):
            for job_id, n in counts.items():
                seen, bad = reports.pop(job_id, (0, False))
                seen, bad = seen + n, bad or bad_now
                if seen >= self._world:
                    over[bad].append(job_id)
                else:
                    reports[job_id] = (seen, bad)
        return over

    def request_finished(self, request: Request, block_ids: list[int]) -> dict[str, Any] | None:
        # A request aborted while its import (ours, or a sibling connector's) is still
        # being copied: its blocks do not hold known KV yet, so they are not exported.
        unsure = self._planner.has_pending_load(request.request_id)
        if request.request_id in self._not_run:
            self._not_run.discard(request.request_id)
            unsure = True
        imported, known = self._planner.on_request_finished(request.request_id)
        self._stats_gate.on_request_finished(
            request.request_id, request.status == RequestStatus.FINISHED_ABORTED)
        keys = self._keys.pop(request.request_id, None)
        self._local_hits.pop(request.request_id, None)
        # (Unconditionally: vLLM turns ``resumable`` off on some errors.)
        if self._ledger is not None:
            self._ledger.on_session_finished(request.request_id)
        if self._ledger is not None and self._keyer is not None and block_ids and not unsure:
            scope = request_scope(request)
            if scope is not None:
                if keys is None:
                    keys = self._keyer.start(scope)
                # Token ids alone (what routers key by) determine only unscoped KV.
                self._ledger.on_request_finished_later(request, block_ids, keys,
                                                       scope == KeyScope(), known)
        if self._keyer is None:
            return None
        return {"kvmkt": {"imported_tokens": imported}}

    # ------------------------------------------------------------ lifecycle

    def take_stats(self) -> MarketplaceStats | None:
        """Called once per processed step output, oldest first (see ``StatsGate``)."""
        return self.stats.take() if self._stats_gate.on_output() else None

    def has_pending_exports(self) -> bool:
        return (self._ledger is not None and self._ledger.has_pending()) or (
            self._events is not None and self._events.has_pending()
        )

    def reset_cache(self) -> bool:
        """vLLM calls this for reset_prefix_cache(reset_connector=True), which is what RL
        frameworks do after updating weights in place. The fingerprint cannot see such an
        update, so from now on this instance neither imports nor exports: its KV and its
        neighbours' may no longer be interchangeable."""
        if self._import or self._export:
            logger.warning("kvmkt: connector cache reset (weights may have changed): this "
                           "instance stops sharing KV until it restarts")
        self._import = self._export = False
        if self._ledger is not None:
            self._ledger.stop_exporting()
        if self._events is not None:
            self._events.stop_announcing()
        return True

    def shutdown(self) -> None:
        if self._events is not None:
            self._events.shutdown()
        self._planner.shutdown()
        if self._ledger is not None:
            self._ledger.shutdown()
        self._leases.close()
        self._link.close()

