"""Conflict policies of single_version tables, and the manual reconciler's queue (seed 004).

A table's policy is set the same on every device (a difference is reported
in ``devices.list``, like a schema mismatch):

- ``lww`` (the default): per column, the newest clock wins; the loser goes
  to the conflict log (merge.py's rules).
- ``priority`` with a list of devices, strongest first ("in favour of"
  a device; local-wins and remote-wins are a list both sides agree on):
  every other device merges as ``lww`` does; the first device of the list,
  the **arbiter**, decides each concurrent pair it merges: when ``lww``
  would keep the value of the device that ranks lower (a device not in the
  list ranks below every listed one; equal ranks leave it to ``lww``), it
  writes the favoured value again as its own decision (below). Decisions
  need no person, so the store is never *in conflict*.
- ``manual`` with a named **reconciler** device: every other device merges
  as ``lww`` does; on the reconciler, an incoming change made concurrently
  with the value held here is **queued**, not applied — the value here
  stays until a person resolves the entry (take the local value, the
  remote one, or a new one).

``detect: row`` widens what is a conflict from two concurrent edits of one
column to concurrent edits of any columns of one row: the reconciler queues
them; under ``lww`` and ``priority`` values still merge column by column
(nothing is lost) and the pair is logged as a *row conflict* (the conflict
log's ``other_column``), so a person can check the record.

Why one device decides, not every device by the list: comparing ranks
write by write as each device merges is not transitive (a over b by rank,
b over c because b's writer had seen c, c over a by rank), so devices
merging the same writes in different orders could end apart; and were
every device to write favoured values again, each would do it under its
own clock and name, so a value would lose its author's rank at the next
comparison. One arbiter's decision is an ordinary later edit everywhere
else, exactly as a manual resolution is — so the convergence argument (and
property test) of ``manual`` carries over.

Concurrent means: written on another device, and neither writer had seen
the other's value (``prev``, what a writer knowingly superseded, is older
than the other's clock) — the same test that keeps ordinary later edits out
of the conflict log (merge.py ``_Applier.conflict``).

A resolution (or an arbiter's decision) is written here with a fresh clock — newer than both sides,
since the reconciler has seen both — whose ``prev`` is the newer of the two
clocks: the value every ``lww`` device holds. So it replaces that value
everywhere as an ordinary later edit, and no device logs a conflict for it.
While the queue is not empty the store is *in conflict*: it still receives,
but sends nothing (sync code 19 ``IN_CONFLICT``), so the value it holds in
place of the ``lww`` winner does not spread before a person decided.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from p2pstore.clock import HybridClock
from p2pstore.schema.predicates import quote_ident
from p2pstore.store import capture, cells, changes, origins
from p2pstore.protocol.batch import Cell, RowChange
from p2pstore.store.lww import Clock, Stamp, bind

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS _p2p_policies(tbl TEXT PRIMARY KEY, policy TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _p2p_queue(
    id INTEGER PRIMARY KEY,
    tbl TEXT NOT NULL, ck NOT NULL, col TEXT NOT NULL,
    local_value, local_hlc INTEGER, local_origin TEXT,     -- what this device holds (and keeps meanwhile)
    remote_value, remote_hlc INTEGER NOT NULL, remote_origin TEXT NOT NULL,
    at INTEGER NOT NULL,                                   -- unix ms when queued
    UNIQUE (tbl, ck, col, remote_hlc, remote_origin)
);
"""

LWW, PRIORITY, MANUAL = "lww", "priority", "manual"
COLUMN, ROW = "column", "row"


@dataclass(frozen=True, slots=True)
class Policy:
    kind: str = LWW
    reconciler: str | None = None
    detect: str = COLUMN
    devices: tuple[str, ...] = ()  # priority: strongest first

    def text(self) -> str:
        """The canonical form: what is stored, offered to peers and compared."""
        out: dict[str, Any] = {"kind": self.kind, "detect": self.detect}
        if self.reconciler is not None:
            out["reconciler"] = self.reconciler
        if self.devices:
            out["devices"] = list(self.devices)
        return json.dumps(out, sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> Policy:
        d = json.loads(text)
        return cls(d["kind"], d.get("reconciler"), d.get("detect", COLUMN), tuple(d.get("devices", ())))

    @property
    def decider(self) -> str | None:
        """The one device that decides this table's conflicts (None: ``lww`` everywhere)."""
        if self.kind == MANUAL:
            return self.reconciler
        return self.devices[0] if self.kind == PRIORITY and self.devices else None

    def favoured(self, mine: Stamp, theirs: Stamp) -> Stamp | None:
        """Of two concurrent cells, the one whose writer ranks higher (None: equal ranks)."""
        rank = {device: i for i, device in enumerate(self.devices)}
        a, b = rank.get(mine.clock[1], len(rank)), rank.get(theirs.clock[1], len(rank))
        return None if a == b else mine if a < b else theirs

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.text())


DEFAULT = Policy()


def load(conn: sqlite3.Connection) -> dict[str, Policy]:
    """Every table's policy that is not the default."""
    return {tbl: Policy.parse(text) for tbl, text in conn.execute("SELECT tbl, policy FROM _p2p_policies")}


def put(conn: sqlite3.Connection, table: str, policy: Policy) -> None:
    if policy == DEFAULT:
        conn.execute("DELETE FROM _p2p_policies WHERE tbl = ?", (table,))
    else:
        conn.execute("INSERT OR REPLACE INTO _p2p_policies(tbl, policy) VALUES (?, ?)", (table, policy.text()))


