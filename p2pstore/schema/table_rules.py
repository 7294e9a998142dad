"""Layer 2 of sync_schema.json validation: one table entry against the live table.

Why these rules: a single_version table merges rows from every device into
one table, so a row must be identified the same way everywhere (one UNIQUE
conflict column that travels), a received row must be insertable (every
UNIQUE or NOT NULL-without-default column travels), and locally-assigned
keys must never travel (they collide across devices).

Each rule is one function registered with :func:`~p2pstore.schema.rules.rule`;
:func:`check_table` reads the entry once into :class:`TableFacts` and runs
them in the order they are written here. Invariants:

- One problem gives one error: where two rules would report the same
  mistake, the more specific one reports it and the other says so in its
  guard (a conflict column that is not synced is also a UNIQUE column that
  is not synced).
- ``live=True`` rules need the live table; without one (document-only mode:
  ``schema validate FILE`` with no store) only the others run, the
  auto-increment rules then reading the fields' own ``autoIncrement`` claims.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from p2pstore.schema.entry import conflict_column, field_index, fields, sync_columns, sync_list
from p2pstore.schema.rules import Finding, SchemaIssue, declare, rule, run, show
from p2pstore.schema.table_shape import TYPE_AFFINITIES, ColumnShape, TableShape

LAYER = "layer 2"


@dataclass(frozen=True, slots=True)
class TableFacts:
    """One table entry (at JSON pointer ``path``, passed layer 1) and its live
    table, with what several rules read worked out once."""

    entry: Mapping[str, Any]
    shape: TableShape | None
    path: str
    #: The table's name, quoted for messages.
    t: str
    fields: list[tuple[int, Mapping[str, Any]]]
    #: Described column → index of its first field.
    described: Mapping[str, int]
    sync: list[Any] | None
    synced: frozenset[str]
    sync_path: str
    #: The live table's primary key; () without a live table.
    pk: tuple[str, ...]
    #: ``(field index, column)`` of every field marked ``"primaryKey": true``.
    marked: list[tuple[int, str]]
    conflict: str | None
    first_sync_index: Mapping[str, int]
    #: The key the device assigns itself, if any (see :func:`_auto_key`).
    auto_key: str | None

    @classmethod
    def of(cls, entry: Mapping[str, Any], shape: TableShape | None, path: str) -> TableFacts:
        described_fields = fields(entry)
        described = {f["columnName"]: k for k, f in reversed(described_fields)}
        sync = sync_list(entry)
        marked = [(k, f["columnName"]) for k, f in described_fields if f.get("primaryKey") is True]
        first_sync_index: dict[str, int] = {}
        for j, col_name in enumerate(sync or []):
            if isinstance(col_name, str):
                first_sync_index.setdefault(col_name, j)
        pk = shape.primary_key if shape is not None else ()
        return cls(
            entry=entry,
            shape=shape,
            path=path,
            t=show(entry.get("tableName")),
            fields=described_fields,
            described=described,
            sync=sync,
            synced=frozenset(sync_columns(entry)),
            sync_path=f"{path}/deviceSyncFields",
            pk=pk,
            marked=marked,
            conflict=marked[0][1] if len(marked) == 1 else None,
            first_sync_index=first_sync_index,
            auto_key=_auto_key(entry, shape, pk, described, described_fields),
        )

    @property
    def has_sync(self) -> bool:
        return bool(self.sync)

    @property
    def conflict_col(self) -> ColumnShape | None:
        """The conflict column in the live table, if both exist."""
        if self.shape is None or self.conflict is None:
            return None
        return self.shape.column(self.conflict)

    def items(self, each: str | None) -> Iterable[Sequence[Any]]:
        """What a rule with this ``each`` is called with, after the facts."""
        if each is None:
            return [()]
        if each == "field":
            return self.fields
        if each == "sync":
            return [(j, c) for j, c in enumerate(self.sync or []) if isinstance(c, str)]
        if each == "column":
            return [(c,) for c in self.shape.columns] if self.shape is not None else []
        raise ValueError(f"unknown rule item {each!r}")


def _auto_key(
    entry: Mapping[str, Any],
    shape: TableShape | None,
    pk: tuple[str, ...],
    described: Mapping[str, int],
    described_fields: list[tuple[int, Mapping[str, Any]]],
) -> str | None:
    """Which key does the device assign itself? With a live table: its
    AUTOINCREMENT key, or a plain INTEGER PRIMARY KEY the fields declare
    autoIncrement (SQLite assigns those too). Without one: the fields' claim."""
    if shape is None:
        return next((f["columnName"] for _, f in described_fields if f.get("autoIncrement") is True), None)
    if len(pk) != 1:
        return None
    col = shape.column(pk[0])
    k = described.get(pk[0])
    claims = k is not None and entry["fields"][k].get("autoIncrement") is True
    if col is not None and (col.autoincrement or (shape.rowid_alias == col.name and claims)):
        return col.name
    return None


