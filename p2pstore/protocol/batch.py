"""A sync batch on the wire: what it holds, its plain (msgpack-ready) form,
and the one ``decode`` of a received batch.

A batch (``OutBatch``) is one bounded slice of a store's change stream:
row changes (``RowChange``) made of cells (``Cell``). The sender's store
builds it (store/changes.py), the receiver's store applies it
(store/merge.py); this module is what both agree on in between.

Invariants:

- ``decode`` is the one place a received batch is read, and it has one
  failure mode: ``ProtocolError`` (the session ends as CORRUPTED). A batch
  object that ``decode`` returns passed every check of ``batch_from_plain``.
- Wire form: a ``SyncBatch`` message's ``payload`` is the msgpack
  (``messages.pack_values``) of ``batch_to_plain``'s map. The field layout
  is frozen: release-1 peers read and write exactly this (docs/protocol.md,
  "Sync batches", says why the payload stays msgpack inside msgpack).
- Batches hold plain values only (int, float, str, bytes, None). TEXT that
  is not valid UTF-8 is a str with lone surrogates (store/changes.py
  ``TEXT_FACTORY``); it travels byte-exact, and is refused wherever a name or
  a key must be looked up (``is_raw_text``).

These definitions lived in store/changes.py (which still re-exports them):
the protocol layer is below the store (SPEC §7), and decoding untrusted
bytes belongs to it.
"""

from __future__ import annotations

import math
import operator
from itertools import repeat
import dataclasses
from dataclasses import dataclass, field
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from p2pstore.clock import MAX_HLC
from p2pstore.errors import ProtocolError
from p2pstore.protocol.messages import pack_values, unpack
from p2pstore.protocol.table_type import TableType

Value = int | float | str | bytes | None


def is_raw_text(value: Any) -> bool:
    """Whether ``value`` is TEXT read from bytes that are not valid UTF-8
    (store/changes.py ``TEXT_FACTORY``): SQLite can't be handed it as a str parameter."""
    if type(value) is not str or value.isascii():
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


COLLABORATIVE, SINGLE_VERSION = TableType.COLLABORATIVE, TableType.SINGLE_VERSION
MODES = tuple(TableType)
#: Row changes one batch may hold (a receiver refuses more).
MAX_BATCH_ROWS = 100_000
#: Caps on names in a decoded batch (SQLite has none; a peer must not make us
#: hold arbitrarily long identifiers).
MAX_NAME_LEN = 1024


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


class Grant(NamedTuple):
    """See ``OutBatch.grants``."""

    device: str
    hlc: int
    from_seq: int


