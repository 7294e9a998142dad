"""``p2pstore query --remote DEVICE_ID TABLE``: query another device's copy of a table."""

from __future__ import annotations

import argparse
import sys

from p2pstore.cli.common import EXIT_OK, emit, open_store, print_rows, store_option, with_client
from p2pstore.cli.sync_cmds import parse_where
from p2pstore.client import Client


def add_parsers(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("query", parents=[parent], help="query a table on another device (remote query)",
                       description="Run a query on DEVICE_ID's copy of a distributed table and print the rows. The other "
                                   "device checks trust, the security-level rule and that it syncs the columns asked for. "
                                   "--where 'COLUMN OP VALUE' (repeatable, ANDed; OP = != < <= > >= like in).")
    store_option(p)
    p.add_argument("--remote", metavar="DEVICE_ID", required=True, help="the device to query")
    p.add_argument("table", metavar="TABLE")
    p.add_argument("--columns", metavar="A,B", help="columns to return (default: all it syncs)")
    p.add_argument("--where", metavar="COND", action="append", default=[])
    p.add_argument("--order-by", metavar="COL[:desc]", action="append", default=[])
    p.add_argument("--limit", type=int)
    p.add_argument("--offset", type=int)
    p.set_defaults(run=run_query)


def run_query(args: argparse.Namespace) -> int:
    try:
        where = [parse_where(w) for w in args.where]
    except ValueError as exc:
        print(f"p2pstore query: {exc}", file=sys.stderr)
        return 2
    predicates: dict = {}
    if where:
        predicates["where"] = where
    if args.order_by:
        predicates["order_by"] = [[o.split(":")[0], "desc" if o.endswith(":desc") else "asc"] for o in args.order_by]
    if args.limit is not None:
        predicates["limit"] = args.limit
    if args.offset is not None:
        predicates["offset"] = args.offset
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else []

    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        result = await client.call("store.remote_query", **ref, device=args.remote, table=args.table,
                                   predicates=predicates, columns=columns)
        if args.json:
            emit(args, result)
        else:
            print_rows(result)
        return EXIT_OK

    return with_client(args, go)
