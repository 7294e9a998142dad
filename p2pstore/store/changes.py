"""Outgoing changes: what this store sends a peer, read from its own sync state.

A store's changes form one stream ordered by the local log ``seq``. A peer
that has applied everything up to ``seq`` W (its watermark for this device,
``_p2p_watermarks`` on the peer's side) needs exactly the records with
``seq`` > W:

- **collaborative** tables: local log rows (``origin`` NULL) with ``seq`` > W.
  Each changed key is sent once, as its *current* full row (or as a delete
  if the row is gone), with the clock of its last change. Rows received from
  peers live in device tables and are never sent on (no relay).
- **single_version** tables: cells and tombs (``_p2p_cells``, ``_p2p_tombs``)
  with ``seq`` > W, grouped per conflict value ``ck``; values are read from
  the table by ``ck`` and only sync columns travel. Relayed cells carry a new
  local ``seq`` but their original hlc and origin, so A's changes reach C
  through B as A's.

Invariants:

- A batch covers a ``seq`` interval (``since_seq``, ``last_seq``]: every
  row with a record in it is in the batch — as its current state, at its
  newest seq — or has a newer record beyond ``last_seq`` and so comes, as
  its current state, in a later batch; nothing else is in it. A stream
  therefore resumes exactly at ``last_seq`` and loses nothing. (A batch
  the byte bound ends early is where the second case shows: a row written
  at seq 1 and again at seq 3 is not in the batch (0, 2], but in the
  next.) ``limit`` bounds the number of distinct ``seq`` values, and one
  ``seq`` belongs to one row, so a batch has at most ``limit`` rows.
- ``last_seq`` never passes a local log row that is not stamped yet: its
  cells would be created later with a ``seq`` below a watermark a peer
  already holds, and never be sent. Callers stamp first, in the same
  transaction (``capture.stamp``), so that row values read here match their
  clocks; the bound is a safety net.
- Only a batch of the whole stream (every table, no row filter) may move a
  peer's watermark: ``OutBatch.full`` says so. A table or query sync
  (``where``) skips records, so its ``last_seq`` proves nothing.
- A single_version row always carries its tomb (if any), whatever its
  ``seq``: a row change is then self-contained, and a cell older than the
  tomb (sent with value NULL) can't resurrect anything on a receiver that
  never got the delete.
- TEXT that is not valid UTF-8 (another program wrote it) is read as a str
  with lone surrogates (``TEXT_FACTORY``, ``surrogateescape``: a bijection,
  and valid UTF-8 never gives such a str), travels byte-exact
  (``messages.pack_values``) and is written back as TEXT (merge.py). A row
  *keyed* by such text can't be looked up by its key, so it is not sent:
  the sender logs it and sends every other row.
- Batches hold plain values only (int, float, str, bytes, None), so the
  protocol layer can msgpack them (protocol/batch.py, where the batch's
  types, ``batch_to_plain`` / ``batch_from_plain`` and ``decode`` live: the
  one place hostile input is checked, and it only raises ``ProtocolError``).
"""

from __future__ import annotations

import functools
import logging
import math
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from p2pstore.clock import MAX_HLC
from p2pstore.errors import InvalidParams, ProtocolError, StoreInvalid
from p2pstore.protocol.messages import pack_values, unpack
from p2pstore.schema.predicates import CompiledQuery, quote_ident
from p2pstore.store import capture, origins
from p2pstore.store.tables import TableInfo, read_table_info
# The batch's types, plain form and checks live in the protocol layer
# (protocol/batch.py); they are re-exported here for the store's modules.
from p2pstore.protocol.batch import (  # noqa: F401 - re-exported
    COLLABORATIVE,
    KEY,
    SEQ,
    Block,
    MAX_BATCH_ROWS,
    MAX_NAME_LEN,
    MODES,
    SINGLE_VERSION,
    Cell,
    OutBatch,
    RowChange,
    Value,
    batch_from_plain,
    batch_to_plain,
    is_raw_text,
    row_from_plain,
    row_problem,
    row_to_plain,
)

log = logging.getLogger(__name__)

#: ``text_factory`` of every connection that reads sync data (the store's,
#: remote queries'): TEXT that is not valid UTF-8 becomes a str with lone
#: surrogates instead of an error that would stop the whole sync.
TEXT_FACTORY = functools.partial(str, encoding="utf-8", errors="surrogateescape")


