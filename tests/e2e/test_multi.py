"""MarketplaceConnector inside vLLM's MultiConnector, on real vLLM 0.26 CPU engines.

Engines (one registry, all started once for the module), configs from configs/:
  R  the reference: no connector
  A  multi-example.json: [Marketplace, ExampleConnector]
  B  the same reversed, [ExampleConnector, Marketplace], Marketplace loaded through
     kv_connector_module_path with our plugin entry point disabled (VLLM_PLUGINS): the
     front end rebuilds child stats by class name, which must still resolve
  P  multi-nixl-prefill.json: [Marketplace, NixlConnector(kv_producer)]
  D  multi-nixl-decode.json: [NixlConnector(kv_consumer), Marketplace]; P and D talk
     NIXL over UCX/TCP on 127.0.0.1 as two nodes would
  E  plain MarketplaceConnector, imports what D exported (HND layout like P and D:
     NixlConnector makes vLLM use HND, and pages of another layout are not shared)
(tests/unit/test_failure_policy.py: an unsafe top-level failure policy refuses to start.)
Small KV caches and export regions: seven engines must fit in a CI machine's memory.
"""

from __future__ import annotations

import copy
import json
import os
import random
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import CONNECTOR

pytestmark = pytest.mark.engine

BS = 16
MAX_TOKENS = 8
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
_rng = random.Random(4321)


def fresh(n: int) -> list[int]:
    return [_rng.randrange(3, 500) for _ in range(n)]


A_PROMPTS = [fresh(n) for n in (200, 333, 480)]  # exported by A, imported by B
B_PROMPTS = [fresh(n) for n in (180, 290, 410)]  # exported by B, imported by A
# Prefilled on P, decoded on D; lengths where D's 7 decoded tokens fill another block.
PD_PROMPTS = [fresh(n) for n in (300, 410)]


