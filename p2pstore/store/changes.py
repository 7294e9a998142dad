"""What travels between stores, as the store's code sees it: the batch
types (re-exported from protocol/batch.py), a store's distributed tables
(``SyncTable``), and the helpers both table types read their changes with.

The stream itself — which records a peer at a position is sent, and the
invariants that make a stream resume exactly and lose nothing — is
stream.py's; how each table type reads its rows is collaborative.py's and
single_version.py's.

- TEXT that is not valid UTF-8 (another program wrote it) is read as a str
  with lone surrogates (``TEXT_FACTORY``, ``surrogateescape``: a bijection,
  and valid UTF-8 never gives such a str), travels byte-exact
  (``messages.pack_values``) and is written back as TEXT (lww.bind). A row
  *keyed* by such text can't be looked up by its key, so it is not sent:
  the sender logs it (``unsendable``) and sends every other row.
- Batches hold plain values only (int, float, str, bytes, None), so the
  protocol layer can msgpack them (protocol/batch.py, where the batch's
  types, ``batch_to_plain`` / ``batch_from_plain`` and ``decode`` live: the
  one place hostile input is checked, and it only raises ``ProtocolError``).
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, NamedTuple

from p2pstore.errors import InvalidParams, ProtocolError
from p2pstore.protocol.messages import pack_values, unpack
from p2pstore.schema.predicates import CompiledQuery, quote_ident
from p2pstore.store import capture
from p2pstore.protocol.table_type import TableType
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
    field_of,
    has_raw_text,
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
#: What a row change costs in a batch besides its values (keys, clocks, framing).
ROW_OVERHEAD = 64


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
        return TableType.keyed_by(self.conflict_column)

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


# --------------------------------------------------------------------------
# Reading a slice of the stream


def filter_sql(t: SyncTable, column: str, where: CompiledQuery | None, *, local_key: bool = False) -> tuple[str, tuple[Any, ...]]:
    """`` AND <column> is the key of a row matching where, or of no row`` and its parameters.
    ``column`` holds the row's conflict value (single_version), or with
    ``local_key`` (and in collaborative tables) its local key.

    A row that is gone has no values left to match, so the delete of every
    row gone since the watermark travels with a query sync: the row no longer
    exists here whatever its values were, and the receiver applies the
    delete under the usual merge rules (a newer change there still wins).
    Without it a query sync never removed a matching row that was deleted.
    """
    if where is None:
        return "", ()
    key = quote_ident(t.conflict_column) if t.conflict_column and not local_key else t.info.key_expr
    name = quote_ident(t.info.name)
    return (f" AND ({column} IN (SELECT {key} FROM {name} WHERE {where.where}) "
            f"OR NOT EXISTS (SELECT 1 FROM {name} WHERE {key} = {column}))", tuple(where.params))


def origin_list(conn: sqlite3.Connection, me: str) -> tuple[str, ...]:
    """A block's ``origins``: index 0 is this device (stored origin NULL),
    index n the device of stored origin n (store/origins.py), so a block
    row's origins come straight from SQL as ``coalesce(origin, 0)``.
    (Numbers are never reused; an unused one would be a hole: it gets
    this device's ID, which no row refers to by that index.)"""
    known = dict(conn.execute("SELECT id, device FROM _p2p_origins"))
    return (me, *(known.get(n, me) for n in range(1, max(known, default=0) + 1)))


def sendable(t: SyncTable, rows: list[Any]) -> list[Any]:
    """``rows`` without those keyed by raw text (logged, see ``unsendable``)."""
    if has_raw_text(field_of(rows, KEY)):  # (a column of ASCII keys: one check in C)
        for r in rows:
            if type(r[KEY]) is str and is_raw_text(r[KEY]):
                unsendable(t, r[KEY])
        return [r for r in rows if not (type(r[KEY]) is str and is_raw_text(r[KEY]))]
    return rows


class Read(NamedTuple):
    """What a table type's ``read_block`` read of an interval: the block
    (its rows in interval-seq order, each ending in its interval seq and
    its size), whether it is every row up to the interval's end or the
    budget stopped it (``fetch``), and — read with a ``limit`` — the seq of
    its ``limit``-th row when it reached that many (the interval it holds
    may go no further; None: it did not), and the interval seqs it read
    where they are not its rows' (None: they are; a read grouped by key)."""

    block: Block
    complete: bool
    end: int | None = None
    seqs: Sequence[int] | None = None


def limited_end(rows: Sequence[Any], complete: bool, limit: int | None, seq_at: int = 1) -> int | None:
    """``Read.end`` of a block query's rows as read (interval seq at field
    ``seq_at``), in interval-seq order with ``LIMIT limit``, a row a seq."""
    return rows[-1][seq_at] if limit is not None and complete and len(rows) == limit else None


def fetch(conn: sqlite3.Connection, sql: str, params: Sequence[Any], budget: int | None) -> tuple[list[Any], bool]:
    """A block query's rows (each ending in its interval seq and its size),
    and whether they are all of its rows: with a ``budget``, rows are read
    only until their sizes pass it (stream.py then ends the batch at or
    before the last row read), so memory stays bounded when rows are large.

    Read with SQLite's own UTF-8 decoding (the ``str`` text factory): the
    store's ``TEXT_FACTORY`` is a Python call for every TEXT value read
    (0.15 µs each: 11-17 % of a block query of the benches' rows). Text
    that is not valid UTF-8 makes that decoding fail; the query is then read
    again with the connection's own factory, which reads it as it is read
    everywhere else (a str with lone surrogates)."""
    factory = conn.text_factory
    conn.text_factory = str
    try:
        return _fetch(conn.execute(sql, params), budget)
    except sqlite3.OperationalError as exc:
        if not str(exc).startswith("Could not decode to UTF-8"):
            raise
    finally:
        conn.text_factory = factory
    return _fetch(conn.execute(sql, params), budget)


def _fetch(cursor: sqlite3.Cursor, budget: int | None) -> tuple[list[Any], bool]:
    if budget is None:
        return cursor.fetchall(), True
    rows: list[Any] = []
    used = 0
    while used <= budget:
        chunk = cursor.fetchmany(256)
        if not chunk:
            break
        rows += chunk
        used += sum(map(itemgetter(-1), chunk)) + ROW_OVERHEAD * len(chunk)
    return rows, cursor.fetchone() is None


def size_sql(columns: Sequence[str], prefix: str) -> str:
    """A row's size as the byte budgets count it: the ``length()`` of each
    text or blob value (SQLite answers it for a blob without reading the
    blob), 8 for any other. (``length()`` of a number would format it as
    text first: 10 % of the sender's block query.) A value is text or a
    blob exactly when it is ``>= ''``: numbers sort before every text, blobs
    after, NULL compares as nothing — whatever the column's affinity (a
    number column leaves '' text) or collation ('' sorts first in each).
    One comparison, not ``typeof()`` and two string compares: a tenth of
    the block query (tests/store/test_changes.py checks the two agree)."""
    def one(v: str) -> str:
        return f"CASE WHEN {v} >= '' THEN length({v}) ELSE 8 END"
    return " + ".join(one(prefix + quote_ident(c)) for c in columns) or "0"


def unsendable(t: SyncTable, key: str) -> None:
    """A row keyed by text that is not valid UTF-8 can't be read by its key
    (nor stored by one on the receiver): it stays here, every other row goes."""
    log.warning("table %s: the row keyed %a is not sent: its key is TEXT that is not valid UTF-8 "
                "(written by another program); fix the key to sync the row", t.info.name, raw_text_bytes(key))


