"""Review of 8e668ec: ExportLedger._forget now filters the popped entries by truth value
(``filter(None, ...)``) and frees staged slots by ``itertools.compress(indices, popped)``.
Corner cases against the code of 283e1df: entries that look falsy (key b"", location 0),
an index listed several times, indices not listed, index containers other than lists."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.exporter import ExportLedger
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.transport.generations import GenerationTable
from tests.unit.test_review_ledger_differential import Channel, OldLedger


def _pair(tmp_path, staged: bool, n: int = 16):
    out = []
    for name, cls in (("new", ExportLedger), ("old", OldLedger)):
        pool = SimpleNamespace(cached_block_hash_to_block={})
        gens = None if staged else GenerationTable.create(str(tmp_path / f"g-{name}"), n)
        out.append(cls(MarketplaceConfig(registry_autostart=False), 4, Channel(False),
                       MarketplaceStats(), pool, n if staged else None, gens))
    return out


def _fill(ledger: ExportLedger, entries: dict[int, tuple[bytes, int]]) -> None:
    if ledger.staged:
        for i in entries:
            ledger._free_slots.remove(i)
    for i, (k, loc) in entries.items():
        ledger._listed[i] = (k, loc)
        ledger._index_of[k] = i


def _snap(ledger: ExportLedger):
    return (list(ledger._listed.items()), list(ledger._index_of.items()),
            list(ledger._free_slots), ledger._stats.data["c"])


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("container", [list, tuple, range, np.asarray])
def test_falsy_looking_entries_and_repeats(tmp_path, staged, container):
    new, old = _pair(tmp_path, staged)
    entries = {0: (b"", 0), 1: (b"\x00" * 16, 1), 5: (b"k5", 5 | (3 << 32)), 9: (b"k9", 9)}
    for ledger in (new, old):
        _fill(ledger, entries)
    idx = range(0, 6) if container is range else container([0, 0, 3, 1, 5, 5, 0, 7])
    got, want = new._forget(idx), old._forget(idx)
    assert got == want
    assert sorted(got) == sorted(
        loc for i, (_, loc) in entries.items() if i in set(int(x) for x in idx))
    assert _snap(new) == _snap(old)
    if staged:
        free = new._free_slots
        assert len(free) == len(set(free)) == 16 - 1  # only 9 still listed; none freed twice
    assert new._forget(idx) == [] and _snap(new) == _snap(old)  # again: nothing left


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("seed", range(200))
def test_random_forget_same_as_283e1df(tmp_path, staged, seed):
    rng = random.Random(seed)
    n = 16
    new, old = _pair(tmp_path, staged, n)
    listed = rng.sample(range(n), rng.randint(0, n))
    entries = {i: (rng.choice([b"", bytes([i]) * 16, b"\x00"]) if rng.random() < 0.3
                   else bytes([i]) * 16, rng.choice([0, i, i | (rng.randrange(1, 9) << 32)]))
               for i in listed}
    # (keys must be unique per index for _index_of to be the inverse)
    seen = set()
    for i in list(entries):
        if entries[i][0] in seen:
            entries[i] = (bytes([i]) * 16 + b"u", entries[i][1])
        seen.add(entries[i][0])
    for ledger in (new, old):
        _fill(ledger, entries)
    for _ in range(4):
        idx = [rng.randrange(n + 4) for _ in range(rng.randint(0, 20))]
        idx += idx[: rng.randint(0, 4)]
        rng.shuffle(idx)
        assert new._forget(list(idx)) == old._forget(list(idx))
        assert _snap(new) == _snap(old)
        if staged:
            assert len(new._free_slots) == len(set(new._free_slots))
            assert sorted(new._free_slots + list(new._listed)) == list(range(n))
