"""``p2pstore daemon``: run the daemon in the foreground (systemd runs this)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from p2pstore.cli.common import EXIT_OK
from p2pstore.config import build_config, default_config_file


def add_parser(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "daemon", help="run the p2pstore daemon in the foreground",
        description="Run the daemon: serves the local API on a Unix socket, finds peers with mDNS and syncs with trusted devices. "
                    "Flags override the config file (TOML, see docs/config.md). Stop it with SIGTERM or Ctrl-C.",
    )
    p.add_argument("--socket", metavar="PATH", default=None, help="API socket path (env P2PSTORE_SOCKET)")
    p.add_argument("--config", metavar="FILE", type=Path,
                   help="TOML config file (default: $CONFIGURATION_DIRECTORY/config.toml if it exists, i.e. "
                        "/etc/p2pstore/config.toml under the systemd unit; else none)")
    p.add_argument("--data-dir", metavar="DIR", help="where stores, identity and trust list live")
    p.add_argument("--port", type=int, metavar="N", help="TCP port for peer channels (0 = any free port; default 7400)")
    p.add_argument("--name", help="device name shown to peers (default: host name)")
    p.add_argument("--interface", action="append", metavar="IP", dest="interfaces", help="IPv4 address to announce and listen on (repeatable; default all)")
    p.add_argument("--peer", action="append", metavar="HOST:PORT", dest="peers", help="static peer to dial (repeatable; works without mDNS)")
    p.add_argument("--no-discovery", action="store_const", const=False, dest="discovery", help="do not use mDNS (static peers only)")
    p.add_argument("--security-level", choices=["S1", "S2", "S3", "S4"], help="this device's security level (default S1)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log verbosity on stderr (default info)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so client-only commands start fast.
    from p2pstore.daemon import Daemon, setup_logging, tune_gc

    config_file = args.config if args.config is not None else default_config_file()
    config = build_config(config_file, {
        "socket": args.socket, "data_dir": args.data_dir, "port": args.port, "name": args.name,
        "interfaces": args.interfaces, "peers": args.peers, "discovery": args.discovery,
        "security_level": args.security_level, "log_level": args.log_level,
    })
    setup_logging(config.log_level)
    logging.getLogger("p2pstore.daemon").info("config: %s", config_file or "no config file (defaults and flags)")
    tune_gc()
    asyncio.run(Daemon(config).run())
    return EXIT_OK
