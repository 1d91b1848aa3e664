"""Review of 31994e9 (in place): an importer thread leases pages from a real registry while
the exporter's ledger + real HolderChannel run random exports, rewrites, prefix-cache resets
(noticed by the channel's thread or the ledger's step, whichever first) and registry
restarts. The importer does what a worker does: read the block, then check the location's
generation. A passing check must mean the block holds the leased key's KV, written after
the last reset anyone had noticed when the copy started."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time

import pytest
from vllm.v1.core.block_pool import BlockPool

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.exporter import ExportLedger
from kvmkt_connector.connector.holder_channel import HolderChannel, HolderRegistration
from kvmkt_connector.hashing import BlockKeyer, KeyScope
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.registry.client import RegistryClient
from kvmkt_connector.transport.generations import GenerationTable, decode_locations
from tests.unit.test_ledger_registry_agree import _IDLE, BS, NS, Registry, _request

NB = 61


@pytest.mark.parametrize("seed", range(int(os.environ.get("REVIEW3_SEEDS", "4"))))
def test_no_wrong_page_in_place(tmp_path, seed):
    rng = random.Random(seed)
    reg = Registry(capacity=200)
    pool = BlockPool(num_gpu_blocks=NB, enable_caching=True, hash_block_size=BS)
    cfg = MarketplaceConfig(registry_socket=reg.sock, registry_autostart=False,
                            registry_sync_interval_ms=5, registry_retry_s=0.05)
    channel = HolderChannel(cfg, "t", HolderRegistration(NS, "exporter", b"", b""))
    gens = GenerationTable.create(str(tmp_path / "gen"), NB)
    ledger = ExportLedger(cfg, BS, channel, MarketplaceStats(), pool, None, gens)
    watch = ledger._resets
    keyer = BlockKeyer(NS, BS)
    content: dict[int, tuple[bytes | None, object]] = {}  # block -> (key, pool map then)
    keys_pool: list[bytes] = []
    stop = threading.Event()
    bad: list[str] = []
    stats = {"copies": 0, "valid": 0}

    def importer():
        q = None
        r = random.Random(seed + 100)
        while not stop.is_set():
            if not keys_pool:
                time.sleep(0.001)
                continue
            key = r.choice(keys_pool)
            try:
                if q is None or q.broken:
                    q = RegistryClient.connect(reg.sock, client_name="imp", autostart=False)
                grant = q.lease(NS, [key], ttl_ms=2000)
            except Exception:
                q = None
                time.sleep(0.005)
                continue
            if grant is None:
                continue
            (loc,) = grant.locations
            with watch._lock:  # (a bump_all under way is over)
                noticed = watch._seen
            b = int(decode_locations([loc])[0][0])
            snap = content.get(b)  # the copy
            time.sleep(r.random() * 0.002)
            ok = gens.unchanged_prefix([loc]) == 1  # the check after it
            stats["copies"] += 1
            if ok:
                stats["valid"] += 1
                if snap is None or snap[0] != key:
                    bad.append(f"WRONG PAGE: leased {key.hex()[:8]} at block {b} gen "
                               f"{loc >> 32}: block holds {snap and snap[0] and snap[0].hex()[:8]}")
                elif snap[1] is not noticed:
                    bad.append(f"pre-reset page read valid after the reset was noticed: "
                               f"block {b} gen {loc >> 32}")
            with contextlib.suppress(Exception):
                q.release_leases([grant.lease_id])

    t = threading.Thread(target=importer, daemon=True)
    families = [[rng.randrange(3, 5000) for _ in range(12 * BS)] for _ in range(4)]

    def step():
        ledger.tick(_IDLE)
        ledger.on_step_acked(ledger.step)

    try:
        deadline = time.monotonic() + 10
        while not channel.connected:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t.start()
        for _ in range(int(os.environ.get("REVIEW3_OPS", "600"))):
            x = rng.random()
            if x < 0.4:
                fam = rng.choice(families)
                tokens = fam[: rng.randrange(0, len(fam))] + [
                    rng.randrange(3, 5000) for _ in range(rng.randrange(1, 5 * BS))]
                n = (len(tokens) + 1 + BS - 1) // BS
                blocks = pool.get_new_blocks(n)
                ids = [b.block_id for b in blocks]
                ledger.on_blocks_rewritten(ids)  # (the step that writes them)
                ks = keyer.keys(tokens)
                m = pool.cached_block_hash_to_block
                for i, b in enumerate(ids):
                    content[b] = (ks[i] if i < len(ks) else None, m)
                keys_pool.extend(k for k in ks if k not in keys_pool)
                ledger.on_request_finished(_request(tokens), ids, keyer.start(KeyScope()))
                pool.free_blocks(blocks)
            elif x < 0.55:
                ids = rng.sample(range(1, NB), rng.randrange(1, 8))
                ledger.on_blocks_rewritten(ids)
                for b in ids:
                    content[b] = (None, pool.cached_block_hash_to_block)
            elif x < 0.6:
                assert pool.reset_prefix_cache()
                if rng.random() < 0.5:
                    time.sleep(0.01)  # the channel's thread notices first
            elif x < 0.605:
                reg.restart()
            else:
                step()
            if rng.random() < 0.3:
                time.sleep(0.002)
        for _ in range(30):
            step()
            time.sleep(0.01)
    finally:
        stop.set()
        t.join(5)
        ledger.shutdown()
        reg.stop()
    print("STATS", seed, stats)
    assert stats["valid"] > 20, stats
    assert not bad, f"{len(bad)} bad copies of {stats}: {bad[:5]}"
