"""An idle importer lets go of a SIGKILLed exporter's CUDA IPC mappings within 5 s.

Skips unless a CUDA GPU and the GPU build of vLLM are present. With two GPUs the exporter
X runs on GPU0 and the importer I on GPU1, else both share GPU0.

While I is idle nothing steps, so ``vllm:kvmkt_mapped_regions`` (reported with a step's
stats, and recorded by the offline ``LLM`` only from steps with outputs) cannot change.
What the gauge reports is read instead without a step: each worker's connector
``mapped_regions()`` through ``LLM.collective_rpc`` (a utility call: it schedules nothing,
so only the IPC sweeper thread of transport/cuda_ipc.py can close the mappings). I runs
with ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``, which collective_rpc of a function needs.
Afterwards one request with a fresh prefix (nothing to import) makes I step once, and the
gauge itself must read 0.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.gpu.needs_gpu import cuda_gpu_count

GPUS = cuda_gpu_count()

from kvmkt_connector.demo.tiny_model import GPU_TEST_SHAPE, write_tiny_llama  # noqa: E402
from tests.conftest import connector_config  # noqa: E402

pytestmark = pytest.mark.gpu
BS = 16
_rng = random.Random(7)


def fresh(n: int) -> list[int]:
    return [_rng.randrange(3, GPU_TEST_SHAPE.vocab_size) for _ in range(n)]


def test_idle_importer_unmaps_a_killed_exporter(cluster, tmp_path) -> None:
    model = write_tiny_llama(str(tmp_path / "model"), seed=3, shape=GPU_TEST_SHAPE)
    importer_gpu = "1" if GPUS >= 2 else "0"
    kw = dict(dtype="bfloat16", enforce_eager=True, max_model_len=4096,
              gpu_memory_utilization=0.2, disable_log_stats=False)
    x = cluster.start("X", model, connector=connector_config(transport="cuda_ipc"),
                      env={"CUDA_VISIBLE_DEVICES": "0"}, **kw)
    cluster.wait_all()  # engines sharing a GPU start one after the other
    i = cluster.start("I", model, connector=connector_config(transport="cuda_ipc"),
                      env={"CUDA_VISIBLE_DEVICES": importer_gpu,
                           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}, **kw)
    cluster.wait_all()

    prefix = fresh(1024)
    x.generate([prefix], max_tokens=1)
    cluster.wait_published(len(prefix) // BS - 1)
    (got,) = i.generate([prefix + fresh(20)], max_tokens=1)
    assert got.imported_tokens > 0, "nothing imported: the test proves nothing"
    assert i.mapped_regions() >= 1

    x.kill()
    t0 = time.monotonic()
    while (mapped := i.mapped_regions()) and time.monotonic() - t0 < 5:
        time.sleep(0.1)
    assert mapped == 0, f"{mapped} IPC mappings of the dead exporter after 5 s idle"
    print(f"\nidle importer unmapped the killed exporter in {time.monotonic() - t0:.2f} s")

    i.generate([fresh(64)], max_tokens=1)  # one step with outputs: the gauge is recorded
    assert i.metrics()["vllm:kvmkt_mapped_regions"] == 0
