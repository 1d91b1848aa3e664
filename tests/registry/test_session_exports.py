"""Streaming-input sessions (vLLM's resumable requests) next to our scheduler-side connector
inside vLLM 0.26's real Scheduler (``benchmarks/scheduler_bench.Node``: in place, workers'
reports made up, a live registry): vLLM hands our update_state_after_alloc each session it
admits, and nothing a session was given is exported, while a plain request on other blocks
is (see ExportLedger._tainted and tests/unit/test_review_streaming_stale_hash.py)."""

from __future__ import annotations

import importlib.util
import os
import time

from registry_helpers import RegistryProcess

_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "scheduler_bench.py")


def _bench():
    spec = importlib.util.spec_from_file_location("scheduler_bench", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_session_blocks_are_not_exported(tmp_path):
    from vllm import SamplingParams
    from vllm.v1.request import Request, RequestStatus

    from kvmkt_connector.demo.tiny_model import write_llama3_8b_config

    bench = _bench()
    model = write_llama3_8b_config(str(tmp_path / "model"), num_layers=1)
    reg = RegistryProcess(str(tmp_path / "r.sock"), "--capacity", "10000")
    node = bench.Node("S", model, reg.socket_path, 200, 1024)
    try:
        ledger = node.ours._ledger
        session = Request("s", list(range(1000, 1000 + 5 * 16 + 3)),
                          SamplingParams(max_tokens=1, ignore_eos=True), None,
                          block_hasher=node.hasher, resumable=True)
        node.sched.add_request(session)
        node.step()
        blocks = set(node.sched.kv_cache_manager.get_block_ids("s")[0])
        assert "s" in ledger._sessions and blocks <= ledger._tainted
        node.sched.finish_requests("s", RequestStatus.FINISHED_ABORTED)
        node.run()
        assert "s" not in ledger._sessions and not ledger._listed
        # A plain request: its blocks are exported, also one vLLM gives it anew after the
        # session freed it (allocating it evicted the stale hash).
        node.add("plain", list(range(5000, 5000 + 4 * 16 + 3)))
        node.run()
        plain = node.finished_blocks["plain"][:4]
        assert set(plain) & blocks, "the test wants a session block given anew"
        time.sleep(0.05)
        node.run()
        assert set(ledger._listed) == set(plain)
    finally:
        node.close()
        reg.stop()
