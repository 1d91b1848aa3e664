"""Messages between the scheduler-side and worker-side halves of the connector.

Scheduler -> workers, every step: ``MarketplaceConnectorMetadata`` (pickled by vLLM).
Workers -> scheduler, every step: ``MarketplaceWorkerMetadata`` (summed across TP ranks).
Workers -> scheduler, once at startup: ``MarketplaceHandshake`` (vLLM's handshake channel).

Jobs carry ids so completion can be counted per rank: a job is done when every rank says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import msgspec
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from kvmkt_connector.compat import KVLayoutSpec


class LoadJob(msgspec.Struct, frozen=True):
    """Copy a holder's pages into our blocks, before this step's forward reads them."""

    job_id: int
    holder_id: int
    descriptor: bytes  # HolderDescriptor of the holder (opaque here)
    src: list[int]  # holder's locations, one per block
    dst: list[int]  # our block ids, same order
    keys: list[bytes]  # block keys, for transports that can verify what they read
    fault: str | None = None  # "lease_lost", or a test fault: "zero" | "first_page"


class SaveJob(msgspec.Struct, frozen=True):
    """Copy our (pinned) blocks into export slots so other instances can read them."""

    job_id: int
    src: list[int]  # our block ids
    dst: list[int]  # export slots
    keys: list[bytes]


@dataclass
class MarketplaceConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
    # Holders to probe: workers open their pages (IPC handles, shm region) and say whether
    # they can. Imports only come from holders every worker could open, because a failed
    # synchronous load is the one path vLLM 0.26 does not recover from reliably.
    probes: list[bytes] = field(default_factory=list)  # HolderDescriptor blobs


@dataclass
class MarketplaceWorkerMetadata(KVConnectorWorkerMetadata):
    """Job ids each rank finished this step, with how many ranks did (summed on aggregate)."""

    loads_done: dict[int, int] = field(default_factory=dict)
    saves_done: dict[int, int] = field(default_factory=dict)
    saves_failed: dict[int, int] = field(default_factory=dict)
    probes_ok: dict[bytes, int] = field(default_factory=dict)  # descriptor digest -> ranks
    probes_failed: dict[bytes, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> MarketplaceWorkerMetadata:
        assert isinstance(other, MarketplaceWorkerMetadata)
        out = MarketplaceWorkerMetadata(
            dict(self.loads_done), dict(self.saves_done), dict(self.saves_failed),
            dict(self.probes_ok), dict(self.probes_failed),
        )
        for mine, theirs in (
            (out.loads_done, other.loads_done),
            (out.saves_done, other.saves_done),
            (out.saves_failed, other.saves_failed),
            (out.probes_ok, other.probes_ok),
            (out.probes_failed, other.probes_failed),
        ):
            for job_id, count in theirs.items():
                mine[job_id] = mine.get(job_id, 0) + count
        return out


def descriptor_digest(descriptor: bytes) -> bytes:
    return hashlib.sha256(descriptor).digest()[:16]


@dataclass
class MarketplaceHandshake(KVConnectorHandshakeMetadata):
    """What a worker tells the scheduler once its KV cache is registered."""

    tp_rank: int
    layout: KVLayoutSpec | None  # None: this worker cannot share (see ``problem``)
    descriptor: bytes | None  # msgpack RankDescriptor of our pages, when exporting
    export_slots: int  # host_shm: slots in our export region; 0 otherwise
    transport: str  # "host_shm" | "cuda_ipc" | ""
    problem: str = ""
