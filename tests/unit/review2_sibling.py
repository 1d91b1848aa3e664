"""A sibling KV connector for MultiConnector tests (review of 283efb5): it claims the
tokens listed in ``CLAIMS`` (request id -> tokens) as an asynchronous external load, as
LMCache or NIXL would; the test reports the load done (KVConnectorOutput.finished_recving)
and plays the part of the sibling's workers, which write the loaded KV."""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
)

CLAIMS: dict[str, int] = {}
SYNC: set[str] = set()  # request ids whose claim is a synchronous load
ALLOCATED: list[tuple[str, list[int], int]] = []


class AsyncSibling(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)

    # worker side (unused)
    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs: Any) -> None:
        pass

    def wait_for_save(self):
        pass

    # scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        want = CLAIMS.pop(request.request_id, 0)
        if want > num_computed_tokens:
            return want - num_computed_tokens, request.request_id not in SYNC
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        if num_external_tokens:
            ALLOCATED.append((request.request_id, list(blocks.get_block_ids()[0]),
                              num_external_tokens))

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return KVConnectorMetadata()

    def request_finished(self, request, block_ids):
        return False, None
