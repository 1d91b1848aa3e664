"""One vLLM engine (``vllm.LLM``) in its own process group, driven over a pipe.

Tests, the demo and the benchmarks run several engines side by side, as separate
processes, exactly like separate ``vllm serve`` instances would be; killing one (the whole
group: front end, EngineCore, workers) is how fault tests make an exporter die.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any


@dataclass
class Completion:
    token_ids: list[int]
    imported_tokens: int  # from the connector's kv_transfer_params; -1: connector off
    first_logprob: float | None
    seconds: float  # wall time of the generate call this completion came from
    kv_transfer_params: dict[str, Any] | None = None  # all connectors' (P/D hand-off)
    cached_tokens: int = 0  # prompt tokens not computed here: local prefix hits + loaded


def _die_with_parent() -> None:
    """A test runner killed mid-startup must not leave engines behind (Linux; best effort:
    EngineCore notices its parent is gone by itself)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the line above
            os._exit(1)


def _serve(conn: Any, llm_kwargs: dict[str, Any], env: dict[str, str], log_path: str | None) -> None:
    os.setpgrp()  # our own group: kill() takes EngineCore and workers with us
    _die_with_parent()
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    os.environ.update(env)
    # vLLM logs to stdout; in its child processes (EngineCore, workers) writing to a file
    # that is block-buffered, so a log line could lag behind what it reports.
    os.environ["PYTHONUNBUFFERED"] = "1"
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(**llm_kwargs)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    background: dict[int, Any] = {}  # generate_async: id -> (thread, result box)
    while True:
        try:
            cmd, args = conn.recv()
        except EOFError:
            break
        try:
            if cmd in ("generate", "generate_async"):
                prompts, max_tokens, logprobs, options = args
                sps = []
                for opt in options or [{}] * len(prompts):
                    kvp = opt.get("kv_transfer_params")
                    sps.append(SamplingParams(
                        max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                        detokenize=False, logprobs=logprobs,
                        extra_args={"kv_transfer_params": kvp} if kvp else None,
                        skip_reading_prefix_cache=opt.get("skip_reading_prefix_cache"),
                    ))
                inputs = []
                for p, opt in zip(prompts, options or [{}] * len(prompts), strict=True):
                    inputs.append({"prompt_token_ids": list(p)})
                    if opt.get("cache_salt"):
                        inputs[-1]["cache_salt"] = opt["cache_salt"]
                if cmd == "generate":
                    conn.send(("ok", _generate(llm, inputs, sps, logprobs)))
                else:  # runs while further commands (e.g. a cache reset) are served
                    box: list = []
                    thread = threading.Thread(
                        target=lambda b=box, i=inputs, s=sps, lp=logprobs:
                        b.append(_generate(llm, i, s, lp)), daemon=True)
                    thread.start()
                    background[id(box)] = (thread, box)
                    conn.send(("ok", id(box)))
            elif cmd == "collect":
                thread, box = background.pop(args)
                thread.join()
                conn.send(("ok", box[0]) if box else ("error", "generate_async failed"))
            elif cmd == "runtime":  # what this engine runs: GPU claims must show it
                cfg = llm.llm_engine.vllm_config
                conn.send(("ok", {
                    "async_scheduling": bool(cfg.scheduler_config.async_scheduling),
                    "model_runner": "V2" if cfg.use_v2_model_runner else "V1",
                    "device": str(cfg.device_config.device_type),
                    "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
                    "tensor_parallel_size": cfg.parallel_config.tensor_parallel_size,
                }))
            elif cmd == "metrics":
                conn.send(("ok", [(m.name, getattr(m, "value", getattr(m, "count", None)))
                                  for m in llm.get_metrics()]))  # histograms: their count
            elif cmd == "mapped_regions":  # needs VLLM_ALLOW_INSECURE_SERIALIZATION=1
                conn.send(("ok", sum(llm.collective_rpc(_worker_mapped_regions))))
            elif cmd == "reset_prefix_cache":
                conn.send(("ok", llm.reset_prefix_cache(**args)))
            elif cmd == "stop":
                llm.llm_engine.engine_core.shutdown()  # lets vLLM unlink its shared memory
                conn.send(("ok", None))
                break
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    sys.exit(0)


