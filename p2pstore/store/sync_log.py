"""The sync log: one entry per sync session of a store — started here
(manual, auto-sync, anti-entropy) or by a peer (served), sending or
receiving, whatever its outcome — kept in the store, the newest ``keep``
entries (config ``sync_log_entries``).

It answers "what happened when" after the fact (``p2pstore log``,
``store.sync_log``): which peer, which way, what filter, the result code,
the rows sent / applied / in conflict / failed / parked, how long it took and the
message. The engine writes it (sync/engine.py ``_logged_session``); a sync
never fails because its entry could not be written.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from typing import Any

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS _p2p_sync_log(
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,                -- unix ms when the session started
    peer TEXT NOT NULL,
    direction TEXT NOT NULL,            -- this device's part: send or receive
    kind TEXT NOT NULL,                 -- manual, auto, anti-entropy (started here) or served (started by the peer)
    tbl TEXT,                           -- the table synced (NULL: every distributed table)
    filter TEXT,                        -- the row filter (JSON), NULL for none
    code INTEGER NOT NULL,              -- the result code (SPEC §2)
    sent INTEGER NOT NULL, applied INTEGER NOT NULL, conflicts INTEGER NOT NULL, failed INTEGER NOT NULL,
    parked INTEGER NOT NULL DEFAULT 0,  -- row changes kept for columns the receiver lacks (docs/evolutions.md)
    duration_ms INTEGER NOT NULL,
    message TEXT NOT NULL
);
"""

#: Entries kept per store when the config does not say (``sync_log_entries``).
DEFAULT_KEEP = 1000


@dataclass(frozen=True, slots=True)
class Entry:
    at: int
    peer: str
    direction: str
    kind: str
    table: str | None
    filter: str | None
    code: int
    sent: int
    applied: int
    conflicts: int
    failed: int
    parked: int
    duration_ms: int
    message: str


def migrate(conn: sqlite3.Connection) -> None:
    """A log made before ``parked`` was counted gains the column (once, at open)."""
    if "parked" not in {r[1] for r in conn.execute("PRAGMA table_info(_p2p_sync_log)")}:
        conn.execute("ALTER TABLE _p2p_sync_log ADD COLUMN parked INTEGER NOT NULL DEFAULT 0")


def record(conn: sqlite3.Connection, entry: Entry, keep: int) -> None:
    """Append ``entry`` and forget all but the newest ``keep`` (inside the caller's transaction)."""
    e = asdict(entry)
    cursor = conn.execute(
        "INSERT INTO _p2p_sync_log(at, peer, direction, kind, tbl, filter, code, sent, applied, conflicts, failed, parked, duration_ms, "
        "message) VALUES (:at, :peer, :direction, :kind, :table, :filter, :code, :sent, :applied, :conflicts, :failed, :parked, "
        ":duration_ms, :message)", e)
    conn.execute("DELETE FROM _p2p_sync_log WHERE id <= ?", (int(cursor.lastrowid or 0) - keep,))


def entries(conn: sqlite3.Connection, limit: int, peer: str | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` entries (of ``peer`` only, if given), newest first."""
    where, params = (" WHERE peer = ?", (peer,)) if peer is not None else ("", ())
    cursor = conn.execute(
        "SELECT id, at, peer, direction, kind, tbl AS \"table\", filter, code, sent, applied, conflicts, failed, parked, duration_ms, message "
        f"FROM _p2p_sync_log{where} ORDER BY id DESC LIMIT ?", (*params, limit))
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor]
