"""Scheduler side, importing: how much of a lease can our workers still read.

A lease names a holder (its descriptor) and the locations of the leased pages. Before any
copy is planned, the importer asks how many leading pages are still the published ones: for
a holder exporting in place, those whose block generations have not moved since the
lookup (the workers check again after the copy); for staged slots, all of them (their keys
are checked when copied). A holder our workers cannot read at all (another transport, other
ranks) gets None.
"""

from __future__ import annotations

import msgspec

from kvmkt_connector.logs import get_logger
from kvmkt_connector.transport.descriptors import (
    CudaIpcDescriptor,
    HolderDescriptor,
    HostShmDescriptor,
    TransferError,
)
from kvmkt_connector.transport.generations import MappedTables

logger = get_logger(__name__)
_MAX_HOLDERS = 16  # holders' decoded descriptors and generation tables kept open
_TRANSPORT_OF = {"cuda_ipc": CudaIpcDescriptor, "host_shm": HostShmDescriptor}


class LeaseCheck:
    def __init__(self, world: int) -> None:
        self._world = world
        self.transport = ""  # what our workers import with (from their handshake)
        self._tables = MappedTables(_MAX_HOLDERS)  # holders' generations
        self._holders: dict[bytes, HolderDescriptor] = {}  # decoded descriptors, by blob

    def usable(self, descriptor: bytes, locations: list[int]) -> int | None:
        """How many leading leased pages of that holder are still the published ones;
        None if our workers cannot read that holder at all (another transport)."""
        holder = self._holders.get(descriptor)
        if holder is None:
            try:
                holder = HolderDescriptor.decode(descriptor)
            except msgspec.DecodeError:
                return None
            while len(self._holders) >= _MAX_HOLDERS:
                self._holders.pop(next(iter(self._holders)))
            self._holders[descriptor] = holder
        want = _TRANSPORT_OF.get(self.transport)
        if len(holder.ranks) != self._world or any(type(d) is not want for d in holder.ranks):
            return None
        if holder.generations is None:
            return len(locations)  # staged slots: their keys are checked when copied
        try:
            table = self._tables.get(holder.generations.path, holder.generations.num_blocks)
        except TransferError as e:
            logger.info("kvmkt: holder pages unreachable: %s", e)
            return None
        return table.unchanged_prefix(locations)

    def sweep(self) -> None:
        """Let go of tables of holders that went (at most once a second)."""
        self._tables.sweep()

    def close(self) -> None:
        self._tables.close()
