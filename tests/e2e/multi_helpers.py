"""Helpers for the MultiConnector e2e modules: the configs of configs/, made fit for CPU
engines in CI (small KV caches and export regions, NIXL over TCP on 127.0.0.1)."""

from __future__ import annotations

import json
import random
import socket
import time
from pathlib import Path

from tests.conftest import CONNECTOR

BS = 16
MAX_TOKENS = 8
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMALL = {"num_gpu_blocks_override": 2048}  # 32k tokens instead of 1 GiB per engine
OURS_EXTRA = {"host_region_bytes": 64 << 20}


def fresh(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 500) for _ in range(n)]


def children(cfg: dict) -> list[dict]:
    return cfg["kv_connector_extra_config"]["connectors"]


def config(name: str) -> dict:
    """A shipped config, our children with a small export region."""
    cfg = json.loads((CONFIGS / name).read_text())
    for child in children(cfg):
        if child["kv_connector"] == CONNECTOR:
            child.setdefault("kv_connector_extra_config", {}).update(OURS_EXTRA)
    return cfg


def nixl_config(name: str) -> dict:
    cfg = config(name)
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


def wait_all(cluster) -> None:
    """Like Cluster.wait_all, naming the engine that failed and its errors."""
    for name, engine in cluster.engines.items():
        try:
            engine.wait_ready()
        except RuntimeError:
            errors = [ln for ln in cluster.log(name).splitlines() if "Error" in ln]
            raise RuntimeError(f"engine {name} failed: {errors[-5:]}") from None


def one_by_one(engine, prompts: list[list[int]]) -> list:
    out = []
    for p in prompts:
        out += engine.generate([p], max_tokens=MAX_TOKENS)
    return out


def kvmkt_metrics(engine) -> dict:
    return {k: v for k, v in engine.metrics().items() if "kvmkt" in k}
