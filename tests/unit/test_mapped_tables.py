"""``MappedTables`` (the scheduler's and the workers' cache of neighbours' generation tables):
a table whose file is gone is dropped at the first sweep after the interval, and unmapped."""

from __future__ import annotations

import gc
import time

import pytest

from kvmkt_connector.transport.descriptors import TransferError
from kvmkt_connector.transport.generations import GenerationTable, MappedTables


def _mapped(path: str) -> bool:
    """Whether this process maps ``path`` (also once unlinked: '<path> (deleted)')."""
    with open("/proc/self/maps") as f:
        return any(path in line for line in f)


def test_a_table_whose_file_went_is_dropped_after_the_interval(tmp_path) -> None:
    path = str(tmp_path / "kvmkt-gen")
    exporter = GenerationTable.create(path, 64)
    exporter.bump([3])
    tables = MappedTables(interval_s=1.0)
    t0 = time.monotonic()
    assert tables.get(path, 64).unchanged_prefix(exporter.locations([3, 4])) == 2
    assert tables.sweep(t0) == [] and path in tables  # the file is there: kept

    exporter.close()  # unlinks the file, as the registry does for a dead holder
    assert _mapped(path)  # by us alone now
    assert tables.sweep(t0 + 0.5) == [] and path in tables  # not looked at again yet
    assert tables.sweep(t0 + 1.0) == [path] and path not in tables and len(tables) == 0
    gc.collect()
    assert not _mapped(path)
    with pytest.raises(TransferError):  # a lease naming it again cannot map it
        tables.get(path, 64)


def test_at_most_limit_tables_oldest_first(tmp_path) -> None:
    paths = [str(tmp_path / f"gen-{i}") for i in range(3)]
    owners = [GenerationTable.create(p, 8) for p in paths]
    tables = MappedTables(limit=2)
    for p in paths:
        tables.get(p, 8)
    assert paths[0] not in tables and paths[1] in tables and paths[2] in tables
    assert len(tables) == 2
    tables.close()
    for owner in owners:
        owner.close()
