"""Collaborative tables: each device's rows in their own device table.

One of the two table types (protocol/table_type.py); single_version.py is
the other, with the same interface (store/modes.py lists it): how a table
is *registered* for capture, how its changes are *read* for a peer (a
block, row changes, the seqs and sizes of an interval), and how a peer's
changes are *planned* and *written* here (row by row, in bulk, or a whole
block set-based). merge.py and stream.py call these through
``modes.of(mode)`` and never branch on the table type themselves.

The rules (SPEC §4; merge.py's docstring):

- The stream sends each changed key of this device's own rows once, as its
  *current* row (or its delete) with the clock of its newest log row. Rows
  received from peers live in device tables and are never sent on: no
  relay, so a row is only accepted from the device that wrote it.
- A peer's rows land in ``dev_<DEVICE>_<T>`` as whole-row upserts and
  deletes; the row's one clock (``_p2p_cells`` under column ``*``) makes a
  stale or repeated change a no-op.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from p2pstore.protocol.batch import HLC, KEY, ORIGIN, PREV_HLC, TOMB_HLC, TOMB_ORIGIN, TOMB_PREV_HLC, VALUES, Columns, Rows, all_none
from p2pstore.schema.predicates import CompiledQuery, quote_ident
from p2pstore.store import capture, origins, row_runs
from p2pstore.store.blocks import Done, bindable, keys_stay_distinct, load, not_none, runs
from p2pstore.store.capture import OP_DELETE, OP_INSERT, OP_UPDATE, CaptureState
from p2pstore.store.changes import (
    IN_CHUNK, ROW_CLOCK_COLUMN, Block, Cell, Read, RowChange, SyncTable, Value, fetch, filter_sql, is_raw_text, limited_end, sendable,
    size_sql, unsendable,
)
from p2pstore.store.lww import Clock, RowFailed, Target, bind, park
from p2pstore.store.tables import TableInfo

if TYPE_CHECKING:  # merge.py imports this module
    from p2pstore.store.merge import _Applier

log = logging.getLogger(__name__)


# -- register ---------------------------------------------------------------


def register(conn: sqlite3.Connection, state: CaptureState, info: TableInfo, auto_sync: bool) -> None:
    """Capture ``info``'s writes: its log rows are keyed by its primary key (or rowid)."""
    capture.register_table(conn, state, info, auto_sync)


def columns_changed(conn: sqlite3.Connection, info: TableInfo, label: str) -> None:
    """``info`` gained or lost columns (an ALTER through the API): every
    device table of it gains the new ones, so rows from peers that made the
    same change apply. A dropped column stays in the device tables: rows from
    peers that still have it keep applying."""
    for name, col in capture.add_device_columns(conn, info.name):
        log.info("%s: device table %s gained column %s (as %s did)", label, name, col, info.name)
        merged = unpark(conn, name, info.key or capture.DEVICE_ROWID_COLUMN, col)
        if merged:
            log.info("%s: %d value(s) of %s.%s that the peer sent before this device had the column merged", label, merged, name, col)


def unpark(conn: sqlite3.Connection, dest: str, key_column: str, column: str) -> int:
    """Write the cells of ``column`` a peer sent before ``dest`` had it
    (``lww.park``) into the rows they belong to; the number written. A
    parked cell is the newest the peer sent for its row (every change of a
    collaborative row carries the whole row), so it simply takes its place;
    a row deleted since is gone, and its cell with it."""
    tid = conn.execute("SELECT tid FROM _p2p_tables WHERE name = ?", (dest,)).fetchone()[0]
    if conn.execute("SELECT 1 FROM _p2p_parked WHERE tid = ? AND col = ? LIMIT 1", (tid, column)).fetchone() is None:
        return 0
    name, key, col = quote_ident(dest), quote_ident(key_column), quote_ident(column)
    conn.execute("INSERT INTO _p2p_apply(x) VALUES (1)")  # the device table's read-only guard lets sync write
    try:
        merged = conn.execute(
            f"UPDATE {name} SET {col} = (SELECT p.value FROM _p2p_parked p WHERE p.tid = ?1 AND p.ck = {name}.{key} AND p.col = ?2) "
            f"WHERE {key} IN (SELECT ck FROM _p2p_parked WHERE tid = ?1 AND col = ?2)", (tid, column)).rowcount
    finally:
        conn.execute("DELETE FROM _p2p_apply")
    conn.execute("DELETE FROM _p2p_parked WHERE tid = ? AND col = ?", (tid, column))
    return merged


