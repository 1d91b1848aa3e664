"""Scheduler side: wires the registry link, the import planner and the export ledger.

Nothing is shared until every worker has reported its KV layout (handshake): only then is
the compatibility fingerprint complete, and with it the namespace of our keys.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

import msgspec

from kvmkt_connector.compat import (
    CompatFingerprint,
    fingerprint_from_vllm_config,
    sharing_blockers,
)
from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.exporter import ExportLedger
from kvmkt_connector.connector.holder_channel import HolderChannel, HolderRegistration
from kvmkt_connector.connector.importer import ImportPlanner
from kvmkt_connector.connector.metadata import (
    MarketplaceConnectorMetadata,
    MarketplaceHandshake,
    MarketplaceWorkerMetadata,
    descriptor_digest,
)
from kvmkt_connector.connector.registry_link import RegistryLink
from kvmkt_connector.hashing import BlockKeyer, KeyScope, PrefixKeys
from kvmkt_connector.logs import get_logger
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.transport.descriptors import (
    HolderDescriptor,
    HostShmDescriptor,
    RankDescriptor,
)

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = get_logger(__name__)
_NEIGHBOUR_CHECK_S = 10.0


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
        self._planner = ImportPlanner(cfg, self._block_size, self._link, self.stats, self._can_read)
        self._readable: dict[bytes, bool | None] = {}  # descriptor digest -> probe result
        self._probes: list[bytes] = []
        self._probe_ok: dict[bytes, int] = {}
        self._ledger: ExportLedger | None = None
        self._keys: dict[str, PrefixKeys] = {}
        self._transport = ""  # what our workers import with (from their handshake)
        self._job_counts: dict[tuple[str, int], int] = {}
        self._warned_holders: set[int] = set()
        self._next_neighbour_check = 0.0

    # ------------------------------------------------------------ startup

    def bind_gpu_block_pool(self, pool: BlockPool) -> None:
        self._pool = pool

    def set_handshakes(self, handshakes: dict[int, MarketplaceHandshake]) -> None:
        if self._blockers:
            return
        problems = [f"rank {r}: {h.problem}" for r, h in handshakes.items() if h.problem]
        layouts = {h.layout for h in handshakes.values()}
        if problems or len(handshakes) != self._world or None in layouts or len(layouts) != 1:
            why = "; ".join(problems) or f"workers reported layouts {layouts}"
            logger.warning("kvmkt: sharing disabled: %s", why)
            return
        self._fp = self._base_fp.with_layout(layouts.pop())
        self._namespace = self._fp.digest()
        self._keyer = BlockKeyer(self._namespace, self._block_size)
        logger.info("kvmkt: namespace %s (%s)", self._namespace.hex()[:12], self._name)
        ranks = [handshakes[r] for r in range(self._world)]
        self._transport = ranks[0].transport
        if self._export and all(h.descriptor for h in ranks) and self._pool is not None:
            rank_desc = [msgspec.msgpack.decode(h.descriptor, type=RankDescriptor) for h in ranks]
            staged = all(isinstance(d, HostShmDescriptor) for d in rank_desc)
            channel = HolderChannel(self._cfg, self._name, HolderRegistration(
                namespace=self._namespace,
                name=self._name,
                fingerprint=msgspec.msgpack.encode(self._fp),
                descriptor=HolderDescriptor(rank_desc).encode(),
                cleanup_paths=[d.path for d in rank_desc if isinstance(d, HostShmDescriptor)],
            ))
            self._link.holder = channel  # lookups skip our own exports
            slots = min(h.export_slots for h in ranks) if staged else None
            self._ledger = ExportLedger(
                self._cfg, self._block_size, channel, self.stats, self._pool, slots
            )
        self._check_neighbours()

    def _check_neighbours(self) -> None:
        """Say once per holder why we do not share with it (the user's first question)."""
        self._next_neighbour_check = time.monotonic() + _NEIGHBOUR_CHECK_S
        holders = self._link.call(lambda c: c.list_holders())
        for h in holders or ():
            if h.namespace == self._namespace or h.holder_id in self._warned_holders:
                continue
            self._warned_holders.add(h.holder_id)
            self.stats.count("fallback_incompatible")
            try:
                theirs = msgspec.msgpack.decode(h.fingerprint, type=CompatFingerprint)
                diff = self._fp.describe_differences(theirs) if self._fp else "?"
            except msgspec.DecodeError:
                diff = "an unreadable fingerprint (other kvmkt version?)"
            logger.warning(
                "kvmkt: not sharing KV with %s (pid %d): not interchangeable: %s",
                h.name, h.pid, diff,
            )

    # ------------------------------------------------------------ per request

    def _prefix_keys(self, request: Request, scope: KeyScope) -> PrefixKeys:
        keys = self._keys.get(request.request_id)
        if keys is None:
            assert self._keyer is not None
            keys = self._keys[request.request_id] = self._keyer.start(scope)
        return keys

    def get_num_new_matched_tokens(self, request: Request, num_local: int) -> tuple[int, bool]:
        if not self._import or self._keyer is None or request.skip_reading_prefix_cache:
            return 0, False
        scope = request_scope(request)
        if scope is None:
            self.stats.count("fallback_incompatible")
            return 0, False
        keys = self._prefix_keys(request, scope)
        return self._planner.match(request, keys, self._namespace, num_local), False

    def update_state_after_alloc(self, request: Request, block_ids: list[int], n_ext: int) -> None:
        self._planner.on_alloc(request, block_ids, n_ext)

    def build_connector_meta(self) -> MarketplaceConnectorMetadata:
        if self._ledger is not None:
            self._ledger.tick()
        if self._fp is not None and time.monotonic() >= self._next_neighbour_check:
            self._check_neighbours()
        saves = self._ledger.take_jobs() if self._ledger is not None else []
        probes, self._probes = self._probes, []
        return MarketplaceConnectorMetadata(
            loads=self._planner.take_jobs(), saves=saves, probes=probes
        )

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        meta = output.kv_connector_worker_meta
        if isinstance(meta, MarketplaceWorkerMetadata):
            self._planner.on_jobs_done(self._complete("load", meta.loads_done))
            if self._ledger is not None:
                self._ledger.on_saves_done(self._complete("save", meta.saves_done))
                self._ledger.on_saves_done(self._complete("save", meta.saves_failed), failed=True)
            for digest in meta.probes_failed:
                self._readable[digest] = False  # one worker that cannot read is enough
            for digest, ranks in meta.probes_ok.items():
                self._probe_ok[digest] = self._probe_ok.get(digest, 0) + ranks
                if self._probe_ok[digest] >= self._world and self._readable.get(digest) is None:
                    self._readable[digest] = True
        if output.invalid_block_ids:
            self.stats.count("fallback_load_error", len(output.invalid_block_ids))
            # vLLM's "recompute" policy keeps the blocks cached while it recomputes them;
            # make sure no other request reads them from the prefix cache meanwhile.
            if self._pool is not None:
                self._pool.evict_blocks(set(output.invalid_block_ids))

    def _complete(self, kind: str, counts: dict[int, int]) -> list[int]:
        """Job ids every worker has now reported for ``kind``."""
        done = []
        for job_id, n in counts.items():
            total = self._job_counts.pop((kind, job_id), 0) + n
            if total >= self._world:
                done.append(job_id)
            else:
                self._job_counts[(kind, job_id)] = total
        return done

    def _can_read(self, descriptor: bytes) -> bool:
        """Whether every worker has shown it can read this holder's pages.

        A holder seen for the first time is probed (the workers open its IPC handles or
        shm region in the next step) and not imported from until all of them could: a
        synchronous load that fails is the path vLLM 0.26 does not recover from reliably
        (vLLM issue #49250), so imports must not be the way to find out."""
        digest = descriptor_digest(descriptor)
        if digest in self._readable:
            return bool(self._readable[digest])  # None while the probe runs
        try:
            ranks = HolderDescriptor.decode(descriptor).ranks
        except msgspec.DecodeError:
            ranks = []
        kinds = {type(d).__name__ for d in ranks}
        want = {"cuda_ipc": "CudaIpcDescriptor", "host_shm": "HostShmDescriptor"}
        if len(ranks) != self._world or kinds != {want.get(self._transport, "")}:
            self._readable[digest] = False
            return False
        if len(self._readable) > 1024:  # holders come and go: forget old answers
            self._readable.clear()
        self._readable[digest] = None
        self._probes.append(descriptor)
        return False

    def request_finished(self, request: Request, block_ids: list[int]) -> dict[str, Any] | None:
        # An aborted request may finish before the copy into its blocks was confirmed:
        # then its blocks are not known to hold the right KV yet, so they are not exported.
        unsure = self._planner.has_pending_load(request.request_id) and (
            request.status.name not in ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED")
        )
        imported = self._planner.on_request_finished(request.request_id)
        keys = self._keys.pop(request.request_id, None)
        if self._ledger is not None and self._keyer is not None and block_ids and not unsure:
            scope = request_scope(request)
            if scope is not None:
                if keys is None:
                    keys = self._keyer.start(scope)
                self._ledger.on_request_finished(request, block_ids, keys)
        if self._keyer is None:
            return None
        return {"kvmkt": {"imported_tokens": imported}}

    # ------------------------------------------------------------ lifecycle

    def take_stats(self) -> MarketplaceStats | None:
        return self.stats.take()

    def has_pending_exports(self) -> bool:
        return self._ledger is not None and self._ledger.has_pending()

    def reset_cache(self) -> bool:
        """vLLM calls this for reset_prefix_cache(reset_connector=True), which is what RL
        frameworks do after updating weights in place. The fingerprint cannot see such an
        update, so from now on this instance neither imports nor exports: its KV and its
        neighbours' may no longer be interchangeable."""
        if self._import or self._export:
            logger.warning("kvmkt: connector cache reset (weights may have changed): this "
                           "instance stops sharing KV until it restarts")
        self._import = False
        if self._ledger is None:
            return True
        self._export = False
        done = self._ledger.withdraw_all()
        self._ledger.stop_exporting()
        return done

    def shutdown(self) -> None:
        self._planner.shutdown()
        if self._ledger is not None:
            self._ledger.shutdown()
        self._link.close()
