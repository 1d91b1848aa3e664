"""What our connector gives vLLM and takes from it at start-up, alone and under
MultiConnector, on real vLLM objects (no engine is started):

- workers: handshake metadata only alone. vLLM's handshake channel carries one connector's
  data to every child under MultiConnector (the first non-None), so there ours stays None
  (layouts then travel in the worker metadata) and a sibling's (NIXL's) gets through.
- scheduler: the publisher of vLLM's own Scheduler, through which the KV event feed
  publishes while the engine is idle, found from bind_gpu_block_pool either way.
"""

from __future__ import annotations

import pytest
import torch

from kvmkt_connector.connector.facade import MarketplaceConnector
from kvmkt_connector.connector.metadata import MarketplaceHandshake
from tests.unit.vllm_objects import (
    LAYER,
    NUM_BLOCKS,
    build_connector,
    children_of,
    engine_config,
    example,
    kv_cache_config,
    multi,
    ours,
)

SETUPS = ["alone", "multi-first", "multi-second"]


def transfer_config(setup: str, tmp_path) -> dict:
    if setup == "alone":
        return ours(tmp_path)
    children = [ours(tmp_path), example(tmp_path)]
    return multi(children if setup == "multi-first" else children[::-1], "recompute")


def marketplace(connector) -> MarketplaceConnector:
    (child,) = [c for c in children_of(connector) if isinstance(c, MarketplaceConnector)]
    return child


@pytest.mark.parametrize("setup", SETUPS)
def test_handshake_metadata_only_alone(tiny_model_dir, tmp_path, setup):
    connector = build_connector(engine_config(tiny_model_dir, transfer_config(setup, tmp_path)),
                                "WORKER")
    try:
        # CPU_ATTN's shape: (blocks, kv heads, block size, 2 * head size)
        connector.register_kv_caches({LAYER: torch.zeros(NUM_BLOCKS, 2, 16, 32)})
        ours_ = marketplace(connector).get_handshake_metadata()
        if setup == "alone":
            assert isinstance(ours_, MarketplaceHandshake)
            assert ours_.layout is not None and ours_.transport == "host_shm", ours_
        else:
            assert ours_ is None
            assert connector.get_handshake_metadata() is None  # ExampleConnector sends none
    finally:
        connector.shutdown()


@pytest.mark.parametrize("setup", SETUPS)
def test_scheduler_event_publisher_is_found(tiny_model_dir, tmp_path, setup):
    from vllm.config.kv_events import KVEventsConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    vllm_config = engine_config(
        tiny_model_dir, transfer_config(setup, tmp_path),
        kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="null"),
    )  # fmt: skip
    vllm_config.cache_config.num_gpu_blocks = NUM_BLOCKS  # what the engine sets after profiling
    scheduler = Scheduler(vllm_config, kv_cache_config(), StructuredOutputManager(vllm_config),
                          block_size=16)
    try:
        ours_ = marketplace(scheduler.connector)
        assert ours_._scheduler._event_publisher is scheduler.kv_event_publisher
    finally:
        scheduler.shutdown()
