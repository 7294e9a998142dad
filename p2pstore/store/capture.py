"""Change capture: every change of a distributed table reaches the change log.

Invariants:
- ``seq`` only grows. Rows are appended, and removed only by ``compact``
  once nothing reads them; it never removes the highest ``seq``, so sequence
  numbers are never reused. A change's position in the log is its local order.
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
- Single-version tables (registered with a ``conflict_column``) also log the
  conflict value ``ck`` of each change; a change of it is a delete of the old
  value and an insert of the new one. Stamping turns their changes into
  per-column clocks, set-based (two statements per table per stamp):
  ``_p2p_cells(tid, ck, col)`` holds the clock (hlc, origin) and local ``seq``
  of each synced column's current value, ``_p2p_tombs(tid, ck)`` the row's
  newest delete. ``origin`` NULL means this device, as in ``_p2p_log``, so
  stamping needs no device ID. A cell's or tomb's ``seq`` only grows: it is
  the log position where it last changed here, which is what a peer's
  watermark is compared with (``store/changes.py``, ``store/merge.py``).
  ``prev`` records what a change knowingly superseded, so the merge can
  tell a conflict from an ordinary later edit: for a cell, the newest of the
  foreign value it replaced and the row's tomb (on a table whose policy
  detects conflicts by row, the newest edit of the whole row seen here:
  ``_ROW_PREV_SQL``); for a tomb, the newest cell of the row when it was deleted.
- The apply path writes its own log rows with the peer's hlc and origin
  (``hlc`` NOT NULL): stamping never turns them into cells or announces them.
"""

from __future__ import annotations

import bisect
import logging
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from p2pstore.clock import HybridClock
from p2pstore.errors import StoreInvalid, TableNotDistributed, TableNotFound
from p2pstore.schema.predicates import quote_ident
from p2pstore.store import cells, origins, row_runs
from p2pstore.store.tables import TableInfo, device_table_name, read_table_info

log = logging.getLogger(__name__)

OP_INSERT, OP_UPDATE, OP_DELETE = 1, 2, 3
OP_NAMES = {OP_INSERT: "inserted", OP_UPDATE: "updated", OP_DELETE: "deleted"}
#: Column masks are one signed 64-bit integer; wider tables record NULL (all).
MAX_MASK_COLUMNS = 62
#: Key column of a device table whose source table is keyed by rowid.
DEVICE_ROWID_COLUMN = "_p2p_rowid"

SCHEMA_SQL = origins.SCHEMA_SQL + """
CREATE TABLE IF NOT EXISTS _p2p_meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _p2p_tables(
    tid INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,                 -- 'local' (captured) or 'device' (a peer's rows)
    origin TEXT,                        -- device ID for kind 'device'
    source TEXT,                        -- table name on the origin for kind 'device'
    auto_sync INTEGER NOT NULL DEFAULT 0,
    conflict_col TEXT                   -- single_version tables: the conflict column (ck)
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
    origin INTEGER,                     -- _p2p_origins.id (store/origins.py); NULL: this device
    ck                                  -- single_version tables, local changes: the conflict column's value
                                        -- (NULL for rows another program appended: stamping reads the table)
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
       (SELECT o.device FROM _p2p_origins o WHERE o.id = l.origin) AS origin, l.ck
FROM _p2p_log l JOIN _p2p_tables t ON t.tid = l.tid;
-- Sync state (store/changes.py reads it, store/merge.py writes it).
-- Clock of each synced column value of a single_version row; for a
-- collaborative device table, col '*' holds the clock of the whole row.
CREATE TABLE IF NOT EXISTS _p2p_cells(
    tid INTEGER NOT NULL, ck NOT NULL, col TEXT NOT NULL,
    hlc INTEGER NOT NULL,
    origin INTEGER,                     -- _p2p_origins.id; NULL: this device
    seq INTEGER NOT NULL,               -- local log seq when this cell last changed here
    prev_hlc INTEGER, prev_origin INTEGER, -- what its writer had superseded (NULL: nothing)
    PRIMARY KEY (tid, ck, col)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS _p2p_cells_seq ON _p2p_cells(seq);
-- The clock tuple a single_version row's synced columns share, by the
-- row's local key; a column whose tuple differs has its own _p2p_cells
-- entry (store/cells.py, which defines it: _p2p_rows and _p2p_rows_seq).
-- Newest delete of a single_version row (also of rows never seen here).
CREATE TABLE IF NOT EXISTS _p2p_tombs(
    tid INTEGER NOT NULL, ck NOT NULL,
    hlc INTEGER NOT NULL,
    origin INTEGER,                     -- _p2p_origins.id; NULL: this device
    seq INTEGER NOT NULL,
    prev_hlc INTEGER, prev_origin INTEGER, -- the row's newest cell when it was deleted
    PRIMARY KEY (tid, ck)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS _p2p_tombs_seq ON _p2p_tombs(seq);
-- Highest seq of a peer's change stream applied here; moved by the receiver,
-- in the transaction of the batch it covers.
-- ``stream`` is the sender's stream ID the seq belongs to (see stream_id).
-- own_hlc: every change the peer itself wrote with an hlc up to it is here (or a newer state of its
-- row): what origin marks say (store/merge.py ``origin_marks``); pending_hlc: the newest of its own
-- changes received since its stream was last drained (own_hlc takes it then).
-- eager_seq: up to where in its stream every change the peer itself made is here (pushes of its own
-- changes only move it, not received_seq); eager_pending: pending_hlc of those pushes.
CREATE TABLE IF NOT EXISTS _p2p_watermarks(peer TEXT PRIMARY KEY, received_seq INTEGER NOT NULL, stream TEXT,
    own_hlc INTEGER, pending_hlc INTEGER, eager_seq INTEGER, eager_pending INTEGER) WITHOUT ROWID;
-- Origin marks granted by the peers that forward a device's changes along its tree (protocol 5,
-- net/overlay.py): every change ``device`` wrote with an hlc up to ``hlc`` is here (store/merge.py).
CREATE TABLE IF NOT EXISTS _p2p_granted(device TEXT PRIMARY KEY, hlc INTEGER NOT NULL) WITHOUT ROWID;
-- What each peer has confirmed applying of THIS store's stream (the sender's
-- side of a watermark: store/gc.py), and when it last said so (unix ms).
-- Compaction forgets deletes only below every holding peer's ack.
CREATE TABLE IF NOT EXISTS _p2p_acks(peer TEXT PRIMARY KEY, seq INTEGER NOT NULL, stream TEXT, at INTEGER NOT NULL) WITHOUT ROWID;
-- Keys a resync from ``peer`` has delivered so far (receiver side, store/gc.py).
CREATE TABLE IF NOT EXISTS _p2p_resync(peer TEXT NOT NULL, tid INTEGER NOT NULL, ck NOT NULL, PRIMARY KEY (peer, tid, ck)) WITHOUT ROWID;
-- Every change that lost a last-writer-wins comparison (col NULL: a row delete).
CREATE TABLE IF NOT EXISTS _p2p_conflicts(
    id INTEGER PRIMARY KEY,
    tbl TEXT NOT NULL, ck, col TEXT,
    losing_value,
    winner TEXT NOT NULL, winner_hlc INTEGER NOT NULL,
    loser TEXT NOT NULL, loser_hlc INTEGER NOT NULL,
    at INTEGER NOT NULL,                -- unix ms when it was recorded here
    other_col TEXT                      -- a row conflict (detect: row): the loser is this column's edit; both stayed
);
CREATE UNIQUE INDEX IF NOT EXISTS _p2p_conflicts_loser ON _p2p_conflicts(tbl, ck, ifnull(col, ''), loser, loser_hlc);
-- Received changes that could not be applied, with their payload.
CREATE TABLE IF NOT EXISTS _p2p_failures(
    id INTEGER PRIMARY KEY,
    origin TEXT NOT NULL,               -- the device that sent it
    tbl TEXT NOT NULL,
    change BLOB NOT NULL,               -- msgpack, store/changes.py encode_change
    reason TEXT NOT NULL,
    at INTEGER NOT NULL
);
""" + cells.SCHEMA_SQL + row_runs.SCHEMA_SQL

