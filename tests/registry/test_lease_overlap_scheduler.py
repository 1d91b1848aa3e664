"""The lease/allocation overlap on vLLM 0.26's real Scheduler (no engine, no forward pass):
our scheduler-side connector inside vllm.v1.core.sched.scheduler.Scheduler, our worker-side
connector fed each step's metadata as kv_connector_no_forward does, and a live registry.

A neighbour in our namespace lists the request's whole prefix, but its pages are not
readable by our workers (here: a descriptor we cannot decode, as for a holder of another
transport; LeaseCheck.usable -> None). match() answers the table's bound, vLLM parks the request, the
job copies nothing and reports every block as a load error, vLLM truncates
num_computed_tokens to 0, frees the blocks, and (num_computed_tokens == 0) asks
get_num_new_matched_tokens again. The request must then prefill (it was promised the same
blocks forever: written by an independent review, failing before the fix)."""

from __future__ import annotations

import os

import torch
from registry_helpers import RegistryProcess

from kvmkt_connector.hashing import BlockKeyer
from tests.conftest import CONNECTOR
from tests.unit.vllm_objects import (
    LAYER,
    NUM_BLOCKS,
    build_connector,
    engine_config,
    kv_cache_config,
)


class _Node:
    """vLLM 0.26's Scheduler with our connector (kv_consumer), our worker connector, a live
    registry and a neighbour in our namespace that lists ``prompt`` with a descriptor our
    workers cannot read (as a holder of another transport: LeaseCheck.usable -> None)."""

    def __init__(self, tiny_model_dir, socket_dir, prompt: list[int]) -> None:
        from vllm import SamplingParams
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.request import Request
        from vllm.v1.structured_output import StructuredOutputManager

        self.reg = RegistryProcess(os.path.join(socket_dir, "registry.sock"), "--capacity", "1000")
        tc = {"kv_connector": CONNECTOR, "kv_role": "kv_consumer",
              "kv_connector_extra_config": {"registry_socket": self.reg.socket_path,
                                            "registry_autostart": False, "min_import_tokens": 16}}
        vllm_config = engine_config(tiny_model_dir, tc)
        vllm_config.cache_config.num_gpu_blocks = NUM_BLOCKS
        self.scheduler = Scheduler(vllm_config, kv_cache_config(),
                                   StructuredOutputManager(vllm_config), block_size=16)
        self.worker = build_connector(engine_config(tiny_model_dir, tc), "WORKER")
        self.worker.register_kv_caches({LAYER: torch.zeros(NUM_BLOCKS, 2, 16, 32)})
        self.ours = self.scheduler.connector._scheduler
        self.ours.on_startup_handshakes({0: self.worker.get_handshake_metadata()})
        ns = self.ours._namespace
        assert ns, "no namespace: the handshake did not take"
        keys = BlockKeyer(ns, 16).keys(prompt)
        self.holder = self.reg.connect("neighbour")
        self.holder.register_holder(ns, "neighbour", b"", b"not-a-descriptor")
        self.holder.publish(keys, list(range(len(keys))), parents=[b""] + keys[:-1])
        hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self.req = Request("r", prompt, SamplingParams(max_tokens=4), None,
                           block_hasher=get_request_block_hasher(16, hash_fn))
        self.scheduler.add_request(self.req)

    def step(self):
        out = self.scheduler.schedule()
        return out, self.run(out)

    def run(self, out):
        """The worker runs a scheduled step as kv_connector_no_forward does; its output."""
        from vllm.v1.outputs import KVConnectorOutput

        worker = self.worker
        worker.bind_connector_metadata(out.kv_connector_metadata)
        worker.start_load_kv(None)
        kvo = KVConnectorOutput()
        kvo.finished_sending, kvo.finished_recving = worker.get_finished(out.finished_req_ids)
        kvo.invalid_block_ids = worker.get_block_ids_with_load_errors()
        kvo.kv_connector_worker_meta = worker.build_connector_worker_meta()
        worker.clear_connector_metadata()
        return kvo

    def close(self) -> None:
        self.holder.close()
        self.worker.shutdown()
        self.scheduler.shutdown()
        self.reg.stop()


def test_an_unreadable_neighbour_costs_one_parked_step_then_prefill(tiny_model_dir, socket_dir):
    from vllm.v1.outputs import ModelRunnerOutput

    node = _Node(tiny_model_dir, socket_dir, list(range(1000, 1000 + 5 * 16 + 3)))
    parked = 0
    try:
        for _step in range(12):
            out, kvo = node.step()
            if out.num_scheduled_tokens.get("r"):
                break  # the request computes: no livelock
            if node.req.status.name == "WAITING_FOR_REMOTE_KVS":
                parked += 1
            node.scheduler.update_from_output(out, ModelRunnerOutput.with_kv_conn_output_only(kvo))
        assert out.num_scheduled_tokens.get("r"), (
            f"after 12 steps request r was never scheduled for compute; it was parked in "
            f"WAITING_FOR_REMOTE_KVS {parked} times (promised blocks that are never leased)")
        assert parked == 1
    finally:
        node.close()


def test_abort_while_parked_with_a_shortfall_job(tiny_model_dir, socket_dir):
    """The request is aborted after vLLM parked it (job planned and sent); the worker
    reports it; vLLM frees it without asserting; no lease is left."""
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import RequestStatus

    node = _Node(tiny_model_dir, socket_dir, list(range(5000, 5000 + 5 * 16 + 3)))
    try:
        for step in range(3):
            out = node.scheduler.schedule()
            if step == 0:
                assert node.req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
                node.scheduler.finish_requests("r", RequestStatus.FINISHED_ABORTED)
            kvo = node.run(out)
            node.scheduler.update_from_output(out, ModelRunnerOutput.with_kv_conn_output_only(kvo))
        assert "r" not in node.scheduler.requests
        assert node.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1
        node.ours._link.flush()
        assert node.holder.status().active_leases == 0
    finally:
        node.close()
