"""Device commands: ``id``, ``status``."""

from __future__ import annotations

import argparse

from p2pstore.cli.common import EXIT_OK, emit, with_client
from p2pstore.client import Client


def add_parsers(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("id", parents=[parent], help="print this device's ID",
                       description="Print the device ID of the daemon on --socket (give it to peers so they can trust you).")
    p.set_defaults(run=run_id)
    p = sub.add_parser("status", parents=[parent], help="show the daemon, its stores and peers",
                       description="Show this device (ID, name, security level, port), uptime and open stores.")
    p.set_defaults(run=run_status)


def run_id(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        info = await client.call("device.info")
        emit(args, info, info["device_id"])
        return EXIT_OK

    return with_client(args, go)


def run_status(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        st = await client.call("status")
        d = st["device"]
        lines = [
            f"device   {d['name']}  {d['device_id']}",
            f"level    {d['security_level']}   port {d['port']}   version {d['version']}   up {st['uptime_s']}s",
            f"stores   {len(st['stores'])} open",
        ]
        for s in st["stores"]:
            tables = ", ".join(s["distributed_tables"]) or "-"
            lines.append(f"  {s['bundle']}/{s['store']}  {s['security_level']}  {s['table_type'] or 'no distributed tables'}: {tables}")
        emit(args, st, "\n".join(lines))
        return EXIT_OK

    return with_client(args, go)