#: Columns added to capture tables after their first release, with their
#: definitions: ``ensure_schema`` adds them to files made before.
_ADDED_COLUMNS = (
    ("_p2p_tables", "conflict_col", "TEXT"), ("_p2p_log", "ck", ""),
    ("_p2p_cells", "prev_hlc", "INTEGER"), ("_p2p_cells", "prev_origin", "INTEGER"),
    ("_p2p_tombs", "prev_hlc", "INTEGER"), ("_p2p_tombs", "prev_origin", "INTEGER"),
    ("_p2p_watermarks", "stream", "TEXT"), ("_p2p_conflicts", "other_col", "TEXT"),
    ("_p2p_watermarks", "own_hlc", "INTEGER"), ("_p2p_watermarks", "pending_hlc", "INTEGER"),
    ("_p2p_watermarks", "eager_seq", "INTEGER"), ("_p2p_watermarks", "eager_pending", "INTEGER"),
)


def held_marks(conn: sqlite3.Connection) -> dict[str, int]:
    """What this store holds of other devices' changes, per device: up to
    which clock it holds every change that device wrote — from the device's
    own stream taken to its end (``_p2p_watermarks.own_hlc``) or granted by
    a device that forwarded them (``_p2p_granted``). The peers' part of
    store/merge.py ``origin_marks``."""
    held: dict[str, int] = {}
    for device, hlc in conn.execute("SELECT peer, own_hlc FROM _p2p_watermarks WHERE own_hlc IS NOT NULL "
                                    "UNION ALL SELECT device, hlc FROM _p2p_granted"):
        held[device] = max(held.get(device, 0), int(hlc))
    return held


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the internal tables, and add columns that older files lack."""
    conn.executescript(SCHEMA_SQL)
    for table, column, decl in _ADDED_COLUMNS:
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}".rstrip())
    _number_origins(conn)
    if not get_meta(conn, STREAM_KEY):
        new_stream(conn)
    # An index on (tid, pk) made SQLite scan a whole table's log for the
    # stream's seq-range queries; files that have it lose it.
    conn.execute("DROP INDEX IF EXISTS _p2p_log_key")


#: The clock tables, whose origins are numbers (store/origins.py), with their indexes.
_CLOCK_TABLES = {"_p2p_log": (), "_p2p_cells": ("_p2p_cells_seq",), "_p2p_rows": ("_p2p_rows_seq",), "_p2p_tombs": ("_p2p_tombs_seq",)}
#: Views over them (``_p2p_clocks``: release 2's, over its row clocks by conflict value).
_CLOCK_VIEWS = ("_p2p_changes", "_p2p_clocks")


def _number_origins(conn: sqlite3.Connection) -> None:
    """Rebuild, once, the clock tables of a file whose origins are device IDs
    as text (releases before store/origins.py), in one transaction: the same
    rows with numbers. SQLite can't change a column's type in place, so each
    table is renamed away, made again from SCHEMA_SQL and copied back."""
    old = [t for t in _CLOCK_TABLES
           if conn.execute(f"SELECT type FROM pragma_table_info('{t}') WHERE name = 'origin'").fetchone()[0].upper() != "INTEGER"]
    if not old:
        return
    total = sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in old)
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    log.info("%s: storing device IDs as numbers in %d clock and log rows (once, after an upgrade)", path, total)
    conn.execute("BEGIN IMMEDIATE")
    # Renames must not rewrite (nor check) the capture triggers that write _p2p_log.
    conn.execute("PRAGMA legacy_alter_table = ON")
    try:
        for view in _CLOCK_VIEWS:
            conn.execute(f"DROP VIEW IF EXISTS {view}")
        for t in old:
            for col in ("origin", "prev_origin"):
                if conn.execute(f"SELECT 1 FROM pragma_table_info('{t}') WHERE name = ?", (col,)).fetchone():
                    conn.execute(f"INSERT OR IGNORE INTO _p2p_origins(device) SELECT DISTINCT {col} FROM {t} WHERE {col} IS NOT NULL")
            for index in _CLOCK_TABLES[t]:
                conn.execute(f"DROP INDEX IF EXISTS {index}")
            conn.execute(f"ALTER TABLE {t} RENAME TO {t}_text")
        if "_p2p_rows" in old and conn.execute("SELECT 1 FROM pragma_table_info('_p2p_rows_text') WHERE name = 'ck'").fetchone():
            conn.execute(cells.RELEASE2_ROWS_SQL)  # keyed by the conflict value still: cells.migrate moves it after
        for statement in _statements(SCHEMA_SQL):
            conn.execute(statement)
        for t in old:
            have = [r[1] for r in conn.execute(f"PRAGMA table_info({t}_text)")]
            select = [f"(SELECT o.id FROM _p2p_origins o WHERE o.device = {c})" if c in ("origin", "prev_origin") else c for c in have]
            conn.execute(f"INSERT INTO {t}({', '.join(have)}) SELECT {', '.join(select)} FROM {t}_text")
            conn.execute(f"DROP TABLE {t}_text")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    finally:
        conn.execute("PRAGMA legacy_alter_table = OFF")
    log.info("%s: device IDs stored as numbers (%d devices)", path, conn.execute("SELECT count(*) FROM _p2p_origins").fetchone()[0])


def _statements(script: str) -> list[str]:
    """The statements of an SQL script, to run inside a transaction
    (``executescript`` commits first)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return out


