"""KV events for cluster routers, on real vLLM 0.26 CPU engines.

Engines A (exporter), B (importer) and C (the marketplace next to ExampleConnector under
MultiConnector, configs/multi-example.json), all with vLLM's ``kv_events_config`` on,
publish over ZMQ to one subscriber here (their PUB sockets connect to it, as they would to
llm-d's), which decodes vLLM's ``KVEventBatch`` as vLLM encodes it. B and C must announce
A's prefix under medium KVMKT with its exact token ids while idle; after a plain prefix-cache
reset, B must announce it again after vLLM's AllBlocksCleared (llm-d clears the whole pod on
it); B must serve what it announced (and so export it too), and retract it while idle after A
is SIGKILLed, while C keeps it (B lists it) until B is SIGKILLed too; A never announces its
own exports. Idle
engines do not step: what they announce, the feed thread publishes through vLLM's
scheduler's publisher, which the connector finds alone and under MultiConnector.
"""

from __future__ import annotations

import random
import threading
import time

import msgspec
import pytest
import zmq
from vllm.config.kv_events import KVEventsConfig
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from kvmkt_connector.hashing import BlockKeyer
from tests.conftest import CONNECTOR, connector_config, wait_for
from tests.e2e.multi_helpers import SMALL, children, config, wait_all

pytestmark = pytest.mark.engine

BS = 16
A_OUT = 4
_rng = random.Random(4321)
PROMPT = [_rng.randrange(3, 500) for _ in range(200)]
EXPORTED = (len(PROMPT) + A_OUT - 1) // BS  # A's full blocks below its last sampled token


class Subscriber:
    """A ZMQ SUB socket the engines' publishers connect to; collects decoded batches."""

    def __init__(self) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self.batches: list[tuple[str, float, KVEventBatch]] = []  # (topic, received, batch)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(100):
                topic, _seq, payload = self._sock.recv_multipart()
                batch = self._decoder.decode(payload)
                with self._lock:
                    self.batches.append((topic.decode(), time.monotonic(), batch))

    def events(self, topic: str, medium: str | None = None) -> list:
        with self._lock:
            return [e for t, _, b in self.batches if t == topic for e in b.events
                    if medium is None or getattr(e, "medium", None) == medium]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)
        self._ctx.term()


def events_config(port: int, topic: str) -> KVEventsConfig:
    return KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                          endpoint=f"tcp://127.0.0.1:{port}", topic=topic)


def announced(events: list) -> dict:
    """hash -> (parent hash, token ids) after applying stores and removals in order."""
    live: dict = {}
    for e in events:
        if isinstance(e, BlockStored):
            parent = e.parent_block_hash
            for i, h in enumerate(e.block_hashes):
                live[h] = (parent, e.token_ids[i * e.block_size:(i + 1) * e.block_size])
                parent = h
        elif isinstance(e, BlockRemoved):
            for h in e.block_hashes:
                live.pop(h, None)
    return live


def chain_tokens(live: dict) -> list[int]:
    """Token ids of the longest chain from a root (what a router matches a prompt on)."""
    children = {p: h for h, (p, _) in live.items()}
    out, h = [], children.get(None)
    while h is not None:
        out += live[h][1]
        h = children.get(h)
    return out


@pytest.fixture(scope="module")
def sub():
    s = Subscriber()
    yield s
    s.close()


def multi_config(storage: str) -> dict:
    """configs/multi-example.json: [Marketplace, ExampleConnector]."""
    cfg = config("multi-example.json")
    for child in children(cfg):
        extra = child["kv_connector_extra_config"]
        if child["kv_connector"] == CONNECTOR:
            extra["kv_events_interval_ms"] = 250
        else:
            extra["shared_storage_path"] = storage
    return cfg


@pytest.fixture(scope="module")
def engines(cluster, tiny_model_dir, sub):
    for name in ("A", "B"):
        cluster.start(name, tiny_model_dir, connector=connector_config(kv_events_interval_ms=250),
                      kv_events_config=events_config(sub.port, f"kv@{name}"))
    cluster.start("C", tiny_model_dir, connector=multi_config(f"{cluster.workdir}/example-C"),
                  kv_events_config=events_config(sub.port, "kv@C"), **SMALL)
    wait_all(cluster)
    return cluster.engines


