"""Change capture: every change of a distributed table reaches the change log.

Invariants:
- ``_p2p_log`` is append-only and ``seq`` only grows. Compaction (a later
  concern) never removes the highest ``seq``, so sequence numbers are never
  reused. A change's position in the log is its local order.
- Capture is plain SQL, so writes by *any* process (the ``sqlite3`` shell, a
  second program) are captured, not only the daemon's:
  * UPDATE and DELETE triggers log every row they touch.
  * Appended rows (rowid above the table's high-water mark ``hw``) are logged
    by the daemon in one ``INSERT ... SELECT`` when it stamps; the INSERT
    trigger fires only for rows at or below ``hw`` (an explicit low rowid), so
    nothing slips through. A bulk insert thus pays one skipped trigger per row
    instead of one log insert (see scripts/bench, "capture").
  * Tables without a rowid log every insert from the trigger.
- The clock value and origin of local changes are assigned in ranges: one
  ``_p2p_stamps`` row says "seq first..last got hlc base..base+n, origin this
  device". The view ``_p2p_changes`` resolves each change's hlc and origin;
  rows applied from peers carry their own hlc/origin in the log instead.
- While the daemon applies a peer's changes it puts a row in ``_p2p_apply``
  inside its own transaction. Triggers skip those writes (no echo) and the
  guards on collaborative device tables let them through. No other
  connection can see that uncommitted row, so outside writers never pass.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any

from p2pstore.clock import HybridClock
from p2pstore.schema.predicates import quote_ident
from p2pstore.store.tables import TableInfo

OP_INSERT, OP_UPDATE, OP_DELETE = 1, 2, 3
OP_NAMES = {OP_INSERT: "inserted", OP_UPDATE: "updated", OP_DELETE: "deleted"}
#: Column masks are one signed 64-bit integer; wider tables record NULL (all).
MAX_MASK_COLUMNS = 62

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS _p2p_meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _p2p_tables(
    tid INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,                 -- 'local' (captured) or 'device' (a peer's rows)
    origin TEXT,                        -- device ID for kind 'device'
    source TEXT,                        -- table name on the origin for kind 'device'
    auto_sync INTEGER NOT NULL DEFAULT 0
);
-- Rowid high-water mark of each captured rowid table (read by its INSERT trigger,
-- so it lives in a table of its own: the smallest b-tree to look up per row).
CREATE TABLE IF NOT EXISTS _p2p_hw(tid INTEGER PRIMARY KEY, hw INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS _p2p_log(
    seq INTEGER PRIMARY KEY,
    tid INTEGER NOT NULL,
    pk,
    op INTEGER NOT NULL,
    cols INTEGER,                       -- bit i = column i changed (updates); NULL = all
    hlc INTEGER,                        -- NULL: see _p2p_stamps
    origin TEXT                         -- NULL: this device
);
CREATE TABLE IF NOT EXISTS _p2p_stamps(
    first_seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    base_hlc INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS _p2p_apply(x);
CREATE VIEW IF NOT EXISTS _p2p_changes AS
SELECT l.seq, l.tid, t.name AS tbl, l.pk, l.op, l.cols,
       coalesce(l.hlc, (SELECT s.base_hlc + l.seq - s.first_seq FROM _p2p_stamps s
                        WHERE s.first_seq <= l.seq ORDER BY s.first_seq DESC LIMIT 1)) AS hlc,
       l.origin
FROM _p2p_log l JOIN _p2p_tables t ON t.tid = l.tid;
"""


def trigger_names(table: str) -> list[str]:
    return [f"_p2p_{kind}_{table}" for kind in ("ins", "upd", "del")]


def capture_triggers_sql(tid: int, info: TableInfo, has_rowid: bool = True) -> list[str]:
    """SQL creating the three capture triggers of one table."""
    t = quote_ident(info.name)
    key = info.key_expr
    ins, upd, dele = (quote_ident(n) for n in trigger_names(info.name))
    guard = "NOT EXISTS (SELECT 1 FROM _p2p_apply)"
    ins_when = f"NEW.rowid <= (SELECT hw FROM _p2p_hw WHERE tid = {tid}) AND {guard}" if has_rowid else guard
    if len(info.columns) <= MAX_MASK_COLUMNS:
        mask = " | ".join(
            f"((OLD.{quote_ident(c)} IS NOT NEW.{quote_ident(c)}) << {i})" for i, c in enumerate(info.columns)
        )
    else:
        mask = "NULL"
    return [
        f"CREATE TRIGGER IF NOT EXISTS {ins} AFTER INSERT ON {t} WHEN {ins_when} BEGIN "
        f"INSERT INTO _p2p_log(tid, pk, op) VALUES ({tid}, NEW.{key}, {OP_INSERT}); END",
        # A key change is a delete of the old key and an insert of the new one.
        f"CREATE TRIGGER IF NOT EXISTS {upd} AFTER UPDATE ON {t} WHEN {guard} BEGIN "
        f"INSERT INTO _p2p_log(tid, pk, op) SELECT {tid}, OLD.{key}, {OP_DELETE} WHERE OLD.{key} IS NOT NEW.{key}; "
        f"INSERT INTO _p2p_log(tid, pk, op, cols) VALUES ({tid}, NEW.{key}, "
        f"CASE WHEN OLD.{key} IS NEW.{key} THEN {OP_UPDATE} ELSE {OP_INSERT} END, "
        f"CASE WHEN OLD.{key} IS NEW.{key} THEN {mask} END); END",
        f"CREATE TRIGGER IF NOT EXISTS {dele} AFTER DELETE ON {t} WHEN {guard} BEGIN "
        f"INSERT INTO _p2p_log(tid, pk, op) VALUES ({tid}, OLD.{key}, {OP_DELETE}); END",
    ]