def trigger_names(table: str) -> list[str]:
    return [f"_p2p_{kind}_{table}" for kind in ("ins", "upd", "del")]


def capture_triggers_sql(tid: int, info: TableInfo, has_rowid: bool = True, *, conflict_column: str | None = None) -> list[str]:
    """SQL creating the three capture triggers of one table.

    With a ``conflict_column`` (single_version), each log row also records
    its value ``ck``, and an update that changes it (or the key) is logged as
    a delete of the old row and an insert of the new one: peers know rows by
    ``ck`` only.
    """
    t = quote_ident(info.name)
    key = info.key_expr
    ck_new = f"NEW.{quote_ident(conflict_column)}" if conflict_column else "NULL"
    ck_old = f"OLD.{quote_ident(conflict_column)}" if conflict_column else "NULL"
    same = f"OLD.{key} IS NEW.{key}" + (f" AND {ck_old} IS {ck_new}" if conflict_column else "")
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
        f"INSERT INTO _p2p_log(tid, pk, op, ck) VALUES ({tid}, NEW.{key}, {OP_INSERT}, {ck_new}); END",
        # A key change is a delete of the old key and an insert of the new one.
        f"CREATE TRIGGER IF NOT EXISTS {upd} AFTER UPDATE ON {t} WHEN {guard} BEGIN "
        f"INSERT INTO _p2p_log(tid, pk, op, ck) SELECT {tid}, OLD.{key}, {OP_DELETE}, {ck_old} WHERE NOT ({same}); "
        f"INSERT INTO _p2p_log(tid, pk, op, cols, ck) VALUES ({tid}, NEW.{key}, "
        f"CASE WHEN {same} THEN {OP_UPDATE} ELSE {OP_INSERT} END, "
        f"CASE WHEN {same} THEN {mask} END, {ck_new}); END",
        f"CREATE TRIGGER IF NOT EXISTS {dele} AFTER DELETE ON {t} WHEN {guard} BEGIN "
        f"INSERT INTO _p2p_log(tid, pk, op, ck) VALUES ({tid}, OLD.{key}, {OP_DELETE}, {ck_old}); END",
    ]


def read_only_triggers_sql(table: str, origin: str, why: str = "holds rows synced from device") -> list[str]:
    """Guards that make a table writable only by the apply path: a
    collaborative device table, or every distributed table of a ``receive``
    replica (store/replicas.py)."""
    t = quote_ident(table)
    message = f"READ_ONLY_TABLE: {table} {why} {origin}; only sync writes it"
    raise_sql = "SELECT RAISE(ABORT, '" + message.replace("'", "''") + "');"
    return [
        f"CREATE TRIGGER IF NOT EXISTS {quote_ident(name)} BEFORE {op.upper()} ON {t} "
        f"WHEN NOT EXISTS (SELECT 1 FROM _p2p_apply) BEGIN {raise_sql} END"
        for op, name in zip(("insert", "update", "delete"), read_only_trigger_names(table))
    ]


def read_only_trigger_names(table: str) -> list[str]:
    return [f"_p2p_ro_{op}_{table}" for op in ("insert", "update", "delete")]


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


def create_device_table(conn: sqlite3.Connection, device_id: str, table: str) -> str:
    """Create (once) the read-only copy of ``device_id``'s rows of local table ``table``.

    Columns and declared types follow the local table; constraints other than
    the key are left out, since the rows were already checked on their
    device. A table keyed by rowid gets the key column ``_p2p_rowid``.
    """
    name = device_table_name(device_id, table)
    if conn.execute("SELECT 1 FROM _p2p_tables WHERE name = ?", (name,)).fetchone():
        return name
    if not conn.execute("SELECT 1 FROM _p2p_tables WHERE name = ? AND kind = 'local'", (table,)).fetchone():
        raise TableNotDistributed(f"table {table} is not distributed", data={"table": table})
    info = read_table_info(conn, table)
    defs = []
    for _cid, col, decl, _nn, _dflt, pk in conn.execute(f"PRAGMA table_info({quote_ident(table)})").fetchall():
        defs.append(_device_column(col, decl) + (" PRIMARY KEY" if pk else ""))
    if info.key is None:
        defs.append(f"{DEVICE_ROWID_COLUMN} INTEGER PRIMARY KEY")
    conn.execute(f"CREATE TABLE {quote_ident(name)} ({', '.join(defs)})")
    for sql in read_only_triggers_sql(name, device_id):
        conn.execute(sql)
    conn.execute("INSERT INTO _p2p_tables(name, kind, origin, source) VALUES (?, 'device', ?, ?)", (name, device_id, table))
    return name


def _device_column(column: str, decl: str) -> str:
    """A device table's definition of a local column: its name and declared type, no constraints."""
    return f"{quote_ident(column)} {decl}".rstrip()


def add_device_columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    """Give every device table of local table ``table`` the columns it
    gained since (an ``ALTER TABLE ... ADD COLUMN``), as ``create_device_table``
    would have made them; the (device table, column) pairs added. Without
    it, peers that made the same change send rows this device could never
    store (``unknown_column``)."""
    local = conn.execute(f"PRAGMA table_info({quote_ident(table)})").fetchall()
    added = []
    for (name,) in conn.execute("SELECT name FROM _p2p_tables WHERE kind = 'device' AND source = ?", (table,)).fetchall():
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({quote_ident(name)})")}
        for _cid, col, decl, *_ in local:
            if col not in have:
                conn.execute(f"ALTER TABLE {quote_ident(name)} ADD COLUMN {_device_column(col, decl)}")
                added.append((name, col))
    return added


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
    conflict_column: str | None = None  # single_version tables only


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

    def add(self, later: ChangeBatch) -> None:
        """Take in what the next stamp found (a bulk insert stamped in steps)."""
        if not later:
            return
        if not self:
            self.first_seq = later.first_seq
        self.last_seq = later.last_seq
        for table, lists in later.by_table.items():
            mine = self.by_table.setdefault(table, {"inserted": [], "updated": [], "deleted": []})
            for kind, keys in lists.items():
                mine.setdefault(kind, []).extend(keys)

    def change_infos(self) -> list[dict[str, Any]]:
        return [{"table": table, "type": "data", **lists} for table, lists in sorted(self.by_table.items())]


