"""Single_version tables: one merged table, per-column last-writer-wins on
the conflict column.

One of the two table types (protocol/table_type.py); collaborative.py is
the other, with the same interface (store/modes.py lists it): how a table
is *registered*, how its changes are *read* for a peer, and how a peer's
changes are *planned* and *written* here. The accepted sync_schema.json
entry that says which columns sync is accepted_schema.py's; where the
clocks are stored, cells.py's.

The stream (SPEC §4; changes.py's docstring): the rows with a row clock,
column clock or tomb above a peer's position, each once, as its current
sync columns with every clock and its tomb — relayed rows too, with their
original clocks, so A's change reaches C through B as A's.

The merge (merge.py's docstring has the rules): a row change is merged in
three steps — the row's state here (values, clocks, tomb: ``RowState``),
a plan (pure: who wins, what is lost, what to write: ``plan_row``) and the
writes (``write_rows``). Row by row (``merge_row``) loads and writes one
plan at a time; in bulk (``merge_bulk``) the state of a whole batch comes
from a few IN queries and every plan is written with executemany; a block
of rows never seen here is inserted set-based (``write_block``). All three
write the same (tests/store/test_merge_bulk_single_version.py,
tests/store/test_blocks.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from p2pstore.protocol.batch import HLC, KEY, ORIGIN, PREV_HLC, PREV_ORIGIN, TOMB_HLC, TOMB_ORIGIN, VALUES, Columns, Rows, field_of
from p2pstore.schema.predicates import CompiledQuery, quote_ident
from p2pstore.store import accepted_schema, capture, cells, origins, policies
from p2pstore.store.blocks import ROWS_PER_INSERT, Done, all_none, bindable, keys_stay_distinct, load, not_none, runs
from p2pstore.store.capture import OP_DELETE, OP_INSERT, OP_UPDATE, CaptureState
from p2pstore.store.changes import (
    IN_CHUNK, Block, Cell, Read, RowChange, SyncTable, Value, fetch, filter_sql, is_raw_text, limited_end, sendable, size_sql,
    unsendable,
)
from p2pstore.store.lww import Clock, RowFailed, Stamp, Target, bind, park, same, visible
from p2pstore.store.tables import TableInfo

if TYPE_CHECKING:  # merge.py imports this module
    from p2pstore.store.merge import _Applier


# -- register ---------------------------------------------------------------


def register(conn: sqlite3.Connection, state: CaptureState, info: TableInfo, auto_sync: bool) -> None:
    """Capture ``info``'s writes keyed by its conflict column, as the
    accepted sync_schema.json entry (in this transaction) names it."""
    accepted = accepted_schema.load_accepted(conn)
    sync = accepted.tables.get(info.name) if accepted is not None else None
    capture.register_table(conn, state, info, auto_sync, conflict_column=sync.conflict if sync is not None else None)


def columns_changed(conn: sqlite3.Connection, info: TableInfo, label: str) -> None:
    """Nothing to do: what syncs of a single_version table is the accepted
    sync_schema.json entry's columns, which an ALTER does not change."""


# -- read: what a peer is sent ------------------------------------------------

#: Where the seqs of an interval are found: (source, extra condition — with
#: the table's quoted ``{table}`` name and ``{key}`` expression —, key
#: column: the conflict value ``ck``, or ``pk``, a row's local key). A row
#: clock counts only with its row (an orphan: store/cells.py).
#: INDEXED BY: left alone, SQLite prefers the (tid, ...) key and sorts everything.
SEQ_SOURCES = (("_p2p_rows INDEXED BY _p2p_rows_seq", " AND EXISTS (SELECT 1 FROM {table} x WHERE x.{key} = pk)", "pk"),
               ("_p2p_cells INDEXED BY _p2p_cells_seq", "", "ck"),
               ("_p2p_tombs INDEXED BY _p2p_tombs_seq", "", "ck"))


def unsent(conn: sqlite3.Connection, since: int) -> int:
    """The rows a peer at position ``since`` has not been sent: the distinct
    rows with a row clock, column clock or tomb above it. One seq belongs to
    one row: grouping by seq first halves the rows to deduplicate. With only
    row clocks above it (the usual: no concurrent edit, no delete), no
    deduplication: a row has one row clock and its own conflict value (the
    column is UNIQUE and NOT NULL), so a count of the joined row clocks is
    the same — without the temporary index of 100k random values that the
    UNION builds (0.08 s of the sender's CPU in a 100k-row push: every local
    change re-offers the stores, and an offer counts this, daemon.py)."""
    total = 0
    for keys in cells.single_version_tables(conn):
        joined = (f"FROM _p2p_rows r INDEXED BY _p2p_rows_seq JOIN {keys.table} x "
                  f"ON {cells.same_key('r.pk', 'x.' + keys.key)} WHERE r.seq > ?1 AND r.tid = ?2")
        only_rows = conn.execute(
            "SELECT NOT EXISTS (SELECT 1 FROM _p2p_cells INDEXED BY _p2p_cells_seq WHERE seq > ?1 AND tid = ?2) "
            "AND NOT EXISTS (SELECT 1 FROM _p2p_tombs INDEXED BY _p2p_tombs_seq WHERE seq > ?1 AND tid = ?2)",
            (since, keys.tid)).fetchone()[0]
        total += conn.execute(
            f"SELECT count(*) {joined}" if only_rows else
            f"SELECT count(*) FROM (SELECT x.{keys.ck} {joined} "
            "UNION SELECT ck FROM _p2p_cells INDEXED BY _p2p_cells_seq WHERE seq > ?1 AND tid = ?2 GROUP BY seq "
            "UNION SELECT ck FROM _p2p_tombs INDEXED BY _p2p_tombs_seq WHERE seq > ?1 AND tid = ?2)",
            (since, keys.tid),
        ).fetchone()[0]
    return total


def seq_sizes(conn: sqlite3.Connection, t: SyncTable, seqs: Sequence[int]) -> Iterable[tuple[int, int]]:
    """(seq, stored size of the sync columns of the row it sends) for ``seqs``."""
    keys = cells.RowKeys.of(t)
    total = size_sql(t.sync_columns, "x.")
    marks = ", ".join("?" * len(seqs))
    # INDEXED BY: left alone, SQLite walks every cell of the table by its (tid, ...) key.
    return conn.execute(
        f"SELECT r.seq, {total} FROM _p2p_rows r INDEXED BY _p2p_rows_seq JOIN {keys.table} x ON {cells.same_key('r.pk', 'x.' + keys.key)} "
        f"WHERE r.tid = ?1 AND r.seq IN ({marks}) UNION ALL "
        f"SELECT c.seq, max((SELECT {total} FROM {keys.table} x WHERE x.{keys.ck} = c.ck)) "
        f"FROM _p2p_cells c INDEXED BY _p2p_cells_seq WHERE c.tid = ?1 AND c.seq IN ({marks}) GROUP BY c.seq",
        (t.tid, *seqs, *seqs),
    )


def has_irregular_rows(conn: sqlite3.Connection, t: SyncTable) -> bool:
    """Whether some row may have column clocks of its own (store/cells.py):
    those rows go as row changes, not in the block."""
    return conn.execute("SELECT 1 FROM _p2p_cells WHERE tid = ? LIMIT 1", (t.tid,)).fetchone() is not None


def read_irregular(conn: sqlite3.Connection, t: SyncTable, since: int, last: int, me: str, block: Block) -> Iterator[RowChange]:
    """The interval's rows ``block`` did not hold."""
    return read_rows(conn, t, since, last, me, None, set(field_of(block.rows, KEY)), only_irregular=True)