def check_table(
    entry: Mapping[str, Any], shape: TableShape | None, path: str
) -> tuple[list[SchemaIssue], list[SchemaIssue]]:
    """Layer 2 for one table entry (at JSON pointer ``path``); returns
    ``(errors, warnings)``.

    ``entry`` must have passed layer 1. With ``shape=None`` only the rules
    that need nothing but the document run (conflict-column count, sync
    fields present, conflict column synced, the auto-increment rules taken
    from the fields' own ``autoIncrement`` claims), which is what a schema
    file can be checked for before the table exists.
    """
    facts = TableFacts.of(entry, shape, path)
    return run(LAYER, facts, facts.items, live=shape is not None)


# --------------------------------------------------------------------------
# The fields describe the table: every described column exists, with the
# same type affinity and the same auto-increment property.


@rule("field-not-in-table", LAYER, each="field", live=True)
def field_not_in_table(t: TableFacts, k: int, fld: Mapping[str, Any]) -> Iterator[Finding]:
    name = fld["columnName"]
    assert t.shape is not None
    if t.shape.column(name) is None:
        yield f"{t.path}/fields/{k}/columnName", (
            f"Field {show(name)} is not a column of table {t.t}{_case_hint(t.shape, name)}."
        )


@rule("field-type-mismatch", LAYER, each="field", live=True)
def field_type_mismatch(t: TableFacts, k: int, fld: Mapping[str, Any]) -> Iterator[Finding]:
    assert t.shape is not None
    name, ftype = fld["columnName"], fld.get("type")
    col = t.shape.column(name)  # None: field-not-in-table says so
    if col is None or not isinstance(ftype, str):
        return
    if col.affinity != "ANY" and col.affinity not in TYPE_AFFINITIES.get(ftype, ()):
        yield f"{t.path}/fields/{k}/type", (
            f"Column {show(name)} of table {t.t} is declared {show(col.declared_type)} "
            f"({col.affinity} affinity) but its schema type is {show(ftype)}; "
            f"use {_suggest_type(col.affinity)}."
        )


@rule("field-autoincrement-mismatch", LAYER, each="field", live=True)
def field_autoincrement_mismatch(t: TableFacts, k: int, fld: Mapping[str, Any]) -> Iterator[Finding]:
    assert t.shape is not None
    name = fld["columnName"]
    col = t.shape.column(name)  # None: field-not-in-table says so
    if col is None:
        return
    claims_auto = fld.get("autoIncrement") is True
    fpath = f"{t.path}/fields/{k}"
    auto_path = f"{fpath}/autoIncrement" if "autoIncrement" in fld else fpath
    if claims_auto and t.shape.rowid_alias != name:
        yield auto_path, (
            f"Column {show(name)} of table {t.t} is not an INTEGER PRIMARY KEY, so its autoIncrement must be false."
        )
    elif col.autoincrement and not claims_auto:
        yield auto_path, (
            f"Column {show(name)} of table {t.t} is INTEGER PRIMARY KEY AUTOINCREMENT, "
            f"so its autoIncrement must be true."
        )


# --------------------------------------------------------------------------
# The live table's primary key.


@rule("table-without-primary-key", LAYER, live=True)
def table_without_primary_key(t: TableFacts) -> Iterator[Finding]:
    if not t.pk:
        yield t.path, (
            f"Table {t.t} has no PRIMARY KEY; single_version sync needs one "
            f"(a rowid-only table can't be synced by column)."
        )


@rule("composite-primary-key", LAYER, live=True)
def composite_primary_key(t: TableFacts) -> Iterator[Finding]:
    if len(t.pk) > 1:
        yield t.path, (
            f"Table {t.t} has the composite primary key ({', '.join(t.pk)}), which distributed tables don't support."
        )


# --------------------------------------------------------------------------
# Exactly one conflict column.


@rule("conflict-column-missing", LAYER)
def conflict_column_missing(t: TableFacts) -> Iterator[Finding]:
    if not t.marked:
        yield f"{t.path}/fields", (
            f"Table {t.t} has no conflict column; mark exactly one field with \"primaryKey\": true."
        )