# -- read: what a peer is sent ------------------------------------------------

#: Where the seqs of an interval are found: (source, extra condition, key column).
SEQ_SOURCES = (("_p2p_log", " AND origin IS NULL", "pk"),)



def unsent(conn: sqlite3.Connection, since: int) -> int:
    """The rows a peer at position ``since`` has not been sent: the distinct
    keys of this device's own log rows above it."""
    return int(conn.execute(
        "SELECT count(*) FROM (SELECT DISTINCT tid, pk FROM _p2p_log WHERE seq > ?1 AND origin IS NULL "
        "AND tid IN (SELECT tid FROM _p2p_tables WHERE kind = 'local'))", (since,)).fetchone()[0])


def seq_sizes(conn: sqlite3.Connection, t: SyncTable, seqs: Sequence[int]) -> Iterable[tuple[int, int]]:
    """(seq, stored size of the current row it sends) for the log rows of ``seqs``."""
    name = quote_ident(t.info.name)
    total = size_sql(t.info.columns, "")
    marks = ", ".join("?" * len(seqs))
    return conn.execute(
        f"SELECT l.seq, (SELECT {total} FROM {name} WHERE {t.info.key_expr} = l.pk) FROM _p2p_log l "
        f"WHERE l.tid = ? AND l.origin IS NULL AND l.seq IN ({marks})",
        (t.tid, *seqs),
    )


def has_irregular_rows(conn: sqlite3.Connection, t: SyncTable) -> bool:
    """Every collaborative row fits a block."""
    return False


def read_irregular(conn: sqlite3.Connection, t: SyncTable, since: int, last: int, me: str, block: Block) -> Iterator[RowChange]:
    """Nothing: the block held every row of the interval."""
    return iter(())


def counts_interval(conn: sqlite3.Connection, t: SyncTable, since: int, last: int, irregular: bool) -> bool:
    """Whether ``read_block`` with a ``limit`` can count the batch itself:
    every seq of the interval is a log row it reads. Always — but where the
    whole interval spans many stamp ranges, each row's clock would be looked
    up, so the batch is counted first and read over its own interval."""
    return capture.interval_stamps(conn, since, last) is not None


