"""`vllm serve` with the connector enabled by name only, on the CPU: an earlier (offline)
instance exports prefixes, HTTP requests to the server share them, /metrics shows it."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from kvmkt_connector.demo.tiny_model import word
from tests.conftest import CONNECTOR

pytestmark = pytest.mark.engine
BS = 16
_rng = random.Random(77)


def fresh(n: int) -> list[int]:
    return [_rng.randrange(3, 500) for _ in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if re.match(rf"{re.escape(name)}(\{{|\s)", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _kvmkt_lines(workdir: str) -> str:
    """The server's connector log lines: why it imported nothing, when it did not."""
    with open(os.path.join(workdir, "serve.log"), errors="replace") as f:
        return "".join(line for line in f if "kvmkt" in line)[-4000:]


@pytest.fixture(scope="module")
def server(cluster, tiny_model_dir):
    exporter = cluster.start("A", tiny_model_dir,
                             connector={"kv_connector": CONNECTOR, "kv_role": "kv_both"})
    port = _free_port()
    env = dict(os.environ, KVMKT_REGISTRY_SOCKET=cluster.socket, VLLM_CPU_KVCACHE_SPACE="1")
    log = open(os.path.join(cluster.workdir, "serve.log"), "w")  # noqa: SIM115 (lives with proc)
    proc = subprocess.Popen(
        # `vllm serve` itself (via a launcher that copes with the vllm-cpu package name)
        [sys.executable, os.path.join(os.path.dirname(__file__), "vllm_cli.py"), "serve", tiny_model_dir,
         "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
         "--block-size", "16", "--seed", "0",
         "--kv-transfer-config", json.dumps({"kv_connector": CONNECTOR, "kv_role": "kv_both"})],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    exporter.wait_ready()
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, "vllm serve exited; see serve.log"
        try:
            _get(base + "/health")
            break
        except OSError:
            assert time.monotonic() < deadline, "vllm serve did not come up"
            time.sleep(1)
    yield base, exporter
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    log.close()


def test_serve_imports_by_name_and_metrics_show_it(server, cluster, tiny_model_dir):
    base, exporter = server
    prefixes = [fresh(n) for n in (200, 333, 480)]
    exporter.generate(prefixes, max_tokens=2)
    cluster.wait_published(sum((len(p) + 1) // BS for p in prefixes))
    before = _get(base + "/metrics")
    imported = []
    for prefix in prefixes:
        prompt = prefix + fresh(25)
        body = {"model": tiny_model_dir, "prompt": prompt, "max_tokens": 6, "temperature": 0,
                "ignore_eos": True}
        out = _post(base + "/v1/completions", body)
        kvp = (out.get("kv_transfer_params") or {}).get("kvmkt", {})
        imported.append(kvp.get("imported_tokens"))
        # same greedy tokens as the exporter computing the whole prompt itself
        (ref,) = exporter.generate([prompt], max_tokens=6,
                                   options=[{"skip_reading_prefix_cache": True}])
        got = out["choices"][0]["text"].split()
        assert got == [word(t) for t in ref.token_ids], (got, ref.token_ids)
    assert imported == [(len(p) // BS) * BS for p in prefixes], _kvmkt_lines(cluster.workdir)
    deadline = time.monotonic() + 30
    while True:  # the front end folds engine stats in at its own pace
        after = _get(base + "/metrics")
        moved = _metric(after, "vllm:kvmkt_imported_tokens_total") - _metric(
            before, "vllm:kvmkt_imported_tokens_total")
        if moved >= sum(imported) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert moved == sum(imported)
    assert _metric(after, "vllm:kvmkt_lookups_total") >= len(prefixes)
    # prefix + a new turn: the prefix is found, the new turn is not (a "partial" hit)
    assert _metric(after, "vllm:kvmkt_hits_partial_total") >= len(prefixes)
    assert _metric(after, "vllm:kvmkt_imported_bytes_total") > 0
    assert "vllm:kvmkt_import_seconds_bucket" in after
