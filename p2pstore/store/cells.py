"""Where the per-column clocks of single_version rows are stored: one
clock per row in the common case.

Per-column last-writer-wins needs, for each synced column of each row, the
clock (hlc, origin) of its current value, the local ``seq`` at which it
last changed here, and the clock it knowingly superseded (``prev``). Stored
one row per column (``_p2p_cells``), that is four to ten metadata rows per
data row, each keyed by the row's conflict value: most of a store's size
and most of a sync's time (docs/performance.md). But a row's columns
nearly always share that whole tuple — an insert sets them all at once, a
peer's row arrives whole — so:

- ``_p2p_rows(tid, ck)`` holds the one tuple the row's columns share;
- ``_p2p_cells(tid, ck, col)`` holds a column's own tuple only where it
  differs (a one-column update, concurrent edits merged column by column).

Invariants:
- The *logical* cell of column ``c`` of row ``ck`` is its ``_p2p_cells``
  entry if there is one, else the ``_p2p_rows`` entry, else none. Every
  reader and writer goes through that rule (``expand``), so per-column
  semantics are exactly those of one row per cell; the view
  ``_p2p_clocks`` shows the logical cells (accepted_schema.SCHEMA_SQL).
- A ``_p2p_rows`` entry exists only for a row that has a logical cell for
  every current sync column. When the sync columns change (a new
  sync_schema.json), ``explode`` first turns the table's entries into
  per-column cells for the old columns, so none ever covers a column it
  did not hold.
- A file of the release before (cells only, no ``_p2p_rows``) is a valid
  state; ``fold`` compacts it once at open (``migrate``).
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from p2pstore.schema.predicates import quote_ident
from p2pstore.store import origins

log = logging.getLogger(__name__)

#: A stored clock tuple: (hlc, origin, seq, prev_hlc, prev_origin); origin NULL = this device.
Stored = tuple[Any, Any, Any, Any, Any]

#: Keys per ``IN (...)`` list (SQLite's default limit is 32766 variables).
IN_CHUNK = 500

_FIELDS = "hlc, origin, seq, prev_hlc, prev_origin"


def load(conn: sqlite3.Connection, tid: int, cks: Sequence[Any]) -> tuple[dict[Any, Stored], dict[Any, dict[str, Stored]]]:
    """The stored entries of rows ``cks``: their row tuples and their
    per-column ones, each by ck (matched by exact value, as SQLite returns it)."""
    rows: dict[Any, Stored] = {}
    cols: dict[Any, dict[str, Stored]] = {}
    for i in range(0, len(cks), IN_CHUNK):
        chunk = list(cks[i:i + IN_CHUNK])
        marks = ", ".join("?" * len(chunk))
        for ck, *clock in conn.execute(f"SELECT ck, {_FIELDS} FROM _p2p_rows WHERE tid = ? AND ck IN ({marks})", (tid, *chunk)):
            rows[ck] = tuple(clock)  # type: ignore[assignment]
        for ck, col, *clock in conn.execute(
            f"SELECT ck, col, {_FIELDS} FROM _p2p_cells WHERE tid = ? AND ck IN ({marks})", (tid, *chunk)
        ):
            cols.setdefault(ck, {})[col] = tuple(clock)  # type: ignore[assignment]
    return rows, cols


def expand(row: Stored | None, cols: dict[str, Stored] | None, columns: Iterable[str]) -> dict[str, Stored]:
    """The logical cells of one row: each column's own entry, else the row's."""
    out = dict(cols) if cols else {}
    if row is not None:
        for c in columns:
            out.setdefault(c, row)
    return out


def normalize(cells: dict[str, Stored], columns: Sequence[str]) -> tuple[Stored | None, dict[str, Stored]]:
    """The row tuple and the per-column entries that store ``cells``: the
    tuple most sync columns share becomes the row's (only if every sync
    column has a cell), the rest stay per column."""
    if not columns:
        return None, dict(cells)
    shared = cells.get(columns[0])
    if shared is None:
        return None, dict(cells)
    if len(cells) == len(columns) and all(cells.get(c) == shared for c in columns):
        return shared, {}  # the usual case: one change wrote the whole row
    if any(c not in cells for c in columns):
        return None, dict(cells)
    counts = Counter(cells[c] for c in columns)
    # Most shared; on a tie the newest (highest seq), which later writes are likeliest to keep.
    row = max(counts, key=lambda t: (counts[t], t[2]))
    return row, {c: v for c, v in cells.items() if v != row}


class Writer:
    """Collects the new cells of a batch's rows and writes them with a few
    ``executemany`` calls (the merge's end of a batch)."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.drop_rows: list[tuple[Any, Any]] = []
        self.drop_cols: list[tuple[Any, Any]] = []
        self.cols: list[tuple[Any, ...]] = []

    def put(self, tid: int, ck: Any, cells: dict[str, Stored], columns: Sequence[str], *, had_row: bool, had_cols: bool) -> None:
        """Store ``cells`` (every logical cell of the row after the merge)."""
        row, own = normalize(cells, columns)
        if row is not None:
            self.rows.append((tid, ck, *row))
        elif had_row:
            self.drop_rows.append((tid, ck))
        if had_cols:
            self.drop_cols.append((tid, ck))
        self.cols += [(tid, ck, col, *clock) for col, clock in own.items()]

    def write(self, conn: sqlite3.Connection) -> None:
        conn.executemany("DELETE FROM _p2p_rows WHERE tid = ? AND ck = ?", self.drop_rows)
        conn.executemany("DELETE FROM _p2p_cells WHERE tid = ? AND ck = ?", self.drop_cols)
        conn.executemany(f"INSERT OR REPLACE INTO _p2p_rows(tid, ck, {_FIELDS}) VALUES (?, ?, ?, ?, ?, ?, ?)", self.rows)
        conn.executemany(f"INSERT OR REPLACE INTO _p2p_cells(tid, ck, col, {_FIELDS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self.cols)


def explode(conn: sqlite3.Connection, tid: int, table: str, only: str = "", params: Sequence[Any] = ()) -> None:
    """Turn the row tuples of ``table`` (those whose ck is in ``only``, an
    SQL ``IN`` operand; all when empty) into per-column cells for its
    current sync columns. A column's own cell, where there is one, stays."""
    where = f" AND r.ck IN {only}" if only else ""
    conn.execute(
        f"INSERT OR IGNORE INTO _p2p_cells(tid, ck, col, {_FIELDS}) "
        f"SELECT r.tid, r.ck, s.col, r.hlc, r.origin, r.seq, r.prev_hlc, r.prev_origin "
        f"FROM _p2p_rows r JOIN _p2p_sync_columns s ON s.tbl = ? WHERE r.tid = ?{where}",
        (table, tid, *params),
    )
    conn.execute(f"DELETE FROM _p2p_rows AS r WHERE r.tid = ?{where}", (tid, *params))


def fold(conn: sqlite3.Connection, tid: int, table: str, only: str = "", params: Sequence[Any] = ()) -> int:
    """The reverse of ``explode``: rows (``only`` as there) whose every sync
    column has a cell get a row tuple — the one most of their columns share —
    and lose the cells equal to it. Returns the number of rows folded."""
    where = f" AND c.ck IN {only}" if only else ""
    ncols = conn.execute("SELECT count(*) FROM _p2p_sync_columns WHERE tbl = ?", (table,)).fetchone()[0]
    if not ncols:
        return 0
    # Per row, the tuple with the most columns (SQLite's bare columns of max()).
    folded = conn.execute(
        f"INSERT OR REPLACE INTO _p2p_rows(tid, ck, {_FIELDS}) "
        f"SELECT tid, ck, {_FIELDS} FROM ("
        f"  SELECT tid, ck, max(n * 4294967296 + seq) AS best, {_FIELDS} FROM ("
        f"    SELECT c.tid, c.ck, c.hlc, c.origin, c.seq, c.prev_hlc, c.prev_origin, count(*) AS n, "
        f"           sum(count(*)) OVER (PARTITION BY c.ck) AS total "
        f"    FROM _p2p_cells c JOIN _p2p_sync_columns s ON s.tbl = ? AND s.col = c.col WHERE c.tid = ?{where} "
        f"    GROUP BY c.ck, c.hlc, c.origin, c.seq, c.prev_hlc, c.prev_origin"
        f"  ) WHERE total = ? GROUP BY ck)",
        (table, tid, *params, ncols),
    ).rowcount
    if folded:
        conn.execute(
            f"DELETE FROM _p2p_cells AS c WHERE c.tid = ?{where} AND EXISTS (SELECT 1 FROM _p2p_rows r "
            "WHERE r.tid = c.tid AND r.ck = c.ck AND r.hlc = c.hlc AND r.origin IS c.origin AND r.seq = c.seq "
            "AND r.prev_hlc IS c.prev_hlc AND r.prev_origin IS c.prev_origin)",
            (tid, *params),
        )
    return max(folded, 0)


#: ``_p2p_meta`` key: 2 once the file's cells were folded (issue 11's format).
FORMAT_KEY = "cells_format"
FORMAT = 2


def migrate(conn: sqlite3.Connection, get_meta: Any, set_meta: Any) -> None:
    """Fold a file of the release before once (inside the caller's write
    transaction), logging what it did: its per-column cells become one
    tuple per row. ``get_meta``/``set_meta``: capture's accessors (this
    module sits below capture)."""
    if int(get_meta(conn, FORMAT_KEY, 0) or 0) >= FORMAT:
        return
    tables = conn.execute(
        "SELECT tid, name FROM _p2p_tables WHERE kind = 'local' AND conflict_col IS NOT NULL ORDER BY tid"
    ).fetchall()
    for tid, name in tables:
        before = conn.execute("SELECT count(*) FROM _p2p_cells WHERE tid = ?", (tid,)).fetchone()[0]
        if not before:
            continue
        log.info("table %s: moving %d per-column clocks to one clock per row (once, after an upgrade)", name, before)
        rows = fold(conn, tid, name)
        after = conn.execute("SELECT count(*) FROM _p2p_cells WHERE tid = ?", (tid,)).fetchone()[0]
        log.info("table %s: %d rows now have one clock; %d per-column clocks remain (columns edited on their own)",
                 name, rows, after)
    set_meta(conn, FORMAT_KEY, FORMAT)


def empty_sql(conn: sqlite3.Connection, table: str, column: str, prefix: str = "") -> str:
    """SQL true when ``column`` of a row holds nothing written: NULL, or the
    column's declared default (what ``ALTER TABLE ... ADD COLUMN`` filled in)."""
    default = next((r[4] for r in conn.execute(f"PRAGMA table_info({quote_ident(table)})") if r[1] == column), None)
    return f"{prefix}{quote_ident(column)} IS {'NULL' if default is None else f'({default})'}"


def unpark(conn: sqlite3.Connection, tid: int, table: str, ck_column: str, key_expr: str, columns: Sequence[str],
           device_id: Callable[[sqlite3.Connection], str], log_op: int) -> int:
    """Merge the parked cells of ``columns`` — sync columns an accepted
    upgrade just added to ``table`` — under their own clocks; the number merged.

    A parked cell (a peer on the newer schema sent it before this device
    synced the column) takes its row's column when that holds nothing written
    here (NULL or the default: ``empty_sql``), the row exists and no newer
    tomb hides it: the value is written, the cell gets the parked clock and
    a new log seq (``log_op``, logged as received, so it travels on). A value
    written here before the column synced is kept: the re-send after the
    upgrade gives it a fresh clock and it wins. Every parked cell of
    ``columns`` is gone afterwards. Inside the caller's transaction;
    ``device_id``: capture's (this module sits below capture).
    """
    if conn.execute("SELECT 1 FROM _p2p_parked WHERE tid = ? LIMIT 1", (tid,)).fetchone() is None:
        return 0  # the usual case (and a store that never synced has no device ID to ask for)
    me = device_id(conn)
    numbers = origins.Origins(conn)
    name, ck = quote_ident(table), quote_ident(ck_column)
    newer_tomb = ("EXISTS (SELECT 1 FROM _p2p_tombs t WHERE t.tid = p.tid AND t.ck = p.ck AND (t.hlc > p.hlc OR "
                  f"(t.hlc = p.hlc AND {origins.device_sql('t.origin', '?3')} > p.origin)))")
    merged = 0
    conn.execute("INSERT INTO _p2p_apply(x) VALUES (1)")  # capture triggers: not a local change
    try:
        for col in columns:
            found = conn.execute(
                f"SELECT p.ck, x.{key_expr}, p.hlc, p.origin, p.prev_hlc, p.prev_origin FROM _p2p_parked p "
                f"JOIN {name} x ON x.{ck} = p.ck WHERE p.tid = ?1 AND p.col = ?2 AND {empty_sql(conn, table, col, 'x.')} "
                f"AND NOT {newer_tomb}",
                (tid, col, me),
            ).fetchall()
            for key, pk, hlc, origin, prev_hlc, prev_origin in found:
                conn.execute(f"UPDATE {name} SET {quote_ident(col)} = (SELECT value FROM _p2p_parked WHERE tid = ? AND ck = ? AND col = ?) "
                             f"WHERE {ck} = ?", (tid, key, col, key))
                seq = conn.execute("INSERT INTO _p2p_log(tid, pk, op, hlc, origin, ck) VALUES (?, ?, ?, ?, ?, NULL)",
                                   (tid, pk, log_op, hlc, numbers.number(conn, origin))).lastrowid
                stored = (lambda device: None if device is None or device == me else numbers.number(conn, device))
                conn.execute(f"INSERT OR REPLACE INTO _p2p_cells(tid, ck, col, {_FIELDS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (tid, key, col, hlc, stored(origin), seq, prev_hlc, stored(prev_origin)))
                merged += 1
            conn.execute("DELETE FROM _p2p_parked WHERE tid = ? AND col = ?", (tid, col))
    finally:
        conn.execute("DELETE FROM _p2p_apply")
    if merged:
        log.info("table %s: %d value(s) peers sent before the upgrade merged under their own clocks", table, merged)
    return merged
