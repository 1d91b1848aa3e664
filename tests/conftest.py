"""Real vLLM engines in separate processes, shared by the tests of a module.

A CPU engine starts in ~45 s on two cores, so each test module starts its engines once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from kvmkt_connector.demo.engine_process import EngineProcess
from kvmkt_connector.demo.tiny_model import write_tiny_llama
from kvmkt_connector.registry.autostart import registry_listening
from kvmkt_connector.registry.client import RegistryClient

CONNECTOR = "MarketplaceConnector"


class Cluster:
    """A private registry plus the engines of one test module."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        regdir = os.path.join(workdir, "reg")
        os.makedirs(regdir, mode=0o700)
        self.socket = os.path.join(regdir, "registry.sock")
        self.start_registry()
        self.engines: dict[str, EngineProcess] = {}

    def start_registry(self) -> None:
        """Start (or, after it was killed, restart) the registry at our socket."""
        with open(os.path.join(self.workdir, "registry.log"), "a") as log:
            self.registry = subprocess.Popen(
                [sys.executable, "-m", "kvmkt_connector.registry", "serve", "--socket", self.socket],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not registry_listening(self.socket):
            assert time.monotonic() < deadline, "registry did not start"
            assert self.registry.poll() is None, "registry exited at start"
            time.sleep(0.05)

    def client(self) -> RegistryClient:
        return RegistryClient.connect(self.socket, client_name="pytest", autostart=False)

    def start(
        self, name: str, model: str, *, connector: dict | None, env: dict | None = None,
        **overrides,
    ) -> EngineProcess:
        """An engine; CPU defaults (fp32, eager, 1 GiB KV) unless ``overrides`` say otherwise."""
        kw = dict(model=model, skip_tokenizer_init=True, max_model_len=2048, block_size=16,
                  dtype="float32", enforce_eager=True, seed=0, enable_prefix_caching=True)
        if connector is not None:
            kw["kv_transfer_config"] = connector
        kw.update(overrides)
        env = {"KVMKT_REGISTRY_SOCKET": self.socket, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
        log = os.path.join(self.workdir, f"engine-{name}.log")
        self.engines[name] = EngineProcess(kw, env, log)
        return self.engines[name]

    def wait_all(self) -> None:
        for engine in self.engines.values():
            engine.wait_ready()

    def log(self, name: str) -> str:
        with open(os.path.join(self.workdir, f"engine-{name}.log")) as f:
            return f.read()

    def wait_published(self, at_least: int, timeout_s: float = 60) -> int:
        """Exports are published a step after their request finished."""
        deadline = time.monotonic() + timeout_s
        with self.client() as c:
            while (n := c.status().published_blocks) < at_least:
                assert time.monotonic() < deadline, f"only {n}/{at_least} blocks published"
                time.sleep(0.1)
        return n

    def close(self) -> None:
        for engine in self.engines.values():
            engine.stop()
        out = os.environ.get("OUT")  # on the GPU host: keep the engine logs
        if out:
            os.makedirs(os.path.join(out, "logs"), exist_ok=True)
            for name in [*(f"engine-{n}" for n in self.engines), "registry"]:
                src = os.path.join(self.workdir, f"{name}.log")
                if os.path.exists(src):
                    shutil.copy(src, os.path.join(out, "logs", f"{name}.log"))
        self.registry.terminate()
        self.registry.wait(10)


def wait_for(what: str, predicate, timeout_s: float) -> float:
    """Poll ``predicate`` every 0.1 s; fail naming ``what`` after ``timeout_s``; return
    how long it took."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.1)
    return time.monotonic() - t0


def connector_config(**extra) -> dict:
    return {"kv_connector": CONNECTOR, "kv_role": "kv_both", "kv_connector_extra_config": extra}


@pytest.fixture(scope="session")
def tiny_model_dir():
    with tempfile.TemporaryDirectory(prefix="kvmkt-model-") as d:
        yield write_tiny_llama(os.path.join(d, "m"), seed=0)


@pytest.fixture(scope="module")
def cluster():
    with tempfile.TemporaryDirectory(prefix="kvmkt-e2e-", dir="/tmp") as d:
        c = Cluster(d)
        try:
            yield c
        finally:
            c.close()
