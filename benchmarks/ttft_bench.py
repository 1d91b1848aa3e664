"""Time to first token with MarketplaceConnector: import vs recompute vs local hit.

    python benchmarks/ttft_bench.py [--out DIR] [--reps 5] [--floor]

Instances (vLLM 0.26.0, Llama-3-8B shape, dummy weights, bf16, default compilation and
CUDA graphs, token-id prompts): A exports (GPU0), B imports (GPU1), R has no connector
(GPU1). With one GPU all three share it (then the copy is a same-GPU copy, not NVLink).
Engines sharing a GPU start one after the other.

Workloads, each measured ``--reps`` times with a fresh random prefix, one request at a time
(TTFT = wall time of a one-token generate, as in ../shared/gpu-host/vllm_smoke.py):
  chat  shared system prompt of 2k/4k/8k tokens + a unique ~100-token user turn
  doc   a document of 4k/16k/30k tokens read on A, then asked about on B (+ ~30 tokens)
Arms: recompute (R, connector off), import (B, prefix exported by A), local hit (B again,
same prefix, now in its own cache, after A and R prefilled prompts as long: the import's
conditions, B idle meanwhile), warm hit (the same, right after the import). Ratio = import /
(local hit + KV bytes / copy peak), with the copy peak measured in this run (1 GiB torch copy
GPU0 -> GPU1); "warm" divides by the warm hit instead.

With ``--floor``, engine F (next to B) runs ``benchmarks/async_floor_connector.py``, which
claims the same prefix and moves no KV: "floor async" is the time to first token of an
asynchronous import that costs nothing on our side (vLLM parks the request, then promotes
it), "floor sync" that of a synchronous claim (what issue 8 rules out on GPU defaults). Their
outputs are meaningless (the blocks keep what they held); only their times count. Engines
then take 0.22 of the GPU each instead of 0.27.

Overhead: (1) no shared prefixes, connector on (B) vs off (R): output tokens/s; (2) the
exporter's (A's) tokens/s alone vs while B imports from it in a loop (pair only: on one GPU
B's own compute would share A's GPU). Prints tables last and writes ttft.png + ttft.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kvmkt_connector.demo.engine_process import EngineProcess  # noqa: E402
from kvmkt_connector.demo.tiny_model import write_llama3_8b_config  # noqa: E402

KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # layers x (K,V) x kv heads x head dim x bf16
CHAT = [2048, 4096, 8192]
DOC = [4096, 16384, 30000]
VOCAB = 128000


def copy_peak_gbs(pair: bool) -> float:
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0").random_()
    dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:1" if pair else "cuda:0")
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return (1 << 30) / statistics.median(times) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (faster start)")
    ap.add_argument("--floor", action="store_true",
                    help="engine F: vLLM's floor for async/sync imports (async_floor_connector)")
    ap.add_argument("--lengths", default="",
                    help="only these prefix lengths, comma-separated (e.g. 16384,30000: more "
                         "reps where the goals are, in the same time)")
    args = ap.parse_args(argv)
    only = {int(x) for x in args.lengths.split(",") if x}
    import torch

    pair = torch.cuda.device_count() >= 2
    peak = copy_peak_gbs(pair)
    print(f"copy peak ({'GPU0->GPU1 peer' if pair else 'same-GPU'}, 1 GiB): {peak:.1f} GB/s", flush=True)

    work = tempfile.mkdtemp(prefix="kvmkt-ttft-", dir="/tmp")
    os.makedirs(os.path.join(work, "reg"), mode=0o700)
    env = {"KVMKT_REGISTRY_SOCKET": os.path.join(work, "reg", "registry.sock"),
           "KVMKT_TRACE": os.environ.get("KVMKT_TRACE", "0")}
    model = write_llama3_8b_config(os.path.join(work, "llama3-8b"))
    max_len = 32768 + 256
    base = dict(model=model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                max_model_len=max_len, max_num_batched_tokens=max_len, block_size=16,
                enable_prefix_caching=True,
                gpu_memory_utilization=(0.3 if args.floor else 0.42) if pair
                else (0.22 if args.floor else 0.27),
                enforce_eager=args.eager, seed=0)
    conn = {"kv_connector": "MarketplaceConnector", "kv_role": "kv_both"}
    gpu_b = "1" if pair else "0"
    specs = [("A", dict(base, kv_transfer_config=conn), "0"),
             ("B", dict(base, kv_transfer_config=conn), gpu_b),
             ("R", dict(base), gpu_b)]
    floor_conn = {"kv_connector": "AsyncFloorConnector", "kv_role": "kv_both",
                  "kv_connector_module_path": "benchmarks.async_floor_connector"}
    if args.floor:
        specs.append(("F", dict(base, kv_transfer_config=floor_conn), gpu_b))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    engines: dict[str, EngineProcess] = {}
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    t0 = time.time()
    try:
        for name, kw, gpus in specs:
            extra = ({"KVMKT_PROFILE": os.path.join(args.out, f"profile-{name}")}
                     if os.environ.get("KVMKT_PROFILE") else {})  # (see logs.HookTimes)
            if name == "F":  # (vLLM imports the floor connector by module path)
                extra["PYTHONPATH"] = os.pathsep.join(
                    p for p in (repo, os.environ.get("PYTHONPATH")) if p)
            engines[name] = EngineProcess(kw, dict(env, CUDA_VISIBLE_DEVICES=gpus, **extra),
                                          os.path.join(args.out, "logs", f"ttft-engine-{name}.log"))
            if not pair or name != "A":  # engines sharing a GPU start one at a time
                for e in engines.values():
                    e.wait_ready()
        print(f"engines up in {time.time() - t0:.0f} s", flush=True)
        a, b, r = engines["A"], engines["B"], engines["R"]
        f = engines.get("F")
        rng = random.Random(0)

        def toks(n):
            return [rng.randrange(1000, VOCAB) for _ in range(n)]

        for e in engines.values():  # warm-up (compile paths, CUDA graphs)
            e.generate([toks(512)], max_tokens=4)
        if f is not None:  # and the floor's paths once each
            for mode in ("async", "sync"):
                f.generate([toks(520)], max_tokens=1, options=[
                    {"kv_transfer_params": {"kvmkt_floor": mode, "floor_tokens": 512}}])
        warm = toks(512)  # one import first: B's first copy compiles nothing, but opens A's
        a.generate([warm], max_tokens=1)  # IPC handles, which the timed imports then reuse
        time.sleep(0.1)
        b.generate([warm + toks(8)], max_tokens=1)

        rows = []
        for workload, lengths, suffix in (("chat", CHAT, 100), ("doc", DOC, 30)):
            for length in [n for n in lengths if not only or n in only]:
                res = {"recompute": [], "import": [], "local hit": [], "warm hit": []}
                if f is not None:
                    res.update({"floor async": [], "floor sync": []})
                imported, floor_claimed = [], []
                for _ in range(args.reps):
                    prefix = toks(length)
                    a.generate([prefix + toks(suffix)], max_tokens=1)  # A computes, exports
                    time.sleep(0.05)  # exports are published one engine step later
                    (rec,) = r.generate([prefix + toks(suffix)], max_tokens=1)
                    t_sub = time.monotonic_ns()
                    (imp,) = b.generate([prefix + toks(suffix)], max_tokens=1)
                    print(f"import-call {t_sub} {time.monotonic_ns()} {length}", flush=True)
                    (warm,) = b.generate([prefix + toks(suffix)], max_tokens=1)
                    if f is not None:  # (a new prefix each: F caches what it claimed)
                        for mode in ("async", "sync"):
                            prompt = toks(length + suffix)
                            t_sub = time.monotonic_ns()
                            (fl,) = f.generate([prompt], max_tokens=1, options=[
                                {"kv_transfer_params": {"kvmkt_floor": mode,
                                                        "floor_tokens": length}}])
                            if mode == "async":  # (trace_breakdown's phases for F)
                                print(f"floor-call {t_sub} {time.monotonic_ns()} {length}",
                                      flush=True)
                            res[f"floor {mode}"].append(fl.seconds)
                            floor_claimed.append(fl.cached_tokens)
                    # The local hit under the import's conditions: B idle while A and R
                    # prefill as long a prompt (right after the import, B is still warm).
                    a.generate([toks(length + suffix)], max_tokens=1)
                    time.sleep(0.05)
                    r.generate([toks(length + suffix)], max_tokens=1)
                    t_sub = time.monotonic_ns()
                    (hit,) = b.generate([prefix + toks(suffix)], max_tokens=1)
                    print(f"hit-call {t_sub} {time.monotonic_ns()} {length}", flush=True)
                    res["recompute"].append(rec.seconds)
                    res["import"].append(imp.seconds)
                    res["local hit"].append(hit.seconds)
                    res["warm hit"].append(warm.seconds)
                    imported.append(imp.imported_tokens)
                rows.append(dict(workload=workload, prefix=length, imported=imported,
                                 floor_claimed=floor_claimed, **res))
                print(f"{workload} {length}: " + ", ".join(
                    f"{k} {statistics.mean(v) * 1e3:.1f} ms" for k, v in res.items()), flush=True)

        over = overhead(a, b, r, toks, pair)
    finally:
        for e in engines.values():
            e.stop()

    report(rows, over, peak, pair, args.out)
    return 0


def overhead(a, b, r, toks, pair: bool) -> dict:
    """Output tokens/s: connector on vs off; exporter alone vs while B imports from it."""
    out = {}
    batch = [toks(1024) for _ in range(64)]

    def tput(engine, prompts):
        res = engine.generate(prompts, max_tokens=128)
        return sum(len(c.token_ids) for c in res) / res[0].seconds

    runs = {"on": [], "off": []}
    for _ in range(2):  # alternate to spread drift over both
        runs["on"].append(tput(b, [p[:] for p in batch]))
        runs["off"].append(tput(r, [p[:] for p in batch]))
        batch = [toks(1024) for _ in range(64)]
    out["connector_on_tok_s"] = statistics.mean(runs["on"])
    out["connector_off_tok_s"] = statistics.mean(runs["off"])
    if not pair:
        out["exporter_note"] = "skipped: needs two GPUs (B's compute would share A's GPU)"
        return out
    shared = [toks(8192) for _ in range(16)]
    a.generate(shared, max_tokens=1)
    time.sleep(0.2)
    alone = tput(a, [toks(1024) for _ in range(64)])
    stop = threading.Event()
    imports = []

    def importer():
        i = 0
        while not stop.is_set():
            (c,) = b.generate([shared[i % len(shared)] + toks(16)], max_tokens=1)
            imports.append(c.imported_tokens)
            i += 1

    t = threading.Thread(target=importer)
    t.start()
    time.sleep(0.5)
    busy = tput(a, [toks(1024) for _ in range(64)])
    stop.set()
    t.join()
    out.update(exporter_alone_tok_s=alone, exporter_while_importing_tok_s=busy,
               imports_during=len(imports), imported_tokens_during=sum(imports))
    return out


def report(rows, over, peak, pair, out_dir) -> None:
    with open(os.path.join(out_dir, "ttft.json"), "w") as f:
        json.dump(dict(rows=rows, overhead=over, peak_gbs=peak, pair=pair), f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm, style in (("recompute", "o-"), ("import", "s-"), ("local hit", "^-"),
                           ("warm hit", "v:"), ("floor async", "x--")):
            pts = sorted((row["prefix"], statistics.mean(row[arm]) * 1e3) for row in rows if arm in row)
            ax.plot([p for p, _ in pts], [t for _, t in pts], style, label=arm)
        ax.set_xlabel("shared prefix (tokens)")
        ax.set_ylabel("TTFT (ms, mean)")
        ax.set_yscale("log")
        ax.set_title("Llama-3-8B shape, H200" + (" pair" if pair else " (one GPU)"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "ttft.png"), dpi=120)
    except Exception as e:  # the numbers matter more than the picture
        print(f"plot skipped: {e}")

    def p90(v):
        return sorted(v)[max(0, int(round(0.9 * len(v))) - 1)]

    print("\n== TTFT (ms): mean / p90 per arm ==")
    print(f"{'workload':<6}{'prefix':>7}{'recompute':>16}{'import':>16}{'local hit':>16}"
          f"{'warm hit':>16}{'imported':>9}{'eff GB/s':>9}{'ratio':>7}{'warm':>6}")
    for row in rows:
        arms = ("recompute", "import", "local hit", "warm hit")
        m = {k: statistics.mean(row[k]) for k in arms if k in row}
        kv = statistics.mean(row["imported"]) * KV_BYTES_PER_TOKEN
        extra = m["import"] - m["local hit"]
        eff = kv / extra / 1e9 if extra > 0 else float("inf")
        ratio = m["import"] / (m["local hit"] + kv / (peak * 1e9))
        warm = m["import"] / (m["warm hit"] + kv / (peak * 1e9)) if "warm hit" in m else float("nan")
        cells = "".join(f"{m[k] * 1e3:>8.1f}/{p90(row[k]) * 1e3:<7.1f}" if k in m else f"{'-':>16}"
                        for k in arms)
        print(f"{row['workload']:<6}{row['prefix']:>7}{cells}{min(row['imported']):>9}"
              f"{eff:>9.0f}{ratio:>7.2f}{warm:>6.2f}")
    if any("floor async" in row for row in rows):
        print("\n== floor (F, async_floor_connector: no KV moved), ms mean / p90 ==")
        print("ratio = arm / (local hit + bytes/peak), as for the import; import/floor = how much "
              "our import adds to vLLM's own asynchronous path")
        print(f"{'workload':<6}{'prefix':>7}{'floor async':>16}{'floor sync':>16}{'claimed':>9}"
              f"{'async ratio':>12}{'sync ratio':>11}{'import ratio':>13}{'import/floor':>13}")
        for row in rows:
            if "floor async" not in row:
                continue
            m = {k: statistics.mean(row[k]) for k in ("import", "local hit", "floor async",
                                                      "floor sync")}
            base = m["local hit"] + statistics.mean(row["imported"]) * KV_BYTES_PER_TOKEN / (peak * 1e9)
            cells = "".join(f"{m[k] * 1e3:>8.1f}/{p90(row[k]) * 1e3:<7.1f}"
                            for k in ("floor async", "floor sync"))
            print(f"{row['workload']:<6}{row['prefix']:>7}{cells}{min(row['floor_claimed']):>9}"
                  f"{m['floor async'] / base:>12.2f}{m['floor sync'] / base:>11.2f}"
                  f"{m['import'] / base:>13.2f}{m['import'] / m['floor async']:>13.2f}")
    print("\n== overhead (output tokens/s) ==")
    on, off = over["connector_on_tok_s"], over["connector_off_tok_s"]
    print(f"no shared prefixes: connector on {on:.0f}, off {off:.0f} ({(on / off - 1) * 100:+.2f} %)")
    if "exporter_alone_tok_s" in over:
        alone, busy = over["exporter_alone_tok_s"], over["exporter_while_importing_tok_s"]
        print(f"exporter alone {alone:.0f}, while B imports ({over['imports_during']} imports, "
              f"{over['imported_tokens_during']} tokens) {busy:.0f} ({(busy / alone - 1) * 100:+.2f} %)")
    else:
        print(f"exporter under import: {over['exporter_note']}")


if __name__ == "__main__":
    raise SystemExit(main())
