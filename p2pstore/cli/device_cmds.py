"""Device commands: ``id``, ``status``, ``devices``, ``trust``, ``untrust``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from p2pstore.cli.common import EXIT_OK, EXIT_USAGE, emit, fail, with_client
from p2pstore.client import Client


def add_parsers(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("id", parents=[parent], help="print this device's ID",
                       description="Print the device ID of the daemon on --socket (give it to peers so they can trust you).")
    p.set_defaults(run=run_id)
    p = sub.add_parser("status", parents=[parent], help="show the daemon, its stores and peers",
                       description="Show this device (ID, name, security level, port), uptime, open stores, and per "
                                   "trusted peer and store how far behind it is: rows not yet sent to it, rows not yet "
                                   "received from it, its last sync and the current throughput (docs/sync.md, \"Lag\").")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C (with --json: one JSON line per refresh)")
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (default: %(default)s)")
    p.add_argument("--count", type=int, default=None, metavar="N", help="with --watch: stop after N refreshes")
    p.set_defaults(run=run_status)
    p = sub.add_parser("devices", parents=[parent], help="list known devices (trusted, pending, online)",
                       description="List the devices this daemon knows: trusted ones, and pending ones (discovered on the "
                                   "network or that tried to connect, but not trusted yet). Trust a pending device with "
                                   "`p2pstore trust ID`.")
    p.set_defaults(run=run_devices)
    p = sub.add_parser("trust", parents=[parent], help="trust devices (exchange data with them)",
                       description="Trust devices by their IDs (as printed by `p2pstore id` on each device). Both devices "
                                   "must trust each other before a channel opens. A mistyped ID is caught by its check "
                                   "characters; with several IDs, one bad ID trusts none of them.")
    p.add_argument("device_ids", metavar="DEVICE_ID", nargs="+")
    p.add_argument("--name", help="a name to remember it by (one DEVICE_ID only; default: the name it announces)")
    p.set_defaults(run=run_trust, usage_error=p.error)
    p = sub.add_parser("untrust", parents=[parent], help="stop trusting a device (closes its channel at once)",
                       description="Remove a device from the trust list. Its channel is closed at once and it gets nothing more.")
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.set_defaults(run=run_untrust)


def run_id(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        info = await client.call("device.info")
        emit(args, info, info["device_id"])
        return EXIT_OK

    return with_client(args, go)


def run_status(args: argparse.Namespace) -> int:
    if args.interval <= 0 or (args.count is not None and args.count < 1):
        print("p2pstore: status: --interval must be > 0 and --count >= 1", file=sys.stderr)
        return EXIT_USAGE
    if args.count is not None and not args.watch:
        return fail("status: --count needs --watch")

    async def go(client: Client) -> int:
        shown = 0
        while True:
            st = await client.call("status")
            if args.watch and not args.json and sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")  # redraw in place
            emit(args, st, _status_text(st))
            shown += 1
            if not args.watch or (args.count is not None and shown >= args.count):
                return EXIT_OK
            if not args.json:
                print(f"-- {time.strftime('%H:%M:%S')}, every {args.interval:g} s; Ctrl-C stops", flush=True)
            sys.stdout.flush()
            await asyncio.sleep(args.interval)

    try:
        return with_client(args, go)
    except KeyboardInterrupt:  # how --watch ends
        if args.watch:
            print()
            return EXIT_OK
        raise


def _status_text(st: dict[str, Any]) -> str:
    d = st["device"]
    lines = [
        f"device   {d['name']}  {d['device_id']}",
        f"level    {d['security_level']}   port {d['port']}   version {d['version']}   up {st['uptime_s']}s",
        f"devices  {len(st.get('devices', []))} known",
    ]
    for d in st.get("devices", []):
        lines.append("  " + _device_line(d))
        lines.extend(_lag_lines(d.get("stores", [])))
        lines.extend(_traffic_lines(d.get("traffic")))
    lines.append(f"stores   {len(st['stores'])} open")
    for s in st["stores"]:
        tables = ", ".join(s["distributed_tables"]) or "-"
        lines.append(f"  {s['bundle']}/{s['store']}  {s['security_level']}  {s['table_type'] or 'no distributed tables'}: {tables}"
                     + (f"  revision {s['revision']}" if s.get("revision") else ""))
        if s.get("inconsistent_revision") is not None:
            lines.append(f"      INCONSISTENT: evolution {s['inconsistent_revision']} failed; it does not sync (`p2pstore evolutions status`)")
        if s.get("queued_conflicts"):
            lines.append(f"      IN CONFLICT: {s['queued_conflicts']} change(s) to reconcile; it sends nothing (`p2pstore conflicts queue`)")
        for link in s.get("replicas", []):
            lines.append(f"      replica: {link['kind']} with {link['peer']}" + (f" ({link['state']})" if "state" in link else ""))
    return "\n".join(lines)


def _lag_lines(stores: list[dict[str, Any]]) -> list[str]:
    """A peer's lag per store as a table (``status``)."""
    if not stores:
        return []
    rows = [("store", "unsent", "unreceived", "rows/s", "last sync")]
    for s in stores:
        last = s.get("last_sync")
        when = (f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last['at']))} {last['direction']} "
                f"{last['code']} {last['name']}") if last else "never"
        if last and last["code"] != 0 and s.get("last_success_at"):
            when += f" (last success {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s['last_success_at']))})"
        unreceived = "?" if s.get("unreceived") is None else str(s["unreceived"])
        rate = f"{s['rows_per_s']:g}" if s.get("syncing") else "-"
        rows.append((f"{s['bundle']}/{s['store']}", str(s["unsent"]), unreceived, rate, when))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["      " + f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}"
            for r in rows]