def counts_interval(conn: sqlite3.Connection, t: SyncTable, since: int, last: int, irregular: bool) -> bool:
    """Whether ``read_block`` with a ``limit`` can count the batch itself:
    every seq of the interval is a row clock it reads — no column clock
    (``irregular``) and no tomb in the table, each a seq of its own."""
    return not irregular and not _has_tombs(conn, t)


def _has_tombs(conn: sqlite3.Connection, t: SyncTable) -> bool:
    return conn.execute("SELECT 1 FROM _p2p_tombs WHERE tid = ? LIMIT 1", (t.tid,)).fetchone() is not None


def read_block(conn: sqlite3.Connection, t: SyncTable, since: int, last: int, devices: tuple[str, ...],
               budget: int | None = None, irregular: bool = True, limit: int | None = None) -> Read:
    """The interval's *regular* rows in one statement, as wire rows: rows
    whose sync columns share one clock (a ``_p2p_rows`` entry in the
    interval, no per-column entry: store/cells.py), with their tomb if they
    have one; a value the tomb hides travels as NULL, as in
    ``read_rows``, which reads every other row. ``irregular``: the
    table may have per-column entries (without any, no row is probed for
    them). Rows end as collaborative ``read_block``'s do. ``limit``: only
    the interval's first ``limit`` row clocks (``Read.end``; where
    ``counts_interval`` says so, one row a seq)."""
    assert t.conflict_column is not None
    name, ck = quote_ident(t.info.name), quote_ident(t.conflict_column)
    columns = tuple(sorted(t.sync_columns))  # in name order, as _single_version_rows gives cells

    def rows_of_interval(tombs: str) -> str:
        return ("FROM _p2p_rows r INDEXED BY _p2p_rows_seq "
                f"JOIN {name} x ON {cells.same_key('r.pk', 'x.' + t.info.key_expr)} {tombs}"
                "WHERE r.seq > ?1 AND r.seq <= ?2 AND r.tid = ?3"
                + (f" AND NOT EXISTS (SELECT 1 FROM _p2p_cells c WHERE c.tid = r.tid AND c.ck = x.{ck})" if irregular else "")
                + " ORDER BY r.seq" + (" LIMIT ?5" if limit is not None else ""))  # (the budget of fetch counts in this order; changes_since re-sorts by SEQ)

    row_clock = "r.hlc, coalesce(r.origin, 0), r.prev_hlc, CASE WHEN r.prev_hlc IS NOT NULL THEN coalesce(r.prev_origin, 0) END"
    if not _has_tombs(conn, t):
        # No tomb in the table (the usual): every value shows, and no row has tomb fields. Only
        # what varies is read (a value SQLite hands Python costs more than the row's join), the
        # rest filled in a field at a time (collaborative ``read_block`` says the same).
        others = [c for c in columns if c != t.conflict_column]  # (the conflict column's value is the key: read once)
        read, complete = fetch(
            conn,
            f"SELECT x.{ck}, r.seq, {row_clock}{''.join(f', x.{quote_ident(c)}' for c in others)}, {size_sql(columns, 'x.')} "
            + rows_of_interval(""),
            (since, last, t.tid, *((None, limit) if limit is not None else ())), budget,
        )
        rows, end = _untombed_wire_rows(read, columns, others), limited_end(read, complete, limit)
    else:
        me_dev = "?4"
        visible = (f"(tb.hlc IS NULL OR r.hlc > tb.hlc OR (r.hlc = tb.hlc AND {origins.device_sql('r.origin', me_dev)} > "
                   f"{origins.device_sql('tb.origin', me_dev)}))")
        values = ", ".join(f"CASE WHEN {visible} THEN x.{quote_ident(c)} END" for c in columns)
        rows, complete = fetch(
            conn,
            f"SELECT x.{ck}, CASE WHEN tb.seq > ?1 THEN max(r.seq, tb.seq) ELSE r.seq END, {row_clock}, "
            "tb.hlc, CASE WHEN tb.hlc IS NOT NULL THEN coalesce(tb.origin, 0) END, "
            "tb.prev_hlc, CASE WHEN tb.prev_hlc IS NOT NULL THEN coalesce(tb.prev_origin, 0) END, "
            f"{values}, r.seq, {size_sql(columns, 'x.')} "
            + rows_of_interval(f"LEFT JOIN _p2p_tombs tb ON tb.tid = r.tid AND tb.ck = x.{ck} "),
            (since, last, t.tid, devices[0], *((limit,) if limit is not None else ())), budget,
        )
        end = limited_end(rows, complete, limit, seq_at=-2)
    return Read(Block(t.info.name, t.conflict_column, columns, devices, sendable(t, rows)), complete, end)


def _untombed_wire_rows(read: list[Any], columns: Sequence[str], others: list[str]) -> Sequence[Any]:
    """``read_block``'s rows ``(key, seq, hlc, origin, prev_hlc,
    prev_origin, values of others..., size)`` of a table with no tomb as
    wire rows (a value for each of ``columns``: the conflict column's is
    the key), each ending in its seq and size; kept field by field (``Rows``)."""
    if not read:
        return []
    keys, seqs, hlcs, origins_, prevs, prev_origins, *values, sizes = map(list, zip(*read))
    nothing = [None] * len(keys)
    known = dict(zip(others, values))
    return Rows([keys, seqs, hlcs, origins_, prevs, prev_origins, nothing, nothing, nothing, nothing,
                 *(known.get(c, keys) for c in columns), seqs, sizes], len(keys))


