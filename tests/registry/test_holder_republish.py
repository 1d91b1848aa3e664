"""``HolderChannel`` with more to publish than one frame holds: it publishes in chunks, a
restarted registry gets every entry again (tokens and parent links included), and a registry that fails the
registration is retried with a growing pause, not in a tight loop."""

from __future__ import annotations

import hashlib
import time

import pytest
from registry_helpers import namespace, wait_until

from kvmkt_connector.config import MarketplaceConfig
from kvmkt_connector.connector.holder_channel import HolderChannel, HolderRegistration
from kvmkt_connector.registry.client import RegistryClient
from kvmkt_connector.registry.framing import FrameError, encode_frame
from kvmkt_connector.registry.protocol import MAX_HOLDERS, BlockTokens, Publish, publish_chunks

NS = namespace("republish")


def blocks(n: int, token_bytes: int) -> tuple[list[bytes], list[BlockTokens]]:
    """A chain of ``n`` blocks (keys need only be distinct for the registry)."""
    keys = [hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest() for i in range(n)]
    tokens = [BlockTokens(k, keys[i - 1] if i else b"", i.to_bytes(4, "little") * (token_bytes // 4))
              for i, k in enumerate(keys)]  # fmt: skip
    return keys, tokens


def channel(socket_path: str, chunk_bytes: int | None = None) -> HolderChannel:
    cfg = MarketplaceConfig(registry_socket=socket_path, registry_autostart=False,
                            registry_sync_interval_ms=50, registry_timeout_ms=10_000)
    extra = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    return HolderChannel(cfg, "big", HolderRegistration(NS, "big", b"fp", b"desc"), **extra)


def listed(reg, keys: list[bytes]) -> int:
    with reg.connect("reader", timeout_s=10) as reader:
        return reader.lookup(NS, keys)[1]


def chain_leased(reg, keys: list[bytes]) -> int:
    """Blocks an importer leases by the last key alone (through the parent links)."""
    with reg.connect("importer", timeout_s=10) as importer:
        grant = importer.lease_chain(NS, keys[-1], len(keys), 1000)
        return 0 if grant is None else len(grant.keys) * (grant.keys == keys)


def described(reg) -> list[BlockTokens]:
    with reg.connect("reader") as reader:
        return [c.block for c in reader.offers(NS, max_changes=4096).changes]


def test_small_chunks_and_a_restarted_registry(start_registry, monkeypatch) -> None:
    reg = start_registry()
    keys, tokens = blocks(600, 16)
    chunk = 2048
    sent: list[int] = []  # encoded size of every Publish the channel sent
    real_publish = RegistryClient.publish

    def spy(self, k, loc, t=(), p=()):
        sent.append(len(encode_frame(Publish(list(k), list(loc), list(t), list(p)))))
        return real_publish(self, k, loc, t, p)

    monkeypatch.setattr(RegistryClient, "publish", spy)
    ch = channel(reg.socket_path, chunk)
    try:
        wait_until(lambda: ch.connected, 10)
        ch.publish(keys, list(range(len(keys))), 0, tokens, [b""] + keys[:-1])
        wait_until(lambda: listed(reg, keys) == len(keys), 10)
        assert described(reg) == tokens
        assert chain_leased(reg, keys) == len(keys)
        assert len(sent) > 20 and max(sent) <= chunk
        sent.clear()

        reg.stop()
        reg = start_registry()  # same socket: the channel registers and publishes again
        wait_until(lambda: ch.connected and ch.generation == 2, 10)
        wait_until(lambda: listed(reg, keys) == len(keys), 10)
        assert described(reg) == tokens  # in order: parents before children
        assert chain_leased(reg, keys) == len(keys)  # the links came back too
        assert len(sent) > 20 and max(sent) <= chunk
    finally:
        ch.close()


def test_default_chunks_carry_70k_blocks_with_token_ids(start_registry) -> None:
    reg = start_registry()
    keys, tokens = blocks(70_000, 64)  # block size 16
    with pytest.raises(FrameError):  # what one Publish of it all would meet
        encode_frame(Publish(keys, list(range(len(keys))), tokens))
    assert len(publish_chunks(keys, list(range(len(keys))), tokens)) > 1
    ch = channel(reg.socket_path)
    try:
        wait_until(lambda: ch.connected, 10)
        ch.publish(keys, list(range(len(keys))), 0, tokens)
        wait_until(lambda: listed(reg, keys) == len(keys), 20, 0.1)
        reg.stop()
        reg = start_registry()
        wait_until(lambda: ch.connected and ch.generation == 2, 20, 0.05)
        wait_until(lambda: listed(reg, keys) == len(keys), 20, 0.1)
    finally:
        ch.close()


def test_a_failing_registration_backs_off(start_registry, monkeypatch) -> None:
    reg = start_registry()
    others = [reg.connect(f"h{i}") for i in range(MAX_HOLDERS)]
    for i, other in enumerate(others):
        other.register_holder(NS, f"h{i}", b"", b"")  # the registry is full
    attempts: list[float] = []
    real_register = RegistryClient.register_holder

    def spy(self, *args, **kwargs):
        attempts.append(time.monotonic())
        return real_register(self, *args, **kwargs)

    monkeypatch.setattr(RegistryClient, "register_holder", spy)
    ch = channel(reg.socket_path)
    try:
        time.sleep(2.5)
        assert not ch.connected
        # Pauses of 0.2, 0.4, 0.8, 1.6 s: 4 attempts in 2.5 s (a fixed 0.2 s would be ~12).
        assert 2 <= len(attempts) <= 5, attempts
        gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
        assert all(b > 1.5 * a for a, b in zip(gaps, gaps[1:], strict=False)), gaps
        others.pop().close()  # room again: registered at the next attempt
        wait_until(lambda: ch.connected, 5)
    finally:
        ch.close()
        for other in others:
            other.close()
