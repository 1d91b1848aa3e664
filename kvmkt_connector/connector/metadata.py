"""Messages between the scheduler-side and worker-side halves of the connector.

Scheduler -> workers, every step: ``MarketplaceConnectorMetadata`` (pickled by vLLM).
Workers -> scheduler, every step: ``MarketplaceWorkerMetadata`` (summed across TP ranks).
Workers -> scheduler, at startup: ``MarketplaceHandshake``. Alone, through vLLM's handshake
channel; under MultiConnector (whose channel carries only the first child's handshake, to
every child) inside the worker metadata of the steps whose scheduler metadata asks for it.

Jobs carry ids so completion can be counted per rank: a job is done when every rank says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from kvmkt_connector.compat import KVLayoutSpec


class LoadJob(msgspec.Struct, frozen=True):
    """Copy a holder's pages into the blocks of a request parked in WAITING_FOR_REMOTE_KVS.

    Every worker reports the request in ``get_finished`` once its copy is over, whether it
    succeeded or failed (failed blocks through ``get_block_ids_with_load_errors`` in the
    same step); vLLM frees or schedules the request only then."""

    job_id: int
    request_id: str
    holder_id: int
    descriptor: bytes  # HolderDescriptor of the holder (opaque here)
    src: list[int]  # holder's locations, one per block
    dst: list[int]  # our block ids, same order
    keys: list[bytes]  # block keys, for transports that can verify what they read
    fault: str | None = None  # test faults only, see importer.FAULTS
    stall_s: float = 0.0  # test fault "stall*": issue the copy this much later
    fault_rank: int = -1  # the test fault hits this TP rank only (-1: every rank)


class SaveJob(msgspec.Struct, frozen=True):
    """Copy our blocks into export slots (before this step's forward may rewrite them)."""

    job_id: int
    src: list[int]  # our block ids
    dst: list[int]  # export slots
    keys: list[bytes]


@dataclass
class MarketplaceConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
    # The step runs no forward: workers may as well wait for this step's copies, so their
    # requests are reported (and scheduled) a step earlier.
    idle_step: bool = False
    step: int = 0  # this step's sequence number (scheduler side)
    ack: bool = False  # workers echo ``step`` back: the exporter waits for steps to end
    want_layout: bool = False  # workers send their MarketplaceHandshake (startup)
    outputs: bool = True  # the step outputs for some request: stats may go out with it


@dataclass
class MarketplaceHandshake:
    """What a worker tells the scheduler once its KV cache is registered."""

    tp_rank: int
    layout: KVLayoutSpec | None  # None: this worker cannot share (see ``problem``)
    descriptor: bytes | None  # msgpack RankDescriptor of our pages, when exporting
    export_slots: int  # host_shm: slots in our export region; 0 otherwise
    transport: str  # "host_shm" | "cuda_ipc" | ""
    problem: str = ""


@dataclass
class MarketplaceWorkerMetadata(KVConnectorWorkerMetadata):
    """Job ids each rank finished this step, with how many ranks did (summed on aggregate)."""

    loads_done: dict[int, int] = field(default_factory=dict)
    loads_failed: dict[int, int] = field(default_factory=dict)
    saves_done: dict[int, int] = field(default_factory=dict)
    saves_failed: dict[int, int] = field(default_factory=dict)
    acked_step: int = -1  # the step this output ends, when the scheduler asked (-1: not)
    handshakes: dict[int, MarketplaceHandshake] = field(default_factory=dict)  # by TP rank

    def __bool__(self) -> bool:
        return bool(self.loads_done or self.loads_failed or self.saves_done or self.saves_failed
                    or self.acked_step >= 0 or self.handshakes)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> MarketplaceWorkerMetadata:
        assert isinstance(other, MarketplaceWorkerMetadata)
        acks = [s for s in (self.acked_step, other.acked_step) if s >= 0]
        out = MarketplaceWorkerMetadata(
            dict(self.loads_done), dict(self.loads_failed), dict(self.saves_done),
            dict(self.saves_failed), min(acks) if acks else -1,
            {**self.handshakes, **other.handshakes},
        )
        for mine, theirs in (
            (out.loads_done, other.loads_done),
            (out.loads_failed, other.loads_failed),
            (out.saves_done, other.saves_done),
            (out.saves_failed, other.saves_failed),
        ):
            for job_id, count in theirs.items():
                mine[job_id] = mine.get(job_id, 0) + count
        return out
