"""Fault suite on real vLLM 0.26 CPU engines: the registry away for 30 s, exporters
SIGKILLed in the middle of a batch, exporters started and killed one after another.

Engines (one registry, which no engine may restart: ``registry_autostart`` is off, so an
outage lasts exactly as long as the test wants):
  A, B   export and import, each reading what the other exported (B allows fault injection)
  X1-X3  short-lived exporters, SIGKILLed one by one (X1 and X2 boot during the registry
         outage, X3 once X1 is dead)

KV caches are small (``num_gpu_blocks_override``): the CI box has little memory to spare.

Every output is compared with the same engine's recompute of the same batch
(``skip_reading_prefix_cache``: no prefix hit, no import); the seeded model makes a wrong
page change the greedy tokens. After each kill the survivors must hold nothing of the dead
engine: no file of its processes in /dev/shm, no mapping of its pages in B, no entry in the
registry; and B's fds, the registry's fds, RSS and entries stay flat from kill to kill.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from kvmkt_connector.demo.engine_process import fd_count, group_pids
from tests.conftest import connector_config, wait_for

pytestmark = pytest.mark.engine

BS = 16
MAX_TOKENS = 6
OUT = 4  # tokens an exporter generates per prompt
OUTAGE_S = 30.0
SMALL_KV = 64 << 20  # bytes: what the engines' start-up memory check asks for
_rng = random.Random(4321)
UID = os.getuid()


def fresh(n: int) -> list[int]:
    return [_rng.randrange(3, 500) for _ in range(n)]


def prompts(n: int, lo: int = 160, hi: int = 320) -> list[list[int]]:
    return [fresh(_rng.randrange(lo, hi)) for _ in range(n)]


# Exported before the registry dies: by A for B (DURING_*: looked up during the outage,
# AFTER_*: in the first batch after it) and by B for A.
DURING_A, AFTER_A = [prompts(2) for _ in range(3)], prompts(4)
DURING_B, AFTER_B = [prompts(2) for _ in range(3)], prompts(4)
KILL_SET = prompts(8)  # X1's exports; B imports them while X1 dies
LATE = prompts(1)  # exported by A; B imports it after X1's death
CHURN = {name: prompts(4) for name in ("X2", "X3")}
RESTART_OLD = prompts(2)  # exported by A before a registry restart with no outage
RESTART_NEW = prompts(2)  # exported by A right after it


def exported_blocks(prompt: list[int]) -> int:
    return (len(prompt) + OUT - 1) // BS


def importable(prefix: list[int]) -> int:
    return len(prefix) // BS * BS


def _extra(**kw) -> dict:
    return connector_config(registry_autostart=False, **kw)


def start_exporter(cluster, name: str, model: str) -> None:
    if name not in cluster.engines:
        cluster.start(name, model, connector=_extra(), num_gpu_blocks_override=128,
                      kv_cache_memory_bytes=SMALL_KV)


@pytest.fixture(scope="module")
def engines(cluster, tiny_model_dir):
    cluster.start("A", tiny_model_dir, connector=_extra(), disable_log_stats=False,
                  num_gpu_blocks_override=512, kv_cache_memory_bytes=SMALL_KV)
    cluster.start("B", tiny_model_dir, connector=_extra(allow_fault_injection=True),
                  disable_log_stats=False, num_gpu_blocks_override=512,
                  kv_cache_memory_bytes=SMALL_KV)
    cluster.wait_all()
    a, b = cluster.engines["A"], cluster.engines["B"]
    for_b = [p for ps in DURING_A for p in ps] + AFTER_A + LATE + RESTART_OLD
    for_a = [p for ps in DURING_B for p in ps] + AFTER_B
    a.generate(for_b, max_tokens=OUT)
    b.generate(for_a, max_tokens=OUT)
    cluster.wait_published(sum(exported_blocks(p) for p in for_a + for_b))
    return cluster.engines


# ------------------------------------------------------------ what a process group holds


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def holder_files(pids: list[int]) -> list[str]:
    """Shared-memory files (export regions, generation tables) created by ``pids``."""
    names = [f"kvmkt-{UID}-holder-{pid}-" for pid in pids]
    return [f for f in os.listdir("/dev/shm") if any(f.startswith(n) for n in names)]


def mapped_holder_files(pids: list[int], of_pids: list[int]) -> list[str]:
    """Lines of ``pids``' memory maps that map a holder file of ``of_pids``."""
    names = [f"kvmkt-{UID}-holder-{pid}-" for pid in of_pids]
    lines = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                lines += [ln.strip() for ln in f if any(n in ln for n in names)]
        except OSError:
            pass
    return lines


@pytest.fixture(scope="module")
def kills(engines):
    """What the survivors hold after each exporter kill (filled by the tests below)."""
    return []


