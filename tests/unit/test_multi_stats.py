"""Under MultiConnector the front end rebuilds each child's stats from plain data by class
name (vLLM's KVConnectorFactory registry). Our name must resolve even where our plugin entry
point is not loaded (kv_connector_module_path only): importing the connector registers it.
Fresh interpreters: a test process may have loaded the plugin already."""

from __future__ import annotations

import os
import subprocess
import sys

REBUILD = """
import sys
from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import MultiConnector
if sys.argv[1] == "import":
    import kvmkt_connector.connector.facade  # what resolving kv_connector_module_path does
data = {"MarketplaceConnector": {"data": {"c": {"lookups": 3}, "g": {}, "h": {}}}}
stats = MultiConnector.build_kv_connector_stats(data)
print(type(stats["MarketplaceConnector"]).__name__, stats.reduce()["MarketplaceConnector"])
"""


def rebuild(mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_PLUGINS": "lora_filesystem_resolver"}  # not our entry point
    return subprocess.run([sys.executable, "-c", REBUILD, mode], env=env, capture_output=True,
                          text=True, timeout=600)


def test_stats_rebuild_by_name_once_the_connector_module_is_imported():
    ok = rebuild("import")
    assert ok.returncode == 0, ok.stderr[-2000:]
    last = ok.stdout.strip().splitlines()[-1]  # vLLM logs to stdout too
    assert last == "MarketplaceStats {'lookups': 3}", ok.stdout[-2000:]


def test_without_the_import_the_name_does_not_resolve():
    """The control: the name is not otherwise known in such a process."""
    bad = rebuild("none")
    assert bad.returncode != 0
    assert "MarketplaceConnector" in bad.stderr
