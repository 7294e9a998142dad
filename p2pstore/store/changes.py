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
  record of the selected tables in it is in the batch, and nothing else, so
  a stream resumes exactly at ``last_seq``. ``limit`` bounds the number of
  distinct ``seq`` values, and one ``seq`` belongs to one row, so a batch has
  at most ``limit`` rows.
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
  protocol layer can msgpack them (``batch_to_plain`` / ``batch_from_plain``;
  the latter is the one place hostile input is checked, and it only raises
  ``ProtocolError``).
"""

from __future__ import annotations

import functools
import logging
import math
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from p2pstore.clock import MAX_HLC
from p2pstore.errors import InvalidParams, ProtocolError, StoreInvalid
from p2pstore.protocol.messages import pack_values, unpack
from p2pstore.schema.predicates import CompiledQuery, quote_ident
from p2pstore.store import capture
from p2pstore.store.tables import TableInfo, read_table_info

log = logging.getLogger(__name__)

Value = int | float | str | bytes | None

#: ``text_factory`` of every connection that reads sync data (the store's,
#: remote queries'): TEXT that is not valid UTF-8 becomes a str with lone
#: surrogates instead of an error that would stop the whole sync.
TEXT_FACTORY = functools.partial(str, encoding="utf-8", errors="surrogateescape")


def is_raw_text(value: Any) -> bool:
    """Whether ``value`` is TEXT read from bytes that are not valid UTF-8
    (see ``TEXT_FACTORY``): SQLite can't be handed it as a str parameter."""
    if type(value) is not str or value.isascii():
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


def raw_text_bytes(value: str) -> bytes:
    """The stored bytes of raw text (bind them as ``CAST(? AS TEXT)``)."""
    return value.encode("utf-8", "surrogateescape")

COLLABORATIVE, SINGLE_VERSION = "collaborative", "single_version"
MODES = (COLLABORATIVE, SINGLE_VERSION)
#: Rows per batch when the caller does not say; the sync engine picks its own
#: so that a batch fits a frame (``protocol.framing.MAX_FRAME_SIZE``).
DEFAULT_BATCH_ROWS = 500
#: Keys per ``IN (...)`` list when reading or applying the rows of a batch.
IN_CHUNK = 500
MAX_BATCH_ROWS = 100_000
#: Caps on names in a decoded batch (SQLite has none; a peer must not make us
#: hold arbitrarily long identifiers).
MAX_NAME_LEN = 1024
#: Column name under which a collaborative device table's row clock is kept.
ROW_CLOCK_COLUMN = "*"


# --------------------------------------------------------------------------
# What travels


class Cell(NamedTuple):
    """One column value and the clock of the change that wrote it.

    ``prev_*`` (single_version) is the clock its writer knowingly superseded
    (see capture's ``prev``); the merge uses it to tell conflicts from
    ordinary later edits, never to decide who wins. A named tuple, not a
    dataclass: a batch builds one per column of every row, and a tuple is
    built several times faster.
    """

    column: str
    value: Value
    hlc: int
    origin: str
    prev_hlc: int | None = None
    prev_origin: str | None = None

    @property
    def clock(self) -> tuple[int, str]:
        return (self.hlc, self.origin)

    @property
    def prev(self) -> tuple[int, str] | None:
        return None if self.prev_hlc is None or self.prev_origin is None else (self.prev_hlc, self.prev_origin)


class RowChange(NamedTuple):
    """The state of one row that a peer has not seen yet.

    ``key`` identifies the row on every device: for collaborative tables the
    primary key (``key_column`` "" = the rowid), for single_version tables the
    conflict value (``key_column`` = the conflict column). ``seq`` is the
    sender's newest log position in this change.

    collaborative: an upsert has the full row in ``cells``, all with the row's
    clock, and no tomb; a delete has no cells and its clock in ``tomb_*``.
    single_version: ``cells`` are the sync columns changed since the
    watermark; ``tomb_*`` is the row's newest delete, if it has one, and
    ``tomb_prev_*`` the newest cell its writer had when deleting.
    """

    table: str
    key_column: str
    key: Value
    seq: int
    cells: tuple[Cell, ...] = ()
    tomb_hlc: int | None = None
    tomb_origin: str | None = None
    tomb_prev_hlc: int | None = None
    tomb_prev_origin: str | None = None

    @property
    def tomb(self) -> tuple[int, str] | None:
        if self.tomb_hlc is None or self.tomb_origin is None:
            return None
        return (self.tomb_hlc, self.tomb_origin)

    @property
    def tomb_prev(self) -> tuple[int, str] | None:
        if self.tomb_prev_hlc is None or self.tomb_prev_origin is None:
            return None
        return (self.tomb_prev_hlc, self.tomb_prev_origin)