#: Most grants one batch carries (one per device of a fleet, as origin marks).
MAX_GRANTS = 4096


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
    #: Part of a push of the sender's own changes (``SyncOpen.own``) that left
    #: out changes it relayed (so not ``full``): the receiver moves its eager
    #: position, not its watermark (store/merge.py). Set by the receiving
    #: session from the push's open, never on the wire.
    own: bool = field(default=False, compare=False)
    #: Rows in columnar form (protocol 2): the common rows, one clock per
    #: row, straight from one cursor to one ``executemany`` (see ``Block``).
    #: A batch's ``rows`` and ``blocks`` never hold the same key of a table.
    blocks: tuple[Block, ...] = ()
    #: (Protocol 5; the last batch of an eager push that forwards other
    #: devices' changes along their trees, net/overlay.py.) ``(device, hlc,
    #: from_seq)``: the sender holds every change ``device`` wrote up to
    #: ``hlc``, and since ``from_seq`` of its stream it has pushed every one of
    #: them to this receiver; a receiver that holds the sender's stream up to
    #: ``from_seq`` and took the push to its end holds them all (store/merge.py
    #: ``_advance_watermark``), and its origin marks say so.
    grants: tuple[Grant, ...] = ()
    #: (block, its rows column by column) as ``decode`` checked them (never
    #: on the wire; empty for a batch not decoded): the receiver's set-based
    #: path starts from them instead of regrouping the rows again
    #: (``columns_of``).
    block_fields: tuple[tuple[Block, Columns], ...] = field(default=(), compare=False)

    @property
    def count(self) -> int:
        """How many row changes the batch carries, in either form."""
        return len(self.rows) + sum(len(b.rows) for b in self.blocks)

    def columns_of(self, block: Block) -> Columns | None:
        """``block``'s rows column by column, if ``decode`` kept them — for
        this very block: one put in its place since (a replaced block is
        another object) has none."""
        return next((c for b, c in self.block_fields if b is block), None)

    def tables(self) -> dict[str, int]:
        """Row changes per table."""
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.table] = out.get(row.table, 0) + 1
        for block in self.blocks:
            out[block.table] = out.get(block.table, 0) + len(block.rows)
        return out

    def first_change(self) -> tuple[str, Value]:
        """(table, key) of the batch's first row change (there must be one)."""
        if self.rows:
            return self.rows[0].table, self.rows[0].key
        return self.blocks[0].table, self.blocks[0].rows[0][KEY]

    def as_rows(self) -> OutBatch:
        """The same batch with every block as row changes, in ``seq`` order
        (protocol-1 peers, and the row-by-row apply path)."""
        if not self.blocks:
            return self
        rows = sorted([*self.rows, *(r for b in self.blocks for r in b.row_changes())], key=lambda r: r.seq)
        return dataclasses.replace(self, rows=tuple(rows), blocks=(), block_fields=())


# Positions in a block row (``Block``); the table's values follow from VALUES on.
KEY, SEQ, HLC, ORIGIN, PREV_HLC, PREV_ORIGIN, TOMB_HLC, TOMB_ORIGIN, TOMB_PREV_HLC, TOMB_PREV_ORIGIN, VALUES = range(11)


class Block(NamedTuple):
    """Row changes of one table in columnar form: the shape of the common
    row, read from one cursor and applied with one ``executemany``.

    Each row is a flat sequence ``(key, seq, hlc, origin, prev_hlc,
    prev_origin, tomb_hlc, tomb_origin, tomb_prev_hlc, tomb_prev_origin,
    *values)`` with one value per ``columns`` entry. Every value shares the
    row's clock ``(hlc, origin)`` (and ``prev``); ``hlc`` None: the row has
    no cells (a delete). Origins are indexes into ``origins`` (device IDs),
    so a device ID travels once per block, not once per row.

    The same row as a ``RowChange`` (``row_changes``): one ``Cell`` per
    column with the row's clock, and the tomb fields. collaborative: a full
    row (hlc set, no tomb) or a delete (tomb set, no hlc); single_version:
    cells for exactly ``columns`` (the sync columns), a tomb if the row has
    one.
    """

    table: str
    key_column: str
    columns: tuple[str, ...]
    origins: tuple[str, ...]
    rows: Sequence[Sequence[Value]]

    def row_changes(self) -> list[RowChange]:
        out = []
        names, devices = self.columns, self.origins
        for r in self.rows:
            hlc = r[HLC]
            if hlc is None:
                cells: tuple[Cell, ...] = ()
            else:
                origin, prev_hlc = devices[r[ORIGIN]], r[PREV_HLC]
                prev_origin = devices[r[PREV_ORIGIN]] if prev_hlc is not None else None
                cells = tuple(Cell(c, v, hlc, origin, prev_hlc, prev_origin) for c, v in zip(names, r[VALUES:]))
            tomb_hlc = r[TOMB_HLC]
            tomb: tuple[Any, ...] = (None, None, None, None)
            if tomb_hlc is not None:
                tomb_prev = r[TOMB_PREV_HLC]
                tomb = (tomb_hlc, devices[r[TOMB_ORIGIN]], tomb_prev, devices[r[TOMB_PREV_ORIGIN]] if tomb_prev is not None else None)
            out.append(RowChange(self.table, self.key_column, r[KEY], r[SEQ], cells, *tomb))
        return out


