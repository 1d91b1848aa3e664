"""Our scheduler-side hooks around one in-place import, inside vLLM 0.26's real Scheduler.

    python benchmarks/scheduler_bench.py [--tokens 16384] [--reps 20] [--profile]

Two vLLM Schedulers with MarketplaceConnector (kv_both) and a live registry, as on a GPU
host with cuda_ipc: A computes a prefix and exports it in place (its generation table is
real), B imports it. No model and no workers: each step's worker report is made up from the
step's metadata (copies "done" at once, steps acknowledged), so what is timed is only the
scheduler side: vLLM's scheduling and our hooks, per hook, for B's import of
``--tokens`` tokens (one lookup, allocation, plan, report, promotion, the one-token finish
that re-offers the imported prefix, and the step that publishes it). Before each import B
exports as many other blocks as the import needs, which vLLM then evicts for it (what the
TTFT bench's B sees). Medians in microseconds, table last; ``--profile``: cProfile of B's
hooks only.

A CPU box's times are not the GPU host's (the same Python ran about three times slower
there, session 10): compare before/after on one machine; the GPU figures come from
``KVMKT_TRACE=hooks`` in ttft_bench.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "registry")]

from registry_helpers import RegistryProcess  # noqa: E402

BS = 16
HOOKS = ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
         "update_connector_output", "request_finished")
DEFERRED = "  of which deferred export"  # the ledger's books of a finished request (see
# ExportLedger.on_request_finished_later): inside a hook, but after the request's output


def _config(model: str, sock: str, max_len: int):
    from vllm.engine.arg_utils import EngineArgs

    tc = {"kv_connector": "MarketplaceConnector", "kv_role": "kv_both",
          "kv_connector_extra_config": {"registry_socket": sock, "registry_autostart": False,
                                        "min_import_tokens": 16}}
    return EngineArgs(model=model, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                      block_size=BS, max_model_len=max_len, max_num_batched_tokens=max_len,
                      kv_transfer_config=tc).create_engine_config()


class Node:
    """A vLLM Scheduler with our connector; workers simulated (in place, cuda_ipc)."""

    def __init__(self, name: str, model: str, sock: str, num_blocks: int, max_len: int) -> None:
        import msgspec
        import torch
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        from kvmkt_connector.compat import KVLayoutSpec
        from kvmkt_connector.connector.metadata import MarketplaceHandshake
        from kvmkt_connector.transport.descriptors import CudaIpcDescriptor, CudaIpcSegment

        cfg = _config(model, sock, max_len)
        cfg.cache_config.num_gpu_blocks = num_blocks
        layer = "model.layers.0.self_attn.attn"
        spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=16, dtype=torch.float32)
        kvc = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                            kv_cache_groups=[KVCacheGroupSpec([layer], spec)])
        self.sched = Scheduler(cfg, kvc, StructuredOutputManager(cfg), block_size=BS)
        self.ours = self.sched.connector._scheduler
        page = 2 * 2 * 16 * 4 * BS
        layout = KVLayoutSpec("FLASH_ATTN", "NHD", "torch.float32", 1, page, 1, 1)
        desc = CudaIpcDescriptor("GPU-bench", os.getpid(), [b"\0" * 64],
                                 [CudaIpcSegment(0, 0, page, page * num_blocks)], num_blocks)
        self.ours.on_startup_handshakes({0: MarketplaceHandshake(
            0, layout, msgspec.msgpack.encode(desc), 0, "cuda_ipc")})
        assert self.ours._namespace, f"{name}: the handshake did not take"
        hash_fn = get_hash_fn_by_name(cfg.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self.hasher = get_request_block_hasher(BS, hash_fn)
        self.times: dict[str, list[float]] = defaultdict(list)  # wall, us
        self.cpu: dict[str, list[float]] = defaultdict(list)  # this thread's CPU time, us
        self.imported: dict[str, int] = {}  # request -> tokens imported (request_finished)
        self.finished_blocks: dict[str, list[int]] = {}  # request -> its blocks at finish
        self.profile = None  # a cProfile.Profile enabled inside the hooks only
        self._wrap()

    def _wrap(self) -> None:
        conn = self.sched.connector
        for hook in HOOKS:
            fn = getattr(conn, hook)

            def timed(*args, _fn=fn, _hook=hook, **kw):
                if self.profile is not None:
                    self.profile.enable()
                t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
                out = _fn(*args, **kw)
                self.times[_hook].append((time.perf_counter_ns() - t0) / 1e3)
                self.cpu[_hook].append((time.thread_time_ns() - c0) / 1e3)
                if self.profile is not None:
                    self.profile.disable()
                if _hook == "request_finished":
                    self.finished_blocks[args[0].request_id] = list(args[1])
                    if out[1]:
                        self.imported[args[0].request_id] = out[1]["kvmkt"]["imported_tokens"]
                return out
            setattr(conn, hook, timed)
        ledger = self.ours._ledger
        settle = ledger._settle_finished

        def timed_settle():
            if not ledger._finished:
                return
            t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            settle()
            self.times[DEFERRED].append((time.perf_counter_ns() - t0) / 1e3)
            self.cpu[DEFERRED].append((time.thread_time_ns() - c0) / 1e3)
        ledger._settle_finished = timed_settle

    def add(self, rid: str, tokens: list[int]) -> None:
        from vllm import SamplingParams
        from vllm.v1.request import Request

        self.sched.add_request(Request(rid, tokens, SamplingParams(max_tokens=1), None,
                                       block_hasher=self.hasher))

    def step(self) -> bool:
        """One scheduler step and its made-up output; False if nothing is left to do."""
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        from kvmkt_connector.connector.metadata import MarketplaceWorkerMetadata

        if not self.sched.has_requests():
            return False
        out = self.sched.schedule()
        meta = out.kv_connector_metadata
        worker = MarketplaceWorkerMetadata()
        kvo = KVConnectorOutput()
        for job in meta.loads:  # copied at once, all good
            worker.loads_done[job.job_id] = 1
            kvo.finished_recving = (kvo.finished_recving or set()) | {job.request_id}
        if meta.ack:
            worker.acked_step = meta.step
        kvo.kv_connector_worker_meta = worker
        ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in ids:  # a request whose prompt is now computed samples one token
            req = self.sched.requests[rid]
            done = req.num_computed_tokens + out.num_scheduled_tokens[rid] >= req.num_tokens
            sampled.append([7] if done else [])
        self.sched.update_from_output(out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=sampled, kv_connector_output=kvo))
        return True

    def run(self, max_steps: int = 50) -> None:
        for _ in range(max_steps):
            if not self.step():
                return
        raise RuntimeError("the scheduler did not settle")

    def settle(self) -> None:
        """Let the exports' publish reach the registry."""
        self.run()
        time.sleep(0.05)  # (the channel's thread publishes)
        self.run()

    def close(self) -> None:
        self.sched.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    from kvmkt_connector.demo.tiny_model import write_llama3_8b_config

    rng = random.Random(0)
    n = args.tokens // BS
    max_len = args.tokens + 64
    with tempfile.TemporaryDirectory(dir="/tmp") as work:
        model = write_llama3_8b_config(os.path.join(work, "model"), num_layers=1)
        reg = RegistryProcess(os.path.join(work, "r.sock"), "--capacity", "1000000")
        a = Node("A", model, reg.socket_path, 4 * n + 64, max_len)
        b = Node("B", model, reg.socket_path, 2 * n + 64, max_len)
        profile = None
        if args.profile:
            import cProfile

            profile = cProfile.Profile()
        rows, cpu_rows = [], []
        try:
            for rep in range(args.reps + 2):  # (the first two warm up)
                prefix = [rng.randrange(3, 30000) for _ in range(args.tokens)]
                a.add(f"a{rep}", prefix + [rng.randrange(3, 30000) for _ in range(30)])
                a.settle()
                # B exports other blocks first; its import then evicts them.
                b.add(f"f{rep}", [rng.randrange(3, 30000) for _ in range(args.tokens + 30)])
                b.settle()
                b.times.clear()
                b.cpu.clear()
                b.profile = profile if rep >= 2 else None
                b.add(f"b{rep}", prefix + [rng.randrange(3, 30000) for _ in range(30)])
                b.run()
                b.settle()
                b.profile = None
                got = b.imported.get(f"b{rep}")
                assert got == n * BS - BS * (args.tokens % BS == 0) or got == n * BS, (
                    f"import {rep}: {got} tokens imported, not the {args.tokens}-token prefix")
                if rep >= 2:
                    rows.append({h: sum(v) for h, v in b.times.items()})
                    cpu_rows.append({h: sum(v) for h, v in b.cpu.items()})
        finally:
            a.close()
            b.close()
            reg.stop()
    if profile is not None:
        import pstats

        stats = pstats.Stats(profile).sort_stats(os.environ.get("SORT", "tottime"))
        stats.print_stats(int(os.environ.get("NSTATS", "40")))
    print(f"\n== B's hooks around one {args.tokens}-token in-place import, vLLM Scheduler, "
          f"made-up worker reports (median of {args.reps}, us; wall, and this thread's CPU) ==")
    print(f"{'hook':<28}{'wall':>10}{'cpu':>10}")
    for hook in (*HOOKS, DEFERRED):
        print(f"{hook:<28}{statistics.median(r.get(hook, 0.0) for r in rows):>10.1f}"
              f"{statistics.median(r.get(hook, 0.0) for r in cpu_rows):>10.1f}")
    def total(r):
        return sum(v for h, v in r.items() if h != DEFERRED)
    print(f"{'total':<28}{statistics.median(map(total, rows)):>10.1f}"
          f"{statistics.median(map(total, cpu_rows)):>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
