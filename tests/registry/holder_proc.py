"""A holder process for the registry tests (run by conftest.HolderProcess, not collected).

Reads one JSON spec line on stdin, registers as a holder, publishes the keys at locations
0..n-1, prints {"holder_id", "holder_bit"[, "child_pid"]} and waits for stdin to close.
With "fork_child", a child inherits the registry connection and outlives us when we are
killed: the registry must notice the holder's death from its pid alone.
"""

from __future__ import annotations

import json
import os
import sys
import time

from kvmkt_connector.registry.client import RegistryClient


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    client = RegistryClient.connect(spec["socket"], client_name=spec["name"], autostart=False)
    accepted = client.register_holder(
        bytes.fromhex(spec["namespace"]), spec["name"], b"fingerprint", b"descriptor",
        [p.replace("{pid}", str(os.getpid())) for p in spec["cleanup_paths"]],
    )  # fmt: skip
    keys = [bytes.fromhex(k) for k in spec["keys"]]
    client.publish(keys, list(range(len(keys))))
    info = {"holder_id": accepted.holder_id, "holder_bit": accepted.holder_bit}
    if spec["fork_child"]:
        child = os.fork()
        if child == 0:  # keeps the inherited socket open, never talks on it
            os.close(0)
            time.sleep(60)
            os._exit(0)
        info["child_pid"] = child
    print(json.dumps(info), flush=True)
    sys.stdin.read()  # until the test closes stdin or kills us


if __name__ == "__main__":
    main()