def raw_text_bytes(value: str) -> bytes:
    """The stored bytes of raw text (bind them as ``CAST(? AS TEXT)``)."""
    return value.encode("utf-8", "surrogateescape")


#: Rows per batch when the caller does not say; the sync engine picks its own
#: so that a batch fits a frame (``protocol.framing.MAX_FRAME_SIZE``).
DEFAULT_BATCH_ROWS = 500
#: Keys per ``IN (...)`` list when reading or applying the rows of a batch.
IN_CHUNK = 500
#: Column name under which a collaborative device table's row clock is kept.
ROW_CLOCK_COLUMN = "*"


def encode_change(mode: str, row: RowChange) -> bytes:
    """A row change as stored in the sync-failure log (msgpack)."""
    return pack_values([mode, row_to_plain(row)])


def decode_change(blob: bytes) -> tuple[str, RowChange]:
    obj = unpack(blob, "stored change", raw_text=True)
    if not (isinstance(obj, list) and len(obj) == 2):
        raise ProtocolError("stored change is not a [mode, change] pair")
    mode, plain = obj
    if mode not in MODES:
        raise ProtocolError(f"stored change has unknown table type {mode!r:.40}")
    return mode, row_from_plain(plain, mode)


# --------------------------------------------------------------------------
# Local tables, as the sync code sees them


@dataclass(frozen=True, slots=True)
class SyncTable:
    """A distributed table of this store and how it syncs."""

    tid: int
    info: TableInfo
    conflict_column: str | None  # None: collaborative
    sync_columns: tuple[str, ...]  # single_version: from _p2p_sync_columns; collaborative: all columns

    @property
    def mode(self) -> str:
        return SINGLE_VERSION if self.conflict_column else COLLABORATIVE

    @property
    def key_column(self) -> str:
        """What identifies a row across devices (see ``RowChange.key``)."""
        if self.conflict_column:
            return self.conflict_column
        return self.info.key or ""


def sync_columns(conn: sqlite3.Connection, table: str) -> tuple[str, ...]:
    """The accepted sync columns of a single_version table, in schema order."""
    return tuple(r[0] for r in conn.execute("SELECT col FROM _p2p_sync_columns WHERE tbl = ? ORDER BY pos", (table,)))


def sync_tables(conn: sqlite3.Connection, table: str | None = None) -> list[SyncTable]:
    """This store's distributed tables (or the one named), in registration order."""
    sql = "SELECT tid, name, conflict_col FROM _p2p_tables WHERE kind = 'local'"
    rows = conn.execute(sql + (" AND name = ?" if table is not None else "") + " ORDER BY tid", (table,) if table is not None else ()).fetchall()
    if table is not None and not rows:
        raise InvalidParams(f"table {table} is not distributed", data={"table": table})
    result = []
    for tid, name, conflict in rows:
        info = read_table_info(conn, name)
        columns = sync_columns(conn, name) if conflict else info.columns
        result.append(SyncTable(tid, info, conflict, columns))
    return result


def store_mode(conn: sqlite3.Connection) -> str:
    return capture.get_meta(conn, "table_type") or COLLABORATIVE


def stable_bound(conn: sqlite3.Connection) -> int:
    """The highest ``seq`` below which every local log row is stamped."""
    row = conn.execute("SELECT last_seq FROM _p2p_stamps ORDER BY first_seq DESC LIMIT 1").fetchone()
    stamped = row[0] if row is not None else 0
    pending = conn.execute("SELECT min(seq) FROM _p2p_log WHERE seq > ? AND hlc IS NULL", (stamped,)).fetchone()[0]
    if pending is not None:
        return int(pending) - 1
    return capture.last_seq(conn)


@contextmanager
def read_snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One consistent view for several reads: the caller's transaction if it
    has one, else a read transaction of our own (rolled back: we only read)."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def start_position(conn: sqlite3.Connection, since_seq: int, stream: str | None) -> int:
    """Where to start sending to a peer whose watermark for this store is
    ``since_seq`` in ``stream`` (None: it has none).

    - Another stream (this store was deleted and created again, or its
      stream was renewed): the peer's seq means nothing here: from 0.
    - This stream, but a seq beyond any this file ever wrote: the file went
      back in time (restored from a backup). Its next seqs would repeat
      positions the peer believes it has, so the store starts a new stream
      (every peer starts over, harmlessly: applying is idempotent): from 0.
    Must run in a write transaction (it may renew the stream).
    """
    if stream != capture.stream_id(conn):
        return 0
    if since_seq > capture.last_seq(conn):
        capture.new_stream(conn)
        return 0
    return since_seq