@dataclass(frozen=True, slots=True)
class OutBatch:
    """One bounded slice of a store's change stream.

    ``full`` is True only for a slice of the whole stream (all tables, no row
    filter): the receiver may then move its watermark for the sender from
    ``since_seq`` (if it had reached it) to ``last_seq``. ``more`` says that
    records after ``last_seq`` were ready when the batch was read. Seqs are
    positions in the sender's ``stream``.
    """

    mode: str
    since_seq: int
    last_seq: int
    rows: tuple[RowChange, ...]
    more: bool
    full: bool
    #: The sender's stream ID (``capture.stream_id``): seqs are positions in it.
    stream: str = ""
    #: A resync (store/gc.py): the newest clock of a change the sender has
    #: forgotten (None: an ordinary batch). A resync's batches hold the
    #: sender's whole state; the receiver moves its watermark only at the
    #: last one (``more`` False), to ``last_seq``, after removing what the
    #: snapshot did not hold.
    snapshot_hlc: int | None = None
    #: The first batch of a resync (the receiver forgets an unfinished one).
    snapshot_first: bool = False
    #: Every row passed ``row_problem`` (``batch_from_plain`` made it): the
    #: apply path need not check them again. Never on the wire.
    checked: bool = field(default=False, compare=False)


# --------------------------------------------------------------------------
# Plain (msgpack-ready) form, and the checks a received batch must pass


def row_to_plain(row: RowChange) -> list[Any]:
    return [
        row.table, row.key_column, row.key, row.seq,
        [[c.column, c.value, c.hlc, c.origin, c.prev_hlc, c.prev_origin] for c in row.cells],
        [row.tomb_hlc, row.tomb_origin, row.tomb_prev_hlc, row.tomb_prev_origin] if row.tomb_hlc is not None else None,
    ]


def batch_to_plain(batch: OutBatch) -> dict[str, Any]:
    plain = {
        "mode": batch.mode, "since_seq": batch.since_seq, "last_seq": batch.last_seq,
        "more": batch.more, "full": batch.full, "stream": batch.stream, "rows": [row_to_plain(r) for r in batch.rows],
    }
    if batch.snapshot_hlc is not None:
        plain["snapshot"] = [batch.snapshot_hlc, batch.snapshot_first]
    return plain


def _int(value: Any, what: str, low: int = 0, high: int = (1 << 63) - 1) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"{what} must be an integer in {low}..{high}")
    return value


def _name(value: Any, what: str, *, empty: bool = False) -> str:
    if type(value) is not str or (not value and not empty) or len(value) > MAX_NAME_LEN or is_raw_text(value):
        raise ProtocolError(f"{what} must be a{'' if empty else ' non-empty'} UTF-8 string of at most {MAX_NAME_LEN} characters")
    return value


def _value(value: Any, what: str) -> Value:
    if value is None or type(value) in (int, str, bytes):
        if type(value) is int and not -(1 << 63) <= value < (1 << 63):
            raise ProtocolError(f"{what}: integer out of SQLite's 64-bit range")
        return value
    if type(value) is float:
        if math.isnan(value):
            raise ProtocolError(f"{what}: NaN can't be stored")
        return value
    raise ProtocolError(f"{what} must be null, an integer, a float, a string or bytes")


def _clock(hlc: Any, origin: Any, what: str) -> tuple[int, str] | tuple[None, None]:
    """An optional (hlc, origin) pair: both or neither."""
    if hlc is None and origin is None:
        return (None, None)
    if hlc is None or origin is None:
        raise ProtocolError(f"{what}: hlc and origin go together")
    return (_int(hlc, f"{what} hlc", 0, MAX_HLC), _name(origin, f"{what} origin"))


def _plain_cell(cell: Any) -> Cell | None:
    """The usual well-formed cell, checked without building error texts
    (they cost more than the checks: a 500-row batch decoded twice as slowly).
    Accepts a subset of what the checks below accept; None sends the cell
    through them, for the same result or the same error as always."""
    if type(cell) is not list or len(cell) != 6:  # msgpack arrays decode as lists
        return None
    column, value, hlc, origin, prev_hlc, prev_origin = cell
    if not (type(column) is str and 0 < len(column) <= MAX_NAME_LEN and type(hlc) is int and 0 <= hlc <= MAX_HLC
            and type(origin) is str and 0 < len(origin) <= MAX_NAME_LEN and column.isascii() and origin.isascii()):
        return None  # (non-ASCII names: _name checks that they are UTF-8)
    kind = type(value)
    if not (value is None or kind is str or kind is bytes or (kind is int and -(1 << 63) <= value < (1 << 63))
            or (kind is float and value == value)):  # NaN != NaN
        return None
    if prev_hlc is None or prev_origin is None:
        if prev_hlc is not None or prev_origin is not None:
            return None
    elif not (type(prev_hlc) is int and 0 <= prev_hlc <= MAX_HLC and type(prev_origin) is str
              and 0 < len(prev_origin) <= MAX_NAME_LEN and prev_origin.isascii()):
        return None
    return Cell(column, value, hlc, origin, prev_hlc, prev_origin)


