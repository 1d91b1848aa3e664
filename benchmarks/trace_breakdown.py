"""Where an import's time goes: per-phase medians from a ttft_bench run with KVMKT_TRACE=1
(or KVMKT_TRACE=hooks: only our hooks' durations, without the trace points inside them).

    python benchmarks/trace_breakdown.py OUT/ttft.log OUT/logs/ttft-engine-B.log \
        [OUT/logs/ttft-engine-F.log]

ttft_bench prints ``import-call <submit ns> <done ns> <prefix>`` around each timed import
(``hit-call`` around the local hit on the same prefix, measured under the import's
conditions: the same events, for comparison);
the importer's log holds ``kvmkt-trace <ns> <request|-> <event>`` lines (CLOCK_MONOTONIC,
shared by the processes of a host). For each import the events inside its window are
put in order, repeated step events numbered (``step-meta.2``: the second step scheduled in
the window), and the table gives, per prefix length, the median time of each event since
the client's call (ms) and the gap from the event before it; for imports of 16k tokens and
more, also each call's gaps over 1.5 ms and its garbage collections (``gc-*`` stamps).

``kvmkt-hooks <start ns>:<ns>:<cpu ns>:<hook> ...`` lines (``logs.HookTimes``; older logs
lack ``<cpu ns>``) give our host work: the first table sums, per call, the wall time spent
inside each of our connector hooks that started in the call's window (every step of it:
lookup, planning, launch, reports, the forward step's hooks too), time a hook waited for a
copy left out; medians per call. The second sums the hooks' thread CPU time the same way:
where wall time is well above it, the hook was not running (most often it waited for the
GIL held by vLLM's other threads). A copy wait that spins counts as CPU time. Then the
hook calls that stalled (wall over CPU by 2 ms), with the ``kvmkt-wait`` spans overlapping
each: a slow lease reply, or our holder channel's thread busy (holding the GIL).

Phases (any trace mode): per call, from the client's call to our first hook (vLLM's front
end), from there to the allocation that schedules the prompt's forward (the last
``after_alloc``: for an import, its promotion after the copy), and from there to the first
token; with F's log (``--floor`` runs, ``floor-call`` windows) the same for vLLM's own
asynchronous path, its hooks timed by ``async_floor_connector``. ``gc``: garbage
collections of 0.2 ms or more inside the calls (``gc-gen<N>`` spans, in hooks mode).
"""

from __future__ import annotations

import re
import statistics
import sys
from collections import defaultdict

_CALL = re.compile(r"^(import|hit|floor)-call (\d+) (\d+) (\d+)")
_TRACE = re.compile(r"kvmkt-trace (\d+) (\S+) (\S+)")
_HOOKS = re.compile(r"kvmkt-hooks (.*)")
_SPAN = re.compile(r"(\d+):(-?\d+):(?:(-?\d+):)?([A-Za-z_]\w*)")
_WAIT = re.compile(r"kvmkt-wait (\d+):(\d+):(\d+):(\S+)")


def windows(bench_log: str) -> list[tuple[int, int, tuple[str, int]]]:
    with open(bench_log) as f:
        return [(int(m[2]), int(m[3]), (m[1], int(m[4]))) for line in f if (m := _CALL.match(line))]


def events(engine_log: str) -> list[tuple[int, str]]:
    out = []
    with open(engine_log, errors="replace") as f:
        for line in f:
            m = _TRACE.search(line)
            if m:
                out.append((int(m.group(1)), m.group(3)))
    out.sort()
    return out


def parse_spans(text: str) -> list[tuple[int, int, int, str]]:
    """(start ns, ns spent, cpu ns or -1 if not logged, hook) of one ``kvmkt-hooks`` line."""
    return [(int(t), int(ns), int(cpu) if cpu else -1, h) for t, ns, cpu, h in _SPAN.findall(text)]


