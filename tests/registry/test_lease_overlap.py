"""The lease overlaps vLLM's allocation (match() answers the lookup table's bound and posts
the lease; take_jobs reads it) and KeyProbe's checkpoints. Each test drives ImportPlanner
against a live registry the way vLLM 0.26's scheduler calls the connector. Written by an
independent review of that change; the first three failed before its fixes."""

from __future__ import annotations

import random

import pytest
from registry_helpers import import_planner, linked_holder, namespace, planner_request

from kvmkt_connector.hashing import PrefixKeys

NS = namespace("review-ovl")




def _vllm_round(planner, req, keys, num_local):
    """One admission of ``req`` as vLLM 0.26 does it: get_num_new_matched_tokens ->
    update_state_after_alloc -> build_connector_meta -> the worker reports the job (a job
    whose src is shorter than dst is 'done' with dst[len(src):] as load errors) ->
    _update_requests_with_invalid_blocks: num_computed_tokens truncated at the first
    invalid block. Returns (promised, num_computed_tokens after the load)."""
    bs = planner._block_size
    promised = planner.match(req, keys, NS, num_local)
    if promised == 0:
        return 0, None
    blocks = list(range(100, 100 + req.num_tokens // bs + 1))
    dst = planner.on_alloc(req, blocks, promised)
    (job,) = planner.take_jobs()
    assert job.dst == dst
    failed = set(job.dst[len(job.src):])
    planner.on_jobs_done([job.job_id])
    computed = num_local + promised
    for idx, b in enumerate(blocks[: computed // bs]):
        if b in failed:
            computed = idx * bs
            break
    return promised, computed


def _rounds(planner, req, keys, most: int) -> list[tuple[int, int | None]]:
    """vLLM's admissions of ``req`` until it computes something or is promised nothing."""
    rounds = []
    for _ in range(most):
        promised, computed = _vllm_round(planner, req, keys, 0)
        rounds.append((promised, computed))
        if promised == 0 or computed:
            break
    return rounds


@pytest.mark.parametrize("check", ["incompatible", "rewritten"])
def test_a_miss_after_the_promise_is_not_promised_again_forever(registry, check):
    """The table lists the prefix, but the lease is unusable: a holder of another transport
    (LeaseCheck.usable -> None, persistent while it lists the prefix) or rewritten pages (0).
    vLLM parks the request, gets every block back as a load error, truncates
    num_computed_tokens to 0, frees the blocks, and -- num_computed_tokens == 0 -- asks
    get_num_new_matched_tokens again: it must not be promised the same blocks again (it
    was, on every round, so the request never ran). Next requests then wait for their
    lease in match(), so they are not parked for nothing."""
    bs, root = 2, b"loop-root"
    tokens = list(range(1000, 1000 + 8 * bs)) + [1]
    keys = PrefixKeys(root, bs).extend(tokens)
    holder = linked_holder(registry, NS, keys)
    usable = (lambda _d, _l: None) if check == "incompatible" else (lambda _d, _l: 0)
    planner, link = import_planner(registry.socket_path, bs, True, usable)
    req = planner_request("r", tokens)
    mine = PrefixKeys(root, bs)
    try:
        rounds = _rounds(planner, req, mine, 5)
        assert rounds[-1][0] == 0 or rounds[-1][1], (
            f"vLLM re-queries the request with nothing computed and is promised blocks "
            f"again each time: {rounds}")
        assert len(rounds) == 2
        other = planner_request("r2", tokens)
        assert planner.match(other, PrefixKeys(root, bs), NS, 0) == 0  # known now: no promise
        assert planner._requests["r2"].asked is None
    finally:
        link.close()
        holder.close()


def test_short_fault_on_a_one_block_lease_loops(registry):
    """The test-only 'short' fault halves a 1-block lease to 0: the same re-query."""
    bs, root = 2, b"short-root"
    tokens = list(range(2000, 2000 + 1 * bs)) + [1]
    keys = PrefixKeys(root, bs).extend(tokens)
    holder = linked_holder(registry, NS, keys)
    planner, link = import_planner(registry.socket_path, bs, True)
    import msgspec

    planner._cfg = msgspec.structs.replace(planner._cfg, allow_fault_injection=True)
    req = planner_request("r", tokens)
    req.kv_transfer_params = {"kvmkt_fault": "short"}
    try:
        rounds = _rounds(planner, req, PrefixKeys(root, bs), 4)
        assert rounds[-1][0] == 0 or rounds[-1][1], rounds
    finally:
        link.close()
        holder.close()


# ------------------------------------------------------------------ KeyProbe checkpoints


@pytest.mark.parametrize("seed", range(60))
def test_probe_checkpoints_against_extend(seed):
    """Spans past _CHECKPOINT (64) blocks, any base/first/end, any access order, PrefixKeys
    extended part-way (the verify path), and the same probe read twice."""
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 3, 16])
    n = rng.randint(60, 400)
    tokens = [rng.randrange(1 << 32) for _ in range(n * bs + rng.randint(0, bs - 1))]
    full = PrefixKeys(b"r", bs).extend(tokens)
    pre = PrefixKeys(b"r", bs)
    pre.extend(tokens, upto=rng.choice([0, rng.randint(0, n), 63, 64, 65, 128]) * bs)
    first = rng.randint(0, n)
    end = rng.choice([n, n + 5, rng.randint(first, n)])
    probe = pre.probe(tokens, first, end)
    hi = max(first, min(end, n))
    order = [rng.randrange(hi) for _ in range(rng.randint(1, 3 * max(1, hi)))] if hi else []
    if rng.random() < 0.5:
        order.sort(reverse=True)
    for j, b in enumerate(order):
        if j == len(order) // 3 and rng.random() < 0.5:
            pre.extend(tokens, upto=rng.randint(0, n) * bs)
        assert probe.block_key(b) == full[b], (seed, b, first, end)
    for i in range(len(probe)):
        assert probe[i] == full[first + i]
    if len(probe):
        assert probe[-1] == full[hi - 1]


# ------------------------------------------------------------------ the pipelined client


def test_pipelined_replies_go_to_their_ownplanner_request(registry):
    import threading

    from kvmkt_connector.registry.client import RegistryUnavailable
    from kvmkt_connector.registry.protocol import LeaseGranted, NoMatch

    bs, root = 2, b"pipe-root"
    tokens = list(range(3000, 3000 + 6 * bs))
    keys = PrefixKeys(root, bs).extend(tokens)
    holder = linked_holder(registry, NS, keys)
    c = registry.connect("imp")
    a = c.post_lease_chain(NS, keys[2], 3, 10_000)
    c.release_leases_later([123456])  # unknown id: Ok, read by nobody
    b = c.post_lease_chain(NS, b"\x01" * 16, 1, 10_000)
    d = c.post_lease_chain(NS, keys[5], 6, 10_000)
    assert c.status().active_leases == 2  # a _call reads all three replies first
    ra, rb, rd = a.result(), b.result(), d.result()
    assert isinstance(ra, LeaseGranted) and ra.keys == keys[:3]
    assert isinstance(rb, NoMatch)
    assert isinstance(rd, LeaseGranted) and rd.keys == keys
    c.release_leases_later([ra.lease_id, rd.lease_id])
    assert not c.peer_closed()  # (reads the release's reply only if it came already)
    c.drain()
    assert not c._unread
    assert c.status().active_leases == 0
    # threads: every _call gets its own reply
    errors = []

    def worker(i):
        try:
            for _ in range(200):
                if i % 2:
                    assert isinstance(c.status().active_leases, int)
                else:
                    assert c.list_holders()[0].name == "h"
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[:3]
    e = c.post_lease_chain(NS, keys[0], 1, 10_000)
    c.close()
    with pytest.raises(RegistryUnavailable):
        e.result()
    holder.close()


# ------------------------------------------------------------------ a hung registry


def test_a_hung_registry_costs_one_timeout_not_two(registry):
    """registry_link's contract: 'only a registry that answers slowly (a timeout) makes it
    stay away for registry_retry_s, so a hung registry costs one timeout per period'. The
    posted lease's reply is read in take_jobs (build_connector_meta); RegistryLink.result()
    took its timeout for a closed connection, so _checked's fallback lease reconnected at
    once and paid a second timeout (Hello) on the scheduler thread."""
    import os
    import signal
    import time

    from kvmkt_connector.config import MarketplaceConfig
    from kvmkt_connector.connector.importer import ImportPlanner
    from kvmkt_connector.connector.registry_link import RegistryLink
    from kvmkt_connector.metrics import MarketplaceStats

    bs, root = 2, b"hung-root"
    tokens = list(range(4000, 4000 + 8 * bs)) + [1]
    keys = PrefixKeys(root, bs).extend(tokens)
    holder = linked_holder(registry, NS, keys)
    cfg = MarketplaceConfig(registry_socket=registry.socket_path, registry_autostart=False,
                            min_import_tokens=bs, registry_timeout_ms=400)
    stats = MarketplaceStats()
    link = RegistryLink(cfg, "importer", stats)
    planner = ImportPlanner(cfg, bs, link, stats, lambda _d, locs: len(locs))
    req = planner_request("r", tokens)
    pid = registry.proc.pid
    assert link.call(lambda c: c.status()) is not None  # connected, table mapped
    assert link.hint(list(keys)) == len(keys)
    try:
        os.kill(pid, signal.SIGSTOP)
        promised = planner.match(req, PrefixKeys(root, bs), NS, 0)  # table hint + post
        assert promised == 8 * bs
        planner.on_alloc(req, list(range(100, 120)), promised)
        t0 = time.monotonic()
        (job,) = planner.take_jobs()
        took = time.monotonic() - t0
        assert job.src == []
        assert took < 0.6, f"take_jobs blocked the scheduler {took:.2f} s (timeout 0.4 s)"
    finally:
        os.kill(pid, signal.SIGCONT)
        link.close()
        holder.close()
