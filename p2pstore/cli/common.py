"""What every subcommand shares: the socket option, output, and the client call.

Exit status (SPEC §4): 0 success, 1 an error (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from p2pstore.api.jsonrpc import to_wire
from p2pstore.client import Client
from p2pstore.config import default_socket_path

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def socket_options() -> argparse.ArgumentParser:
    """Options accepted by every command, after the command name."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--socket", metavar="PATH", default=None,
                        help=f"daemon socket (env P2PSTORE_SOCKET; default {default_socket_path()})")
    parent.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parent


def store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="S", default=None, help="store name (default: the daemon's default_store)")
    parser.add_argument("--bundle", metavar="B", default="default", help="bundle of the store (default: %(default)s)")


def emit(args: argparse.Namespace, value: Any, text: str | None = None) -> None:
    if args.json or text is None:
        print(json.dumps(to_wire(value), ensure_ascii=False, indent=None if args.json else 2))
    elif text:
        print(text)


def with_client(args: argparse.Namespace, fn: Callable[[Client], Awaitable[int]]) -> int:
    async def main() -> int:
        async with Client(args.socket) as client:
            return await fn(client)

    return asyncio.run(main())


async def open_store(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    """Open the named (or default) store; returns the params that address it."""
    name = args.store
    if name is None:
        name = (await client.call("device.info")).get("default_store", "default")
    await client.call("store.open", store=name, bundle=args.bundle)
    return {"store": name, "bundle": args.bundle}


def print_rows(result: dict[str, Any]) -> None:
    """``{columns, rows}`` as tab-separated lines: NULL for null, $blob JSON for bytes."""
    print("\t".join(result["columns"]))
    for row in result["rows"]:
        print("\t".join("NULL" if v is None else json.dumps(to_wire(v)) if isinstance(v, bytes) else str(v) for v in row))


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (42, 1.5, null, "x"), else the text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if not isinstance(value, (dict, list)) else text


def fail(message: str) -> int:
    print(f"p2pstore: {message}", file=sys.stderr)
    return EXIT_ERROR
