"""Where the per-column clocks of single_version rows are stored: one
clock per row in the common case, keyed by the row's local key.

Per-column last-writer-wins needs, for each synced column of each row, the
clock (hlc, origin) of its current value, the local ``seq`` at which it
last changed here, and the clock it knowingly superseded (``prev``). Stored
one row per column (``_p2p_cells``), that is four to ten metadata rows per
data row, each keyed by the row's conflict value: most of a store's size
and most of a sync's time (docs/performance.md). But a row's columns
nearly always share that whole tuple — an insert sets them all at once, a
peer's row arrives whole — so:

- ``_p2p_rows(tid, pk)`` holds the one tuple the columns of the row whose
  local key (its rowid or primary key, what the log calls ``pk``) is
  ``pk`` share. Keyed by the local key, not by the conflict value: the
  table's own UNIQUE index on the conflict value finds a row, so the clocks
  need no second b-tree of (usually random) conflict values, and rows
  inserted in order get their clocks in order;
- ``_p2p_cells(tid, ck, col)`` holds a column's own tuple only where it
  differs (a one-column update, concurrent edits merged column by column),
  and every clock of a row that is not in the table (deleted: its values'
  clocks stay beside its tomb).

Invariants:
- The *logical* cell of column ``c`` of row ``ck`` is its ``_p2p_cells``
  entry if there is one, else the ``_p2p_rows`` entry of the local key the
  row with that conflict value has here, else none. Every reader and
  writer goes through that rule (``load``/``expand``), so per-column
  semantics are exactly those of one row per cell; ``clocks_view`` shows
  the logical cells.
- A ``_p2p_rows`` entry belongs to the row that holds its key in the
  table. A row that leaves the table (a delete, a change of its key or
  conflict value) first has its entry turned into per-column cells under
  its conflict value (``explode``): by the merge when a peer's delete
  removes it, by stamping (store/capture.py) for local writes, which the
  log records with the row's old key and value. An entry whose row left
  unseen (an ``INSERT OR REPLACE`` by another program deletes the row it
  replaces without a trigger) is an orphan: no reader joins it to a row,
  the next row given that key overwrites it, and compaction drops it
  (``sweep_orphans``).
- A ``_p2p_rows`` entry exists only for a row that has a logical cell for
  every current sync column. When the sync columns change (a new
  sync_schema.json), ``explode`` first turns the table's entries into
  per-column cells for the old columns, so none ever covers a column it
  did not hold.
- Files of earlier releases — cells only (release 1), or row tuples keyed
  by the conflict value (release 2) — are valid states; ``migrate`` turns
  them into this one once at open, with a log line.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from p2pstore.errors import CompositeKeyNotSupported, TableNotFound
from p2pstore.schema.predicates import quote_ident
from p2pstore.store import origins, row_runs
from p2pstore.store.tables import TableInfo, read_table_info

log = logging.getLogger(__name__)

#: A stored clock tuple: (hlc, origin, seq, prev_hlc, prev_origin); origin NULL = this device.
Stored = tuple[Any, Any, Any, Any, Any]

#: Keys per ``IN (...)`` list (SQLite's default limit is 32766 variables).
IN_CHUNK = 500

_FIELDS = "hlc, origin, seq, prev_hlc, prev_origin"


def same_key(pk: str, key: str) -> str:
    """SQL: the stored key ``pk`` (of ``_p2p_rows``, the log, ...) names the
    table's key ``key``.

    A stored key has no type affinity and a table's key has one: compared
    plainly, SQLite converts ``pk`` to the key's affinity and can no longer
    search ``pk``'s index, so it walks all of the table's row clocks for
    each row it looks up (tests/store/test_query_plans.py). Each side
    stripped of its affinity in turn (``+``) leaves both indexes usable and
    compares the same values: ``pk`` was stored from that key.
    """
    return f"({pk} = +{key} AND +{pk} = {key})"


class _Table(Protocol):
    tid: int
    info: TableInfo
    conflict_column: str | None


@dataclass(frozen=True, slots=True)
class RowKeys:
    """How the rows of one single_version table are found: its tid, and the
    SQL of its name, local key and conflict column."""

    tid: int
    name: str  # the table's name, unquoted (_p2p_sync_columns.tbl)
    table: str  # quoted
    key: str  # the local key expression (a quoted column, or rowid)
    ck: str  # the quoted conflict column

    @classmethod
    def of(cls, t: _Table) -> RowKeys:
        assert t.conflict_column is not None
        return cls(t.tid, t.info.name, quote_ident(t.info.name), t.info.key_expr, quote_ident(t.conflict_column))

    @classmethod
    def read(cls, conn: sqlite3.Connection, tid: int) -> RowKeys:
        """From what the store registered (``_p2p_tables``) and the table as it is."""
        name, ck = conn.execute("SELECT name, conflict_col FROM _p2p_tables WHERE tid = ?", (tid,)).fetchone()
        return cls(tid, name, quote_ident(name), read_table_info(conn, name).key_expr, quote_ident(ck))

    def rows_sql(self, where: str = "") -> str:
        """(pk, ck) of the table's rows (``where``: a condition on ``x``)."""
        return f"SELECT x.{self.key} AS pk, x.{self.ck} AS ck FROM {self.table} x" + (f" WHERE {where}" if where else "")


