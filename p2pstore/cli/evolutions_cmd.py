"""``p2pstore evolutions``: a store's numbered schema scripts (store/evolutions.py).

Scripts live in ``<data dir>/evolutions/<bundle>/<store>/N.sql`` on the
daemon's machine (docs/config.md); the daemon reads them, never a peer.
"""

from __future__ import annotations

import argparse
import sys
import time

from p2pstore.cli.common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, emit, open_store, store_option, with_client
from p2pstore.client import Client


def add_parsers(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("evolutions", help="a store's numbered schema scripts (status, apply, resolve)",
                       description="Evolutions change a store's schema with numbered scripts 1.sql, 2.sql, ... in "
                                   "<data dir>/evolutions/<bundle>/<store>/, each with a '-- !Ups' and a '-- !Downs' section "
                                   "(the first comment line is its description). Each revision applies in one transaction. "
                                   "Distributed tables only move forward: dropping or renaming one, or a column it syncs, "
                                   "is refused (EVOLUTION_DESTRUCTIVE). A revision that fails is rolled back and leaves the "
                                   "store inconsistent until its script is fixed or it is resolved by hand.")
    ev = p.add_subparsers(dest="evolutions_command", metavar="SUBCOMMAND")
    s = ev.add_parser("status", parents=[parent], help="each revision and its state here",
                      description="List every revision: pending, applied, diverged (its script changed since it was "
                                  "applied), applying_up / applying_down (failed: the store is inconsistent) or removed.")
    store_option(s)
    s.set_defaults(run=run_status)
    a = ev.add_parser("apply", parents=[parent], help="apply pending revisions",
                      description="Apply the pending revisions in order (a diverged one: its old Downs, then its new Ups). "
                                  "Stops at the first that fails or is refused. Exit status 1 if one did.")
    store_option(a)
    a.add_argument("--up-to", metavar="N", type=int, default=None, help="stop after revision N")
    a.set_defaults(run=run_apply)
    m = ev.add_parser("mark-applied", parents=[parent], help="record revision N as applied without running it",
                      description="Record revision N as applied without running it (you applied it by hand).")
    store_option(m)
    m.add_argument("revision", metavar="N", type=int)
    m.set_defaults(run=lambda args: run_one(args, "evolutions.mark_applied"))
    r = ev.add_parser("resolve", parents=[parent], help="settle a failed revision by hand",
                      description="After fixing by hand what failed revision N left: applying_up becomes applied, "
                                  "applying_down is forgotten; the store is consistent again.")
    store_option(r)
    r.add_argument("revision", metavar="N", type=int)
    r.set_defaults(run=lambda args: run_one(args, "evolutions.resolve"))
    lg = ev.add_parser("log", parents=[parent], help="the store's record of applied revisions, with their scripts",
                       description="Print the store's record: id, state, when, description, and the scripts that ran.")
    store_option(lg)
    lg.set_defaults(run=run_log)
    p.set_defaults(run=lambda args: (p.print_help(sys.stderr), EXIT_USAGE)[1])


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def run_status(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        result = await client.call("evolutions.status", **ref)
        lines = [f"scripts: {result['directory']}"] + [
            f"{r['id']:>4}  {r['state']:<13} {_when(r['applied_at']):<19}  {r['description']}"
            + (f"\n      problem: {r['last_problem']}" if r["last_problem"] else "")
            for r in result["revisions"]
        ]
        if not result["revisions"]:
            lines.append("no revisions")
        if result["inconsistent"]:
            lines.append("the store is INCONSISTENT: fix the failed script, or `p2pstore evolutions resolve N`")
        emit(args, result, "\n".join(lines))
        return EXIT_ERROR if result["inconsistent"] else EXIT_OK

    return with_client(args, go)


def run_apply(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        params = {**ref, **({"up_to": args.up_to} if args.up_to is not None else {})}
        result = await client.call("evolutions.apply", **params)
        applied = result["applied"]
        emit(args, result, f"applied revision(s) {', '.join(map(str, applied))}" if applied else "nothing to apply")
        return EXIT_OK

    return with_client(args, go)


def run_one(args: argparse.Namespace, method: str) -> int:
    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        result = await client.call(method, **ref, revision=args.revision)
        emit(args, result, f"revision {result['revision']}: {result['state']}")
        return EXIT_OK

    return with_client(args, go)


def run_log(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        ref = await open_store(client, args)
        entries = await client.call("evolutions.log", **ref)
        text = "\n".join(
            f"{e['id']:>4}  {e['state']:<13} {_when(e['applied_at'])}  {e['hash'][:12]}  {e['description']}\n"
            + "".join(f"      {line}\n" for line in e["apply_script"].strip().splitlines())
            for e in entries
        ) or "no revisions applied"
        emit(args, entries, text.rstrip("\n"))
        return EXIT_OK

    return with_client(args, go)