def read_block(conn: sqlite3.Connection, t: SyncTable, since: int, last: int, devices: tuple[str, ...],
               budget: int | None = None, irregular: bool = False, limit: int | None = None) -> Read:
    """Every change of the interval in one statement, as wire rows: the
    current row of each key changed (the clock of its newest log row), or
    its delete if the row is gone. What ``read_rows`` reads, as
    ``Block`` rows (tests/store/test_blocks.py compares them). Each row ends
    in its seq and its size (``fetch``; the caller strips both); the flag
    says whether every row of the interval was read.

    Read flat first, a row a log row in seq order: where no key repeats
    among the rows read, the usual case, each is its key's newest log row
    up to the last one read — all a batch that ends there holds, as
    ``read_rows`` would give it — with no GROUP BY and no sort back into
    seq order (15 % of the read). Where a key repeats, read again grouped,
    each key at its newest log row.

    The statement reads only what varies — the key and seq, the row's
    values, and its size (-1: the row is gone) — and the wire row's other
    fields are filled in here, a field at a time: a value SQLite hands
    Python costs more than the row's join (the benches' table: 17 values a
    row before, 7 now; the sender's read of 100k rows 0.29 -> 0.19 s). A
    row's clock is worked out from its seq (``capture.stamped``) unless the
    interval spans many stamp ranges; the key column's value is the key
    itself where the key is the rowid (or an alias of it).

    ``limit``: only the interval's first ``limit`` log rows (``Read.end``);
    where a key repeats among them, read again grouped up to the last."""
    name, key = quote_ident(t.info.name), t.info.key_expr
    stamps = capture.interval_stamps(conn, since, last)
    if stamps == []:
        return Read(Block(t.info.name, t.key_column, t.info.columns, devices, []), True)  # (nothing stamped: stable_bound keeps this from happening)
    keyed = t.info.key is not None and not t.info.key_is_rowid_alias  # (its value read: the key only matches it)
    others = [c for c in t.info.columns if c != t.info.key or keyed]
    cols = "".join(f", x.{quote_ident(c)}" for c in others)
    hlc, stamped_from = (capture.hlc_sql("seq"), "1") if stamps is None else ("NULL", str(stamps[0][0]))
    own = f"FROM _p2p_log WHERE seq > ?1 AND seq <= ?2 AND tid = ?3 AND origin IS NULL AND seq >= {stamped_from}"
    clock = ", l.hlc" if stamps is None else ""

    def read(changes: str, params: tuple[Any, ...]) -> tuple[list[Any], bool]:
        return fetch(
            conn,
            f"SELECT l.pk, l.seq{clock}{cols}, CASE WHEN x.{key} IS NULL THEN -1 ELSE {size_sql(t.info.columns, 'x.')} END "
            f"FROM ({changes}) l LEFT JOIN {name} x ON x.{key} = l.pk WHERE {'l.hlc IS NOT NULL' if stamps is None else '1'} "
            f"ORDER BY l.seq{' LIMIT ?4' if len(params) > 3 else ''}",  # (the LIMIT counts the rows read, in seq order)
            params, budget,
        )

    rows, complete = read(f"SELECT pk, seq, {hlc} AS hlc {own}", (since, last, t.tid, *((limit,) if limit is not None else ())))
    end, seqs = limited_end(rows, complete, limit), None
    if len(set(map(_KEY, rows))) != len(rows):  # (a key repeats: read again grouped, over the interval the flat read held)
        upto = rows[-1][1] if limit is not None else last
        seqs = [row[1] for row in rows]
        rows, grouped_complete = read(f"SELECT pk, seq, {hlc} AS hlc FROM (SELECT pk, max(seq) AS seq {own} GROUP BY pk)",
                                      (since, upto, t.tid))
        complete = complete and grouped_complete
    block = Block(t.info.name, t.key_column, t.info.columns, devices, sendable(t, _wire_rows(t.info, rows, stamps, others)))
    return Read(block, complete, end, seqs)


def _wire_rows(info: TableInfo, read: list[Any], stamps: list[tuple[int, int]] | None, others: list[str]) -> Sequence[Any]:
    """``read_block``'s rows ``(key, seq, [hlc,] values of others..., size)``
    as wire rows, each ending in its seq and size: an upsert (the row is
    here: its size is not -1) with its clock, this device's (origin 0), or a
    delete with the clock as its tomb; no prevs (collaborative rows have
    none). Kept field by field (``Rows``): the wire takes them so.
    ``stamps`` None: each row's clock was read too."""
    if not read:
        return []
    if stamps is None:
        keys, seqs, hlcs, *values, sizes = map(list, zip(*read))
    else:
        keys, seqs, *values, sizes = map(list, zip(*read))
        hlcs = capture.stamped(seqs, stamps)
    n = len(keys)
    nothing = [None] * n
    fields = dict(zip(others, values))
    if min(sizes) >= 0:  # no delete: the usual block
        clock, origin, tomb, tomb_origin = hlcs, [0] * n, nothing, nothing
        if info.key is not None and info.key not in fields:
            fields[info.key] = keys
    else:
        gone = [size < 0 for size in sizes]
        clock = [None if g else h for g, h in zip(gone, hlcs)]
        origin = [None if g else 0 for g in gone]
        tomb = [h if g else None for g, h in zip(gone, hlcs)]
        tomb_origin = [0 if g else None for g in gone]
        sizes = [0 if g else size for g, size in zip(gone, sizes)]
        if info.key is not None and info.key not in fields:
            fields[info.key] = [None if g else k for g, k in zip(gone, keys)]
    return Rows([keys, seqs, clock, origin, nothing, nothing, tomb, tomb_origin, nothing, nothing,
                 *(fields[c] for c in info.columns), seqs, sizes], n)


_KEY = itemgetter(KEY)