def read_rows(
    conn: sqlite3.Connection, t: SyncTable, since: int, last: int, me: str, where: CompiledQuery | None,
    skip: set[Any] | frozenset[Any] = frozenset(), *, only_irregular: bool = False,
) -> Iterator[RowChange]:
    """The interval's rows as row changes; ``skip``: keys already sent in a
    block, ``only_irregular``: every regular row was (``read_block``)."""
    assert t.conflict_column is not None
    synced = set(t.sync_columns)
    filt, fparams = filter_sql(t, "ck", where)
    # origin NULL is this device, and so is prev_origin NULL beside a prev_hlc.
    # (A plain "?" in the filter numbers on after ?4.)
    # Origins are stored as numbers (store/origins.py); batches carry device IDs.
    clock_sql = (f"hlc, {origins.device_sql('origin', '?1')}, seq, prev_hlc, "
                 f"CASE WHEN prev_hlc IS NOT NULL THEN {origins.device_sql('prev_origin', '?1')} END")
    by_ck: dict[Any, list[tuple[Any, ...]]] = {}
    for ck, col, *clock in conn.execute(
        f"SELECT ck, col, {clock_sql} FROM _p2p_cells INDEXED BY _p2p_cells_seq WHERE seq > ?2 AND seq <= ?3 AND tid = ?4{filt}",
        (me, since, last, t.tid, *fparams),
    ):
        if col in synced:
            by_ck.setdefault(ck, []).append((col, *clock))
    # Rows whose columns share one clock (store/cells.py): that clock for
    # each sync column without a cell of its own.
    # Row clocks of the interval (those of regular rows came in the block).
    name, ck_col = quote_ident(t.info.name), quote_ident(t.conflict_column)
    irregular = f" AND EXISTS (SELECT 1 FROM _p2p_cells c WHERE c.tid = r.tid AND c.ck = x.{ck_col})" if only_irregular else ""
    row_filt, _ = filter_sql(t, f"x.{ck_col}", where)
    row_clock = (f"r.hlc, {origins.device_sql('r.origin', '?1')}, r.seq, r.prev_hlc, "
                 f"CASE WHEN r.prev_hlc IS NOT NULL THEN {origins.device_sql('r.prev_origin', '?1')} END")
    # (Without any column clock in the table, every row with a row clock was in the block.)
    shared = [] if only_irregular and not has_irregular_rows(conn, t) else conn.execute(
        f"SELECT x.{ck_col}, {row_clock} FROM _p2p_rows r INDEXED BY _p2p_rows_seq JOIN {name} x ON {cells.same_key('r.pk', 'x.' + t.info.key_expr)} "
        f"WHERE r.seq > ?2 AND r.seq <= ?3 AND r.tid = ?4{irregular}{row_filt}",
        (me, since, last, t.tid, *fparams),
    ).fetchall()
    if shared:
        own: dict[Any, set[str]] = {}
        if conn.execute("SELECT 1 FROM _p2p_cells WHERE tid = ? LIMIT 1", (t.tid,)).fetchone():
            keys = [r[0] for r in shared]
            for i in range(0, len(keys), IN_CHUNK):
                chunk = keys[i:i + IN_CHUNK]
                for ck, col in conn.execute(f"SELECT ck, col FROM _p2p_cells WHERE tid = ? AND ck IN ({', '.join('?' * len(chunk))})",
                                            (t.tid, *chunk)):
                    own.setdefault(ck, set()).add(col)
        for ck, *clock in shared:
            mine = own.get(ck, ())
            by_ck.setdefault(ck, []).extend((col, *clock) for col in t.sync_columns if col not in mine)
    tombs: dict[Any, tuple[Any, ...]] = {
        ck: tuple(clock)
        for ck, *clock in conn.execute(
            f"SELECT ck, {clock_sql} FROM _p2p_tombs INDEXED BY _p2p_tombs_seq WHERE seq > ?2 AND seq <= ?3 AND tid = ?4{filt}",
            (me, since, last, t.tid, *fparams),
        )
    }
    for ck in [ck for ck in tombs if ck in skip]:  # (a pass over the tombs, usually none; skip holds a block's keys)
        del tombs[ck]
    for ck in {ck for ck in (*by_ck, *tombs) if is_raw_text(ck)}:
        by_ck.pop(ck, None)
        tombs.pop(ck, None)
        if ck not in skip:
            unsendable(t, ck)
    columns = list(t.sync_columns)
    listed = ", ".join(quote_ident(c) for c in columns)
    # Tombs older than the interval and current values, a chunk of keys per
    # query. Matched by exact value; a key the table stores under another type
    # (a TEXT column holding an int key as text) is read on its own below.
    older_tombs: dict[Any, tuple[Any, ...]] = {}
    current_rows: dict[Any, tuple[Any, ...]] = {}
    need_tomb = [ck for ck in by_ck if ck not in tombs]
    for i in range(0, len(need_tomb), IN_CHUNK):
        chunk = need_tomb[i:i + IN_CHUNK]
        for ck, *clock in conn.execute(
            f"SELECT ck, {clock_sql} FROM _p2p_tombs WHERE tid = ?2 AND ck IN ({', '.join('?' * len(chunk))})",
            (me, t.tid, *chunk),
        ):
            older_tombs[ck] = tuple(clock)
    keys = list(by_ck)
    for i in range(0, len(keys), IN_CHUNK):
        chunk = keys[i:i + IN_CHUNK]
        for ck, *values in conn.execute(f"SELECT {ck_col}, {listed} FROM {name} WHERE {ck_col} IN ({', '.join('?' * len(chunk))})", chunk):
            current_rows.setdefault(ck, tuple(values))
    read_values = f"SELECT {listed} FROM {name} WHERE {ck_col} = ?"
    for ck in dict.fromkeys([*by_ck, *tombs]):
        tomb = tombs.get(ck) or older_tombs.get(ck)
        row_cells = by_ck.get(ck, [])
        current: Any = None
        if row_cells:
            current = current_rows.get(ck)
            if current is None:
                current = conn.execute(read_values, (ck,)).fetchone()
        values = dict(zip(columns, current)) if current is not None else {}
        out = []
        for col, hlc, origin, _seq, prev_hlc, prev_origin in sorted(row_cells, key=lambda c: c[0]):
            visible = tomb is None or (hlc, origin) > (tomb[0], tomb[1])
            out.append(Cell(col, values.get(col) if visible else None, hlc, origin, prev_hlc, prev_origin))
        seq = max([c[3] for c in row_cells] + ([tomb[2]] if tomb is not None and tomb[2] > since else []))
        tomb_fields = (tomb[0], tomb[1], tomb[3], tomb[4]) if tomb is not None else (None, None, None, None)
        yield RowChange(t.info.name, t.conflict_column, ck, seq, tuple(out), *tomb_fields)


# -- plan and write: a peer's rows here ----------------------------------------


@dataclass(frozen=True, slots=True)
class Statements:
    """The statements that merge rows into one single_version table, built
    once per batch instead of once per row."""

    columns: tuple[str, ...]
    select: str  # key expression and the sync columns of the row with a given ck
    select_many: str  # the same and the ck, for the cks of an IN list that follows
    insert_head: str  # "INSERT INTO t (sync columns) VALUES " (the placeholders follow)
    insert: str
    delete: str
    key: str  # key expression of the row with a given ck
    keys_many: str  # ck and key expression of the rows with the cks of an IN list that follows
    update_head: str  # "UPDATE t SET " (the changed columns follow)
    update_tail: str  # " WHERE ck = ?"

    @classmethod
    def of(cls, table: SyncTable) -> Statements:
        assert table.conflict_column is not None
        name, ck = quote_ident(table.info.name), quote_ident(table.conflict_column)
        columns = tuple(table.sync_columns)
        listed = ", ".join(quote_ident(c) for c in columns)
        return cls(
            columns=columns,
            select=f"SELECT {table.info.key_expr}, {listed} FROM {name} WHERE {ck} = ?",
            select_many=f"SELECT {table.info.key_expr}, {listed}, {ck} FROM {name} WHERE {ck} IN",
            insert_head=f"INSERT INTO {name} ({listed}) VALUES ",
            insert=f"INSERT INTO {name} ({listed}) VALUES ({', '.join('?' * len(columns))})",
            delete=f"DELETE FROM {name} WHERE {ck} = ?",
            key=f"SELECT {table.info.key_expr} FROM {name} WHERE {ck} = ?",
            keys_many=f"SELECT {ck}, {table.info.key_expr} FROM {name} WHERE {ck} IN",
            update_head=f"UPDATE {name} SET ",
            update_tail=f" WHERE {ck} = ?",
        )


@dataclass(slots=True)
class RowState:
    """A single_version row as it is here before a merge."""

    current: tuple[Value, ...] | None  # (key, *sync column values); None: no such row
    cells: dict[str, Stamp]
    tomb: Stamp | None
    stored: dict[str, cells.Stored] = field(default_factory=dict)  # the logical cells as stored (with their seq)
    had_row: bool = False  # a _p2p_rows entry (store/cells.py)
    had_cols: bool = False  # _p2p_cells entries of its own


@dataclass(slots=True)
class RowPlan:
    """What merging one row change writes."""

    table: SyncTable
    ck: Value
    write: str  # "insert", "update", "delete" or "none" (a delete of a row never seen here)
    diff: tuple[str, ...]  # update: the columns whose value changes
    after: dict[str, Value]  # the row's sync columns after the merge
    pk: Value  # the row's key here (set after an insert)
    op: int  # what the log row says
    announce: bool
    newest: Clock  # the log row's clock: the newest of the changed cells and tomb
    changed: tuple[tuple[str, Stamp], ...]  # cells to store
    tomb: Stamp | None  # tomb to store
    state: RowState  # the row before (its stored cells are rewritten with the changed ones)


