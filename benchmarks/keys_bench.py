"""Cost of block keys (kvmkt_connector.hashing) per prompt length, in-process.

    python benchmarks/keys_bench.py

Prints the median of 50 runs for a one-shot computation of all full-block keys of a fresh
prompt (what the scheduler pays once per new request) and for extending an existing
request's keys by one block (what decode steps pay at most). Table last.
"""

from __future__ import annotations

import random
import statistics
import time

from kvmkt_connector.hashing import BlockKeyer, KeyScope


def main() -> None:
    keyer = BlockKeyer(bytes(16), 16)
    rng = random.Random(0)
    rows = []
    for n in (1024, 4096, 16384, 32768):
        tokens = [rng.randrange(128000) for _ in range(n + 16)]
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            prefix = keyer.start(KeyScope("salt"))
            prefix.extend(tokens[:n])
            times.append(time.perf_counter() - t0)
        ext = []
        for _ in range(50):
            prefix = keyer.start(KeyScope("salt"))
            prefix.extend(tokens[:n])
            t0 = time.perf_counter()
            prefix.extend(tokens)
            ext.append(time.perf_counter() - t0)
        rows.append((n, n // 16, statistics.median(times), statistics.median(ext)))
    print(f"{'tokens':>7}{'blocks':>8}{'all keys (ms)':>15}{'us/block':>10}{'+1 block (us)':>15}")
    for n, blocks, t, e in rows:
        print(f"{n:>7}{blocks:>8}{t * 1e3:>15.3f}{t / blocks * 1e6:>10.2f}{e * 1e6:>15.1f}")


if __name__ == "__main__":
    main()
