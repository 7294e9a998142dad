"""Single-version tables: the accepted sync_schema.json entry, kept in the store.

A single_version store syncs by the entry of sync_schema.json that was last
*accepted* for it (``(bundleName, dbName)`` = the store's ``(bundle, name)``).
The file is only a proposal: the daemon reads it on
``set_distributed_tables`` and on SIGHUP, checks it in three layers
(``p2pstore.schema.sync_schema``) plus the data rule that no conflict column
holds NULL, and only then copies it into the store.

Invariants:

- The accepted db entry lives in ``_p2p_meta['sync_schema']`` (JSON); per
  distributed table, its sync columns (in ``deviceSyncFields`` order) and its
  conflict column live in ``_p2p_sync_columns``, where the sync engine reads
  them. Both change only inside the transaction that accepts a new entry,
  after every check passed; a refused entry changes nothing, so the store
  keeps syncing with the version it had.
- Every single_version distributed table has two guard triggers that refuse
  NULL in its conflict column, for every writer (API, ``sqlite3`` shell,
  peers). They are (re)created on every acceptance and at open.
- When an accepted upgrade adds sync columns to a captured table, every
  existing row of that table is logged again as an update (all columns) in
  the same transaction, so peers receive the new columns' values. Those log
  entries are stamped but never announced as local changes.
- Reading the schema file happens here and nowhere else; collaborative
  stores never get here, so they never read it.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pstore.errors import P2PStoreError, SchemaInvalid, SchemaNotFound
from p2pstore.schema.predicates import quote_ident
from p2pstore.schema.shape import read_table_shape
from p2pstore.schema.sync_schema import (
    MAX_DOCUMENT_BYTES,
    RULES,
    SchemaIssue,
    TableShape,
    ValidationReport,
    conflict_column,
    conflict_column_nulls,
    find_db_entry,
    invalid_json_report,
    parse_document,
    read_document,
    sync_columns,
    validate,
)
from p2pstore.store import capture, cells
from p2pstore.store.tables import read_table_info
from p2pstore.protocol.table_type import TableType

if TYPE_CHECKING:  # database.py imports this module; only annotations go the other way
    from p2pstore.store.database import Store

log = logging.getLogger(__name__)

#: ``_p2p_meta`` key of the accepted db entry (JSON text).
META_KEY = "sync_schema"

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS _p2p_sync_columns(
    tbl TEXT NOT NULL,
    col TEXT NOT NULL,
    pos INTEGER NOT NULL,               -- position in deviceSyncFields
    conflict INTEGER NOT NULL DEFAULT 0, -- 1 for the table's conflict column
    PRIMARY KEY (tbl, col)
) WITHOUT ROWID;
-- Cells of columns this device does not sync (yet), sent by a peer on a
-- newer sync_schema.json: kept, the newest per cell, until an accepted
-- upgrade adds the column here and merges them under their own clocks
-- (store/cells.py park / unpark). origin: a device ID.
CREATE TABLE IF NOT EXISTS _p2p_parked(
    tid INTEGER NOT NULL, ck NOT NULL, col TEXT NOT NULL, value,
    hlc INTEGER NOT NULL, origin TEXT NOT NULL, prev_hlc INTEGER, prev_origin TEXT,
    PRIMARY KEY (tid, ck, col)
) WITHOUT ROWID;
"""


# --------------------------------------------------------------------------
# What the store holds


@dataclass(frozen=True, slots=True)
class SyncColumns:
    """What travels for one single_version table, and what identifies a row."""

    table: str
    columns: tuple[str, ...]
    conflict: str


@dataclass(frozen=True, slots=True)
class AcceptedSchema:
    """The db entry this store syncs by, as read back from the store."""

    entry: Mapping[str, Any]
    tables: Mapping[str, SyncColumns] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return int(self.entry["version"])