def get_meta(conn: sqlite3.Connection, key: str, default: Any = None) -> Any:
    row = conn.execute("SELECT value FROM _p2p_meta WHERE key = ?", (key,)).fetchone()
    return default if row is None else row[0]


def set_meta(conn: sqlite3.Connection, key: str, value: Any) -> None:
    conn.execute("INSERT OR REPLACE INTO _p2p_meta(key, value) VALUES (?, ?)", (key, value))


#: ``_p2p_meta`` key of the ID of the device that owns the file.
DEVICE_ID_KEY = "device_id"


def set_device_id(conn: sqlite3.Connection, device_id: str) -> None:
    """Record whose store this is (the daemon does it at open, from its identity).

    Local clocks are stored with origin NULL ("this device"); the ID is only
    needed where they meet other devices' clocks: reading changes for a peer
    and merging a peer's changes.
    """
    if not isinstance(device_id, str) or not device_id:
        raise ValueError("device ID must be a non-empty string")
    set_meta(conn, DEVICE_ID_KEY, device_id)


#: ``_p2p_meta`` key of the store's change-stream ID.
STREAM_KEY = "stream"
#: Set once this device dropped rows it had written itself (a rebuild, a restore from a
#: backup): from then on it never claims to hold all its own changes (merge.origin_marks).
OWN_ROWS_LOST_KEY = "own_rows_lost"


def stream_id(conn: sqlite3.Connection) -> str:
    """The ID of this store's change stream, created with the store.

    Peers keep their watermark for this store as (stream ID, seq). A store
    deleted and created again starts a new stream at seq 1, and so does a
    file restored from a backup once a peer shows it went back in time
    (``changes.start_position``): the peers then start over from seq 0
    instead of waiting for seqs they believe they have.
    """
    value = get_meta(conn, STREAM_KEY)
    if isinstance(value, str) and value:
        return value
    return new_stream(conn)


def new_stream(conn: sqlite3.Connection) -> str:
    """Start a new stream ID (every peer re-reads this store from seq 0)."""
    value = secrets.token_hex(16)
    set_meta(conn, STREAM_KEY, value)
    return value


def device_id(conn: sqlite3.Connection) -> str:
    """The owning device's ID; StoreInvalid if the daemon never set it."""
    value = get_meta(conn, DEVICE_ID_KEY)
    if not isinstance(value, str) or not value:
        raise StoreInvalid("the store does not know its device ID yet; it can't sync (set_device_id)")
    return value


def load_state(conn: sqlite3.Connection, clock: HybridClock) -> CaptureState:
    """Rebuild the cached state and the clock from the file (at open)."""
    from p2pstore.store.tables import read_table_info

    state = CaptureState()
    row = conn.execute("SELECT last_seq, base_hlc + last_seq - first_seq FROM _p2p_stamps ORDER BY first_seq DESC LIMIT 1").fetchone()
    if row is not None:
        state.stamped_seq = row[0]
    for what, stored in (("newest stamp", row[1] if row is not None else 0), ("hlc_last", int(get_meta(conn, "hlc_last", 0)))):
        if not clock.restore(stored):
            log.warning("the store's clock state (%s) is %s; ignored, the clock goes on from local time",
                        what, clock.too_far_ahead(stored))
    rows = conn.execute(
        "SELECT t.tid, t.name, h.hw, t.conflict_col FROM _p2p_tables t LEFT JOIN _p2p_hw h ON h.tid = t.tid WHERE t.kind = 'local'"
    ).fetchall()
    for tid, name, hw, conflict in rows:
        try:
            info = read_table_info(conn, name)
        except TableNotFound:
            # Renamed or dropped by another program: the store still opens, the
            # table is no longer captured, and the log says so every time.
            log.error("distributed table %s is gone (renamed or dropped outside p2pstore); it is no longer captured", name)
            continue
        state.tables[tid] = CapturedTable(tid, info, hw, conflict)
    return state


def register_table(
    conn: sqlite3.Connection, state: CaptureState, info: TableInfo, auto_sync: bool, *, conflict_column: str | None = None
) -> int:
    """Start capturing ``info``; its existing rows are logged as inserts.

    ``conflict_column`` makes it a single_version table: the log records each
    change's conflict value, and stamping keeps per-column clocks for the
    sync columns listed in ``_p2p_sync_columns`` (store/single_version.py).
    The conflict column can never change, so it is kept with the table.
    """
    rowid = has_rowid(conn, info.name)
    tid = conn.execute(
        "INSERT INTO _p2p_tables(name, kind, auto_sync, conflict_col) VALUES (?, 'local', ?, ?)",
        (info.name, int(auto_sync), conflict_column),
    ).lastrowid
    if rowid:
        conn.execute("INSERT INTO _p2p_hw(tid, hw) VALUES (?, 0)", (tid,))
    for sql in capture_triggers_sql(tid, info, rowid, conflict_column=conflict_column):
        conn.execute(sql)
    state.tables[tid] = CapturedTable(tid, info, 0 if rowid else None, conflict_column)
    if not rowid:
        ck = quote_ident(conflict_column) if conflict_column else "NULL"
        conn.execute(
            f"INSERT INTO _p2p_log(tid, pk, op, ck) SELECT {tid}, {info.key_expr}, {OP_INSERT}, {ck} FROM {quote_ident(info.name)}"
        )
    return tid


def _ck_expr(conn: sqlite3.Connection, tid: int) -> str:
    """The SQL expression of a captured table's conflict value (``NULL`` if none)."""
    row = conn.execute("SELECT conflict_col FROM _p2p_tables WHERE tid = ?", (tid,)).fetchone()
    return quote_ident(row[0]) if row is not None and row[0] else "NULL"


