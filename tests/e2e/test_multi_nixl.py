"""Prefill/decode over NixlConnector whose instances are also marketplace members, on real
vLLM 0.26 CPU engines: NIXL over UCX/TCP on 127.0.0.1, as between two nodes.

Engines (one registry, started once for the module):
  R  the reference: no connector
  P  configs/multi-nixl-prefill.json: [Marketplace, NixlConnector(kv_producer)]
  D  configs/multi-nixl-decode.json: [NixlConnector(kv_consumer), Marketplace]
  E  plain MarketplaceConnector; imports what D exported. HND layout, like P and D:
     NixlConnector makes vLLM use HND, and pages of another layout are not shared.
Marketplace first on P and second on D: no order may cost NIXL its handshake.
"""

from __future__ import annotations

import copy
import random

import pytest

from tests.conftest import CONNECTOR
from tests.e2e.multi_helpers import (
    BS,
    MAX_TOKENS,
    OURS_EXTRA,
    SMALL,
    blocks_of,
    fresh,
    nixl_config,
    nixl_env,
    one_by_one,
    settled_published,
    wait_all,
)

pytestmark = pytest.mark.engine

_rng = random.Random(8765)
# Prefilled on P, decoded on D; lengths where D's 7 decoded tokens with KV fill one more
# block, so E can only have that block from D.
PD_PROMPTS = [fresh(_rng, n) for n in (300, 410)]


@pytest.fixture(scope="module")
def engines(cluster, tiny_model_dir):
    stats = {"disable_log_stats": False, **SMALL}  # connector metrics in LLM.get_metrics()
    hnd = {"VLLM_KV_CACHE_LAYOUT": "HND"}
    cluster.start("R", tiny_model_dir, connector=None, **SMALL)
    cluster.start("P", tiny_model_dir, connector=nixl_config("multi-nixl-prefill.json"),
                  env={**nixl_env(), **hnd}, **stats)
    cluster.start("D", tiny_model_dir, connector=nixl_config("multi-nixl-decode.json"),
                  env={**nixl_env(), **hnd}, **stats)
    cluster.start("E", tiny_model_dir, env=hnd, **SMALL, connector={
        "kv_connector": CONNECTOR, "kv_role": "kv_both", "kv_connector_extra_config": OURS_EXTRA})
    wait_all(cluster)
    return cluster.engines


def test_nixl_prefill_decode_with_marketplace_members(engines, cluster):
    """P prefills, D pulls the KV over NIXL and decodes; D exports into the marketplace,
    E imports D's blocks (longer than anything P saw). Everything equals R."""
    p, d, e, r = (engines[n] for n in "PDER")
    before = settled_published(cluster)
    decoded = []
    for prompt in PD_PROMPTS:
        (pre,) = p.generate([prompt], max_tokens=1,
                            options=[{"kv_transfer_params": {"do_remote_decode": True}}])
        params = pre.kv_transfer_params
        assert params and params.get("do_remote_prefill") and params.get("remote_block_ids")
        (dec,) = d.generate([prompt], max_tokens=MAX_TOKENS,
                            options=[{"kv_transfer_params": copy.deepcopy(params)}])
        (ref,) = r.generate([prompt], max_tokens=MAX_TOKENS)
        assert dec.token_ids == ref.token_ids
        # D never saw the prompt: what it did not compute, NIXL brought from P. Not the
        # marketplace (where P exports the same prompt): NIXL is D's first child, so it
        # takes the request, and our half imports nothing (0, not -1: it did see it).
        assert dec.cached_tokens >= len(prompt) - BS, dec.cached_tokens
        assert dec.imported_tokens == 0, dec.kv_transfer_params
        decoded.append(prompt + dec.token_ids)
    for name in "PD":  # our half got its workers' layouts: no shared handshake needed
        log = cluster.log(name)  # (logged when the first request's step brought them)
        assert "kvmkt: namespace" in log and "sharing disabled" not in log
    dm = d.metrics()
    # Both children's metrics are there. (Offline LLM drops the stats of steps without
    # request outputs, such as those that finish a NIXL transfer: NIXL's counts may be
    # low there; the per-request cached_tokens above is the reliable signal.)
    assert "vllm:nixl_xfer_time_seconds" in dm and dm["vllm:nixl_num_failed_transfers"] == 0
    assert dm["vllm:kvmkt_lookups"] >= len(PD_PROMPTS)  # our half ran beside NIXL
    # P exports its prompts' blocks, D its prompts' and decoded tokens' blocks.
    cluster.wait_published(before + sum(blocks_of(len(x)) for x in PD_PROMPTS)
                           + sum(blocks_of(len(x) - 1) for x in decoded))
    settled_published(cluster)
    followups = [x + fresh(_rng, 20) for x in decoded]
    got = one_by_one(e, followups)
    ref = one_by_one(r, followups)
    assert [g.imported_tokens for g in got] == [blocks_of(len(x) - 1) * BS for x in decoded]
    assert all(g.imported_tokens > blocks_of(len(x)) * BS
               for g, x in zip(got, PD_PROMPTS, strict=True))
    assert [g.token_ids for g in got] == [w.token_ids for w in ref]