def unsent_rows(conn: sqlite3.Connection, since_seq: int, stream: str | None) -> int:
    """How many rows a full sync would send a peer that has applied this
    store's ``stream`` up to ``since_seq`` (docs/sync.md, "Lag").

    A row counts once however often it changed since: collaborative, the
    distinct keys of this device's own log rows above the position (the
    stream sends each as its current row or delete); single_version, the
    distinct rows with a cell or tomb above it (changes made here and
    relayed ones). A position in another stream, or beyond this file's
    last seq, counts from 0, as ``start_position`` would send. One index
    range per source, deduplicated: about 20 ms (collaborative) to 80 ms
    (single_version) per 100k rows pending, nothing when none is.
    """
    with read_snapshot(conn):
        if stream != capture.stream_id(conn) or since_seq > capture.last_seq(conn):
            since_seq = 0
        if store_mode(conn) == COLLABORATIVE:
            sql = ("SELECT count(*) FROM (SELECT DISTINCT tid, pk FROM _p2p_log WHERE seq > ?1 AND origin IS NULL "
                   "AND tid IN (SELECT tid FROM _p2p_tables WHERE kind = 'local'))")
        else:
            # One seq belongs to one row: grouping by seq first halves the rows to deduplicate.
            sql = ("SELECT count(*) FROM (SELECT tid, ck FROM _p2p_rows INDEXED BY _p2p_rows_seq WHERE seq > ?1 "
                   "UNION SELECT tid, ck FROM _p2p_cells INDEXED BY _p2p_cells_seq WHERE seq > ?1 GROUP BY seq "
                   "UNION SELECT tid, ck FROM _p2p_tombs INDEXED BY _p2p_tombs_seq WHERE seq > ?1)")
        return int(conn.execute(sql, (since_seq,)).fetchone()[0])


# --------------------------------------------------------------------------
# Reading a slice of the stream


