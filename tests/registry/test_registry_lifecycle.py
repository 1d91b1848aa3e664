"""Starting, stopping, auto-starting, metrics and the ``kvmkt`` command."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from registry_helpers import (
    chain,
    namespace,
    pid_alive,
    subprocess_env,
    wait_until,
)

from kvmkt_connector.registry.autostart import ensure_registry, registry_listening
from kvmkt_connector.registry.client import RegistryClient, RegistryUnavailable

NS = namespace("lifecycle")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def registry_server_pids(socket_path: str) -> list[int]:
    """Pids of live processes serving ``socket_path`` (from their command lines)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and socket_path.encode() in argv and pid_alive(int(entry)):
            pids.append(int(entry))
    return pids


def test_sigterm_removes_socket_and_lookup_table(start_registry) -> None:
    registry = start_registry()
    client = registry.connect()
    table_path = client.lookup_table_path
    assert os.path.exists(table_path) and os.path.exists(registry.socket_path)
    assert oct(os.stat(registry.socket_path).st_mode & 0o777) == "0o600"
    assert oct(os.stat(table_path).st_mode & 0o777) == "0o600"
    assert registry.stop() == 0
    assert not os.path.exists(registry.socket_path)
    assert not os.path.exists(table_path)
    with pytest.raises(RegistryUnavailable):
        client.status()
    assert client.broken
    with pytest.raises(RegistryUnavailable):  # stays broken: callers reconnect
        client.status()


def test_a_second_server_on_the_same_socket_refuses(registry) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "kvmkt_connector.registry", "serve", "--socket",
         registry.socket_path],
        env=subprocess_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert second.returncode != 0
    assert "already serves" in second.stderr
    assert registry.connect().status().server_pid == registry.proc.pid


def test_a_shared_directory_is_refused(socket_dir) -> None:
    shared = os.path.join(socket_dir, "shared")
    os.mkdir(shared, 0o755)
    os.chmod(shared, 0o755)
    with pytest.raises(RuntimeError, match="private"):
        ensure_registry(os.path.join(shared, "registry.sock"))
    with pytest.raises(RegistryUnavailable, match="private"):
        RegistryClient.connect(os.path.join(shared, "registry.sock"), client_name="x")
    with pytest.raises(RegistryUnavailable, match="AF_UNIX"):
        RegistryClient.connect("/tmp/" + "x" * 120, client_name="x")
    assert os.listdir(shared) == []


def test_metrics_endpoint(start_registry) -> None:
    port = free_port()
    registry = start_registry("--metrics-port", str(port))
    keys = chain(NS, list(range(12)))
    owner = registry.connect("owner")
    owner.register_holder(NS, "owner", b"", b"")
    owner.publish(keys, [0, 1, 2])
    q = registry.connect("q")
    q.lookup(NS, keys)
    grant = q.lease(NS, keys, ttl_ms=60_000)
    assert q.lease(NS, chain(NS, [9, 9, 9, 9]), ttl_ms=1000) is None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("kvmkt_registry_")
    }
    assert samples["kvmkt_registry_holders"] == 1
    assert samples["kvmkt_registry_published_blocks"] == 3
    assert samples["kvmkt_registry_active_leases"] == 1
    assert samples["kvmkt_registry_lookups_total"] == 1
    assert samples["kvmkt_registry_lease_requests_total"] == 2
    assert samples["kvmkt_registry_leases_granted_total"] == 1
    assert samples["kvmkt_registry_blocks_leased_total"] == 3
    assert samples["kvmkt_registry_blocks_released_lru_total"] == 0
    assert samples["kvmkt_registry_holders_lost_total"] == 0
    assert re.search(r"^# TYPE kvmkt_registry_lookups(_total)? counter$", text, re.M)
    assert re.search(r"^# TYPE kvmkt_registry_holders gauge$", text, re.M)
    q.release_leases([grant.lease_id])


AUTOSTART_SCRIPT = """
import sys, time
from kvmkt_connector.registry.autostart import ensure_registry, registry_listening
from kvmkt_connector.registry.client import RegistryClient
path, start_at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))
ensure_registry(path, idle_exit_s=2.0)
client = RegistryClient.connect(path, client_name="racer", autostart=False)
print(client.server_pid, flush=True)
"""