def row_from_plain(obj: Any, mode: str) -> RowChange:
    """Check and build one row change; any defect raises ``ProtocolError``."""
    if not isinstance(obj, (list, tuple)) or len(obj) != 6:
        raise ProtocolError("a row change must be a list of 6 items")
    table, key_column, key, seq, cells, tomb = obj
    table = _name(table, "row table")
    key_column = _name(key_column, f"{table}: key column", empty=mode == COLLABORATIVE)
    if mode == SINGLE_VERSION and not key_column:
        raise ProtocolError(f"{table}: a single_version row needs its conflict column")
    key = _value(key, f"{table}: key")
    if key is None:
        raise ProtocolError(f"{table}: a row key can't be NULL")
    seq = _int(seq, f"{table}: seq")
    if not isinstance(cells, (list, tuple)):
        raise ProtocolError(f"{table}: cells must be a list")
    built: list[Cell] = []
    for i, cell in enumerate(cells):
        plain = _plain_cell(cell)
        if plain is not None:
            built.append(plain)
            continue
        if not isinstance(cell, (list, tuple)) or len(cell) != 6:
            raise ProtocolError(f"{table}: cell {i} must be [column, value, hlc, origin, prev hlc, prev origin]")
        hlc, origin = _clock(cell[2], cell[3], f"{table}: cell {i}")
        if hlc is None or origin is None:
            raise ProtocolError(f"{table}: cell {i} needs its clock")
        built.append(Cell(
            _name(cell[0], f"{table}: cell {i} column"), _value(cell[1], f"{table}: cell {i} value"),
            hlc, origin, *_clock(cell[4], cell[5], f"{table}: cell {i} prev"),
        ))
    if tomb is None:
        tomb_clock: tuple[Any, ...] = (None, None, None, None)
    elif not isinstance(tomb, (list, tuple)) or len(tomb) != 4 or tomb[0] is None:
        raise ProtocolError(f"{table}: a tomb must be [hlc, origin, prev hlc, prev origin]")
    else:
        tomb_clock = (*_clock(tomb[0], tomb[1], f"{table}: tomb"), *_clock(tomb[2], tomb[3], f"{table}: tomb prev"))
    row = RowChange(table, key_column, key, seq, tuple(built), *tomb_clock)
    problem = row_problem(mode, row, clocks_checked=True)  # _plain_cell or _clock checked each one above
    if problem is not None:
        raise ProtocolError(problem)
    return row


def row_problem(mode: str, row: RowChange, *, clocks_checked: bool = False) -> str | None:
    """What makes ``row`` meaningless in ``mode`` (None: nothing).

    Checked on decode and again by the apply path, which may be handed
    batches built some other way. ``clocks_checked``: every clock of ``row``
    already passed ``_clock``'s checks (``row_from_plain`` builds none
    otherwise), so the checks of clock values are skipped: on decode they
    cost more than all the others.
    """
    columns = [c.column for c in row.cells]
    if len(set(columns)) != len(columns):
        return f"{row.table}: a column appears twice in one row change"
    if row.key is None:
        return f"{row.table}: a row key can't be NULL"
    if is_raw_text(row.key):
        return f"{row.table}: a row key that is not valid UTF-8 text can't be synced"
    if not clocks_checked:
        pairs = [(row.tomb_hlc, row.tomb_origin), (row.tomb_prev_hlc, row.tomb_prev_origin)]
        pairs += [(c.prev_hlc, c.prev_origin) for c in row.cells]
        if any((h is None) != (o is None) for h, o in pairs):
            return f"{row.table}: a clock's hlc and origin go together"
        pairs += [(c.hlc, c.origin) for c in row.cells]
        for h, o in pairs:
            if h is not None and (type(h) is not int or not 0 <= h <= MAX_HLC):
                return f"{row.table}: clock value out of range"
            if h is not None and not (isinstance(o, str) and o):
                return f"{row.table}: every clock needs its origin device"
    if mode == COLLABORATIVE:
        if bool(row.cells) == (row.tomb is not None):
            return f"{row.table}: a collaborative row change is either a full row or a delete"
        if len({(c.hlc, c.origin) for c in row.cells}) > 1:
            return f"{row.table}: the cells of a collaborative row share the row's clock"
    elif mode != SINGLE_VERSION:
        return f"unknown table type {mode!r}"
    elif not row.cells and row.tomb is None:
        return f"{row.table}: a single_version row change carries cells or a tomb"
    return None


