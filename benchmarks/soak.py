"""Soak: thousands of import cycles between two engines, checked against a reference.

Engines (separate processes, one registry): A exports, B imports, both with
MarketplaceConnector and small KV caches (``num_gpu_blocks_override``) so blocks are
evicted and reused all the time; R has no connector and no prefix cache (every output is a
plain recompute). Each round A computes a batch of prefixes drawn from a pool, then B and R
get the same batch of prompts = prefix + fresh suffix: most prefixes are the ones A just
exported (hits), the rest are older pool entries A may have evicted or overwritten (misses,
partial hits, failed loads). An import cycle is one B request that looked for an A prefix.

Checks: B's greedy tokens against R's. In float32 (``--cpu``) they must be equal. In
bfloat16 (GPU default) two prefills of the same tokens round differently, so a near-tie can
flip a token for vLLM's own prefix cache as for an import: a mismatch there is a first-token
logprob differing by more than ``--logprob-tol`` (a wrong page moves it by whole units);
token flips within the tolerance are counted separately. At start (after a warm-up) and end
it prints GPU memory, the regions/IPC allocations B maps, /dev/shm bytes and files, and
each engine's fds; a table is the last thing printed.

GPU (one H200):  python3 benchmarks/soak.py --cycles 10000
CPU (small):     .venv/bin/python benchmarks/soak.py --cpu --cycles 200
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kvmkt_connector.demo.engine_process import EngineProcess, fd_count, group_pids  # noqa: E402
from kvmkt_connector.demo.tiny_model import (  # noqa: E402
    GPU_TEST_SHAPE,
    TinyLlamaShape,
    write_tiny_llama,
)
from kvmkt_connector.registry.client import RegistryClient  # noqa: E402

BS = 16
CONNECTOR = {"kv_connector": "MarketplaceConnector", "kv_role": "kv_both"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU engines, float32, small model")
    ap.add_argument("--cycles", type=int, default=10_000, help="B requests to run (at least)")
    ap.add_argument("--batch", type=int, default=None, help="requests per call (GPU 128, CPU 16)")
    ap.add_argument("--pool", type=int, default=None, help="prefixes in the pool (GPU 4096, CPU 256)")
    ap.add_argument("--blocks", type=int, default=None,
                    help="KV blocks of A and B (GPU 1024, CPU 192): small, so they evict")
    ap.add_argument("--min-blocks", type=int, default=2, help="shortest prefix, in blocks")
    ap.add_argument("--max-blocks", type=int, default=6, help="longest prefix, in blocks")
    ap.add_argument("--fresh-share", type=float, default=0.75,
                    help="share of B's prompts on a prefix A computed this round")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per request (GPU 1, CPU 2)")
    ap.add_argument("--dtype", default=None, help="GPU bfloat16, CPU float32")
    ap.add_argument("--logprob-tol", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="stop the cycles this many seconds after the start (engine start-up "
                         "included) and still print the table")
    ap.add_argument("--workdir", default=None, help="engine logs and registry (default: a temp dir)")
    args = ap.parse_args(argv)
    gpu = not args.cpu
    defaults = dict(batch=128 if gpu else 16, pool=4096 if gpu else 256,
                    blocks=1024 if gpu else 192, max_tokens=1 if gpu else 2,
                    dtype="bfloat16" if gpu else "float32")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ------------------------------------------------------------ what the processes hold


def shm_usage(ours: set[str]) -> tuple[int, int, int, int]:
    """(bytes, files) of /dev/shm in all and of this run's kvmkt files (the engines' export
    regions and generation tables, the registry's lookup table) only."""
    total = files = k_bytes = k_files = 0
    for name in os.listdir("/dev/shm"):
        path = os.path.join("/dev/shm", name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        used = st.st_blocks * 512  # allocated, not apparent, size
        total, files = total + used, files + 1
        if path in ours or any(name.startswith(p) for p in ours):
            k_bytes, k_files = k_bytes + used, k_files + 1
    return total, files, k_bytes, k_files


def shm_mappings(pids: list[int]) -> int:
    """Holder files (other engines' export regions, generation tables) mapped by ``pids``."""
    marker = f"kvmkt-{os.getuid()}-holder-"
    n = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                n += sum(marker in line for line in f)
        except OSError:
            pass
    return n


def gpu_memory(engines: dict[str, EngineProcess]) -> str:
    """GPU memory in use (nvidia-smi: no CUDA context of our own) and per engine."""
    if not shutil.which("nvidia-smi"):
        return "n/a (no nvidia-smi)"
    used = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=False).stdout.split()
    apps = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=False).stdout.splitlines()
    per_pid = {int(p): int(m) for p, m in (ln.split(",") for ln in apps if "," in ln)}
    per_engine = {name: sum(per_pid.get(pid, 0) for pid in group_pids(e.pid))
                  for name, e in engines.items()}
    return f"GPUs {' '.join(used)} MiB used; per engine MiB {per_engine}"


