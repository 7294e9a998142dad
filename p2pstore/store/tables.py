"""What the store knows about user tables: columns, key, and internal names.

Internal objects all start with ``_p2p_`` and are hidden from applications.
Collaborative copies of a peer's rows live in ``dev_<DEVICEID>_<table>``
(device ID without dashes): deterministic, and collision-free because device
IDs are unique and fixed-length.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass

from p2pstore.errors import CompositeKeyNotSupported, InvalidParams, TableNotFound
from p2pstore.schema.predicates import quote_ident
from p2pstore.schema.shape import read_table_shape

INTERNAL_PREFIX = "_p2p_"
DEVICE_TABLE_PREFIX = "dev_"
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class TableInfo:
    """Columns and key of a user table, read from SQLite itself.

    ``key`` is the primary-key column, or None when the table's key is its
    implicit rowid (then ChangeInfo reports rowids, as SPEC §2 says).
    """

    name: str
    columns: tuple[str, ...]
    key: str | None
    key_is_rowid_alias: bool

    @property
    def key_expr(self) -> str:
        return quote_ident(self.key) if self.key else "rowid"


def check_name(kind: str, value: str) -> str:
    """Store and bundle names become file names: keep them to a safe alphabet."""
    if not isinstance(value, str) or not NAME_RE.match(value) or value in (".", ".."):
        raise InvalidParams(
            f"invalid {kind} name {value!r}: use 1-64 letters, digits, '_', '.', '-' (not starting with '.' or '-')",
            data={"param": kind},
        )
    return value


def is_internal(table: str) -> bool:
    lowered = table.lower()
    return lowered.startswith(INTERNAL_PREFIX) or lowered.startswith("sqlite_")


def read_table_info(conn: sqlite3.Connection, table: str) -> TableInfo:
    """Raise TableNotFound / CompositeKeyNotSupported; never guess.

    Read through ``schema.shape`` (the one reader of a live table's shape),
    so the store and sync_schema.json validation agree on what the key is and
    whether it aliases the rowid (never in a WITHOUT ROWID table)."""
    shape = None if is_internal(table) else read_table_shape(conn, table)
    if shape is None:
        raise TableNotFound(f"no such table: {table}", data={"table": table})
    pk = shape.primary_key
    if len(pk) > 1:
        raise CompositeKeyNotSupported(
            f"table {table} has a composite primary key ({', '.join(pk)}); distributed tables need a single-column key",
            data={"table": table},
        )
    columns = tuple(c.name for c in shape.columns)
    if not pk:
        return TableInfo(table, columns, None, False)
    return TableInfo(table, columns, pk[0], shape.rowid_alias is not None)


def device_table_name(device_id: str, table: str) -> str:
    """Name of the local read-only table holding ``device_id``'s rows of ``table``."""
    compact = device_id.replace("-", "").upper()
    if not compact.isalnum():
        raise InvalidParams(f"invalid device ID {device_id!r}", data={"param": "device"})
    return f"{DEVICE_TABLE_PREFIX}{compact}_{table}"