def read_only_triggers_sql(table: str, origin: str) -> list[str]:
    """Guards that make a collaborative device table writable only by the apply path."""
    t = quote_ident(table)
    message = f"READ_ONLY_TABLE: {table} holds rows synced from device {origin}; only sync writes it"
    raise_sql = "SELECT RAISE(ABORT, '" + message.replace("'", "''") + "');"
    return [
        f"CREATE TRIGGER IF NOT EXISTS {quote_ident(f'_p2p_ro_{op}_{table}')} BEFORE {op.upper()} ON {t} "
        f"WHEN NOT EXISTS (SELECT 1 FROM _p2p_apply) BEGIN {raise_sql} END"
        for op in ("insert", "update", "delete")
    ]


def not_null_trigger_names(table: str) -> list[str]:
    return [f"_p2p_nn_{op}_{table}" for op in ("ins", "upd")]


def not_null_triggers_sql(table: str, column: str) -> list[str]:
    """Guards that refuse NULL in a single_version table's conflict column.

    Triggers rather than a NOT NULL constraint because SQLite can't add one
    to an existing table, and because they hold for every writer (the API,
    the ``sqlite3`` shell, a peer's changes). The ``CONSTRAINT_VIOLATION:``
    prefix is what ``database.map_sqlite_error`` maps; ``UPDATE OF`` keeps
    the update guard off statements that don't touch the column.
    """
    t, c = quote_ident(table), quote_ident(column)
    message = f"CONSTRAINT_VIOLATION: conflict column {column} of single_version table {table} can't be NULL"
    raise_sql = "SELECT RAISE(ABORT, '" + message.replace("'", "''") + "');"
    ins, upd = (quote_ident(n) for n in not_null_trigger_names(table))
    return [
        f"CREATE TRIGGER IF NOT EXISTS {ins} BEFORE INSERT ON {t} WHEN NEW.{c} IS NULL BEGIN {raise_sql} END",
        f"CREATE TRIGGER IF NOT EXISTS {upd} BEFORE UPDATE OF {c} ON {t} WHEN NEW.{c} IS NULL BEGIN {raise_sql} END",
    ]


def has_rowid(conn: sqlite3.Connection, table: str) -> bool:
    try:
        conn.execute(f"SELECT rowid FROM {quote_ident(table)} LIMIT 0")
    except sqlite3.OperationalError:
        return False
    return True


@dataclass(slots=True)
class CapturedTable:
    tid: int
    info: TableInfo
    hw: int | None  # None: table without rowid, every insert is logged by trigger


@dataclass(slots=True)
class CaptureState:
    """The daemon's cached view of the capture tables (it is their only writer)."""

    stamped_seq: int = 0
    tables: dict[int, CapturedTable] = field(default_factory=dict)


@dataclass(slots=True)
class ChangeBatch:
    """Changes captured since the last stamp, grouped for ChangeInfo."""

    first_seq: int = 0
    last_seq: int = 0
    by_table: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.last_seq >= self.first_seq > 0

    def change_infos(self) -> list[dict[str, Any]]:
        return [{"table": table, "type": "data", **lists} for table, lists in sorted(self.by_table.items())]


def get_meta(conn: sqlite3.Connection, key: str, default: Any = None) -> Any:
    row = conn.execute("SELECT value FROM _p2p_meta WHERE key = ?", (key,)).fetchone()
    return default if row is None else row[0]


def set_meta(conn: sqlite3.Connection, key: str, value: Any) -> None:
    conn.execute("INSERT OR REPLACE INTO _p2p_meta(key, value) VALUES (?, ?)", (key, value))


