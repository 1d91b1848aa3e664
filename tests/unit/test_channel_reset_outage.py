"""The holder channel and the export ledger around prefix-cache resets and registry restarts
(session 10's second review; every test here failed before the fixes of session 11). None
of these published a wrong page: pages went unoffered, or staged slots leaked.

Found while reviewing 391c50e, NOT caused by it (HolderChannel predates both commits):
a prefix-cache reset while the registry is unreachable. The channel's thread checks for
resets (``_check_reset``) once per loop, then waits out a failed connect (up to 0.2 s) and
parks what was queued meanwhile (``_park_queued`` -> ``_not_done``), keeping a publish only
if its epoch equals the channel's. When the ledger noticed the reset first (its step ran
during that wait), its exports of the new epoch were dropped there: never offered, never
published after the registry came back, while the ledger listed them. Fix: the channel
checks for a reset again right before judging a publish's epoch."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest
from vllm.v1.core.block_pool import BlockPool

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.exporter import ExportLedger
from kvmkt_connector.connector.holder_channel import HolderChannel, HolderRegistration
from kvmkt_connector.hashing import BlockKeyer, KeyScope
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.registry.client import RegistryClient
from kvmkt_connector.transport.generations import GenerationTable
from tests.unit.test_export_ledger import _IDLE, _request

BS = 16
NS = b"O" * 16


@pytest.mark.parametrize("staged", [False, True])
def test_exports_right_after_a_reset_during_an_outage_are_published(tmp_path, staged):
    d = tempfile.mkdtemp(dir="/tmp")
    os.chmod(d, 0o700)
    sock = os.path.join(d, "r.sock")
    cfg = MarketplaceConfig(registry_socket=sock, registry_autostart=False,
                            registry_sync_interval_ms=10, registry_retry_s=0.2)
    pool = BlockPool(num_gpu_blocks=101, enable_caching=True, hash_block_size=BS)
    channel = HolderChannel(cfg, "t", HolderRegistration(NS, "exporter", b"", b""))
    gens = None if staged else GenerationTable.create(str(tmp_path / "gen"), 101)
    ledger = ExportLedger(cfg, BS, channel, MarketplaceStats(), pool, 64 if staged else None,
                          gens)
    keyer = BlockKeyer(NS, BS)
    registry = None
    try:
        for rep in range(3):  # (the channel's thread waits 0.2 s per failed connect)
            time.sleep(0.05)
            assert pool.reset_prefix_cache()  # e.g. weights updated in place, RL style
            ledger.tick(_IDLE)  # the scheduler's step notices it first
            tokens = [(rep * 7919 + i) % 30000 + 3 for i in range(3 * BS + 5)]
            blocks = pool.get_new_blocks(4)
            ids = [b.block_id for b in blocks]
            ledger.on_blocks_rewritten(ids)
            ledger.on_request_finished(_request(f"r{rep}", tokens), ids, keyer.start(KeyScope()))
            pool.free_blocks(blocks)
            for job in ledger.take_jobs():
                ledger.on_saves_done([job.job_id])
            ledger.tick(_IDLE)  # (in place: published once the steps in flight ended)
            ledger.on_step_acked(ledger.step)
            ledger.tick(_IDLE)
            assert not ledger.has_pending()  # publish queued
            time.sleep(0.3)
        registry = subprocess.Popen(
            [sys.executable, "-m", "kvmkt_connector.registry", "serve", "--socket", sock],
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not channel.connected:
            assert time.monotonic() < deadline, "the holder did not register"
            ledger.tick(_IDLE)
            ledger.on_step_acked(ledger.step)
            time.sleep(0.02)
        for _ in range(20):
            ledger.tick(_IDLE)
            ledger.on_step_acked(ledger.step)
            time.sleep(0.02)
        listed = {key for key, _ in ledger._listed.values()}
        assert listed
        with RegistryClient.connect(sock, client_name="q", autostart=False) as q:
            missing = [k for k in listed if q.lookup(NS, [k])[1] != 1]
        assert not missing, (
            f"{len(missing)} of {len(listed)} pages the ledger lists were never published "
            f"(the channel dropped their publish as from another cache epoch)")
    finally:
        ledger.shutdown()
        if registry is not None:
            registry.terminate()
            registry.wait(10)


def test_exports_listed_between_the_ledgers_and_the_channels_reset_check_stay_importable(
        tmp_path):
    """(In place.) Both the ledger (ExportLedger.withdraw_all) and the channel's thread
    (its ``_on_reset``) bumped every generation for one reset. When the
    scheduler's step notices the reset first (the channel's thread wakes every
    registry_sync_interval_ms, 200 ms by default), a request finishing before the channel's
    check is exported under generations the channel's bump then invalidates: listed, offered
    in the registry, never importable (importers' tag checks fail), and not exported again
    while the ledger lists those blocks. Fix: ``ResetWatch`` bumps once per reset, in
    whichever thread notices it first."""
    d = tempfile.mkdtemp(dir="/tmp")
    os.chmod(d, 0o700)
    sock = os.path.join(d, "r.sock")
    registry = subprocess.Popen(
        [sys.executable, "-m", "kvmkt_connector.registry", "serve", "--socket", sock],
        stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cfg = MarketplaceConfig(registry_socket=sock, registry_autostart=False)  # default sync
    pool = BlockPool(num_gpu_blocks=101, enable_caching=True, hash_block_size=BS)
    channel = HolderChannel(cfg, "t", HolderRegistration(NS, "exporter", b"", b""))
    gens = GenerationTable.create(str(tmp_path / "gen"), 101)
    ledger = ExportLedger(cfg, BS, channel, MarketplaceStats(), pool, None, gens)
    keyer = BlockKeyer(NS, BS)
    try:
        while not channel.connected:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.05)  # (the channel's thread is in its wait)
        assert pool.reset_prefix_cache()
        ledger.tick(_IDLE)  # the step notices first
        tokens = [(i * 31) % 30000 + 3 for i in range(3 * BS + 5)]
        blocks = pool.get_new_blocks(4)
        ids = [b.block_id for b in blocks]
        ledger.on_blocks_rewritten(ids)
        ledger.on_request_finished(_request("r", tokens), ids, keyer.start(KeyScope()))
        pool.free_blocks(blocks)
        for _ in range(20):
            ledger.tick(_IDLE)
            ledger.on_step_acked(ledger.step)
            time.sleep(0.05)
        listed = dict(ledger._listed)
        assert listed
        now = dict(zip(listed, gens.locations(list(listed)), strict=True))
        stale = [b for b, (_, loc) in listed.items() if now[b] != loc]
        assert not stale, (
            f"{len(stale)} of {len(listed)} listed pages carry a generation the channel's own "
            f"reset bump has moved past: no import of them can pass its tag check")
    finally:
        ledger.shutdown()
        registry.terminate()
        registry.wait(10)


def test_releases_of_a_lost_registration_still_free_their_slots(tmp_path):
    """The channel takes a released location off its offered set when it
    emits the event, but the ledger ignored "released" events of an older registration
    (ExportLedger.tick: ``event.generation == self._generation``). A registry LRU release
    that the ledger had not applied yet when the holder re-registered (registry restart) is
    then lost: the location was neither offered (not republished) nor forgotten. Staged, its
    slot never comes back (the registry cannot release or reclaim what it does not list);
    in place, the block stays "listed" and is not exported again. Fix: the ledger applies
    releases of any registration (a location names one use of a block or slot)."""
    d = tempfile.mkdtemp(dir="/tmp")
    os.chmod(d, 0o700)
    sock = os.path.join(d, "r.sock")

    def start():
        if os.path.exists(sock):
            os.unlink(sock)
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmkt_connector.registry", "serve", "--socket", sock,
             "--capacity", "8"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return proc

    registry = start()
    cfg = MarketplaceConfig(registry_socket=sock, registry_autostart=False,
                            registry_sync_interval_ms=10, registry_retry_s=0.1)
    pool = BlockPool(num_gpu_blocks=101, enable_caching=True, hash_block_size=BS)
    channel = HolderChannel(cfg, "t", HolderRegistration(NS, "exporter", b"", b""))
    ledger = ExportLedger(cfg, BS, channel, MarketplaceStats(), pool, 24, None)
    keyer = BlockKeyer(NS, BS)
    try:
        deadline = time.monotonic() + 20
        while not channel.connected:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        tokens = [(i * 17) % 30000 + 3 for i in range(12 * BS + 5)]
        blocks = pool.get_new_blocks(13)
        ledger.on_request_finished(_request("r", tokens), [b.block_id for b in blocks],
                                   keyer.start(KeyScope()))
        pool.free_blocks(blocks)
        (job,) = ledger.take_jobs()
        ledger.on_saves_done([job.job_id])  # 12 pages; the registry keeps 8, releases 4
        with RegistryClient.connect(sock, client_name="q", autostart=False) as q:
            while q.status().published_blocks != 8:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        generation = channel.generation
        registry.kill()  # before the scheduler's next step applies the releases
        registry.wait(10)
        registry = start()
        while channel.generation == generation or not channel.connected:
            assert time.monotonic() < deadline, "the holder did not register again"
            time.sleep(0.01)
        for _ in range(20):
            ledger.tick(_IDLE)
            time.sleep(0.02)
        with RegistryClient.connect(sock, client_name="q", autostart=False) as q:
            in_registry = q.status().published_blocks
        assert len(ledger._listed) == in_registry, (
            f"the ledger holds {len(ledger._listed)} slots, the registry lists {in_registry}: "
            f"{len(ledger._listed) - in_registry} slots leaked "
            f"({len(ledger._free_slots)} of 24 free)")
    finally:
        ledger.shutdown()
        registry.terminate()
        registry.wait(10)
