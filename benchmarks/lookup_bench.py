"""What an import's lookup costs the importer's scheduler: ImportPlanner.match against a live
registry, by prefix length, leasing by the last key (holders publish parent links) against
leasing by every key (a holder that publishes no links: the planner then computes every key).

    python benchmarks/lookup_bench.py

One registry process, one holder connection publishing a prefix, the importer's
RegistryLink + ImportPlanner in this process (in-place copies: ``verify_all_keys`` off, as
with cuda_ipc). Each request is the published prefix plus a fresh user turn; median of 60
``match`` calls with the lease read (bisect the shared-memory table, post the lease, read and
check it; since session 6 the read happens after vLLM's allocation, here right away). Table last.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "registry")]

from registry_helpers import RegistryProcess, import_planner  # noqa: E402

from kvmkt_connector.hashing import PrefixKeys  # noqa: E402

BS, NS, ROOT_KEY = 16, b"n" * 16, b"bench-root"


def median_match_ms(reg: RegistryProcess, blocks: int, linked: bool, turn: int, rng) -> float:
    shared = [rng.randrange(128_000) for _ in range(blocks * BS)]
    keys = PrefixKeys(ROOT_KEY, BS).extend(shared)
    holder = reg.connect("holder")
    holder.register_holder(NS, f"h{blocks}{linked}", b"", b"d")
    holder.publish(keys, list(range(len(keys))), parents=[b""] + keys[:-1] if linked else ())
    planner, link = import_planner(reg.socket_path, BS, verify_all_keys=False)
    times = []
    for i in range(60):
        tokens = shared + [rng.randrange(128_000) for _ in range(turn)]
        req = SimpleNamespace(request_id=f"r{i}", num_tokens=len(tokens), all_token_ids=tokens,
                              kv_transfer_params=None)  # fmt: skip
        t0 = time.perf_counter()
        promised = planner.match(req, PrefixKeys(ROOT_KEY, BS), NS, 0)
        state = planner._requests[req.request_id]
        if state.asked is not None:  # the lease is read later, once vLLM allocated: count it
            planner._settle(state)
        times.append(time.perf_counter() - t0)
        got = state.usable * BS if state.lease is not None else 0
        assert promised == got == blocks * BS, (promised, got, blocks)
        planner.on_request_finished(req.request_id)  # (tokens, keys)
    link.close()
    holder.close()
    return statistics.median(times) * 1e3


def main() -> int:
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(dir="/tmp") as work:
        reg = RegistryProcess(os.path.join(work, "r.sock"), "--capacity", "200000")
        try:
            rows = [(b, t, median_match_ms(reg, b, True, t, rng), median_match_ms(reg, b, False, t, rng))
                    for b, t in ((128, 100), (512, 100), (1024, 30), (1875, 30))]
        finally:
            reg.stop()
    print("\n== ImportPlanner.match, median ms (bisect + lease + bookkeeping) ==")
    print(f"{'tokens':>7} {'blocks':>6} {'by last key':>12} {'by every key':>13} {'x':>6}")
    for blocks, _turn, chain_ms, every_ms in rows:
        print(f"{blocks * BS:7d} {blocks:6d} {chain_ms:12.3f} {every_ms:13.3f} {every_ms / chain_ms:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