class Rows(Sequence[Sequence[Value]]):
    """A decoded block's rows (``Block.rows``), built from its fields when
    first looked at — most never are: the set-based apply takes the fields
    themselves (``Columns``), and a tuple a row cost the receiver more than
    the rest of decode (2,000 tuples a block, each tracked by the garbage
    collector while its group waits and applies: a third of the receiving
    event loop's time, py-spy)."""

    __slots__ = ("fields", "_n", "_rows")

    def __init__(self, fields: Sequence[Sequence[Value]], n: int) -> None:
        #: The rows field by field (read only: the rows are built from them).
        self.fields = fields
        self._n = n
        self._rows: list[tuple[Value, ...]] | None = None

    def _built(self) -> list[tuple[Value, ...]]:
        if self._rows is None:
            self._rows = list(zip(*self.fields))
        return self._rows

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        return self._built()[i]

    def __iter__(self) -> Iterator[tuple[Value, ...]]:
        return iter(self._built())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, Rows)):
            return self._built() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # (as a list's)

    def __repr__(self) -> str:
        return repr(self._built())


def field_of(rows: Sequence[Sequence[Value]], i: int) -> Sequence[Value]:
    """Field ``i`` of every row of a block: kept whole by ``Rows``, else
    gathered (in C). Read only."""
    if isinstance(rows, Rows):
        return rows.fields[i]
    return list(map(operator.itemgetter(i), rows))


class Columns(NamedTuple):
    """A block's rows column by column (``fields``, one per field of
    ``Block``'s row), with what is known of their values: each table
    column's types (``kinds``, one set per ``Block.columns`` entry), and
    whether any text of them may be raw (``raw_text``: not valid UTF-8;
    False only where ``decode`` read the whole payload as UTF-8). The
    set-based apply (store/blocks.py) binds and checks them a column at a
    time; ``decode`` learns all of it checking the block, so the receiver
    need not look at each value again."""

    fields: list[Sequence[Value]]
    kinds: tuple[set[type], ...]
    raw_text: bool = True
    #: Field -> step, for the fields that came as a count (protocol 7) or as
    #: one integer for every row (step 0); None: not known (found by ``step``).
    counts: dict[int, int] | None = None

    @classmethod
    def of(cls, block: Block) -> Columns:
        """A block's columns found from its rows (one not decoded)."""
        fields: list[Sequence[Value]] = [list(f) for f in zip(*block.rows)]
        return cls(fields, tuple(set(map(type, f)) for f in fields[VALUES:]))

    def step(self, i: int) -> int | None:
        """The step of field ``i`` if its values are integers that count
        (0: the same integer in every row), else None."""
        if self.counts is not None:
            return self.counts.get(i)
        field = list(self.fields[i])
        first = field[0] if field else None
        if type(first) is int and field.count(first) == len(field) and set(map(type, field)) == {int}:
            return 0
        return _counting_step(field)


# --------------------------------------------------------------------------
# Plain (msgpack-ready) form, and the checks a received batch must pass


def row_to_plain(row: RowChange) -> list[Any]:
    return [
        row.table, row.key_column, row.key, row.seq,
        [[c.column, c.value, c.hlc, c.origin, c.prev_hlc, c.prev_origin] for c in row.cells],
        [row.tomb_hlc, row.tomb_origin, row.tomb_prev_hlc, row.tomb_prev_origin] if row.tomb_hlc is not None else None,
    ]


