"""Loggers that print through vLLM's logging setup (vLLM configures the "vllm" tree only)."""

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