def read_rows(
    conn: sqlite3.Connection, t: SyncTable, since: int, last: int, me: str, where: CompiledQuery | None
) -> Iterator[RowChange]:
    filt, fparams = filter_sql(t, "l.pk", where)
    latest = conn.execute(
        f"SELECT l.pk, l.seq, {capture.hlc_sql('l.seq')} FROM _p2p_log l WHERE l.seq IN ("
        "  SELECT max(seq) FROM _p2p_log WHERE seq > ? AND seq <= ? AND tid = ? AND origin IS NULL GROUP BY pk) "
        f"{filt} ORDER BY l.seq",
        (since, last, t.tid, *fparams),
    ).fetchall()
    cols = ", ".join(quote_ident(c) for c in t.info.columns)
    name, key = quote_ident(t.info.name), t.info.key_expr
    select = f"SELECT {cols} FROM {name} WHERE {key} = ?"
    # Current rows a chunk of keys per query, matched by exact value; a key
    # the table returns under another type is read on its own below.
    keys = [pk for pk, _seq, hlc in latest if hlc is not None and not is_raw_text(pk)]
    current_rows: dict[Any, tuple[Any, ...]] = {}
    for i in range(0, len(keys), IN_CHUNK):
        chunk = keys[i:i + IN_CHUNK]
        for pk, *values in conn.execute(f"SELECT {key}, {cols} FROM {name} WHERE {key} IN ({', '.join('?' * len(chunk))})", chunk):
            current_rows.setdefault(pk, tuple(values))
    for pk, seq, hlc in latest:
        if hlc is None:  # beyond every stamp: stable_bound keeps this from happening
            continue
        if is_raw_text(pk):
            unsendable(t, pk)
            continue
        current = current_rows.get(pk)
        if current is None:
            current = conn.execute(select, (pk,)).fetchone()
        if current is None:
            yield RowChange(t.info.name, t.key_column, pk, seq, (), hlc, me)
        else:
            cells = tuple(Cell(c, v, hlc, me) for c, v in zip(t.info.columns, current))
            yield RowChange(t.info.name, t.key_column, pk, seq, cells)


# -- plan and write: a peer's rows here ----------------------------------------


def row_clock(row: RowChange) -> Clock:
    """A collaborative row change's one clock: its delete's, or its cells' (all equal)."""
    return row.tomb if row.tomb is not None else (row.cells[0].hlc, row.cells[0].origin)


def target(ap: _Applier, table: SyncTable) -> Target:
    """The sender's device table of ``table`` (created with its first row)."""
    dest = capture.create_device_table(ap.conn, ap.sender, table.info.name)
    tid = ap.conn.execute("SELECT tid FROM _p2p_tables WHERE name = ?", (dest,)).fetchone()[0]
    columns = frozenset(r[1] for r in ap.conn.execute(f"PRAGMA table_info({quote_ident(dest)})"))
    return Target(table, dest, tid, columns)


def merge_row(ap: _Applier, target: Target, row: RowChange) -> bool:
    clock = row_clock(row)
    if clock[1] != ap.sender:
        raise RowFailed(f"invalid: collaborative rows are only accepted from their own device, not relayed ({clock[1]} via {ap.sender})")
    table = target.table
    if row.key_column != table.key_column:
        raise RowFailed(f"schema_mismatch: {table.info.name} is keyed by {table.key_column or 'rowid'} here, by {row.key_column or 'rowid'} on {ap.sender}")
    stored = _stored_clocks(ap.conn, target.dest_tid, [row.key]).get(row.key)
    if stored is not None and clock <= (stored[0], ap.local(stored[1])):
        return False  # stale or repeated
    dest = quote_ident(target.dest)
    key_col = table.info.key or capture.DEVICE_ROWID_COLUMN
    existed = ap.conn.execute(f"SELECT 1 FROM {dest} WHERE {quote_ident(key_col)} = ?", (row.key,)).fetchone() is not None
    if row.tomb is not None:
        ap.conn.execute(f"DELETE FROM {dest} WHERE {quote_ident(key_col)} = ?", (row.key,))
        op = OP_DELETE
    else:
        park(ap, target, row)  # columns this device lacks (the peer is on a later evolution)
        cells = [c for c in row.cells if c.column != key_col and c.column in target.dest_columns]
        names = [key_col, *(c.column for c in cells)]
        sets = ", ".join(f"{quote_ident(c.column)} = excluded.{quote_ident(c.column)}" for c in cells)
        marks, params = bind([row.key, *(c.value for c in cells)])
        ap.conn.execute(
            f"INSERT INTO {dest} ({', '.join(quote_ident(n) for n in names)}) VALUES ({', '.join(marks)}) "
            f"ON CONFLICT({quote_ident(key_col)}) DO " + (f"UPDATE SET {sets}" if sets else "NOTHING"),
            params,
        )
        op = OP_UPDATE if existed else OP_INSERT
    seq = ap.log_change(target.dest_tid, row.key, op, clock, None)
    ap.conn.execute(
        "INSERT INTO _p2p_cells(tid, ck, col, hlc, origin, seq) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(tid, ck, col) DO UPDATE SET hlc = excluded.hlc, origin = excluded.origin, seq = excluded.seq",
        (target.dest_tid, row.key, ROW_CLOCK_COLUMN, clock[0], ap.stored(clock[1]), seq),
    )
    if existed or op != OP_DELETE:
        ap.announce(clock[1], table.info.name, op, row.key)
    return True


