"""run_upper_bound's search (gallop back, then bisect) against the exact run, over every
membership pattern of short key lists and random multi-holder ones: never below
longest_run, exact for prefix chains, and the bound it returns is a key found missing for
keys[0]'s holders (or len(keys))."""

from __future__ import annotations

import itertools
import random

import pytest

from kvmkt_connector.registry import lookup_table
from kvmkt_connector.registry.lookup_table import LookupTable


def _table(monkeypatch, holders_of_key):
    t = LookupTable.__new__(LookupTable)
    monkeypatch.setattr(t, "_current_mapping", lambda: None, raising=False)
    monkeypatch.setattr(lookup_table, "_holders_of", lambda m, key, allowed: holders_of_key(key) & allowed)
    return t


def _exact(masks, allowed):
    running = allowed
    for i, m in enumerate(masks):
        running &= m
        if not running:
            return i
    return len(masks)


@pytest.mark.parametrize("n", range(1, 13))
def test_every_single_holder_pattern(monkeypatch, n):
    for bits in itertools.product((0, 1), repeat=n):
        masks = list(bits)
        t = _table(monkeypatch, lambda k, masks=masks: masks[k[0]])
        keys = [bytes([i]) * 16 for i in range(n)]
        bound = t.run_upper_bound(keys)
        exact = _exact(masks, 1)
        assert bound >= exact, (masks, bound, exact)
        assert bound == len(keys) or not masks[bound], (masks, bound)
        if all(masks[:exact]) and not any(masks[exact:]):  # a published prefix
            assert bound == exact


@pytest.mark.parametrize("seed", range(3000))
def test_random_holders(monkeypatch, seed):
    rng = random.Random(seed)
    n = rng.randint(1, 300)
    nh = rng.randint(1, 5)
    masks = []
    for _ in range(n):
        m = 0
        for h in range(nh):
            if rng.random() < rng.choice([0.5, 0.9, 0.99]):
                m |= 1 << h
        masks.append(m)
    t = _table(monkeypatch, lambda k: masks[int.from_bytes(k[:4], "little")])
    keys = [i.to_bytes(4, "little") * 4 for i in range(n)]
    exclude = rng.choice([None, 0, 1])
    allowed = lookup_table.ALL_BITS if exclude is None else lookup_table.ALL_BITS & ~(1 << exclude)
    assert t.run_upper_bound(keys, exclude) >= _exact(masks, allowed)
