"""MarketplaceConnector next to ExampleConnector in vLLM's MultiConnector, either order, on
real vLLM 0.26 CPU engines (configs/multi-example.json).

Engines (one registry, started once for the module):
  R  the reference: no connector
  A  [Marketplace, ExampleConnector]
  B  [ExampleConnector, Marketplace], Marketplace loaded through kv_connector_module_path
     with our plugin entry point disabled (VLLM_PLUGINS): the front end rebuilds each
     child's stats by class name, which must resolve all the same
(tests/unit/test_failure_policy.py: an unsafe top-level failure policy refuses to start.)
"""

from __future__ import annotations

import os
import random

import pytest

from tests.conftest import CONNECTOR
from tests.e2e.multi_helpers import (
    BS,
    SMALL,
    blocks_of,
    children,
    config,
    fresh,
    kvmkt_metrics,
    one_by_one,
    settled_published,
    wait_all,
)

pytestmark = pytest.mark.engine

_rng = random.Random(4321)
A_PROMPTS = [fresh(_rng, n) for n in (200, 333, 480)]  # exported by A, imported by B
B_PROMPTS = [fresh(_rng, n) for n in (180, 290, 410)]  # exported by B, imported by A


def example_config(storage: str, reverse: bool = False) -> dict:
    cfg = config("multi-example.json")
    for child in children(cfg):
        if child["kv_connector"] == "ExampleConnector":
            child["kv_connector_extra_config"]["shared_storage_path"] = storage
        elif child["kv_connector"] == CONNECTOR and reverse:
            child["kv_connector_module_path"] = "kvmkt_connector.connector.facade"
    if reverse:
        children(cfg).reverse()
    return cfg


@pytest.fixture(scope="module")
def engines(cluster, tiny_model_dir):
    w = cluster.workdir
    stats = {"disable_log_stats": False, **SMALL}  # connector metrics in LLM.get_metrics()
    cluster.start("R", tiny_model_dir, connector=None, **SMALL)
    cluster.start("A", tiny_model_dir, connector=example_config(f"{w}/example-A"), **stats)
    cluster.start("B", tiny_model_dir, connector=example_config(f"{w}/example-B", reverse=True),
                  env={"VLLM_PLUGINS": "lora_filesystem_resolver"}, **stats)  # not ours
    wait_all(cluster)
    return cluster.engines


@pytest.mark.parametrize("exporter,importer,prompts", [("A", "B", A_PROMPTS),
                                                      ("B", "A", B_PROMPTS)])
def test_with_example_connector_in_either_order(engines, cluster, exporter, importer, prompts):
    """Marketplace first (A) or second (B): each exports, each imports, outputs equal R."""
    src, dst, r = engines[exporter], engines[importer], engines["R"]
    before = settled_published(cluster)
    src.generate(prompts, max_tokens=4)
    cluster.wait_published(before + sum(blocks_of(len(p) + 3) for p in prompts))
    settled_published(cluster)
    followups = [p + fresh(_rng, 30) for p in prompts]
    got = one_by_one(dst, followups)
    ref = one_by_one(r, followups)
    assert [g.imported_tokens for g in got] == [blocks_of(len(p)) * BS for p in prompts]
    assert [g.token_ids for g in got] == [w.token_ids for w in ref]
    m = kvmkt_metrics(dst)
    # Both halves report under MultiConnector: the scheduler's lookups, the workers' bytes.
    assert m["vllm:kvmkt_lookups"] >= len(prompts)
    assert m["vllm:kvmkt_imported_tokens"] >= sum(g.imported_tokens for g in got)
    assert m["vllm:kvmkt_imported_bytes"] > 0
    # Offline LLM records stats only in steps with request outputs; exports are published
    # after the exporter's last one: one more request brings its counters in.
    src.generate([fresh(_rng, 20)], max_tokens=1)
    assert kvmkt_metrics(src)["vllm:kvmkt_exported_blocks"] >= sum(
        blocks_of(len(p) + 3) for p in prompts)
    # ExampleConnector, the sibling, did its part too: it saved the requests' KV.
    assert os.listdir(f"{cluster.workdir}/example-{exporter}")
    assert os.listdir(f"{cluster.workdir}/example-{importer}")