def config(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def children(cfg: dict) -> list[dict]:
    return cfg["kv_connector_extra_config"]["connectors"]


SMALL = {"num_gpu_blocks_override": 2048}  # 32k tokens, instead of 1 GiB per engine
OURS_EXTRA = {"host_region_bytes": 64 << 20}


def shrink(cfg: dict) -> dict:
    for child in children(cfg):
        if child["kv_connector"] == CONNECTOR:
            child.setdefault("kv_connector_extra_config", {}).update(OURS_EXTRA)
    return cfg


def example_config(storage: str, reverse: bool = False) -> dict:
    cfg = shrink(config("multi-example.json"))
    for child in children(cfg):
        if child["kv_connector"] == "ExampleConnector":
            child["kv_connector_extra_config"]["shared_storage_path"] = storage
    if reverse:
        children(cfg).reverse()
    return cfg


def nixl_config(name: str) -> dict:
    cfg = shrink(config(name))
    for child in children(cfg):
        if child["kv_connector"] == "NixlConnector":
            child["kv_buffer_device"] = "cpu"  # the configs are for GPUs
    return cfg


def nixl_env() -> dict:
    with socket.socket() as s:  # a free port for this engine's NIXL side channel
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"UCX_TLS": "tcp,self", "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(port)}


def blocks_of(tokens: int) -> int:
    return tokens // BS


def settled_published(cluster, quiet_s: float = 1.0) -> int:
    """Published blocks once no export is under way (each is published a step after its
    request ended): a count taken earlier could be reached by exports from before."""
    with cluster.client() as c:
        last, since = c.status().published_blocks, time.monotonic()
        while time.monotonic() - since < quiet_s:
            time.sleep(0.1)
            n = c.status().published_blocks
            if n != last:
                last, since = n, time.monotonic()
    return last


@pytest.fixture(scope="module")
def engines(cluster, tiny_model_dir):
    w = cluster.workdir
    stats = {"disable_log_stats": False, **SMALL}  # connector metrics in LLM.get_metrics()
    cluster.start("R", tiny_model_dir, connector=None, **SMALL)
    cluster.start("A", tiny_model_dir, connector=example_config(f"{w}/example-A"), **stats)
    b_cfg = example_config(f"{w}/example-B", reverse=True)
    for child in children(b_cfg):
        if child["kv_connector"] == CONNECTOR:
            child["kv_connector_module_path"] = "kvmkt_connector.connector.facade"
    cluster.start("B", tiny_model_dir, connector=b_cfg, **stats,
                  env={"VLLM_PLUGINS": "lora_filesystem_resolver"})  # not ours
    hnd = {"VLLM_KV_CACHE_LAYOUT": "HND"}
    cluster.start("P", tiny_model_dir, connector=nixl_config("multi-nixl-prefill.json"),
                  env={**nixl_env(), **hnd}, **stats)
    cluster.start("D", tiny_model_dir, connector=nixl_config("multi-nixl-decode.json"),
                  env={**nixl_env(), **hnd}, **stats)
    cluster.start("E", tiny_model_dir, env=hnd, **SMALL, connector={
        "kv_connector": CONNECTOR, "kv_role": "kv_both", "kv_connector_extra_config": OURS_EXTRA})
    for name, engine in cluster.engines.items():
        try:
            engine.wait_ready()
        except RuntimeError:
            errors = [ln for ln in cluster.log(name).splitlines() if "Error" in ln]
            raise RuntimeError(f"engine {name} failed: {errors[-5:]}") from None
    return cluster.engines


def one_by_one(engine, prompts, **kw):
    out = []
    for p in prompts:
        out += engine.generate([p], max_tokens=MAX_TOKENS, **kw)
    return out


def metrics_of(engine) -> dict:
    return {k: v for k, v in engine.metrics().items() if "kvmkt" in k}


@pytest.mark.parametrize("exporter,importer,prompts", [("A", "B", A_PROMPTS),
                                                      ("B", "A", B_PROMPTS)])
def test_with_example_connector_in_either_order(engines, cluster, exporter, importer, prompts):
    """Marketplace first (A) or second (B): each exports, each imports, outputs equal R."""
    src, dst, r = engines[exporter], engines[importer], engines["R"]
    before = settled_published(cluster)
    src.generate(prompts, max_tokens=4)
    cluster.wait_published(before + sum(blocks_of(len(p) + 3) for p in prompts))
    settled_published(cluster)
    followups = [p + fresh(30) for p in prompts]
    got = one_by_one(dst, followups)
    ref = one_by_one(r, followups)
    assert [g.imported_tokens for g in got] == [blocks_of(len(p)) * BS for p in prompts]
    assert [g.token_ids for g in got] == [w.token_ids for w in ref]
    m = metrics_of(dst)
    # Both halves report under MultiConnector: the scheduler's lookups, the workers' bytes.
    assert m["vllm:kvmkt_lookups"] >= len(prompts)
    assert m["vllm:kvmkt_imported_tokens"] >= sum(g.imported_tokens for g in got)
    assert m["vllm:kvmkt_imported_bytes"] > 0
    assert metrics_of(src)["vllm:kvmkt_exported_blocks"] > 0
    # ExampleConnector, the sibling, did its part too: it saved every request's KV.
    assert os.listdir(f"{cluster.workdir}/example-{exporter}")
    assert os.listdir(f"{cluster.workdir}/example-{importer}")


def test_nixl_prefill_decode_with_marketplace_members(engines, cluster):
    """P prefills, D pulls the KV over NIXL and decodes; D exports into the marketplace,
    E imports D's blocks (longer than anything P saw). Everything equals R."""
    p, d, e, r = (engines[n] for n in "PDER")
    for name in "PD":  # each child got its own startup data (no shared handshake)
        log = cluster.log(name)
        assert "kvmkt: namespace" in log and "sharing disabled" not in log
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
        decoded.append(prompt + dec.token_ids)
    dm = d.metrics()
    # NIXL did the prefill's KV (external hits), not a local recompute.
    assert dm["vllm:external_prefix_cache_hits"] >= sum(len(x) - BS for x in PD_PROMPTS)
    assert any(k.startswith("vllm:nixl_") for k in dm), sorted(dm)
    assert dm["vllm:kvmkt_lookups"] >= len(PD_PROMPTS)  # our half ran beside NIXL
    # P exports its prompts' blocks, D its prompts' and decoded tokens' blocks.
    cluster.wait_published(before + sum(blocks_of(len(x)) for x in PD_PROMPTS)
                           + sum(blocks_of(len(x) - 1) for x in decoded))
    settled_published(cluster)
    followups = [x + fresh(20) for x in decoded]
    got = one_by_one(e, followups)
    ref = one_by_one(r, followups)
    assert [g.imported_tokens for g in got] == [blocks_of(len(x) - 1) * BS for x in decoded]
    assert all(g.imported_tokens > blocks_of(len(x)) * BS for g, x in zip(got, PD_PROMPTS, strict=True))
    assert [g.token_ids for g in got] == [w.token_ids for w in ref]
