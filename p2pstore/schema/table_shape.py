"""A live SQLite table as plain data, and which field types agree with it.

``shape.read_table_shape`` fills these from SQLite; the layer-2 rules
(``table_rules``) read them, so the rules stay pure and testable with plain
data. Names are case-sensitive, like every name in sync_schema.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: Field ``type`` values in the order the seed lists them.
FIELD_TYPES = ("Text", "Integer", "Long", "Float", "Double", "Blob")

#: Which SQLite column affinities each field ``type`` agrees with. NUMERIC
#: affinity (NUMERIC, DECIMAL, BOOLEAN, DATE...) stores integers and reals
#: alike, so every numeric type agrees with it.
TYPE_AFFINITIES: Mapping[str, frozenset[str]] = {
    "Text": frozenset({"TEXT"}),
    "Integer": frozenset({"INTEGER", "NUMERIC"}),
    "Long": frozenset({"INTEGER", "NUMERIC"}),
    "Float": frozenset({"REAL", "NUMERIC"}),
    "Double": frozenset({"REAL", "NUMERIC"}),
    "Blob": frozenset({"BLOB"}),
}


@dataclass(frozen=True, slots=True)
class ColumnShape:
    """One column of a live SQLite table, as layer 2 needs it."""

    name: str
    declared_type: str
    not_null: bool
    default: str | None
    pk_index: int  # 0 = not in the primary key, else 1-based position in it
    unique: bool  # a single-column UNIQUE constraint/index (partial ones don't count) or the sole PK column
    autoincrement: bool  # INTEGER PRIMARY KEY AUTOINCREMENT

    @property
    def affinity(self) -> str:
        return column_affinity(self.declared_type)

    @property
    def has_default(self) -> bool:
        """True when an INSERT that omits the column still satisfies NOT NULL.
        ``DEFAULT NULL`` is no default for that purpose."""
        return self.default is not None and self.default.strip().upper() != "NULL"


@dataclass(frozen=True, slots=True)
class TableShape:
    """A live SQLite table: its columns, and whether it is WITHOUT ROWID
    (which decides whether an ``INTEGER PRIMARY KEY`` is a rowid alias)."""

    name: str
    columns: tuple[ColumnShape, ...]
    without_rowid: bool = False

    def column(self, name: str) -> ColumnShape | None:
        """The column called exactly ``name`` (case-sensitive, like the
        seed's "NAMe" rule), or None."""
        for col in self.columns:
            if col.name == name:
                return col
        return None

    @property
    def primary_key(self) -> tuple[str, ...]:
        """Primary-key column names in key order; () for a rowid-only table."""
        return tuple(c.name for c in sorted((c for c in self.columns if c.pk_index), key=lambda c: c.pk_index))

    @property
    def rowid_alias(self) -> str | None:
        """The ``INTEGER PRIMARY KEY`` column that aliases the rowid, if any.
        SQLite gives such a column a value when an insert leaves it out, with
        or without AUTOINCREMENT."""
        if self.without_rowid:
            return None
        pk = [c for c in self.columns if c.pk_index]
        if len(pk) == 1 and pk[0].declared_type.strip().upper() == "INTEGER":
            return pk[0].name
        return None


def column_affinity(declared_type: str) -> str:
    """SQLite's type-affinity rules (https://sqlite.org/datatype3.html §3.1),
    applied in SQLite's order. STRICT tables' ``ANY`` has no affinity of its
    own; it is reported as ``ANY`` and agrees with every field type."""
    upper = declared_type.upper()
    if upper.strip() == "ANY":
        return "ANY"
    if "INT" in upper:
        return "INTEGER"
    if "CHAR" in upper or "CLOB" in upper or "TEXT" in upper:
        return "TEXT"
    if "BLOB" in upper or not upper.strip():
        return "BLOB"
    if "REAL" in upper or "FLOA" in upper or "DOUB" in upper:
        return "REAL"
    return "NUMERIC"