def batch_from_plain(obj: Any) -> OutBatch:
    """Check and build a received batch; any defect raises ``ProtocolError``."""
    if not isinstance(obj, dict) or set(obj) - {"snapshot"} != {"mode", "since_seq", "last_seq", "more", "full", "stream", "rows"}:
        raise ProtocolError("a change batch must be a map of mode, since_seq, last_seq, more, full, stream, rows (and snapshot)")
    snapshot = obj.get("snapshot")
    if snapshot is not None and (not isinstance(snapshot, (list, tuple)) or len(snapshot) != 2 or type(snapshot[1]) is not bool
                                 or not obj["full"]):
        raise ProtocolError("snapshot must be [hlc, first] in a batch of the whole stream")
    mode = obj["mode"]
    if mode not in MODES:
        raise ProtocolError(f"unknown table type {mode!r:.40}")
    since, last = _int(obj["since_seq"], "since_seq"), _int(obj["last_seq"], "last_seq")
    if last < since:
        raise ProtocolError("last_seq must not be below since_seq")
    if type(obj["more"]) is not bool or type(obj["full"]) is not bool:
        raise ProtocolError("more and full must be booleans")
    rows = obj["rows"]
    if not isinstance(rows, (list, tuple)) or len(rows) > MAX_BATCH_ROWS:
        raise ProtocolError(f"rows must be a list of at most {MAX_BATCH_ROWS} row changes")
    stream = _name(obj["stream"], "stream")
    snap_hlc = _int(snapshot[0], "snapshot hlc", 0, MAX_HLC) if snapshot is not None else None
    return OutBatch(mode, since, last, tuple(row_from_plain(r, mode) for r in rows), obj["more"], obj["full"], stream,
                    snap_hlc, bool(snapshot[1]) if snapshot is not None else False, checked=True)


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
) -> OutBatch:
    """The changes a peer whose watermark is ``since_seq`` has not applied.

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
        if max_bytes is not None and len(seqs) > 1:
            fitting = _seqs_within(conn, tables, seqs, max_bytes)
            more = more or len(fitting) < len(seqs)
            seqs = fitting
        last = seqs[-1] if more else max(since_seq, bound)
        rows: list[RowChange] = []
        if seqs:
            for t in tables:
                if t.mode == COLLABORATIVE:
                    rows.extend(_collaborative_rows(conn, t, since_seq, last, me, filt))
                else:
                    rows.extend(_single_version_rows(conn, t, since_seq, last, me, filt))
        rows.sort(key=lambda r: r.seq)
        return OutBatch(mode, since_seq, last, tuple(rows), more, table is None and where is None, capture.stream_id(conn))


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


def _unsendable(t: SyncTable, key: str) -> None:
    """A row keyed by text that is not valid UTF-8 can't be read by its key
    (nor stored by one on the receiver): it stays here, every other row goes."""
    log.warning("table %s: the row keyed %a is not sent: its key is TEXT that is not valid UTF-8 "
                "(written by another program); fix the key to sync the row", t.info.name, raw_text_bytes(key))


def _single_version_rows(
    conn: sqlite3.Connection, t: SyncTable, since: int, last: int, me: str, where: CompiledQuery | None
) -> Iterator[RowChange]:
    assert t.conflict_column is not None
    synced = set(t.sync_columns)
    filt, fparams = _filter_sql(t, "ck", where)
    # origin NULL is this device, and so is prev_origin NULL beside a prev_hlc.
    # (A plain "?" in the filter numbers on after ?4.)
    clock_sql = "hlc, coalesce(origin, ?1), seq, prev_hlc, CASE WHEN prev_hlc IS NOT NULL THEN coalesce(prev_origin, ?1) END"
    cells: dict[Any, list[tuple[Any, ...]]] = {}
    for ck, col, *clock in conn.execute(
        f"SELECT ck, col, {clock_sql} FROM _p2p_cells INDEXED BY _p2p_cells_seq WHERE seq > ?2 AND seq <= ?3 AND tid = ?4{filt}",
        (me, since, last, t.tid, *fparams),
    ):
        if col in synced:
            cells.setdefault(ck, []).append((col, *clock))
    # Rows whose columns share one clock (store/cells.py): that clock for
    # each sync column without a cell of its own.
    shared = conn.execute(
        f"SELECT ck, {clock_sql} FROM _p2p_rows INDEXED BY _p2p_rows_seq WHERE seq > ?2 AND seq <= ?3 AND tid = ?4{filt}",
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
    for ck in {ck for ck in (*cells, *tombs) if is_raw_text(ck)}:
        cells.pop(ck, None)
        tombs.pop(ck, None)
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