def _fields_to_plain(rows: Sequence[Sequence[Value]]) -> list[Sequence[Value]]:
    """A block's rows as its fields (protocol 6), each a value per row, or
    once when every row holds the same (the origin of a one-device block,
    prevs and tombs most blocks leave NULL). Equal is not enough for
    numbers (1 == 1.0, 0.0 == -0.0): an integer field goes once only when
    every value is an integer, a float field never."""
    out: list[Any] = []
    for column in (rows.fields if isinstance(rows, Rows) else map(list, zip(*rows))):
        first = column[0]
        if (column[-1] == first and column.count(first) == len(column)
                and (first is None or type(first) in (str, bytes) or (type(first) is int and set(map(type, column)) == {int}))):
            out.append([first])
        elif (step := _counting_step(column)) is not None:
            out.append({"from": first, "step": step})
        else:
            out.append(column)
    return out


def _counting_step(column: list[Value]) -> int | None:
    """The step of a field of integers that counts — each value the one
    before plus the same step, as keys, seqs and clocks of rows appended
    together do (protocol 7) — of at least three rows; else None."""
    if len(column) < 3:
        return None
    first, second, last = column[0], column[1], column[-1]
    if type(first) is not int or type(second) is not int or type(last) is not int:
        return None
    step = second - first
    if step == 0 or last != first + (len(column) - 1) * step:
        return None
    if column != list(range(first, last + step, step)) or set(map(type, column)) != {int}:  # (1 == 1.0 == True)
        return None
    return step


def _counted(field: Any, n: int, what: str) -> tuple[list[int], list[int]]:
    """A field that counts (``{"from": first, "step": step}``): its first
    and last value, which the checks of a field of integers need alone (its
    least and greatest), and its ``n`` values."""
    if set(field) != {"from", "step"} or type(field["from"]) is not int or type(field["step"]) is not int:
        raise ProtocolError(f"{what}: a field that counts must be {{from, step}}, two integers")
    first, step = field["from"], field["step"]
    last = first + (n - 1) * step
    if not (_INT64[0] <= first <= _INT64[1] and _INT64[0] <= last <= _INT64[1]):
        raise ProtocolError(f"{what}: integer out of SQLite's 64-bit range")
    return [first, last], ([first] * n if step == 0 else list(range(first, last + step, step)))


def batch_to_plain(batch: OutBatch, *, columnar: bool = True) -> dict[str, Any]:
    """The plain form; ``columnar`` False: blocks as row changes (what a
    protocol-1 peer reads: it refuses a batch with ``blocks``)."""
    if not columnar:
        batch = batch.as_rows()
    plain: dict[str, Any] = {
        "mode": batch.mode, "since_seq": batch.since_seq, "last_seq": batch.last_seq,
        "more": batch.more, "full": batch.full, "stream": batch.stream, "rows": [row_to_plain(r) for r in batch.rows],
    }
    if batch.snapshot_hlc is not None:
        plain["snapshot"] = [batch.snapshot_hlc, batch.snapshot_first]
    if batch.blocks:
        plain["blocks"] = [[b.table, b.key_column, list(b.columns), list(b.origins), len(b.rows), _fields_to_plain(b.rows)]
                           for b in batch.blocks]
    if batch.grants:
        plain["grants"] = [list(g) for g in batch.grants]
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


_VALUE_TYPES = frozenset((int, float, str, bytes, type(None)))
_INT64 = (-(1 << 63), (1 << 63) - 1)


def all_none(values: tuple[Any, ...] | list[Any]) -> bool:
    """Whether every one of ``values`` (a block's field, column by column) is
    None: counted in C, as most optional fields of most blocks are."""
    return values.count(None) == len(values)


def _column_ints(values: Sequence[Any], what: str, low: int, high: int, *, optional: bool) -> None:
    """Every item an int in ``low..high`` (or None, if ``optional``): one pass in C where it can."""
    if optional:
        missing = values.count(None)
        if missing == len(values):
            return
        if missing:
            values = [v for v in values if v is not None]
    kinds = set(map(type, values))
    if not kinds <= {int}:
        raise ProtocolError(f"{what} must be integers")
    if values and (min(values) < low or max(values) > high):
        raise ProtocolError(f"{what} must be in {low}..{high}")


