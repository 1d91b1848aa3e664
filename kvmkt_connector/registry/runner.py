"""Run a registry in the foreground: shared by ``kvmkt registry`` and
``python -m kvmkt_connector.registry serve`` (what auto-start spawns)."""

from __future__ import annotations

import argparse
import logging

from . import paths
from .service import DEFAULT_CAPACITY_BLOCKS, RegistryServer


def add_server_arguments(
    parser: argparse.ArgumentParser, *, idle_exit_default: float | None
) -> None:
    parser.add_argument(
        "--socket",
        default=None,
        help="socket path (default: $KVMKT_REGISTRY_SOCKET, "
        "else $XDG_RUNTIME_DIR/kvmkt/, else /tmp/kvmkt-<uid>/)",
    )
    parser.add_argument(
        "--capacity",
        type=int,
        default=DEFAULT_CAPACITY_BLOCKS,
        help="most blocks listed at once (default %(default)s)",
    )
    parser.add_argument(
        "--idle-exit-s",
        type=float,
        default=idle_exit_default,
        help="exit after this many seconds without any connection",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on 127.0.0.1:PORT"
    )
    parser.add_argument("--log-level", default="INFO")


def serve_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s registry[%(process)d] %(message)s",
    )
    serve(
        args.socket,
        capacity_blocks=args.capacity,
        idle_exit_s=args.idle_exit_s,
        metrics_port=args.metrics_port,
    )
    return 0


def serve(
    socket_path: str | None = None,
    *,
    capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
    idle_exit_s: float | None = None,
    metrics_port: int | None = None,
) -> None:
    """Run a registry in the foreground until SIGTERM/SIGINT (or idle exit)."""
    server = RegistryServer(
        socket_path or paths.default_socket_path(),
        capacity_blocks=capacity_blocks,
        idle_exit_s=idle_exit_s,
        metrics_port=metrics_port,
    )
    server.install_signal_handlers()
    server.start()
    try:
        server.serve_forever()
    finally:
        server.close()