def log_all_rows_again(conn: sqlite3.Connection, tid: int, info: TableInfo, columns: Sequence[str] | None = None) -> int:
    """Mark every existing row of a captured table to be sent again.

    One update entry per row, whose changed-column mask names only
    ``columns`` (the sync columns just added to sync_schema.json; None: all),
    and of those only the ones holding a value written here (not NULL, not
    the column's default) with no clock yet; a row with none is not logged.
    Only those cells get fresh clocks, so peers receive the new columns'
    values while the values of columns they already sync keep their clocks —
    a device that upgrades late must not win every row with old data, nor
    with the NULLs its ALTER TABLE left (issue 12). The
    caller stamps them in the same transaction, without announcing them: no
    data changed locally. Returns the number of rows marked.
    """
    ck = _ck_expr(conn, tid)
    if columns is None:
        cursor = conn.execute(
            f"INSERT INTO _p2p_log(tid, pk, op, cols, ck) SELECT ?, {info.key_expr}, {OP_UPDATE}, NULL, {ck} FROM {quote_ident(info.name)}",
            (tid,),
        )
        return max(cursor.rowcount, 0)
    # Per row, only the added columns that hold something written here and
    # have no clock yet (cells.unpark gave peers' values theirs): a NULL or
    # a default never gets a fresh clock, which would beat every peer's value.
    added = [c for c in columns if c in info.columns]
    literal = {c: "'" + c.replace("'", "''") + "'" for c in added}  # as _cells_sql names columns
    fresh = {c: f"({cells.empty_sql(conn, info.name, c)}) = 0 AND NOT EXISTS (SELECT 1 FROM _p2p_cells x "
                f"WHERE x.tid = ?1 AND x.ck = {ck} AND x.col = {literal[c]})" for c in added}
    if any(info.columns.index(c) >= MAX_MASK_COLUMNS for c in added):
        mask = "NULL"  # too wide for a mask: all columns
    else:
        mask = " + ".join(f"CASE WHEN {fresh[c]} THEN {1 << info.columns.index(c)} ELSE 0 END" for c in added) or "0"
    where = " OR ".join(f"({f})" for f in fresh.values()) or "0"
    cursor = conn.execute(
        f"INSERT INTO _p2p_log(tid, pk, op, cols, ck) SELECT ?1, {info.key_expr}, {OP_UPDATE}, {mask}, {ck} "
        f"FROM {quote_ident(info.name)} WHERE {where}",
        (tid,),
    )
    return max(cursor.rowcount, 0)


def _log_appended_rows(conn: sqlite3.Connection, table: CapturedTable, limit: int | None = None) -> None:
    """Log the rows another program appended (rowid above the high-water
    mark): the first ``limit`` of them in rowid order, or all."""
    if limit == 0:
        return
    top = _appended_top(conn, table)
    if top is None:
        return
    name = quote_ident(table.info.name)
    if limit is not None:
        top = conn.execute(f"SELECT max(rowid) FROM (SELECT rowid FROM {name} WHERE rowid > ? ORDER BY rowid LIMIT ?)",
                           (table.hw, limit)).fetchone()[0]
    # No conflict value: these rows are stamped in this transaction, and stamping reads it from the
    # table (``_ck_sql``), which holds what the log would: a single_version log row is 4 × smaller so.
    conn.execute(
        f"INSERT INTO _p2p_log(tid, pk, op) SELECT ?, {table.info.key_expr}, {OP_INSERT} FROM {name} "
        "WHERE rowid > ? AND rowid <= ? ORDER BY rowid",
        (table.tid, table.hw, top),
    )
    conn.execute("UPDATE _p2p_hw SET hw = ? WHERE tid = ?", (top, table.tid))
    table.hw = top


def appended_left(conn: sqlite3.Connection, state: CaptureState) -> bool:
    """Whether some table has rows another program appended that no stamp
    logged yet (a stamp with ``append_limit`` leaves the rest for later)."""
    return any(_appended_top(conn, table) is not None for table in state.tables.values())


def _appended_top(conn: sqlite3.Connection, table: CapturedTable) -> int | None:
    """The highest rowid of ``table`` if rows lie above its high-water mark
    (another program appended them), else None (or a table not watched so)."""
    if table.hw is None:
        return None
    top = conn.execute(f"SELECT max(rowid) FROM {quote_ident(table.info.name)}").fetchone()[0]
    return top if top is not None and top > table.hw else None


def skip_appended_rows(conn: sqlite3.Connection, table: CapturedTable) -> None:
    """Move the high-water mark past rows the apply path appended.

    Called by the apply path before its transaction ends, after it inserted
    peers' rows: those rowids are above the mark and would otherwise be
    logged as local inserts by the next stamp (an echo).
    """
    top = _appended_top(conn, table)
    if top is not None:
        conn.execute("UPDATE _p2p_hw SET hw = ? WHERE tid = ?", (top, table.tid))
        table.hw = top


_TOUCHED = "(SELECT ck FROM temp._p2p_touched WHERE NOT plain)"


