"""Store commands: ``sql``, ``distribute``, ``watch``, ``backup``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from p2pstore.api.jsonrpc import to_wire
from p2pstore.cli.common import EXIT_ERROR, EXIT_OK, emit, open_store, parse_value, print_rows, store_option, with_client
from p2pstore.client import Client

#: Statements whose first word means "returns rows": sent as store.query.
QUERY_WORDS = ("SELECT", "WITH", "PRAGMA", "EXPLAIN", "VALUES")


def add_parsers(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sql", parents=[parent], help="run one SQL statement on a store",
                       description="Run one SQL statement. SELECT/WITH/PRAGMA/EXPLAIN/VALUES print rows; other statements "
                                   "print rows_affected and last_insert_rowid. PARAMs bind to ? in order; each is read as JSON "
                                   "when it parses (42, 1.5, null, \"text\") and as plain text otherwise.")
    store_option(p)
    p.add_argument("statement", metavar="SQL")
    p.add_argument("params", metavar="PARAM", nargs="*")
    p.set_defaults(run=run_sql)

    p = sub.add_parser("distribute", parents=[parent], help="make tables distributed (synced)",
                       description="Mark tables as distributed so their changes are captured and synced. A store's table type "
                                   "(collaborative or single-version) is fixed by the first call.")
    store_option(p)
    p.add_argument("tables", metavar="TABLE", nargs="+")
    p.add_argument("--mode", choices=["collaborative", "single-version"], default="collaborative")
    p.add_argument("--auto-sync", action="store_true", help="push local changes to online trusted devices automatically")
    p.set_defaults(run=run_distribute)

    p = sub.add_parser("watch", parents=[parent], help="print change notifications as JSON lines",
                       description="Subscribe to a store's change notifications and print one JSON line per notification "
                                   "until interrupted (Ctrl-C). --local: changes made on this device (local_details); "
                                   "--remote: devices whose synced data changed. Default: both.")
    store_option(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--local", action="store_true", help="only changes made on this device (local_details)")
    g.add_argument("--remote", action="store_true", help="only devices whose synced data changed (remote)")
    p.add_argument("--devices", action="store_true", help="also print deviceChange events (online/offline, trust)")
    p.set_defaults(run=run_watch)

    p = sub.add_parser("backup", parents=[parent], help="copy a store to a file while the daemon runs",
                       description="Write a consistent copy of the store to FILE, a new file (never overwritten), using "
                                   "SQLite's online backup; writers go on meanwhile. The daemon writes the file, so FILE must "
                                   "be somewhere it may write (under the systemd unit: inside /var/lib/p2pstore). "
                                   "Restoring: docs/operations.md.")
    store_option(p)
    p.add_argument("file", metavar="FILE", help="the backup file to create")
    p.set_defaults(run=run_backup)

    r = sub.add_parser("rebuild", parents=[parent], help="drop this device's copy of a distributed table and pull it back",
                       description="Rebuild (rather than update) a distributed table: drop this device's copy of it -- a "
                                   "single_version table's rows, or a collaborative table's copies of other devices' rows "
                                   "(this device's own rows stay) -- without sending any delete, then pull the store from "
                                   "every online trusted device. Refused while a local change of the table is unsent. To "
                                   "update a table in place instead, add columns with an evolution (p2pstore evolutions).")
    store_option(r)
    r.add_argument("--table", metavar="T", required=True, help="the distributed table to rebuild")
    r.add_argument("--yes-destroy-local-data", action="store_true", help="required: confirms that the local copy is dropped")
    r.set_defaults(run=run_rebuild, usage_error=r.error)


def run_sql(args: argparse.Namespace) -> int:
    params = [parse_value(v) for v in args.params]

    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        if args.statement.lstrip().split(None, 1)[0].upper() in QUERY_WORDS:
            result = await client.call("store.query", **ref, sql=args.statement, params=params)
            if args.json:
                emit(args, result)
            else:
                print_rows(result)
        else:
            result = await client.call("store.execute", **ref, sql=args.statement, params=params)
            emit(args, result, f"rows_affected={result['rows_affected']} last_insert_rowid={result['last_insert_rowid']}")
        return EXIT_OK

    if not args.statement.strip():
        print("p2pstore sql: empty statement", file=sys.stderr)
        return 2
    return with_client(args, go)


def run_distribute(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        config = {"table_type": args.mode.replace("-", "_"), "auto_sync": args.auto_sync}
        result = await client.call("store.set_distributed_tables", **ref, tables=args.tables, config=config) or {}
        lines = [f"distributed in {ref['store']}: {', '.join(args.tables)} ({args.mode}{', auto-sync' if args.auto_sync else ''})"]
        if "schema_version" in result:
            lines.append(f"sync_schema.json version {result['schema_version']} accepted")
        lines += [f"warning: {w['path']}  {w['rule']}  {w['message']}" for w in result.get("warnings", [])]
        lines += [f"{n} existing row(s) of {t} will be sent again (new sync columns)" for t, n in result.get("resent", {}).items() if n]
        emit(args, {"store": ref["store"], "tables": args.tables, **config, **result}, "\n".join(lines))
        return EXIT_OK

    return with_client(args, go)


def run_watch(args: argparse.Namespace) -> int:
    types = ["local_details"] if args.local else ["remote"] if args.remote else ["local_details", "remote"]

    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        for t in types:
            await client.call("store.subscribe", **ref, type=t)
        if args.devices:
            await client.call("devices.subscribe")
        print(json.dumps({"watching": ref["store"], "types": types}), flush=True)
        while True:
            note = await client.notifications.get()
            print(json.dumps(to_wire(note), ensure_ascii=False), flush=True)

    try:
        return with_client(args, go)
    except KeyboardInterrupt:
        return EXIT_OK


def run_rebuild(args: argparse.Namespace) -> int:
    if not args.yes_destroy_local_data:
        args.usage_error("rebuild drops this device's copy of the table; add --yes-destroy-local-data to go on")  # exits 2

    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        result = await client.call("store.rebuild", **ref, table=args.table, yes_destroy_local_data=True)
        lines = [f"dropped {result['dropped_rows']} row(s) of {', '.join(result['dropped_tables']) or 'nothing'}"]
        lines += [f"{r['device']}  code {r['code']} {r['name']}  {r['message']}" for r in result["results"]] or [
            "no device online to pull from: the rows come back with the next pull"]
        emit(args, result, "\n".join(lines))
        return EXIT_OK if all(r["code"] == 0 for r in result["results"]) else EXIT_ERROR

    return with_client(args, go)


def run_backup(args: argparse.Namespace) -> int:
    path = os.path.abspath(os.path.expanduser(args.file))  # the daemon's working directory is not ours

    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        result = await client.call("store.backup", **ref, path=path)
        emit(args, result, f"backed up {ref['bundle']}/{ref['store']} to {result['path']} ({result['bytes']} bytes)")
        return EXIT_OK

    return with_client(args, go)
