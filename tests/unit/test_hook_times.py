"""HookTimes (KVMKT_TRACE=hooks) and the breakdown that sums it per import: the host-work
table issue 10 asks for is only as good as these two."""

from __future__ import annotations

import importlib.util
import logging
import os
import time

import pytest

from kvmkt_connector.logs import HookTimes

_BREAKDOWN = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "trace_breakdown.py")


def _breakdown():
    spec = importlib.util.spec_from_file_location("trace_breakdown", _BREAKDOWN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode, on", [("hooks", True), ("1", True), ("0", False), ("", False)])
def test_enabled_by_kvmkt_trace(monkeypatch, mode, on) -> None:
    monkeypatch.delenv("KVMKT_PROFILE", raising=False)
    monkeypatch.setenv("KVMKT_TRACE", mode)
    assert HookTimes(logging.getLogger("t")).enabled is on


def test_span_leaves_out_the_copy_wait_and_survives_errors(monkeypatch, caplog) -> None:
    monkeypatch.delenv("KVMKT_PROFILE", raising=False)
    monkeypatch.setenv("KVMKT_TRACE", "hooks")
    hooks = HookTimes(logging.getLogger("vllm.kvmkt.test"))

    def work(x):
        time.sleep(0.03)
        return x + 1

    with caplog.at_level(logging.INFO, logger="vllm.kvmkt.test"):
        assert hooks.run("get_finished", work, 1, waited_ns=lambda: 25_000_000) == 2
        with pytest.raises(ZeroDivisionError):
            hooks.run("match", lambda: 1 / 0)  # batched: not logged yet
        hooks.run("stats", lambda: None)
        hooks.flush()
    bd = _breakdown()
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2  # the first span flushed at once, the next two together
    spans = []
    for msg in logged:
        spans += bd.parse_spans(bd._HOOKS.search(msg)[1])
    assert [h for _, _, _, h in spans] == ["get_finished", "match", "stats"]
    assert 4_000_000 <= spans[0][1] < 25_000_000  # 30 ms slept, 25 ms of it the copy's wait
    assert 0 <= spans[0][2] < 4_000_000  # sleeping is not CPU time
    assert spans[0][0] < spans[1][0] < spans[2][0]


def test_cpu_time_tells_running_from_waiting(monkeypatch, caplog) -> None:
    """A hook that computes has CPU time close to its wall time; one whose thread waits
    (here: for another thread holding a lock, as it would for the GIL) does not."""
    import threading

    monkeypatch.delenv("KVMKT_PROFILE", raising=False)
    monkeypatch.setenv("KVMKT_TRACE", "hooks")
    hooks = HookTimes(logging.getLogger("vllm.kvmkt.test2"))

    def busy():
        end = time.thread_time_ns() + 20_000_000
        while time.thread_time_ns() < end:
            pass

    held = threading.Lock()
    held.acquire()
    with caplog.at_level(logging.INFO, logger="vllm.kvmkt.test2"):
        hooks.run("busy", busy)
        threading.Timer(0.03, held.release).start()
        hooks.run("blocked", held.acquire)
        hooks.flush()
    bd = _breakdown()
    spans = {h: (ns, cpu) for r in caplog.records
             for _, ns, cpu, h in bd.parse_spans(bd._HOOKS.search(r.getMessage())[1])}
    busy_wall, busy_cpu = spans["busy"]
    assert busy_cpu >= 20_000_000 and busy_wall >= 0.95 * busy_cpu  # (the clocks differ a little)
    assert spans["blocked"][0] >= 20_000_000 and spans["blocked"][1] < 5_000_000


def test_breakdown_sums_hooks_inside_each_window(tmp_path, capsys) -> None:
    bd = _breakdown()
    bench = tmp_path / "ttft.log"
    bench.write_text("import-call 1000 5000 16384\nimport-call 6000 9000 16384\n"
                     "hit-call 10000 12000 16384\n")  # fmt: skip
    engine = tmp_path / "engine.log"
    engine.write_text("\n".join([
        "INFO kvmkt-hooks 999:7000000:match",  # before the first window: not counted
        "(EngineCore) INFO [logs.py:55] kvmkt-hooks 1000:300000:match 2000:200000:build_meta",
        "INFO kvmkt-hooks 4000:100000:build_meta 6500:500000:match",
        "INFO kvmkt-trace 2500 r1 launched",
        "INFO kvmkt-hooks 11000:50000:match",
    ]) + "\n")  # fmt: skip (the format before CPU times were logged)
    spans = bd.hook_spans(str(engine))
    work = bd.host_work(bd.windows(str(bench)), lambda kind: spans)
    first, second = work[("import", 16384)]
    assert first == pytest.approx({"match": 0.3, "build_meta": 0.3, "total": 0.6})
    assert second == pytest.approx({"match": 0.5, "total": 0.5})
    assert work[("hit", 16384)] == [pytest.approx({"match": 0.05, "total": 0.05})]
    assert bd.main([str(bench), str(engine)]) == 0
    out = capsys.readouterr().out
    total = next(ln for ln in out.splitlines() if ln.startswith("total"))
    assert total.split()[1:] == ["0.050", "0.550"]  # hit, import (median of 0.6 and 0.5)
    assert "thread CPU time" not in out  # not logged in this format


def test_breakdown_cpu_table(tmp_path, capsys) -> None:
    bd = _breakdown()
    bench = tmp_path / "ttft.log"
    bench.write_text("import-call 1000 5000 16384\n")
    engine = tmp_path / "engine.log"
    engine.write_text("INFO kvmkt-hooks 1000:300000:100000:match 2000:200000:150000:build_meta\n")
    spans = bd.hook_spans(str(engine))
    assert spans == [(1000, 300000, 100000, "match"), (2000, 200000, 150000, "build_meta")]
    (cpu,) = bd.host_work(bd.windows(str(bench)), lambda kind: spans, cpu=True)[("import", 16384)]
    assert cpu == pytest.approx({"match": 0.1, "build_meta": 0.15, "total": 0.25})
    assert bd.main([str(bench), str(engine)]) == 0
    out = capsys.readouterr().out.split("thread CPU time")
    assert len(out) == 2
    wall = next(ln for ln in out[0].splitlines() if ln.startswith("total"))
    cpu_total = next(ln for ln in out[1].splitlines() if ln.startswith("total"))
    assert wall.split()[1:] == ["0.500"] and cpu_total.split()[1:] == ["0.250"]


def test_breakdown_phases_set_the_floor_beside_ours(tmp_path, capsys) -> None:
    """Phases: call -> first hook -> last after_alloc (forward scheduled) -> token, B's
    spans for import/hit calls and F's for floor calls; gc spans inside calls counted."""
    bd = _breakdown()
    ms = 1_000_000
    bench = tmp_path / "ttft.log"
    bench.write_text(f"import-call {0} {30 * ms} 16384\nfloor-call {100 * ms} {125 * ms} 16384\n")
    b_log = tmp_path / "B.log"
    b_log.write_text("\n".join([
        f"INFO kvmkt-hooks {7 * ms}:500000:400000:match {8 * ms}:300000:300000:after_alloc "
        f"{17 * ms}:50000:50000:after_alloc",
        f"INFO kvmkt-hooks {107 * ms}:500000:400000:match {109 * ms}:100:100:after_alloc",
        f"INFO kvmkt-wait {12 * ms}:{3 * ms}:{3 * ms}:gc-gen2",
    ]) + "\n")  # (B's spans inside F's window must not count for F)
    f_log = tmp_path / "F.log"
    f_log.write_text(f"INFO kvmkt-hooks {106 * ms}:10000:10000:match "
                     f"{107 * ms}:10000:10000:after_alloc {110 * ms}:10000:10000:after_alloc\n")
    assert bd.main([str(bench), str(b_log), str(f_log)]) == 0
    out = capsys.readouterr().out.split("== phases")[1].splitlines()
    rows = {ln.split()[0] + " " + ln.split()[1]: ln.split()[2:] for ln in out[2:] if ln.strip()}
    assert rows["import 16384"] == ["7.00", "10.00", "13.00", "30.00", "1", "3.0", "1"]
    assert rows["floor 16384"] == ["6.00", "4.00", "15.00", "25.00", "0", "0.0", "1"]


def test_profile_covers_only_the_hooks(monkeypatch, tmp_path) -> None:
    import pstats

    monkeypatch.setenv("KVMKT_TRACE", "0")
    monkeypatch.setenv("KVMKT_PROFILE", str(tmp_path / "prof"))
    hooks = HookTimes(logging.getLogger("vllm.kvmkt.test"), "scheduler")
    assert hooks.enabled

    def inside_a_hook():
        return sum(range(1000))

    def outside():
        return sum(range(1000))

    hooks.run("match", inside_a_hook)
    outside()
    hooks.flush(final=True)
    (path,) = (tmp_path / "prof").iterdir()
    assert path.name.startswith("scheduler-") and path.suffix == ".pstats"
    names = {fn for (_, _, fn) in pstats.Stats(str(path)).stats}
    assert "inside_a_hook" in names and "outside" not in names


def test_gc_spans_in_hooks_mode(monkeypatch, caplog) -> None:
    import gc
    import logging

    from kvmkt_connector.logs import trace_gc

    monkeypatch.setenv("KVMKT_TRACE", "hooks")
    before = list(gc.callbacks)
    log = logging.getLogger("vllm.test_gc_spans")
    try:
        trace_gc(log)
        trace_gc(log)  # (installed once)
        assert len(gc.callbacks) == len(before) + 1
        junk = [[i] for i in range(300_000)]  # a full collection of this takes > 0.2 ms
        with caplog.at_level(logging.INFO, logger=log.name):
            gc.collect(2)
        del junk
    finally:
        gc.callbacks[:] = before
    spans = [r.getMessage() for r in caplog.records if "kvmkt-wait" in r.getMessage()]
    assert any(m.endswith(":gc-gen2") for m in spans), spans  # (a gen1 one may come first)