def _stamp_cells(conn: sqlite3.Connection, table: CapturedTable, offset: int, first: int, last: int) -> None:
    """Give the single_version changes of log seqs first..last their cells
    and tombs, set-based, in one clock tuple per row where they share it
    (store/cells.py).

    First, the row tuples of the local keys the range touched are turned
    into per-column cells under the conflict value of the row that held the
    key before the range — what the key's first log row in it names (an
    insert first: the key was free and an entry there is an orphan, unless
    the key is the conflict value) — so a row deleted, or given another key
    or value, keeps its clocks by value.
    Then the common case — a row inserted once in the range, with no clock
    here yet (new rows, rows another program wrote) — becomes its one row
    tuple in one ``INSERT ... SELECT``. Every other touched row is stamped
    by the per-column statements and folded back: the same cells as one row
    per column would hold, whatever the mix of inserts, updates and deletes
    in the range.
    """
    tid, name = table.tid, table.info.name
    keys = cells.RowKeys.of(table)
    ck = _ck_sql(table)
    if _only_appended_rows(conn, table, first, last):
        # Every row of the range is new, once, with no clock of its value anywhere: all are
        # the common case below, without sorting the range by value to find it out.
        conn.execute(_new_row_clocks_sql("", f"{ck} IS NOT NULL"), (offset, first, last, tid))
        return
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS _p2p_touched(ck PRIMARY KEY, plain INTEGER NOT NULL) WITHOUT ROWID")
    conn.execute("DELETE FROM temp._p2p_touched")
    conn.execute(
        "INSERT INTO temp._p2p_touched(ck, plain) "
        f"SELECT {ck}, count(*) = 1 AND max(l.op) = {OP_INSERT} FROM _p2p_log l "
        f"WHERE l.seq BETWEEN ?1 AND ?2 AND l.tid = ?3 AND l.hlc IS NULL AND {ck} IS NOT NULL GROUP BY 1",
        (first, last, tid),
    )
    # (pk, ck of the row that held pk before the range): SQLite's bare columns of min(). An insert
    # first: the key was free, unless the key is the conflict value itself (an INSERT OR REPLACE of it).
    # A range of inserts only (another program's bulk insert) has nothing to move: row clocks written
    # below replace an orphan they meet.
    if table.info.key == table.conflict_column or conn.execute(
            f"SELECT 1 FROM _p2p_log WHERE seq BETWEEN ? AND ? AND tid = ? AND op != {OP_INSERT} AND hlc IS NULL LIMIT 1",
            (first, last, tid)).fetchone():
        cells.explode(conn, keys, f"SELECT pk, CASE WHEN op = {OP_INSERT} AND pk IS NOT ck THEN NULL ELSE ck END AS ck FROM ("
                      f"SELECT l.pk, {ck} AS ck, l.op, min(l.seq) FROM _p2p_log l WHERE l.seq BETWEEN ? AND ? AND l.tid = ? "
                      f"AND l.hlc IS NULL AND {ck} IS NOT NULL GROUP BY l.pk)", (first, last, tid))
    conn.execute(
        "UPDATE temp._p2p_touched AS x SET plain = 0 WHERE plain AND ("
        "EXISTS (SELECT 1 FROM _p2p_cells c WHERE c.tid = ?1 AND c.ck = x.ck) OR "
        "EXISTS (SELECT 1 FROM _p2p_tombs t WHERE t.tid = ?1 AND t.ck = x.ck))",
        (tid,),
    )
    if conn.execute("SELECT count(*) FROM _p2p_sync_columns WHERE tbl = ?", (name,)).fetchone()[0]:
        conn.execute(_new_row_clocks_sql(f"JOIN temp._p2p_touched x ON x.ck = {ck} AND x.plain", f"l.op = {OP_INSERT}"),
                     (offset, first, last, tid))
    if not conn.execute("SELECT 1 FROM temp._p2p_touched WHERE NOT plain LIMIT 1").fetchone():
        return
    conn.execute(_cells_sql(table, f" AND {ck} IN {_TOUCHED}"), (offset, first, last, name, tid))
    conn.execute(_TOMBS_SQL, (offset, first, last, tid))
    if _detects_rows(conn, name):
        conn.execute(_ROW_PREV_SQL, (tid, first, last))
    cells.fold(conn, keys, _TOUCHED)


def _new_row_clocks_sql(join: str, where: str) -> str:
    """The row clock of each new row of log seqs ?2..?3 of table ?4 (the
    ones ``join`` and ``where`` keep): its insert's seq on this device,
    HLC ?1 + seq. It replaces an orphan clock its key still had."""
    return ("INSERT OR REPLACE INTO _p2p_rows(tid, pk, hlc, origin, seq, prev_hlc, prev_origin) "
            f"SELECT l.tid, l.pk, ?1 + l.seq, NULL, l.seq, NULL, NULL FROM _p2p_log l {join} "
            f"WHERE l.seq BETWEEN ?2 AND ?3 AND l.tid = ?4 AND l.hlc IS NULL AND {where}")


def _only_appended_rows(conn: sqlite3.Connection, table: CapturedTable, first: int, last: int) -> bool:
    """Whether the range holds, for ``table``, only rows another program
    appended (``_log_appended_rows``: inserts without a conflict value, one
    per row), the table has no per-column clock nor tomb at all and its key
    is not its conflict value (an insert then replaces no row clock): a
    bulk insert into a new table. Each such row is then touched once in
    the range, and its value, unique in the table, has no clock yet."""
    if table.info.key == table.conflict_column:
        return False
    if conn.execute("SELECT count(*) FROM _p2p_sync_columns WHERE tbl = ?", (table.info.name,)).fetchone()[0] == 0:
        return False
    if conn.execute("SELECT 1 FROM _p2p_cells WHERE tid = ?1 UNION ALL SELECT 1 FROM _p2p_tombs WHERE tid = ?1 LIMIT 1",
                    (table.tid,)).fetchone():
        return False
    return conn.execute(
        f"SELECT 1 FROM _p2p_log WHERE seq BETWEEN ? AND ? AND tid = ? AND hlc IS NULL AND (op != {OP_INSERT} OR ck IS NOT NULL) "
        "LIMIT 1", (first, last, table.tid)).fetchone() is None


def _ck_sql(table: CapturedTable) -> str:
    """The conflict value of log row ``l`` of ``table``: the one the log row
    holds, or, for a row another program appended (logged by stamping,
    ``_log_appended_rows``, without it), its row's in the table."""
    assert table.conflict_column is not None
    return (f"coalesce(l.ck, (SELECT ar.{quote_ident(table.conflict_column)} FROM {quote_ident(table.info.name)} ar "
            f"WHERE ar.{table.info.key_expr} = l.pk))")


def _detects_rows(conn: sqlite3.Connection, table: str) -> bool:
    """Whether ``table``'s conflict policy says ``detect: row`` (store/policies.py, which sits above this module)."""
    return conn.execute("SELECT 1 FROM sqlite_schema WHERE name = '_p2p_policies'").fetchone() is not None and conn.execute(
        "SELECT 1 FROM _p2p_policies WHERE tbl = ? AND json_extract(policy, '$.detect') = 'row'", (table,)).fetchone() is not None


#: ``detect: row``: a cell written here supersedes knowingly the newest edit
#: of its *row* seen here — another device's cell, the foreign value one of
#: ours replaced, the tomb — not only its own column's: so an edit of one
#: column made after another device's edit of another column is an ordinary
#: later edit, and only edits neither writer had seen are a row conflict.
_ROW_PREV_SQL = (
    "UPDATE _p2p_cells AS c SET (prev_hlc, prev_origin) = (SELECT s.hlc, s.origin FROM ("
    "  SELECT x.hlc, x.origin FROM _p2p_cells x WHERE x.tid = c.tid AND x.ck = c.ck AND x.origin IS NOT NULL "
    "  UNION ALL SELECT x.prev_hlc, x.prev_origin FROM _p2p_cells x WHERE x.tid = c.tid AND x.ck = c.ck AND x.prev_hlc IS NOT NULL "
    "  UNION ALL SELECT t.hlc, t.origin FROM _p2p_tombs t WHERE t.tid = c.tid AND t.ck = c.ck"
    ") s ORDER BY s.hlc DESC LIMIT 1) "
    f"WHERE c.tid = ?1 AND c.seq BETWEEN ?2 AND ?3 AND c.origin IS NULL AND c.ck IN {_TOUCHED}"
)