def load_state(conn: sqlite3.Connection, clock: HybridClock) -> CaptureState:
    """Rebuild the cached state and the clock from the file (at open)."""
    from p2pstore.store.tables import read_table_info

    state = CaptureState()
    row = conn.execute("SELECT last_seq, base_hlc + last_seq - first_seq FROM _p2p_stamps ORDER BY first_seq DESC LIMIT 1").fetchone()
    if row is not None:
        state.stamped_seq = row[0]
        clock.last = max(clock.last, row[1])
    clock.last = max(clock.last, int(get_meta(conn, "hlc_last", 0)))
    rows = conn.execute(
        "SELECT t.tid, t.name, h.hw FROM _p2p_tables t LEFT JOIN _p2p_hw h ON h.tid = t.tid WHERE t.kind = 'local'"
    ).fetchall()
    for tid, name, hw in rows:
        state.tables[tid] = CapturedTable(tid, read_table_info(conn, name), hw)
    return state


def register_table(conn: sqlite3.Connection, state: CaptureState, info: TableInfo, auto_sync: bool) -> int:
    """Start capturing ``info``; its existing rows are logged as inserts."""
    rowid = has_rowid(conn, info.name)
    tid = conn.execute("INSERT INTO _p2p_tables(name, kind, auto_sync) VALUES (?, 'local', ?)", (info.name, int(auto_sync))).lastrowid
    if rowid:
        conn.execute("INSERT INTO _p2p_hw(tid, hw) VALUES (?, 0)", (tid,))
    for sql in capture_triggers_sql(tid, info, rowid):
        conn.execute(sql)
    state.tables[tid] = CapturedTable(tid, info, 0 if rowid else None)
    if not rowid:
        conn.execute(f"INSERT INTO _p2p_log(tid, pk, op) SELECT {tid}, {info.key_expr}, {OP_INSERT} FROM {quote_ident(info.name)}")
    return tid


def log_all_rows_again(conn: sqlite3.Connection, tid: int, info: TableInfo) -> int:
    """Mark every existing row of a captured table to be sent again: one
    update entry per row with ``cols`` NULL (all columns), so the next sync
    carries every synced column, including ones peers never received (a
    sync column added to sync_schema.json). The caller stamps them in the
    same transaction, without announcing them: no data changed locally.
    Returns the number of rows marked.
    """
    cursor = conn.execute(
        f"INSERT INTO _p2p_log(tid, pk, op, cols) SELECT ?, {info.key_expr}, {OP_UPDATE}, NULL FROM {quote_ident(info.name)}",
        (tid,),
    )
    return max(cursor.rowcount, 0)


def _log_appended_rows(conn: sqlite3.Connection, table: CapturedTable) -> None:
    if table.hw is None:
        return
    name = quote_ident(table.info.name)
    top = conn.execute(f"SELECT max(rowid) FROM {name}").fetchone()[0]
    if top is None or top <= table.hw:
        return
    conn.execute(
        f"INSERT INTO _p2p_log(tid, pk, op) SELECT ?, {table.info.key_expr}, {OP_INSERT} FROM {name} WHERE rowid > ? ORDER BY rowid",
        (table.tid, table.hw),
    )
    conn.execute("UPDATE _p2p_hw SET hw = ? WHERE tid = ?", (top, table.tid))
    table.hw = top


def stamp(conn: sqlite3.Connection, state: CaptureState, clock: HybridClock, *, collect: bool = True, wall: int | None = None) -> ChangeBatch:
    """Log appended rows and give all new log rows their clock range.

    Runs inside the caller's write transaction, so the log, the high-water
    marks and the stamp commit together or not at all. ``state`` is updated
    only by this function; a rolled-back transaction must be followed by
    ``load_state`` (the store does that).
    """
    for table in state.tables.values():
        _log_appended_rows(conn, table)
    last = conn.execute("SELECT max(seq) FROM _p2p_log").fetchone()[0]
    batch = ChangeBatch()
    if last is None or last <= state.stamped_seq:
        return batch
    first = state.stamped_seq + 1
    base = clock.reserve(last - first + 1, wall)
    conn.execute("INSERT INTO _p2p_stamps(first_seq, last_seq, base_hlc) VALUES (?, ?, ?)", (first, last, base))
    state.stamped_seq = last
    batch.first_seq, batch.last_seq = first, last
    if collect:
        names = {t.tid: t.info.name for t in state.tables.values()}
        seen: set[tuple[int, int, Any]] = set()
        for tid, pk, op in conn.execute("SELECT tid, pk, op FROM _p2p_log WHERE seq >= ?", (first,)):
            if (tid, op, pk) in seen or tid not in names:
                continue
            seen.add((tid, op, pk))
            lists = batch.by_table.setdefault(names[tid], {"inserted": [], "updated": [], "deleted": []})
            lists[OP_NAMES[op]].append(pk)
    return batch
