"""Review of 8e668ec: GenerationTable.locations takes numpy past 64 ids. Against the code of
283e1df (plain Python over the memoryview) for every kind of input the callers could hand
it (lists, ranges, tuples, vLLM's ConstantList, numpy arrays), at the largest generations
(31 bits), with the same errors for ids out of range."""

from __future__ import annotations

import random

import numpy as np
import pytest
from vllm.v1.utils import ConstantList

from kvmkt_connector.transport.generations import (
    BLOCK_BITS,
    GenerationTable,
    decode_locations,
    next_generations,
)

N = 300


def old_locations(table: GenerationTable, block_ids):
    gens, num_blocks = table._gens_mv, table.num_blocks
    if block_ids and (min(block_ids) < 0 or max(block_ids) >= num_blocks):
        raise IndexError("block id out of range")
    return [(gens[b] << BLOCK_BITS) | b for b in block_ids]


def _outcome(fn, *args):
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001
        return "raised", type(e).__name__
    assert type(out) is list
    return "ok", [(type(x).__name__, x) for x in out]


@pytest.fixture
def table(tmp_path):
    t = GenerationTable.create(str(tmp_path / "g"), N)
    rng = np.random.default_rng(0)
    t.generations[:] = rng.integers(0, 1 << 31, N, dtype=np.uint32)
    t.generations[:4] = (1 << 31) - 1  # the largest a generation gets (next wraps to 0)
    t.generations[4] = 0
    yield t
    t.close()


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 200, 1000])
@pytest.mark.parametrize("kind", ["list", "tuple", "range", "constant", "np64", "np32", "npu32"])
def test_in_range_same_as_283e1df(table, n, kind):
    rng = random.Random(n)
    if kind == "range":
        ids = range(min(n, N))
        if n > N:
            pytest.skip("a range has no repeats")
    else:
        ids = [rng.randrange(N) for _ in range(n)]
        ids[: min(n, 5)] = [0, 1, 2, 3, 4][: min(n, 5)]
        ids = {"list": lambda x: x, "tuple": tuple, "constant": ConstantList,
               "np64": lambda x: np.asarray(x, dtype=np.int64),
               "np32": lambda x: np.asarray(x, dtype=np.int32),
               "npu32": lambda x: np.asarray(x, dtype=np.uint32)}[kind](ids)
    if kind.startswith("np") and n > 0:
        # 283e1df: `if block_ids` on an array of more than one raises, and b of a narrow
        # dtype overflows ``| b``; no caller passes an array. Past 64 ids they now work.
        if n < 64:
            pytest.skip("arrays: small path as in 283e1df")
        got = table.locations(ids)
        want = [(int(table.generations[b]) << BLOCK_BITS) | int(b) for b in ids]
        assert got == want and all(type(x) is int for x in got) == (n >= 64)
        return
    got, want = _outcome(table.locations, ids), _outcome(old_locations, table, ids)
    assert got == want
    if got[0] == "ok":
        locs = [x for _, x in got[1]]
        blocks, gens = decode_locations(locs)
        assert blocks.tolist() == list(ids) and gens.tolist() == table.generations[list(ids)].tolist()
        assert all(0 <= x < 1 << 63 for x in locs)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 500])
@pytest.mark.parametrize("bad", [-1, N, N + 1, -(1 << 40), 1 << 40, (1 << 63) - 1, -(1 << 63)])
def test_out_of_range_same_error(table, n, bad):
    for pos in (0, n // 2, n - 1):
        ids = [7] * n
        ids[pos] = bad
        assert _outcome(table.locations, ids) == _outcome(old_locations, table, ids) == (
            "raised", "IndexError")


@pytest.mark.parametrize("n", [1, 63, 64, 65, 500])
@pytest.mark.parametrize("bad", [1 << 63, 1 << 64, -(1 << 63) - 1, 1 << 100])
def test_ids_beyond_int64_same_error(table, n, bad):
    """Not from vLLM (block ids are small): both reject them, the numpy path with
    OverflowError instead of IndexError (no caller catches either)."""
    ids = [7] * n
    ids[n // 2] = bad
    got, want = _outcome(table.locations, ids), _outcome(old_locations, table, ids)
    assert want == ("raised", "IndexError")
    assert got == (("raised", "IndexError") if n < 64 else ("raised", "OverflowError"))


def test_after_wraparound_both_paths_agree(table):
    table.generations[:] = (1 << 31) - 1
    ids = list(range(N))
    before = table.locations(ids)
    assert before == [x for i in range(0, N, 50) for x in table.locations(ids[i : i + 50])]
    table.generations[:] = next_generations(table.generations)
    after = table.locations(ids)
    assert after == old_locations(table, ids) == list(range(N))  # generation 0 again
    assert not set(before) & set(after)