def _together(hlcs: Sequence[Any], origins: Sequence[Any], what: str) -> None:
    missing = hlcs.count(None)
    if missing != origins.count(None):
        raise ProtocolError(f"{what}: hlc and origin go together")
    if 0 < missing < len(hlcs) and list(map(operator.is_, hlcs, repeat(None))) != list(map(operator.is_, origins, repeat(None))):
        raise ProtocolError(f"{what}: hlc and origin go together")


def _check_values(column: Sequence[Any], what: str) -> set[type]:
    """One column of a block: SQLite values only, integers in 64 bits, no
    NaN; its types, for the caller's further checks. A column of one type
    (and NULLs) is checked in C (``min``/``max``, ``sum``); a mixed one
    value by value."""
    kinds = set(map(type, column))
    if not kinds <= _VALUE_TYPES:
        raise ProtocolError(f"{what}: a value must be null, an integer, a float, a string or bytes")
    some = kinds - {type(None)}
    if some == {int}:
        ints = column if len(kinds) == 1 else list(filter(None, column))  # (filter drops NULLs, and zeros: in range anyway)
        if ints and (min(ints) < _INT64[0] or max(ints) > _INT64[1]):
            raise ProtocolError(f"{what}: integer out of SQLite's 64-bit range")
    elif some == {float}:
        floats = column if len(kinds) == 1 else list(filter(None, column))
        # (A sum is NaN if a value is, or if both infinities are there: then look value by value.)
        if math.isnan(sum(floats)) and any(map(math.isnan, floats)):
            raise ProtocolError(f"{what}: NaN can't be stored")
    elif int in some or float in some:
        for v in column:
            if type(v) is int and not _INT64[0] <= v <= _INT64[1]:
                raise ProtocolError(f"{what}: integer out of SQLite's 64-bit range")
            if type(v) is float and v != v:
                raise ProtocolError(f"{what}: NaN can't be stored")
    return kinds


def has_raw_text(column: Sequence[Any], kinds: set[type] | None = None) -> bool:
    """Whether any value of ``column`` is raw text (``is_raw_text``); a
    column of text (and NULLs) is checked whole in C: one ``isascii``, or
    for other text (names in Chinese) one ``encode`` — raw text holds lone
    surrogates, which no join pairs up and which ``encode`` refuses.
    ``kinds``: the column's types, if known."""
    if kinds is None:
        kinds = set(map(type, column))
    if str not in kinds:
        return False
    if kinds <= {str, type(None)}:
        text = "".join(filter(None, column))
        if text.isascii():
            return False
        try:
            text.encode()
            return False
        except UnicodeEncodeError:
            pass
    return any(type(v) is str and is_raw_text(v) for v in column)


