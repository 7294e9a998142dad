"""This device's end of each replica link of a store (protocol/replica_kind.py).

A link is (peer, kind): ``two-way`` unless set, ``send`` / ``receive`` for a
one-way pair, ``checkout`` for the child of a check-out, which also keeps
its selection (table, filter) and whether it was checked in (``closed``:
no more syncs with that peer until the kind is set again).

A store with a ``receive`` link is a child replica: its distributed tables
get the read-only guards of device tables (``capture.read_only_triggers_sql``),
so applications — through the API or any other SQLite client — can't change
rows that only the parent's changes may write (seed 004's child edits would
be overwritten silently; here they are refused with ``READ_ONLY_TABLE``).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from p2pstore.protocol.replica_kind import ReplicaKind
from p2pstore.schema.predicates import quote_ident
from p2pstore.store import capture

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS _p2p_replicas(
    peer TEXT PRIMARY KEY,
    kind TEXT NOT NULL,             -- send, receive or checkout (no row: two-way)
    tbl TEXT, filter TEXT,          -- checkout: the selection (filter: the where, as JSON)
    closed INTEGER NOT NULL DEFAULT 0,  -- checkout: 1 once checked in
    at INTEGER NOT NULL             -- unix ms when set
) WITHOUT ROWID;
"""

OPEN, CLOSED = "open", "closed"


@dataclass(frozen=True, slots=True)
class Link:
    peer: str
    kind: ReplicaKind
    table: str | None = None
    filter: str | None = None
    closed: bool = False
    at: int = 0

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"peer": self.peer, "kind": self.kind.value}
        if self.kind is ReplicaKind.CHECKOUT:
            out.update(table=self.table, filter=self.filter, state=CLOSED if self.closed else OPEN)
        return out


def load(conn: sqlite3.Connection) -> dict[str, Link]:
    return {peer: Link(peer, ReplicaKind(kind), tbl, flt, bool(closed), at)
            for peer, kind, tbl, flt, closed, at in conn.execute("SELECT peer, kind, tbl, filter, closed, at FROM _p2p_replicas")}


def put(conn: sqlite3.Connection, link: Link) -> None:
    """Record ``link`` (a ``two-way`` one is the default: its row goes) and
    put the read-only guards where a ``receive`` link wants them."""
    if link.kind is ReplicaKind.TWO_WAY:
        conn.execute("DELETE FROM _p2p_replicas WHERE peer = ?", (link.peer,))
    else:
        conn.execute("INSERT OR REPLACE INTO _p2p_replicas(peer, kind, tbl, filter, closed, at) VALUES (?, ?, ?, ?, ?, ?)",
                     (link.peer, link.kind.value, link.table, link.filter, int(link.closed), link.at))
    guard(conn)


def guard(conn: sqlite3.Connection) -> None:
    """Read-only guards on every distributed table while the store has a
    ``receive`` link, none otherwise (after a link or the distributed tables changed)."""
    parent = conn.execute("SELECT peer FROM _p2p_replicas WHERE kind = ? ORDER BY peer LIMIT 1", (ReplicaKind.RECEIVE.value,)).fetchone()
    for (table,) in conn.execute("SELECT name FROM _p2p_tables WHERE kind = 'local'").fetchall():
        for name in capture.read_only_trigger_names(table):
            conn.execute(f"DROP TRIGGER IF EXISTS {quote_ident(name)}")
        if parent is not None:
            for sql in capture.read_only_triggers_sql(table, parent[0], why="is a receive replica of device"):
                conn.execute(sql)
