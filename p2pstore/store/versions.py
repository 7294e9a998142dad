"""Versions: the schema a store had after each applied evolution or accepted sync_schema.json.

Seed 000 asks to "compare database versions": which tables and columns came
or went between two points of a store's life, and what a peer syncs that we
do not. A *version* is recorded when an evolution applies (or is marked
applied) and when a single_version store accepts a sync_schema.json entry,
in the same transaction, and only if the store's shape moved since the last
one (the same evolution applied again, or the same entry accepted again, is
not a new version). Each holds:

- ``schema_sql``: the ``CREATE`` statements of the application's tables,
  indexes, views and triggers (not ``_p2p_*`` ones, not device tables), for
  people to read;
- ``shape``: each of those tables' columns and declared types, which is
  what ``diff`` compares (no SQL parsing);
- ``sync``: the distributed tables with their sync columns and conflict
  column (the sync schema as this device applies it);
- ``hash``: SHA-1 of the shape and sync (JSON, sorted keys), so equal
  schemas have equal hashes whatever the order they were made in.

``diff`` is pure: two (shape, sync) pairs in, the differences out. A peer's
offer has no column types, so a diff against a device compares ``sync``
only (``diff_sync``).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from p2pstore.schema.predicates import quote_ident
from p2pstore.store import changes

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS _p2p_versions(
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,            -- unix ms
    kind TEXT NOT NULL,             -- evolution or sync_schema
    ref INTEGER,                    -- the evolution's revision, or the sync_schema.json version
    description TEXT NOT NULL,
    hash TEXT NOT NULL,             -- SHA-1 of shape and sync (JSON, sorted keys)
    schema_sql TEXT NOT NULL,       -- the application's CREATE statements
    shape TEXT NOT NULL,            -- JSON {table: [[column, declared type], ...]}
    sync TEXT NOT NULL              -- JSON {table: {"sync_columns": [...], "conflict_column": ...}}
);
"""

Shape = Mapping[str, Sequence[Sequence[str]]]
Sync = Mapping[str, Mapping[str, Any]]


def _app_objects(conn: sqlite3.Connection) -> list[tuple[str, str, str | None]]:
    """(type, name, sql) of the application's schema objects, in a stable order."""
    devices = {r[0] for r in conn.execute("SELECT name FROM _p2p_tables WHERE kind = 'device'")}
    return [(t, n, sql) for t, n, tbl, sql in conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
        "AND tbl_name NOT LIKE '\\_p2p\\_%' ESCAPE '\\' ORDER BY type = 'table' DESC, name")
            if tbl not in devices]


def current(conn: sqlite3.Connection) -> tuple[str, dict[str, list[list[str]]], dict[str, dict[str, Any]]]:
    """The store's schema now: (schema_sql, shape, sync)."""
    objects = _app_objects(conn)
    schema_sql = "".join(f"{sql};\n" for _t, _n, sql in objects if sql)
    shape = {name: [[r[1], r[2]] for r in conn.execute(f"PRAGMA table_info({quote_ident(name)})")]
             for kind, name, _ in objects if kind == "table"}
    sync = {t.info.name: {"sync_columns": list(t.sync_columns), "conflict_column": t.conflict_column}
            for t in changes.sync_tables(conn)}
    return schema_sql, shape, sync


def digest(shape: Shape, sync: Sync) -> str:
    return hashlib.sha1(json.dumps({"shape": shape, "sync": sync}, sort_keys=True).encode()).hexdigest()


def note(conn: sqlite3.Connection, kind: str, ref: int | None, description: str, wall_ms: int) -> int | None:
    """Record the store's schema as a version, inside the caller's
    transaction, unless it is the latest version's already; the new id or None."""
    schema_sql, shape, sync = current(conn)
    h = digest(shape, sync)
    last = conn.execute("SELECT hash FROM _p2p_versions ORDER BY id DESC LIMIT 1").fetchone()
    if last is not None and last[0] == h:
        return None
    return conn.execute(
        "INSERT INTO _p2p_versions(at, kind, ref, description, hash, schema_sql, shape, sync) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (wall_ms, kind, ref, description, h, schema_sql, json.dumps(shape), json.dumps(sync))).lastrowid


def listing(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every version, oldest first, with its schema SQL and sync schema."""
    out = []
    for vid, at, kind, ref, description, h, schema_sql, sync in conn.execute(
            "SELECT id, at, kind, ref, description, hash, schema_sql, sync FROM _p2p_versions ORDER BY id"):
        out.append({"id": vid, "at": at, "kind": kind, "ref": ref, "description": description, "hash": h,
                    "schema_sql": schema_sql, "sync": json.loads(sync)})
    return out


def load(conn: sqlite3.Connection, version: int | None) -> tuple[Shape, Sync]:
    """A version's (shape, sync); None: the store's schema now. ``KeyError`` if there is no such version."""
    if version is None:
        _sql, shape, sync = current(conn)
        return shape, sync
    row = conn.execute("SELECT shape, sync FROM _p2p_versions WHERE id = ?", (version,)).fetchone()
    if row is None:
        raise KeyError(version)
    return json.loads(row[0]), json.loads(row[1])


def diff(old_shape: Shape, old_sync: Sync, new_shape: Shape, new_sync: Sync) -> dict[str, list[Any]]:
    """What changed from the old (shape, sync) to the new: tables, columns,
    declared types, distributed tables and sync columns added or removed."""
    old_cols = {t: dict((c, ty) for c, ty in cols) for t, cols in old_shape.items()}
    new_cols = {t: dict((c, ty) for c, ty in cols) for t, cols in new_shape.items()}
    out: dict[str, list[Any]] = {
        "tables_added": sorted(new_cols.keys() - old_cols.keys()),
        "tables_removed": sorted(old_cols.keys() - new_cols.keys()),
        "columns_added": [], "columns_removed": [], "types_changed": [],
    }
    for table in sorted(old_cols.keys() & new_cols.keys()):
        before, after = old_cols[table], new_cols[table]
        out["columns_added"] += [{"table": table, "column": c, "type": after[c]} for c in after if c not in before]
        out["columns_removed"] += [{"table": table, "column": c, "type": before[c]} for c in before if c not in after]
        out["types_changed"] += [{"table": table, "column": c, "from": before[c], "to": after[c]}
                                 for c in after if c in before and before[c] != after[c]]
    return {**out, **diff_sync(old_sync, new_sync)}


def diff_sync(old: Sync, new: Sync) -> dict[str, list[Any]]:
    """Distributed tables and sync columns added or removed, and conflict columns changed."""
    out: dict[str, list[Any]] = {
        "distributed_added": sorted(new.keys() - old.keys()),
        "distributed_removed": sorted(old.keys() - new.keys()),
        "sync_columns_added": [], "sync_columns_removed": [], "conflict_column_changed": [],
    }
    for table in sorted(old.keys() & new.keys()):
        before, after = list(old[table]["sync_columns"]), list(new[table]["sync_columns"])
        out["sync_columns_added"] += [{"table": table, "column": c} for c in after if c not in before]
        out["sync_columns_removed"] += [{"table": table, "column": c} for c in before if c not in after]
        if old[table].get("conflict_column") != new[table].get("conflict_column"):
            out["conflict_column_changed"].append({"table": table, "from": old[table].get("conflict_column"),
                                                   "to": new[table].get("conflict_column")})
    return out
