"""ImportPlanner's ``confirmed`` (the export's ``known`` keys) against the keys of the
request's own tokens: after one import, a second import at another frontier (preempted and
resumed), the 'short' fault, a lease that shrank before the copy, failed copies; and what
the export then publishes when a holder's parent links were mixed up between spot checks."""

from __future__ import annotations

import msgspec
import pytest
from registry_helpers import import_planner, linked_holder, namespace, planner_request

from kvmkt_connector.hashing import PrefixKeys

NS = namespace("confirmed")
BS = 2
ROOT = b"confirmed-root"


def _tokens(n_blocks, base=5000):
    return list(range(base, base + n_blocks * BS)) + [1]


def _admit(planner, req, num_local, fail=False):
    """get_num_new_matched_tokens -> update_state_after_alloc -> build_connector_meta ->
    the workers report the job. Returns the job."""
    promised = planner.match(req, PrefixKeys(ROOT, BS), NS, num_local)
    assert promised > 0
    blocks = list(range(100, 100 + req.num_tokens // BS + 1))
    planner.on_alloc(req, blocks, promised)
    (job,) = planner.take_jobs()
    planner.on_jobs_done([job.job_id], failed=fail)
    return job


@pytest.mark.parametrize("verify_all", [True, False])
def test_confirmed_keys_are_the_requests_own_at_their_positions(registry, verify_all):
    tokens = _tokens(60)
    ours = PrefixKeys(ROOT, BS).extend(tokens)
    holder = linked_holder(registry, NS, ours)
    planner, link = import_planner(registry.socket_path, BS, verify_all)
    try:
        req = planner_request("r", tokens)
        job = _admit(planner, req, 4 * BS)
        c = planner._requests["r"].confirmed
        first, keys = c.first, c.keys
        assert first == 4 and keys == ours[4 : 4 + len(job.src)] and len(keys) == len(job.src) > 0
        # preempted and resumed: vLLM asks again with another frontier
        job = _admit(planner, req, 20 * BS)
        c = planner._requests["r"].confirmed
        first, keys = c.first, c.keys
        assert first == 20 and keys == ours[20 : 20 + len(job.src)]
        # 'short': half the lease is copied
        planner._cfg = msgspec.structs.replace(planner._cfg, allow_fault_injection=True)
        req2 = planner_request("r2", tokens)
        req2.kv_transfer_params = {"kvmkt_fault": "short"}
        job = _admit(planner, req2, 2 * BS)
        c = planner._requests["r2"].confirmed
        first, keys = c.first, c.keys
        assert first == 2 and keys == ours[2 : 2 + len(job.src)] and len(job.src) < len(job.dst)
        # a failed copy confirms nothing; the request's later finish returns no keys
        req3 = planner_request("r3", tokens)
        _admit(planner, req3, 0, fail=True)
        assert planner.on_request_finished("r3") == (0, None)
        c = planner.on_request_finished("r2")[1]
        assert (c.first, c.keys) == (2, ours[2 : 2 + len(job.src)])
    finally:
        link.close()
        holder.close()


def test_shrunk_lease_confirms_only_what_was_copied(registry):
    tokens = _tokens(30)
    ours = PrefixKeys(ROOT, BS).extend(tokens)
    holder = linked_holder(registry, NS, ours)
    # the page check says only the first 9 pages are still the published ones
    planner, link = import_planner(registry.socket_path, BS, True, usable=lambda d, locs: 9)
    try:
        req = planner_request("r", tokens)
        job = _admit(planner, req, 3 * BS)
        assert len(job.src) == 9
        c = planner._requests["r"].confirmed
        assert (c.first, c.keys) == (3, ours[3:12])
    finally:
        link.close()
        holder.close()


def test_mixed_up_link_between_spot_checks_becomes_our_export(registry, tmp_path):
    """In place (spot checks), a holder whose parent links put a foreign key K' at block 7
    passes _ours, and the planner confirms K' at position 7. After a preemption vLLM may
    recompute position 7 from the request's own tokens into another block: that block must
    be offered under the request's own key, never under the lease's (found in review; the
    ledger now uses an unverified lease key only for the page the copy wrote under it)."""
    from vllm.v1.core.block_pool import BlockPool

    from kvmkt_connector.config import MarketplaceConfig
    from kvmkt_connector.connector.exporter import ExportLedger
    from kvmkt_connector.metrics import MarketplaceStats
    from kvmkt_connector.transport.generations import GenerationTable
    from tests.unit.test_export_ledger import _request
    from tests.unit.test_export_ledger_fuzz import RecordingChannel

    n = 40
    tokens = _tokens(n, base=9000)
    ours = PrefixKeys(ROOT, BS).extend(tokens)
    foreign = PrefixKeys(ROOT, BS).extend(_tokens(n, base=70000))[7]
    held = list(ours)
    held[7] = foreign
    links = [b""] + held[:-1]  # K8's parent is K', K''s parent is K6
    holder = linked_holder(registry, NS, held, links=links)
    planner, link = import_planner(registry.socket_path, BS, verify_all_keys=False)
    try:
        req = planner_request("r", tokens)
        job = _admit(planner, req, 0)
        assert len(job.src) == n - 1 or len(job.src) == n  # the chain lease was taken
        _, known = planner.on_request_finished("r")
        assert known.keys[7] == foreign and not known.verified  # the holder's word, at a block no spot check saw
        # The request was preempted and recomputed everything into blocks 200.. before
        # finishing (no second import: its own prefix cache / local compute).
        pool = BlockPool(num_gpu_blocks=301, enable_caching=True, hash_block_size=BS)
        gens = GenerationTable.create(str(tmp_path / "gen"), 301)
        ch = RecordingChannel()
        ledger = ExportLedger(MarketplaceConfig(registry_autostart=False), BS, ch,
                              MarketplaceStats(), pool, None, gens)
        vreq = _request("r", tokens[:-1])  # the vLLM request, finished after one token
        blocks = list(range(200, 200 + n))
        ledger.on_request_finished(vreq, blocks, PrefixKeys(ROOT, BS), False, known)
        listed = {b: k for b, (k, _) in ledger._listed.items()}
        wrong = {b - 200: k.hex()[:8] for b, k in listed.items() if k != ours[b - 200]}
        assert not wrong, (
            f"blocks the request computed itself are offered under the lease's keys: {wrong}")
        gens.close()
    finally:
        link.close()
        holder.close()