def concurrent(mine: Stamp | None, theirs: Stamp) -> bool:
    """Whether ``theirs`` was written on another device without its writer
    having seen ``mine``, nor ``mine``'s writer ``theirs``."""
    if mine is None or mine.clock[1] == theirs.clock[1] or mine.clock == theirs.clock:
        return False
    return not ((theirs.prev is not None and theirs.prev >= mine.clock) or (mine.prev is not None and mine.prev >= theirs.clock))


def enqueue(conn: sqlite3.Connection, table: str, ck: Any, col: str, local: tuple[Any, Clock | None],
            remote: tuple[Any, Clock], at: int) -> bool:
    """Queue an incoming value (once per change); whether it is new."""
    (lmark, rmark), (lvalue, rvalue) = bind([local[0], remote[0]])
    lclock = local[1] or (None, None)
    return conn.execute(
        "INSERT OR IGNORE INTO _p2p_queue(tbl, ck, col, local_value, local_hlc, local_origin, remote_value, remote_hlc, "
        f"remote_origin, at) VALUES (?, ?, ?, {lmark}, ?, ?, {rmark}, ?, ?, ?)",
        (table, ck, col, lvalue, lclock[0], lclock[1], rvalue, remote[1][0], remote[1][1], at)).rowcount > 0


def queued(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM _p2p_queue").fetchone()[0])


_ENTRY = "id, tbl AS \"table\", ck AS key, col AS column, local_value, local_hlc, local_origin, remote_value, remote_hlc, remote_origin, at"


def entries(conn: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    """The queue, oldest first."""
    cursor = conn.execute(f"SELECT {_ENTRY} FROM _p2p_queue ORDER BY id LIMIT ?", (limit,))
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor]


def entry(conn: sqlite3.Connection, entry_id: int) -> dict[str, Any] | None:
    cursor = conn.execute(f"SELECT {_ENTRY} FROM _p2p_queue WHERE id = ?", (entry_id,))
    row = cursor.fetchone()
    return dict(zip([d[0] for d in cursor.description], row)) if row is not None else None


def held(conn: sqlite3.Connection, table: changes.SyncTable, e: dict[str, Any]) -> tuple[Any, Any] | None:
    """Entry ``e``'s row here: (its key, the value its column holds now), or
    None when the row was deleted since it was queued — then there is no
    value here left to choose (merge.settle releases the entry)."""
    assert table.conflict_column is not None
    return conn.execute(f"SELECT {table.info.key_expr}, {quote_ident(e['column'])} FROM {quote_ident(table.info.name)} "
                        f"WHERE {quote_ident(table.conflict_column)} = ?", (e["key"],)).fetchone()


def resolve(conn: sqlite3.Connection, clock: HybridClock, table: changes.SyncTable, e: dict[str, Any], row: tuple[Any, Any],
            take: str, value: Any = None, *, wall: int | None = None) -> Any:
    """Settle entry ``e``, whose row is ``row`` (``held``), inside the
    caller's write transaction: keep the value held here now (``local``),
    take the queued one (``remote``), or write ``value``. It is written with
    a clock newer than both sides, whose ``prev`` is the newer of the two
    clocks, so every device takes it as an ordinary later edit. The value written."""
    chosen = row[1] if take == "local" else e["remote_value"] if take == "remote" else value
    _write(conn, clock, table, e, row[0], chosen, wall)
    return chosen


def released(e: dict[str, Any], key_column: str) -> RowChange:
    """Entry ``e``'s change as a peer sent it (for the merge): its value under its own clock."""
    return RowChange(e["table"], key_column, e["key"], 0, (Cell(e["column"], e["remote_value"], e["remote_hlc"], e["remote_origin"]),))


def _write(conn: sqlite3.Connection, clock: HybridClock, table: changes.SyncTable, e: dict[str, Any], pk: Any, value: Any,
           wall: int | None) -> None:
    assert table.conflict_column is not None
    name = quote_ident(table.info.name)
    conn.execute("INSERT INTO _p2p_apply(x) VALUES (1)")  # written here with its own clock, not captured
    try:
        (mark,), (param,) = bind([value])
        conn.execute(f"UPDATE {name} SET {quote_ident(e['column'])} = {mark} WHERE {quote_ident(table.conflict_column)} = ?",
                     (param, e["key"]))
    finally:
        conn.execute("DELETE FROM _p2p_apply")
    me, numbers = capture.device_id(conn), origins.Origins(conn)
    hlc = clock.now(wall)  # newer than both: this device has seen (observed) both values
    capture.set_meta(conn, "hlc_last", clock.last)
    # Logged as a received change is (its own clock, origin a number): it travels on, never stamped again.
    seq = conn.execute("INSERT INTO _p2p_log(tid, pk, op, hlc, origin, ck) VALUES (?, ?, ?, ?, ?, ?)",
                       (table.tid, pk, capture.OP_UPDATE, hlc, numbers.number(conn, me), e["key"])).lastrowid
    both = [(e["remote_hlc"], e["remote_origin"])] + ([(e["local_hlc"], e["local_origin"])] if e["local_hlc"] is not None else [])
    prev_hlc, prev_device = max(both)
    shared, own = cells.load(conn, cells.RowKeys.of(table), [e["key"]])
    logical = cells.expand(shared.get(e["key"]), own.get(e["key"]), table.sync_columns)
    logical[e["column"]] = (hlc, None, seq, prev_hlc, None if prev_device == me else numbers.number(conn, prev_device))
    writer = cells.Writer()
    writer.put(table.tid, e["key"], pk, logical, table.sync_columns, old_pk=pk, had_row=e["key"] in shared,
               had_cols=e["key"] in own)
    writer.write(conn)