def test_concurrent_autostarts_make_exactly_one_registry(socket_dir) -> None:
    path = os.path.join(socket_dir, "registry.sock")
    start_at = time.time() + 1.5  # after every racer has imported
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", AUTOSTART_SCRIPT, path, str(start_at)],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(3)
    ]
    outputs = [racer.communicate(timeout=30)[0] for racer in racers]
    server_pids = {int(out.split()[0]) for out in outputs}
    try:
        assert len(server_pids) == 1, outputs
        assert registry_server_pids(path) == list(server_pids)
        # Nobody is connected any more: it leaves after idle_exit_s (2 s) and cleans up.
        (server_pid,) = server_pids
        wait_until(lambda: not pid_alive(server_pid), 6.0)
        assert not os.path.exists(path)
    finally:
        for pid in server_pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGTERM)


def test_idle_exit_waits_for_clients_and_autostart_replaces_a_stale_socket(socket_dir) -> None:
    path = os.path.join(socket_dir, "registry.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a socket file nobody listens on, as a crashed server leaves it
    stale.close()
    ensure_registry(path, idle_exit_s=0.5)
    client = RegistryClient.connect(path, client_name="stay", autostart=False)
    server_pid = client.server_pid
    time.sleep(1.2)  # well past idle_exit_s, but a client is connected
    assert client.status().server_pid == server_pid
    client.close()
    idle_for = wait_until(lambda: not pid_alive(server_pid), 5.0)
    assert idle_for < 3.0
    assert not os.path.exists(path)
    # connect(autostart=True) brings a fresh one up again.
    again = RegistryClient.connect(path, client_name="again")
    assert again.server_pid != server_pid
    os.kill(again.server_pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(again.server_pid), 5.0)


def test_an_idle_registry_whose_socket_directory_went_exits_and_removes_its_table() -> None:
    """A cleaned /tmp (or a test's removed work directory) takes the socket's directory: no
    client can reach the registry any more, and it used to stay forever, holding its
    shared-memory lookup table (the full suite left one such registry behind per run)."""
    import shutil
    import tempfile

    work = tempfile.mkdtemp(prefix="kvr-gone-", dir="/tmp")
    path = os.path.join(work, "registry.sock")
    try:
        ensure_registry(path, idle_exit_s=0.5)
        with RegistryClient.connect(path, client_name="look", autostart=False) as client:
            server_pid, table = client.server_pid, client.lookup_table_path
        assert table and os.path.exists(table)
        shutil.rmtree(work)
        wait_until(lambda: not pid_alive(server_pid), 5.0)
        assert not os.path.exists(table)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_kvmkt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvmkt_connector.cli", *args],
        env=subprocess_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_kvmkt_registry_and_status(socket_dir, holders) -> None:
    path = os.path.join(socket_dir, "registry.sock")
    foreground = subprocess.Popen(
        [sys.executable, "-m", "kvmkt_connector.cli", "registry", "--socket", path,
         "--capacity", "500"],
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: registry_listening(path), 10.0)
        keys = chain(NS, list(range(20)))
        engine = holders(path, NS, "engine-a", keys)
        q = RegistryClient.connect(path, client_name="q", autostart=False)
        assert q.lease(NS, keys, ttl_ms=60_000) is not None
        assert q.lease(NS, chain(NS, [7, 7, 7, 7]), ttl_ms=1000) is None

        text = run_kvmkt("status", "--socket", path)
        assert text.returncode == 0, text.stderr
        assert "engine-a" in text.stdout and str(engine.pid) in text.stdout
        assert NS.hex()[:16] in text.stdout
        assert "hit rate 50.0%" in text.stdout and "capacity 500 blocks" in text.stdout

        as_json = run_kvmkt("status", "--socket", path, "--json")
        info = json.loads(as_json.stdout)
        (holder,) = info["holders"]
        assert (holder["name"], holder["pid"], holder["namespace"]) == (
            "engine-a",
            engine.pid,
            NS.hex(),
        )
        assert (holder["published_blocks"], holder["leased_blocks"]) == (5, 5)
        assert (info["lease_requests"], info["leases_granted"], info["hit_rate"]) == (2, 1, 0.5)
    finally:
        foreground.send_signal(signal.SIGTERM)
        assert foreground.wait(10) == 0
    missing = run_kvmkt("status", "--socket", path)
    assert missing.returncode == 1
    assert "no registry running" in missing.stderr


def test_a_client_sees_at_once_that_its_registry_died(start_registry) -> None:
    """``peer_closed`` is what importers ask before reading a registry's lookup table: it
    must answer without waiting (the connection has a timeout: a blocking peek would wait
    that long on every lookup) and say so once the registry is gone."""
    reg = start_registry()
    client = reg.connect(timeout_s=2.0)
    t0 = time.perf_counter()
    assert not any(client.peer_closed() for _ in range(100))
    assert time.perf_counter() - t0 < 0.5
    reg.proc.kill()
    reg.proc.wait(10)
    wait_until(client.peer_closed, 5)
    client.close()
