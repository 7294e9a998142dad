"""``p2pstore``: the command line. One module per command group.

Exit status: 0 success, 1 error (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys

from p2pstore import __version__
from p2pstore.cli import daemon_cmd, device_cmds, evolutions_cmd, query_cmd, replica_cmds, schema_cmd, store_cmds, sync_cmds, versions_cmd
from p2pstore.cli.common import EXIT_ERROR, EXIT_USAGE, socket_options
from p2pstore.errors import P2PStoreError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pstore",
        description="Peer-to-peer distributed SQLite store. Run `p2pstore daemon` on every device, then use the other "
                    "commands to talk to the local daemon over its Unix socket.",
        epilog="Exit status: 0 success, 1 error, 2 bad usage. See docs/ for the API and configuration.",
    )
    parser.add_argument("--version", action="version", version=f"p2pstore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parent = socket_options()
    daemon_cmd.add_parser(sub, parent)
    device_cmds.add_parsers(sub, parent)
    store_cmds.add_parsers(sub, parent)
    sync_cmds.add_parsers(sub, parent)
    query_cmd.add_parsers(sub, parent)
    schema_cmd.add_parsers(sub, parent)
    evolutions_cmd.add_parsers(sub, parent)
    versions_cmd.add_parsers(sub, parent)
    replica_cmds.add_parsers(sub, parent)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except P2PStoreError as exc:
        print(f"p2pstore: {exc.name}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR
