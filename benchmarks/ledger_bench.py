"""Scheduler-side bookkeeping of one in-place import, in-process (no engine, no registry).

    python benchmarks/ledger_bench.py [--tokens 16384]

The per-block work of our hooks that ``trace_breakdown.py`` finds inside an import's TTFT on
the GPU host, on vLLM's own Request and a real GenerationTable, with a channel that only
records what it is given:

  after_alloc       the import's blocks were listed exports: bump and withdraw them
  lease_check       how many leased pages of the holder are still the published ones
  confirm           the copy is confirmed: the tags of the blocks it wrote
  request_finished  the request re-offers its imported prefix (keys from the lease)
  publish_settled   the steps in flight at its finish ended: publish it

Median of ``--reps`` runs each, microseconds, table last. A CPU box's figures are not the
GPU host's (there the same Python ran about three times slower, session 10): compare
before/after on one machine.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vllm import SamplingParams  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402

from kvmkt_connector.config import MarketplaceConfig  # noqa: E402
from kvmkt_connector.connector.exporter import ExportLedger  # noqa: E402
from kvmkt_connector.connector.importer import ConfirmedImport  # noqa: E402
from kvmkt_connector.hashing import BlockKeyer, KeyScope  # noqa: E402
from kvmkt_connector.metrics import MarketplaceStats  # noqa: E402
from kvmkt_connector.transport.generations import GenerationTable  # noqa: E402

BS = 16
NUM_BLOCKS = 40_000


class _Channel:
    generation = 0

    def __init__(self) -> None:
        self.published = self.unpublished = 0

    def watch_resets(self, epoch) -> None:
        pass

    def publish(self, keys, locations, epoch=0, tokens=None, parents=None) -> None:
        self.published += len(keys)

    def unpublish(self, locations) -> None:
        self.unpublished += len(locations)

    def take_events(self) -> list:
        return []


class _Timer:
    """Times the pieces; with a profiler, profiles only them."""

    def __init__(self, profile=None) -> None:
        self.out: dict[str, float] = {}
        self._profile = profile

    def __call__(self, piece, fn, *args):
        if self._profile is not None:
            self._profile.enable()
        t0 = time.perf_counter_ns()
        result = fn(*args)
        self.out[piece] = (time.perf_counter_ns() - t0) / 1e3
        if self._profile is not None:
            self._profile.disable()
        return result


def one_import(tokens: int, gens: GenerationTable, rng: random.Random, profile=None
               ) -> dict[str, float]:  # fmt: skip
    """Times (us) of each piece of one import of ``tokens`` tokens into listed blocks."""
    n = tokens // BS
    pool = SimpleNamespace(cached_block_hash_to_block={})
    ledger = ExportLedger(MarketplaceConfig(registry_autostart=False), BS, _Channel(),
                          MarketplaceStats(), pool, None, gens)
    keyer = BlockKeyer(b"N" * 16, BS)
    # Earlier exports listed 2n blocks; vLLM evicts n of them for this import.
    listed = rng.sample(range(NUM_BLOCKS), 3 * n)
    old, dst = listed[: 2 * n], listed[2 * n :]
    old_tokens = [rng.randrange(128000) for _ in range(2 * tokens + 1)]
    old_req = Request("old", old_tokens, SamplingParams(max_tokens=1), None)
    old_req.num_computed_tokens = len(old_tokens)
    old_req.append_output_token_ids(7)
    ledger.on_request_finished(old_req, old, keyer.start(KeyScope()), True)
    ledger.on_step_acked(10**9)
    ledger.tick()
    evicted = old[:n]
    timed = _Timer(profile)
    timed("after_alloc", ledger.on_blocks_rewritten, list(evicted))
    # The importer side: the holder's tags, then the confirmation's.
    holder = gens.locations(dst)
    assert timed("lease_check", gens.unchanged_prefix, holder) == n
    prompt = [rng.randrange(128000) for _ in range(tokens + 8)]
    lease_keys = keyer.keys(prompt)[:n]
    tags = timed("confirm", gens.locations, evicted)
    known = ConfirmedImport(0, lease_keys, evicted, False, tags)
    req = Request("imp", prompt, SamplingParams(max_tokens=1), None)
    req.num_computed_tokens = len(prompt)
    req.append_output_token_ids(7)
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    blocks = evicted + rng.sample(sorted(set(range(NUM_BLOCKS)) - set(listed)), 1)
    timed("request_finished", ledger.on_request_finished, req, blocks,
          keyer.start(KeyScope()), True, known)
    published = ledger._channel.published
    ledger.on_step_acked(10**9)
    timed("publish_settled", ledger._publish_settled)
    assert ledger._channel.published - published == n, "the import was not re-offered whole"
    return timed.out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--profile", action="store_true", help="cProfile the pieces (then times include it)")
    args = ap.parse_args(argv)
    rng = random.Random(0)
    profile = None
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
    with tempfile.TemporaryDirectory() as d:
        gens = GenerationTable.create(os.path.join(d, "gen"), NUM_BLOCKS)
        runs = [one_import(args.tokens, gens, rng, profile) for _ in range(args.reps)]
        gens.close()
    if profile is not None:
        import pstats

        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
    print(f"\n== scheduler-side bookkeeping of one {args.tokens}-token in-place import "
          f"(median of {args.reps}, us) ==")
    for piece in runs[0]:
        print(f"{piece:<18}{statistics.median(r[piece] for r in runs):>10.1f}")
    print(f"{'total':<18}{statistics.median(sum(r.values()) for r in runs):>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
