"""MarketplaceConnector end to end on real vLLM 0.26 CPU engines in separate processes.

Engines (one registry, all started once for the module):
  A  exporter, connector enabled by name only (the plugin path)
  B  importer, fault injection allowed (negative controls, reported failures), chunked
     prefill of 256 tokens per step
  R  the reference: same model and config, no connector
  C  block size 32, connector loaded through kv_connector_module_path: not compatible
  D  a small KV cache (128 blocks): exports must not keep it from serving a long prompt

The model has seeded normal weights, so its greedy tokens depend on every KV page: an
import that delivered a wrong page would change them (the negative controls show it does).
"""

from __future__ import annotations

import random
import time

import pytest

from tests.conftest import CONNECTOR, connector_config

pytestmark = pytest.mark.engine

BS = 16
MAX_TOKENS = 8
A_OUT = 4  # tokens A generates per prompt
_rng = random.Random(1234)


def fresh(n: int) -> list[int]:
    return [_rng.randrange(3, 500) for _ in range(n)]


# A's prompts, each with its own prefix so B's local prefix cache never interferes.
SHARE_LENGTHS = [40, 64, 100, 150, 200, 256, 300, 333, 400, 480, 512, 600, 640, 700, 777,
                 800, 900, 960, 1000, 1024, 1100, 1200]
SHARED = [fresh(n) for n in SHARE_LENGTHS]
FAULTY = {fault: [fresh(n) for n in (300, 450, 600)] for fault in ("zero", "first_page")}
SALTED = [fresh(320), fresh(320)]
FOR_C = [fresh(n) for n in (256, 500)]
KILLED = fresh(400)
FIRST = fresh(200)  # B's very first request: it meets A and imports at once
FAILING = [fresh(160 + 16 * i) for i in range(8)]  # prefixes P for the reported failures
RESET = [fresh(300) for _ in range(3)]  # exported by A, then A's cache is reset
AFTER_FAIL = fresh(240)  # imported by B right after the reported failures
REGKILL = fresh(320)  # exported by A (after its cache reset) before the registry dies
SHORT = [fresh(n) for n in (200, 333, 512)]  # leases that come back shorter than promised


def exported_blocks(prompt: list[int]) -> int:
    # A exports the full blocks below its last sampled token.
    return (len(prompt) + A_OUT - 1) // BS


@pytest.fixture(scope="module")
def engines(cluster, tiny_model_dir):
    cluster.start("A", tiny_model_dir, connector={"kv_connector": CONNECTOR, "kv_role": "kv_both"})
    cluster.start("B", tiny_model_dir, connector=connector_config(allow_fault_injection=True),
                  disable_log_stats=False,  # connector metrics in LLM.get_metrics()
                  max_num_batched_tokens=256)
    cluster.start("R", tiny_model_dir, connector=None)
    cluster.start(
        "C", tiny_model_dir, block_size=32,
        connector={"kv_connector": CONNECTOR, "kv_role": "kv_both",
                   "kv_connector_module_path": "kvmkt_connector.connector.facade"},
    )
    cluster.start("D", tiny_model_dir, connector=connector_config(), num_gpu_blocks_override=128)
    cluster.wait_all()
    a = cluster.engines["A"]
    plain = (SHARED + [p for ps in FAULTY.values() for p in ps] + FOR_C + [KILLED, FIRST]
             + FAILING + [AFTER_FAIL] + SHORT)
    a.generate(plain, max_tokens=A_OUT)
    a.generate([SALTED[0]], max_tokens=A_OUT, options=[{"cache_salt": "tenant-a"}])
    a.generate([SALTED[1]], max_tokens=A_OUT, options=[{"cache_salt": "tenant-a"}])
    cluster.wait_published(sum(exported_blocks(p) for p in plain + SALTED))
    return cluster.engines


