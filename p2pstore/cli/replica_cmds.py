"""Replica commands: ``replica set|list``, ``checkout``, ``checkin`` (store/replicas.py, docs/replicas.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from p2pstore.cli.common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, emit, open_store, store_option, with_client
from p2pstore.cli.sync_cmds import parse_where
from p2pstore.client import Client

KINDS_HELP = ("two-way (the default: both send and receive), send (this device is the parent of a one-way pair) or "
              "receive (the child: its distributed tables become read-only to applications)")


def add_parsers(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("replica", help="the kind of this device's end of a link (two-way, send, receive)",
                       description="Each device sets its own end of the link with a peer, per store. Ends must agree "
                                   "(two-way/two-way, send/receive); a sync between ends that do not answers code 18 "
                                   "REPLICA_MISMATCH and moves no row. Auto-sync follows the kind.")
    rs = p.add_subparsers(dest="replica_command", metavar="SUBCOMMAND")
    s = rs.add_parser("set", parents=[parent], help="set this device's end of the link with a peer",
                      description=f"Set this device's end of the link with PEER for the store: {KINDS_HELP}.")
    store_option(s)
    s.add_argument("--peer", metavar="ID", required=True, help="the other device")
    s.add_argument("--kind", required=True, choices=["two-way", "send", "receive"])
    s.set_defaults(run=run_set)
    ls = rs.add_parser("list", parents=[parent], help="the links that are not two-way",
                       description="List this device's ends that are not two-way (send, receive, checkout), of one "
                                   "store (--store) or of every open store.")
    ls.add_argument("--store", metavar="S", default=None, help="only this store (default: every open store)")
    ls.add_argument("--bundle", metavar="B", default="default", help="bundle of the store (default: %(default)s)")
    ls.set_defaults(run=run_list)
    p.set_defaults(run=lambda args: (p.print_help(sys.stderr), EXIT_USAGE)[1])

    c = sub.add_parser("checkout", parents=[parent], help="check out selected rows from a parent device",
                       description="Pull a snapshot of selected rows of a store from a parent device (whose end stays "
                                   "two-way) and keep a checkout link with it: edit the rows here, even offline, then "
                                   "`p2pstore checkin` pushes the edits back once and closes the link. --where: "
                                   "'COLUMN OP VALUE' (may repeat; needs --table).")
    store_option(c)
    c.add_argument("--from", dest="device", metavar="ID", required=True, help="the parent device")
    c.add_argument("--table", metavar="T", help="only this table")
    c.add_argument("--where", metavar="COND", action="append", default=[], help="row filter, e.g. 'AGE > 30'")
    c.set_defaults(run=run_checkout, usage_error=c.error)
    i = sub.add_parser("checkin", parents=[parent], help="push a checkout's edits back once and close the link",
                       description="Push the edits of the store's open checkout back to its parent (the same "
                                   "selection), once: on success the link closes and a second checkin is refused.")
    store_option(i)
    i.add_argument("--to", dest="device", metavar="ID", default=None, help="the parent (needed only with several open checkouts)")
    i.set_defaults(run=run_checkin)


def _link_line(link: dict[str, Any]) -> str:
    line = f"{link['bundle']}/{link['store']}  {link['peer']}  {link['kind']}"
    if link["kind"] == "checkout":
        line += f"  {link['state']}  table {link['table'] or '*'}" + (f" where {link['filter']}" if link["filter"] else "")
    return line


def run_set(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        link = await client.call("replica.set", **ref, peer=args.peer, kind=args.kind)
        emit(args, link, _link_line(link))
        return EXIT_OK

    return with_client(args, go)


def run_list(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        ref = await open_store(client, args) if args.store is not None else {}
        links = await client.call("replica.list", **ref)
        emit(args, links, "\n".join(_link_line(link) for link in links) or "every link is two-way")
        return EXIT_OK

    return with_client(args, go)


def _results(args: argparse.Namespace, result: dict[str, Any], done: str) -> int:
    lines = [f"{r['device']}  code {r['code']} {r['name']}  {r['message']}" for r in result["results"]]
    ok = bool(result["results"]) and all(r["code"] == 0 for r in result["results"])
    emit(args, result, "\n".join([*lines, done if ok else "link: " + _link_line(result["link"])]))
    return EXIT_OK if ok else EXIT_ERROR


def run_checkout(args: argparse.Namespace) -> int:
    try:
        where = [parse_where(w) for w in args.where]
    except ValueError as exc:
        args.usage_error(str(exc))  # exits 2
    if where and not args.table:
        args.usage_error("--where needs --table")

    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        params: dict[str, Any] = {"device": args.device, **({"table": args.table} if args.table else {}),
                                  **({"where": where} if where else {})}
        result = await client.call("store.checkout", **ref, **params)
        return _results(args, result, f"checked out from {result['device']}: edit the rows, then `p2pstore checkin`")

    return with_client(args, go)


def run_checkin(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        result = await client.call("store.checkin", **ref, **({"device": args.device} if args.device else {}))
        return _results(args, result, f"checked in to {result['device']}; the checkout link is closed")

    return with_client(args, go)
