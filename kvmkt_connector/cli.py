"""The ``kvmkt`` command: ``kvmkt registry`` runs the registry, ``kvmkt status`` shows it."""

from __future__ import annotations

import argparse
import json
import sys

from .registry.client import RegistryClient, RegistryError, RegistryUnavailable
from .registry.paths import default_socket_path
from .registry.protocol import RegistryStatus


def _status_dict(status: RegistryStatus) -> dict[str, object]:
    requests = status.lease_requests
    return {
        "server_pid": status.server_pid,
        "uptime_s": round(status.uptime_s, 3),
        "capacity_blocks": status.capacity_blocks,
        "published_blocks": status.published_blocks,
        "active_leases": status.active_leases,
        "lookups": status.lookups,
        "lease_requests": requests,
        "leases_granted": status.leases_granted,
        "hit_rate": (status.leases_granted / requests) if requests else None,
        "blocks_leased": status.blocks_leased,
        "blocks_released_lru": status.blocks_released_lru,
        "holders_lost": status.holders_lost,
        "holders": [
            {
                "holder_id": h.holder_id,
                "name": h.name,
                "pid": h.pid,
                "namespace": h.namespace.hex(),
                "published_blocks": h.published_blocks,
                "leased_blocks": h.leased_blocks,
            }
            for h in status.holders
        ],
    }


def _print_status(info: dict[str, object]) -> None:
    rate = info["hit_rate"]
    print(
        f"registry pid {info['server_pid']}, up {info['uptime_s']:.1f} s, "
        f"capacity {info['capacity_blocks']} blocks"
    )
    print(f"published blocks {info['published_blocks']}, active leases {info['active_leases']}")
    print(
        f"lookups {info['lookups']}, lease requests {info['lease_requests']}, "
        f"granted {info['leases_granted']} "
        f"(hit rate {'n/a' if rate is None else f'{rate:.1%}'}), "
        f"blocks leased {info['blocks_leased']}, released by LRU "
        f"{info['blocks_released_lru']}, holders lost {info['holders_lost']}"
    )
    holders = info["holders"]
    print(f"holders: {len(holders)}")
    if holders:
        print(
            f"  {'ID':>4} {'NAME':<24} {'PID':>8} {'NAMESPACE':<17} {'PUBLISHED':>10} {'LEASED':>8}"
        )
        for h in holders:
            print(
                f"  {h['holder_id']:>4} {h['name'][:24]:<24} {h['pid']:>8} "
                f"{h['namespace'][:16]:<17} {h['published_blocks']:>10} "
                f"{h['leased_blocks']:>8}"
            )


def _cmd_status(args: argparse.Namespace) -> int:
    path = args.socket or default_socket_path()
    try:
        with RegistryClient.connect(path, client_name="kvmkt-status", autostart=False) as client:
            status = client.status()
    except (RegistryUnavailable, RegistryError) as exc:
        print(f"kvmkt: no registry running at {path} ({exc})", file=sys.stderr)
        return 1
    info = _status_dict(status)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_status(info)
    return 0


def _cmd_registry(args: argparse.Namespace) -> int:
    from .registry.runner import serve_from_args

    return serve_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    from .registry.runner import add_server_arguments

    parser = argparse.ArgumentParser(prog="kvmkt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    registry = commands.add_parser("registry", help="run the node's prefix registry (foreground)")
    add_server_arguments(registry, idle_exit_default=None)
    registry.set_defaults(func=_cmd_registry)
    status = commands.add_parser("status", help="show the registry's holders and counters")
    status.add_argument("--socket", default=None, help="registry socket path")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