@rule("conflict-column-multiple", LAYER)
def conflict_column_multiple(t: TableFacts) -> Iterator[Finding]:
    for k, name in t.marked[1:]:
        yield f"{t.path}/fields/{k}/primaryKey", (
            f"Table {t.t} already has the conflict column {show(t.marked[0][1])}, so {show(name)} "
            f"can't be one too; only one field may have \"primaryKey\": true."
        )


# --------------------------------------------------------------------------
# deviceSyncFields: present, non-empty, and every entry a real column.


@rule("sync-fields-missing", LAYER)
def sync_fields_missing(t: TableFacts) -> Iterator[Finding]:
    if t.sync is None:
        yield t.path, f"Table {t.t} has no deviceSyncFields; list the columns to sync (at least one)."


@rule("sync-fields-empty", LAYER)
def sync_fields_empty(t: TableFacts) -> Iterator[Finding]:
    if t.sync is not None and not t.sync:
        yield t.sync_path, f"deviceSyncFields of table {t.t} is empty; list at least one column."


@rule("sync-column-not-in-table", LAYER, each="sync", live=True)
def sync_column_not_in_table(t: TableFacts, j: int, col_name: str) -> Iterator[Finding]:
    assert t.shape is not None
    if t.shape.column(col_name) is None:
        yield f"{t.sync_path}/{j}", (
            f"Sync column {show(col_name)} is not a column of table {t.t}{_case_hint(t.shape, col_name)}."
        )


@rule("sync-column-not-in-fields", LAYER, severity="warning", each="sync")
def sync_column_not_in_fields(t: TableFacts, j: int, col_name: str) -> Iterator[Finding]:
    if t.shape is not None and t.shape.column(col_name) is None:
        return  # sync-column-not-in-table says so
    if col_name not in t.described:
        yield f"{t.sync_path}/{j}", (
            f"Sync column {show(col_name)} of table {t.t} is not described in fields, so it will not be synced."
        )


# --------------------------------------------------------------------------
# Keys: a key the device assigns itself never travels and never identifies a
# row; any other key identifies the row everywhere.


@rule("autoincrement-key-synced", LAYER)
def autoincrement_key_synced(t: TableFacts) -> Iterator[Finding]:
    if t.auto_key is not None and t.auto_key in t.synced:
        yield f"{t.sync_path}/{t.first_sync_index.get(t.auto_key, 0)}", (
            f"Column {show(t.auto_key)} of table {t.t} is an auto-increment key, which each device "
            f"assigns itself, so it must not be synced; remove it from deviceSyncFields."
        )


@rule("autoincrement-key-is-conflict-column", LAYER)
def autoincrement_key_is_conflict_column(t: TableFacts) -> Iterator[Finding]:
    if t.auto_key is not None and t.conflict == t.auto_key:
        yield f"{t.path}/fields/{t.described[t.auto_key]}/primaryKey", (
            f"Column {show(t.auto_key)} of table {t.t} is an auto-increment key and can't be the conflict "
            f"column; mark a UNIQUE non-key column (e.g. a UUID) with \"primaryKey\": true instead."
        )


def _own_key(t: TableFacts) -> str | None:
    """The live table's single primary-key column when the device doesn't assign it."""
    return t.pk[0] if t.auto_key is None and len(t.pk) == 1 else None


@rule("primary-key-not-conflict-column", LAYER, live=True)
def primary_key_not_conflict_column(t: TableFacts) -> Iterator[Finding]:
    key = _own_key(t)
    if key is not None and t.conflict is not None and t.conflict != key:
        k = t.described.get(key)
        yield f"{t.path}/fields/{k}/primaryKey" if k is not None else f"{t.path}/fields", (
            f"Table {t.t} has the non-auto-increment primary key {show(key)}, so {show(key)} "
            f"must be the conflict column, not {show(t.conflict)}."
        )


@rule("primary-key-not-synced", LAYER, live=True)
def primary_key_not_synced(t: TableFacts) -> Iterator[Finding]:
    key = _own_key(t)
    # A key that is also the conflict column is conflict-column-not-synced's.
    if key is not None and t.has_sync and key not in t.synced and key != t.conflict:
        yield t.sync_path, (
            f"Primary key {show(key)} of table {t.t} must be synced (it identifies the row on every "
            f"device); add it to deviceSyncFields and fields."
        )