def block_from_plain(obj: Any, mode: str, *, raw_text: bool = True) -> tuple[Block, Columns]:
    """Check and build one block, and give its rows column by column too;
    every check runs over whole columns (the point of the form: no per-row
    objects), with the same rules as ``row_from_plain`` for each row. Any
    defect raises ``ProtocolError``. ``raw_text`` False: no str of ``obj``
    is raw text (``decode`` read it as UTF-8), and none is looked at for it."""
    if not isinstance(obj, list) or len(obj) != 6:
        raise ProtocolError("a block must be [table, key column, columns, origins, row count, fields]")
    table, key_column, columns, devices, n, plain = obj
    table = _name(table, "block table")
    key_column = _name(key_column, f"{table}: key column", empty=mode == COLLABORATIVE)
    if mode == SINGLE_VERSION and not key_column:
        raise ProtocolError(f"{table}: a single_version row needs its conflict column")
    if not isinstance(columns, list) or not columns or len(columns) > MAX_NAME_LEN:
        raise ProtocolError(f"{table}: a block's columns must be a non-empty list")
    columns = tuple(_name(c, f"{table}: column") for c in columns)
    if len(set(columns)) != len(columns):
        raise ProtocolError(f"{table}: a column appears twice in one row change")
    if not isinstance(devices, list) or not devices or len(devices) > MAX_BATCH_ROWS:
        raise ProtocolError(f"{table}: a block's origins must be a non-empty list")
    devices = tuple(_name(d, f"{table}: origin") for d in devices)
    if type(n) is not int or not 1 <= n <= MAX_BATCH_ROWS:
        raise ProtocolError(f"{table}: a block holds 1..{MAX_BATCH_ROWS} rows")
    width = VALUES + len(columns)
    if not isinstance(plain, list) or len(plain) != width or not set(map(type, plain)) <= {list, dict}:
        raise ProtocolError(f"{table}: a block's fields must be a list of {width} lists (or counts)")
    if not set(len(f) for f in plain if type(f) is list) <= {1, n}:
        raise ProtocolError(f"{table}: a field holds a value for each of the {n} rows, or one for all of them")
    # Checked as they came (a field the same in every row: its one value; one
    # that counts: its first and last), then whole.
    fields: list[Sequence[Value]] = [f * n if type(f) is list and len(f) < n else f for f in plain]
    plain = list(plain)  # (the caller's stays as it was)
    counts: dict[int, int] = {}
    for i, f in enumerate(plain):
        if type(f) is dict:
            plain[i], fields[i] = _counted(f, n, f"{table}: field {i}")
            counts[i] = f["step"]
        elif len(f) == 1 and type(f[0]) is int:
            counts[i] = 0
    keys = fields[KEY]
    key_kinds = set(map(type, plain[KEY]))
    if not key_kinds <= _VALUE_TYPES - {type(None)}:
        raise ProtocolError(f"{table}: a row key can't be NULL" if None in keys else f"{table}: key must be an integer, a float, a string or bytes")
    _column_ints(plain[SEQ], f"{table}: seq", 0, _INT64[1], optional=False)
    last_origin = len(devices) - 1
    for hlc, origin, what in ((HLC, ORIGIN, "clock"), (PREV_HLC, PREV_ORIGIN, "prev"),
                              (TOMB_HLC, TOMB_ORIGIN, "tomb"), (TOMB_PREV_HLC, TOMB_PREV_ORIGIN, "tomb prev")):
        _column_ints(plain[hlc], f"{table}: {what} hlc", 0, MAX_HLC, optional=True)
        _column_ints(plain[origin], f"{table}: {what} origin", 0, last_origin, optional=True)
        _together(fields[hlc], fields[origin], f"{table}: {what}")
    kinds = tuple(_check_values(column, f"{table}: column {name}") for name, column in zip(columns, plain[VALUES:]))
    _check_values(plain[KEY], f"{table}: key")
    if raw_text and has_raw_text(plain[KEY], key_kinds):
        raise ProtocolError(f"{table}: a row key that is not valid UTF-8 text can't be synced")
    hlcs, tombs = fields[HLC], fields[TOMB_HLC]
    # What no row change can hold (``row_changes`` would drop it silently). Counted
    # first (in C): most blocks have every row clock and no tomb, and need no pass.
    no_hlc, no_tomb = hlcs.count(None), tombs.count(None)
    if no_hlc and not all_none(fields[PREV_HLC]) and any(h is None and p is not None for h, p in zip(hlcs, fields[PREV_HLC])):
        raise ProtocolError(f"{table}: a prev clock on a row without cells")
    if no_tomb and not all_none(fields[TOMB_PREV_HLC]) and any(
            t is None and p is not None for t, p in zip(tombs, fields[TOMB_PREV_HLC])):
        raise ProtocolError(f"{table}: a tomb prev clock on a row without a tomb")
    if no_hlc and any(h is None and any(v is not None for v in r) for h, *r in zip(hlcs, *fields[VALUES:])):
        raise ProtocolError(f"{table}: values on a row without cells")
    if mode == COLLABORATIVE:
        if (no_hlc + no_tomb != n) or (no_hlc and no_tomb and any((h is None) is (t is None) for h, t in zip(hlcs, tombs))):
            raise ProtocolError(f"{table}: a collaborative row change is either a full row or a delete")
    elif no_hlc and no_tomb and any(h is None and t is None for h, t in zip(hlcs, tombs)):
        raise ProtocolError(f"{table}: a single_version row change carries cells or a tomb")
    return Block(table, key_column, columns, devices, Rows(fields, n)), Columns(fields, kinds, raw_text, counts)


