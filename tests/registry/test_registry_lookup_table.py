"""The shared-memory lookup table: writer and reader against a plain-Python model."""

from __future__ import annotations

import os
import random
import stat

from kvmkt_connector.registry.lookup_table import NUMPY_MIN_KEYS, LookupTable
from kvmkt_connector.registry.lookup_writer import LookupTableWriter


def random_keys(rng: random.Random, n: int) -> list[bytes]:
    return [rng.randbytes(16) for _ in range(n)]


def model_run(model: dict[bytes, set[int]], keys: list[bytes], exclude: int | None) -> int:
    allowed = set(range(64)) - ({exclude} if exclude is not None else set())
    running = allowed
    for i, key in enumerate(keys):
        running = running & model.get(key, set())
        if not running:
            return i
    return len(keys)


def test_reader_matches_model_through_churn_and_rebuilds(socket_dir: str) -> None:
    rng = random.Random(7)
    path = os.path.join(socket_dir, "table")
    writer = LookupTableWriter(path, capacity_blocks=300)  # 1024 slots
    reader = LookupTable.open(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    pool = random_keys(rng, 4000)
    model: dict[bytes, set[int]] = {}
    listed = 0
    for step in range(25_000):
        key, bit = rng.choice(pool[: 200 + step // 8]), rng.randrange(6)
        holders = model.setdefault(key, set())
        if rng.random() < 0.5 and bit not in holders and listed < 1000:
            holders.add(bit)
            writer.key_listed(key, bit)
            listed += 1
        elif bit in holders:
            holders.discard(bit)
            writer.key_unlisted(key, bit)
            listed -= 1
        if step % 500 == 0:
            for _ in range(40):
                start = rng.randrange(len(pool))
                # Runs over keys that are mostly present, so runs are long enough to matter.
                present = [k for k in pool[start:] if model.get(k)][: rng.randrange(1, 70)]
                keys = present + random_keys(rng, rng.randrange(0, 3))
                exclude = rng.choice([None, 0, 1, 2])
                assert reader.longest_run(keys, exclude) == model_run(model, keys, exclude)
    assert writer.rebuilds >= 1  # more live keys than the capacity promised: grown
    assert writer.live_keys == sum(1 for v in model.values() if v)
    writer.close()
    assert not os.path.exists(path)


def test_short_and_long_runs_agree(socket_dir: str) -> None:
    rng = random.Random(3)
    path = os.path.join(socket_dir, "table")
    writer = LookupTableWriter(path, capacity_blocks=5000)
    chain = random_keys(rng, 200)
    for i, key in enumerate(chain):
        writer.key_listed(key, 0)
        if i < 150:
            writer.key_listed(key, 1)
    reader = LookupTable.open(path)
    for n in (1, NUMPY_MIN_KEYS - 1, NUMPY_MIN_KEYS, 64, 200):
        assert reader.longest_run(chain[:n]) == n
        assert reader.longest_run(chain[:n], exclude_bit=0) == min(n, 150)
        assert reader.longest_run(chain[:n], exclude_bit=5) == n
    assert reader.longest_run(chain[:100] + random_keys(rng, 5) + chain[100:]) == 100
    assert reader.longest_run(random_keys(rng, 64)) == 0
    assert reader.longest_run([]) == 0
    writer.close()


def test_reader_follows_a_rebuild_into_the_new_file(socket_dir: str) -> None:
    rng = random.Random(5)
    path = os.path.join(socket_dir, "table")
    writer = LookupTableWriter(path, capacity_blocks=100)  # 1024 slots
    reader = LookupTable.open(path)
    first = random_keys(rng, 50)
    for key in first:
        writer.key_listed(key, 3)
    assert reader.longest_run(first) == 50
    old_inode = os.stat(path).st_ino
    more = random_keys(rng, 700)  # past 70 % load: rebuilt (and grown) under the reader
    for key in more:
        writer.key_listed(key, 4)
    assert writer.rebuilds >= 1 and writer.n_slots > 1024
    assert os.stat(path).st_ino != old_inode
    assert reader.longest_run(first) == 50
    assert reader.longest_run(more) == 700
    for key in first[10:]:
        writer.key_unlisted(key, 3)
    assert reader.longest_run(first) == 10
    writer.close()


def test_keys_far_down_a_probe_chain_are_found(socket_dir: str) -> None:
    """Keys sharing one home slot sit past the vectorized probe window: still found."""
    rng = random.Random(9)
    path = os.path.join(socket_dir, "table")
    writer = LookupTableWriter(path, capacity_blocks=100)  # 1024 slots
    home = 77
    crowded = []
    while len(crowded) < 12:
        key = rng.randbytes(16)
        if int.from_bytes(key[:8], "little") % writer.n_slots == home:
            crowded.append(key)
    spread = random_keys(rng, 30)
    for key in crowded + spread:
        writer.key_listed(key, 2)
    reader = LookupTable.open(path)
    run = spread[:20] + crowded  # long enough for the numpy path
    assert len(run) >= NUMPY_MIN_KEYS
    assert reader.longest_run(run) == len(run)
    assert reader.longest_run(run, exclude_bit=2) == 0
    writer.key_unlisted(crowded[9], 2)
    assert reader.longest_run(run) == 20 + 9
    assert reader.longest_run(crowded) == 9  # the scalar path agrees
    writer.close()


def test_run_upper_bound_never_falls_short_of_the_run(tmp_path) -> None:
    """The connector's O(log n) hint is >= the exact run (and equal for prefix chains)."""
    import random

    rng = random.Random(5)
    writer = LookupTableWriter(str(tmp_path / "t.table"), capacity_blocks=4096)
    keys = [rng.randbytes(16) for _ in range(300)]
    for key in keys[:120]:
        writer.key_listed(key, 1)  # holder 1: a 120-block prefix chain
    for key in keys[:40] + keys[60:250]:
        writer.key_listed(key, 2)  # holder 2: a chain with a hole at 40..59
    table = LookupTable.open(writer.path)
    for n in (1, 2, 39, 41, 119, 120, 121, 200, 300):
        exact = table.longest_run(keys[:n])
        bound = table.run_upper_bound(keys[:n])
        assert bound >= exact
    assert table.run_upper_bound(keys[:120]) == table.longest_run(keys[:120]) == 120
    assert table.run_upper_bound(keys[:300], exclude_bit=1) >= 40
    assert table.run_upper_bound([rng.randbytes(16)] + keys[1:50]) == 0
    for trial in range(200):  # random holes: still never short
        holder_keys = [k for k in keys if rng.random() < 0.9]
        w = LookupTableWriter(str(tmp_path / f"r{trial}.table"), capacity_blocks=1024)
        for k in holder_keys:
            w.key_listed(k, 3)
        t = LookupTable.open(w.path)
        assert t.run_upper_bound(keys) >= t.longest_run(keys)
        w.close()
    writer.close()


def test_run_upper_bound_is_exact_on_prefix_chains_and_gallops(tmp_path, monkeypatch) -> None:
    """For a published prefix of any length the bound is the run itself; a run ending a few
    blocks before the last key costs a few probes, not a whole bisection."""
    import math
    import random

    from kvmkt_connector.registry import lookup_table

    rng = random.Random(7)
    keys = [rng.randbytes(16) for _ in range(1024)]
    writer = LookupTableWriter(str(tmp_path / "t.table"), capacity_blocks=4096)
    table = LookupTable.open(writer.path)
    probes = []
    real = lookup_table._holders_of
    monkeypatch.setattr(lookup_table, "_holders_of",
                        lambda *a: probes.append(1) or real(*a))  # fmt: skip
    listed = 0
    for run in (*range(1, 40), 100, 511, 512, 513, 700, 1000, *range(1005, 1025)):
        for key in keys[listed:run]:
            writer.key_listed(key, 1)
        listed = run
        probes.clear()
        bound, n = table.run_upper_bound(keys), len(probes)
        assert bound == table.longest_run(keys) == run
        if run < 1024:  # (keys[0] and keys[-1] first, then the search)
            assert n - 2 <= 2 * math.log2(1024 - run) + 2, (run, n)
            assert n <= 2 * math.log2(1024) + 2
    writer.close()