def hook_spans(engine_log: str) -> list[tuple[int, int, int, str]]:
    """(start ns, ns spent, cpu ns or -1, hook) of every timed hook call in the log."""
    spans = []
    with open(engine_log, errors="replace") as f:
        for line in f:
            if m := _HOOKS.search(line):
                spans += parse_spans(m[1])
    spans.sort()
    return spans


def host_work(calls, spans_of, cpu: bool = False) -> dict[tuple[str, int], list[dict[str, float]]]:
    """(kind, prefix) -> per call, ms spent in each hook (and "total") inside its window;
    ``spans_of(kind)``: the spans of the engine that served such calls; ``cpu``: the hooks'
    thread CPU time instead of wall time."""
    out: dict[tuple[str, int], list[dict[str, float]]] = defaultdict(list)
    for t_sub, t_done, length in calls:
        per: dict[str, float] = defaultdict(float)
        for t, ns, cpu_ns, hook in spans_of(length[0]):
            if t_sub <= t <= t_done:
                ms = (cpu_ns if cpu else ns) / 1e6
                per[hook] += ms
                per["total"] += ms
        out[length].append(per)
    return out


def print_host_work(work, what: str = "host work, wall") -> None:
    if not any(per for calls in work.values() for per in calls):
        return
    cols = sorted(work)
    hooks = sorted({h for calls in work.values() for per in calls for h in per} - {"total"})
    print(f"\n== our hooks inside each call ({what} ms; median per call) ==")
    print(f"{'hook':<18}" + "".join(f"{k[0][:3]} {k[1]:>6}".rjust(12) for k in cols))
    for hook in [*hooks, "total"]:
        row = [statistics.median(per.get(hook, 0.0) for per in work[k]) for k in cols]
        print(f"{hook:<18}" + "".join(f"{v:12.3f}" for v in row))
    print(f"{'calls':<18}" + "".join(f"{len(work[k]):12d}" for k in cols))


def timelines(calls, evs) -> dict[tuple[str, int], list[list[tuple[str, float]]]]:
    """(kind, prefix) -> one [(event, ms since submit)] list per call."""
    by_len: dict[int, list] = defaultdict(list)
    for t_sub, t_done, length in calls:
        seen: dict[str, int] = defaultdict(int)
        line = []
        for t, name in evs:
            if t_sub <= t <= t_done:
                seen[name] += 1
                label = name if seen[name] == 1 else f"{name}.{seen[name]}"
                line.append((label, (t - t_sub) / 1e6))
        line.append(("first-token", (t_done - t_sub) / 1e6))
        by_len[length].append(line)
    return by_len


def wait_spans(engine_log: str) -> list[tuple[int, int, int, str]]:
    """(start ns, ns, cpu ns, what) of the log's ``kvmkt-wait`` spans."""
    with open(engine_log, errors="replace") as f:
        return [(int(m[1]), int(m[2]), int(m[3]), m[4]) for line in f
                if (m := _WAIT.search(line))]


def print_phases(calls, spans_of, waits_of) -> None:
    """Per (kind, prefix): median ms from the call to our first hook, from there to the
    last ``after_alloc`` (the prompt's forward is scheduled), from there to the first
    token; and the garbage collections inside the calls."""
    rows: dict[tuple[str, int], list[tuple[float, ...]]] = defaultdict(list)
    for t_sub, t_done, key in calls:
        spans = [s for s in spans_of(key[0]) if t_sub <= s[0] <= t_done]
        allocs = [t for t, _, _, h in spans if h == "after_alloc"]
        if not spans or not allocs:
            continue
        gcs = [ns for t, ns, _, w in waits_of(key[0]) if w.startswith("gc-")
               and t_sub <= t <= t_done]
        rows[key].append(((spans[0][0] - t_sub) / 1e6, (allocs[-1] - spans[0][0]) / 1e6,
                          (t_done - allocs[-1]) / 1e6, (t_done - t_sub) / 1e6,
                          len(gcs), sum(gcs) / 1e6))
    if not rows:
        return
    print("\n== phases per call (median ms): call -> first hook -> forward scheduled -> token ==")
    print(f"{'arm':<16}{'to hook':>9}{'to sched':>9}{'to token':>9}{'ttft':>9}"
          f"{'gc n':>6}{'gc ms':>7}{'calls':>6}")
    for (kind, tokens), vals in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        med = [statistics.median(v[i] for v in vals) for i in range(4)]
        print(f"{kind + ' ' + str(tokens):<16}" + "".join(f"{m:9.2f}" for m in med)
              + f"{sum(v[4] for v in vals):6d}{sum(v[5] for v in vals):7.1f}{len(vals):6d}")