def statements(ap: _Applier, table: SyncTable) -> Statements:
    sql = ap.sql.get(table.info.name)
    if sql is None:
        sql = ap.sql[table.info.name] = Statements.of(table)
    return sql


def target(ap: _Applier, table: SyncTable) -> Target:
    """The table itself; only its sync columns are written."""
    return Target(table, table.info.name, table.tid, frozenset(table.sync_columns))


def merge_row(ap: _Applier, target: Target, row: RowChange) -> bool:
    """Merge one row change (under the caller's savepoint); False: nothing changed."""
    table = target.table
    if row.key_column != table.conflict_column:
        raise RowFailed(
            f"schema_mismatch: the conflict column of {table.info.name} is {table.conflict_column} here, {row.key_column} on {ap.sender}"
        )
    conn, ck, tid = ap.conn, row.key, table.tid
    state = RowState(conn.execute(statements(ap, table).select, (ck,)).fetchone(), {}, None)
    shared, own = cells.load(conn, cells.RowKeys.of(table), [ck])
    fill(ap, state, table, shared.get(ck), own.get(ck))
    found = conn.execute("SELECT hlc, origin, prev_hlc, prev_origin FROM _p2p_tombs WHERE tid = ? AND ck = ?", (tid, ck)).fetchone()
    if found is not None:
        state.tomb = ap.stamp(*found)
    parked = park(ap, target, row)
    plan = plan_row(ap, target, row, state)
    if plan is None:
        return parked
    write_rows(ap, [plan], raw_text=True)
    return True


def fill(ap: _Applier, state: RowState, table: SyncTable, shared: cells.Stored | None, own: dict[str, cells.Stored] | None) -> None:
    """Give ``state`` the row's clocks as stored (store/cells.py)."""
    state.had_row, state.had_cols = shared is not None, bool(own)
    state.stored = cells.expand(shared, own, table.sync_columns)
    state.cells = {col: ap.stamp(hlc, origin, prev_hlc, prev_origin)
                   for col, (hlc, origin, _seq, prev_hlc, prev_origin) in state.stored.items()}


