"""Benchmark of the node-local prefix registry: lookup latency with concurrent clients.

Starts a real registry (subprocess), has holder processes publish ``--blocks`` blocks as
chains of ``--chain`` keys (one chain per "prompt"), then runs ``--clients`` client
processes doing lookups of ``--chain``-key runs for ``--duration`` seconds per phase:

- ``bound``: ``RegistryClient.run_bound_hint``, what the connector's scheduler calls per
  request: an upper bound of the run from O(log n) shared-memory probes, no RPC;
- ``hint``: ``RegistryClient.longest_run_hint`` (shared-memory lookup table, no RPC);
- ``lease``: ``lease`` + ``release_leases`` RPCs (one sample = both calls when a lease is
  granted, ``lease`` alone on a miss), what an importer does before it copies anything;

each open-loop (calls issued on a fixed schedule, ``--rate`` per second per client for
hints and ``--lease-rate`` for leases, whether or not the previous call was slow; clients'
schedules are staggered, as independent schedulers are) and closed-loop (back to back).

Query mix (per client, shuffled): 50 % full hits (a published chain: run = chain length),
25 % partial hits (a published chain's first k keys, k uniform in 1..chain-1, then
unpublished keys: run = k), 25 % misses (unpublished keys: run = 0). Every hint is checked
against that expected run. Meanwhile one holder keeps churning (publishes a fresh chain and
unpublishes its oldest, ``--churn`` chains per second), so the server writes the lookup
table while clients read it.

Latency is the time one call (or call pair) takes, from its start to its return. The
open-loop runs also report how many calls started over 1 ms late (the client process did
not get a CPU in time), since such delays are not the registry's.

Run: .venv/bin/python benchmarks/registry_bench.py [--clients 4] [--duration 6]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kvmkt_connector.hashing import BlockKeyer  # noqa: E402
from kvmkt_connector.registry.autostart import registry_listening  # noqa: E402
from kvmkt_connector.registry.client import RegistryClient  # noqa: E402
from kvmkt_connector.registry.lookup_table import (  # noqa: E402
    LookupTable,
    _run_numpy,
    _run_scalar,
)
from kvmkt_connector.registry.lookup_writer import LookupTableWriter  # noqa: E402

NAMESPACE = b"bench-namespace!"
BLOCK_SIZE = 16
LEASE_TTL_MS = 10_000


def make_chains(n_chains: int, chain_len: int, seed: int) -> list[list[bytes]]:
    """Real block keys of random prompts, ``chain_len`` blocks each."""
    keyer = BlockKeyer(NAMESPACE, BLOCK_SIZE)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 32_000, size=(n_chains, chain_len * BLOCK_SIZE), dtype=np.uint32)
    return [keyer.keys(row.tolist()) for row in tokens]


# ------------------------------------------------------------------ processes


def holder_main(socket_path, name, chains, churn_per_s, ready, stop) -> None:
    client = RegistryClient.connect(socket_path, client_name=name, autostart=False, timeout_s=10)
    client.register_holder(NAMESPACE, name, b"bench", b"descriptor")
    location = 0
    for chain in chains:
        client.publish(chain, list(range(location, location + len(chain))))
        location += len(chain)
    ready.set()
    if not churn_per_s:
        stop.wait()
        return
    # Churn: a fresh chain in, the oldest churned chain out, on a fixed schedule.
    chain_len, seed, live = len(chains[0]), 10_000, []
    next_at = time.monotonic()
    while not stop.is_set():
        (fresh,) = make_chains(1, chain_len, seed)
        seed += 1
        locations = list(range(location, location + chain_len))
        location += chain_len
        client.publish(fresh, locations)
        live.append(locations)
        if len(live) > 50:
            client.unpublish(live.pop(0))
        client.sync()
        next_at += 1.0 / churn_per_s
        time.sleep(max(0.0, next_at - time.monotonic()))


def build_queries(chains, chain_len: int, n: int, seed: int) -> list[tuple[list[bytes], int]]:
    rng = random.Random(seed)
    queries = []
    for i in range(n):
        kind = i % 4  # 0, 1: full hit; 2: partial; 3: miss
        chain = rng.choice(chains)
        if kind < 2:
            queries.append((chain, chain_len))
        elif kind == 2:
            k = rng.randrange(1, chain_len)
            queries.append((chain[:k] + [rng.randbytes(16) for _ in range(chain_len - k)], k))
        else:
            queries.append(([rng.randbytes(16) for _ in range(chain_len)], 0))
    rng.shuffle(queries)
    return queries


def client_main(socket_path, chains, chain_len, seed, phase_offset, phases, results) -> None:
    client = RegistryClient.connect(socket_path, client_name=f"bench-{seed}", autostart=False)
    queries = build_queries(chains, chain_len, 4000, seed)
    for keys, _ in queries[:200]:  # warm-up: map the table, touch the code paths
        client.longest_run_hint(keys)
    for name, op, rate, start_at, duration in phases:
        time.sleep(max(0.0, start_at - time.monotonic()))
        latencies, late, wrong = [], 0, 0
        end_at = start_at + duration
        i = 0
        while True:
            if rate:
                scheduled = start_at + (i + phase_offset) / rate
                now = time.monotonic()
                if scheduled > now:
                    time.sleep(scheduled - now)
                elif now - scheduled > 1e-3:
                    late += 1
            keys, expected = queries[i % len(queries)]
            t0 = time.perf_counter_ns()
            if op == "hint":
                wrong += client.longest_run_hint(keys) != expected
            elif op == "bound":
                wrong += client.run_bound_hint(keys) != expected
            else:
                grant = client.lease(NAMESPACE, keys, LEASE_TTL_MS)
                if grant is not None:
                    client.release_leases([grant.lease_id])
                wrong += (0 if grant is None else len(grant.locations)) != expected
            latencies.append(time.perf_counter_ns() - t0)
            i += 1
            if time.monotonic() >= end_at:
                break
        results.put((name, np.asarray(latencies, dtype=np.int64).tobytes(), late, wrong))
    client.close()


# ------------------------------------------------------------------ driver


def micro_benchmark(chain_len: int) -> list[str]:
    """In-process: scalar loop vs numpy for the hint, to pick NUMPY_MIN_KEYS."""
    workdir = tempfile.mkdtemp(dir="/tmp")
    try:
        writer = LookupTableWriter(os.path.join(workdir, "table"), 100_000)
        chains = make_chains(1500, chain_len, 3)
        for i, chain in enumerate(chains):
            for key in chain:
                writer.key_listed(key, i % 2)
        mapping = LookupTable.open(writer.path)._current_mapping()
        lines = ["keys  scalar_us  numpy_us   (full hits, 100k keys listed)"]
        long_chain = [k for chain in chains[0::2] for k in chain]
        for n in (4, 8, 16, 24, 32, 64, 128):
            keys = long_chain[:n]
            timings = []
            for fn in (_run_scalar, _run_numpy):
                assert fn(mapping, keys, (1 << 64) - 1) == n
                t0 = time.perf_counter()
                for _ in range(2000):
                    fn(mapping, keys, (1 << 64) - 1)
                timings.append((time.perf_counter() - t0) / 2000 * 1e6)
            lines.append(f"{n:4d}  {timings[0]:9.1f}  {timings[1]:8.1f}")
        writer.close()
        return lines
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--chain", type=int, default=64, help="keys per prompt and per lookup")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--holders", type=int, default=2)
    parser.add_argument("--rate", type=float, default=2000.0, help="open-loop hints/s/client")
    parser.add_argument(
        "--lease-rate", type=float, default=500.0, help="open-loop lease pairs/s/client"
    )
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per phase")
    parser.add_argument("--churn", type=float, default=20.0, help="chains/s churned by holder 0")
    parser.add_argument("--no-micro", action="store_true", help="skip scalar-vs-numpy timing")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="kvb-", dir="/tmp")
    socket_path = os.path.join(workdir, "registry.sock")
    capacity = int(args.blocks * 1.25) + 100 * args.chain
    server = subprocess.Popen(
        [sys.executable, "-m", "kvmkt_connector.registry", "serve", "--socket", socket_path,
         "--capacity", str(capacity), "--log-level", "WARNING"],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = []
    try:
        deadline = time.monotonic() + 20
        while not registry_listening(socket_path):
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("registry did not start")
            time.sleep(0.02)
        micro = [] if args.no_micro else micro_benchmark(args.chain)

        t0 = time.monotonic()
        chains = make_chains(args.blocks // args.chain, args.chain, seed=1)
        keygen_s = time.monotonic() - t0
        t0 = time.monotonic()
        readies = []
        for h in range(args.holders):
            ready = ctx.Event()
            share = chains[h :: args.holders]
            churn = args.churn if h == 0 else 0.0
            proc = ctx.Process(
                target=holder_main, args=(socket_path, f"holder-{h}", share, churn, ready, stop)
            )
            proc.start()
            procs.append(proc)
            readies.append(ready)
        for ready in readies:
            if not ready.wait(120):
                raise SystemExit("holders did not finish publishing")
        publish_s = time.monotonic() - t0
        with RegistryClient.connect(socket_path, client_name="driver", autostart=False) as c:
            published = c.status().published_blocks

        phase_specs = [
            ("bound open-loop", "bound", args.rate),
            ("bound closed-loop", "bound", 0.0),
            ("hint open-loop", "hint", args.rate),
            ("hint closed-loop", "hint", 0.0),
            ("lease+release open-loop", "lease", args.lease_rate),
            ("lease+release closed-loop", "lease", 0.0),
        ]
        start = time.monotonic() + 3.0  # clients import and warm up first
        phases = []
        for name, op, rate in phase_specs:
            phases.append((name, op, rate, start, args.duration))
            start += args.duration + 0.5
        results = ctx.Queue()
        clients = [
            ctx.Process(
                target=client_main,
                args=(socket_path, chains, args.chain, 100 + i, i / args.clients, phases, results),
            )
            for i in range(args.clients)
        ]
        for proc in clients:
            proc.start()
        collected: dict[str, list] = {name: [] for name, _, _ in phase_specs}
        for _ in range(args.clients * len(phase_specs)):
            name, raw, late, wrong = results.get(timeout=start - time.monotonic() + 60)
            collected[name].append((np.frombuffer(raw, dtype=np.int64), late, wrong))
        for proc in clients:
            proc.join(30)
        with RegistryClient.connect(socket_path, client_name="driver", autostart=False) as c:
            status = c.status()
    finally:
        stop.set()
        for proc in procs:
            proc.join(10)
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"cpus: {os.cpu_count()}, load average at end: {os.getloadavg()}")
    print(
        f"setup: {len(chains)} chains x {args.chain} keys = {published} blocks published by "
        f"{args.holders} holders in {publish_s:.1f} s (key generation {keygen_s:.1f} s); "
        f"churn {args.churn:g} chains/s; {args.clients} clients, {args.duration:g} s per phase"
    )
    print(
        f"server after the run: {status.published_blocks} blocks listed, "
        f"{status.lease_requests} lease requests, {status.leases_granted} granted"
    )
    if micro:
        print("\nhint micro-benchmark, in-process (selects NUMPY_MIN_KEYS):")
        print("\n".join("  " + line for line in micro))
    print(
        f"\nlookups of {args.chain}-key runs; mix 50% full hit / 25% partial / 25% miss; "
        f"open loop = {args.rate:g} hints/s or {args.lease_rate:g} lease pairs/s per client"
    )
    header = f"{'method':<27} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} {'lookups/s':>10} "
    print(header + f"{'late>1ms':>9} {'wrong':>6}")
    for name, _, _ in phase_specs:
        samples = collected[name]
        lat = np.concatenate([s[0] for s in samples]) / 1000.0
        late, wrong = sum(s[1] for s in samples), sum(s[2] for s in samples)
        p50, p99, p999 = np.percentile(lat, [50, 99, 99.9])
        print(
            f"{name:<27} {p50:8.1f} {p99:8.1f} {p999:9.1f} {len(lat) / args.duration:10.0f} "
            f"{late:9d} {wrong:6d}"
        )


if __name__ == "__main__":
    main()