@dataclass(frozen=True, slots=True)
class SchemaOutcome:
    """What accepting a schema did: the result of ``set_distributed_tables``
    for single_version tables, and what SIGHUP logs."""

    version: int
    previous_version: int | None
    changed: bool  # a different entry was stored
    warnings: tuple[SchemaIssue, ...] = ()
    resent: Mapping[str, int] = field(default_factory=dict)  # table -> rows marked to be sent again

    def to_result(self) -> dict[str, Any]:
        return {
            "schema_version": self.version,
            "warnings": [w.to_dict() for w in self.warnings],
            "resent": dict(self.resent),
        }


def load_accepted(conn: sqlite3.Connection) -> AcceptedSchema | None:
    """The accepted entry and per-table sync columns, or None if there is none.

    A damaged meta value reads as None (and is then reported by the open
    check) rather than making the store unopenable.
    """
    text = capture.get_meta(conn, META_KEY)
    if text is None:
        return None
    try:
        entry = json.loads(text)
    except (TypeError, ValueError):
        log.error("the accepted sync_schema entry stored in _p2p_meta is not JSON; ignoring it")
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("version"), int):
        log.error("the accepted sync_schema entry stored in _p2p_meta is damaged; ignoring it")
        return None
    columns: dict[str, list[str]] = {}
    conflicts: dict[str, str] = {}
    for tbl, col, is_conflict in conn.execute("SELECT tbl, col, conflict FROM _p2p_sync_columns ORDER BY tbl, pos"):
        columns.setdefault(tbl, []).append(col)
        if is_conflict:
            conflicts[tbl] = col
    tables = {t: SyncColumns(t, tuple(cols), conflicts.get(t, "")) for t, cols in columns.items()}
    return AcceptedSchema(entry, tables)


# --------------------------------------------------------------------------
# The file


def read_schema_file(path: Path) -> object:
    """Read and parse sync_schema.json at ``path``.

    Raises ``SchemaNotFound`` naming the path when there is no (regular,
    readable) file, and ``SchemaInvalid`` with ``data.errors`` (rule
    ``invalid-json``) when it isn't JSON. The file is opened non-blocking
    and checked to be a regular file before a byte is read, so a FIFO or
    device put there can't block the caller; at most
    ``MAX_DOCUMENT_BYTES + 1`` bytes are read, enough for the size check.
    """
    where = {"file": str(path)}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SchemaNotFound(
            f"no sync_schema.json at {path}: single_version tables need one (see docs/sync_schema.md)", data=where
        ) from None
    except OSError as exc:
        raise SchemaNotFound(f"cannot read sync_schema.json at {path}: {exc.strerror}", data=where) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SchemaNotFound(f"sync_schema.json at {path} is not a regular file", data=where)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise SchemaNotFound(f"cannot read sync_schema.json at {path}: {exc.strerror}", data=where) from exc
    finally:
        os.close(fd)
    try:
        return parse_document(raw)
    except SchemaInvalid as exc:
        report = invalid_json_report(exc)
        raise SchemaInvalid(
            f"{path}: {exc.message}", data={**exc.data, **where, **report.to_dict()}
        ) from exc


# --------------------------------------------------------------------------
# Checks (read only)


def _shapes(conn: sqlite3.Connection, tables: Iterable[str], required: Sequence[str] = ()) -> dict[str, TableShape | None]:
    """Live shapes of ``tables``. A table that doesn't exist is left out,
    unless it is ``required`` (then None: validate reports table-not-found)."""
    shapes: dict[str, TableShape | None] = {}
    for name in tables:
        shape = read_table_shape(conn, name)
        if shape is not None or name in required:
            shapes[name] = shape
    return shapes


def _passed_layer_1(report: ValidationReport) -> bool:
    return not any(RULES.get(issue.rule, "").startswith("layer 1") for issue in report.errors)


