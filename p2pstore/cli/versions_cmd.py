"""``p2pstore versions``: the schema a store had after each evolution or accepted sync_schema.json (store/versions.py)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from p2pstore.cli.common import EXIT_OK, EXIT_USAGE, emit, open_store, store_option, with_client
from p2pstore.client import Client


def add_parsers(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("versions", help="a store's schema versions (list, diff)",
                       description="A version is recorded each time an evolution applies or a sync_schema.json entry is "
                                   "accepted and the store's schema moved: its description, time, schema SQL, sync schema "
                                   "and hash.")
    vs = p.add_subparsers(dest="versions_command", metavar="SUBCOMMAND")
    ls = vs.add_parser("list", parents=[parent], help="every version, oldest first",
                       description="List the store's versions: id, time, what made it (evolution N or sync_schema.json "
                                   "version N), hash and description. --json adds the schema SQL and sync schema.")
    store_option(ls)
    ls.set_defaults(run=run_list)
    d = vs.add_parser("diff", parents=[parent], help="what changed between two versions, or against a device",
                      description="Tables, columns and declared types added, removed or changed from version V1 to V2 "
                                  "(no V2: the schema now), and the distributed tables and sync columns. With --device ID: "
                                  "this device's distributed tables against what that device offers of the store (its sync "
                                  "schema; column types do not travel). A device the store's security label keeps out is "
                                  "refused (SECURITY_LEVEL).")
    store_option(d)
    d.add_argument("v1", metavar="V1", type=int, nargs="?", help="the older version")
    d.add_argument("v2", metavar="V2", type=int, nargs="?", help="the newer version (default: the schema now)")
    d.add_argument("--device", metavar="ID", help="compare with this trusted device's offer instead")
    d.set_defaults(run=run_diff, usage_error=d.error)
    p.set_defaults(run=lambda args: (p.print_help(sys.stderr), EXIT_USAGE)[1])


def run_list(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        found = await client.call("versions.list", **ref)
        emit(args, found, "\n".join(
            f"{v['id']:>4}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(v['at'] / 1000))}  "
            f"{v['kind'].replace('_', '.') + ' ' + str(v['ref']):<16} {v['hash'][:12]}  {v['description']}"
            for v in found) or "no versions recorded")
        return EXIT_OK

    return with_client(args, go)


def run_diff(args: argparse.Namespace) -> int:
    if args.device is not None and args.v1 is not None:
        args.usage_error("give V1 [V2] or --device ID, not both")  # exits 2
    if args.device is None and args.v1 is None:
        args.usage_error("give V1 [V2] or --device ID")

    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        if args.device is not None:
            params: dict[str, Any] = {"device": args.device}
        else:
            params = {"from": args.v1, **({"to": args.v2} if args.v2 is not None else {})}
        result = await client.call("versions.diff", **ref, **params)
        emit(args, result, "\n".join(diff_lines(result)) or "no differences")
        return EXIT_OK

    return with_client(args, go)


def diff_lines(d: dict[str, Any]) -> list[str]:
    """A diff in words, one change per line (``+`` added, ``-`` removed, ``~`` changed)."""
    lines = [f"+ table {t}" for t in d.get("tables_added", [])]
    lines += [f"- table {t}" for t in d.get("tables_removed", [])]
    lines += [f"+ column {c['table']}.{c['column']} {c['type']}".rstrip() for c in d.get("columns_added", [])]
    lines += [f"- column {c['table']}.{c['column']} {c['type']}".rstrip() for c in d.get("columns_removed", [])]
    lines += [f"~ column {c['table']}.{c['column']}: type {c['from'] or '(none)'} -> {c['to'] or '(none)'}" for c in d.get("types_changed", [])]
    lines += [f"+ distributed {t}" for t in d["distributed_added"]]
    lines += [f"- distributed {t}" for t in d["distributed_removed"]]
    lines += [f"+ sync column {c['table']}.{c['column']}" for c in d["sync_columns_added"]]
    lines += [f"- sync column {c['table']}.{c['column']}" for c in d["sync_columns_removed"]]
    lines += [f"~ conflict column of {c['table']}: {c['from']} -> {c['to']}" for c in d["conflict_column_changed"]]
    return lines