def snapshot(engines: dict[str, EngineProcess], registry: RegistryClient) -> dict:
    b = engines["B"]
    b.generate([[5] * 20], max_tokens=1)  # a step, so B's gauges are current
    metrics = b.metrics()
    status = registry.status()
    ours = {registry.lookup_table_path} | {
        f"kvmkt-{os.getuid()}-holder-{pid}-" for e in engines.values() for pid in group_pids(e.pid)}
    total, files, k_bytes, k_files = shm_usage(ours)
    return {
        "gpu": gpu_memory(engines),
        "B mapped regions (gauge)": int(metrics.get("vllm:kvmkt_mapped_regions", 0)),
        "B mapped holder files (/proc maps)": shm_mappings(group_pids(b.pid)),
        "/dev/shm MiB": round(total / 2**20, 1),
        "/dev/shm files": files,
        "/dev/shm MiB of this run": round(k_bytes / 2**20, 1),
        "/dev/shm files of this run": k_files,
        **{f"fds {n}": fd_count(group_pids(e.pid)) for n, e in engines.items()},
        "registry holders": len(status.holders),
        "registry published blocks": status.published_blocks,
        "registry active leases": status.active_leases,
    }


# ------------------------------------------------------------ the soak

def start_engines(args, work: str) -> dict[str, EngineProcess]:
    shape = TinyLlamaShape() if args.cpu else GPU_TEST_SHAPE
    model = write_tiny_llama(os.path.join(work, "model"), seed=3, shape=shape)
    base = dict(model=model, skip_tokenizer_init=True, block_size=BS, dtype=args.dtype,
                enforce_eager=True, seed=0, max_model_len=1024,
                max_num_seqs=max(args.batch, 16), disable_log_stats=False)
    env = {"KVMKT_REGISTRY_SOCKET": os.path.join(work, "reg", "registry.sock")}
    if args.cpu:  # a small KV cache: shared dev boxes run short of memory
        base["kv_cache_memory_bytes"] = 256 << 20
    else:
        base["gpu_memory_utilization"] = 0.2
    small = dict(num_gpu_blocks_override=args.blocks, enable_prefix_caching=True)
    specs = {
        "A": dict(base, kv_transfer_config=CONNECTOR, **small),
        "B": dict(base, kv_transfer_config=CONNECTOR, **small),
        # no prefix cache: blocks for one batch are all it needs
        "R": dict(base, enable_prefix_caching=False,
                  num_gpu_blocks_override=max(args.blocks, args.batch * (args.max_blocks + 3))),
    }
    engines: dict[str, EngineProcess] = {}
    try:
        for name, kw in specs.items():
            engines[name] = EngineProcess(kw, env, os.path.join(work, f"engine-{name}.log"))
            if not args.cpu:  # engines sharing a GPU start one after the other (profiling)
                engines[name].wait_ready()
        for e in engines.values():
            e.wait_ready()
    except BaseException:
        for e in engines.values():
            e.kill()
        raise
    return engines


def settle_exports(registry: RegistryClient, listed_before: int, cap_s: float = 2.0) -> None:
    """A publishes a request's pages shortly after it finished (a step or a background
    hand-off later): wait until the registry's count moved and then held for 50 ms."""
    deadline = time.monotonic() + cap_s
    last, moved = listed_before, False
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = registry.status().published_blocks
        if moved and now == last:
            return
        moved, last = moved or now != listed_before, now