def test_importer_announces_serves_and_retracts_a_neighbours_prefix(engines, cluster, sub):
    a, b, c = engines["A"], engines["B"], engines["C"]
    # Under MultiConnector our half learns its workers' layout (its namespace) in its first
    # step: one request that exports nothing (less than a block), then C stays idle.
    c.generate([PROMPT[:8]], max_tokens=1)
    a.generate([PROMPT], max_tokens=A_OUT)
    cluster.wait_published(EXPORTED)
    published = time.monotonic()

    # B and C announce A's prefix while idle (no request runs on them), with the exact tokens.
    def announce(topic: str) -> bool:
        return len(chain_tokens(announced(sub.events(topic, "KVMKT")))) >= EXPORTED * BS

    took = wait_for("B's KVMKT announcement", lambda: announce("kv@B"), 15)
    took_c = wait_for("C's KVMKT announcement (MultiConnector)", lambda: announce("kv@C"), 15)
    live = announced(sub.events("kv@B", "KVMKT"))
    assert chain_tokens(live) == PROMPT[: EXPORTED * BS]
    assert announced(sub.events("kv@C", "KVMKT")) == live
    # Block hashes are our keys (not vLLM's seed-dependent hashes), as vLLM formats its own.
    keyer = BlockKeyer(_namespace(cluster), BS)
    assert set(live) == {maybe_convert_block_hash(k) for k in keyer.keys(PROMPT)[:EXPORTED]}
    # A's own events: vLLM's GPU ones for its prefix; nothing as KVMKT (it cannot import
    # its own exports and B offers nothing yet).
    assert sub.events("kv@A", "GPU") and not sub.events("kv@A", "KVMKT")
    print(f"announced {time.monotonic() - published:.2f} s after publishing ({took:.2f} s "
          f"wait for B, then {took_c:.2f} s for C)")

    # A plain prefix-cache reset on B: vLLM publishes AllBlocksCleared with B's next step,
    # and llm-d then drops all of B's blocks, KVMKT ones too: B announces them again after
    # it, in that step's batch. What B announced, B serves: that step's request, for the
    # prompt, imports every announced block.
    assert b.reset_prefix_cache() is True
    (got,) = b.generate([PROMPT], max_tokens=A_OUT)
    assert got.imported_tokens == EXPORTED * BS

    def after_clear() -> list | None:
        events = sub.events("kv@B")
        cleared = [i for i, e in enumerate(events) if isinstance(e, AllBlocksCleared)]
        if not cleared:
            return None
        return [e for e in events[cleared[-1] + 1:] if getattr(e, "medium", None) == "KVMKT"]

    wait_for("B's AllBlocksCleared", lambda: after_clear() is not None, 15)
    wait_for("B's announcements after the reset", lambda: announced(after_clear()) == live, 15)

    # B exports the prompt too (its request ended): C can now import it from A or from B.
    cluster.wait_published(2 * EXPORTED)

    # A dies: B, idle, retracts every block it announced (its own exports never count for
    # B). C still announces them all: B lists them.
    took = kill_and_see_retracted(sub, a, "kv@B", live)
    print(f"retracted {took:.2f} s after SIGKILL of A")
    time.sleep(1.0)  # four feed intervals of C
    assert announced(sub.events("kv@C", "KVMKT")) == live

    # B dies too: C, idle under MultiConnector, retracts every block it announced.
    took = kill_and_see_retracted(sub, b, "kv@C", live)
    print(f"C (MultiConnector) retracted {took:.2f} s after SIGKILL of B")


def kill_and_see_retracted(sub, engine, topic: str, live: dict) -> float:
    """SIGKILL ``engine``; ``topic``'s instance must retract every block of ``live``
    (BlockRemoved of each, nothing left announced); returns how long that took."""
    n_before = len(sub.events(topic, "KVMKT"))
    engine.kill()
    killed = time.monotonic()
    wait_for(f"{topic}'s retraction", lambda: not announced(sub.events(topic, "KVMKT")), 15)
    removed = [e for e in sub.events(topic, "KVMKT")[n_before:] if isinstance(e, BlockRemoved)]
    assert {h for e in removed for h in e.block_hashes} == set(live)
    return time.monotonic() - killed


def _namespace(cluster) -> bytes:
    with cluster.client() as c:
        (ns,) = {h.namespace for h in c.list_holders()}
    return ns