# --------------------------------------------------------------------------
# The conflict column identifies a row on every device.


def _identifying_conflict(t: TableFacts) -> str | None:
    """The conflict column, unless it is the auto-increment key (reported
    above) or isn't in the live table (field-not-in-table)."""
    if t.conflict is None or t.conflict == t.auto_key:
        return None
    if t.shape is not None and t.conflict_col is None:
        return None
    return t.conflict


@rule("conflict-column-not-synced", LAYER)
def conflict_column_not_synced(t: TableFacts) -> Iterator[Finding]:
    conflict = _identifying_conflict(t)
    if conflict is not None and t.has_sync and conflict not in t.synced:
        yield t.sync_path, (
            f"Conflict column {show(conflict)} of table {t.t} must itself be synced; add it to deviceSyncFields."
        )


@rule("conflict-column-not-unique", LAYER, live=True)
def conflict_column_not_unique(t: TableFacts) -> Iterator[Finding]:
    conflict, col = _identifying_conflict(t), t.conflict_col
    if conflict is not None and col is not None and not col.unique:
        yield f"{t.path}/fields/{t.described[conflict]}/primaryKey", (
            f"Conflict column {show(conflict)} of table {t.t} is not UNIQUE in the table; give it a "
            f"UNIQUE constraint (a globally unique value such as a UUID) or pick another column."
        )


# --------------------------------------------------------------------------
# A received row must be insertable: UNIQUE columns and NOT NULL columns
# without a default travel. Key and conflict columns are covered above.


def _must_travel(t: TableFacts, col: ColumnShape) -> bool:
    """A column not covered by the key and conflict rules, in a table that syncs something."""
    return t.has_sync and not (col.name in t.synced or col.pk_index or col.name == t.conflict)


@rule("unique-column-not-synced", LAYER, each="column", live=True)
def unique_column_not_synced(t: TableFacts, col: ColumnShape) -> Iterator[Finding]:
    if _must_travel(t, col) and col.unique:
        yield t.sync_path, (
            f"Column {show(col.name)} of table {t.t} is UNIQUE, so it must be synced; add it to "
            f"deviceSyncFields and fields."
        )


@rule("not-null-column-not-synced", LAYER, each="column", live=True)
def not_null_column_not_synced(t: TableFacts, col: ColumnShape) -> Iterator[Finding]:
    # A UNIQUE column is unique-column-not-synced's.
    if _must_travel(t, col) and not col.unique and col.not_null and not col.has_default:
        yield t.sync_path, (
            f"Column {show(col.name)} of table {t.t} is NOT NULL without a default, so it must be "
            f"synced; add it to deviceSyncFields and fields, or give it a DEFAULT."
        )


# --------------------------------------------------------------------------
# Live data: the store counts the rows, the rule's wording lives here.

declare("conflict-column-has-nulls", LAYER, note="live data: the store counts the rows")


def conflict_column_nulls(entry: Mapping[str, Any], path: str, nulls: int) -> SchemaIssue | None:
    """Layer 2 on live data: ``nulls`` rows of the table hold NULL in the
    conflict column of table entry ``entry`` (at ``path``). The store counts
    them (this module reads no data); the issue is built here so the rule's
    name, path and wording live beside the other rules.

    Why: the conflict column identifies a row on every device, and NULL
    identifies nothing (UNIQUE lets any number of rows hold it), so the seed
    makes setting the distributed table fail while such rows exist.
    """
    column = conflict_column(entry)
    if column is None or nulls <= 0:
        return None
    k = field_index(entry, column)
    return SchemaIssue(
        f"{path}/fields/{k}/primaryKey",
        "conflict-column-has-nulls",
        f"Conflict column {show(column)} of table {show(entry.get('tableName'))} holds NULL in {nulls} "
        f"row{'s' if nulls != 1 else ''}; give {'them' if nulls != 1 else 'it'} a value (e.g. a UUID) or delete "
        f"{'them' if nulls != 1 else 'it'} first.",
    )


def _case_hint(shape: TableShape, name: str) -> str:
    for col in shape.columns:
        if col.name.lower() == name.lower() and col.name != name:
            return f" (names are case-sensitive: the table has {show(col.name)})"
    return ""


def _suggest_type(affinity: str) -> str:
    return {
        "TEXT": "'Text'",
        "INTEGER": "'Integer' or 'Long'",
        "REAL": "'Float' or 'Double'",
        "BLOB": "'Blob'",
    }.get(affinity, "a numeric type")
