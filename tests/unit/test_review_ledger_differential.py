"""Review of 8e668ec: the new ExportLedger (_forget by map/filter/compress, _publish_settled's
whole-list fast path, _usable_keys' whole-list comparisons, GenerationTable.locations by
numpy past 64 ids) against a reference that is the code of 283e1df, driven in lockstep by the
same random operations. Everything observable must be identical after every operation: what
the channel is told (keys, locations, parents, epoch, the token bytes it would send), what
is listed, key -> index, the free slots (order included), the counters, and what each hook
returns or raises.

Sizes are such that GenerationTable.locations takes both of its paths (< 64 ids and more),
and the operations include what vLLM never does (duplicate block ids in one request, block
ids repeated in a rewrite, confirmed imports whose dst/locations disagree with the request)
so that any difference in corner cases shows up."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from vllm.v1.core.block_pool import BlockPool

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.exporter import ExportLedger
from kvmkt_connector.connector.holder_channel import block_tokens
from kvmkt_connector.connector.importer import ConfirmedImport
from kvmkt_connector.hashing import BlockKeyer, KeyScope, token_bytes
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.registry.protocol import BlockTokens
from kvmkt_connector.transport.generations import BLOCK_BITS, GenerationTable
from tests.unit.test_export_ledger import _request

BS = 2
NBLOCKS = 600
NSLOTS = 300


# ------------------------------------------------------------------ the code of 283e1df


class OldGenerations(GenerationTable):
    def locations(self, block_ids):
        gens, num_blocks = self._gens_mv, self.num_blocks
        if block_ids and (min(block_ids) < 0 or max(block_ids) >= num_blocks):
            raise IndexError("block id out of range")
        return [(gens[b] << BLOCK_BITS) | b for b in block_ids]


class OldLedger(ExportLedger):
    def _usable_keys(self, known, block_ids, tags=None):  # (283e1df read the tags itself)
        if known is None:
            return None
        if known.verified:
            return known.first, known.keys
        if known.locations is None or self._gens is None:
            return None
        at = block_ids[known.first : known.first + len(known.dst)]
        same = 0
        while same < len(at) and at[same] == known.dst[same]:
            same += 1
        now = self._gens.locations(at[:same])
        good = 0
        while good < same and now[good] == known.locations[good]:
            good += 1
        return known.first, known.keys[:good]

    def _publish_settled(self):
        keys, locations, parents, runs = [], [], [], []
        while self._waiting and self._waiting[0][0] <= self._acked:
            _, ks, blocks, locs, ps, run, *_ = self._waiting.popleft()
            for k, b, loc, p in zip(ks, blocks, locs, ps, strict=True):
                if self._listed.get(b) == (k, loc):
                    keys.append(k)
                    locations.append(loc)
                    parents.append(p)
            if run is not None:
                runs.append(run)
        if keys:
            self._channel.publish(keys, locations, self._epoch, runs, parents)

    def _forget(self, indices):
        if self._listed.keys().isdisjoint(indices):
            return []
        pop = self._listed.pop
        gone = [(i, e) for i in indices if (e := pop(i, None)) is not None]
        if not gone:
            return []
        index_of = self._index_of
        for _, (key, _) in gone:
            index_of.pop(key, None)
        if self.staged:
            self._free_slots.extend(i for i, _ in gone)
        self._stats.count("released_blocks", len(gone))
        return [loc for _, (_, loc) in gone]


def old_block_tokens(runs, keys, token_ids_at_finish):
    """BlockTokens as 283e1df made them: bytes taken at the finish (``token_ids_at_finish``
    maps id(run) -> the request's token ids then)."""
    wanted = set(keys)
    out = []
    for t in runs:
        if isinstance(t, BlockTokens):
            out.append(t)
            continue
        if not t.positions:
            continue
        toks = token_ids_at_finish[id(t)]
        lo, bs = t.positions[0], t.block_size
        blob = token_bytes(toks[lo * bs : (t.positions[-1] + 1) * bs])
        step = 4 * bs
        out += [BlockTokens(k, p, blob[(i - lo) * step : (i - lo + 1) * step])
                for k, p, i in zip(t.keys, t.parents, t.positions, strict=True) if k in wanted]
    return out


# ------------------------------------------------------------------ harness


class Channel:
    def __init__(self, eager_tokens: bool) -> None:
        self.generation = 0
        self.ops: list[tuple] = []
        self.events: list = []
        self.eager = eager_tokens
        self.finish_tokens: dict[int, list[int]] = {}
        self.pending_runs: list[tuple[int, list, list[bytes]]] = []

    def watch_resets(self, epoch) -> None:
        pass

    def publish(self, keys, locations, epoch=0, tokens=None, parents=None) -> None:
        tokens = tokens or []
        if self.eager:
            desc = old_block_tokens(tokens, keys, self.finish_tokens)
        else:
            desc = block_tokens(tokens, keys)  # (the channel thread; here at once)
        self.ops.append(("publish", list(keys), list(locations), epoch,
                         list(parents) if parents is not None else None,
                         [(b.key, b.parent, b.tokens) for b in desc]))

    def reclaim(self, count) -> None:
        self.ops.append(("reclaim", count))

    def unpublish(self, locations) -> None:
        self.ops.append(("unpublish", list(locations)))

    def take_events(self):
        ev, self.events = self.events, []
        return ev


def _idle():
    return SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=SimpleNamespace(
        req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set()))


