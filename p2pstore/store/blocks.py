"""Staging a received block: the receiver's set-based fast path.

A ``Block`` (protocol/batch.py) is one table's row changes in columnar
form, read by the sender with one statement. The receiver loads it into a
staging table with one ``executemany`` and merges it with a few set-based
statements — no statement, and no Python object, per row. How it merges is
the table type's (``write_block`` in collaborative.py and
single_version.py); merge.py's ``apply_block`` decides whether a block may
take this path at all. Here: the staging table and the checks both modes'
block writers make.

Invariants (tests/store/test_blocks.py checks them against row by row):

- A block applied set-based writes exactly what applying its row changes
  one at a time writes — rows, local keys, log seqs in batch order, clocks,
  announcements — or nothing: the writer says None, the savepoint is
  rolled back, and the caller applies the rows by the row path, which
  isolates a row that fails. It says None whenever a row needs a decision
  this path does not make: a clock too far ahead, text that is not valid
  UTF-8, keys of mixed or ambiguous types, a column unknown here, a known
  row (single_version), or any SQLite error (a constraint of the table).
- Only a batch that is this one block takes this path (merge.apply_batch),
  so the seqs it gives are the seqs row by row would give.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from p2pstore.protocol.batch import KEY, PREV_HLC, SEQ, VALUES, Block, Columns, all_none
from p2pstore.schema.predicates import quote_ident
from p2pstore.schema.table_shape import column_affinity

_FIXED = "k, seq, hlc, o, ph, po, th, tor, tph, tpo"
#: Staged rows one INSERT statement carries (``load``), and the values it may
#: bind at most (SQLite's smallest limit, before 3.32: 999).
ROWS_PER_INSERT = 50
MAX_BINDS = 999
#: The first of the fixed fields a block row may leave NULL (protocol/batch.py: PREV_HLC).
_OPTIONAL = PREV_HLC

#: What a block writer did: rows applied, (origin, table, op, keys) to
#: announce (each list of keys in the block's order), and the tid of a
#: table it appended rows to (or None).
Done = tuple[int, list[tuple[str, str, int, list[Any]]], "int | None"]


def stage_table(conn: sqlite3.Connection, width: int) -> str:
    """An empty staging table for rows of ``width`` values (one per width,
    kept per connection in the temp schema); its ``n`` counts from 1 in
    insertion order. ``fresh`` is 1 (to write) until a writer's probe says
    otherwise."""
    name = f"_p2p_stage_{width}"
    values = ", ".join(f"v{i}" for i in range(width))
    conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {name}(n INTEGER PRIMARY KEY, {_FIXED}, {values}, fresh DEFAULT 1, existed)")
    conn.execute(f"DELETE FROM temp.{name}")
    return name


def load(conn: sqlite3.Connection, block: Block, columns: Columns) -> str:
    """``block``'s rows into a staging table; ``columns``: its rows' fields
    column by column. Bound row by row is only what varies: a fixed field
    that no row sets (prevs and tombs are NULL in most blocks) is left to
    the column's NULL, one with the same integer in every row (the origin
    of a block from one device) is a literal, and the value of the key's
    own column is not staged (the writers read the key as ``k``; its ``v``
    column stays NULL). Nor is the sender's ``seq`` bound: the writers
    number rows by ``n`` in this store's own seqs. A column's bytes are
    bound as bytearrays (``bindable``)."""
    fields = columns.fields
    stage = stage_table(conn, len(block.columns))
    names = [*_FIXED.split(", "), *(f"v{i}" for i in range(len(block.columns)))]
    bound: list[int] = []
    literal: dict[int, int] = {}
    for i in range(len(names)):
        if i == SEQ or (_OPTIONAL <= i < VALUES and all_none(fields[i])):
            continue
        if i >= VALUES and block.columns[i - VALUES] == block.key_column:
            continue
        if KEY < i < VALUES and len(block.rows) > 1:
            first = fields[i][0]
            if type(first) is int and fields[i].count(first) == len(fields[i]) and set(map(type, fields[i])) == {int}:
                literal[i] = first  # (type-checked: 1 == True == 1.0 for count)
                continue
        bound.append(i)
    listed = ", ".join([names[i] for i in bound] + [names[i] for i in literal])
    row = "(" + ", ".join(["?"] * len(bound) + [str(v) for v in literal.values()]) + ")"
    values = [bindable(fields[i], columns.kinds[i - VALUES]) if i >= VALUES else fields[i] for i in bound]
    per, whole, rest = runs(values, len(block.rows))
    if whole:
        conn.executemany(f"INSERT INTO temp.{stage}({listed}) VALUES {', '.join([row] * per)}", whole)
    if rest:
        conn.executemany(f"INSERT INTO temp.{stage}({listed}) VALUES {row}", rest)
    return stage


def runs(values: list[Sequence[Any]], n: int, extra: int = 0) -> tuple[int, list[list[Any]], list[tuple[Any, ...]]]:
    """``n`` rows' bound ``values`` (a field at a time) as ``executemany``
    runs: (rows a statement, each full statement's values, the rows left
    over, one a run). Several rows a statement: Python's executemany pays a
    step, a reset and a release of the GIL per run, which ``ROWS_PER_INSERT``
    rows share (a 1,000-row block: 1.2 -> 0.8 ms). The values are laid out
    row after row a field at a time (slice assignment, in C): no tuple a
    row. ``extra``: values a statement binds besides its rows'."""
    width = len(values)
    per = max(1, min(ROWS_PER_INSERT, (MAX_BINDS - extra) // width))
    whole = n // per * per
    flat: list[Any] = [None] * (whole * width)
    for j, field in enumerate(values):
        flat[j::width] = field[:whole]
    step = per * width
    return per, [flat[i:i + step] for i in range(0, len(flat), step)], list(zip(*[field[whole:] for field in values]))


def bindable(column: Sequence[Any], kinds: set[type]) -> Sequence[Any]:
    """``column`` with its bytes as bytearrays, which bind the same (a BLOB)
    at a quarter of the cost: CPython's sqlite3 binds a bytearray at once,
    but looks a bytes value up in its adapters (and in both sides'
    ``__adapt__``/``__conform__``) first — the staging of the benches'
    table, a 4-byte BLOB a row: 0.055 -> 0.023 s per 100k rows."""
    if bytes not in kinds:
        return column
    if len(kinds) == 1:
        return list(map(bytearray, column))
    return [bytearray(v) if type(v) is bytes else v for v in column]


def keys_stay_distinct(conn: sqlite3.Connection, table: str, column: str, key_type: type) -> bool:
    """Whether keys of ``key_type`` keep their type (and so their identity)
    in ``column``: ints in a column of INTEGER affinity, strs in one of TEXT
    affinity. Only then can a bulk apply match rows to keys with IN lists,
    joins and dicts; otherwise it leaves the batch to row by row."""
    # Called per batch: one pragma, not the whole shape (schema.shape); the
    # affinity rule is the schema's own.
    decl = next((r[2] for r in conn.execute(f"PRAGMA table_info({quote_ident(table)})") if r[1] == column), None)
    if decl is None:
        return False
    return column_affinity(decl) == ("INTEGER" if key_type is int else "TEXT")


def not_none(values: Any) -> list[Any]:
    return [] if all_none(values) else [v for v in values if v is not None]


def top(values: tuple[Any, ...] | list[Any]) -> Any:
    """The greatest of ``values`` that is not None (0 if none is)."""
    missing = values.count(None)
    if missing == 0:
        return max(values, default=0)
    return 0 if missing == len(values) else max(v for v in values if v is not None)