def _cells_sql(table: CapturedTable, only: str = "") -> str:
    """One statement stamping the cells of a single_version table's changes.

    Binds: hlc offset (base - first), first seq, last seq, table name, tid.
    Every insert sets all sync columns, an update those in its ``cols`` mask
    (NULL = all); the upsert's WHERE keeps the newest change per cell
    whatever order SQLite visits the log rows in, so no GROUP BY is needed.
    ``prev`` becomes the newer of the row's tomb and the value replaced (if
    that was another device's; after our own value, its ``prev`` is kept,
    so consecutive local edits carry the foreign value they started from).
    """
    columns = table.info.columns
    ck = _ck_sql(table)
    bits = ", ".join(
        "('" + c.replace("'", "''") + f"', {1 << i if len(columns) <= MAX_MASK_COLUMNS else 0})" for i, c in enumerate(columns)
    )
    return (
        f"WITH c(col, bit) AS (VALUES {bits}) "
        "INSERT INTO _p2p_cells(tid, ck, col, hlc, origin, seq, prev_hlc, prev_origin) "
        f"SELECT l.tid, {ck}, c.col, ?1 + l.seq, NULL, l.seq, t.hlc, t.origin "
        "FROM _p2p_log l JOIN c JOIN _p2p_sync_columns s ON s.tbl = ?4 AND s.col = c.col "
        f"LEFT JOIN _p2p_tombs t ON t.tid = l.tid AND t.ck = {ck} "
        f"WHERE l.seq BETWEEN ?2 AND ?3 AND l.tid = ?5 AND l.hlc IS NULL AND {ck} IS NOT NULL "
        f"AND (l.op = {OP_INSERT} OR (l.op = {OP_UPDATE} AND (l.cols IS NULL OR l.cols & c.bit != 0))){only} "
        "ON CONFLICT(tid, ck, col) DO UPDATE SET hlc = excluded.hlc, origin = NULL, seq = excluded.seq, "
        f"prev_hlc = CASE WHEN {_TOMB_IS_NEWER} THEN excluded.prev_hlc ELSE {_replaced('hlc')} END, "
        f"prev_origin = CASE WHEN {_TOMB_IS_NEWER} THEN excluded.prev_origin ELSE {_replaced('origin')} END "
        "WHERE excluded.seq > _p2p_cells.seq"
    )


def _replaced(part: str) -> str:
    """In the cells upsert: ``part`` (hlc/origin) of the clock being replaced,
    as "prev": a foreign value's own clock, or (our own value) its prev."""
    return f"CASE WHEN _p2p_cells.origin IS NULL THEN _p2p_cells.prev_{part} ELSE _p2p_cells.{part} END"


_TOMB_IS_NEWER = f"excluded.prev_hlc > coalesce({_replaced('hlc')}, -1)"


_NEWEST_CELL = "(SELECT x.{} FROM _p2p_cells x WHERE x.tid = l.tid AND x.ck = l.ck ORDER BY x.hlc DESC LIMIT 1)"
_TOMBS_SQL = (
    "INSERT INTO _p2p_tombs(tid, ck, hlc, origin, seq, prev_hlc, prev_origin) "
    f"SELECT l.tid, l.ck, ?1 + l.seq, NULL, l.seq, {_NEWEST_CELL.format('hlc')}, {_NEWEST_CELL.format('origin')} "
    "FROM _p2p_log l "
    f"WHERE l.seq BETWEEN ?2 AND ?3 AND l.tid = ?4 AND l.op = {OP_DELETE} AND l.hlc IS NULL AND l.ck IS NOT NULL "
    "ON CONFLICT(tid, ck) DO UPDATE SET hlc = excluded.hlc, origin = NULL, seq = excluded.seq, "
    "prev_hlc = excluded.prev_hlc, prev_origin = excluded.prev_origin "
    "WHERE excluded.seq > _p2p_tombs.seq"
)


def last_seq(conn: sqlite3.Connection) -> int:
    """The log's highest ``seq`` (0: empty). It never goes back: compaction keeps it."""
    return int(conn.execute("SELECT max(seq) FROM _p2p_log").fetchone()[0] or 0)


def stamp(conn: sqlite3.Connection, state: CaptureState, clock: HybridClock, *, collect: bool = True, wall: int | None = None,
          append_limit: int | None = None) -> ChangeBatch:
    """Log appended rows and give all new log rows their clock range.

    Runs inside the caller's write transaction, so the log, the high-water
    marks and the stamp commit together or not at all. ``state`` is updated
    only by this function; a rolled-back transaction must be followed by
    ``load_state`` (the store does that).

    ``append_limit``: log at most that many of each table's appended rows
    (``appended_left`` then says whether some are left): another program's
    bulk insert is stamped in steps, so a push can send the first rows while
    the rest wait. Only for a caller that writes no row itself — a row the
    application inserts next lands above the same mark and must be logged
    with the write that made it (every write stamps everything).
    """
    for table in state.tables.values():
        _log_appended_rows(conn, table, append_limit)
    last = last_seq(conn)
    batch = ChangeBatch()
    if last <= state.stamped_seq:
        return batch
    first = state.stamped_seq + 1
    base = clock.reserve(last - first + 1, wall)
    conn.execute("INSERT INTO _p2p_stamps(first_seq, last_seq, base_hlc) VALUES (?, ?, ?)", (first, last, base))
    state.stamped_seq = last
    batch.first_seq, batch.last_seq = first, last
    for table in state.tables.values():
        if table.conflict_column:
            _stamp_cells(conn, table, base - first, first, last)
    if collect:
        names = {t.tid: t.info.name for t in state.tables.values()}
        # Rows applied from peers carry their own hlc: they are not local changes.
        # Each (table, op)'s keys in one query, each key once in seq order (dict.fromkeys):
        # no Python per log row, which a bulk insert of 100k rows would feel.
        local = "FROM _p2p_log WHERE seq >= ?1 AND hlc IS NULL"
        for tid, op in conn.execute(f"SELECT DISTINCT tid, op {local}", (first,)).fetchall():
            if tid in names:
                keys = conn.execute(f"SELECT pk {local} AND tid = ?2 AND op = ?3 ORDER BY seq", (first, tid, op))
                lists = batch.by_table.setdefault(names[tid], {"inserted": [], "updated": [], "deleted": []})
                lists[OP_NAMES[op]] = list(dict.fromkeys(map(itemgetter(0), keys)))
    return batch