def _table_entries(doc: object, bundle: str, name: str) -> tuple[int, list[tuple[int, Mapping[str, Any]]]] | None:
    """``(db index, [(table index, table entry)])`` of the store's entry, read
    defensively (the document may have failed layer 1)."""
    found = find_db_entry(doc, bundle, name) if isinstance(doc, dict) else None
    if found is None:
        return None
    i, db = found
    tables = db.get("tables")
    if not isinstance(tables, list):
        return i, []
    return i, [(j, t) for j, t in enumerate(tables) if isinstance(t, dict) and isinstance(t.get("tableName"), str)]


def check(
    conn: sqlite3.Connection,
    doc: object,
    *,
    bundle: str,
    name: str,
    tables: Sequence[str],
    shapes: Mapping[str, TableShape | None],
    previous: Mapping[str, Any] | None,
    document_rules: bool = False,
) -> ValidationReport:
    """Layers 1-3 for the store's entry, then the data rule: no row may hold
    NULL in a checked table's conflict column (counted only for documents
    that passed layer 1, whose conflict column exists in the table)."""
    report = validate(
        doc, shapes=shapes, previous=previous, bundle=bundle, db_name=name, tables=tables, document_rules=document_rules
    )
    if not _passed_layer_1(report):
        return report
    located = _table_entries(doc, bundle, name)
    if located is None:
        return report
    i, entries = located
    nulls: list[SchemaIssue] = []
    seen: set[str] = set()
    for j, entry in entries:
        table = entry["tableName"]
        shape = shapes.get(table)
        column = conflict_column(entry)
        if table in seen or shape is None or column is None or shape.column(column) is None:
            continue
        seen.add(table)
        count = conn.execute(f"SELECT count(*) FROM {quote_ident(table)} WHERE {quote_ident(column)} IS NULL").fetchone()[0]
        issue = conflict_column_nulls(entry, f"/dbSchema/{i}/tables/{j}", count)
        if issue is not None:
            nulls.append(issue)
    if not nulls:
        return report
    return ValidationReport(report.errors + tuple(nulls), report.warnings, report.added_sync_columns)


def check_document(
    conn: sqlite3.Connection, document: object, *, bundle: str, name: str, single_version_tables: Sequence[str]
) -> ValidationReport:
    """``schema.validate`` with a store: ``document`` (text or JSON values)
    against the store's live tables and its accepted version. Never raises
    for a bad document.

    Layer 2 covers every table of the store's entry that exists in the store
    and every table the store already syncs as single_version (one missing
    from the entry or the database is an error); tables of the entry that
    the store doesn't have yet get the document-only rules.
    """
    try:
        doc = read_document(document)
    except SchemaInvalid as exc:
        return invalid_json_report(exc)
    located = _table_entries(doc, bundle, name)
    names = list(dict.fromkeys([*(e["tableName"] for _, e in (located[1] if located else [])), *single_version_tables]))
    accepted = load_accepted(conn)
    return check(
        conn,
        doc,
        bundle=bundle,
        name=name,
        tables=names,
        shapes=_shapes(conn, names, required=single_version_tables),
        previous=accepted.entry if accepted is not None else None,
        document_rules=True,
    )


# --------------------------------------------------------------------------
# Accepting (inside the caller's write transaction)