def print_stalls(engine_log: str, spans) -> None:
    """Hook calls whose wall time exceeds their CPU time by over 2 ms (they did not run:
    a registry reply, or the GIL), each with the ``kvmkt-wait`` spans (logs.trace_wait:
    lease replies, the holder channel's operations) that overlap it."""
    waits = wait_spans(engine_log)
    stalls = [(t, ns, cpu, h) for t, ns, cpu, h in spans if cpu >= 0 and ns - cpu > 2_000_000]
    print(f"\n== stalls: hook calls with wall - CPU > 2 ms: {len(stalls)} of {len(spans)}; "
          f"kvmkt-wait spans logged: {len(waits)} ==")
    for t, ns, cpu, h in stalls:
        over = [f"{w}: {wns / 1e6:.1f} ms (cpu {wcpu / 1e6:.1f})" for wt, wns, wcpu, w in waits
                if wt < t + ns and wt + wns > t]
        print(f"  {h}: {ns / 1e6:.1f} ms wall, {cpu / 1e6:.1f} ms cpu; overlapping: "
              + ("; ".join(over) or "none logged"))


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__)
        return 2
    calls = windows(argv[0])
    spans = hook_spans(argv[1])
    floor_spans = hook_spans(argv[2]) if len(argv) == 3 else []
    waits = {"B": wait_spans(argv[1]), "F": wait_spans(argv[2]) if len(argv) == 3 else []}

    def spans_of(kind: str):
        return floor_spans if kind == "floor" else spans

    ours = [c for c in calls if c[2][0] != "floor"]
    print_host_work(host_work(ours, spans_of))
    if spans and all(cpu >= 0 for _, _, cpu, _ in spans):
        print_host_work(host_work(ours, spans_of, cpu=True), "the hooks' thread CPU time,")
        print_stalls(argv[1], spans)
    print_phases(calls, spans_of, lambda kind: waits["F" if kind == "floor" else "B"])
    evs = events(argv[1])
    if not evs:
        return 0
    by_len = timelines(ours, evs)
    for length, lines in sorted(by_len.items()):
        order: list[str] = []
        stamps: dict[str, list[float]] = defaultdict(list)
        for line in lines:
            for label, ms in line:
                if label not in order:
                    order.append(label)
                stamps[label].append(ms)
        med = {k: statistics.median(v) for k, v in stamps.items()}
        order.sort(key=lambda k: med[k])
        kind, tokens = length
        print(f"\n== {kind}, prefix {tokens}: {len(lines)} calls, median ms since the client's call ==")
        print(f"{'event':<34}{'at':>9}{'gap':>9}{'n':>4}")
        prev = 0.0
        for label in order:
            print(f"{label:<34}{med[label]:>9.2f}{med[label] - prev:>9.2f}{len(stamps[label]):>4}")
            prev = med[label]
        if kind == "import" and tokens >= 16384:  # where the slow calls lose their time
            print("per call, the gaps over 1.5 ms (event: gap ms), slowest first:")
            for line in sorted(lines, key=lambda ln: -ln[-1][1]):
                prev, slow = 0.0, []
                for label, ms in line:
                    if ms - prev > 1.5 or label.startswith("gc-"):
                        slow.append(f"{label}: {ms - prev:.1f}")
                    prev = ms
                print(f"  {line[-1][1]:6.1f} ms  " + ", ".join(slow))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
