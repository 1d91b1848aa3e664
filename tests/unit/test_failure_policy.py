"""The load-failure policy vLLM's scheduler will read, alone and under MultiConnector.

Real vLLM objects: a VllmConfig of the tiny model and the scheduler-side connector built by
vLLM's factory, as Scheduler.__init__ builds it (no engine is started).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import CONNECTOR


def ours(tmp_path, **kw) -> dict:
    extra = {"registry_socket": os.path.join(tmp_path, "none.sock"), "registry_autostart": False}
    return {"kv_connector": CONNECTOR, "kv_role": "kv_both", "kv_connector_extra_config": extra,
            **kw}


def multi(children: list[dict], policy: str | None) -> dict:
    cfg = {"kv_connector": "MultiConnector", "kv_role": "kv_both",
           "kv_connector_extra_config": {"connectors": children}}
    if policy is not None:
        cfg["kv_load_failure_policy"] = policy
    return cfg


def example(tmp_path) -> dict:
    return {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": os.path.join(tmp_path, "ex")}}


def build_scheduler_connector(model: str, kv_transfer_config: dict):
    """What Scheduler.__init__ does; returns (connector, the config vLLM reads)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    vllm_config = EngineArgs(
        model=model, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
        block_size=16, max_model_len=2048, kv_transfer_config=kv_transfer_config,
    ).create_engine_config()
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.float32)
    kv_cache_config = KVCacheConfig(
        num_blocks=64, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)],
    )
    connector = KVConnectorFactory.create_connector(
        config=vllm_config, role=KVConnectorRole.SCHEDULER, kv_cache_config=kv_cache_config
    )
    return connector, vllm_config.kv_transfer_config


def test_alone_the_connector_switches_the_policy_to_recompute(tiny_model_dir, tmp_path):
    connector, top = build_scheduler_connector(tiny_model_dir, ours(tmp_path))
    try:
        assert top.kv_load_failure_policy == "recompute"
    finally:
        connector.shutdown()


@pytest.mark.parametrize("first", [True, False])
def test_under_multiconnector_unsafe_top_level_policy_refuses_to_start(
    tiny_model_dir, tmp_path, first
):
    # The child's own setting is not what vLLM reads: it must not count.
    children = [ours(tmp_path, kv_load_failure_policy="recompute"), example(tmp_path)]
    if not first:
        children.reverse()
    with pytest.raises(ValueError, match=r"top-level kv_transfer_config\.kv_load_failure_policy"):
        build_scheduler_connector(tiny_model_dir, multi(children, None))  # default "fail"


def test_under_multiconnector_recompute_or_no_imports_starts(tiny_model_dir, tmp_path):
    connector, top = build_scheduler_connector(
        tiny_model_dir, multi([example(tmp_path), ours(tmp_path)], "recompute"))
    connector.shutdown()
    assert top.kv_load_failure_policy == "recompute"
    # Exporting only (kv_producer): no import can fail, the siblings' policy stays theirs.
    connector, top = build_scheduler_connector(
        tiny_model_dir, multi([ours(tmp_path, kv_role="kv_producer"), example(tmp_path)], "fail"))
    connector.shutdown()
    assert top.kv_load_failure_policy == "fail"