def settle(cluster) -> None:
    """Every engine started is up and registered (all have the connector)."""
    for engine in cluster.engines.values():
        engine.wait_ready()
    with cluster.client() as reg:
        wait_for("not every engine registered", lambda: len(reg.list_holders()) == sum(
            bool(group_pids(e.pid)) for e in cluster.engines.values()), 30)


def kill_and_check(cluster, name: str, kills: list) -> None:
    """SIGKILL exporter ``name``; within seconds nothing of it may remain anywhere."""
    b = cluster.engines["B"]
    settle(cluster)
    dead = group_pids(cluster.engines[name].pid)
    assert dead
    cluster.engines[name].kill()
    with cluster.client() as reg:
        wait_for("the dead exporter is still registered",
                 lambda: not {h.pid for h in reg.list_holders()} & set(dead), 5)
    wait_for("files of the dead exporter are still in /dev/shm",
             lambda: not holder_files(dead), 5)
    b_pids = group_pids(b.pid)
    # B maps a holder's pages while it imports; a dead holder's must go by themselves
    # (B runs no step meanwhile), or its memory stays pinned
    wait_for("B still maps the dead exporter's pages",
             lambda: not mapped_holder_files(b_pids, dead), 5)
    with cluster.client() as reg:
        status = reg.status()
    time.sleep(0.2)  # the registry closes our connection
    kills.append(dict(
        name=name,
        alive=sorted(n for n, e in cluster.engines.items() if group_pids(e.pid)),
        b_fds=fd_count(b_pids),
        registry_fds=fd_count([cluster.registry.pid]),
        registry_rss_kib=rss_kib(cluster.registry.pid),
        holders=len(status.holders),
        leases=status.active_leases,
        entries_of_no_holder=status.published_blocks - sum(
            h.published_blocks for h in status.holders),
    ))
    print(f"\nafter killing {name}: {kills[-1]}")


def wait_exports(cluster, name: str, exported: list[list[int]]) -> None:
    pids = set(group_pids(cluster.engines[name].pid))
    n = sum(exported_blocks(p) for p in exported)
    with cluster.client() as reg:
        wait_for(f"{name}'s exports not published", lambda: any(
            h.pid in pids and h.published_blocks >= n for h in reg.list_holders()), 30)


def recompute(engine, batch):
    return engine.generate(batch, max_tokens=MAX_TOKENS,
                           options=[{"skip_reading_prefix_cache": True}] * len(batch))


def check(engine, batch, expected=None):
    got = engine.generate(batch, max_tokens=MAX_TOKENS)
    ref = recompute(engine, batch)
    bad = [i for i, (g, w) in enumerate(zip(got, ref, strict=True)) if g.token_ids != w.token_ids]
    assert not bad, f"outputs differ from a recompute: {bad}"
    if expected is not None:
        assert [g.imported_tokens for g in got] == expected
    return got


# ------------------------------------------------------------ the tests

def test_registry_gone_for_30s_then_back(engines, cluster, tiny_model_dir):
    """30 s without a registry: every batch is served and correct (nothing imported, each
    skipped lookup counted); once it is back, the holders re-register and republish within
    seconds, and the first batch after imports what was exported before the outage, in both
    directions."""
    a, b = engines["A"], engines["B"]
    with cluster.client() as reg:
        listed = reg.status().published_blocks
    before = {n: engines[n].metrics() for n in "AB"}
    cluster.registry.kill()
    cluster.registry.wait(10)
    t0 = time.monotonic()
    for name in ("X1", "X2"):  # boot without a registry, and meanwhile
        start_exporter(cluster, name, tiny_model_dir)
    for i in range(3):
        check(b, [p + fresh(20) for p in DURING_A[i]], expected=[0, 0])
        check(a, [p + fresh(20) for p in DURING_B[i]], expected=[0, 0])
        time.sleep(max(0.0, t0 + OUTAGE_S * (i + 1) / 3 - time.monotonic()))
    assert time.monotonic() - t0 >= OUTAGE_S
    for n in "AB":
        skipped = (engines[n].metrics()["vllm:kvmkt_fallback_registry_unavailable"]
                   - before[n].get("vllm:kvmkt_fallback_registry_unavailable", 0))
        assert skipped >= 6, f"{n} counted {skipped} lookups skipped during the outage"
    cluster.start_registry()
    with cluster.client() as reg:
        back = wait_for("exports not republished",
                        lambda: reg.status().published_blocks >= listed, 10)
    print(f"\nregistry back: exports republished after {back:.2f} s")
    check(b, [p + fresh(20) for p in AFTER_A], expected=[importable(p) for p in AFTER_A])
    check(a, [p + fresh(20) for p in AFTER_B], expected=[importable(p) for p in AFTER_B])
    assert back < 3.0