def _rewrite(blocks, computed=0):
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(block_ids=(blocks,), num_computed_tokens=computed)],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[],
                                              num_computed_tokens=[], resumed_req_ids=set()),
        new_block_ids_to_zero=list(blocks[:3]))


def _state(ledger: ExportLedger, ch: Channel, stats: MarketplaceStats):
    return (
        list(ledger._listed.items()),  # (insertion order too: withdraw_all iterates it)
        list(ledger._index_of.items()),
        list(ledger._free_slots),
        ledger._slot_generation.tolist(),
        [(w[0], w[1], w[2], w[3], w[4]) for w in ledger._waiting],
        sorted((j, s[0], s[1], s[2]) for j, s in ledger._staging.items()),
        sorted(ledger._cancelled),
        [repr(j) for j in ledger._pending_jobs],
        ch.ops,
        stats.data["c"],
        ledger._gens.generations.tolist() if ledger._gens is not None else None,
    )


def _call(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as e:  # noqa: BLE001 (both sides must fail alike)
        return ("raised", type(e).__name__)


def _tags(gens: GenerationTable, ids: list[int]) -> list[int]:
    return [(int(gens.generations[b]) << BLOCK_BITS) | b for b in ids]


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("seed", range(30))
def test_new_ledger_matches_283e1df(tmp_path, staged, seed):
    rng = random.Random(1000 * seed + staged)
    sides = []
    for name, cls, gcls, eager in (("new", ExportLedger, GenerationTable, False),
                                   ("old", OldLedger, OldGenerations, True)):
        ch = Channel(eager)
        pool = BlockPool(num_gpu_blocks=NBLOCKS, enable_caching=True, hash_block_size=BS)
        gens = None if staged else gcls.create(str(tmp_path / f"gen-{name}"), NBLOCKS)
        stats = MarketplaceStats()
        ledger = cls(MarketplaceConfig(registry_autostart=False), BS, ch, stats, pool,
                     NSLOTS if staged else None, gens)
        sides.append((ledger, ch, stats))
    (new, new_ch, new_stats), (old, old_ch, old_stats) = sides
    keyer = BlockKeyer(b"N" * 16, BS)
    finished: list[tuple[list[int], list[int]]] = []  # (tokens, blocks) of earlier requests

    def both(fn_name, *args, mk=None):
        outs = []
        for ledger, ch, _ in sides:
            a = mk(ledger, ch) if mk else args
            outs.append(_call(getattr(ledger, fn_name), *a))
        assert outs[0] == outs[1], (fn_name, outs)
        return outs[0]

    for step in range(120):
        op = rng.random()
        if op < 0.4:  # a request finishes
            if finished and rng.random() < 0.4:  # a prefix shared with an earlier one
                ptoks, pblocks = rng.choice(finished)
                m = rng.randint(1, len(pblocks))
                n = m + rng.randint(0, 80)
                toks = ptoks[: m * BS] + [rng.randrange(3, 5) for _ in range((n - m) * BS + 1)]
                rest = [b for b in rng.sample(range(1, NBLOCKS), n + 5) if b not in pblocks[:m]]
                blocks = pblocks[:m] + rest[: n - m]
            else:
                n = rng.choice([1, 3, 40, 63, 64, 65, 100, 150])
                toks = [rng.randrange(3, 5) for _ in range(n * BS + 1)]  # few: key reuse
                blocks = rng.sample(range(1, NBLOCKS), n)
            if rng.random() < 0.05 and n > 2:  # never from vLLM: a block id twice
                blocks[rng.randrange(1, n)] = blocks[0]
            extra = rng.choice([0, 0, 1, 5])  # block ids past the computed tokens
            blocks = blocks + rng.sample(range(1, NBLOCKS), extra)
            finished.append((toks, blocks))
            known = None
            if rng.random() < 0.5:
                first = rng.randrange(0, n)
                ln = rng.randint(0, n - first + 3)
                dst = list(blocks[first : first + ln])
                if dst and rng.random() < 0.3:  # preempted: a position recomputed elsewhere
                    dst[rng.randrange(len(dst))] = rng.randrange(1, NBLOCKS)
                if rng.random() < 0.2:
                    dst = dst + [rng.randrange(1, NBLOCKS)]
                gen_src = sides[0][0]._gens
                locs = None
                if not staged and rng.random() < 0.9:
                    locs = _tags(gen_src, dst)
                    if locs and rng.random() < 0.3:
                        j = rng.randrange(len(locs))
                        locs[j] += 1 << BLOCK_BITS  # a tag that moved
                keys = keyer.keys(toks)[first : first + len(dst)]
                if rng.random() < 0.2:  # a holder's word that is not ours
                    keys = [bytes([rng.randrange(256)]) * 16 for _ in keys]
                known = ConfirmedImport(first, keys, dst, rng.random() < 0.2, locs)
            describe = rng.random() < 0.6
            # Both sides get the same Request contents (each its own object)
            reqs = [_request(f"r{step}", list(toks)) for _ in sides]
            waiting0, next_job0 = len(old._waiting), old._next_job

            def mk(ledger, ch, reqs=reqs, blocks=blocks, known=known, describe=describe):
                r = reqs[0] if ledger is new else reqs[1]
                return (r, list(blocks), keyer.start(KeyScope()), describe, known)

            both("on_request_finished", mk=mk)
            # (the old side took the bytes at the finish: keep what they were then)
            made = [w[5] for w in list(old._waiting)[waiting0:]]
            made += [s[3] for j, s in old._staging.items() if j >= next_job0]
            for run in made:
                if run is not None:
                    old_ch.finish_tokens[id(run)] = list(reqs[1].all_token_ids)
        elif op < 0.55 and not staged:  # vLLM rewrites blocks (duplicates, unlisted ones)
            listed = list(new._listed)
            ids = rng.sample(listed, min(len(listed), rng.choice([0, 1, 5, 63, 64, 70])))
            ids += [rng.randrange(1, NBLOCKS) for _ in range(rng.randint(0, 10))]
            ids += ids[: rng.randint(0, 5)]
            rng.shuffle(ids)
            if rng.random() < 0.5:
                both("tick", _rewrite(ids))
            else:
                both("on_blocks_rewritten", list(ids))
        elif op < 0.65:  # the registry releases locations: current, stale, repeated
            pub = [loc for _, loc in new._listed.values()]
            locs = rng.sample(pub, min(len(pub), rng.choice([1, 3, 70])))
            locs += [loc + (5 << BLOCK_BITS) for loc in locs[:2]]
            locs += locs[:2]
            for _, ch, _ in sides:
                ch.events.append(SimpleNamespace(kind="released", locations=list(locs),
                                                 generation=0))
            both("tick", _idle())
        elif op < 0.8 and staged:  # workers finish staging jobs, some fail, some twice
            for ledger, _, _ in sides:
                ledger.take_jobs()
            ids = list(new._staging)
            rng.shuffle(ids)
            ids = ids[: len(ids) // 2 + 1] + ids[:1]
            failed = rng.random() < 0.3
            both("on_saves_done", list(ids), failed)
        elif op < 0.84:
            both("withdraw_all")
        elif op < 0.87 and staged:
            both("_forget", [rng.randrange(NSLOTS) for _ in range(rng.randint(0, 20))])
        else:
            both("tick", _idle())
            ack = new.step - rng.choice([0, 0, 1])
            both("on_step_acked", ack)
            both("tick", None)
        assert _state(new, new_ch, new_stats) == _state(old, old_ch, old_stats), (step, op)
    for ledger, _, _ in sides:
        if ledger._gens is not None:
            ledger._gens.close()
