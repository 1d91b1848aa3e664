"""KeySource.take (and the _feed / token_bytes paths under it) against BlockKeyer.keys,
the reference: every path (prefix keys, known keys overlapping them or not, one-by-one
probes, the bulk extend, unsorted and repeated blocks, n below the token count, block sizes
over 511 tokens whose updates are split for the GIL)."""

from __future__ import annotations

import random

import pytest

from kvmkt_connector.hashing import BlockKeyer, KeyProbe, KeyScope, KeySource, token_bytes

NS = b"N" * 16


class _Tokens:
    """A Sequence that is not a list (token_bytes' other branch), like vLLM's ConstantList."""

    def __init__(self, x):
        self._x = x

    def __len__(self):
        return len(self._x)

    def __getitem__(self, i):
        r = self._x[i]
        return tuple(r) if isinstance(i, slice) else r


@pytest.mark.parametrize("seed", range(300))
def test_take_equals_full_hash(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 16, 511, 512, 513, 1024])
    max_blocks = 3000 // bs + 2 if bs >= 511 else 200
    nblocks = rng.randint(1, max_blocks)
    tokens = [rng.randrange(0, 2**32) if rng.random() < 0.1 else rng.randrange(0, 50000)
              for _ in range(nblocks * bs + rng.randint(0, bs - 1))]
    scope = rng.choice([KeyScope(), KeyScope("salt"), KeyScope(None, "l", "/p")])
    keyer = BlockKeyer(NS, bs)
    ref = keyer.keys(tokens, scope)
    assert len(ref) == nblocks
    n = rng.randint(1, nblocks)
    prefix = keyer.start(scope)
    if rng.random() < 0.6:  # the request's PrefixKeys as a lookup left it
        prefix.extend(tokens, upto=rng.randint(0, len(tokens)))
    known = None
    if rng.random() < 0.6:
        first = rng.randint(0, nblocks - 1)
        known = (first, ref[first : first + rng.randint(0, nblocks - first)])
    needed = sorted(rng.sample(range(n), rng.randint(1, n)))
    bulk = rng.choice([0, 1, 3, 64, 10**6])
    seq = tokens if rng.random() < 0.5 else _Tokens(tokens)
    src = KeySource(prefix, seq, n, needed, known, bulk)
    assert src.take(needed) == [ref[i] for i in needed]
    # later takes (the parents), any order, repeats, blocks the first take skipped
    more = [rng.randrange(n) for _ in range(rng.randint(0, 20))]
    assert src.take(more) == [ref[i] for i in more]
    assert src.take(list(range(n))[::-1]) == ref[:n][::-1]
    # the request's PrefixKeys stays a valid prefix of the reference
    assert prefix.keys == ref[: len(prefix.keys)]


@pytest.mark.parametrize("bs", [1, 16, 511, 512, 600, 2048])
def test_probe_and_extend_with_split_updates(bs):
    rng = random.Random(bs)
    tokens = [rng.randrange(0, 2**32) for _ in range(150 * bs + 3)]
    keyer = BlockKeyer(NS, bs)
    ref = keyer.keys(tokens)
    p = keyer.start(KeyScope())
    p.extend(tokens, upto=7 * bs + 5)
    probe = KeyProbe(p, tokens, 3, 150)
    order = list(range(150))
    rng.shuffle(order)
    assert [probe.block_key(i) for i in order] == [ref[i] for i in order]
    p.extend(tokens)
    assert p.keys == ref


def test_token_bytes_list_and_sequence_agree():
    import numpy as np

    toks = [0, 1, 2**32 - 1, 50000, 7]
    want = np.asarray(toks, dtype="<u4").tobytes()
    assert token_bytes(toks) == want == token_bytes(tuple(toks)) == token_bytes(_Tokens(toks)[:])
    with pytest.raises(OverflowError):
        token_bytes([1, -1])
    with pytest.raises(OverflowError):
        token_bytes([2**32])
