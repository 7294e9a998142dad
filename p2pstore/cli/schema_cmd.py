"""``p2pstore schema validate FILE``: check a sync_schema.json before using it.

The file's text is sent to the daemon (``schema.validate``), so with
``--store`` it is also checked against that store's live tables (layer 2)
and the version the store accepted (layer 3). When no daemon is running and
no ``--store`` was given, the file is checked here instead, with the same
function the daemon uses without a store (layer 1 plus the rules that need
only the document), so authors can check files offline.

Exit status: 0 valid (warnings allowed), 1 invalid or the file (or the
daemon, with ``--store``) can't be used, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from p2pstore.cli.common import EXIT_ERROR, EXIT_OK, fail
from p2pstore.client import Client
from p2pstore.errors import DaemonNotRunning
from p2pstore.schema.sync_schema import MAX_DOCUMENT_BYTES, validate_document


def add_parsers(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("schema", help="sync_schema.json tools",
                       description="Tools for sync_schema.json, the file that configures single_version tables "
                                   "(docs/sync_schema.md).")
    schema_sub = p.add_subparsers(dest="schema_command", metavar="SUBCOMMAND")
    v = schema_sub.add_parser(
        "validate", parents=[parent], help="check a sync_schema.json file",
        description="Check FILE and list every problem as `path  rule  message` (path is a JSON pointer into the file). "
                    "The daemon does the checking; with --store it also checks the file against that store's tables and "
                    "the schema version the store accepted. Without a running daemon (and without --store) the file is "
                    "checked on its own. Exit status: 0 valid, 1 invalid or unreadable, 2 bad usage.",
    )
    v.add_argument("file", metavar="FILE", type=Path, help="the sync_schema.json to check")
    v.add_argument("--store", metavar="S", default=None,
                   help="also check against this store's live tables and accepted version (needs the daemon)")
    v.add_argument("--bundle", metavar="B", default=None,
                   help="the store's bundle (default: default); without --store, only check this bundle's entries")
    v.set_defaults(run=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    try:
        raw = _read(args.file)
    except OSError as exc:
        return fail(f"cannot read {args.file}: {exc.strerror or exc}")
    try:
        # JSON-RPC carries text, not bytes: a file that isn't UTF-8 is invalid
        # JSON anyway, so it is judged here, with the daemon's own parser.
        text: str | None = raw.decode("utf-8-sig") if len(raw) <= MAX_DOCUMENT_BYTES else None
    except UnicodeDecodeError:
        text = None
    report: dict[str, Any] | None = None
    if text is not None:
        try:
            report = asyncio.run(_ask_daemon(args, text))
        except DaemonNotRunning:
            if args.store is not None:
                raise
    if report is None:
        report = validate_document(raw if text is None else text, bundle=args.bundle, document_rules=True).to_dict()
        if text is not None:
            print(f"p2pstore: no daemon running; checked {args.file} on its own (shape and document rules only)",
                  file=sys.stderr)
    _print(args, report)
    return EXIT_OK if report["valid"] else EXIT_ERROR


def _read(path: Path) -> bytes:
    """At most one byte over the size limit: enough to report "too large"."""
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory")
    with path.open("rb") as fh:
        return fh.read(MAX_DOCUMENT_BYTES + 1)


async def _ask_daemon(args: argparse.Namespace, text: str) -> dict[str, Any]:
    async with Client(args.socket) as client:
        params: dict[str, Any] = {"document": text}
        if args.store is not None:
            bundle = args.bundle or "default"
            await client.call("store.open", store=args.store, bundle=bundle)
            params.update(store=args.store, bundle=bundle)
        elif args.bundle is not None:
            params["bundle"] = args.bundle
        result: dict[str, Any] = await client.call("schema.validate", **params)
        return result


def _print(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return
    errors, warnings = report["errors"], report["warnings"]
    verdict = "valid" if report["valid"] else "invalid"
    counts = ", ".join(
        part for part in (_plural(len(errors), "error"), _plural(len(warnings), "warning")) if part
    )
    print(f"{args.file}: {verdict}" + (f" ({counts})" if counts else ""))
    rows = [("error", i) for i in errors] + [("warning", i) for i in warnings]
    if not rows:
        return
    width = max(len(i["path"] or "(document)") for _, i in rows)
    rule_width = max(len(i["rule"]) for _, i in rows)
    for kind, issue in rows:
        print(f"{kind:<8} {issue['path'] or '(document)':<{width}}  {issue['rule']:<{rule_width}}  {issue['message']}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}" if n else ""
