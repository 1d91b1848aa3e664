"""Block keys: names for full KV blocks that every vLLM instance computes the same way.

vLLM 0.26's own ``request.block_hashes`` start from a seed drawn from ``os.urandom`` unless
PYTHONHASHSEED is set, and they omit model identity, so two instances rarely agree on them.
We compute our own keys instead:

    root   = SHA-256("kvmkt/block-keys/v1" | msgpack(namespace, block_size, scope))
    key[i] = SHA-256(root | tokens[0 : (i+1)*block_size])[:16]

``namespace`` is the compatibility fingerprint's digest (see ``compat``), so KV that is not
interchangeable never shares a key. ``scope`` holds what else changes the KV of the same
tokens: the cache salt and the LoRA adapter's name and path. Tokens are hashed as
little-endian uint32. A key commits to the whole prefix, so equal keys mean equal prefixes
(128-bit, collision resistant), and a prefix match is a run of equal keys from block 0.

A running hash gives key i+1 from key i's state in one block's worth of work, and
``PrefixKeys`` keeps that state so a request's keys are extended, never recomputed. Any
single key costs one pass over its prefix's bytes in C, so ``KeyProbe`` answers the few keys
a lookup asks for (a bisection) without the per-block Python steps of computing them all.
``KeySource`` answers the keys an export needs the same way, taking keys known already
(a confirmed import's lease) as they are.
"""

from __future__ import annotations

import bisect
import hashlib
import sys
from array import array
from collections.abc import Sequence

import msgspec

KEY_BYTES = 16
# hashlib lets go of the GIL for updates over 2047 bytes. On vLLM's scheduler thread, getting
# it back waits for whichever thread took it (up to sys.getswitchinterval(), 5 ms, measured:
# 64 KB hashed in 4 KB pieces next to a busy thread took 10 ms instead of 32 us), so keys
# are fed in smaller pieces.
_GIL_KEPT = 2047
_CHECKPOINT = 64  # blocks between the states a KeyProbe keeps along a long span
HASH_SCHEME = "sha256-prefix-v1"
_DOMAIN = b"kvmkt/block-keys/v1\x00"

if array("I").itemsize != 4:  # pragma: no cover - every mainstream platform has 4-byte 'I'
    raise ImportError("kvmkt_connector.hashing needs a 4-byte array('I')")


class KeyScope(msgspec.Struct, frozen=True, array_like=True):
    """What, besides the tokens and the namespace, changes a prefix's KV."""

    cache_salt: str | None = None
    lora_name: str | None = None
    lora_path: str | None = None


def token_bytes(token_ids: Sequence[int]) -> bytes:
    if type(token_ids) is list:  # (a slice of vLLM's ConstantList is one) fromlist: faster
        arr = array("I")
        arr.fromlist(token_ids)
    else:
        arr = array("I", token_ids)
    if sys.byteorder != "little":  # pragma: no cover
        arr.byteswap()
    return arr.tobytes()


def _feed(update, data: memoryview) -> None:
    for off in range(0, len(data), _GIL_KEPT):
        update(data[off : off + _GIL_KEPT])


