"""Sync commands: ``sync``, ``failures``, ``conflicts``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from p2pstore.cli.common import EXIT_ERROR, EXIT_OK, emit, open_store, parse_value, store_option, with_client
from p2pstore.client import Client

WHERE_OPS = ("!=", "<=", ">=", "=", "<", ">", " like ", " in ")


def add_parsers(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sync", parents=[parent], help="push or pull changes to/from devices",
                       description="Push this device's changes to devices, or pull theirs. Prints one line per device "
                                   "with its result code (0 = success). --where selects rows (query sync; may repeat): "
                                   "'COLUMN OP VALUE' with OP one of = != < <= > >= like in (in: comma-separated values).")
    store_option(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--push", action="store_const", const="push", dest="mode",
                   help="send this device's changes the devices have not applied yet")
    g.add_argument("--pull", action="store_const", const="pull", dest="mode",
                   help="fetch the devices' changes this device has not applied yet")
    g.add_argument("--both", action="store_const", const="both", dest="mode",
                   help="push, then pull the same selection, with each device (one sync; counts per direction)")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--devices", metavar="ID[,ID...]", help="target device IDs")
    t.add_argument("--all", action="store_true", help="all online trusted devices")
    p.add_argument("--table", metavar="T", help="only this table")
    p.add_argument("--where", metavar="COND", action="append", default=[], help="row filter, e.g. 'AGE > 18'")
    p.add_argument("--refresh", action="store_true",
                   help="send or fetch the selected rows again from the start, whatever the watermarks say")
    p.set_defaults(run=run_sync)

    p = sub.add_parser("failures", parents=[parent], help="list, retry or discard received changes that could not be applied",
                       description="The sync-failure log: changes received from peers that could not be applied "
                                   "(constraint, type, unknown column...). Nothing is dropped silently: fix the cause and "
                                   "retry, or discard.")
    store_option(p)
    p.add_argument("action", nargs="?", choices=["list", "retry", "discard"], default="list")
    p.add_argument("id", nargs="?", type=int)
    p.set_defaults(run=run_failures)

    p = sub.add_parser("conflicts", parents=[parent], help="the conflict log, conflict policies and the reconciler's queue",
                       description="ACTION list (default): the conflict log of single-version tables, every change that "
                                   "lost to a newer one (per column, last writer wins on the hybrid clock, ties by device ID). "
                                   "policy lww | priority DEV[,DEV...] | manual --reconciler DEV [--detect column|row]: set a "
                                   "table's conflict policy (--table; every device must set the same; priority: concurrent edits "
                                   "resolve in favour of the devices listed, strongest first; detect row: concurrent edits of "
                                   "different columns of a row are a conflict too). queue: the changes queued on this reconciler. "
                                   "resolve ID --take local|remote|value [--value JSON]: settle a queued change.")
    store_option(p)
    p.add_argument("action", nargs="?", choices=["list", "policy", "queue", "resolve"], default="list")
    p.add_argument("arg", nargs="?", metavar="POLICY|ID", help="policy: lww, priority or manual; resolve: the queue entry's id")
    p.add_argument("devices", nargs="?", metavar="DEV[,DEV...]",
                   help="policy priority: the devices favoured in a conflict, strongest first, comma-separated")
    p.add_argument("--table", metavar="T", help="only this table (policy: the table)")
    p.add_argument("--reconciler", metavar="ID", help="policy manual: the device where a person resolves conflicts")
    p.add_argument("--detect", choices=["column", "row"], help="what counts as concurrent edits (default column)")
    p.add_argument("--take", choices=["local", "remote", "value"], help="resolve: which value to keep")
    p.add_argument("--value", metavar="JSON", help="resolve --take value: the value, as JSON (e.g. 42, \"text\", null)")
    p.add_argument("--limit", type=int, default=100, help="show at most N, newest first (default 100)")
    p.add_argument("--clear", action="store_true", help="forget the logged conflicts instead of showing them")
    p.add_argument("--up-to", type=int, metavar="ID", help="with --clear: only those with id <= ID")
    p.set_defaults(run=run_conflicts, usage_error=p.error)

    p = sub.add_parser("log", parents=[parent], help="the sync log: what each sync did",
                       description="The sync log of a store: one line per sync session, newest first — started here "
                                   "(manual, auto, anti-entropy) or by the peer (served): when, peer, send/receive, kind, table and filter, "
                                   "result code, rows sent / applied / in conflict / failed / parked, duration, message. "
                                   "Kept to the newest sync_log_entries (docs/config.md).")
    store_option(p)
    p.add_argument("--device", metavar="ID", help="only syncs with this device")
    p.add_argument("--limit", type=int, default=50, help="show at most N, newest first (default 50)")
    p.set_defaults(run=run_log)


def parse_where(text: str) -> list:
    """'AGE > 18' -> ["AGE", ">", 18]; raises ValueError with a readable reason."""
    lowered = f" {text} ".lower()
    for op in WHERE_OPS:
        if op in (lowered if op.strip().isalpha() else text):
            if op.strip().isalpha():
                i = lowered.index(op) - 1
                column, value = text[:i].strip(), text[i + len(op):].strip()
            else:
                column, value = (part.strip() for part in text.split(op, 1))
            if not column or not value:
                break
            op = op.strip()
            if op == "in":
                return [column, "in", [parse_value(v.strip()) for v in value.split(",")]]
            return [column, op, parse_value(value)]
    raise ValueError(f"can't read condition {text!r}; use 'COLUMN OP VALUE' with OP one of = != < <= > >= like in")


def run_sync(args: argparse.Namespace) -> int:
    try:
        where = [parse_where(w) for w in args.where]
    except ValueError as exc:
        print(f"p2pstore sync: {exc}", file=sys.stderr)
        return 2
    show_bar = sys.stderr.isatty() and not args.json

    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        predicates: dict = {"devices": "all" if args.all else [d.strip() for d in args.devices.split(",") if d.strip()]}
        if args.table:
            predicates["table"] = args.table
        if where:
            predicates["where"] = where
        call = client.call("store.sync", **ref, mode=args.mode, predicates=predicates, **({"refresh": True} if args.refresh else {}))
        if show_bar:
            import asyncio

            task = asyncio.ensure_future(call)
            while not task.done():
                try:
                    note = await asyncio.wait_for(client.notifications.get(), 0.2)
                except asyncio.TimeoutError:
                    continue
                if note["method"] == "syncProgress":
                    done = sum(v.get("upload", v.get("download", {})).get("successful", 0) for v in note["params"]["details"].values())
                    print(f"\r{args.mode}: {note['params']['schedule']:<11} {done} row(s)", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
            result = task.result()
        else:
            result = await call
        lines = [f"{r['device']}  code {r['code']} {r['name']}  {r['message']}" for r in result["results"]] or ["no device to sync with"]
        emit(args, result, "\n".join(lines))
        return EXIT_OK if all(r["code"] == 0 for r in result["results"]) else EXIT_ERROR

    return with_client(args, go)


def run_failures(args: argparse.Namespace) -> int:
    if args.action != "list" and args.id is None:
        print(f"p2pstore failures {args.action}: needs a failure ID", file=sys.stderr)
        return 2

    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        if args.action == "list":
            failures = await client.call("store.sync_failures", **ref)
            emit(args, failures, "\n".join(
                f"{f['id']}  {f['table']}  from {f['origin']}  {f['reason']}  {f['change']}" for f in failures) or "no sync failures")
        elif args.action == "retry":
            result = await client.call("store.retry_failure", **ref, id=args.id)
            emit(args, result, f"failure {args.id}: {'applied' if not result['failed'] else 'still failing (kept)'}")
            return EXIT_OK if not result["failed"] else EXIT_ERROR
        else:
            await client.call("store.discard_failure", **ref, id=args.id)
            emit(args, {"discarded": args.id}, f"failure {args.id} discarded")
        return EXIT_OK

    return with_client(args, go)


def run_conflicts(args: argparse.Namespace) -> int:
    if args.action == "policy":
        return _run_policy(args)
    if args.action == "queue":
        return _run_queue(args)
    if args.action == "resolve":
        return _run_resolve(args)

    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        table = {"table": args.table} if args.table else {}
        if args.clear:
            up_to = {"up_to": args.up_to} if args.up_to is not None else {}
            cleared = await client.call("store.clear_conflicts", **ref, **table, **up_to)
            emit(args, cleared, f"{cleared['cleared']} conflict(s) cleared")
            return EXIT_OK
        found = await client.call("store.conflicts", **ref, limit=args.limit, **table)
        emit(args, found, "\n".join(map(_conflict_line, found)) or "no conflicts")
        return EXIT_OK

    return with_client(args, go)


def _conflict_line(c: dict[str, Any]) -> str:
    if c.get("kind") == "row":
        return (f"{c['id']}  {c['table']}[{c['key']}]  row conflict: {c['column']} edited on {c['winner']} @{c['winner_hlc']} while "
                f"{c['other_column']} was on {c['loser']} @{c['loser_hlc']} (both kept)")
    return (f"{c['id']}  {c['table']}[{c['key']}].{c['column'] or '(row)'}  lost: {c['losing_value']!r} "
            f"({c['loser']} @{c['loser_hlc']})  winner: {c['winner']} @{c['winner_hlc']}")


def _run_policy(args: argparse.Namespace) -> int:
    usage = "conflicts policy lww | priority DEV[,DEV...] | manual --reconciler ID --table T [--detect column|row]"
    if args.arg not in ("lww", "priority", "manual") or not args.table:
        args.usage_error(usage)  # exits 2
    if (args.arg == "priority") != (args.devices is not None):
        args.usage_error(f"the device list goes with priority (and only then): {usage}")
    devices = [d.strip() for d in args.devices.split(",")] if args.devices is not None else None
    if devices is not None and not all(devices):
        args.usage_error(f"an empty device ID in {args.devices!r}: {usage}")

    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        extra = {k: v for k, v in (("reconciler", args.reconciler), ("detect", args.detect), ("devices", devices)) if v is not None}
        result = await client.call("conflicts.policy", **ref, table=args.table, policy=args.arg, **extra)
        emit(args, result, f"{result['table']}: {result['kind']}" + (f", reconciler {result['reconciler']}" if result.get("reconciler") else "")
             + (f", in favour of {', '.join(result['devices'])}" if result.get("devices") else "") + f", detect {result['detect']}")
        return EXIT_OK

    return with_client(args, go)


def _run_queue(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        found = await client.call("conflicts.queue", **ref, limit=args.limit)
        emit(args, found, "\n".join(
            f"{e['id']}  {e['table']}[{e['key']}].{e['column']}  here: {e['local_value']!r} ({e['local_origin']} @{e['local_hlc']})  "
            f"incoming: {e['remote_value']!r} ({e['remote_origin']} @{e['remote_hlc']})" for e in found) or "nothing queued")
        return EXIT_OK

    return with_client(args, go)


def _run_resolve(args: argparse.Namespace) -> int:
    if args.arg is None or not args.arg.isdigit() or args.take is None:
        args.usage_error("conflicts resolve ID --take local|remote|value [--value JSON]")
    if (args.take == "value") != (args.value is not None):
        args.usage_error("--value goes with --take value (and only then)")
    try:
        value = {"value": json.loads(args.value)} if args.value is not None else {}
    except ValueError as exc:
        args.usage_error(f"--value is not JSON: {exc}")

    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        done = await client.call("conflicts.resolve", **ref, id=int(args.arg), take=args.take, **value)
        emit(args, done, f"{done['table']}[{done['key']}].{done['column']} = {done['value']!r}; {done['queued']} still queued")
        return EXIT_OK

    return with_client(args, go)


def run_log(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        device = {"device": args.device} if args.device else {}
        found = await client.call("store.sync_log", **ref, limit=args.limit, **device)
        emit(args, found, "\n".join(
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['at'] / 1000))}  {e['peer'][:15]}  {e['direction']:<7} "
            f"{e['kind']:<12} {e['table'] or '*'}{' where ' + e['filter'] if e['filter'] else ''}  code {e['code']}  "
            f"sent {e['sent']} applied {e['applied']} conflicts {e['conflicts']} failed {e['failed']} "
            f"parked {e['parked']}  {e['duration_ms']} ms"
            + (f"  {e['message']}" if e["code"] else "") for e in found) or "no syncs logged")
        return EXIT_OK

    return with_client(args, go)
