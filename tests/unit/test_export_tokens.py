"""The BlockTokens the registry gets for every published key (now made on the channel's
thread from TokenRuns) are exactly the old ones: (key, key of block i-1 or b"", LE uint32 of
token_ids[i*bs:(i+1)*bs]), in place and staged, with listed blocks skipped, known keys,
blocks rewritten before the settled publish, a key listed twice in _waiting, and after a
registry restart (republish from _remember_tokens)."""

from __future__ import annotations

import os
import time

import numpy as np
from vllm.v1.core.block_pool import BlockPool

from kvmkt_connector.connector.holder_channel import TokenRun, block_tokens
from kvmkt_connector.connector.importer import ConfirmedImport
from kvmkt_connector.hashing import BlockKeyer, KeyScope
from kvmkt_connector.registry.client import RegistryClient
from kvmkt_connector.registry.protocol import BlockTokens
from tests.unit.test_export_ledger import (
    _IDLE,
    _REGISTRIES,
    BS,
    NS,
    _ledger,
    _new_req_output,
    _request,
    _settle,
    _start_registry,
    registry,  # noqa: F401 (fixture)
)


def _expected(tokens, keys, i):
    return BlockTokens(keys[i], keys[i - 1] if i else b"",
                       np.asarray(tokens[i * BS : (i + 1) * BS], dtype="<u4").tobytes())


def _offered(sock):
    """key -> BlockTokens of everything the namespace lists with tokens (a snapshot)."""
    out = {}
    with RegistryClient.connect(sock, client_name="offers", autostart=False) as q:
        feed = q.offers(NS)
        while True:
            for c in feed.changes:
                if c.listed:
                    out[c.key] = c.block
                else:
                    out.pop(c.key, None)
            if not feed.after and not feed.more:
                return out
            feed = q.offers(NS, feed.feed_id, feed.cursor, after=feed.after)


def _wait_offered(sock, want, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = _offered(sock)
        if got == want:
            return
        assert time.monotonic() < deadline, (len(got), len(want),
                                             [k for k in want if got.get(k) != want[k]][:3],
                                             [k for k in got if k not in want][:3])
        time.sleep(0.05)


def test_block_tokens_filters_and_slices():
    keys = [bytes([i]) * 16 for i in range(6)]
    toks = list(range(6 * BS))
    run = TokenRun([keys[2], keys[3], keys[5]], [keys[1], keys[2], keys[4]], [2, 3, 5], toks, BS)
    plain = BlockTokens(keys[0], b"", b"x")
    out = block_tokens([plain, run], [keys[3], keys[5]])
    assert out[0] is plain  # plain BlockTokens pass through unfiltered (as before)
    assert out[1:] == [_expected(toks, keys, 3), _expected(toks, keys, 5)]


def test_in_place_tokens_equal_the_old_ones(registry, tmp_path):  # noqa: F811
    pool = BlockPool(num_gpu_blocks=301, enable_caching=True, hash_block_size=BS)
    ledger, channel = _ledger(registry, pool, tmp=str(tmp_path))
    keyer = BlockKeyer(NS, BS)
    ids = [b.block_id for b in pool.get_new_blocks(300)]
    ta = [(37 * i + 5) % 50000 for i in range(90 * BS)]
    ka = keyer.keys(ta)
    want = {}
    # a: 40 blocks
    ledger.on_request_finished(_request("a", ta[: 40 * BS + 3]), ids[:41], keyer.start(KeyScope()), True)
    want.update({ka[i]: _expected(ta, ka, i) for i in range(40)})
    _settle(ledger, lambda: len(_offered(registry)) == 40)
    # b: same 40 blocks (listed: skipped), then 30 more on fresh blocks, with known keys
    # covering 45..60 and the prefix hashed up to block 20
    pk = keyer.start(KeyScope())
    pk.extend(ta, upto=20 * BS)
    ledger.on_request_finished(_request("b", ta[: 70 * BS + 1]), ids[:40] + ids[100:131],
                               pk, True, known=ConfirmedImport(45, ka[45:61], [], True, None))
    want.update({ka[i]: _expected(ta, ka, i) for i in range(40, 70)})
    # c: its own prompt, blocks 200..; three of them rewritten before the settled publish
    tc = [(11 * i + 3) % 50000 for i in range(20 * BS)]
    kc = keyer.keys(tc)
    ledger.on_request_finished(_request("c", tc[: 12 * BS + 2]), ids[200:213], keyer.start(KeyScope()), True)
    ledger.tick(_new_req_output(ids[205:208]))
    want.update({kc[i]: _expected(tc, kc, i) for i in range(12) if not 5 <= i < 8})
    # d: c's prompt again on other blocks: keys 5..7 are free again (listed twice in
    # _waiting, once withdrawn); the others are listed under c's blocks: not new
    ledger.on_request_finished(_request("d", tc[: 12 * BS + 2]), ids[250:263], keyer.start(KeyScope()), True)
    want.update({kc[i]: _expected(tc, kc, i) for i in range(5, 8)})
    _settle(ledger, lambda: not ledger.has_pending())
    _wait_offered(registry, want)
    # registry restart: republished with the same tokens
    _REGISTRIES[registry].kill()
    _REGISTRIES[registry].wait(10)
    os.unlink(registry)
    _start_registry(registry)
    deadline = time.monotonic() + 15
    while True:
        ledger.tick(_IDLE)
        try:
            if _offered(registry) == want:
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "not republished with the same tokens"
        time.sleep(0.05)
    ledger.shutdown()


def test_staged_tokens_equal_the_old_ones(registry):  # noqa: F811
    pool = BlockPool(num_gpu_blocks=301, enable_caching=True, hash_block_size=BS)
    ledger, channel = _ledger(registry, pool, staged=50)
    keyer = BlockKeyer(NS, BS)
    ids = [b.block_id for b in pool.get_new_blocks(300)]
    ta = [(37 * i + 5) % 50000 for i in range(90 * BS)]
    ka = keyer.keys(ta)
    ledger.on_request_finished(_request("a", ta[: 20 * BS + 3]), ids[:21], keyer.start(KeyScope()), True)
    # b: keys 0..19 are listed (by key): only 20..; 50 slots: 30 of 40 fit
    ledger.on_request_finished(_request("b", ta[: 60 * BS + 3]), ids[100:161], keyer.start(KeyScope()),
                               True, known=ConfirmedImport(30, ka[30:50], [], True, None))
    jobs = ledger.take_jobs()
    ledger.on_saves_done([j.job_id for j in jobs])
    want = {ka[i]: _expected(ta, ka, i) for i in range(50)}
    _wait_offered(registry, want)
    channel.close()