def accept(conn: sqlite3.Connection, doc: object, *, bundle: str, name: str, tables: Sequence[str]) -> SchemaOutcome:
    """Check ``doc`` for the store's single_version ``tables`` and, if it
    passes, make its entry the accepted one.

    Raises ``SchemaInvalid`` (``data.errors``, ``data.warnings``) without
    writing anything. Must run inside the caller's write transaction, which
    must stamp the log afterwards (``collect=False``): rows marked to be sent
    again are in the log but not yet stamped when this returns.
    """
    previous = load_accepted(conn)
    report = check(
        conn,
        doc,
        bundle=bundle,
        name=name,
        tables=tables,
        shapes=_shapes(conn, tables, required=tables),
        previous=previous.entry if previous is not None else None,
    )
    report.raise_if_invalid()
    assert isinstance(doc, dict)  # layer 1 passed
    found = find_db_entry(doc, bundle, name)
    assert found is not None  # validate reported db-not-in-schema otherwise
    entry = found[1]
    by_name = {t["tableName"]: t for t in reversed(entry["tables"])}

    text = json.dumps(entry, sort_keys=True, ensure_ascii=False)
    changed = capture.get_meta(conn, META_KEY) != text
    if changed:
        capture.set_meta(conn, META_KEY, text)

    for table in tables:
        columns = tuple(sync_columns(by_name[table]))
        row = conn.execute("SELECT tid FROM _p2p_tables WHERE name = ? AND kind = 'local'", (table,)).fetchone()
        if row is not None and _columns(conn, table) != columns:
            # A row's shared clock covers the sync columns it was written for: pin them first (store/cells.py).
            cells.explode(conn, cells.RowKeys.read(conn, row[0]))
    conn.execute("DELETE FROM _p2p_sync_columns")
    for table in tables:
        table_entry = by_name[table]  # validate reported table-not-in-schema otherwise
        conflict = conflict_column(table_entry)
        assert conflict is not None  # validate reported conflict-column-missing/-multiple otherwise
        conn.executemany(
            "INSERT INTO _p2p_sync_columns(tbl, col, pos, conflict) VALUES (?, ?, ?, ?)",
            [(table, col, pos, int(col == conflict)) for pos, col in enumerate(sync_columns(table_entry))],
        )
        _guard_conflict_column(conn, table, conflict)

    resent: dict[str, int] = {}
    for table, added in report.added_sync_columns.items():
        if not added:
            continue
        row = conn.execute("SELECT tid FROM _p2p_tables WHERE name = ? AND kind = 'local'", (table,)).fetchone()
        if row is not None:  # a table registered later logs its rows as inserts anyway
            info = read_table_info(conn, table)
            cells.unpark(conn, row[0], table, conflict_column(by_name[table]), info.key_expr, added,
                         capture.device_id, capture.OP_UPDATE)
            resent[table] = capture.log_all_rows_again(conn, row[0], info, added)

    return SchemaOutcome(
        version=int(entry["version"]),
        previous_version=previous.version if previous is not None else None,
        changed=changed,
        warnings=report.warnings,
        resent=resent,
    )


def _columns(conn: sqlite3.Connection, table: str) -> tuple[str, ...]:
    return tuple(r[0] for r in conn.execute("SELECT col FROM _p2p_sync_columns WHERE tbl = ? ORDER BY pos", (table,)))


def _guard_conflict_column(conn: sqlite3.Connection, table: str, column: str) -> None:
    for trigger in capture.not_null_trigger_names(table):
        conn.execute(f"DROP TRIGGER IF EXISTS {quote_ident(trigger)}")
    for sql in capture.not_null_triggers_sql(table, column):
        conn.execute(sql)


def recheck(conn: sqlite3.Connection, *, label: str, bundle: str, name: str, tables: Sequence[str]) -> tuple[SchemaIssue, ...]:
    """At open: the live single_version ``tables`` against the accepted entry
    (no file is read), and the NULL guards put back if something dropped
    them. Returns the problems found, each also logged: the table may have
    been altered by another program while the daemon was away.
    """
    accepted = load_accepted(conn)
    if accepted is None:
        log.warning(
            "store %s: has single_version tables but no accepted sync_schema entry; "
            "call set_distributed_tables again or send SIGHUP to load sync_schema.json", label
        )
        return ()
    for table in tables:
        sync = accepted.tables.get(table)
        if sync is not None and sync.conflict and read_table_shape(conn, table) is not None:
            try:
                for sql in capture.not_null_triggers_sql(table, sync.conflict):
                    conn.execute(sql)
            except sqlite3.OperationalError as exc:  # the column itself is gone; reported below
                log.debug("store %s: could not guard %s.%s: %s", label, table, sync.conflict, exc)
    report = check(
        conn,
        {"dbSchema": [dict(accepted.entry)]},
        bundle=bundle,
        name=name,
        tables=tables,
        shapes=_shapes(conn, tables, required=tables),
        previous=None,
    )
    for issue in report.errors:
        log.warning(
            "store %s: live table no longer matches accepted schema version %d: %s at %s: %s",
            label, accepted.version, issue.rule, issue.path, issue.message,
        )
    return report.errors