def load(conn: sqlite3.Connection, keys: RowKeys, cks: Sequence[Any]) -> tuple[dict[Any, Stored], dict[Any, dict[str, Stored]]]:
    """The stored entries of rows ``cks``: their row tuples (found through
    the table's row with that conflict value) and their per-column ones,
    each by ck. Per-column entries match by exact value, row tuples as the
    table compares; one key alone is given back under the key asked for."""
    rows: dict[Any, Stored] = {}
    cols: dict[Any, dict[str, Stored]] = {}
    for i in range(0, len(cks), IN_CHUNK):
        chunk = list(cks[i:i + IN_CHUNK])
        marks = ", ".join("?" * len(chunk))
        for ck, *clock in conn.execute(
            f"SELECT x.{keys.ck}, r.hlc, r.origin, r.seq, r.prev_hlc, r.prev_origin FROM {keys.table} x "
            f"JOIN _p2p_rows r ON r.tid = ? AND {same_key('r.pk', 'x.' + keys.key)} WHERE x.{keys.ck} IN ({marks})", (keys.tid, *chunk)
        ):
            rows[chunk[0] if len(cks) == 1 else ck] = tuple(clock)  # type: ignore[assignment]
        for ck, col, *clock in conn.execute(
            f"SELECT ck, col, {_FIELDS} FROM _p2p_cells WHERE tid = ? AND ck IN ({marks})", (keys.tid, *chunk)
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

    def put(self, tid: int, ck: Any, pk: Any, cells: dict[str, Stored], columns: Sequence[str], *,
            old_pk: Any = None, had_row: bool, had_cols: bool) -> None:
        """Store ``cells`` (every logical cell of the row after the merge).
        ``pk``: the row's local key, None when it is not in the table (then
        every cell is stored per column, under ``ck``); ``old_pk``: the key
        its row tuple (``had_row``) was stored under."""
        row, own = normalize(cells, columns) if pk is not None else (None, dict(cells))
        if row is not None:
            self.rows.append((tid, pk, *row))
        if had_row and (row is None or old_pk != pk):
            self.drop_rows.append((tid, old_pk))
        if had_cols:
            self.drop_cols.append((tid, ck))
        self.cols += [(tid, ck, col, *clock) for col, clock in own.items()]

    def write(self, conn: sqlite3.Connection) -> None:
        conn.executemany("DELETE FROM _p2p_rows WHERE tid = ? AND pk = ?", self.drop_rows)
        conn.executemany("DELETE FROM _p2p_cells WHERE tid = ? AND ck = ?", self.drop_cols)
        conn.executemany(f"INSERT OR REPLACE INTO _p2p_rows(tid, pk, {_FIELDS}) VALUES (?, ?, ?, ?, ?, ?, ?)", self.rows)
        conn.executemany(f"INSERT OR REPLACE INTO _p2p_cells(tid, ck, col, {_FIELDS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self.cols)


def explode(conn: sqlite3.Connection, keys: RowKeys, source: str = "", params: Sequence[Any] = ()) -> None:
    """Turn row tuples into per-column cells for the current sync columns,
    under the conflict value of the row each belongs to. ``source``: SQL
    giving (pk, ck) pairs — whose entry, and under which value (NULL: an
    orphan, dropped); by default every row of the table (``rows_sql``). A
    column's own cell, where there is one, stays."""
    source = source or keys.rows_sql()
    conn.execute(
        f"INSERT OR IGNORE INTO _p2p_cells(tid, ck, col, {_FIELDS}) "
        f"SELECT r.tid, k.ck, s.col, r.hlc, r.origin, r.seq, r.prev_hlc, r.prev_origin "
        f"FROM ({source}) k JOIN _p2p_rows r ON r.tid = ? AND {same_key('r.pk', 'k.pk')} JOIN _p2p_sync_columns s ON s.tbl = ? "
        "WHERE k.ck IS NOT NULL",
        (*params, keys.tid, keys.name),
    )
    if source == keys.rows_sql():
        conn.execute("DELETE FROM _p2p_rows WHERE tid = ?", (keys.tid,))  # orphans too
    else:
        conn.execute(f"DELETE FROM _p2p_rows WHERE tid = ? AND pk IN (SELECT pk FROM ({source}))", (keys.tid, *params))


def fold(conn: sqlite3.Connection, keys: RowKeys, only: str = "", params: Sequence[Any] = ()) -> int:
    """The reverse of ``explode``: rows of the table (their ck in ``only``,
    an SQL ``IN`` operand; all when empty) whose every sync column has a
    cell get a row tuple under their local key — the one most of their
    columns share — and lose the cells equal to it. Rows not in the table
    keep their cells. Returns the number of rows folded."""
    where = f" AND c.ck IN {only}" if only else ""
    ncols = conn.execute("SELECT count(*) FROM _p2p_sync_columns WHERE tbl = ?", (keys.name,)).fetchone()[0]
    if not ncols:
        return 0
    # Per row, the tuple with the most columns (SQLite's bare columns of max()).
    folded = conn.execute(
        f"INSERT OR REPLACE INTO _p2p_rows(tid, pk, {_FIELDS}) "
        f"SELECT f.tid, x.{keys.key}, f.hlc, f.origin, f.seq, f.prev_hlc, f.prev_origin FROM ("
        f"  SELECT tid, ck, max(n * 4294967296 + seq) AS best, {_FIELDS} FROM ("
        f"    SELECT c.tid, c.ck, c.hlc, c.origin, c.seq, c.prev_hlc, c.prev_origin, count(*) AS n, "
        f"           sum(count(*)) OVER (PARTITION BY c.ck) AS total "
        f"    FROM _p2p_cells c JOIN _p2p_sync_columns s ON s.tbl = ? AND s.col = c.col WHERE c.tid = ?{where} "
        f"    GROUP BY c.ck, c.hlc, c.origin, c.seq, c.prev_hlc, c.prev_origin"
        f"  ) WHERE total = ? GROUP BY ck) f JOIN {keys.table} x ON x.{keys.ck} = f.ck",
        (keys.name, keys.tid, *params, ncols),
    ).rowcount
    if folded:
        conn.execute(
            f"DELETE FROM _p2p_cells AS c WHERE c.tid = ?{where} AND EXISTS (SELECT 1 FROM {keys.table} x "
            f"JOIN _p2p_rows r ON r.tid = c.tid AND {same_key('r.pk', 'x.' + keys.key)} WHERE x.{keys.ck} = c.ck "
            "AND r.hlc = c.hlc AND r.origin IS c.origin AND r.seq = c.seq "
            "AND r.prev_hlc IS c.prev_hlc AND r.prev_origin IS c.prev_origin)",
            (keys.tid, *params),
        )
    return max(folded, 0)


#: Row clocks one ``sweep_orphans`` call looks at.
SWEEP_CHUNK = 20_000


def sweep_orphans(conn: sqlite3.Connection, keys: RowKeys, after: Any, chunk: int = SWEEP_CHUNK) -> Any:
    """Drop the orphans (row clocks whose row left the table unseen: see the
    module docstring) among the next ``chunk`` row clocks of the table in
    key order after ``after`` (None: from the first); the key to go on
    after next time (None: the walk starts over). Bounded work per call,
    so the periodic compaction walks a table of any size a chunk at a time."""
    bound = "AND pk > ? " if after is not None else ""
    first = (after,) if after is not None else ()
    last = conn.execute(f"SELECT max(pk) FROM (SELECT pk FROM _p2p_rows WHERE tid = ? {bound}ORDER BY pk LIMIT ?)",
                        (keys.tid, *first, chunk)).fetchone()[0]
    if last is None:
        return None
    dropped = conn.execute(
        f"DELETE FROM _p2p_rows WHERE tid = ? {bound}AND pk <= ? "
        f"AND NOT EXISTS (SELECT 1 FROM {keys.table} x WHERE x.{keys.key} = _p2p_rows.pk)", (keys.tid, *first, last)).rowcount
    if dropped > 0:
        log.info("table %s: dropped %d row clock(s) of rows replaced by INSERT OR REPLACE", keys.name, dropped)
    return last


#: ``_p2p_meta`` key: 2 once the file's cells were folded into row tuples
#: (issue 11's format), 3 once those are keyed by the local key.
FORMAT_KEY = "cells_format"
FORMAT = 3


def single_version_tables(conn: sqlite3.Connection) -> list[RowKeys]:
    """The registered single_version tables that are in the file as a table
    with a key (one dropped or changed behind the store's back, which the
    store reports on its own, has no row to find: it is left out)."""
    found = conn.execute(
        "SELECT tid FROM _p2p_tables WHERE kind = 'local' AND conflict_col IS NOT NULL ORDER BY tid").fetchall()
    out = []
    for (tid,) in found:
        try:
            out.append(RowKeys.read(conn, tid))
        except (TableNotFound, CompositeKeyNotSupported):
            continue
    return out


def migrate(conn: sqlite3.Connection, get_meta: Any, set_meta: Any) -> None:
    """Bring a file of an earlier release to this format once (inside the
    caller's write transaction), logging what it did: release 1's
    per-column cells become one tuple per row; release 2's row tuples,
    keyed by the conflict value, move to the row's local key (those of rows
    no longer in the table become per-column cells). ``get_meta``/``set_meta``:
    capture's accessors (this module sits below capture)."""
    format = int(get_meta(conn, FORMAT_KEY, 0) or 0)
    if format >= FORMAT:
        return
    by_ck = conn.execute("SELECT 1 FROM pragma_table_info('_p2p_rows') WHERE name = 'ck'").fetchone() is not None
    if by_ck:
        _rekey(conn)  # (the clocks of a registered table not in the file go with the old table: it has no rows to match)
    for keys in single_version_tables(conn):
        before = conn.execute("SELECT count(*) FROM _p2p_cells WHERE tid = ?", (keys.tid,)).fetchone()[0]
        if not before or by_ck:
            continue
        log.info("table %s: moving %d per-column clocks to one clock per row (once, after an upgrade)", keys.name, before)
        rows = fold(conn, keys)
        after = conn.execute("SELECT count(*) FROM _p2p_cells WHERE tid = ?", (keys.tid,)).fetchone()[0]
        log.info("table %s: %d rows now have one clock; %d per-column clocks remain (columns edited on their own)",
                 keys.name, rows, after)
    set_meta(conn, FORMAT_KEY, FORMAT)


def _rekey(conn: sqlite3.Connection) -> None:
    """Release 2 -> 3: ``_p2p_rows`` keyed by (tid, ck) becomes keyed by (tid, pk)."""
    conn.execute("DROP VIEW IF EXISTS _p2p_clocks")  # release 2's view over the old table
    conn.execute("DROP INDEX IF EXISTS _p2p_rows_seq")
    conn.execute("ALTER TABLE _p2p_rows RENAME TO _p2p_rows_by_ck")
    conn.execute(_ROWS_SQL)
    conn.execute(_ROWS_SEQ_SQL)
    for keys in single_version_tables(conn):
        count = conn.execute("SELECT count(*) FROM _p2p_rows_by_ck WHERE tid = ?", (keys.tid,)).fetchone()[0]
        if not count:
            continue
        log.info("table %s: moving %d row clocks from the conflict value to the row's local key "
                 "(once, after an upgrade)", keys.name, count)
        moved = conn.execute(
            f"INSERT OR REPLACE INTO _p2p_rows(tid, pk, {_FIELDS}) SELECT r.tid, x.{keys.key}, r.hlc, r.origin, r.seq, "
            f"r.prev_hlc, r.prev_origin FROM _p2p_rows_by_ck r JOIN {keys.table} x ON x.{keys.ck} = r.ck WHERE r.tid = ?",
            (keys.tid,)).rowcount
        conn.execute(
            f"INSERT OR IGNORE INTO _p2p_cells(tid, ck, col, {_FIELDS}) SELECT r.tid, r.ck, s.col, r.hlc, r.origin, r.seq, "
            f"r.prev_hlc, r.prev_origin FROM _p2p_rows_by_ck r JOIN _p2p_sync_columns s ON s.tbl = ? WHERE r.tid = ? "
            f"AND NOT EXISTS (SELECT 1 FROM {keys.table} x WHERE x.{keys.ck} = r.ck)", (keys.name, keys.tid))
        log.info("table %s: %d row clocks moved; %d rows no longer in the table keep their clocks per column",
                 keys.name, moved, count - moved)
    conn.execute("DROP TABLE _p2p_rows_by_ck")


#: The row tuples (capture.SCHEMA_SQL creates them in a new file; ``_rekey`` in one of release 2).
_ROWS_SQL = """CREATE TABLE IF NOT EXISTS _p2p_rows(
    tid INTEGER NOT NULL, pk NOT NULL,
    hlc INTEGER NOT NULL, origin INTEGER, seq INTEGER NOT NULL,
    prev_hlc INTEGER, prev_origin INTEGER,
    PRIMARY KEY (tid, pk)
) WITHOUT ROWID"""
_ROWS_SEQ_SQL = "CREATE INDEX IF NOT EXISTS _p2p_rows_seq ON _p2p_rows(seq)"
SCHEMA_SQL = f"{_ROWS_SQL};\n{_ROWS_SEQ_SQL};\n"
#: Release 2's (store/capture.py's ``_number_origins`` makes it again for a file that had it with device IDs as text).
RELEASE2_ROWS_SQL = """CREATE TABLE _p2p_rows(
    tid INTEGER NOT NULL, ck NOT NULL,
    hlc INTEGER NOT NULL, origin INTEGER, seq INTEGER NOT NULL,
    prev_hlc INTEGER, prev_origin INTEGER,
    PRIMARY KEY (tid, ck)
) WITHOUT ROWID"""


def clocks_view(conn: sqlite3.Connection) -> None:
    """(Re)create, for this connection only, the TEMP view ``_p2p_clocks``
    of every logical cell (tid, ck, col, hlc, origin, seq, prev_hlc,
    prev_origin; origins as device IDs): for people and tests looking at a
    store (``sqlite3 store.db`` does not have it; the sync code reads the
    tables). A TEMP view, made again each time, because it names each
    single_version table, which a permanent view would tie to its name."""
    device = "(SELECT o.device FROM _p2p_origins o WHERE o.id = {})"
    parts = [f"SELECT c.tid, c.ck, c.col, c.hlc, {device.format('c.origin')} AS origin, c.seq, c.prev_hlc, "
             f"{device.format('c.prev_origin')} AS prev_origin FROM main._p2p_cells c"]
    for keys in single_version_tables(conn):
        parts.append(
            f"SELECT r.tid, x.{keys.ck}, s.col, r.hlc, {device.format('r.origin')}, r.seq, r.prev_hlc, "
            f"{device.format('r.prev_origin')} FROM main._p2p_rows r JOIN main.{keys.table} x ON {same_key('r.pk', 'x.' + keys.key)} "
            f"JOIN main._p2p_sync_columns s ON s.tbl = '{keys.name.replace(chr(39), chr(39) * 2)}' WHERE r.tid = {keys.tid} "
            f"AND NOT EXISTS (SELECT 1 FROM main._p2p_cells c WHERE c.tid = r.tid AND c.ck = x.{keys.ck} AND c.col = s.col)")
    parts.append(  # (a collaborative device table's rows appended together: a run of clocks, store/row_runs.py)
        f"SELECT e.tid, e.ck, '*', e.hlc, {device.format('e.origin')}, e.seq, NULL, NULL FROM {row_runs.entries_sql()} e "
        "WHERE NOT EXISTS (SELECT 1 FROM main._p2p_cells c WHERE c.tid = e.tid AND c.ck = e.ck AND c.col = '*')")
    conn.execute("DROP VIEW IF EXISTS temp._p2p_clocks")
    conn.execute(f"CREATE TEMP VIEW _p2p_clocks AS {' UNION ALL '.join(parts)}")


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
