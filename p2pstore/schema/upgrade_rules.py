"""Layer 3 of sync_schema.json validation: a new db entry against the
previously accepted one.

Why: peers compare versions to know which columns both sides sync; a change
without a new version would go unnoticed. A changed conflict column would
make the same row look like two rows across devices, and a removed sync
column would leave peers with values that no longer move.

Each rule is one function registered with :func:`~p2pstore.schema.rules.rule`;
:func:`check_upgrade` runs them in the order written here. Both entries have
passed layer 1 (the caller checks ``previous`` against the entry schema).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from p2pstore.schema.entry import conflict_column, field_index, fields, sync_columns, sync_list
from p2pstore.schema.rules import Finding, SchemaIssue, rule, run, show

LAYER = "layer 3"


@dataclass(frozen=True, slots=True)
class Upgrade:
    """The accepted db entry, the new one (at JSON pointer ``path``), and
    each accepted table paired with its new entry."""

    previous: Mapping[str, Any]
    current: Mapping[str, Any]
    path: str
    #: The database's name, quoted for messages.
    db: str
    #: ``(accepted table, index in the new entry or None, new table or None)``.
    tables: list[tuple[Mapping[str, Any], int | None, Mapping[str, Any] | None]]

    @classmethod
    def of(cls, previous: Mapping[str, Any], current: Mapping[str, Any], path: str) -> Upgrade:
        index = _table_index(current)
        pairs: list[tuple[Mapping[str, Any], int | None, Mapping[str, Any] | None]] = []
        for old in previous.get("tables") or []:
            if not isinstance(old, dict) or not isinstance(old.get("tableName"), str):
                continue
            j = index.get(old["tableName"])
            pairs.append((old, j, current["tables"][j] if j is not None else None))
        return cls(previous, current, path, show(current.get("dbName")), pairs)

    def items(self, each: str | None) -> Iterable[Sequence[Any]]:
        if each is None:
            return [()]
        if each == "table":
            return self.tables
        raise ValueError(f"unknown rule item {each!r}")


def _table_index(entry: Mapping[str, Any]) -> dict[str, int]:
    """Table name → index of its first entry."""
    return {t["tableName"]: j for j, t in reversed(list(enumerate(entry.get("tables") or []))) if isinstance(t, dict)}


def check_upgrade(
    previous: Mapping[str, Any], current: Mapping[str, Any], path: str
) -> tuple[list[SchemaIssue], dict[str, list[str]]]:
    """Layer 3: the new db entry ``current`` (at ``path``) against the
    previously accepted one. Returns ``(errors, added)`` where ``added`` maps
    a table to the sync columns the new version adds (a table new in this
    version lists all its sync columns), so the store can send existing rows
    again.
    """
    upgrade = Upgrade.of(previous, current, path)
    errors, _ = run(LAYER, upgrade, upgrade.items)
    return errors, _added_sync_columns(upgrade)


def _added_sync_columns(upgrade: Upgrade) -> dict[str, list[str]]:
    added: dict[str, list[str]] = {}
    for old, _, new in upgrade.tables:
        if new is not None:
            old_sync = sync_columns(old)
            more = [c for c in sync_columns(new) if c not in old_sync]
            if more:
                added[old["tableName"]] = more
    previous_names = {old["tableName"] for old, _, _ in upgrade.tables}
    for name, j in _table_index(upgrade.current).items():
        if name not in previous_names:
            cols = sync_columns(upgrade.current["tables"][j])
            if cols:
                added[name] = cols
    return added


@rule("version-not-increased", LAYER)
def version_not_increased(u: Upgrade) -> Iterator[Finding]:
    old_v, new_v = u.previous.get("version"), u.current.get("version")
    if not (isinstance(old_v, int) and isinstance(new_v, int)):
        return
    changed = _normalised(u.previous) != _normalised(u.current)
    if new_v < old_v or (changed and new_v == old_v):
        reason = "went down" if new_v < old_v else "changed"
        yield f"{u.path}/version", (
            f"The schema of database {u.db} {reason} but its version is {new_v}; "
            f"set a version higher than the accepted {old_v}."
        )


@rule("conflict-column-changed", LAYER, each="table")
def conflict_column_changed(
    u: Upgrade, old: Mapping[str, Any], j: int | None, new: Mapping[str, Any] | None
) -> Iterator[Finding]:
    if new is None:
        return  # the whole table went: sync-column-removed says so
    old_conflict, new_conflict = conflict_column(old), conflict_column(new)
    if old_conflict is not None and new_conflict != old_conflict:
        tpath = f"{u.path}/tables/{j}"
        k = field_index(new, new_conflict) if new_conflict is not None else None
        now = f"is now {show(new_conflict)}" if new_conflict is not None else "is no longer set"
        yield f"{tpath}/fields/{k}/primaryKey" if k is not None else f"{tpath}/fields", (
            f"The conflict column of table {show(old['tableName'])} was {show(old_conflict)} and {now}; "
            f"it can't change once accepted."
        )


@rule("sync-column-removed", LAYER, each="table")
def sync_column_removed(
    u: Upgrade, old: Mapping[str, Any], j: int | None, new: Mapping[str, Any] | None
) -> Iterator[Finding]:
    name, old_sync = old["tableName"], sync_columns(old)
    if new is None:
        if old_sync:
            yield f"{u.path}/tables", (
                f"Table {show(name)} was removed from database {u.db}, which removes its sync columns "
                f"{', '.join(old_sync)}; sync columns can only be added."
            )
        return
    tpath = f"{u.path}/tables/{j}"
    sync_path = f"{tpath}/deviceSyncFields" if "deviceSyncFields" in new else tpath
    new_sync = sync_columns(new)
    for col in old_sync:
        if col not in new_sync:
            yield sync_path, f"Sync column {show(col)} of table {show(name)} was removed; sync columns can only be added."


def database_removed(previous: Mapping[str, Any]) -> SchemaIssue | None:
    """``sync-column-removed`` for an accepted db entry that the new
    document no longer has at all (``validate`` finds that out; there is no
    new entry to pair tables with)."""
    removed = [c for t in previous["tables"] for c in sync_columns(t)]
    if not removed:
        return None
    return SchemaIssue(
        "/dbSchema",
        "sync-column-removed",
        f"Database {show(previous['dbName'])} of bundle {show(previous['bundleName'])} is no "
        f"longer in sync_schema.json, which removes all its sync columns; sync columns can only be added.",
    )


def _normalised(entry: Mapping[str, Any]) -> str:
    """A db entry as canonical JSON minus its version: defaults filled in,
    and order ignored where order means nothing (tables, fields, sync
    columns), so reformatting the file is not a change."""
    tables = []
    for table in entry.get("tables") or []:
        if not isinstance(table, dict):
            continue
        described = sorted(
            (
                {
                    "columnName": f["columnName"],
                    "type": f.get("type"),
                    "primaryKey": f.get("primaryKey") is True,
                    "autoIncrement": f.get("autoIncrement") is True,
                    "notNull": f.get("notNull") is True,
                }
                for _, f in fields(table)
            ),
            key=lambda f: f["columnName"],
        )
        sync = sorted(c for c in (sync_list(table) or []) if isinstance(c, str))
        tables.append({"tableName": table.get("tableName"), "deviceSyncFields": sync, "fields": described})
    tables.sort(key=lambda t: str(t["tableName"]))
    body = {"bundleName": entry.get("bundleName"), "dbName": entry.get("dbName"), "tables": tables}
    return json.dumps(body, sort_keys=True, ensure_ascii=False)