def changes_since(
    conn: sqlite3.Connection,
    table: str | None,
    since_seq: int,
    *,
    limit: int = DEFAULT_BATCH_ROWS,
    where: CompiledQuery | None = None,
    max_bytes: int | None = None,
    columnar: bool = True,
) -> OutBatch:
    """The changes a peer whose watermark is ``since_seq`` has not applied.

    ``columnar``: the common rows come as ``Block``s, one per table, read
    with one statement straight into wire rows (``_collaborative_block``,
    ``_single_version_block``); the rest (single_version rows whose columns
    have clocks of their own, deletes of rows without a row clock, any row
    filter) as ``RowChange``s. ``OutBatch.as_rows`` gives the same batch in
    row form only, which is what ``columnar`` False reads.

    At most ``limit`` seqs, and with ``max_bytes`` only as many as the rows
    they carry fit in (by the stored size of their values, always at least
    one): the batch then ends early, still covering every record up to its
    ``last_seq``, and memory stays bounded when rows are large.

    ``table`` None reads the whole stream (every distributed table) and gives
    a batch that may move the peer's watermark (``full``). A named table, and
    above all a ``where`` filter (a compiled predicate on that table, for a
    query sync), give a batch that must NOT move it: they skip records that
    the peer still needs. A filtered batch has the rows that exist and match
    now, and the deletes of rows that no longer exist (``_filter_sql``);
    ``where``'s order, limit and offset are ignored.

    Call it after ``capture.stamp`` in the same transaction, so pending
    outside writes have their clocks (see the module invariants).
    """
    if type(since_seq) is not int or since_seq < 0:
        raise InvalidParams("since_seq must be an integer >= 0", data={"param": "since_seq"})
    if type(limit) is not int or not 1 <= limit <= MAX_BATCH_ROWS:
        raise InvalidParams(f"limit must be 1..{MAX_BATCH_ROWS}", data={"param": "limit"})
    if where is not None and table is None:
        raise InvalidParams("a row filter needs a table", data={"param": "where"})
    with read_snapshot(conn):
        me = capture.device_id(conn)
        mode = store_mode(conn)
        tables = sync_tables(conn, table)
        for t in tables:
            if t.mode != mode:
                raise StoreInvalid(f"table {t.info.name} is captured as {t.mode} in a {mode} store; register it again")
        bound = stable_bound(conn)
        filt = where if where is not None and where.where else None
        seqs = _next_seqs(conn, tables, since_seq, bound, limit, filt)
        more = len(seqs) == limit
        devices = _origin_list(conn, me) if columnar and filt is None and seqs else None
        # Own (per-column) clocks of a single_version table: its rows that have
        # them go as row changes; without any, every row of the interval is a
        # block row, and the blocks size themselves while they are read.
        own = {t.tid: t.mode == SINGLE_VERSION and conn.execute("SELECT 1 FROM _p2p_cells WHERE tid = ? LIMIT 1",
                                                                (t.tid,)).fetchone() is not None for t in tables}
        self_sized = devices is not None and not any(own.values())
        if max_bytes is not None and len(seqs) > 1 and not self_sized:
            fitting = _seqs_within(conn, tables, seqs, max_bytes)
            more = more or len(fitting) < len(seqs)
            seqs = fitting
        last = seqs[-1] if more else max(since_seq, bound)
        rows: list[RowChange] = []
        blocks: list[Block] = []
        if seqs and devices is not None:
            budget = max_bytes if self_sized and len(seqs) > 1 else None
            read = [(_collaborative_block(conn, t, since_seq, last, devices, budget) if t.mode == COLLABORATIVE
                     else _single_version_block(conn, t, since_seq, last, devices, budget, own[t.tid])) for t in tables]
            cut = _cut(read, budget)
            if cut is not None and cut < last:
                last, more = cut, True
            for t, (block, _) in zip(tables, read):
                kept = block._replace(rows=[r[:-2] for r in block.rows if r[-2] <= last])
                if any(x[SEQ] > y[SEQ] for x, y in zip(kept.rows, kept.rows[1:])):
                    kept.rows.sort(key=lambda r: r[SEQ])  # a later tomb raised a row's seq: as as_rows() orders
                if kept.rows:
                    blocks.append(kept)
                if t.mode == SINGLE_VERSION:
                    skip = {r[KEY] for r in kept.rows}
                    rows.extend(_single_version_rows(conn, t, since_seq, last, me, filt, skip, only_irregular=True))
        elif seqs:
            for t in tables:
                if t.mode == COLLABORATIVE:
                    rows.extend(_collaborative_rows(conn, t, since_seq, last, me, filt))
                else:
                    rows.extend(_single_version_rows(conn, t, since_seq, last, me, filt))
        rows.sort(key=lambda r: r.seq)
        return OutBatch(mode, since_seq, last, tuple(rows), more, table is None and where is None, capture.stream_id(conn),
                        blocks=tuple(blocks))


def _filter_sql(t: SyncTable, column: str, where: CompiledQuery | None) -> tuple[str, tuple[Any, ...]]:
    """`` AND <column> is the key of a row matching where, or of no row`` and its parameters.

    A row that is gone has no values left to match, so the delete of every
    row gone since the watermark travels with a query sync: the row no longer
    exists here whatever its values were, and the receiver applies the
    delete under the usual merge rules (a newer change there still wins).
    Without it a query sync never removed a matching row that was deleted.
    """
    if where is None:
        return "", ()
    key = quote_ident(t.conflict_column) if t.conflict_column else t.info.key_expr
    name = quote_ident(t.info.name)
    return (f" AND ({column} IN (SELECT {key} FROM {name} WHERE {where.where}) "
            f"OR NOT EXISTS (SELECT 1 FROM {name} WHERE {key} = {column}))", tuple(where.params))