# --------------------------------------------------------------------------
# The two ways a schema is applied, with their logging


class SchemaFileCheck:
    """The ``validate`` hook of ``Store.set_distributed_tables`` for
    single_version tables: reads the file then (after the store's table type
    was checked, so a mismatch is reported as such rather than as a missing
    file) and accepts it for the store's tables plus the requested ones."""

    def __init__(self, path: Path, bundle: str, name: str) -> None:
        self.path = path
        self.bundle = bundle
        self.name = name

    def __call__(self, conn: sqlite3.Connection, infos: Sequence[Any]) -> SchemaOutcome:
        doc = read_schema_file(self.path)
        registered = [r[0] for r in conn.execute("SELECT name FROM _p2p_tables WHERE kind = 'local' ORDER BY tid")]
        tables = list(dict.fromkeys([*registered, *(info.name for info in infos)]))
        return accept(conn, doc, bundle=self.bundle, name=self.name, tables=tables)


async def set_tables(store: Store, tables: list[str], *, auto_sync: bool, schema_path: Path) -> SchemaOutcome:
    """``set_distributed_tables`` for single_version tables, logged."""
    kept = store.sync_schema_version
    try:
        outcome = await store.set_distributed_tables(
            tables,
            table_type=TableType.SINGLE_VERSION,
            auto_sync=auto_sync,
            validate=SchemaFileCheck(schema_path, store.bundle, store.name),
        )
    except (SchemaInvalid, SchemaNotFound) as exc:
        log_refused(store_label(store), exc, kept)
        raise
    log_accepted(store_label(store), outcome)
    return outcome


async def reload(store: Store, doc: object) -> SchemaOutcome | None:
    """Apply a freshly read document to one store (SIGHUP). A refusal is
    logged and returns None; the store keeps its accepted version."""
    kept = store.sync_schema_version
    try:
        outcome = await store.reload_sync_schema(doc)
    except P2PStoreError as exc:
        log_refused(store_label(store), exc, kept)
        return None
    log_accepted(store_label(store), outcome)
    return outcome


def store_label(store: Store) -> str:
    return f"{store.bundle}/{store.name}"


def log_accepted(label: str, outcome: SchemaOutcome) -> None:
    if outcome.changed and outcome.previous_version is not None:
        note = f" (was version {outcome.previous_version})"
    elif outcome.changed:
        note = ""
    else:
        note = " (unchanged)"
    log.info("store %s: schema version %d accepted%s", label, outcome.version, note)
    for table, rows in outcome.resent.items():
        log.info("store %s: sync columns added to %s: %d existing row(s) marked to be sent again", label, table, rows)
    for issue in outcome.warnings:
        log.warning("store %s: schema warning: %s at %s: %s", label, issue.rule, issue.path, issue.message)


def log_refused(label: str, exc: P2PStoreError, kept: int | None) -> None:
    keeping = f"keeping version {kept}" if kept is not None else "no schema accepted yet"
    errors = exc.data.get("errors") if isinstance(exc, SchemaInvalid) else None
    if not errors:
        log.warning("store %s: schema refused: %s; %s", label, exc.message.rstrip("."), keeping)
        return
    first, rest = errors[0], errors[1:]
    more = f" (and {len(rest)} more)" if rest else ""
    log.warning(
        "store %s: schema refused: %s at %s: %s%s; %s",
        label, first["rule"], first["path"] or "(document)", first["message"].rstrip("."), more, keeping,
    )
    for issue in rest:
        log.warning("store %s: schema refused, also: %s at %s: %s", label, issue["rule"], issue["path"] or "(document)", issue["message"])
