"""The two table types' code, by type: one module per mode, one interface.

merge.py (applying a peer's batch) and stream.py (reading one for a peer)
never branch on the table type: they ask ``of(mode)`` for the module and
call the same functions on either. ``Mode`` is that interface, written
down once; collaborative.py and single_version.py implement it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, cast

from p2pstore.protocol.batch import Columns
from p2pstore.protocol.table_type import TableType
from p2pstore.schema.predicates import CompiledQuery
from p2pstore.store import collaborative, single_version
from p2pstore.store.blocks import Done
from p2pstore.store.capture import CaptureState
from p2pstore.store.changes import Block, Read, RowChange, SyncTable, Value
from p2pstore.store.lww import Target
from p2pstore.store.tables import TableInfo

if TYPE_CHECKING:
    from p2pstore.store.merge import _Applier


class Mode(Protocol):
    """What a table type does: register / read / plan and write."""

    # register: capture a table's writes (store/capture.py) the way this type keys its rows.
    def register(self, conn: sqlite3.Connection, state: CaptureState, info: TableInfo, auto_sync: bool) -> None: ...

    # ... and follow its schema changes (an ALTER through the API; ``label`` names the store in logs).
    def columns_changed(self, conn: sqlite3.Connection, info: TableInfo, label: str) -> None: ...

    # read: what a peer is sent (stream.py picks the interval).
    SEQ_SOURCES: tuple[tuple[str, str, str], ...]  # where an interval's seqs are: (source, condition ({table}, {key}), key column)

    def unsent(self, conn: sqlite3.Connection, since: int) -> int: ...  # how many rows a peer at ``since`` has not been sent

    def seq_sizes(self, conn: sqlite3.Connection, t: SyncTable, seqs: Sequence[int]) -> Iterable[tuple[int, int]]: ...

    def has_irregular_rows(self, conn: sqlite3.Connection, t: SyncTable) -> bool: ...

    def counts_interval(self, conn: sqlite3.Connection, t: SyncTable, since: int, last: int, irregular: bool) -> bool: ...

    def read_block(self, conn: sqlite3.Connection, t: SyncTable, since: int, last: int, devices: tuple[str, ...],
                   budget: int | None = None, irregular: bool = ..., limit: int | None = None) -> Read: ...

    def read_irregular(self, conn: sqlite3.Connection, t: SyncTable, since: int, last: int, me: str,
                       block: Block) -> Iterator[RowChange]: ...

    def read_rows(self, conn: sqlite3.Connection, t: SyncTable, since: int, last: int, me: str,
                  where: CompiledQuery | None) -> Iterator[RowChange]: ...

    # plan and write: a peer's changes here (merge.py runs the batch).
    def target(self, ap: _Applier, table: SyncTable) -> Target: ...

    def merge_row(self, ap: _Applier, target: Target, row: RowChange) -> bool: ...

    def merge_bulk(self, ap: _Applier, rows: Sequence[RowChange], keys: dict[str, list[Value]], types: dict[str, type]) -> bool: ...

    def write_block(self, ap: _Applier, block: Block, columns: Columns, kind: type) -> Done | None: ...


_MODES: dict[str, Mode] = {
    TableType.COLLABORATIVE: cast(Mode, collaborative),
    TableType.SINGLE_VERSION: cast(Mode, single_version),
}


def of(mode: str) -> Mode:
    """The module of table type ``mode`` (a ``TableType`` or its string)."""
    return _MODES[mode]
