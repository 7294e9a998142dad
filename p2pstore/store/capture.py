"""Change capture: triggers write every change of a distributed table to the log.

Invariants:
- The log ``_p2p_log`` is append-only; ``seq`` grows with commit order
  because SQLite serialises writers. Compaction (a later concern) never
  removes the highest ``seq``, so rowids are never reused.
- Triggers are plain SQL, so writes by *any* process (the ``sqlite3`` shell, a
  second Python program) are captured. They record only (table, key, op,
  changed-column mask); the daemon stamps the hybrid-clock value and origin
  afterwards in one UPDATE per batch (``stamp``), which keeps the per-row cost
  to one small insert.
- While the daemon applies a peer's changes it puts a row in ``_p2p_apply``
  inside its own transaction. Capture triggers skip such writes (no echo), and
  the guards on collaborative device tables let them through. No other
  connection can see that uncommitted row, so outside writers are never
  exempted.
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
#: Origin 0 in the log means "this device".
LOCAL_ORIGIN = 0

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
CREATE TABLE IF NOT EXISTS _p2p_log(
    seq INTEGER PRIMARY KEY,
    tid INTEGER NOT NULL,
    pk,
    op INTEGER NOT NULL,
    cols INTEGER,
    hlc INTEGER,
    origin INTEGER
);
CREATE TABLE IF NOT EXISTS _p2p_apply(x);
"""


def trigger_names(table: str) -> list[str]:
    return [f"_p2p_{kind}_{table}" for kind in ("ins", "upd", "del")]


def capture_triggers_sql(tid: int, info: TableInfo) -> list[str]:
    """SQL creating the three capture triggers of one table."""
    t = quote_ident(info.name)
    key = info.key_expr
    ins, upd, dele = (quote_ident(n) for n in trigger_names(info.name))
    guard = "WHEN NOT EXISTS (SELECT 1 FROM _p2p_apply)"
    if len(info.columns) <= MAX_MASK_COLUMNS:
        mask = " | ".join(
            f"((OLD.{quote_ident(c)} IS NOT NEW.{quote_ident(c)}) << {i})" for i, c in enumerate(info.columns)
        )
    else:
        mask = "NULL"
    return [
        f"CREATE TRIGGER IF NOT EXISTS {ins} AFTER INSERT ON {t} {guard} BEGIN "
        f"INSERT INTO _p2p_log(tid, pk, op) VALUES ({tid}, NEW.{key}, {OP_INSERT}); END",
        # A key change is a delete of the old key and an insert of the new one.
        f"CREATE TRIGGER IF NOT EXISTS {upd} AFTER UPDATE ON {t} {guard} BEGIN "
        f"INSERT INTO _p2p_log(tid, pk, op) SELECT {tid}, OLD.{key}, {OP_DELETE} WHERE OLD.{key} IS NOT NEW.{key}; "
        f"INSERT INTO _p2p_log(tid, pk, op, cols) VALUES ({tid}, NEW.{key}, "
        f"CASE WHEN OLD.{key} IS NEW.{key} THEN {OP_UPDATE} ELSE {OP_INSERT} END, "
        f"CASE WHEN OLD.{key} IS NEW.{key} THEN {mask} END); END",
        f"CREATE TRIGGER IF NOT EXISTS {dele} AFTER DELETE ON {t} {guard} BEGIN "
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


@dataclass(slots=True)
class ChangeBatch:
    """Changes captured since the last stamp, grouped for ChangeInfo."""

    first_seq: int = 0
    last_seq: int = 0
    by_table: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.last_seq >= self.first_seq > 0

    def change_infos(self) -> list[dict[str, Any]]:
        return [
            {"table": table, "type": "data", **lists}
            for table, lists in sorted(self.by_table.items())
        ]


def get_meta(conn: sqlite3.Connection, key: str, default: Any = None) -> Any:
    row = conn.execute("SELECT value FROM _p2p_meta WHERE key = ?", (key,)).fetchone()
    return default if row is None else row[0]


def set_meta(conn: sqlite3.Connection, key: str, value: Any) -> None:
    conn.execute("INSERT OR REPLACE INTO _p2p_meta(key, value) VALUES (?, ?)", (key, value))


def stamp(conn: sqlite3.Connection, clock: HybridClock, *, collect: bool = True, wall: int | None = None) -> ChangeBatch:
    """Give unstamped log rows their clock value and origin; return them grouped.

    Runs inside the caller's transaction. The stamped high-water mark and the
    clock's last value move in the same transaction as the rows they cover.
    """
    stamped = int(get_meta(conn, "stamped_seq", 0))
    first, last = conn.execute("SELECT min(seq), max(seq) FROM _p2p_log WHERE seq > ?", (stamped,)).fetchone()
    batch = ChangeBatch()
    if first is None:
        return batch
    base = clock.reserve(last - first + 1, wall)
    conn.execute(
        "UPDATE _p2p_log SET hlc = ? + (seq - ?), origin = ? WHERE seq BETWEEN ? AND ? AND hlc IS NULL",
        (base, first, LOCAL_ORIGIN, first, last),
    )
    set_meta(conn, "stamped_seq", last)
    set_meta(conn, "hlc_last", clock.last)
    batch.first_seq, batch.last_seq = first, last
    if collect:
        names = dict(conn.execute("SELECT tid, name FROM _p2p_tables"))
        seen: set[tuple[str, int, Any]] = set()
        for tid, pk, op in conn.execute("SELECT tid, pk, op FROM _p2p_log WHERE seq BETWEEN ? AND ?", (first, last)):
            table = names.get(tid, str(tid))
            if (table, op, pk) in seen:
                continue
            seen.add((table, op, pk))
            lists = batch.by_table.setdefault(table, {"inserted": [], "updated": [], "deleted": []})
            lists[OP_NAMES[op]].append(pk)
    return batch