def batch_from_plain(obj: Any, *, raw_text: bool = True) -> OutBatch:
    """Check and build a received batch; any defect raises ``ProtocolError``.
    ``raw_text`` False: no str of ``obj`` is raw text (``decode``)."""
    if (not isinstance(obj, dict)
            or set(obj) - {"snapshot", "blocks", "grants"} != {"mode", "since_seq", "last_seq", "more", "full", "stream", "rows"}):
        raise ProtocolError("a change batch must be a map of mode, since_seq, last_seq, more, full, stream, rows "
                            "(and snapshot, blocks, grants)")
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
    plain_blocks = obj.get("blocks", [])
    if not isinstance(plain_blocks, list) or len(plain_blocks) > MAX_BATCH_ROWS:
        raise ProtocolError("blocks must be a list")
    checked = [block_from_plain(b, mode, raw_text=raw_text) for b in plain_blocks]
    blocks = tuple(b for b, _ in checked)
    if len(rows) + sum(len(b.rows) for b in blocks) > MAX_BATCH_ROWS:
        raise ProtocolError(f"a batch holds at most {MAX_BATCH_ROWS} row changes")
    return OutBatch(mode, since, last, tuple(row_from_plain(r, mode) for r in rows), obj["more"], obj["full"], stream,
                    snap_hlc, bool(snapshot[1]) if snapshot is not None else False, checked=True, blocks=blocks,
                    grants=_grants(obj.get("grants", [])), block_fields=tuple(checked))


def _grants(plain: Any) -> tuple[Grant, ...]:
    if not isinstance(plain, list) or len(plain) > MAX_GRANTS:
        raise ProtocolError(f"grants must be a list of at most {MAX_GRANTS} [device, hlc, from_seq]")
    grants = []
    for g in plain:
        if not isinstance(g, (list, tuple)) or len(g) != 3:
            raise ProtocolError("a grant must be [device, hlc, from_seq]")
        grants.append(Grant(_name(g[0], "grant device"), _int(g[1], "grant hlc", 0, MAX_HLC), _int(g[2], "grant from_seq")))
    return tuple(grants)


def own_push_part(batch: OutBatch) -> OutBatch:
    """``batch`` as received in a push of the sender's own changes
    (``SyncOpen.own``): one that left out changes the sender relayed (not
    ``full``) moves the receiver's eager position, not its watermark."""
    return batch if batch.full or batch.snapshot_hlc is not None else dataclasses.replace(batch, own=True)


def encode(batch: OutBatch, *, columnar: bool = True) -> bytes:
    """The ``SyncBatch.payload`` of ``batch`` (``columnar``: see ``batch_to_plain``)."""
    return pack_values(batch_to_plain(batch, columnar=columnar))


def decode(payload: bytes) -> OutBatch:
    """A received ``SyncBatch.payload``; any defect is a ``ProtocolError``.

    Read as UTF-8 first: then no text in it is raw, which spares the
    receiver a look at every str for it; only a payload that is not (TEXT
    that is not valid UTF-8 travels byte-exact) is read again with raw text."""
    try:
        plain, raw_text = unpack(payload, "batch"), False
    except ProtocolError:
        plain, raw_text = unpack(payload, "batch", raw_text=True), True
    try:
        return batch_from_plain(plain, raw_text=raw_text)
    except ProtocolError:
        raise
    except Exception as exc:  # batch_from_plain promises ProtocolError; belt and braces for peer input
        raise ProtocolError(f"malformed batch: {exc}") from exc