def test_exporter_sigkilled_mid_batch(engines, cluster, kills, tiny_model_dir):
    """X1 dies while B's batch imports from it: half the batch has copied, the other half's
    copies are held back (test stall) until after the kill. B's outputs equal the
    reference, the imports that finished before the kill count, and B keeps serving."""
    b, x = engines["B"], engines["X1"]
    settle(cluster)  # X1 and X2 up and registered: the kill below must come on time
    x.generate(KILL_SET, max_tokens=OUT)
    wait_exports(cluster, "X1", KILL_SET)
    batch = [p + fresh(20) for p in KILL_SET]
    stall = {"kv_transfer_params": {"kvmkt_fault": "stall", "kvmkt_stall_s": 4.0}}
    before = b.metrics()
    handle = b.generate_async(batch, max_tokens=MAX_TOKENS, options=[{}] * 4 + [stall] * 4)
    time.sleep(1.5)
    kill_and_check(cluster, "X1", kills)
    start_exporter(cluster, "X3", tiny_model_dir)  # for the next test
    got = b.collect(handle)
    ref = recompute(b, batch)
    bad = [i for i, (g, w) in enumerate(zip(got, ref, strict=True)) if g.token_ids != w.token_ids]
    assert not bad, f"outputs differ after the exporter died: {bad}"
    assert [g.imported_tokens for g in got[:4]] == [importable(p) for p in KILL_SET[:4]]
    failed = b.metrics()["vllm:kvmkt_fallback_load_error"] - before["vllm:kvmkt_fallback_load_error"]
    print(f"\nstalled imports after the kill: {[g.imported_tokens for g in got[4:]]}, "
          f"{failed:.0f} blocks recomputed")
    # still serving and importing (from A)
    check(b, [LATE[0] + fresh(30)], expected=[importable(LATE[0])])


def test_exporters_started_and_killed_leave_nothing(engines, cluster, kills, tiny_model_dir):
    """Exporters come and go: X1 died above with X2 alive, X2 dies with X3 alive, then X3.
    Each one's imports are right while it lives. After each SIGKILL: B's fds are back where
    they were after the first kill; the registry lists only the live engines and no entry
    or lease of a dead one; its fds after X2's kill equal those after X1's (as many engines
    alive) and drop by one engine's share after X3's; its RSS does not grow."""
    b = engines["B"]
    for name in ("X1", *CHURN):
        start_exporter(cluster, name, tiny_model_dir)
    for name in CHURN:
        x = cluster.engines[name]
        x.wait_ready()
        x.generate(CHURN[name], max_tokens=OUT)
        wait_exports(cluster, name, CHURN[name])
        check(b, [p + fresh(20) for p in CHURN[name]],
              expected=[importable(p) for p in CHURN[name]])
        kill_and_check(cluster, name, kills)
    assert [k["name"] for k in kills] == ["X1", "X2", "X3"]
    first, second, last = kills
    assert [k["alive"] for k in kills] == [["A", "B", "X2"], ["A", "B", "X3"], ["A", "B"]]
    assert [k["holders"] for k in kills] == [3, 3, 2]
    assert all(k["entries_of_no_holder"] == 0 and k["leases"] == 0 for k in kills), kills
    assert max(k["b_fds"] for k in kills) <= first["b_fds"] + 2, kills
    # X2 at the first kill and X3 at the second were in the same state: booted, idle
    assert second["registry_fds"] == first["registry_fds"], kills
    assert last["registry_fds"] < second["registry_fds"], kills
    assert last["registry_rss_kib"] <= first["registry_rss_kib"] + 2048, kills


def test_registry_restarted_at_once_new_exports_are_found(engines, cluster):
    """Runs last (the X engines are gone: a restart would leave their idle registry links
    closed, which the fd counts above compare). The registry is SIGKILLed and a new one
    listens at once. B makes no lookup in between, so only B's own check can tell that its
    connection, and the lookup table it maps, belong to a dead registry. B's first batch after the restart imports what A
    exported after it (absent from the stale table) and before it (holder ids and bits
    are handed out anew: B must not skip A's pages under its own old bit)."""
    a, b = engines["A"], engines["B"]
    settle(cluster)
    with cluster.client() as reg:
        listed = reg.status().published_blocks
    cluster.registry.kill()
    cluster.registry.wait(10)
    cluster.start_registry()
    with cluster.client() as reg:
        wait_for("exports not republished", lambda: reg.status().published_blocks >= listed, 10)
    a.generate(RESTART_NEW, max_tokens=OUT)  # A's lookups find the new registry
    cluster.wait_published(listed + sum(exported_blocks(p) for p in RESTART_NEW))
    batch = RESTART_NEW + RESTART_OLD
    check(b, [p + fresh(20) for p in batch], expected=[importable(p) for p in batch])
