"""Loggers that print through vLLM's logging setup (vLLM configures the "vllm" tree only)."""

import logging


def get_logger(module_name: str) -> logging.Logger:
    return logging.getLogger(f"vllm.{module_name}")
