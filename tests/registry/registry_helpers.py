"""Helpers for the registry tests: real servers and holders as separate processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kvmkt_connector.hashing import BlockKeyer
from kvmkt_connector.registry.autostart import registry_listening
from kvmkt_connector.registry.client import RegistryClient
from kvmkt_connector.registry.service import pid_alive

__all__ = ["pid_alive"]  # re-exported for the tests

REPO_ROOT = Path(__file__).resolve().parents[2]
HOLDER_SCRIPT = Path(__file__).with_name("holder_proc.py")
BLOCK_SIZE = 4


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("KVMKT_REGISTRY_SOCKET", None)
    return env


def namespace(label: str) -> bytes:
    return label.encode().ljust(16, b"\0")[:16]


def chain(ns: bytes, tokens: list[int]) -> list[bytes]:
    """Real block keys of ``tokens`` (one key per BLOCK_SIZE tokens) in namespace ``ns``."""
    return BlockKeyer(ns, BLOCK_SIZE).keys(tokens)


def wait_until(predicate, timeout_s: float, interval_s: float = 0.01) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic() - start


class RegistryProcess:
    """``python -m kvmkt_connector.registry serve`` in a child process."""

    def __init__(self, socket_path: str, *args: str) -> None:
        self.socket_path = socket_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvmkt_connector.registry", "serve", "--socket", socket_path,
             "--log-level", "WARNING", *args],
            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_until(lambda: self.proc.poll() is not None or registry_listening(socket_path), 15)
        except AssertionError:
            self.proc.kill()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"registry failed to start: {self.proc.stdout.read().decode()}")

    def connect(self, name: str = "test", timeout_s: float = 5.0) -> RegistryClient:
        return RegistryClient.connect(
            self.socket_path, client_name=name, autostart=False, timeout_s=timeout_s
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        finally:
            self.proc.stdout.close()


class HolderProcess:
    """A holder in its own process (tests/registry/holder_proc.py): registers, publishes,
    prints one JSON line, then lives until stdin closes or it is killed."""

    def __init__(self, socket_path: str, ns: bytes, name: str, keys: list[bytes],
                 cleanup_paths: list[str] = (), fork_child: bool = False) -> None:  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, str(HOLDER_SCRIPT)],
            env=subprocess_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        spec = {
            "socket": socket_path, "namespace": ns.hex(), "name": name,
            "keys": [k.hex() for k in keys], "cleanup_paths": list(cleanup_paths),
            "fork_child": fork_child,
        }  # fmt: skip
        self.proc.stdin.write(json.dumps(spec).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("holder process died before registering")
        info = json.loads(line)
        self.holder_id: int = info["holder_id"]
        self.holder_bit: int = info["holder_bit"]
        self.child_pid: int | None = info.get("child_pid")
        self.pid = self.proc.pid

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()
        if self.child_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child_pid, signal.SIGKILL)


def import_planner(socket_path: str, block_size: int, verify_all_keys: bool = True, usable=None):
    """(ImportPlanner, its RegistryLink) against the registry at ``socket_path``, as the
    connector's scheduler makes them; ``usable`` stands in for the page check (default: every
    leased page is still the published one)."""
    from kvmkt_connector.config import MarketplaceConfig
    from kvmkt_connector.connector.importer import ImportPlanner
    from kvmkt_connector.connector.registry_link import RegistryLink
    from kvmkt_connector.metrics import MarketplaceStats

    cfg = MarketplaceConfig(registry_socket=socket_path, registry_autostart=False,
                            min_import_tokens=block_size)  # fmt: skip
    stats = MarketplaceStats()
    link = RegistryLink(cfg, "importer", stats)
    planner = ImportPlanner(cfg, block_size, link, stats,
                            usable=usable or (lambda _d, locations: len(locations)))
    planner.verify_all_keys = verify_all_keys
    return planner, link



def import_tokens(planner, request, keys, namespace: bytes, num_local_tokens: int = 0) -> int:
    """What the scheduler ends up holding a lease on for ``request``: ``match`` answers the
    table's promise and asks for the lease; the reply is read and checked as when vLLM has
    allocated (``take_jobs``) or asks again. The lease stays on the request's state."""
    promised = planner.match(request, keys, namespace, num_local_tokens)
    state = planner._requests.get(request.request_id)
    if promised == 0 or state is None:
        return 0
    if state.asked is not None:
        planner._settle(state)
    getattr(planner._link, "flush", lambda: None)()  # releases posted are handled now
    return state.usable * planner._block_size if state.lease is not None else 0


def parents(keys: list[bytes]) -> list[bytes]:
    """The parent links an honest holder publishes with a prefix's keys."""
    return [b""] + keys[:-1]


def planner_request(rid: str, tokens: list[int]):
    """What ImportPlanner reads of a vLLM Request."""
    from types import SimpleNamespace

    return SimpleNamespace(request_id=rid, num_tokens=len(tokens), all_token_ids=tokens,
                           kv_transfer_params=None)


def linked_holder(registry, ns: bytes, keys: list[bytes], locations: list[int] | None = None,
                  links: list[bytes] | None = None):
    """A holder connection that published ``keys`` (at ``0..`` unless ``locations``) with
    their parent links (honest ones unless ``links``)."""
    holder = registry.connect("holder")
    holder.register_holder(ns, "h", b"", b"d")
    holder.publish(keys, list(range(len(keys))) if locations is None else locations,
                   parents=parents(keys) if links is None else links)
    return holder
