"""The load-failure policy vLLM's scheduler will read, alone and under MultiConnector.

Real vLLM objects: a VllmConfig of the tiny model and the scheduler-side connector built by
vLLM's factory, as Scheduler.__init__ builds it (no engine is started).
"""

from __future__ import annotations

import pytest

from tests.unit.vllm_objects import build_connector, engine_config, example, multi, ours


def build_scheduler_connector(model: str, kv_transfer_config: dict):
    """What Scheduler.__init__ does; returns (connector, the config vLLM reads)."""
    vllm_config = engine_config(model, kv_transfer_config)
    return build_connector(vllm_config, "SCHEDULER"), vllm_config.kv_transfer_config


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