def _next_seqs(
    conn: sqlite3.Connection, tables: Sequence[SyncTable], since: int, bound: int, limit: int, where: CompiledQuery | None
) -> list[int]:
    """The first ``limit`` distinct seqs after ``since`` (up to ``bound``) that
    carry records of ``tables``. Each source is read in ``seq`` index order
    and stops after ``limit`` seqs, so a batch costs the same at the start
    of a large backlog as at its end."""
    parts: list[str] = []
    params: list[Any] = []
    for t in tables:
        if t.mode == COLLABORATIVE:
            sources = [("_p2p_log", " AND origin IS NULL", "pk")]
        else:
            # INDEXED BY: left alone, SQLite prefers the (tid, ...) key and sorts everything.
            sources = [("_p2p_rows INDEXED BY _p2p_rows_seq", "", "ck"), ("_p2p_cells INDEXED BY _p2p_cells_seq", "", "ck"),
                       ("_p2p_tombs INDEXED BY _p2p_tombs_seq", "", "ck")]
        for source, extra, key in sources:
            filt, fparams = _filter_sql(t, key, where)
            parts.append(
                f"SELECT * FROM (SELECT DISTINCT seq FROM {source} WHERE seq > ? AND seq <= ? AND tid = ?{extra}{filt} "
                "ORDER BY seq LIMIT ?)"
            )
            params += [since, bound, t.tid, *fparams, limit]
    if not parts or bound <= since:
        return []
    sql = f"SELECT DISTINCT seq FROM ({' UNION ALL '.join(parts)}) ORDER BY seq LIMIT ?"
    return [r[0] for r in conn.execute(sql, (*params, limit))]


#: What a row change costs in a batch besides its values (keys, clocks, framing).
_ROW_OVERHEAD = 64


def _seqs_within(conn: sqlite3.Connection, tables: Sequence[SyncTable], seqs: list[int], max_bytes: int) -> list[int]:
    """The longest prefix of ``seqs`` whose rows' values fit in ``max_bytes``
    (at least one seq). A row is sized by its current values (``length()``,
    which SQLite answers without reading a large value); counted once per
    seq that carries it, so the estimate errs on the small-batch side."""
    sizes: dict[int, int] = {}
    marks = ", ".join("?" * len(seqs))
    for t in tables:
        name = quote_ident(t.info.name)
        if t.mode == COLLABORATIVE:
            total = " + ".join(f"coalesce(length({quote_ident(c)}), 0)" for c in t.info.columns) or "0"
            sql = (f"SELECT l.seq, (SELECT {total} FROM {name} WHERE {t.info.key_expr} = l.pk) FROM _p2p_log l "
                   f"WHERE l.tid = ? AND l.origin IS NULL AND l.seq IN ({marks})")
        else:
            assert t.conflict_column is not None
            total = " + ".join(f"coalesce(length({quote_ident(c)}), 0)" for c in t.sync_columns) or "0"
            # INDEXED BY: left alone, SQLite walks every cell of the table by its (tid, ...) key.
            sql = (f"SELECT c.seq, max((SELECT {total} FROM {name} WHERE {quote_ident(t.conflict_column)} = c.ck)) FROM ("
                   f"SELECT seq, ck FROM _p2p_rows INDEXED BY _p2p_rows_seq WHERE tid = ?1 AND seq IN ({marks}) UNION ALL "
                   f"SELECT seq, ck FROM _p2p_cells INDEXED BY _p2p_cells_seq WHERE tid = ?1 AND seq IN ({marks})) c GROUP BY c.seq")
            seqs_params = (*seqs, *seqs)
        if t.mode == COLLABORATIVE:
            seqs_params = tuple(seqs)
        for seq, size in conn.execute(sql, (t.tid, *seqs_params)):
            sizes[seq] = sizes.get(seq, 0) + (size or 0)
    used = 0
    for i, seq in enumerate(seqs):
        used += sizes.get(seq, 0) + _ROW_OVERHEAD
        if used > max_bytes and i > 0:
            return seqs[:i]
    return seqs


