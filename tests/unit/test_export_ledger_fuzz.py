"""ExportLedger's bookkeeping under random finishes, rewrites (with duplicate and unlisted
block ids), registry releases (stale and current), failed and repeated staging reports and
withdraw_all: no slot freed twice, key -> index the inverse of what is listed, each location
unpublished at most once and only when forgotten, nothing stale listed, every forgotten entry
counted once. vLLM's real BlockPool and Request; the channel records what the ledger sends
(the registry side is test_export_ledger.py's, with a real registry process)."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from vllm.v1.core.block_pool import BlockPool

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.exporter import ExportLedger
from kvmkt_connector.hashing import BlockKeyer, KeyScope
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.transport.generations import GenerationTable, decode_locations
from tests.unit.test_export_ledger import _request

BS = 4
NBLOCKS = 24
NSLOTS = 10


class RecordingChannel:
    def __init__(self) -> None:
        self.generation = 0
        self.ops: list[tuple] = []
        self.events: list = []

    def watch_resets(self, epoch) -> None:
        pass

    def publish(self, keys, locations, epoch=0, tokens=None, parents=None) -> None:
        self.ops.append(("publish", list(keys), list(locations)))

    def reclaim(self, count) -> None:
        self.ops.append(("reclaim", count))

    def unpublish(self, locations) -> None:
        self.ops.append(("unpublish", list(locations)))

    def take_events(self):
        ev, self.events = self.events, []
        return ev

    def close(self) -> None:
        pass


def _idle():
    return SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=SimpleNamespace(
        req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set()))


def _rewrite(blocks):
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(block_ids=(blocks,), num_computed_tokens=0)],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[],
                                              num_computed_tokens=[], resumed_req_ids=set()),
        new_block_ids_to_zero=list(blocks[:2]))  # overlaps: duplicates on purpose


def _check(ledger: ExportLedger, nslots: int) -> None:
    listed, index_of = ledger._listed, ledger._index_of
    assert {k: i for i, (k, _) in listed.items()} == index_of
    for i, (_, loc) in listed.items():
        assert int(decode_locations([loc])[0][0]) == i
    if ledger.staged:
        free = ledger._free_slots
        assert len(free) == len(set(free)), f"slot freed twice: {Counter(free).most_common(3)}"
        assert not set(free) & set(listed)
        assert sorted(free + list(listed)) == list(range(nslots))
    else:
        assert not ledger._free_slots


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_random_ops_keep_the_ledger_consistent(tmp_path, staged, seed):
    rng = random.Random(seed)
    ch = RecordingChannel()
    pool = BlockPool(num_gpu_blocks=NBLOCKS, enable_caching=True, hash_block_size=BS)
    gens = None if staged else GenerationTable.create(str(tmp_path / "gen"), NBLOCKS)
    stats = MarketplaceStats()
    cfg = MarketplaceConfig(registry_autostart=False)
    ledger = ExportLedger(cfg, BS, ch, stats, pool, NSLOTS if staged else None, gens)
    keyer = BlockKeyer(b"N" * 16, BS)
    forgotten = 0  # entries that left _listed, counted by the model

    for step in range(150):
        before = dict(ledger._listed)
        unpub_before = len(ch.ops)
        op = rng.random()
        if op < 0.35:  # a request finishes
            n = rng.randint(1, 6)
            toks = [rng.randrange(3, 6) for _ in range(n * BS + 1)]  # few distinct: key reuse
            req = _request(f"r{step}", toks)
            blocks = rng.sample(range(1, NBLOCKS), n)
            ledger.on_request_finished(req, blocks, keyer.start(KeyScope()),
                                       describe=rng.random() < 0.5)
        elif op < 0.55 and not staged:  # vLLM rewrites blocks (duplicates, unlisted ones)
            ids = [rng.randrange(1, NBLOCKS) for _ in range(rng.randint(1, 12))]
            g0 = ledger._gens.generations.copy()
            ledger.tick(_rewrite(ids))
            g1 = ledger._gens.generations
            for b in set(ids) | set(ids[:2]):
                assert g1[b] == (g0[b] + 1) & ((1 << 31) - 1)  # exactly one bump per step
        elif op < 0.7:  # the registry releases some locations: current and stale ones
            staging = ledger._staging_slots()  # (never published: the registry cannot release them)
            pub = [loc for i, (_, loc) in before.items() if i not in staging]
            locs = rng.sample(pub, min(3, len(pub)))
            locs += [loc + (5 << 32) for loc in locs[:1]]  # stale generation
            locs += locs[:1]  # the same twice
            ch.events.append(SimpleNamespace(kind="released", locations=locs, generation=0))
            ledger.tick(_idle())
        elif op < 0.85 and staged:  # workers finish staging jobs, some fail
            jobs = ledger.take_jobs()
            ids = [j.job_id for j in jobs] + list(ledger._staging)
            rng.shuffle(ids)
            ledger.on_saves_done(ids[: len(ids) // 2 + 1], failed=rng.random() < 0.3)
            ledger.on_saves_done(ids[: len(ids) // 2 + 1])  # reported again: no effect
        elif op < 0.9:
            staging = ledger._staging_slots()
            ledger.withdraw_all()
            assert set(ledger._listed) == set(before) & staging  # staging slots stay
        else:
            ledger.tick(_idle())
            ledger.on_step_acked(ledger.step)
        gone = set(before) - set(ledger._listed)
        # entries whose index stayed but whose key changed also left
        gone |= {i for i in set(before) & set(ledger._listed) if before[i] != ledger._listed[i]}
        forgotten += len(gone)
        new_unpub = [loc for o in ch.ops[unpub_before:] if o[0] == "unpublish" for loc in o[1]]
        assert len(new_unpub) == len(set(new_unpub)), "a location unpublished twice in a step"
        assert set(new_unpub) <= {before[i][1] for i in gone}, (op, step, before, ledger._listed)
        if not staged:
            for _, loc in ledger._listed.values():  # nothing listed is stale
                assert ledger._gens.unchanged_prefix([loc]) == 1
        _check(ledger, NSLOTS)
        assert stats.data["c"].get("released_blocks", 0) == forgotten
    if gens is not None:
        gens.close()


def test_bump_with_duplicates_bumps_once_and_invalidates(tmp_path):
    g = GenerationTable.create(str(tmp_path / "g"), 8)
    loc = g.locations([3, 5])
    g.bump([3, 3, 3, 5, 5])
    assert g.generations.tolist() == [0, 0, 0, 1, 0, 1, 0, 0]
    assert g.unchanged_prefix(loc) == 0 and g.unchanged_prefix(loc[1:]) == 0
    g.bump(np.array([5, 5], dtype=np.int64))
    assert g.generations[5] == 2
    g.generations[3] = (1 << 31) - 1  # wrap stays in 31 bits
    g.bump([3, 3])
    assert g.generations[3] == 0
    g.close()