def _worker_mapped_regions(worker: Any) -> int:
    """Run in each worker by ``collective_rpc`` (a utility call: the engine does not step)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group().mapped_regions()


def _generate(llm: Any, inputs: list, sps: list, logprobs: int | None) -> list[Completion]:
    t0 = time.perf_counter()
    outs = llm.generate(inputs, sps, use_tqdm=False)
    dt = time.perf_counter() - t0
    result = []
    for o in outs:
        c = o.outputs[0]
        params = o.kv_transfer_params
        kvp = (params or {}).get("kvmkt")
        lp = None
        if logprobs is not None and c.logprobs:
            lp = float(c.logprobs[0][c.token_ids[0]].logprob)
        imported = kvp["imported_tokens"] if kvp else -1
        result.append(Completion(list(c.token_ids), imported, lp, dt, params,
                                 o.num_cached_tokens or 0))
    return result


class EngineProcess:
    def __init__(
        self, llm_kwargs: dict[str, Any], env: dict[str, str] | None = None,
        log_path: str | None = None,
    ) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, llm_kwargs, env or {}, log_path))
        self.log_path = log_path
        self._ready = False
        self._proc.start()

    def wait_ready(self, timeout_s: float = 600) -> None:
        if self._ready:
            return
        if not self._conn.poll(timeout_s):
            self.kill()
            raise TimeoutError(f"engine not ready after {timeout_s} s (log: {self.log_path})")
        status, payload = self._conn.recv()
        if status != "ready":  # vLLM's root cause is in the engine's log, not the traceback
            raise RuntimeError(f"engine failed to start:\n{payload}\n"
                               f"last lines of {self.log_path}:\n{self._log_tail()}")
        self._ready = True

    def _log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(unreadable: {e})"

    def _call(self, cmd: str, args: Any = None, timeout_s: float = 600) -> Any:
        self._conn.send((cmd, args))
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"engine did not answer {cmd!r} in {timeout_s} s")
        status, payload = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"engine failed on {cmd!r}:\n{payload}")
        return payload

    def generate(
        self, prompts: list[list[int]], max_tokens: int = 8, logprobs: int | None = None,
        options: list[dict[str, Any]] | None = None,
    ) -> list[Completion]:
        """Greedy completions. ``options`` per prompt: ``kv_transfer_params`` (dict),
        ``skip_reading_prefix_cache`` (bool: no local prefix hit and no import) and
        ``cache_salt`` (str)."""
        return self._call("generate", (prompts, max_tokens, logprobs, options))

    def generate_async(self, prompts: list[list[int]], max_tokens: int = 8,
                       logprobs: int | None = None,
                       options: list[dict[str, Any]] | None = None) -> int:
        """Start a generate in the engine process; ``collect`` returns its completions."""
        return self._call("generate_async", (prompts, max_tokens, logprobs, options))

    def collect(self, handle: int, timeout_s: float = 600) -> list[Completion]:
        return self._call("collect", handle, timeout_s)

    def runtime(self) -> dict[str, Any]:
        """Scheduling mode and model runner this engine resolved to."""
        return self._call("runtime")

    def metrics(self) -> dict[str, Any]:
        return dict(self._call("metrics"))

    def mapped_regions(self) -> int:
        """Neighbours' regions the workers map now, asked without a step (``collective_rpc``
        of a function: the engine needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``)."""
        return self._call("mapped_regions")

    def reset_prefix_cache(self, reset_running_requests: bool = False,
                           reset_connector: bool = False) -> bool:
        return self._call("reset_prefix_cache", dict(
            reset_running_requests=reset_running_requests, reset_connector=reset_connector))

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def kill(self) -> None:
        """SIGKILL the engine's whole process group (front end, EngineCore, workers)."""
        if self._proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.join(10)

    def stop(self) -> None:
        try:
            self._call("stop", timeout_s=60)
            self._proc.join(60)
        except Exception:
            pass
        self.kill()


def group_pids(pgid: int) -> list[int]:
    """The live processes of an engine (EngineProcess puts each engine in its own process
    group, whose id is its pid): for tests and benchmarks that count what engines hold."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def fd_count(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        with contextlib.suppress(OSError):  # exited meanwhile
            n += len(os.listdir(f"/proc/{pid}/fd"))
    return n