class BlockKeyer:
    """Makes ``PrefixKeys`` for one namespace and block size."""

    def __init__(self, namespace: bytes, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.namespace = bytes(namespace)
        self.block_size = block_size

    def root(self, scope: KeyScope) -> bytes:
        header = msgspec.msgpack.encode((self.namespace, self.block_size, scope))
        return hashlib.sha256(_DOMAIN + header).digest()

    def start(self, scope: KeyScope) -> PrefixKeys:
        return PrefixKeys(self.root(scope), self.block_size)

    def keys(self, token_ids: Sequence[int], scope: KeyScope | None = None) -> list[bytes]:
        """Keys of every full block of ``token_ids`` (convenience for tests and tools)."""
        prefix = self.start(scope or KeyScope())
        prefix.extend(token_ids)
        return prefix.keys


class PrefixKeys:
    """The keys of one growing token sequence (a request's prompt, then its output)."""

    __slots__ = ("keys", "_block_size", "_hasher", "_num_tokens")

    def __init__(self, root: bytes, block_size: int) -> None:
        self.keys: list[bytes] = []
        self._block_size = block_size
        self._hasher = hashlib.sha256(root)
        self._num_tokens = 0  # tokens folded into _hasher, always whole blocks

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def extend(self, token_ids: Sequence[int], upto: int | None = None) -> list[bytes]:
        """Hash the full blocks of ``token_ids[:upto]`` not hashed yet; return all keys.

        ``token_ids`` is the whole sequence so far, not just the new tokens, and must extend
        the sequence of earlier calls: the part already hashed is not read again.
        """
        end = len(token_ids) if upto is None else min(upto, len(token_ids))
        end -= end % self._block_size
        if end <= self._num_tokens:
            return self.keys
        data = token_bytes(token_ids[self._num_tokens : end])
        step = 4 * self._block_size
        update, copy, append = self._hasher.update, self._hasher.copy, self.keys.append
        if step > _GIL_KEPT:  # (block sizes over 511 tokens)
            update = lambda piece: _feed(self._hasher.update, memoryview(piece))  # noqa: E731
        for off in range(0, len(data), step):
            update(data[off : off + step])
            append(copy().digest()[:KEY_BYTES])
        self._num_tokens = end
        return self.keys

    def probe(self, token_ids: Sequence[int], first: int, end: int) -> KeyProbe:
        """The keys of blocks ``first .. end - 1`` of ``token_ids``, computed on demand."""
        return KeyProbe(self, token_ids, first, end)


class KeyProbe:
    """Keys of blocks ``[first, end)`` as a read-only sequence; each key is hashed on first
    access from the nearest state hashed before it (states are kept every 64 blocks along
    the way), so a bisection over n blocks hashes about n blocks' bytes in C and runs
    O(log n + n/64) Python steps. Keys ``PrefixKeys`` already holds are taken from it."""

    __slots__ = ("_first", "_end", "_known", "_base", "_data", "_step", "_counts", "_states")

    def __init__(self, prefix: PrefixKeys, token_ids: Sequence[int], first: int, end: int) -> None:
        bs = prefix._block_size
        self._first, self._end = first, max(first, min(end, len(token_ids) // bs))
        self._known = prefix.keys
        self._base = prefix.num_tokens // bs  # blocks already in prefix's running state
        self._step = 4 * bs
        self._data = memoryview(token_bytes(token_ids[self._base * bs : self._end * bs]))
        self._counts = [self._base]  # sorted block counts with a saved state
        self._states = {self._base: prefix._hasher.copy()}  # (extend() updates the original)

    def __len__(self) -> int:
        return self._end - self._first

    def __getitem__(self, i: int) -> bytes:
        n = self._end - self._first
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self.block_key(self._first + i)

    def block_key(self, block: int) -> bytes:
        """The key of block ``block`` of the prompt (any block before ``end``)."""
        if not 0 <= block < self._end:
            raise IndexError(block)
        if block < len(self._known):
            return self._known[block]
        at = self._counts[bisect.bisect_right(self._counts, block + 1) - 1]  # (>= _base:
        # blocks before it are in _known)
        hasher = self._states[at].copy()
        # Long spans keep a state every _CHECKPOINT blocks on the way, so later probes below
        # this one (bisection, spot checks) start near their block, not from the far start.
        for mark in range(at + _CHECKPOINT, block + 1, _CHECKPOINT):
            _feed(hasher.update, self._data[(at - self._base) * self._step : (mark - self._base) * self._step])
            if mark not in self._states:
                bisect.insort(self._counts, mark)
                self._states[mark] = hasher.copy()
            at = mark
        _feed(hasher.update, self._data[(at - self._base) * self._step : (block + 1 - self._base) * self._step])
        if block + 1 not in self._states:
            bisect.insort(self._counts, block + 1)
            self._states[block + 1] = hasher  # digest() leaves the state as it was
        return hasher.digest()[:KEY_BYTES]


class KeySource:
    """Keys of blocks ``0 .. n - 1`` of a finished request, where only some are needed (an
    export skips blocks it lists already): keys ``prefix`` holds, then ``known`` ones
    (``(first block, keys)``: a confirmed import's lease), then the rest, hashed all at once
    through ``prefix`` when more than ``bulk`` are missing, else one by one (``KeyProbe``)."""

    __slots__ = ("_prefix", "_token_ids", "_n", "_first", "_known", "_probe")

    def __init__(self, prefix: PrefixKeys, token_ids: Sequence[int], n: int, needed: Sequence[int],
                 known: tuple[int, list[bytes]] | None = None, bulk: int = 64) -> None:
        self._prefix, self._token_ids, self._n = prefix, token_ids, n
        self._first, self._known = known if known is not None else (0, [])
        self._probe: KeyProbe | None = None
        # ``needed`` is ascending: count what is covered by bisection, not a loop
        n_have, lo, hi = len(prefix.keys), self._first, self._first + len(self._known)
        covered = bisect.bisect_left(needed, n_have)
        lo = max(lo, n_have)
        if hi > lo:
            covered += bisect.bisect_left(needed, hi) - bisect.bisect_left(needed, lo)
        if len(needed) - covered > bulk:
            prefix.extend(token_ids, upto=n * prefix._block_size)

    def take(self, blocks: Sequence[int]) -> list[bytes]:
        """The keys of ``blocks`` (a range of them by slices: an export may need a thousand)."""
        have, first, known = self._prefix.keys, self._first, self._known
        n_have, n_known = len(have), len(known)
        if isinstance(blocks, range) and blocks.step == 1:
            return self._take_range(blocks.start, blocks.stop)
        out = []
        for i in blocks:
            if i < n_have:
                out.append(have[i])
            elif 0 <= i - first < n_known:
                out.append(known[i - first])
            else:
                if self._probe is None:
                    self._probe = self._prefix.probe(self._token_ids, 0, self._n)
                out.append(self._probe.block_key(i))
        return out

    def _take_range(self, i: int, stop: int) -> list[bytes]:
        have, first, known = self._prefix.keys, self._first, self._known
        out: list[bytes] = []
        while i < stop:
            if i < len(have):
                j = min(stop, len(have))
                out += have[i:j]
            elif 0 <= i - first < len(known):
                j = min(stop, first + len(known))
                out += known[i - first : j - first]
            else:
                out += self.take([i])
                j = i + 1
            i = j
        return out