#: ``_p2p_meta`` key: every log row at or below it was considered by ``compact``.
COMPACTED_KEY = "compacted_seq"
#: Log rows one ``compact`` call looks at (one transaction, short enough that
#: API writes waiting for the store barely notice).
COMPACT_CHUNK = 20_000


#: The newest log rows the daemon's compaction leaves alone, whatever they
#: are: ``_p2p_changes`` keeps showing recent history (what a person
#: debugging a sync, or a test, looks at).
COMPACT_KEEP_RECENT = 10_000


def hlc_sql(seq: str) -> str:
    """The clock value of the local log row at ``seq`` (an SQL expression):
    the base of the stamp range with the greatest ``first_seq`` at or below
    it, plus its offset; NULL before every range (not stamped)."""
    return (f"(SELECT s.base_hlc + {seq} - s.first_seq FROM _p2p_stamps s WHERE s.first_seq <= {seq} "
            "ORDER BY s.first_seq DESC LIMIT 1)")


#: Stamp ranges ``interval_stamps`` lists at most.
LITERAL_STAMPS = 16


def interval_stamps(conn: sqlite3.Connection, since: int, last: int) -> list[tuple[int, int]] | None:
    """The stamp ranges over log rows whose seq is in (``since``, ``last``],
    as (first seq, base clock) in seq order — a batch of appended rows lies
    in one to three — for ``stamped`` to work out each row's clock from its
    seq, as ``hlc_sql`` would; None: more than ``LITERAL_STAMPS`` (many
    small transactions), to look each row's range up with ``hlc_sql``."""
    ranges = conn.execute(
        "SELECT first_seq, base_hlc FROM _p2p_stamps WHERE first_seq <= ?2 AND first_seq >= "
        "coalesce((SELECT max(first_seq) FROM _p2p_stamps WHERE first_seq <= ?1), ?1) ORDER BY first_seq DESC LIMIT ?3",
        (since + 1, last, LITERAL_STAMPS + 1),
    ).fetchall()
    if len(ranges) > LITERAL_STAMPS:
        return None
    return [(int(first), int(base)) for first, base in reversed(ranges)]


def stamped(seqs: Sequence[int], stamps: Sequence[tuple[int, int]]) -> list[int]:
    """The clocks of the log rows at ``seqs`` (ascending, none before the
    first of ``stamps``: ``interval_stamps``), a run of rows per range:
    within a range a row's clock is its seq plus the range's offset. The
    sender's block query then reads a value less a row (a value SQLite hands
    Python costs more than this addition)."""
    out: list[int] = []
    for i, (first, base) in enumerate(stamps):
        end = bisect.bisect_left(seqs, stamps[i + 1][0]) if i + 1 < len(stamps) else len(seqs)
        offset = base - first
        out += [seq + offset for seq in seqs[len(out):end]]
    return out


def drop_unused_stamps(conn: sqlite3.Connection, low: int, end: int) -> None:
    """Delete the clock ranges ending in (low, end] that no longer cover a
    local log row: nothing looks them up (a row finds the range with the
    greatest first_seq at or below it). The newest stays: it says how far
    stamping got."""
    conn.execute(
        "DELETE FROM _p2p_stamps WHERE last_seq > ? AND last_seq <= ? "
        "AND first_seq < (SELECT max(first_seq) FROM _p2p_stamps) "
        "AND NOT EXISTS (SELECT 1 FROM _p2p_log l WHERE l.seq BETWEEN first_seq AND last_seq AND l.hlc IS NULL)",
        (low, end),
    )


def compact(conn: sqlite3.Connection, state: CaptureState, chunk: int = COMPACT_CHUNK, keep_recent: int = 0,
            *, sweep: bool = True) -> int:
    """Delete log rows that nothing reads any more; the number deleted.

    The log would otherwise grow by a row per change forever. What must stay:
    - rows not yet stamped (above ``state.stamped_seq``): stamping reads them;
    - the highest ``seq``: sequence numbers are never reused;
    - local rows of collaborative tables: the stream sends each key's current
      row with its newest change's clock, found in the log. (A key's older
      rows say nothing more, but finding them needs an index on (tid, pk),
      and with one SQLite answers the stream's seq-range queries by scanning
      a table's whole log: they stay.)
    What goes besides: the rest, once stamped — local rows of single_version
    tables (their state lives in ``_p2p_cells``/``_p2p_tombs``, which the
    stream reads) and rows applied from peers (their clocks live in cells or
    device tables; they are never sent on from the log) — and the
    ``_p2p_stamps`` ranges left covering no local row. ``_p2p_changes``
    then shows only what stays, and the newest ``keep_recent`` seqs. Call it
    in a transaction; it looks at ``chunk`` log rows past the last call's
    mark, so repeated calls walk the whole log once. Each call also looks
    at a chunk of each single_version table's row clocks for orphans
    (``cells.sweep_orphans``) — unless ``sweep`` is False: the compactions a
    large sync or bulk insert makes as it goes drop log rows only (a sweep
    there would probe the table twice over for every row written), and
    leave the orphans to the periodic one.
    """
    for table in state.tables.values() if sweep else ():
        if table.conflict_column is not None:
            mark = f"{ORPHANS_KEY}{table.tid}"
            set_meta(conn, mark, cells.sweep_orphans(conn, cells.RowKeys.of(table), get_meta(conn, mark)))
    top = last_seq(conn)
    high = min(state.stamped_seq, top) - keep_recent
    low = int(get_meta(conn, COMPACTED_KEY, 0))
    if high <= low:
        return 0
    end = conn.execute(
        "SELECT max(seq) FROM (SELECT seq FROM _p2p_log WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?)", (low, high, chunk)
    ).fetchone()[0]
    if end is None:  # nothing left between the mark and the bound
        set_meta(conn, COMPACTED_KEY, high)
        return 0
    single_version = [tid for tid, t in state.tables.items() if t.conflict_column is not None]
    marks = ", ".join("?" * len(single_version)) or "NULL"
    dropped = conn.execute(
        f"DELETE FROM _p2p_log WHERE seq > ? AND seq <= ? AND seq < ? AND (origin IS NOT NULL OR tid IN ({marks}))",
        (low, end, top, *single_version),
    ).rowcount
    drop_unused_stamps(conn, low, end)
    # The highest row stays; the next call looks at it again, when it may not be the highest.
    set_meta(conn, COMPACTED_KEY, min(end, top - 1))
    return dropped


#: ``_p2p_meta`` key prefix (+ tid): the row clock key ``cells.sweep_orphans`` goes on after.
ORPHANS_KEY = "orphans_swept_"
