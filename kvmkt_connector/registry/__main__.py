"""``python -m kvmkt_connector.registry serve --socket PATH ...`` (what auto-start spawns)."""

from __future__ import annotations

import argparse
import sys

from .runner import add_server_arguments, serve_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmkt_connector.registry")
    commands = parser.add_subparsers(dest="command", required=True)
    add_server_arguments(
        commands.add_parser("serve", help="run the node-local prefix registry"),
        idle_exit_default=None,
    )
    return serve_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