def run(args) -> int:
    rng = random.Random(args.seed)
    vocab = (TinyLlamaShape() if args.cpu else GPU_TEST_SHAPE).vocab_size
    pool = [[rng.randrange(3, vocab) for _ in range(BS * rng.randint(args.min_blocks, args.max_blocks))]
            for _ in range(args.pool)]
    work = args.workdir or tempfile.mkdtemp(prefix="kvmkt-soak-", dir="/tmp")
    os.makedirs(os.path.join(work, "reg"), mode=0o700, exist_ok=True)
    t_start = time.monotonic()
    engines = start_engines(args, work)
    a, b, r = engines["A"], engines["B"], engines["R"]
    print(f"engines up in {time.monotonic() - t_start:.0f} s (logs in {work})", flush=True)
    socket = os.path.join(work, "reg", "registry.sock")
    stats = dict(cycles=0, hits=0, full=0, misses=0, imported_tokens=0, mismatches=0,
                 token_flips=0, max_abs_dlogprob=0.0)
    bad: list[str] = []
    try:
        with RegistryClient.connect(socket, client_name="soak", autostart=False) as registry:
            # warm-up: every engine has run, B has met A once, before the start figures
            warm = pool[:4]
            a.generate(warm, max_tokens=1)
            settle_exports(registry, 0)
            b.generate([p + [7, 8, 9] for p in warm], max_tokens=1)
            r.generate([p + [7, 8, 9] for p in warm], max_tokens=1)
            before_metrics = b.metrics()
            start = snapshot(engines, registry)
            print("start:", start, flush=True)
            t0 = time.monotonic()
            rounds = 0
            while stats["cycles"] < args.cycles:
                if args.deadline_s and time.monotonic() - t_start > args.deadline_s:
                    print(f"deadline: stopping after {stats['cycles']} cycles", flush=True)
                    break
                rounds += 1
                exported = rng.sample(range(args.pool), args.batch)
                listed = registry.status().published_blocks
                a.generate([pool[i] for i in exported], max_tokens=1)
                settle_exports(registry, listed)
                picks = [i if rng.random() < args.fresh_share else rng.randrange(args.pool)
                         for i in exported]
                batch = [pool[i] + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 24))]
                         for i in picks]
                got = b.generate(batch, max_tokens=args.max_tokens, logprobs=1)
                ref = r.generate(batch, max_tokens=args.max_tokens, logprobs=1)
                for i, (g, w) in enumerate(zip(got, ref, strict=True)):
                    stats["cycles"] += 1
                    stats["imported_tokens"] += g.imported_tokens
                    if g.imported_tokens > 0:
                        stats["hits"] += 1
                        stats["full"] += g.imported_tokens == len(pool[picks[i]]) // BS * BS
                    else:
                        stats["misses"] += 1
                    dlp = abs(g.first_logprob - w.first_logprob)
                    stats["max_abs_dlogprob"] = max(stats["max_abs_dlogprob"], dlp)
                    if g.token_ids == w.token_ids and (args.cpu or dlp <= args.logprob_tol):
                        continue
                    if args.cpu or dlp > args.logprob_tol:
                        stats["mismatches"] += 1
                        bad.append(f"round {rounds} #{i}: B {g.token_ids} ({g.first_logprob:.4f}) "
                                   f"R {w.token_ids} ({w.first_logprob:.4f}), imported "
                                   f"{g.imported_tokens}")
                    else:
                        stats["token_flips"] += 1
                if rounds % 10 == 0:
                    rate = stats["cycles"] / (time.monotonic() - t0)
                    print(f"round {rounds}: {stats} ({rate:.0f} cycles/s)", flush=True)
            elapsed = time.monotonic() - t0
            time.sleep(2.0)  # background sweeps (idle mappings, releases) have their chance
            end = snapshot(engines, registry)
            after_metrics = b.metrics()
    finally:
        for e in engines.values():
            e.stop()
    for line in bad[:20]:
        print("MISMATCH", line)
    print("end:", end, flush=True)

    def delta(name: str) -> int:
        return int(after_metrics.get(name, 0) - before_metrics.get(name, 0))

    rows = [
        ("mode", f"{'CPU' if args.cpu else 'GPU'} {args.dtype}, batch {args.batch}, pool "
                 f"{args.pool} prefixes of {args.min_blocks}-{args.max_blocks} blocks, "
                 f"{args.blocks} KV blocks in A and B"),
        ("import cycles (B requests)", stats["cycles"]),
        ("rounds", rounds),
        ("seconds (cycles/s)", f"{elapsed:.1f} ({stats['cycles'] / elapsed:.0f}/s)"),
        ("imported (full prefix)", f"{stats['hits']} ({stats['full']})"),
        ("nothing imported", stats["misses"]),
        ("imported tokens", stats["imported_tokens"]),
        ("B blocks recomputed after a failed load", delta("vllm:kvmkt_fallback_load_error")),
        ("B lookups that found nothing", delta("vllm:kvmkt_fallback_miss")),
        ("MISMATCHES vs R", stats["mismatches"]),
        ("token flips within logprob tol", stats["token_flips"]),
        ("max |first-token logprob B - R|", f"{stats['max_abs_dlogprob']:.2e}"),
    ]
    for key in start:
        rows.append((f"{key}: start -> end", f"{start[key]} -> {end[key]}"))
    width = max(len(k) for k, _ in rows)
    print("\n== soak ==")
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    return 1 if stats["mismatches"] or stats["cycles"] < args.cycles else 0


if __name__ == "__main__":
    sys.exit(run(parse(sys.argv[1:])))