def test_first_request_that_meets_a_holder_imports(engines):
    """No warm-up: B's first request ever imports A's prefix (no probe round first)."""
    b, r = engines["B"], engines["R"]
    prompt = FIRST + fresh(10)
    (got,) = b.generate([prompt], max_tokens=MAX_TOKENS)
    (ref,) = r.generate([prompt], max_tokens=MAX_TOKENS)
    assert got.imported_tokens == (len(FIRST) // BS) * BS
    assert got.token_ids == ref.token_ids


def one_by_one(engine, prompts, **kw):
    """One request at a time, so each request's import is its own."""
    out = []
    for i, p in enumerate(prompts):
        opts = kw.get("options")
        out += engine.generate([p], max_tokens=MAX_TOKENS,
                               options=[opts[i]] if opts else None)
    return out


def test_imports_equal_recompute_exact_and_partial_prefixes(engines):
    b, r = engines["B"], engines["R"]
    prompts, expected = [], []
    for i, a_prompt in enumerate(SHARED):
        if i % 2 == 0:  # exact: B continues A's whole prompt (a later chat turn)
            common, prompt = len(a_prompt), a_prompt + fresh(30)
        else:  # partial: B shares only the first 2/3 (+5) tokens, then diverges
            common = len(a_prompt) * 2 // 3 + 5
            prompt = a_prompt[:common] + fresh(40)
        prompts.append(prompt)
        expected.append(min(common // BS, (len(prompt) - 1) // BS) * BS)
    got = one_by_one(b, prompts)
    ref = one_by_one(r, prompts)
    assert [c.imported_tokens for c in got] == expected
    assert all(e > 0 for e in expected) and len(prompts) >= 20
    mismatches = [i for i, (g, w) in enumerate(zip(got, ref, strict=True)) if g.token_ids != w.token_ids]
    assert not mismatches, f"imported KV changed the output of prompts {mismatches}"
    assert all(w.imported_tokens == -1 for w in ref)  # R really has no connector
    metrics = b.metrics()  # offline: LLM.get_metrics() carries the connector's counters
    assert metrics["vllm:kvmkt_imported_tokens"] >= sum(expected)  # counters lose "_total"
    assert metrics["vllm:kvmkt_hits_full"] + metrics["vllm:kvmkt_hits_partial"] >= len(prompts)


@pytest.mark.parametrize("fault", ["zero", "first_page"])
def test_negative_control_corrupted_pages_change_the_output(engines, fault):
    """The equivalence check above can fail: corrupt the imported pages and it does.

    "zero" blanks the imported pages; "first_page" fills every imported block with the
    holder's first page (the prototype's fallback bug). Merely permuting the pages would
    not be caught by any test: keys carry their rotary position, so later tokens attend
    to the same set of keys whatever their order in the cache.
    """
    b, r = engines["B"], engines["R"]
    prompts = [p + fresh(20) for p in FAULTY[fault]]
    opts = [{"kv_transfer_params": {"kvmkt_fault": fault}}] * len(prompts)
    got = one_by_one(b, prompts, options=opts)
    ref = one_by_one(r, prompts)
    assert all(c.imported_tokens > 0 for c in got)
    differ = sum(g.token_ids != w.token_ids for g, w in zip(got, ref, strict=True))
    assert differ >= 2, f"corrupted ({fault}) imports left {3 - differ}/3 outputs unchanged"


def test_reported_load_failures_are_recomputed(engines):
    """Imports that fail (reported to vLLM as load errors) cost a recompute, nothing else.

    X = P + 300 tokens whose import fails, submitted together with Y = P + 20 tokens, whose
    import succeeds, into an engine prefilling 256 tokens per step. With synchronous loads
    vLLM 0.26 cached X's unconfirmed blocks at allocation, so Y could read them; here loads
    are asynchronous and only confirmed blocks are ever cached."""
    b, r = engines["B"], engines["R"]
    xs = [p + fresh(300) for p in FAILING]
    ys = [p + fresh(20) for p in FAILING]
    fail = {"kv_transfer_params": {"kvmkt_fault": "fail"}}
    before = b.metrics()
    got = b.generate(xs + ys, max_tokens=MAX_TOKENS, options=[fail] * len(xs) + [{}] * len(ys))
    ref = r.generate(xs + ys, max_tokens=MAX_TOKENS)
    after = b.metrics()
    n = len(FAILING)
    assert [g.imported_tokens for g in got[:n]] == [0] * n  # failed: counted as nothing
    # (Y imports P, or finds it in B's own cache once X recomputed it: both are right)
    mismatches = [i for i, (g, w) in enumerate(zip(got, ref, strict=True)) if g.token_ids != w.token_ids]
    assert not mismatches, f"outputs differ after reported failures: {mismatches}"
    failed = after["vllm:kvmkt_fallback_load_error"] - before["vllm:kvmkt_fallback_load_error"]
    deltas = {k.removeprefix("vllm:kvmkt_"): after[k] - before.get(k, 0)
              for k in after if k.startswith("vllm:kvmkt_") and isinstance(after[k], int | float)}
    # the failures did happen, and were counted (offline LLM drops the stats of steps
    # without request outputs: chunked prefill steps here, which the connector must skip)
    assert failed == sum(len(p) // BS for p in FAILING), deltas
    # the engine is still serving and importing
    (again,) = b.generate([AFTER_FAIL + fresh(30)], max_tokens=MAX_TOKENS)
    assert again.imported_tokens == (len(AFTER_FAIL) // BS) * BS


def test_a_lease_shorter_than_promised_imports_its_part(engines):
    """match() answers the lookup table's bound and reads the lease only once vLLM has
    allocated; a lease that comes back shorter ("short": half of it used) copies its part,
    reports the other blocks as load errors, and vLLM prefills them after the copied part."""
    b, r = engines["B"], engines["R"]
    prompts = [p + fresh(25) for p in SHORT]
    opts = [{"kv_transfer_params": {"kvmkt_fault": "short"}}] * len(prompts)
    before = b.metrics()
    got = one_by_one(b, prompts, options=opts)
    ref = one_by_one(r, prompts)
    after = b.metrics()
    assert [g.imported_tokens for g in got] == [len(p) // BS // 2 * BS for p in SHORT]
    assert [g.token_ids for g in got] == [w.token_ids for w in ref]
    # a shortfall is no failed import
    assert after["vllm:kvmkt_fallback_load_error"] == before["vllm:kvmkt_fallback_load_error"]


def test_cache_salt_separates_tenants(engines):
    b, r = engines["B"], engines["R"]
    same = SALTED[0] + fresh(20)
    other = SALTED[1] + fresh(20)
    got = one_by_one(b, [same, other], options=[{"cache_salt": "tenant-a"}, {"cache_salt": "tenant-b"}])
    ref = one_by_one(r, [same, other])
    assert got[0].imported_tokens == (len(SALTED[0]) // BS) * BS  # same salt: shared
    assert got[1].imported_tokens == 0  # other salt: never
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]


def test_no_match_prefills_normally(engines):
    b, r = engines["B"], engines["R"]
    prompts = [fresh(300), fresh(77)]
    got, ref = one_by_one(b, prompts), one_by_one(r, prompts)
    assert [c.imported_tokens for c in got] == [0, 0]
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]


def test_incompatible_instance_imports_nothing_and_says_why(engines, cluster):
    c = engines["C"]
    prompts = [p + fresh(20) for p in FOR_C]
    got = one_by_one(c, prompts)
    recomputed = one_by_one(c, prompts, options=[{"skip_reading_prefix_cache": True}] * 2)
    assert [x.imported_tokens for x in got] == [0, 0]
    assert [x.token_ids for x in got] == [x.token_ids for x in recomputed]
    # C says why, once per neighbour, at start-up or at its next check (every 10 s)
    deadline = time.monotonic() + 15
    while True:
        log = cluster.log("C")
        line = next((ln for ln in log.splitlines() if "not sharing KV with" in ln), "")
        if line or time.monotonic() > deadline:
            break
        one_by_one(c, [fresh(20)])  # a step of C's scheduler runs the check when due
        time.sleep(1)
    assert "block_size (32 here, 16 there)" in line, line or log[-2000:]


def test_exports_never_keep_the_exporter_from_serving(engines, cluster):
    """D (128 KV blocks) exports prefixes until its offer is full, then serves a prompt
    needing more than 90 % of its blocks: exports hold no vLLM blocks, so it runs."""
    d, r = engines["D"], engines["R"]
    with cluster.client() as reg:
        before = reg.status().published_blocks
    d.generate([fresh(480) for _ in range(6)], max_tokens=A_OUT)  # ~180 blocks: > its cache
    cluster.wait_published(before + 60)
    long = fresh(1850)  # 1850 + 8 tokens: 117 of 128 blocks
    (got,) = d.generate([long], max_tokens=MAX_TOKENS)
    (ref,) = r.generate([long], max_tokens=MAX_TOKENS)
    assert len(got.token_ids) == MAX_TOKENS and got.token_ids == ref.token_ids


def test_reset_with_requests_in_flight_withdraws_exports(engines, cluster):
    """A resets its prefix cache while requests run (what pause_generation(clear_cache=True)
    and RL weight syncs do): the reset succeeds, A keeps serving, and B imports nothing A
    exported before it."""
    a, b, r = engines["A"], engines["B"], engines["R"]
    a.generate(RESET, max_tokens=A_OUT)
    cluster.wait_published(sum(exported_blocks(p) for p in RESET))
    running = a.generate_async([fresh(200) for _ in range(4)], max_tokens=64)
    time.sleep(0.5)
    assert a.reset_prefix_cache(reset_running_requests=True) is True
    outs = a.collect(running)
    assert all(len(o.token_ids) == 64 for o in outs)
    time.sleep(0.5)  # the withdrawal goes out through A's background holder channel
    prompts = [p + fresh(20) for p in RESET]
    got = one_by_one(b, prompts)
    ref = one_by_one(r, prompts)
    assert [g.imported_tokens for g in got] == [0] * len(prompts)
    assert [g.token_ids for g in got] == [w.token_ids for w in ref]


def test_registry_sigkilled_sharing_resumes_with_earlier_exports(engines, cluster):
    """The node's registry dies: an exporter starts a new one (auto-start), registers again
    and republishes what it still offers; B's lookups reconnect at once; B then imports a
    prefix A exported before the kill."""
    a, b, r = engines["A"], engines["B"], engines["R"]
    with cluster.client() as reg:
        before = reg.status().published_blocks
    a.generate([REGKILL], max_tokens=A_OUT)
    listed = cluster.wait_published(before + exported_blocks(REGKILL))
    cluster.registry.kill()
    cluster.registry.wait(10)
    t0 = time.monotonic()
    while True:  # every holder publishes all it offered again: the count comes back whole
        try:
            with cluster.client() as reg:
                if reg.status().published_blocks >= listed:
                    break
        except Exception:
            pass  # not listening yet
        assert time.monotonic() - t0 < 20, "exports did not come back after the registry died"
        time.sleep(0.1)
    back_after = time.monotonic() - t0
    prompt = REGKILL + fresh(20)
    (got,) = one_by_one(b, [prompt])
    (ref,) = one_by_one(r, [prompt])
    assert got.imported_tokens == (len(REGKILL) // BS) * BS, f"back after {back_after:.1f} s"
    assert got.token_ids == ref.token_ids
    assert back_after < 5.0


def test_exporter_killed_before_import(engines, cluster):
    """Runs last: A dies; its pages vanish from the registry within 2 s; B stays correct."""
    a, b, r = engines["A"], engines["B"], engines["R"]
    with cluster.client() as reg:
        before = {h.name for h in reg.list_holders()}
        a.kill()
        t0 = time.monotonic()
        while {h.name for h in reg.list_holders()} == before:
            assert time.monotonic() - t0 < 2.0, "dead holder still listed after 2 s"
            time.sleep(0.05)
    prompt = KILLED + fresh(25)
    (got,) = one_by_one(b, [prompt])
    (ref,) = one_by_one(r, [prompt])
    assert got.imported_tokens == 0
    assert got.token_ids == ref.token_ids
