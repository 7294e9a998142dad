"""Last-writer-wins: the small pieces both table types' merges are made of.

merge.py runs a batch (transaction, failures, watermark); the rules of each
table type live in collaborative.py and single_version.py. What they share
is here, below all three, so neither mode module imports the other or
merge.py:

- ``Clock``: ``(hlc, origin)``, compared as a tuple — HLC first, the device
  ID breaks ties (merge.py's module docstring has the rules);
- ``Stamp``: a clock and the clock its writer had knowingly superseded
  (``prev``), which decides what the conflict log records, never who wins;
- ``visible``: a value is visible iff its cell is newer than the row's tomb;
- ``same``: equal as SQLite stores them;
- ``bind``: placeholders that write raw text back as the bytes it was;
- ``Target``: where one table's incoming rows are written here;
- ``RowFailed``: a row change that can't apply: its reason goes to the
  sync-failure log and the rest of the batch applies;
- ``park``: cells for columns this device lacks, kept for its upgrade.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from p2pstore.store.changes import RowChange, SyncTable, Value, is_raw_text, raw_text_bytes

if TYPE_CHECKING:  # merge.py imports this module
    from p2pstore.store.merge import _Applier

Clock = tuple[int, str]


@dataclass(frozen=True, slots=True)
class Stamp:
    """A clock and the clock its writer had superseded (for the conflict log)."""

    clock: Clock
    prev: Clock | None = None


def visible(cell: Stamp | None, tomb: Stamp | None) -> bool:
    return cell is not None and (tomb is None or cell.clock > tomb.clock)


def same(a: Value, b: Value) -> bool:
    """Equal as SQLite stores them (1 and 1.0 and True are not the same value)."""
    return type(a) is type(b) and a == b


def bind(values: Sequence[Value]) -> tuple[list[str], tuple[Value, ...]]:
    """Placeholders and parameters for ``values``. Raw text (TEXT that is not
    valid UTF-8, see ``changes.TEXT_FACTORY``) is bound as its bytes and cast
    back, so the receiver stores the same bytes as TEXT."""
    marks, params = [], []
    for value in values:
        if is_raw_text(value):
            assert isinstance(value, str)
            marks.append("CAST(? AS TEXT)")
            params.append(raw_text_bytes(value))
        else:
            marks.append("?")
            params.append(value)
    return marks, tuple(params)


@dataclass(slots=True)
class Target:
    """Where the incoming rows of one distributed table are written here."""

    table: SyncTable
    dest: str  # the SQLite table written: T itself, or the device table
    dest_tid: int
    dest_columns: frozenset[str]  # single_version: the sync columns; collaborative: the device table's columns


class RowFailed(Exception):
    """A row change that can't be applied here; ``reason`` starts with a stable kind."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: Keep the newer of a parked cell and an incoming one (clocks compare as (hlc, device)).
_PARK_SQL = (
    "INSERT INTO _p2p_parked(tid, ck, col, value, hlc, origin, prev_hlc, prev_origin) VALUES (?, ?, ?, {}, ?, ?, ?, ?) "
    "ON CONFLICT(tid, ck, col) DO UPDATE SET value = excluded.value, hlc = excluded.hlc, origin = excluded.origin, "
    "prev_hlc = excluded.prev_hlc, prev_origin = excluded.prev_origin "
    "WHERE (excluded.hlc, excluded.origin) > (_p2p_parked.hlc, _p2p_parked.origin)"
)


def park(ap: _Applier, target: Target, row: RowChange) -> bool:
    """Keep the cells of ``row`` for columns this device does not have or
    sync (a peer on a newer sync_schema.json or evolution): not failures,
    not dropped — the upgrade that adds the column here merges them under
    their own clocks (single_version: cells.unpark; collaborative:
    collaborative.columns_changed), so a device that upgrades late loses
    nothing. Whether any parked cell was new or newer."""
    changed = False
    for c in row.cells:
        if c.column in target.dest_columns or c.column == target.table.conflict_column:
            continue
        (mark,), (value,) = bind([c.value])
        prev_hlc, prev_origin = c.prev if c.prev is not None else (None, None)
        changed |= ap.conn.execute(_PARK_SQL.format(mark), (target.dest_tid, row.key, c.column, value, c.hlc, c.origin,
                                                          prev_hlc, prev_origin)).rowcount > 0
    ap.parked += changed
    return changed
