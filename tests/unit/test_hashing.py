"""Block keys: deterministic across processes and seeds, sensitive to everything that matters."""

import os
import random
import subprocess
import sys

import pytest

from kvmkt_connector.hashing import KEY_BYTES, BlockKeyer, KeyScope

NS = bytes(range(16))
TOKENS = [(i * 7919) % 50000 for i in range(16 * 40 + 5)]  # 40 full blocks + a partial one

_CHILD = """
import sys
from kvmkt_connector.hashing import BlockKeyer, KeyScope
toks = [(i * 7919) % 50000 for i in range(16 * 40 + 5)]
keys = BlockKeyer(bytes(range(16)), 16).keys(toks, KeyScope("salt", "ad", "/p"))
print(",".join(k.hex() for k in keys))
"""


def _keys_in_process(seed: str) -> list[str]:
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().split(",")


def test_keys_equal_across_processes_with_different_hash_seeds():
    a, b = _keys_in_process("0"), _keys_in_process("12345")
    here = [k.hex() for k in BlockKeyer(NS, 16).keys(TOKENS, KeyScope("salt", "ad", "/p"))]
    assert a == b == here
    assert len(here) == 40  # the partial block has no key
    assert len(set(here)) == 40


def test_changed_token_changes_its_block_and_every_later_key():
    keyer = BlockKeyer(NS, 16)
    base = keyer.keys(TOKENS)
    changed = list(TOKENS)
    changed[16 * 7 + 3] += 1
    other = keyer.keys(changed)
    assert other[:7] == base[:7]
    assert all(x != y for x, y in zip(other[7:], base[7:], strict=True))


@pytest.mark.parametrize("scope", [
    KeyScope(cache_salt="tenant-b"),
    KeyScope(lora_name="adapter"),
    KeyScope(lora_name="adapter", lora_path="/other/path"),
    KeyScope(cache_salt="", lora_name=None),
])
def test_salt_and_lora_identity_change_every_key(scope):
    keyer = BlockKeyer(NS, 16)
    base = keyer.keys(TOKENS, KeyScope(cache_salt=None))
    assert not set(base) & set(keyer.keys(TOKENS, scope))


def test_lora_path_matters_not_just_the_name():
    keyer = BlockKeyer(NS, 16)
    assert keyer.keys(TOKENS, KeyScope(None, "a", "/x")) != keyer.keys(TOKENS, KeyScope(None, "a", "/y"))


def test_namespace_and_block_size_change_keys():
    base = BlockKeyer(NS, 16).keys(TOKENS)
    assert not set(base) & set(BlockKeyer(bytes(16), 16).keys(TOKENS))
    assert BlockKeyer(NS, 32).keys(TOKENS)[0] != base[1]


def test_incremental_extension_equals_one_shot():
    keyer = BlockKeyer(NS, 16)
    prefix = keyer.start(KeyScope())
    for end in (3, 16, 17, 100, 300, len(TOKENS)):
        prefix.extend(TOKENS[:end])
    assert prefix.keys == keyer.keys(TOKENS)
    assert all(len(k) == KEY_BYTES for k in prefix.keys)
    assert prefix.num_tokens == 640


def test_extend_upto_stops_at_a_block_boundary():
    prefix = BlockKeyer(NS, 16).start(KeyScope())
    assert len(prefix.extend(TOKENS, upto=50)) == 3
    assert len(prefix.extend(TOKENS)) == 40


def test_a_key_probe_answers_any_block_as_the_key_list_does():
    """``KeyProbe`` (what lookups bisect on) against the full key list: any order of access,
    negative indices, a range past the prompt's full blocks, a prefix already partly hashed."""
    keyer = BlockKeyer(NS, 16)
    rng = random.Random(3)
    for _ in range(60):
        tokens = [rng.randrange(200_000) for _ in range(rng.randrange(1, 1500))]
        every = keyer.keys(tokens, KeyScope("s"))
        partial = keyer.start(KeyScope("s"))
        partial.extend(tokens, upto=rng.randrange(len(tokens) + 1))
        first = rng.randrange(len(every) + 1)
        end = rng.randrange(first, len(every) + 3)
        probe = partial.probe(tokens, first, end)
        assert len(probe) == min(end, len(every)) - first
        order = list(range(len(probe)))
        rng.shuffle(order)
        assert [probe[i] for i in order] == [every[first + i] for i in order]
        if len(probe):
            assert probe[-1] == every[first + len(probe) - 1]
        with pytest.raises(IndexError):
            probe[len(probe)]


def test_a_key_probe_outlives_an_extend_of_its_prefix():
    """PrefixKeys.extend updates its running state in place; a probe made before must keep
    its own copy (found by review: it shared the state and then hashed from the wrong one)."""
    keyer = BlockKeyer(NS, 4)
    tokens = list(range(100))
    every = keyer.keys(tokens)
    prefix = keyer.start(KeyScope())
    probe = prefix.probe(tokens, 0, 25)
    prefix.extend(tokens, upto=8)
    assert probe[10] == every[10] and probe.block_key(24) == every[24]
