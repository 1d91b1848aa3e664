"""Loggers that print through vLLM's logging setup (vLLM configures the "vllm" tree only)."""

import gc
import logging
import os
import time


def get_logger(module_name: str) -> logging.Logger:
    return logging.getLogger(f"vllm.{module_name}")


def trace(logger: logging.Logger, request_id: str, event: str) -> None:
    """Timeline of one import (KVMKT_TRACE=1): CLOCK_MONOTONIC is shared by the processes
    of a host, so the scheduler's, the workers' and a client's stamps line up."""
    if os.environ.get("KVMKT_TRACE") == "1":
        logger.info("kvmkt-trace %d %s %s", time.monotonic_ns(), request_id, event)


def trace_gc(logger: logging.Logger) -> None:
    """With KVMKT_TRACE=1, also stamp this process's garbage collections (a full one can
    stall a step for milliseconds: the breakdown must tell them from our work)."""
    if os.environ.get("KVMKT_TRACE") != "1" or any(
            getattr(cb, "kvmkt_trace", False) for cb in gc.callbacks):
        return

    def stamp(phase: str, info: dict) -> None:
        if info.get("generation", 0) >= 1:  # the young generation's are microseconds, and many
            trace(logger, "-", f"gc-{phase}-gen{info['generation']}")

    stamp.kvmkt_trace = True  # type: ignore[attr-defined]
    gc.callbacks.append(stamp)