def _collaborative_rows(
    conn: sqlite3.Connection, t: SyncTable, since: int, last: int, me: str, where: CompiledQuery | None
) -> Iterator[RowChange]:
    filt, fparams = _filter_sql(t, "l.pk", where)
    latest = conn.execute(
        "SELECT l.pk, l.seq, (SELECT s.base_hlc + l.seq - s.first_seq FROM _p2p_stamps s "
        "                    WHERE s.first_seq <= l.seq ORDER BY s.first_seq DESC LIMIT 1) "
        "FROM _p2p_log l WHERE l.seq IN ("
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
            _unsendable(t, pk)
            continue
        current = current_rows.get(pk)
        if current is None:
            current = conn.execute(select, (pk,)).fetchone()
        if current is None:
            yield RowChange(t.info.name, t.key_column, pk, seq, (), hlc, me)
        else:
            cells = tuple(Cell(c, v, hlc, me) for c, v in zip(t.info.columns, current))
            yield RowChange(t.info.name, t.key_column, pk, seq, cells)


def _origin_list(conn: sqlite3.Connection, me: str) -> tuple[str, ...]:
    """A block's ``origins``: index 0 is this device (stored origin NULL),
    index n the device of stored origin n (store/origins.py), so a block
    row's origins come straight from SQL as ``coalesce(origin, 0)``.
    (Numbers are never reused; an unused one would be a hole: it gets
    this device's ID, which no row refers to by that index.)"""
    known = dict(conn.execute("SELECT id, device FROM _p2p_origins"))
    return (me, *(known.get(n, me) for n in range(1, max(known, default=0) + 1)))


def _sendable(t: SyncTable, rows: list[Any]) -> list[Any]:
    """``rows`` without those keyed by raw text (logged, see ``_unsendable``)."""
    if any(type(r[KEY]) is str and is_raw_text(r[KEY]) for r in rows):
        for r in rows:
            if type(r[KEY]) is str and is_raw_text(r[KEY]):
                _unsendable(t, r[KEY])
        return [r for r in rows if not (type(r[KEY]) is str and is_raw_text(r[KEY]))]
    return rows


def _fetch(cursor: sqlite3.Cursor, budget: int | None) -> list[Any]:
    """A block query's rows (each ending in its interval seq and its size);
    with a ``budget``, only until their sizes pass it (``_cut`` then ends
    the batch at or before the last row read), so memory stays bounded
    when rows are large."""
    if budget is None:
        return cursor.fetchall()
    rows: list[Any] = []
    used = 0
    while used <= budget:
        chunk = cursor.fetchmany(256)
        if not chunk:
            break
        rows += chunk
        used += sum(r[-1] for r in chunk) + _ROW_OVERHEAD * len(chunk)
    return rows


def _cut(read: Sequence[tuple[Block, bool]], budget: int | None) -> int | None:
    """The last seq of the longest prefix of the blocks' rows (in seq order,
    over every table) whose sizes fit ``budget`` — at least one row — or
    None when everything read fits. The same estimate as ``_seqs_within``."""
    if budget is None:
        return None
    sizes = sorted((r[-2], r[-1]) for block, _ in read for r in block.rows)
    complete = all(done for _, done in read)
    used = 0
    for i, (seq, size) in enumerate(sizes):
        used += size + _ROW_OVERHEAD
        if used > budget and i > 0:
            return sizes[i - 1][0]
    return None if complete else (sizes[-1][0] if sizes else None)


def _size_sql(columns: Sequence[str], prefix: str) -> str:
    return " + ".join(f"coalesce(length({prefix}{quote_ident(c)}), 0)" for c in columns) or "0"


def _collaborative_block(conn: sqlite3.Connection, t: SyncTable, since: int, last: int, devices: tuple[str, ...],
                         budget: int | None = None) -> tuple[Block, bool]:
    """Every change of the interval in one statement, as wire rows: the
    current row of each key changed (the clock of its newest log row), or
    its delete if the row is gone. What ``_collaborative_rows`` reads, as
    ``Block`` rows (tests/store/test_blocks.py compares them). Each row ends
    in its seq and its size (``_fetch``; the caller strips both); the flag
    says whether every row of the interval was read."""
    name, key = quote_ident(t.info.name), t.info.key_expr
    cols = ", ".join(f"x.{quote_ident(c)}" for c in t.info.columns)
    # A joined row has a non-NULL key (it equals l.pk), a missing one NULL.
    here = f"x.{key} IS NOT NULL"
    cursor = conn.execute(
        f"SELECT l.pk, l.seq, CASE WHEN {here} THEN l.hlc END, CASE WHEN {here} THEN 0 END, NULL, NULL, "
        f"CASE WHEN {here} THEN NULL ELSE l.hlc END, CASE WHEN {here} THEN NULL ELSE 0 END, NULL, NULL, {cols}, "
        f"l.seq, {_size_sql(t.info.columns, 'x.')} "
        "FROM (SELECT g.pk, g.seq, (SELECT s.base_hlc + g.seq - s.first_seq FROM _p2p_stamps s "
        "      WHERE s.first_seq <= g.seq ORDER BY s.first_seq DESC LIMIT 1) AS hlc "
        "      FROM (SELECT pk, max(seq) AS seq FROM _p2p_log WHERE seq > ? AND seq <= ? AND tid = ? AND origin IS NULL "
        "            GROUP BY pk) g) l "
        f"LEFT JOIN {name} x ON x.{key} = l.pk "
        "WHERE l.hlc IS NOT NULL ORDER BY l.seq",
        (since, last, t.tid),
    )
    rows = _fetch(cursor, budget)
    return Block(t.info.name, t.key_column, t.info.columns, devices, _sendable(t, rows)), cursor.fetchone() is None


def _single_version_block(conn: sqlite3.Connection, t: SyncTable, since: int, last: int, devices: tuple[str, ...],
                          budget: int | None = None, own: bool = True) -> tuple[Block, bool]:
    """The interval's *regular* rows in one statement, as wire rows: rows
    whose sync columns share one clock (a ``_p2p_rows`` entry in the
    interval, no per-column entry: store/cells.py), with their tomb if they
    have one; a value the tomb hides travels as NULL, as in
    ``_single_version_rows``, which reads every other row. ``own``: the
    table may have per-column entries (without any, no row is probed for
    them). Rows end as ``_collaborative_block``'s do."""
    assert t.conflict_column is not None
    name, ck = quote_ident(t.info.name), quote_ident(t.conflict_column)
    me_dev = "?4"
    visible = (f"(tb.hlc IS NULL OR r.hlc > tb.hlc OR (r.hlc = tb.hlc AND {origins.device_sql('r.origin', me_dev)} > "
               f"{origins.device_sql('tb.origin', me_dev)}))")
    columns = tuple(sorted(t.sync_columns))  # in name order, as _single_version_rows gives cells
    values = ", ".join(f"CASE WHEN {visible} THEN x.{quote_ident(c)} END" for c in columns)
    cursor = conn.execute(
        "SELECT r.ck, CASE WHEN tb.seq > ?1 THEN max(r.seq, tb.seq) ELSE r.seq END, r.hlc, coalesce(r.origin, 0), "
        "r.prev_hlc, CASE WHEN r.prev_hlc IS NOT NULL THEN coalesce(r.prev_origin, 0) END, "
        "tb.hlc, CASE WHEN tb.hlc IS NOT NULL THEN coalesce(tb.origin, 0) END, "
        "tb.prev_hlc, CASE WHEN tb.prev_hlc IS NOT NULL THEN coalesce(tb.prev_origin, 0) END, "
        f"{values}, r.seq, {_size_sql(columns, 'x.')} "
        "FROM _p2p_rows r INDEXED BY _p2p_rows_seq "
        "LEFT JOIN _p2p_tombs tb ON tb.tid = r.tid AND tb.ck = r.ck "
        f"LEFT JOIN {name} x ON x.{ck} = r.ck "
        "WHERE r.seq > ?1 AND r.seq <= ?2 AND r.tid = ?3"
        + (" AND NOT EXISTS (SELECT 1 FROM _p2p_cells c WHERE c.tid = r.tid AND c.ck = r.ck)" if own else "")
        + " ORDER BY r.seq",  # (the budget of _fetch counts in this order; changes_since re-sorts by SEQ)
        (since, last, t.tid, devices[0]),
    )
    rows = _fetch(cursor, budget)
    return Block(t.info.name, t.conflict_column, columns, devices, _sendable(t, rows)), cursor.fetchone() is None


def _unsendable(t: SyncTable, key: str) -> None:
    """A row keyed by text that is not valid UTF-8 can't be read by its key
    (nor stored by one on the receiver): it stays here, every other row goes."""
    log.warning("table %s: the row keyed %a is not sent: its key is TEXT that is not valid UTF-8 "
                "(written by another program); fix the key to sync the row", t.info.name, raw_text_bytes(key))


def _single_version_rows(
    conn: sqlite3.Connection, t: SyncTable, since: int, last: int, me: str, where: CompiledQuery | None,
    skip: set[Any] | frozenset[Any] = frozenset(), *, only_irregular: bool = False,
) -> Iterator[RowChange]:
    """The interval's rows as row changes; ``skip``: keys already sent in a
    block, ``only_irregular``: every regular row was (``_single_version_block``)."""
    assert t.conflict_column is not None
    synced = set(t.sync_columns)
    filt, fparams = _filter_sql(t, "ck", where)
    # origin NULL is this device, and so is prev_origin NULL beside a prev_hlc.
    # (A plain "?" in the filter numbers on after ?4.)
    # Origins are stored as numbers (store/origins.py); batches carry device IDs.
    clock_sql = (f"hlc, {origins.device_sql('origin', '?1')}, seq, prev_hlc, "
                 f"CASE WHEN prev_hlc IS NOT NULL THEN {origins.device_sql('prev_origin', '?1')} END")
    cells: dict[Any, list[tuple[Any, ...]]] = {}
    for ck, col, *clock in conn.execute(
        f"SELECT ck, col, {clock_sql} FROM _p2p_cells INDEXED BY _p2p_cells_seq WHERE seq > ?2 AND seq <= ?3 AND tid = ?4{filt}",
        (me, since, last, t.tid, *fparams),
    ):
        if col in synced:
            cells.setdefault(ck, []).append((col, *clock))
    # Rows whose columns share one clock (store/cells.py): that clock for
    # each sync column without a cell of its own.
    # Row clocks of the interval (those of regular rows came in the block).
    irregular = " AND EXISTS (SELECT 1 FROM _p2p_cells c WHERE c.tid = r.tid AND c.ck = r.ck)" if only_irregular else ""
    shared = conn.execute(
        f"SELECT ck, {clock_sql} FROM _p2p_rows r INDEXED BY _p2p_rows_seq WHERE seq > ?2 AND seq <= ?3 AND tid = ?4{irregular}{filt}",
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
            cells.setdefault(ck, []).extend((col, *clock) for col in t.sync_columns if col not in mine)
    tombs: dict[Any, tuple[Any, ...]] = {
        ck: tuple(clock)
        for ck, *clock in conn.execute(
            f"SELECT ck, {clock_sql} FROM _p2p_tombs INDEXED BY _p2p_tombs_seq WHERE seq > ?2 AND seq <= ?3 AND tid = ?4{filt}",
            (me, since, last, t.tid, *fparams),
        )
    }
    for ck in skip:
        tombs.pop(ck, None)
    for ck in {ck for ck in (*cells, *tombs) if is_raw_text(ck)}:
        cells.pop(ck, None)
        tombs.pop(ck, None)
        if ck not in skip:
            _unsendable(t, ck)
    name, ck_col = quote_ident(t.info.name), quote_ident(t.conflict_column)
    columns = list(t.sync_columns)
    listed = ", ".join(quote_ident(c) for c in columns)
    # Tombs older than the interval and current values, a chunk of keys per
    # query. Matched by exact value; a key the table stores under another type
    # (a TEXT column holding an int key as text) is read on its own below.
    older_tombs: dict[Any, tuple[Any, ...]] = {}
    current_rows: dict[Any, tuple[Any, ...]] = {}
    need_tomb = [ck for ck in cells if ck not in tombs]
    for i in range(0, len(need_tomb), IN_CHUNK):
        chunk = need_tomb[i:i + IN_CHUNK]
        for ck, *clock in conn.execute(
            f"SELECT ck, {clock_sql} FROM _p2p_tombs WHERE tid = ?2 AND ck IN ({', '.join('?' * len(chunk))})",
            (me, t.tid, *chunk),
        ):
            older_tombs[ck] = tuple(clock)
    keys = list(cells)
    for i in range(0, len(keys), IN_CHUNK):
        chunk = keys[i:i + IN_CHUNK]
        for ck, *values in conn.execute(f"SELECT {ck_col}, {listed} FROM {name} WHERE {ck_col} IN ({', '.join('?' * len(chunk))})", chunk):
            current_rows.setdefault(ck, tuple(values))
    read_values = f"SELECT {listed} FROM {name} WHERE {ck_col} = ?"
    for ck in dict.fromkeys([*cells, *tombs]):
        tomb = tombs.get(ck) or older_tombs.get(ck)
        row_cells = cells.get(ck, [])
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