def merge_bulk(ap: _Applier, rows: Sequence[RowChange], keys: dict[str, list[Value]], types: dict[str, type]) -> bool:
    """``merge_row`` for a whole batch (merge.py ``apply_bulk`` says when):
    every row's state in a few IN queries, every plan written at once."""
    conn = ap.conn
    states: dict[str, dict[Value, RowState]] = {}
    for name, table_keys in keys.items():
        table = ap.tables[name]
        assert table.conflict_column is not None
        if not keys_stay_distinct(conn, name, table.conflict_column, types[name]):
            return False
        sql = statements(ap, table)
        found: dict[Value, RowState] = {k: RowState(None, {}, None) for k in table_keys}
        for i in range(0, len(table_keys), IN_CHUNK):
            chunk = table_keys[i:i + IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            for current in conn.execute(f"{sql.select_many} ({marks})", chunk):
                state = found.get(current[-1])
                if state is None or type(current[-1]) is not types[name]:
                    return False  # a stored key that compares equal but is not: row by row decides
                state.current = current[:-1]
            shared, own = cells.load(conn, cells.RowKeys.of(table), chunk)
            for ck in {*shared, *own}:
                fill(ap, found[ck], table, shared.get(ck), own.get(ck))
            for ck, *clock in conn.execute(
                f"SELECT ck, hlc, origin, prev_hlc, prev_origin FROM _p2p_tombs WHERE tid = ? AND ck IN ({marks})",
                (table.tid, *chunk),
            ):
                found[ck].tomb = ap.stamp(*clock)
        states[name] = found
    plans = []
    for row in rows:
        target = ap.target(row.table)
        parked = park(ap, target, row)
        plan = plan_row(ap, target, row, states[row.table][row.key])
        if plan is not None:
            plans.append(plan)
        elif parked:
            ap.applied += 1  # as row by row counts it
    write_rows(ap, plans)
    ap.applied += len(plans)
    return True


def plan_row(ap: _Applier, target: Target, row: RowChange, state: RowState) -> RowPlan | None:
    """Merge ``row`` into the row's ``state`` here: None if nothing changes."""
    if state.current is None and not state.cells and state.tomb is None and row.tomb_hlc is None:
        return plan_new(ap, target, row, state)
    return plan_merge(ap, target, row, state)


def plan_new(ap: _Applier, target: Target, row: RowChange, state: RowState) -> RowPlan | None:
    """``plan_row`` for the commonest case, a row never seen here arriving
    without a delete: its cells all win, nothing loses, the row is
    inserted. The same plan as ``plan_merge`` gives (tests/store/test_merge.py
    checks), without its comparisons."""
    table = target.table
    conflict = table.conflict_column
    dest = target.dest_columns
    changed = tuple((c.column, Stamp((c.hlc, c.origin), c.prev)) for c in row.cells if c.column in dest)
    if not changed:
        return None
    incoming = {c.column: c.value for c in row.cells if c.column in dest}
    after = {col: row.key if col == conflict else incoming.get(col) for col in statements(ap, table).columns}
    newest = max(st.clock for _, st in changed)
    return RowPlan(table, row.key, "insert", (), after, None, OP_INSERT, True, newest, changed, None, state)


def plan_merge(ap: _Applier, target: Target, row: RowChange, state: RowState) -> RowPlan | None:
    table = target.table
    conflict = table.conflict_column
    assert conflict is not None
    ck, name = row.key, table.info.name
    columns = statements(ap, table).columns
    current, cells, old_tomb = state.current, state.cells, state.tomb
    existed = current is not None
    before: dict[str, Value] = dict(zip(columns, current[1:])) if current is not None else {}
    losses: list[tuple[str | None, Value, Stamp, Stamp]] = []  # (column, losing value, winner, loser)

    # Merge: the greatest clock of each cell and of the tomb.
    in_tomb = Stamp(row.tomb, row.tomb_prev) if row.tomb is not None else None
    tomb_changed = in_tomb is not None and (old_tomb is None or in_tomb.clock > old_tomb.clock)
    new_tomb = in_tomb if tomb_changed else old_tomb
    new_cells = dict(cells)
    incoming: dict[str, Value] = {}
    decides = ap.decides.get(name)
    for c in row.cells:
        if c.column not in target.dest_columns:
            continue  # not synced here (another schema version): parked (``park``), merged on an upgrade
        theirs, mine = Stamp(c.clock, c.prev), cells.get(c.column)
        if mine is not None and theirs.clock == mine.clock:
            continue  # seen before
        if decides is not None and c.column != conflict:
            if decides.kind == policies.MANUAL and _must_queue(decides, cells, c.column, theirs, old_tomb):
                # This device reconciles the table by hand: the concurrent value waits in the queue; ours stays.
                ap.queued += policies.enqueue(ap.conn, name, ck, c.column, (before.get(c.column), mine.clock if mine else None),
                                              (c.value, theirs.clock), ap.now())
                continue
            if decides.kind == policies.PRIORITY and _overrules(decides, mine, theirs, new_tomb, before.get(c.column), c.value):
                # This device arbitrates by priority and lww would keep the lower-ranked value: the favoured
                # one is written again as this device's decision, newer than both.
                assert mine is not None
                keep = decides.favoured(mine, theirs) is mine
                new_cells[c.column] = ap.decision(mine.clock, theirs.clock)
                incoming[c.column] = before.get(c.column) if keep else c.value
                losses.append((c.column, c.value, mine, theirs) if keep else (c.column, before.get(c.column), theirs, mine))
                continue
        if mine is None or theirs.clock > mine.clock:
            new_cells[c.column], incoming[c.column] = theirs, c.value
        elif c.column != conflict:
            # Older than ours: the incoming value loses (to our value, or to the delete hiding it).
            winner = mine if visible(mine, new_tomb) else new_tomb
            assert winner is not None
            if not (winner is mine and existed and same(before.get(c.column), c.value)):
                losses.append((c.column, c.value, winner, theirs))
    if not incoming and not tomb_changed:
        _record(ap, row, losses, cells, old_tomb, new_tomb, existed)
        return None

    exists = any(visible(cell, new_tomb) for cell in new_cells.values())
    after: dict[str, Value] = {}
    for col in columns:
        if col == conflict:
            after[col] = ck
        elif visible(new_cells.get(col), new_tomb):
            after[col] = incoming[col] if col in incoming else before.get(col)
        else:
            after[col] = None

    # Losers among the values visible here before.
    for col in columns:
        mine = cells.get(col)
        if col == conflict or not existed or not visible(mine, old_tomb):
            continue
        assert mine is not None
        newest = new_cells[col]
        if newest is not mine and visible(newest, new_tomb):
            if not same(before.get(col), after[col]):
                losses.append((col, before.get(col), newest, mine))  # overwritten by a newer value
        elif new_tomb is not None and not visible(newest, new_tomb):
            losses.append((col, before.get(col), new_tomb, mine))  # hidden by a newer delete
    # Incoming values that arrive already hidden by the delete lose to it.
    for col, value in incoming.items():
        if col != conflict and new_tomb is not None and not visible(new_cells[col], new_tomb):
            losses.append((col, value, new_tomb, new_cells[col]))
    # A delete that newer values outlive.
    if tomb_changed and exists:
        assert in_tomb is not None
        newest_cell = max((cell for cell in new_cells.values() if visible(cell, new_tomb)), key=lambda s: s.clock)
        losses.append((None, None, newest_cell, in_tomb))
    _record(ap, row, losses, cells, old_tomb, new_tomb, existed)

    # What to write to the table.
    pk: Value = current[0] if current is not None else None
    diff: tuple[str, ...] = ()
    if existed and exists:
        diff = tuple(c for c in columns if c != conflict and not same(before.get(c), after[c]))
        write, op, announce = "update", OP_UPDATE, bool(diff)
    elif existed:
        write, op, announce = "delete", OP_DELETE, True
    elif exists:
        write, op, announce = "insert", OP_INSERT, True
    else:
        write, op, announce = "none", OP_DELETE, False  # a delete of a row never seen here: remembered, nothing to show

    # The new clocks go under one new local seq, so they travel on (relay).
    changed = tuple((col, new_cells[col]) for col in incoming)
    newest_clock = max([st.clock for _, st in changed] + ([in_tomb.clock] if tomb_changed and in_tomb is not None else []))
    return RowPlan(table, ck, write, diff, after, pk, op, announce, newest_clock, changed,
                   in_tomb if tomb_changed else None, state)


def _must_queue(policy: policies.Policy, cells: dict[str, Stamp], column: str, theirs: Stamp, tomb: Stamp | None) -> bool:
    """Whether an incoming cell is concurrent with what this device holds:
    its column's value (``detect: column``) or any visible value of the row (``row``)."""
    if policy.detect == policies.ROW:
        return any(policies.concurrent(cell, theirs) for cell in cells.values() if visible(cell, tomb))
    mine = cells.get(column)
    return visible(mine, tomb) and policies.concurrent(mine, theirs)


def _overrules(policy: policies.Policy, mine: Stamp | None, theirs: Stamp, tomb: Stamp | None, held: Value, value: Value) -> bool:
    """Whether a priority arbiter decides between the value it holds and an
    incoming one: they are concurrent, differ and outlive the row's delete
    (``tomb``, after the merge), their writers rank apart, and ``lww``
    would keep the value of the one that ranks lower."""
    if mine is None or not (visible(mine, tomb) and visible(theirs, tomb)) or not policies.concurrent(mine, theirs) \
            or same(held, value):
        return False
    favoured = policy.favoured(mine, theirs)
    return favoured is not None and (favoured is theirs) != (theirs.clock > mine.clock)


def _record(ap: _Applier, row: RowChange, losses: list[tuple[str | None, Value, Stamp, Stamp]], cells: dict[str, Stamp],
            tomb: Stamp | None, new_tomb: Stamp | None, existed: bool) -> None:
    """Log the conflicts of merging ``row``: its ``losses``; and with
    ``detect: row``, where none of them was a conflict, a row conflict.

    Under ``priority``, a device that is not the arbiter leaves out a value
    that lost here to a lower-ranked one: the arbiter will overrule that
    (single_version's ``_overrules``), and logs the conflict where it decides it."""
    policy = ap.policies.get(row.table)
    if policy is not None and policy.kind == policies.PRIORITY and policy.decider != ap.me:
        losses = [loss for loss in losses if loss[2] is new_tomb or policy.favoured(loss[2], loss[3]) is not loss[3]]
    logged = ap.conflicts
    record_losses(ap, row.table, row.key, losses)
    if policy is None or policy.detect != policies.ROW or ap.conflicts != logged or not existed:
        return
    if policy.kind == policies.MANUAL and policy.decider == ap.me:
        return  # the reconciler queued them instead
    _row_conflict(ap, row, cells, tomb)


def _row_conflict(ap: _Applier, row: RowChange, cells: dict[str, Stamp], tomb: Stamp | None) -> None:
    """``detect: row`` under ``lww`` or ``priority`` (not where a reconciler
    queues it): an incoming edit of one column concurrent with this
    device's edit of another column of the row is logged once per row
    change as a row conflict — both values stay, as per-column merging keeps them."""
    for c in row.cells:
        theirs = Stamp(c.clock, c.prev)
        seen = cells.get(c.column)
        if c.column == row.key_column or (seen is not None and seen.clock == theirs.clock):
            continue
        for col, mine in cells.items():
            if col not in (c.column, row.key_column) and visible(mine, tomb) and mine.clock != theirs.clock \
                    and policies.concurrent(mine, theirs):
                ap.conflict(row.table, row.key, c.column, None, theirs, mine, other_col=col)
                return


def record_losses(ap: _Applier, table: str, ck: Value, losses: list[tuple[str | None, Value, Stamp, Stamp]]) -> None:
    for col, value, winner, loser in losses:
        ap.conflict(table, ck, col, value, winner, loser)


def write_rows(ap: _Applier, plans: Sequence[RowPlan], *, raw_text: bool = False) -> None:
    """Write ``plans`` (in order): the table rows, then one log seq per
    plan, its cells and tomb. Deletes go first, then updates, then
    inserts, so a unique value a batch moves between rows is free when
    its new row takes it. ``raw_text``: values may be TEXT that is not
    valid UTF-8 (row by row; the bulk path leaves such rows to it)."""
    marks_of = bind if raw_text else lambda values: (["?"] * len(values), tuple(values))
    conn = ap.conn
    deletes: dict[str, list[tuple[Value, ...]]] = {}
    updates: dict[str, list[tuple[Value, ...]]] = {}
    inserts: dict[str, list[tuple[Value, ...]]] = {}
    for plan in plans:
        sql = statements(ap, plan.table)
        if plan.write == "delete":
            deletes.setdefault(sql.delete, []).append((plan.ck,))
        elif plan.write == "update" and plan.diff:
            marks, params = marks_of([plan.after[c] for c in plan.diff])
            statement = sql.update_head + ", ".join(f"{quote_ident(c)} = {m}" for c, m in zip(plan.diff, marks)) + sql.update_tail
            updates.setdefault(statement, []).append((*params, plan.ck))
        elif plan.write == "insert":
            marks, params = marks_of([plan.after[c] for c in sql.columns])
            statement = sql.insert if all(m == "?" for m in marks) else f"{sql.insert_head}({', '.join(marks)})"
            inserts.setdefault(statement, []).append(params)
    for group in (deletes, updates, inserts):
        for statement, params in group.items():
            conn.executemany(statement, params)
    keys = {} if raw_text else inserted_keys(ap, plans)
    top = capture.last_seq(conn)
    log_rows, tomb_rows = [], []
    writer = cells.Writer()
    for seq, plan in enumerate(plans, start=top + 1):
        tid, ck = plan.table.tid, plan.ck
        if plan.write == "insert":
            found = keys.get((tid, ck))
            plan.pk = found[0] if found is not None else conn.execute(statements(ap, plan.table).key, (ck,)).fetchone()[0]
            ap.appended.add(tid)
        # No ck: only stamping reads it, of local rows; this row's clocks are in _p2p_rows/_p2p_cells.
        log_rows.append((seq, tid, plan.pk, plan.op, plan.newest[0], ap.logged(plan.newest[1]), None))
        gone = plan.write in ("delete", "none")
        if plan.changed or (gone and plan.state.had_row):  # a row leaving the table keeps its clocks by value
            stored = dict(plan.state.stored)
            for col, st in plan.changed:
                stored[col] = (*ap.stored_clock(st.clock), seq, *ap.stored_clock(st.prev))
            current = plan.state.current
            writer.put(tid, ck, None if gone else plan.pk, stored, plan.table.sync_columns,
                       old_pk=current[0] if current is not None else None, had_row=plan.state.had_row,
                       had_cols=plan.state.had_cols)
        if plan.tomb is not None:
            tomb_rows.append((tid, ck, *ap.stored_clock(plan.tomb.clock), seq, *ap.stored_clock(plan.tomb.prev)))
        if plan.announce:
            ap.announce(plan.newest[1], plan.table.info.name, plan.op, plan.pk)
    conn.executemany("INSERT INTO _p2p_log(seq, tid, pk, op, hlc, origin, ck) VALUES (?, ?, ?, ?, ?, ?, ?)", log_rows)
    writer.write(conn)
    conn.executemany(
        "INSERT INTO _p2p_tombs(tid, ck, hlc, origin, seq, prev_hlc, prev_origin) VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(tid, ck) DO UPDATE SET hlc = excluded.hlc, origin = excluded.origin, seq = excluded.seq, "
        "prev_hlc = excluded.prev_hlc, prev_origin = excluded.prev_origin",
        tomb_rows,
    )


def inserted_keys(ap: _Applier, plans: Sequence[RowPlan]) -> dict[tuple[int, Value], tuple[Value]]:
    """The local keys of the rows ``plans`` inserted, by (tid, ck): one IN
    query per table and chunk instead of a SELECT per row. Only for the
    bulk path, whose keys are of one type that the conflict column keeps
    distinct (``_keys_stay_distinct``), so a ck read back is the ck sent;
    a row it misses is looked up on its own by the caller."""
    by_table: dict[int, tuple[SyncTable, list[Value]]] = {}
    for plan in plans:
        if plan.write == "insert":
            by_table.setdefault(plan.table.tid, (plan.table, []))[1].append(plan.ck)
    found: dict[tuple[int, Value], tuple[Value]] = {}
    for tid, (table, cks) in by_table.items():
        sql = statements(ap, table).keys_many
        for i in range(0, len(cks), IN_CHUNK):
            chunk = cks[i:i + IN_CHUNK]
            for ck, pk in ap.conn.execute(f"{sql} ({', '.join('?' * len(chunk))})", chunk):
                found[(tid, ck)] = (pk,)
    return found


def write_block(ap: _Applier, block: Block, columns: Columns, kind: type) -> Done | None:
    """A single_version block whose rows are all either never seen here
    (inserted whole) or already here exactly as they come (an echo: a row
    relayed back, a batch sent twice — skipped, as the planner would skip
    it); any other block is the planner's (None)."""
    fields = columns.fields
    table = ap.tables[block.table]
    ck_col = table.conflict_column
    assert ck_col is not None
    if set(block.columns) != set(table.sync_columns) or None in fields[HLC]:
        return None
    conn = ap.conn
    if not keys_stay_distinct(conn, table.info.name, ck_col, kind):
        return None
    top = capture.last_seq(conn)
    if top + len(block.rows) >= 1 << 63:
        return None
    appended, tried = _append(ap, table, block, columns, top)
    if appended is not None:
        return appended
    stage = load(conn, block, columns)
    name, ck, tid = quote_ident(table.info.name), quote_ident(ck_col), table.tid
    # The block's origin indexes -> this store's numbers (NULL: this device;
    # -1: a device with no number yet, so no stored clock can be its). The
    # fresh rows' devices get theirs below (``_number_origins``).
    used = {*fields[ORIGIN], *not_none(fields[PREV_ORIGIN]), *not_none(fields[TOMB_ORIGIN])}
    one = block.origins[next(iter(used))] if len(used) == 1 else None  # the device of a one-device block (the usual)
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS _p2p_stage_origins(idx INTEGER PRIMARY KEY, stored, logged)")
    conn.execute("DELETE FROM temp._p2p_stage_origins")
    conn.executemany("INSERT INTO temp._p2p_stage_origins(idx, stored) VALUES (?, ?)",
                     [(i, None if block.origins[i] == ap.me else _or(ap.origins.known(block.origins[i]), -1)) for i in used])
    mapped = "(SELECT m.stored FROM temp._p2p_stage_origins m WHERE m.idx = {0})"
    has = {t: conn.execute(f"SELECT 1 FROM {t} WHERE tid = ? LIMIT 1", (tid,)).fetchone() is not None
           for t in ("_p2p_cells", "_p2p_tombs")}
    position = {c: f"v{i}" for i, c in enumerate(block.columns)}
    listed = ", ".join(quote_ident(c) for c in table.sync_columns)
    values = ", ".join("k" if c == ck_col else position[c] for c in table.sync_columns)
    insert = f"INSERT INTO {name} ({listed}) SELECT {values} FROM temp.{stage} WHERE {{}} ORDER BY n"
    ap.lift(table.info.name)
    dense = False  # every staged row is fresh, n = 1 .. rows: seqs and keys follow n
    if not tried and not has["_p2p_cells"] and not has["_p2p_tombs"] and all_none(fields[TOMB_HLC]) and conn.execute(
            f"SELECT NOT EXISTS (SELECT 1 FROM {name} x WHERE x.{ck} = (SELECT k FROM temp.{stage} WHERE n = 1))").fetchone()[0]:
        # The common case of a large sync, rows never seen here (the first is not): insert them
        # all at once and see — the table's UNIQUE index on the conflict value is the probe. A
        # row that was here already (an echo, or one for the planner) undoes it: the probe below.
        conn.execute("SAVEPOINT p2p_fresh")
        inserted = conn.execute(insert.format("true") + " ON CONFLICT DO NOTHING").rowcount
        dense = inserted == len(block.rows)
        if not dense:
            conn.execute("ROLLBACK TO p2p_fresh")
        conn.execute("RELEASE p2p_fresh")
    if not dense:
        found = _probe(conn, table, stage, tid, has, mapped)
        if found == "planner":
            return None
        if found == "echoes":
            return 0, [], None  # nothing to write (an empty INSERT would still touch sqlite_sequence)
        _number_origins(ap, block, stage, used, one)
        inserted = conn.execute(insert.format("fresh")).rowcount
    else:
        _number_origins(ap, block, stage, used, one)
    seq = "?1 + s.n" if dense else "?1 + row_number() OVER (ORDER BY s.n)"
    pk, source, first = _new_keys(conn, table, stage, inserted, dense)
    binds = (top, tid) if first is None else (top, tid, first)
    origin = _origin_sql(ap, one)
    # (Only the last change logged, ``_Applier.log_all``: where the keys announced below are
    # not read back from the log.)
    last_only = dense and one is not None and not ap.log_all
    conn.execute(
        "INSERT INTO _p2p_log(seq, tid, pk, op, hlc, origin, ck) "
        f"SELECT {seq}, ?2, {pk}, {OP_INSERT}, s.hlc, {origin('logged', 'o')}, NULL "
        f"FROM {source} WHERE s.fresh{f' AND s.n = {inserted}' if last_only else ''} ORDER BY s.n",
        binds,
    )
    # OR REPLACE: an orphan row clock under a key a new row took (store/cells.py).
    conn.execute(
        "INSERT OR REPLACE INTO _p2p_rows(tid, pk, hlc, origin, seq, prev_hlc, prev_origin) "
        f"SELECT ?2, {pk}, s.hlc, {origin('stored', 'o')}, {seq}, s.ph, "
        f"CASE WHEN s.ph IS NOT NULL THEN {origin('stored', 'po')} END "
        f"FROM {source} WHERE s.fresh ORDER BY s.n",
        binds,
    )
    if dense and one is not None:  # every staged row written, one device's: keys first, first + 1, ... or the staged ones
        keys = list(range(first, first + inserted)) if first is not None else \
            [k for (k,) in conn.execute(f"SELECT {pk} FROM {source} ORDER BY s.n", binds[2:])]
        return inserted, [(one, table.info.name, OP_INSERT, keys)], tid
    logged = conn.execute("SELECT origin, pk FROM _p2p_log WHERE seq > ? ORDER BY seq", (top,)).fetchall()
    numbers = set(map(_FIRST, logged))
    if len(numbers) == 1:  # a block from one device (grouped in C)
        by_origin = {numbers.pop(): list(map(_SECOND, logged))}
    else:
        by_origin = {}
        for number, pk in logged:
            by_origin.setdefault(number, []).append(pk)
    remote = [(ap.origins.device(number), table.info.name, OP_INSERT, keys) for number, keys in by_origin.items()]
    return inserted, remote, tid if inserted else None


_FIRST, _SECOND = itemgetter(0), itemgetter(1)


def _append(ap: _Applier, table: SyncTable, block: Block, columns: Columns, top: int) -> tuple[Done | None, bool]:
    """``write_block`` for the usual block of a large sync: rows never seen
    here (the first is not, and the table has no column clock or tomb), one
    device's, with no prev and no tomb, whose clocks count, into a table
    keyed by its rowid. They go straight into the table — SQLite numbers
    them one after another (``_numbered``) — and their
    log rows and row clocks are written from the keys just written: row *i*
    gets seq ``top + 1 + i`` and clock ``first + i × step``, what staging
    them gives (tests/store/test_blocks.py compares both with row by row).
    (None, tried): not such a block, or — ``tried`` — a row was here after
    all (undone: the staged path then probes, without trying the insert
    again)."""
    conn, fields, n = ap.conn, columns.fields, len(block.rows)
    if n < ROWS_PER_INSERT:  # (an auto-sync's few rows, often partly here already: staged, as before)
        return None, False
    hlc_step = columns.step(HLC)
    used = set(fields[ORIGIN])
    ck_col = table.conflict_column
    if (hlc_step is None or len(used) != 1 or not table.info.key_is_rowid_alias or table.info.key == ck_col
            or not all_none(fields[PREV_HLC]) or not all_none(fields[TOMB_HLC])):
        return None, False
    tid, name, ck, key = table.tid, quote_ident(table.info.name), quote_ident(ck_col or ""), table.info.key_expr
    keys = fields[KEY]
    if conn.execute(f"SELECT EXISTS (SELECT 1 FROM _p2p_cells WHERE tid = ?1) OR EXISTS (SELECT 1 FROM _p2p_tombs WHERE tid = ?1) "
                    f"OR EXISTS (SELECT 1 FROM {name} WHERE {ck} = ?2)", (tid, keys[0])).fetchone()[0]:
        return None, False
    ap.lift(table.info.name)
    at = {c: i for i, c in enumerate(block.columns)}
    values = [keys if c == ck_col else bindable(fields[VALUES + at[c]], columns.kinds[at[c]]) for c in table.sync_columns]
    per, whole, rest = runs(values, n)
    insert = f"INSERT INTO {name} ({', '.join(quote_ident(c) for c in table.sync_columns)}) VALUES "
    row = "(" + ", ".join("?" * len(values)) + ")"
    conn.execute("SAVEPOINT p2p_fresh")
    inserted = 0
    if whole:
        inserted += conn.executemany(insert + ", ".join([row] * per) + " ON CONFLICT DO NOTHING", whole).rowcount
    if rest:
        inserted += conn.executemany(insert + row + " ON CONFLICT DO NOTHING", rest).rowcount
    first = _numbered(conn, table, n, (keys[0], keys[-1])) if inserted == n else None
    if first is None:
        conn.execute("ROLLBACK TO p2p_fresh")
        conn.execute("RELEASE p2p_fresh")
        return None, True
    conn.execute("RELEASE p2p_fresh")
    last = first + n - 1
    one = block.origins[used.pop()]
    logged, stored = ap.logged(one), (None if one == ap.me else ap.origins.known(one))  # (numbered as the row path numbers it)
    i = f"(x.{key} - ?3)"  # row i of the block, from its key
    span = (top, tid, first, fields[HLC][0], hlc_step, last)
    written = f"FROM {name} x WHERE x.{key} BETWEEN ?3 AND ?6"
    log = "INSERT INTO _p2p_log(seq, tid, pk, op, hlc, origin, ck) "
    if ap.log_all:
        conn.execute(log + f"SELECT ?1 + 1 + {i}, ?2, x.{key}, {OP_INSERT}, ?4 + {i} * ?5, ?7, NULL {written}", (*span, logged))
    else:  # (the seq counter's row: the last)
        conn.execute(log + "VALUES (?, ?, ?, ?, ?, ?, NULL)", (top + n, tid, last, OP_INSERT, fields[HLC][-1], logged))
    # OR REPLACE: an orphan row clock under a key a new row took (store/cells.py).
    conn.execute("INSERT OR REPLACE INTO _p2p_rows(tid, pk, hlc, origin, seq, prev_hlc, prev_origin) "
                 f"SELECT ?2, x.{key}, ?4 + {i} * ?5, ?7, ?1 + 1 + {i}, NULL, NULL {written}", (*span, stored))
    return (n, [(one, table.info.name, OP_INSERT, list(range(first, last + 1)))], tid), True


def _probe(conn: sqlite3.Connection, table: SyncTable, stage: str, tid: int, has: dict[str, bool], mapped: str) -> str:
    """Mark each staged row ``fresh``: 1 never seen here, 0 here already with
    the same row clock (and no column clock of its own) and the same tomb or
    none, NULL otherwise. A block with a NULL row is the planner's
    ("planner"), one of echoes only has nothing to write ("echoes"), else
    "fresh". A table with no column clocks (or no tombs) at all is not
    probed for them."""
    name, ck, st = quote_ident(table.info.name), quote_ident(table.conflict_column or ""), stage
    # (UPDATE ... AS alias needs SQLite 3.35: columns are qualified by the table's name)
    no_cells = f"NOT EXISTS (SELECT 1 FROM _p2p_cells c WHERE c.tid = ?1 AND c.ck = {st}.k)" if has["_p2p_cells"] else "1"
    no_tomb = f"NOT EXISTS (SELECT 1 FROM _p2p_tombs t WHERE t.tid = ?1 AND t.ck = {st}.k)" if has["_p2p_tombs"] else "1"
    same_tomb = (f"EXISTS (SELECT 1 FROM _p2p_tombs t WHERE t.tid = ?1 AND t.ck = {st}.k AND t.hlc = {st}.th "
                 f"AND t.origin IS {mapped.format(st + '.tor')})") if has["_p2p_tombs"] else "0"
    # (A row not in the table has no row clock: store/cells.py.)
    key = table.info.key_expr
    conn.execute(
        f"UPDATE temp.{st} SET fresh = CASE "
        f"WHEN NOT EXISTS (SELECT 1 FROM {name} x WHERE x.{ck} = {st}.k) "
        f"AND {no_cells} AND {no_tomb} THEN (CASE WHEN {st}.th IS NULL THEN 1 END) "
        f"WHEN EXISTS (SELECT 1 FROM {name} x JOIN _p2p_rows r ON r.tid = ?1 AND {cells.same_key('r.pk', 'x.' + key)} WHERE x.{ck} = {st}.k "
        f"             AND r.hlc = {st}.hlc AND r.origin IS {mapped.format(st + '.o')}) "
        f"AND {no_cells} AND ({st}.th IS NULL OR {same_tomb}) THEN 0 END",
        (tid,),
    )
    if conn.execute(f"SELECT 1 FROM temp.{stage} WHERE fresh IS NULL LIMIT 1").fetchone() is not None:
        return "planner"
    if conn.execute(f"SELECT 1 FROM temp.{stage} WHERE fresh LIMIT 1").fetchone() is None:
        return "echoes"
    return "fresh"


def _new_keys(conn: sqlite3.Connection, table: SyncTable, stage: str, inserted: int,
              dense: bool = False) -> tuple[str, str, int | None]:
    """How ``write_block`` finds the local keys of the ``inserted`` rows it
    just wrote (the staging rows ``s`` that are fresh, in order): SQL of the
    key, the FROM clause, and the first key (bound as ?3).

    Without a lookup of each row by its (usually random) conflict value
    where the key says itself: a key that is the conflict value is the
    staged value; an id SQLite assigned (an INTEGER PRIMARY KEY: the rowid)
    is the next one after another for the rows of one INSERT, checked here
    (the range holds that many rows, its first and last the first and last
    values written). Otherwise, a join on the conflict value."""
    name, ck = quote_ident(table.info.name), quote_ident(table.conflict_column or "")
    staged = f"temp.{stage} s"
    if table.info.key == table.conflict_column:
        return "s.k", staged, None
    if table.info.key_is_rowid_alias and inserted > 0:
        ends = conn.execute(f"SELECT (SELECT k FROM temp.{stage} WHERE fresh ORDER BY n LIMIT 1), "
                            f"(SELECT k FROM temp.{stage} WHERE fresh ORDER BY n DESC LIMIT 1)").fetchone()
        first = _numbered(conn, table, inserted, tuple(ends))
        if first is not None:
            return ("?3 + s.n - 1" if dense else "?3 + row_number() OVER (ORDER BY s.n) - 1"), staged, first
    return f"x.{table.info.key_expr}", f"{staged} JOIN {name} x ON x.{ck} = s.k", None


def _numbered(conn: sqlite3.Connection, table: SyncTable, inserted: int, ends: tuple[Any, Any]) -> int | None:
    """The first rowid of the ``inserted`` rows the last INSERT wrote into
    ``table`` (keyed by its rowid) if SQLite numbered them one after another
    — the range up to ``last_insert_rowid()`` holds that many rows, its
    first and last the conflict values ``ends`` — else None."""
    name, ck = quote_ident(table.info.name), quote_ident(table.conflict_column or "")
    last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
    first = last - inserted + 1
    found = conn.execute(f"SELECT count(*), (SELECT {ck} FROM {name} WHERE rowid = ?1), (SELECT {ck} FROM {name} WHERE rowid = ?2) "
                         f"FROM {name} WHERE rowid BETWEEN ?1 AND ?2", (first, last)).fetchone()
    return first if tuple(found) == (inserted, *ends) else None


def _origin_sql(ap: _Applier, one: str | None) -> Callable[[str, str], str]:
    """SQL of a staged row's origin in this store's numbers, ``logged`` (the
    log's: this device too is a number) or ``stored`` (a clock's: NULL for
    this device), from the staging field ``o`` or ``po``: a lookup in the
    staging map, or, for a block whose clocks are all device ``one``'s (the
    usual block), that device's number as a literal (no lookup per row).
    After ``_number_origins``."""
    if one is not None:
        number = {"logged": ap.origins.known(one), "stored": None if one == ap.me else ap.origins.known(one)}
        return lambda which, _field: "NULL" if number[which] is None else str(int(number[which]))
    return "(SELECT m.{0} FROM temp._p2p_stage_origins m WHERE m.idx = s.{1})".format


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _number_origins(ap: _Applier, block: Block, stage: str, used: set[int], one: str | None) -> None:
    """Give the fresh rows' devices their numbers (store/origins.py) in the
    order the row path gives them, as it writes each row — its origin
    (logged: always a number, this device too), then its prev's (stored:
    none for this device) — and fill in the staging map ``_origin_sql``
    looks them up in (not needed for the block of ``one`` device, whose
    number it writes as it is). The walk ends once no device is left
    without a number: at once, in the usual case."""
    devices = block.origins
    if one is not None:  # every fresh row's origin (and any prev's) is that device
        logged, stored = {one}, set()
    else:
        logged = {devices[i] for (i,) in ap.conn.execute(f"SELECT DISTINCT o FROM temp.{stage} WHERE fresh")}
        stored = {devices[i] for (i,) in ap.conn.execute(f"SELECT DISTINCT po FROM temp.{stage} WHERE fresh AND ph IS NOT NULL")}
    todo = {d for d in logged | (stored - {ap.me}) if ap.origins.known(d) is None}
    if todo:
        for o, po, ph in ap.conn.execute(f"SELECT o, po, ph FROM temp.{stage} WHERE fresh ORDER BY n").fetchall():
            ap.logged(devices[o])
            if ph is not None:
                ap.stored(devices[po])
            if all(ap.origins.known(d) is not None for d in todo):
                break
    if one is not None:
        return
    ap.conn.executemany("UPDATE temp._p2p_stage_origins SET stored = ?, logged = ? WHERE idx = ?",
                        [(None if devices[i] == ap.me else ap.origins.known(devices[i]), ap.origins.known(devices[i]), i)
                         for i in used])