def merge_bulk(ap: _Applier, rows: Sequence[RowChange], keys: dict[str, list[Value]], types: dict[str, type]) -> bool:
    """``merge_row`` for a whole batch, with a few IN queries and executemany
    per table (merge.py ``apply_bulk`` says when); False: row by row instead."""
    if any(row_clock(row)[1] != ap.sender for row in rows):
        return False  # row by row says why: rows are only taken from their own device
    conn = ap.conn
    plan = [(row, row_clock(row)) for row in rows]
    stored: dict[str, dict[Value, Clock]] = {}
    existing: dict[str, set[Value]] = {}
    for name, table_keys in keys.items():
        target = ap.target(name)
        key_col = target.table.info.key or capture.DEVICE_ROWID_COLUMN
        if not keys_stay_distinct(conn, target.dest, key_col, types[name]):
            return False
        stored[name], existing[name] = {}, set()
        stored[name] = {ck: (hlc, ap.local(origin)) for ck, (hlc, origin) in _stored_clocks(conn, target.dest_tid, table_keys).items()}
        for i in range(0, len(table_keys), IN_CHUNK):
            chunk = table_keys[i:i + IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            existing[name].update(
                r[0] for r in conn.execute(
                    f"SELECT {quote_ident(key_col)} FROM {quote_ident(target.dest)} WHERE {quote_ident(key_col)} IN ({marks})", chunk
                )
            )
    top = capture.last_seq(conn)
    if top + len(plan) >= 1 << 63:
        return False
    seq = top
    upserts: dict[str, list[tuple[Value, ...]]] = {}
    deletes: dict[str, list[tuple[Value]]] = {}
    log_rows: list[tuple[Any, ...]] = []
    cell_rows: list[tuple[Any, ...]] = []
    for row, clock in plan:
        target = ap.targets[row.table]
        table = target.table
        old = stored[row.table].get(row.key)
        if old is not None and clock <= old:
            continue  # stale or repeated
        dest = quote_ident(target.dest)
        key_col = table.info.key or capture.DEVICE_ROWID_COLUMN
        existed = row.key in existing[row.table]
        if row.tomb is not None:
            deletes.setdefault(f"DELETE FROM {dest} WHERE {quote_ident(key_col)} = ?", []).append((row.key,))
            op = OP_DELETE
        else:
            if any(c.column not in target.dest_columns for c in row.cells):
                return False  # row by row parks the cells of columns this device lacks
            cells = [c for c in row.cells if c.column != key_col]
            names = [key_col, *(c.column for c in cells)]
            sets = ", ".join(f"{quote_ident(c.column)} = excluded.{quote_ident(c.column)}" for c in cells)
            sql = (f"INSERT INTO {dest} ({', '.join(quote_ident(n) for n in names)}) VALUES ({', '.join('?' * len(names))}) "
                   f"ON CONFLICT({quote_ident(key_col)}) DO " + (f"UPDATE SET {sets}" if sets else "NOTHING"))
            upserts.setdefault(sql, []).append((row.key, *(c.value for c in cells)))
            op = OP_UPDATE if existed else OP_INSERT
        seq += 1  # what _log's INSERT would get: the log's rowid is max(seq) + 1
        log_rows.append((seq, target.dest_tid, row.key, op, clock[0], ap.logged(clock[1]), None))
        cell_rows.append((target.dest_tid, row.key, ROW_CLOCK_COLUMN, clock[0], ap.stored(clock[1]), seq))
        if existed or op != OP_DELETE:
            ap.announce(clock[1], table.info.name, op, row.key)
        ap.applied += 1
    for sql, params in (*upserts.items(), *deletes.items()):
        conn.executemany(sql, params)
    conn.executemany("INSERT INTO _p2p_log(seq, tid, pk, op, hlc, origin, ck) VALUES (?, ?, ?, ?, ?, ?, ?)", log_rows)
    conn.executemany(
        "INSERT INTO _p2p_cells(tid, ck, col, hlc, origin, seq) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(tid, ck, col) DO UPDATE SET hlc = excluded.hlc, origin = excluded.origin, seq = excluded.seq",
        cell_rows,
    )
    return True


def _stored_clocks(conn: sqlite3.Connection, dest_tid: int, keys: Sequence[Value]) -> dict[Value, tuple[int, int | None]]:
    """The row clock (hlc, stored origin) held here for each of ``keys`` of
    device table ``dest_tid`` that has one: its ``*`` entry, else its run's
    (store/row_runs.py)."""
    found: dict[Value, tuple[int, int | None]] = {}
    for i in range(0, len(keys), IN_CHUNK):
        chunk = keys[i:i + IN_CHUNK]
        for ck, hlc, origin in conn.execute(
            f"SELECT ck, hlc, origin FROM _p2p_cells WHERE tid = ? AND col = ? AND ck IN ({', '.join('?' * len(chunk))})",
            (dest_tid, ROW_CLOCK_COLUMN, *chunk),
        ):
            found[ck] = (hlc, origin)
    return row_runs.clocks(conn, dest_tid, [k for k in keys if k not in found]) | found


def _past_every_key(conn: sqlite3.Connection, dest_tid: int, dest: str, key: str, least: int) -> bool:
    """Whether a block of integer keys from ``least`` up is past every key
    the device table and its row clocks hold — a peer's rows appended since
    the last sync, the usual block. Then no row existed and none has a
    clock here, and the per-row probes are left out (the staging's
    ``fresh`` stays 1, ``existed`` NULL). Two index lookups. Integers only:
    they compare the same under any collation and affinity, and a text or
    blob key held here sorts after every integer, so it never lets the
    shortcut pass wrongly."""
    past = conn.execute(
        f"SELECT (SELECT max({key}) FROM {dest}) < ?2, (SELECT max(ck) FROM _p2p_cells WHERE tid = ?1) < ?2, "
        f"{row_runs.last_key_sql('?1')} < ?2", (dest_tid, least)
    ).fetchone()
    return all(p is None or p for p in past)  # (None: nothing held there)


def write_block(ap: _Applier, block: Block, columns: Columns, kind: type) -> Done | None:
    """Upserts and deletes into the sender's device table; a change not
    newer than the row's clock there is stale (a repeat) and skipped."""
    fields = columns.fields
    used = {*not_none(fields[ORIGIN]), *not_none(fields[TOMB_ORIGIN])}
    if any(block.origins[i] != ap.sender for i in used) or not_none(fields[PREV_HLC]) or not_none(fields[TOMB_PREV_HLC]):
        return None  # rows are only taken from their own device (the row path says why)
    conn = ap.conn
    target = ap.target(block.table)
    key_col = target.table.info.key or capture.DEVICE_ROWID_COLUMN
    if any(c not in target.dest_columns for c in block.columns):
        return None  # the row path parks the cells of columns this device lacks
    if not keys_stay_distinct(conn, target.dest, key_col, kind):
        return None
    top = capture.last_seq(conn)
    if top + len(block.rows) >= 1 << 63:
        return None
    dest, key = quote_ident(target.dest), quote_ident(key_col)
    every_fresh = kind is int and _past_every_key(conn, target.dest_tid, dest, key, min(fields[KEY]))
    key_step, hlc_step = columns.step(KEY), columns.step(HLC)
    if (every_fresh and key_step and hlc_step is not None and abs(key_step) * len(block.rows) < 1 << 62
            and any(c != key_col for c in block.columns)):  # (keys whose differences SQLite computes exactly)
        return _append(ap, target, block, columns, top, key_step, hlc_step)
    stage = load(conn, block, columns)
    def newer(hlc: str, origin: str) -> str:  # (a clock held here not older than the staged row's)
        return (f"({hlc} > coalesce({stage}.hlc, {stage}.th) OR ({hlc} = coalesce({stage}.hlc, {stage}.th) AND "
                f"{origins.device_sql(origin, '?3')} >= ?2))")
    if not every_fresh:
        own_entry = f"SELECT 1 FROM _p2p_cells c WHERE c.tid = ?1 AND c.ck = {stage}.k AND c.col = '*'"
        # (no entry of its own: its run's clock, if a run holds it, store/row_runs.py)
        run_newer = (f" AND (EXISTS ({own_entry}) OR NOT EXISTS (SELECT 1 FROM _p2p_row_runs r WHERE "
                     f"{row_runs.holds('?1', stage + '.k')} AND {newer(row_runs.hlc_sql(stage + '.k'), 'r.origin')}))"
                     if row_runs.any_in(conn, target.dest_tid) else "")
        conn.execute(
            f"UPDATE temp.{stage} SET existed = EXISTS (SELECT 1 FROM {dest} d WHERE d.{key} = {stage}.k), "
            f"fresh = NOT EXISTS ({own_entry} AND {newer('c.hlc', 'c.origin')}){run_newer}",
            (target.dest_tid, ap.sender, ap.me),
        )
    if not all_none(fields[TOMB_HLC]):
        conn.execute(f"DELETE FROM {dest} WHERE {key} IN (SELECT k FROM temp.{stage} WHERE fresh AND hlc IS NULL)")
    ap.lift(target.dest)
    names = [(c, f"v{i}") for i, c in enumerate(block.columns) if c != key_col]
    sets = ", ".join(f"{quote_ident(c)} = excluded.{quote_ident(c)}" for c, _ in names)
    conn.execute(
        f"INSERT INTO {dest} ({key}{''.join(', ' + quote_ident(c) for c, _ in names)}) "
        f"SELECT k{''.join(', ' + v for _, v in names)} FROM temp.{stage} WHERE fresh AND hlc IS NOT NULL ORDER BY n "
        f"ON CONFLICT({key}) DO " + (f"UPDATE SET {sets}" if sets else "NOTHING")
    )
    seq = "?1 + n" if every_fresh else "?1 + row_number() OVER (ORDER BY n)"  # (n counts the staged rows from 1)
    last_only = every_fresh and not ap.log_all  # (every row fresh: the last is n = rows)
    conn.execute(
        "INSERT INTO _p2p_log(seq, tid, pk, op, hlc, origin, ck) "
        f"SELECT {seq}, ?2, k, CASE WHEN hlc IS NULL THEN {OP_DELETE} WHEN existed THEN {OP_UPDATE} ELSE {OP_INSERT} END, "
        f"coalesce(hlc, th), ?3, NULL FROM temp.{stage} WHERE fresh{' AND n = ?4' if last_only else ''} ORDER BY n",
        (top, target.dest_tid, ap.logged(ap.sender), *((len(block.rows),) if last_only else ())),
    )
    conn.execute(
        "INSERT INTO _p2p_cells(tid, ck, col, hlc, origin, seq) "
        f"SELECT ?2, k, '*', coalesce(hlc, th), ?3, {seq} FROM temp.{stage} WHERE fresh ORDER BY n "
        "ON CONFLICT(tid, ck, col) DO UPDATE SET hlc = excluded.hlc, origin = excluded.origin, seq = excluded.seq",
        (top, target.dest_tid, ap.stored(ap.sender)),
    )
    name = target.table.info.name
    if every_fresh and None not in fields[HLC]:  # an append: every row is new and written, in the block's order
        return len(block.rows), [(ap.sender, name, OP_INSERT, list(fields[KEY]))], None
    applied = conn.execute(f"SELECT count(*) FROM temp.{stage} WHERE fresh").fetchone()[0]
    changed: dict[int, list[Any]] = {OP_INSERT: [], OP_UPDATE: [], OP_DELETE: []}
    for k, existed, deleted in conn.execute(
            f"SELECT k, existed, hlc IS NULL FROM temp.{stage} WHERE fresh AND (existed OR hlc IS NOT NULL) ORDER BY n").fetchall():
        changed[OP_DELETE if deleted else OP_UPDATE if existed else OP_INSERT].append(k)
    return applied, [(ap.sender, name, op, keys) for op, keys in changed.items() if keys], None


def _append(ap: _Applier, target: Target, block: Block, columns: Columns, top: int, key_step: int, hlc_step: int) -> Done:
    """``write_block`` for the usual block: rows past every key here whose
    keys and clocks count (a peer's rows appended together, which protocol
    7 sends as counts). They go straight into the device table — a
    statement binds its first key, a row only its values — and their row
    clocks and log rows are written from the keys just written: row *i*
    gets seq ``top + 1 + i`` and clock ``first + i × step``, what staging
    them gives (tests/store/test_blocks.py compares both with row by row);
    keys one more each time (rowids) share one run of clocks
    (store/row_runs.py), others get a ``*`` entry each.
    No staging table: a fifth of the receiver's store work on the benches'
    rows."""
    conn, fields, n = ap.conn, columns.fields, len(block.rows)
    key_col = target.table.info.key or capture.DEVICE_ROWID_COLUMN
    dest, key = quote_ident(target.dest), quote_ident(key_col)
    ap.lift(target.dest)
    names = [(i, c) for i, c in enumerate(block.columns) if c != key_col]
    per, whole, rest = runs([bindable(fields[VALUES + i], columns.kinds[i]) for i, _ in names], n, extra=1)
    keys = fields[KEY]
    insert = f"INSERT INTO {dest} ({key}{''.join(', ' + quote_ident(c) for _, c in names)}) VALUES "
    marks = ", ".join("?" * len(names))
    if whole:  # (row j of a statement: its first key, ?1, plus j steps)
        conn.executemany(insert + ", ".join(f"(?1 + {j * key_step}, {marks})" for j in range(per)),
                         [[keys[e * per], *values] for e, values in enumerate(whole)])
    if rest:
        conn.executemany(insert + f"(?, {marks})", [(k, *values) for k, values in zip(keys[len(whole) * per:], rest)])
    # Row i of the block, found from its key: (key - first key) / key step.
    row = f"(x.{key} - ?3) / ?4"
    written = f"FROM {dest} x WHERE x.{key} BETWEEN ?5 AND ?6"
    span = (fields[HLC][0], keys[0], key_step, min(keys[0], keys[-1]), max(keys[0], keys[-1]), hlc_step)
    if key_step == 1:  # (one run holds their clocks: store/row_runs.py)
        row_runs.write(conn, target.dest_tid, keys[0], keys[-1], fields[HLC][0], hlc_step, ap.stored(ap.sender), top + 1)
    else:
        conn.execute(
            f"INSERT INTO _p2p_cells(tid, ck, col, hlc, origin, seq) SELECT ?8, x.{key}, '*', ?2 + {row} * ?7, ?9, ?1 + 1 + {row} {written}",
            (top, *span, target.dest_tid, ap.stored(ap.sender)),
        )
    log = "INSERT INTO _p2p_log(seq, tid, pk, op, hlc, origin, ck) "
    if ap.log_all:
        conn.execute(log + f"SELECT ?1 + 1 + {row}, ?8, x.{key}, {OP_INSERT}, ?2 + {row} * ?7, ?9, NULL {written}",
                     (top, *span, target.dest_tid, ap.logged(ap.sender)))
    else:  # (the seq counter's row: the last)
        conn.execute(log + "VALUES (?, ?, ?, ?, ?, ?, NULL)",
                     (top + n, target.dest_tid, keys[-1], OP_INSERT, fields[HLC][-1], ap.logged(ap.sender)))
    return n, [(ap.sender, target.table.info.name, OP_INSERT, list(keys))], None
