"""Real vLLM objects without an engine: a VllmConfig of the tiny model, a one-group KV cache
config, and the kv_transfer_configs the start-up tests build connectors from."""

from __future__ import annotations

import os
from typing import Any

import torch

from tests.conftest import CONNECTOR

LAYER = "model.layers.0.self_attn.attn"
NUM_BLOCKS = 64


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


def engine_config(model: str, kv_transfer_config: dict, **engine_args: Any):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=model, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
        block_size=16, max_model_len=2048, kv_transfer_config=kv_transfer_config, **engine_args,
    ).create_engine_config()


def kv_cache_config():
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.float32)
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec([LAYER], spec)])


def build_connector(vllm_config: Any, role: str):
    """What Scheduler.__init__ (role "SCHEDULER") or a worker ("WORKER") does."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    return KVConnectorFactory.create_connector(
        config=vllm_config, role=KVConnectorRole[role], kv_cache_config=kv_cache_config()
    )


def children_of(connector: Any) -> list:
    """A MultiConnector's children, or the connector itself."""
    return list(getattr(connector, "_connectors", [connector]))


def run_step(sched: Any, recving: set[str] | None = None, token: int = 7) -> Any:
    """One step of vLLM's real Scheduler without a model: every scheduled request that is
    past its prompt samples ``token``; ``recving`` (emptied) are reported loaded (as a
    connector's workers would). Returns the SchedulerOutput."""
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    so = sched.schedule()
    ids = list(so.num_scheduled_tokens)
    sampled = [[] if sched.requests[r].is_prefill_chunk else [token] for r in ids]
    kvo = KVConnectorOutput(finished_recving=set(recving)) if recving else None
    if recving:
        recving.clear()
    sched.update_from_output(so, ModelRunnerOutput(
        req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
        sampled_token_ids=sampled, kv_connector_output=kvo))
    return so