def _traffic_lines(t: dict[str, int] | None) -> list[str]:
    """A peer's sync traffic since the daemon started (``status``), if any."""
    if not t or not (t["sessions_started"] or t["sessions_served"]):
        return []
    return [f"      traffic: {t['sessions_started']} session(s) opened, {t['sessions_served']} served; "
            f"sent {t['batches_sent']} batch(es) {t['bytes_sent']} B {t['rows_sent']} row(s); "
            f"received {t['batches_received']} batch(es) {t['bytes_received']} B {t['rows_received']} row(s): "
            f"{t['rows_applied']} applied, {t['conflicts']} conflict(s), {t['failed']} failed, "
            f"{t['duplicates_received']} duplicate(s), in {t.get('commits_received', 0)} commit(s)"]


def _device_line(d: dict) -> str:
    state = "offline" if not d["online"] else "online " if d.get("connected", True) else "online (not connected: outside the active set)"
    trust = "trusted" if d["trusted"] else "PENDING"
    line = f"{d['device_id']}  {state}  {trust}  {d['security_level'] or '--'}  {d['name'] or '?'}  {', '.join(d['addresses'])}"
    for m in d.get("schema_mismatches", []):
        line += (f"\n      schema of {m['store']}.{m['table']}: version {m['version']} here, {m['peer_version']} there; "
                 + (f"syncing {', '.join(m['synced_columns'])}" if m["synced_columns"] else "NOT syncing (no common columns or conflict column differs)"))
    for m in d.get("policy_mismatches", []):
        line += f"\n      conflict policy of {m['store']}.{m['table']} differs: {m['policy']} here, {m['peer_policy']} there"
    for e in d.get("evolutions", []):
        line += f"\n      evolutions of {e['store']}: revision {e['revision']} here, {e['peer_revision']} there: {_REVISION_STATE[e['state']]}"
    return line


#: How ``devices`` words a peer's evolutions against ours (``evolutions.compare``).
_REVISION_STATE = {"same": "same", "behind": "it is behind", "ahead": "it is ahead",
                   "diverged": "DIVERGED (the same revision differs; compare the scripts)"}


def run_devices(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        devices = await client.call("devices.list")
        lines = [line for d in devices for line in (_device_line(d), *_lag_lines(d.get("stores", [])))]
        emit(args, devices, "\n".join(lines) or "no devices known yet")
        return EXIT_OK

    return with_client(args, go)


def run_trust(args: argparse.Namespace) -> int:
    if len(args.device_ids) > 1 and args.name:
        args.usage_error("--name applies to one DEVICE_ID only")  # exits 2

    async def go(client: Client) -> int:
        if len(args.device_ids) > 1:
            result = await client.call("devices.trust", devices=[{"device_id": d} for d in args.device_ids])
            emit(args, result, "\n".join(f"trusted {d}" for d in result["device_ids"]))
            return EXIT_OK
        params = {"device_id": args.device_ids[0]}
        if args.name:
            params["name"] = args.name
        result = await client.call("devices.trust", **params)
        emit(args, result, f"trusted {result['device_id']}")
        return EXIT_OK

    return with_client(args, go)


def run_untrust(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        result = await client.call("devices.untrust", device_id=args.device_id)
        emit(args, result, f"untrusted {result['device_id']}")
        return EXIT_OK

    return with_client(args, go)
