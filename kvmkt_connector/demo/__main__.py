"""Two vLLM engines sharing prefixes through MarketplaceConnector.

    python -m kvmkt_connector.demo [--device cpu|cuda] [--prefix-tokens N ...]

Engine A serves prompts built on shared prefixes (a system prompt, a document) and
exports their KV. Engine B then serves other prompts on the same prefixes: it imports the
prefix KV from A instead of computing it. For every B request the demo prints the tokens
imported, the time to first token with the import and with a full recompute on the same
engine (``skip_reading_prefix_cache``), and whether the greedy outputs are identical.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

from kvmkt_connector.demo.engine_process import EngineProcess
from kvmkt_connector.demo.tiny_model import (
    TinyLlamaShape,
    write_llama3_8b_config,
    write_tiny_llama,
)


def engine_kwargs(
    model: str, device: str, max_len: int, extra_config: dict | None = None, dummy: bool = False
) -> dict:
    kw = dict(
        model=model, skip_tokenizer_init=True, max_model_len=max_len, block_size=16,
        seed=0, enable_prefix_caching=True, max_num_batched_tokens=max_len,
        kv_transfer_config={
            "kv_connector": "MarketplaceConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": extra_config or {},
        },
    )
    if device == "cpu":
        kw.update(dtype="float32", enforce_eager=True)
    else:
        kw.update(dtype="bfloat16", gpu_memory_utilization=0.8, enforce_eager=True)
    if dummy:
        kw["load_format"] = "dummy"
    return kw


def wait_for_exports(socket_path: str, expected_blocks: int, timeout_s: float = 60) -> int:
    """Exports are published a step after their request finished: wait for them."""
    from kvmkt_connector.registry.client import RegistryClient

    deadline = time.monotonic() + timeout_s
    with RegistryClient.connect(socket_path, client_name="demo", autostart=False) as c:
        while True:
            published = c.status().published_blocks
            if published >= expected_blocks or time.monotonic() > deadline:
                return published
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", help="model dir (default: a seeded tiny Llama written now)")
    ap.add_argument("--llama8b-dummy", action="store_true",
                    help="Llama-3-8B shape with dummy weights (for timing on GPUs)")
    ap.add_argument("--prefix-tokens", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--questions", type=int, default=2, help="B requests per prefix")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    work = args.workdir or tempfile.mkdtemp(prefix="kvmkt-demo-")
    os.makedirs(os.path.join(work, "registry"), mode=0o700, exist_ok=True)
    socket_path = os.path.join(work, "registry", "registry.sock")
    os.environ["KVMKT_REGISTRY_SOCKET"] = socket_path  # a private registry for the demo
    if args.llama8b_dummy:
        model = write_llama3_8b_config(os.path.join(work, "llama3-8b-dummy"))
    else:
        model = args.model or write_tiny_llama(
            os.path.join(work, "model"), seed=0,
            shape=TinyLlamaShape(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=32),
        )
    max_len = max(4096, 1024 * -(-(max(args.prefix_tokens) + 200) // 1024))
    env = {"KVMKT_REGISTRY_SOCKET": socket_path, "VLLM_CPU_KVCACHE_SPACE": "2"}
    env_a = env_b = env
    if args.device == "cuda":
        import torch

        pair = torch.cuda.device_count() >= 2  # one GPU: both engines share it
        env_a = dict(env, CUDA_VISIBLE_DEVICES="0")
        env_b = dict(env, CUDA_VISIBLE_DEVICES="1" if pair else "0")
    print(f"[demo] workdir {work}; starting engines A and B ({args.device})", flush=True)
    kw = engine_kwargs(model, args.device, max_len, dummy=args.llama8b_dummy)
    if args.device == "cuda" and env_a == env_b:
        kw["gpu_memory_utilization"] = 0.4
    a = EngineProcess(kw, env_a, os.path.join(work, "engine-a.log"))
    if args.device == "cuda" and env_a == env_b:
        a.wait_ready()  # engines sharing a GPU must not profile memory at the same time
    b = EngineProcess(kw, env_b, os.path.join(work, "engine-b.log"))
    try:
        a.wait_ready()
        b.wait_ready()
        rng = random.Random(0)
        vocab = 500
        b.generate([[rng.randrange(3, vocab) for _ in range(64)]], max_tokens=2)  # warm-up

        def tokens(n: int) -> list[int]:
            return [rng.randrange(3, vocab) for _ in range(n)]

        prefixes = [tokens(n) for n in args.prefix_tokens]
        a_prompts = [p + tokens(40) for p in prefixes]
        a.generate(a_prompts, max_tokens=4)
        blocks = sum(len(p) // 16 for p in a_prompts)
        got = wait_for_exports(socket_path, blocks)
        print(f"[demo] A served {len(a_prompts)} prompts and published {got} blocks", flush=True)

        rows = []
        for prefix in prefixes:
            for _ in range(args.questions):
                prompt = prefix + tokens(rng.randrange(20, 80))
                (imp,) = b.generate([prompt], max_tokens=1)
                (rec,) = b.generate([prompt], max_tokens=1,
                                    options=[{"skip_reading_prefix_cache": True}])
                (imp_out,) = b.generate([prompt], max_tokens=16,
                                        options=[{"skip_reading_prefix_cache": False}])
                (rec_out,) = b.generate([prompt], max_tokens=16,
                                        options=[{"skip_reading_prefix_cache": True}])
                rows.append((len(prompt), imp.imported_tokens, imp.seconds, rec.seconds,
                             imp_out.token_ids == rec_out.token_ids and
                             imp.token_ids == rec.token_ids))
        print()
        print("Each B request, timed alone (TTFT = one-token generate): with the connector, and")
        print("recomputed on the same engine (skip_reading_prefix_cache). A later question on an")
        print("already imported prefix is a local prefix-cache hit (imported 0).")
        print(f"{'prompt':>7} {'imported':>9} {'TTFT import':>12} {'TTFT recompute':>15} "
              f"{'saved':>9} {'outputs':>8}")
        for n, imported, t_imp, t_rec, same in rows:
            print(f"{n:>7} {imported:>9} {t_imp * 1e3:>9.1f} ms {t_rec * 1e3:>12.1f} ms "
                  f"{(t_rec - t_imp) * 1e3:>6.1f} ms {'match' if same else 'DIFFER':>8}")
        first_per_prefix = rows[:: args.questions]
        ok = all(r[4] for r in rows) and all(r[1] > 0 for r in first_per_prefix)
        print(f"\n[demo] {'OK' if ok else 'PROBLEM'}: {sum(r[1] for r in rows)} tokens imported "
              f"over {len(rows)} requests; every output identical to recompute: "
              f"{all(r[4] for r in rows)}")
        return 0 if ok else 1
    finally:
        a.stop()
        b.stop()


if __name__ == "__main__":
    raise SystemExit(main())
