"""Loggers that print through vLLM's logging setup (vLLM configures the "vllm" tree only)."""

import gc
import logging
import os
import time
from collections.abc import Callable
from typing import Any


def get_logger(module_name: str) -> logging.Logger:
    return logging.getLogger(f"vllm.{module_name}")


def trace(logger: logging.Logger, request_id: str, event: str) -> None:
    """Timeline of one import (KVMKT_TRACE=1): CLOCK_MONOTONIC is shared by the processes
    of a host, so the scheduler's, the workers' and a client's stamps line up."""
    if os.environ.get("KVMKT_TRACE") == "1":
        logger.info("kvmkt-trace %d %s %s", time.monotonic_ns(), request_id, event)


def waits_traced() -> bool:
    """Whether ``trace_wait`` logs (KVMKT_TRACE=1 or hooks)."""
    return os.environ.get("KVMKT_TRACE") in ("1", "hooks")


def trace_wait(logger: logging.Logger, what: str, t0: int, c0: int, min_ns: int = 1_000_000) -> None:
    """Log a span that began at ``t0`` (monotonic ns; ``c0``: thread CPU ns then) if it took
    at least ``min_ns``: ``kvmkt-wait <start ns>:<ns>:<cpu ns>:<what>``. For what may block
    vLLM's scheduler thread (a registry reply) or hold the GIL from it (our threads)."""
    ns = time.monotonic_ns() - t0
    if ns >= min_ns:
        logger.info("kvmkt-wait %d:%d:%d:%s", t0, ns, time.thread_time_ns() - c0, what)


def trace_gc(logger: logging.Logger) -> None:
    """With KVMKT_TRACE=1, stamp this process's older-generation garbage collections; with
    KVMKT_TRACE=hooks, log those of 0.2 ms or more as ``kvmkt-wait`` spans (``gc-gen<N>``). A
    full collection can stall a step for milliseconds: the breakdown must tell them from
    our work."""
    mode = os.environ.get("KVMKT_TRACE")
    if mode not in ("1", "hooks") or any(
            getattr(cb, "kvmkt_trace", False) for cb in gc.callbacks):
        return
    started = [0, 0]  # monotonic ns, thread CPU ns

    def stamp(phase: str, info: dict) -> None:
        gen = info.get("generation", 0)
        if gen < 1:  # the young generation's are microseconds, and many
            return
        if mode == "1":
            trace(logger, "-", f"gc-{phase}-gen{gen}")
        elif phase == "start":
            started[:] = time.monotonic_ns(), time.thread_time_ns()
        else:
            trace_wait(logger, f"gc-gen{gen}", started[0], started[1], min_ns=200_000)

    stamp.kvmkt_trace = True  # type: ignore[attr-defined]
    gc.callbacks.append(stamp)


class HookTimes:
    """With KVMKT_TRACE=1 or KVMKT_TRACE=hooks (hooks only, no trace points inside them):
    record how long each connector hook ran. Spans are logged in batches, outside any span
    and at most about twice a second, so measuring costs a step almost nothing:
    ``kvmkt-hooks <start ns>:<ns>:<cpu ns>:<hook> ...``. Time a hook spends waiting for a
    copy (``waited_ns``) is left out of ``ns``: it is the copy's, not host work. ``cpu ns``
    is the CPU time of the hook's thread: wall time well above it is time the hook did not
    run (most often waiting for the GIL, which vLLM's other threads hold meanwhile).
    ``benchmarks/trace_breakdown.py`` sums them per import: our host work on its TTFT.

    KVMKT_PROFILE=<dir> also runs cProfile inside the hooks (only there) and writes its
    statistics to ``<dir>/<role>-<pid>.pstats`` every few seconds and at shutdown: where
    the host work goes, function by function (``python -m pstats``)."""

    def __init__(self, logger: logging.Logger, role: str = "") -> None:
        self._profile_path = ""
        self._profile: Any = None
        if profile_dir := os.environ.get("KVMKT_PROFILE"):
            import cProfile

            os.makedirs(profile_dir, exist_ok=True)
            self._profile_path = os.path.join(profile_dir, f"{role or 'hooks'}-{os.getpid()}.pstats")
            self._profile = cProfile.Profile()
        self.enabled = os.environ.get("KVMKT_TRACE") in ("1", "hooks") or self._profile is not None
        self._logger = logger
        self._spans: list[tuple[int, int, int, str]] = []
        self._flush_at = 0
        self._dump_at = 0

    def run(self, hook: str, fn: Callable[..., Any], *args: Any,
            waited_ns: Callable[[], int] | None = None) -> Any:
        profile = self._profile
        if profile is not None:
            try:  # (Python 3.12+: one active profiler per process; then time only)
                profile.enable()
            except ValueError:
                profile = None
        c0 = time.thread_time_ns()
        t0 = time.monotonic_ns()
        try:
            return fn(*args)
        finally:
            t1 = time.monotonic_ns()
            cpu = time.thread_time_ns() - c0
            if profile is not None:
                profile.disable()
            self._spans.append((t0, t1 - t0 - (waited_ns() if waited_ns else 0), cpu, hook))
            if t1 >= self._flush_at:
                self.flush()
                self._flush_at = t1 + 500_000_000

    def flush(self, final: bool = False) -> None:
        if self._spans:
            spans, self._spans = self._spans, []
            self._logger.info("kvmkt-hooks %s", " ".join(f"{t}:{ns}:{c}:{h}" for t, ns, c, h in spans))
        if self._profile is not None and (final or time.monotonic() >= self._dump_at):
            self._dump_at = time.monotonic() + 5.0
            try:
                self._profile.dump_stats(self._profile_path)
            except OSError as e:
                self._logger.warning("kvmkt: cannot write %s: %s", self._profile_path, e)
