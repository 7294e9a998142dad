"""Validation of sync_schema.json (SPEC §6), in three layers.

1. **Shape** (:func:`check_shape`): the JSON Schema
   ``p2pstore/schemas/sync_schema.schema.json`` plus the duplicate checks a JSON
   Schema can't express (two entries for one database, table, column or
   sync column).
2. **Against the live table** (:func:`check_table`): one table entry against
   the :class:`TableShape` read from SQLite (``p2pstore.schema.shape``).
3. **Against the previously accepted version** (:func:`check_upgrade`).

Invariants:

- Pure: no sqlite3, no asyncio, no file I/O except loading the packaged JSON
  Schema once. The caller reads the live tables (``shape.read_table_shape``)
  and hands them in, so every rule is testable with plain data.
- :func:`validate` never raises, whatever the document: hostile or broken
  JSON values give a report with errors, never an exception. Layers 2 and 3
  only run on documents that passed layer 1, so they may index freely.
- Every issue names a stable kebab-case ``rule``, a JSON pointer ``path`` to
  the most precise node that is wrong (or where the missing thing belongs)
  and a one-sentence message naming the table and column. docs/sync_schema.md
  lists every rule; a test checks that the two agree.
- One problem gives one error: where two rules would report the same mistake
  (a conflict column that is not synced is also a UNIQUE column that is not
  synced), only the more specific rule reports it.
- Names are case-sensitive everywhere, as in the seed's "NAMe" example: a
  table, column or sync column must match the live table byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator

from p2pstore.errors import SchemaInvalid
from p2pstore.schemas import load_json_schema

#: The layer-1 JSON Schema's file name in the package's schemas/.
SCHEMA_NAME = "sync_schema.schema.json"

#: A sync_schema.json larger than this is refused unread: real files are a
#: few kilobytes, and the daemon re-reads the file on SIGHUP.
MAX_DOCUMENT_BYTES = 1024 * 1024

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

#: Every rule name this module can report, with its layer and severity.
#: docs/sync_schema.md documents each one (tests/schema checks that).
RULES: Mapping[str, str] = {
    # layer 1: shape
    "invalid-json": "layer 1 error (raised by parse_document as SchemaInvalid; reported by validate_document)",
    "unknown-key": "layer 1 error",
    "missing-key": "layer 1 error",
    "wrong-type": "layer 1 error",
    "empty-value": "layer 1 error",
    "unknown-field-type": "layer 1 error",
    "negative-version": "layer 1 error",
    "db-name-extension": "layer 1 error",
    "shape": "layer 1 error",
    "duplicate-db": "layer 1 error",
    "duplicate-table": "layer 1 error",
    "duplicate-column": "layer 1 error",
    "duplicate-sync-column": "layer 1 error",
    # selection (validate)
    "db-not-in-schema": "selection error",
    "table-not-in-schema": "selection error",
    "table-not-found": "selection error",
    "previous-invalid": "selection error",
    # layer 2: against the live table
    "field-not-in-table": "layer 2 error",
    "field-type-mismatch": "layer 2 error",
    "field-autoincrement-mismatch": "layer 2 error",
    "table-without-primary-key": "layer 2 error",
    "composite-primary-key": "layer 2 error",
    "conflict-column-missing": "layer 2 error",
    "conflict-column-multiple": "layer 2 error",
    "sync-fields-missing": "layer 2 error",
    "sync-fields-empty": "layer 2 error",
    "sync-column-not-in-table": "layer 2 error",
    "sync-column-not-in-fields": "layer 2 warning",
    "autoincrement-key-synced": "layer 2 error",
    "autoincrement-key-is-conflict-column": "layer 2 error",
    "primary-key-not-conflict-column": "layer 2 error",
    "primary-key-not-synced": "layer 2 error",
    "conflict-column-not-synced": "layer 2 error",
    "conflict-column-not-unique": "layer 2 error",
    "unique-column-not-synced": "layer 2 error",
    "not-null-column-not-synced": "layer 2 error",
    "conflict-column-has-nulls": "layer 2 error (live data: the store counts the rows)",
    # layer 3: against the previously accepted version
    "version-not-increased": "layer 3 error",
    "conflict-column-changed": "layer 3 error",
    "sync-column-removed": "layer 3 error",
}


# --------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class SchemaIssue:
    """One problem found in a sync_schema.json document.

    ``path`` is a JSON pointer (RFC 6901) into the document so an editor or a
    user can go straight to the node; ``rule`` is stable so scripts and tests
    can match on it while ``message`` stays free to improve.
    """

    path: str
    rule: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "rule": self.rule, "message": self.message}


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """The outcome of :func:`validate`: errors block the schema, warnings don't.

    ``added_sync_columns`` (layer 3) maps a table to the sync columns the new
    version adds, so the store can mark existing rows to be sent again; it is
    not part of :meth:`to_dict` because the API result is
    ``{valid, errors, warnings}``.
    """

    errors: tuple[SchemaIssue, ...]
    warnings: tuple[SchemaIssue, ...] = ()
    added_sync_columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False, hash=False)

    @property
    def valid(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "errors": [issue.to_dict() for issue in self.errors],
            "warnings": [issue.to_dict() for issue in self.warnings],
        }

    def raise_if_invalid(self) -> None:
        """Raise ``SchemaInvalid`` carrying the whole report, for callers that
        must refuse the schema (``set_distributed_tables``, SIGHUP reload)."""
        if self.valid:
            return
        first = self.errors[0]
        more = len(self.errors) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise SchemaInvalid(
            f"sync_schema.json is invalid: {first.message}{suffix}",
            data={"errors": [e.to_dict() for e in self.errors], "warnings": [w.to_dict() for w in self.warnings]},
        )


# --------------------------------------------------------------------------
# The live table, as data


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


# --------------------------------------------------------------------------
# Layer 1: shape


def _is_strict_integer(checker: Any, instance: Any) -> bool:
    # JSON Schema counts 1.0 as an integer; a version or any integer here is
    # compared and stored as an int, so only real ints pass.
    return isinstance(instance, int) and not isinstance(instance, bool)


_STRICT_VALIDATOR = jsonschema.validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer),
)
_CACHE: dict[str, Any] = {}


def json_schema() -> dict[str, Any]:
    """The layer-1 JSON Schema, loaded once."""
    if "schema" not in _CACHE:
        _CACHE["schema"] = load_json_schema(SCHEMA_NAME)
    return _CACHE["schema"]


def _document_validator() -> Any:
    if "doc" not in _CACHE:
        _CACHE["doc"] = _STRICT_VALIDATOR(json_schema())
    return _CACHE["doc"]


def _entry_validator() -> Any:
    """Checks one db entry (the ``previous`` argument) with the same rules."""
    if "entry" not in _CACHE:
        schema = json_schema()
        _CACHE["entry"] = _STRICT_VALIDATOR(
            {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": "#/$defs/db"}
        )
    return _CACHE["entry"]


def parse_document(text: str | bytes) -> object:
    """Decode sync_schema.json text into JSON values.

    Raises ``SchemaInvalid`` (rule ``invalid-json``) naming the line and
    column on bad JSON, so a user can fix the file without a JSON linter.
    Beyond plain ``json.loads`` it refuses NaN/Infinity (not JSON), duplicate
    keys (json.loads would silently keep the last one), integers outside
    SQLite's 64 bits (with the JSON pointer of the first) and oversized input.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise _invalid_json(f"the file is larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise _invalid_json(f"it is not UTF-8 (bad byte at offset {exc.start})") from exc
    elif isinstance(text, str):
        text = text.removeprefix("\ufeff")
        if len(text) > MAX_DOCUMENT_BYTES:
            raise _invalid_json(f"the file is larger than {MAX_DOCUMENT_BYTES} bytes")
    else:
        raise _invalid_json(f"expected text, got {type(text).__name__}")
    try:
        doc = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys,
                         parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise SchemaInvalid(
            f"sync_schema.json is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.",
            data={"rule": "invalid-json", "line": exc.lineno, "column": exc.colno},
        ) from exc
    except _BadJson as exc:
        raise _invalid_json(str(exc)) from exc
    except RecursionError as exc:
        raise _invalid_json("it is nested too deeply") from exc
    where = _find_huge_int(doc)
    if where is not None:
        raise SchemaInvalid(
            f"sync_schema.json is not valid JSON: the integer at {where or '/'} is outside the 64-bit range.",
            data={"rule": "invalid-json", "path": where},
        )
    return doc


#: SQLite's INTEGER range: no bigger integer can be bound or stored, so no
#: JSON a store takes (this file, API params) may hold one.
SQLITE_INT_MIN, SQLITE_INT_MAX = -(1 << 63), (1 << 63) - 1


class _BadJson(ValueError):
    pass


class _HugeInt:
    """Stands in for an integer literal outside SQLite's range (even one
    with more digits than Python converts), until its place is reported."""

    __slots__ = ()


def _parse_int(digits: str) -> int | _HugeInt:
    if len(digits) > 20:  # past any 64-bit value, and maybe past int()'s digit limit
        return _HugeInt()
    value = int(digits)
    return value if SQLITE_INT_MIN <= value <= SQLITE_INT_MAX else _HugeInt()


def _find_huge_int(doc: object) -> str | None:
    """JSON pointer of the first _HugeInt in ``doc`` (iterative: any depth json.loads took)."""
    stack: list[tuple[object, tuple[Any, ...]]] = [(doc, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _HugeInt):
            return pointer(path)
        if isinstance(value, dict):
            stack.extend((v, (*path, k)) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, (*path, i)) for i, v in reversed(list(enumerate(value))))
    return None


def _reject_constant(name: str) -> Any:
    raise _BadJson(f"{name} is not a JSON value")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _BadJson(f"the key {key!r} appears twice in one object")
        result[key] = value
    return result


def _invalid_json(reason: str) -> SchemaInvalid:
    return SchemaInvalid(f"sync_schema.json is not valid JSON: {reason}.", data={"rule": "invalid-json"})


def check_shape(doc: object) -> list[SchemaIssue]:
    """Layer 1: the JSON Schema, then duplicates it can't express.

    Every jsonschema error becomes an issue with a specific rule where one
    fits, so a user sees "unknown key 'primarykey' in field 'NAME'" rather
    than a validator dump. Duplicates are looked for even in documents that
    fail the JSON Schema, so one run shows as many problems as possible.
    """
    issues: list[SchemaIssue] = []
    errors = sorted(_document_validator().iter_errors(doc), key=lambda e: _sort_key(e.absolute_path))
    for err in errors:
        issues.extend(_issues_from_error(doc, err))
    issues.extend(_duplicates(doc))
    return _dedupe(issues)


_TYPE_WORDS = {
    "object": "an object",
    "array": "an array",
    "string": "a string",
    "integer": "an integer",
    "boolean": "true or false",
    "number": "a number",
    "null": "null",
}


def _issues_from_error(doc: object, err: Any) -> list[SchemaIssue]:
    parts = list(err.absolute_path)
    path = pointer(parts)
    where = _where(doc, parts)
    kind = err.validator
    if kind == "additionalProperties" and isinstance(err.instance, dict):
        allowed = list(err.schema.get("properties", {}))
        return [
            SchemaIssue(
                pointer([*parts, key]),
                "unknown-key",
                f"Unknown key {_show(key)} in {where}; allowed keys are {', '.join(allowed)}.",
            )
            for key in err.instance
            if key not in allowed
        ]
    if kind == "required" and isinstance(err.instance, dict):
        return [
            SchemaIssue(path, "missing-key", f"{_cap(where)} lacks the required key {_show(key)}.")
            for key in err.validator_value
            if key not in err.instance
        ]
    if kind == "type":
        expected = _TYPE_WORDS.get(str(err.validator_value), str(err.validator_value))
        return [SchemaIssue(path, "wrong-type", f"{_cap(where)} must be {expected}, not {_json_type(err.instance)}.")]
    if kind in ("minItems", "minLength"):
        return [SchemaIssue(path, "empty-value", f"{_cap(where)} must not be empty.")]
    if kind == "enum":
        return [
            SchemaIssue(
                path,
                "unknown-field-type",
                f"{_cap(where)} is {_show(err.instance)}, which is not one of {', '.join(FIELD_TYPES)}.",
            )
        ]
    if kind == "minimum":
        return [SchemaIssue(path, "negative-version", f"{_cap(where)} must be 0 or more, not {_show(err.instance)}.")]
    if kind == "pattern" and parts and parts[-1] == "dbName" and isinstance(err.instance, str):
        return [
            SchemaIssue(
                path,
                "db-name-extension",
                f"dbName {_show(err.instance)} must not end in '.db': give the store name without "
                f"the file extension ({_show(err.instance[:-3])}).",
            )
        ]
    return [SchemaIssue(path, "shape", f"{_cap(where)}: {err.message}.")]


def _duplicates(doc: object) -> Iterator[SchemaIssue]:
    """Duplicates a JSON Schema can't see. Written defensively: it also runs
    on documents that failed the JSON Schema, and skips what isn't shaped."""
    dbs = doc.get("dbSchema") if isinstance(doc, dict) else None
    if not isinstance(dbs, list):
        return
    seen_dbs: dict[tuple[str, str], int] = {}
    for i, db in enumerate(dbs):
        if not isinstance(db, dict):
            continue
        bundle, name = db.get("bundleName"), db.get("dbName")
        if isinstance(bundle, str) and isinstance(name, str):
            if (bundle, name) in seen_dbs:
                yield SchemaIssue(
                    f"/dbSchema/{i}",
                    "duplicate-db",
                    f"Database {_show(name)} of bundle {_show(bundle)} has two entries in dbSchema "
                    f"(#{seen_dbs[(bundle, name)]} and #{i}); keep one.",
                )
            else:
                seen_dbs[(bundle, name)] = i
        tables = db.get("tables")
        if not isinstance(tables, list):
            continue
        seen_tables: set[str] = set()
        for j, table in enumerate(tables):
            if not isinstance(table, dict):
                continue
            tpath = f"/dbSchema/{i}/tables/{j}"
            tname = table.get("tableName")
            if isinstance(tname, str):
                if tname in seen_tables:
                    yield SchemaIssue(
                        f"{tpath}/tableName",
                        "duplicate-table",
                        f"Table {_show(tname)} appears twice in database {_show(name)}; keep one entry.",
                    )
                seen_tables.add(tname)
            fields = table.get("fields")
            if isinstance(fields, list):
                seen_cols: set[str] = set()
                for k, fld in enumerate(fields):
                    col = fld.get("columnName") if isinstance(fld, dict) else None
                    if isinstance(col, str):
                        if col in seen_cols:
                            yield SchemaIssue(
                                f"{tpath}/fields/{k}/columnName",
                                "duplicate-column",
                                f"Column {_show(col)} is described twice in the fields of table {_show(tname)}.",
                            )
                        seen_cols.add(col)
            sync = table.get("deviceSyncFields")
            if isinstance(sync, list):
                seen_sync: set[str] = set()
                for k, col in enumerate(sync):
                    if isinstance(col, str):
                        if col in seen_sync:
                            yield SchemaIssue(
                                f"{tpath}/deviceSyncFields/{k}",
                                "duplicate-sync-column",
                                f"Sync column {_show(col)} is listed twice in deviceSyncFields of table {_show(tname)}.",
                            )
                        seen_sync.add(col)


# --------------------------------------------------------------------------
# Helpers on shape-valid entries (callers pass entries that passed layer 1)


def find_db_entry(doc: dict[str, Any], bundle: str, db_name: str) -> tuple[int, dict[str, Any]] | None:
    """The entry of ``dbSchema`` for store ``(bundle, db_name)`` and its index."""
    dbs = doc.get("dbSchema") if isinstance(doc, dict) else None
    if not isinstance(dbs, list):
        return None
    for i, db in enumerate(dbs):
        if isinstance(db, dict) and db.get("bundleName") == bundle and db.get("dbName") == db_name:
            return i, db
    return None


def _fields(entry: Mapping[str, Any]) -> list[tuple[int, Mapping[str, Any]]]:
    fields = entry.get("fields")
    if not isinstance(fields, list):
        return []
    return [(k, f) for k, f in enumerate(fields) if isinstance(f, dict) and isinstance(f.get("columnName"), str)]


def _field_index(entry: Mapping[str, Any], column: str) -> int | None:
    for k, fld in _fields(entry):
        if fld["columnName"] == column:
            return k
    return None


def _sync_list(entry: Mapping[str, Any]) -> list[Any] | None:
    sync = entry.get("deviceSyncFields")
    return sync if isinstance(sync, list) else None


def sync_columns(entry: Mapping[str, Any]) -> list[str]:
    """The columns that actually travel: deviceSyncFields entries that are
    also described in ``fields`` (the seed: a sync column missing from fields
    is not synced). In deviceSyncFields order, without repeats."""
    described = {f["columnName"] for _, f in _fields(entry)}
    result: list[str] = []
    for col in _sync_list(entry) or []:
        if isinstance(col, str) and col in described and col not in result:
            result.append(col)
    return result


def conflict_column(entry: Mapping[str, Any]) -> str | None:
    """The conflict-resolution column (the one field with
    ``"primaryKey": true``), or None when there are zero or several."""
    marked = [f["columnName"] for _, f in _fields(entry) if f.get("primaryKey") is True]
    return marked[0] if len(marked) == 1 else None


# --------------------------------------------------------------------------
# Layer 2: one table entry against the live table


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

    Why these rules: a single_version table merges rows from every device
    into one table, so a row must be identified the same way everywhere (one
    UNIQUE conflict column that travels), a received row must be insertable
    (every UNIQUE or NOT NULL-without-default column travels), and
    locally-assigned keys must never travel (they collide across devices).
    """
    errors: list[SchemaIssue] = []
    warnings: list[SchemaIssue] = []
    table = entry.get("tableName")
    fields = _fields(entry)
    described = {f["columnName"]: k for k, f in reversed(fields)}
    sync = _sync_list(entry)
    synced = set(sync_columns(entry))
    has_sync = bool(sync)
    sync_path = f"{path}/deviceSyncFields"
    t = _show(table)

    # The fields describe the table: every described column exists, with the
    # same type affinity and the same auto-increment property.
    if shape is not None:
        for k, fld in fields:
            name = fld["columnName"]
            col = shape.column(name)
            fpath = f"{path}/fields/{k}"
            if col is None:
                errors.append(
                    SchemaIssue(
                        f"{fpath}/columnName",
                        "field-not-in-table",
                        f"Field {_show(name)} is not a column of table {t}{_case_hint(shape, name)}.",
                    )
                )
                continue
            ftype = fld.get("type")
            if isinstance(ftype, str) and col.affinity != "ANY" and col.affinity not in TYPE_AFFINITIES.get(ftype, ()):
                errors.append(
                    SchemaIssue(
                        f"{fpath}/type",
                        "field-type-mismatch",
                        f"Column {_show(name)} of table {t} is declared {_show(col.declared_type)} "
                        f"({col.affinity} affinity) but its schema type is {_show(ftype)}; "
                        f"use {_suggest_type(col.affinity)}.",
                    )
                )
            claims_auto = fld.get("autoIncrement") is True
            auto_path = f"{fpath}/autoIncrement" if "autoIncrement" in fld else fpath
            if claims_auto and shape.rowid_alias != name:
                errors.append(
                    SchemaIssue(
                        auto_path,
                        "field-autoincrement-mismatch",
                        f"Column {_show(name)} of table {t} is not an INTEGER PRIMARY KEY, "
                        f"so its autoIncrement must be false.",
                    )
                )
            elif col.autoincrement and not claims_auto:
                errors.append(
                    SchemaIssue(
                        auto_path,
                        "field-autoincrement-mismatch",
                        f"Column {_show(name)} of table {t} is INTEGER PRIMARY KEY AUTOINCREMENT, "
                        f"so its autoIncrement must be true.",
                    )
                )

    # Primary key of the live table.
    pk: tuple[str, ...] = ()
    if shape is not None:
        pk = shape.primary_key
        if not pk:
            errors.append(
                SchemaIssue(
                    path,
                    "table-without-primary-key",
                    f"Table {t} has no PRIMARY KEY; single_version sync needs one "
                    f"(a rowid-only table can't be synced by column).",
                )
            )
        elif len(pk) > 1:
            errors.append(
                SchemaIssue(
                    path,
                    "composite-primary-key",
                    f"Table {t} has the composite primary key ({', '.join(pk)}), which distributed tables don't support.",
                )
            )

    # Exactly one conflict column.
    marked = [(k, f["columnName"]) for k, f in fields if f.get("primaryKey") is True]
    if not marked:
        errors.append(
            SchemaIssue(
                f"{path}/fields",
                "conflict-column-missing",
                f"Table {t} has no conflict column; mark exactly one field with \"primaryKey\": true.",
            )
        )
    for k, name in marked[1:]:
        errors.append(
            SchemaIssue(
                f"{path}/fields/{k}/primaryKey",
                "conflict-column-multiple",
                f"Table {t} already has the conflict column {_show(marked[0][1])}, so {_show(name)} "
                f"can't be one too; only one field may have \"primaryKey\": true.",
            )
        )
    conflict = marked[0][1] if len(marked) == 1 else None

    # deviceSyncFields: present, non-empty, and every entry a real column.
    if sync is None:
        errors.append(
            SchemaIssue(
                path,
                "sync-fields-missing",
                f"Table {t} has no deviceSyncFields; list the columns to sync (at least one).",
            )
        )
    elif not sync:
        errors.append(
            SchemaIssue(sync_path, "sync-fields-empty", f"deviceSyncFields of table {t} is empty; list at least one column.")
        )
    first_sync_index: dict[str, int] = {}
    for j, col_name in enumerate(sync or []):
        if not isinstance(col_name, str):
            continue
        first_sync_index.setdefault(col_name, j)
        if shape is not None and shape.column(col_name) is None:
            errors.append(
                SchemaIssue(
                    f"{sync_path}/{j}",
                    "sync-column-not-in-table",
                    f"Sync column {_show(col_name)} is not a column of table {t}{_case_hint(shape, col_name)}.",
                )
            )
        elif col_name not in described:
            warnings.append(
                SchemaIssue(
                    f"{sync_path}/{j}",
                    "sync-column-not-in-fields",
                    f"Sync column {_show(col_name)} of table {t} is not described in fields, so it will not be synced.",
                )
            )

    # Which key does the device assign itself? With a live table: its
    # AUTOINCREMENT key, or a plain INTEGER PRIMARY KEY the fields declare
    # autoIncrement (SQLite assigns those too). Without one: the fields' claim.
    auto_key: str | None = None
    if shape is not None:
        if len(pk) == 1:
            col = shape.column(pk[0])
            k = described.get(pk[0])
            claims = k is not None and entry["fields"][k].get("autoIncrement") is True
            if col is not None and (col.autoincrement or (shape.rowid_alias == col.name and claims)):
                auto_key = col.name
    else:
        auto_key = next((f["columnName"] for _, f in fields if f.get("autoIncrement") is True), None)

    if auto_key is not None:
        if auto_key in synced:
            errors.append(
                SchemaIssue(
                    f"{sync_path}/{first_sync_index.get(auto_key, 0)}",
                    "autoincrement-key-synced",
                    f"Column {_show(auto_key)} of table {t} is an auto-increment key, which each device "
                    f"assigns itself, so it must not be synced; remove it from deviceSyncFields.",
                )
            )
        if conflict == auto_key:
            errors.append(
                SchemaIssue(
                    f"{path}/fields/{described[auto_key]}/primaryKey",
                    "autoincrement-key-is-conflict-column",
                    f"Column {_show(auto_key)} of table {t} is an auto-increment key and can't be the conflict "
                    f"column; mark a UNIQUE non-key column (e.g. a UUID) with \"primaryKey\": true instead.",
                )
            )
    elif shape is not None and len(pk) == 1:
        key = pk[0]
        if conflict is not None and conflict != key:
            k = described.get(key)
            errors.append(
                SchemaIssue(
                    f"{path}/fields/{k}/primaryKey" if k is not None else f"{path}/fields",
                    "primary-key-not-conflict-column",
                    f"Table {t} has the non-auto-increment primary key {_show(key)}, so {_show(key)} "
                    f"must be the conflict column, not {_show(conflict)}.",
                )
            )
        if has_sync and key not in synced and key != conflict:
            errors.append(
                SchemaIssue(
                    sync_path,
                    "primary-key-not-synced",
                    f"Primary key {_show(key)} of table {t} must be synced (it identifies the row on every "
                    f"device); add it to deviceSyncFields and fields.",
                )
            )

    # The conflict column identifies a row on every device.
    conflict_col = shape.column(conflict) if shape is not None and conflict is not None else None
    if conflict is not None and conflict != auto_key and (shape is None or conflict_col is not None):
        if has_sync and conflict not in synced:
            errors.append(
                SchemaIssue(
                    sync_path,
                    "conflict-column-not-synced",
                    f"Conflict column {_show(conflict)} of table {t} must itself be synced; add it to deviceSyncFields.",
                )
            )
        if conflict_col is not None and not conflict_col.unique:
            errors.append(
                SchemaIssue(
                    f"{path}/fields/{described[conflict]}/primaryKey",
                    "conflict-column-not-unique",
                    f"Conflict column {_show(conflict)} of table {t} is not UNIQUE in the table; give it a "
                    f"UNIQUE constraint (a globally unique value such as a UUID) or pick another column.",
                )
            )

    # A received row must be insertable: UNIQUE columns and NOT NULL columns
    # without a default travel. Key and conflict columns are covered above.
    if shape is not None and has_sync:
        for col in shape.columns:
            if col.name in synced or col.pk_index or col.name == conflict:
                continue
            if col.unique:
                errors.append(
                    SchemaIssue(
                        sync_path,
                        "unique-column-not-synced",
                        f"Column {_show(col.name)} of table {t} is UNIQUE, so it must be synced; add it to "
                        f"deviceSyncFields and fields.",
                    )
                )
            elif col.not_null and not col.has_default:
                errors.append(
                    SchemaIssue(
                        sync_path,
                        "not-null-column-not-synced",
                        f"Column {_show(col.name)} of table {t} is NOT NULL without a default, so it must be "
                        f"synced; add it to deviceSyncFields and fields, or give it a DEFAULT.",
                    )
                )
    return errors, warnings


def _case_hint(shape: TableShape, name: str) -> str:
    for col in shape.columns:
        if col.name.lower() == name.lower() and col.name != name:
            return f" (names are case-sensitive: the table has {_show(col.name)})"
    return ""


def _suggest_type(affinity: str) -> str:
    return {
        "TEXT": "'Text'",
        "INTEGER": "'Integer' or 'Long'",
        "REAL": "'Float' or 'Double'",
        "BLOB": "'Blob'",
    }.get(affinity, "a numeric type")


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
    k = _field_index(entry, column)
    return SchemaIssue(
        f"{path}/fields/{k}/primaryKey",
        "conflict-column-has-nulls",
        f"Conflict column {_show(column)} of table {_show(entry.get('tableName'))} holds NULL in {nulls} "
        f"row{'s' if nulls != 1 else ''}; give {'them' if nulls != 1 else 'it'} a value (e.g. a UUID) or delete "
        f"{'them' if nulls != 1 else 'it'} first.",
    )


# --------------------------------------------------------------------------
# Layer 3: against the previously accepted version


def _normalised(entry: Mapping[str, Any]) -> str:
    """A db entry as canonical JSON minus its version: defaults filled in,
    and order ignored where order means nothing (tables, fields, sync
    columns), so reformatting the file is not a change."""
    tables = []
    for table in entry.get("tables") or []:
        if not isinstance(table, dict):
            continue
        fields = sorted(
            (
                {
                    "columnName": f["columnName"],
                    "type": f.get("type"),
                    "primaryKey": f.get("primaryKey") is True,
                    "autoIncrement": f.get("autoIncrement") is True,
                    "notNull": f.get("notNull") is True,
                }
                for _, f in _fields(table)
            ),
            key=lambda f: f["columnName"],
        )
        sync = sorted(c for c in (_sync_list(table) or []) if isinstance(c, str))
        tables.append({"tableName": table.get("tableName"), "deviceSyncFields": sync, "fields": fields})
    tables.sort(key=lambda t: str(t["tableName"]))
    body = {"bundleName": entry.get("bundleName"), "dbName": entry.get("dbName"), "tables": tables}
    return json.dumps(body, sort_keys=True, ensure_ascii=False)


def check_upgrade(
    previous: Mapping[str, Any], current: Mapping[str, Any], path: str
) -> tuple[list[SchemaIssue], dict[str, list[str]]]:
    """Layer 3: the new db entry ``current`` (at ``path``) against the
    previously accepted one. Returns ``(errors, added)`` where ``added`` maps
    a table to the sync columns the new version adds (a table new in this
    version lists all its sync columns), so the store can send existing rows
    again.

    Why: peers compare versions to know which columns both sides sync; a
    change without a new version would go unnoticed. A changed conflict
    column would make the same row look like two rows across devices, and a
    removed sync column would leave peers with values that no longer move.
    """
    errors: list[SchemaIssue] = []
    added: dict[str, list[str]] = {}
    db = _show(current.get("dbName"))
    old_v, new_v = previous.get("version"), current.get("version")
    if isinstance(old_v, int) and isinstance(new_v, int):
        changed = _normalised(previous) != _normalised(current)
        if new_v < old_v or (changed and new_v == old_v):
            reason = "went down" if new_v < old_v else "changed"
            errors.append(
                SchemaIssue(
                    f"{path}/version",
                    "version-not-increased",
                    f"The schema of database {db} {reason} but its version is {new_v}; "
                    f"set a version higher than the accepted {old_v}.",
                )
            )

    current_tables = {
        t["tableName"]: j for j, t in reversed(list(enumerate(current.get("tables") or []))) if isinstance(t, dict)
    }
    previous_names: set[str] = set()
    for old in previous.get("tables") or []:
        if not isinstance(old, dict) or not isinstance(old.get("tableName"), str):
            continue
        name = old["tableName"]
        previous_names.add(name)
        old_sync = sync_columns(old)
        j = current_tables.get(name)
        if j is None:
            if old_sync:
                errors.append(
                    SchemaIssue(
                        f"{path}/tables",
                        "sync-column-removed",
                        f"Table {_show(name)} was removed from database {db}, which removes its sync columns "
                        f"{', '.join(old_sync)}; sync columns can only be added.",
                    )
                )
            continue
        new = current["tables"][j]
        tpath = f"{path}/tables/{j}"
        old_conflict, new_conflict = conflict_column(old), conflict_column(new)
        if old_conflict is not None and new_conflict != old_conflict:
            k = _field_index(new, new_conflict) if new_conflict is not None else None
            now = f"is now {_show(new_conflict)}" if new_conflict is not None else "is no longer set"
            errors.append(
                SchemaIssue(
                    f"{tpath}/fields/{k}/primaryKey" if k is not None else f"{tpath}/fields",
                    "conflict-column-changed",
                    f"The conflict column of table {_show(name)} was {_show(old_conflict)} and {now}; "
                    f"it can't change once accepted.",
                )
            )
        new_sync = sync_columns(new)
        sync_path = f"{tpath}/deviceSyncFields" if "deviceSyncFields" in new else tpath
        for col in old_sync:
            if col not in new_sync:
                errors.append(
                    SchemaIssue(
                        sync_path,
                        "sync-column-removed",
                        f"Sync column {_show(col)} of table {_show(name)} was removed; sync columns can only be added.",
                    )
                )
        more = [c for c in new_sync if c not in old_sync]
        if more:
            added[name] = more
    for name, j in current_tables.items():
        if name not in previous_names:
            cols = sync_columns(current["tables"][j])
            if cols:
                added[name] = cols
    return errors, added


# --------------------------------------------------------------------------
# All layers


def validate(
    doc: object,
    *,
    shapes: Mapping[str, TableShape | None] | None = None,
    previous: Mapping[str, Any] | None = None,
    bundle: str | None = None,
    db_name: str | None = None,
    tables: Iterable[str] | None = None,
    document_rules: bool = False,
) -> ValidationReport:
    """Run the layers that the arguments allow, and never raise.

    - Layer 1 always; if it fails, stop (later layers assume the shape).
    - ``bundle``/``db_name`` select db entries (either may be given; a given
      one that matches no entry is ``db-not-in-schema``). Without them every
      entry is checked.
    - ``tables`` limits layer 2 to those names; one without an entry in a
      selected db is ``table-not-in-schema``.
    - Layer 2 runs for each table that has a key in ``shapes``; a ``None``
      shape means the table does not exist (``table-not-found``). With
      ``document_rules=True``, tables without a shape still get the rules
      that need only the document (``check_table(entry, None, ...)``).
    - Layer 3 runs when ``previous`` (the previously accepted db entry) is
      given, against the entry with the same bundleName and dbName.
    """
    shape_issues = check_shape(doc)
    if shape_issues:
        return ValidationReport(tuple(shape_issues), ())
    assert isinstance(doc, dict)  # layer 1 guarantees it
    errors: list[SchemaIssue] = []
    warnings: list[SchemaIssue] = []
    added: dict[str, tuple[str, ...]] = {}
    dbs: list[dict[str, Any]] = doc["dbSchema"]

    selected = [
        (i, db)
        for i, db in enumerate(dbs)
        if (bundle is None or db["bundleName"] == bundle) and (db_name is None or db["dbName"] == db_name)
    ]
    if (bundle is not None or db_name is not None) and not selected:
        wanted = " ".join(
            part
            for part in (
                f"bundle {_show(bundle)}" if bundle is not None else "",
                f"database {_show(db_name)}" if db_name is not None else "",
            )
            if part
        )
        errors.append(SchemaIssue("/dbSchema", "db-not-in-schema", f"sync_schema.json has no entry for {wanted}."))

    requested: list[str] | None = None
    if tables is not None:
        requested = [tables] if isinstance(tables, str) else list(dict.fromkeys(t for t in tables if isinstance(t, str)))

    for i, db in selected:
        epath = f"/dbSchema/{i}"
        index = {t["tableName"]: j for j, t in reversed(list(enumerate(db["tables"])))}
        if requested is None:
            targets = list(range(len(db["tables"])))
        else:
            targets = []
            for name in requested:
                if name in index:
                    targets.append(index[name])
                else:
                    errors.append(
                        SchemaIssue(
                            f"{epath}/tables",
                            "table-not-in-schema",
                            f"Table {_show(name)} has no entry in database {_show(db['dbName'])} of sync_schema.json.",
                        )
                    )
        for j in targets:
            entry = db["tables"][j]
            tpath = f"{epath}/tables/{j}"
            name = entry["tableName"]
            if shapes is not None and name in shapes:
                shape = shapes[name]
                if shape is None:
                    errors.append(
                        SchemaIssue(
                            f"{tpath}/tableName",
                            "table-not-found",
                            f"Table {_show(name)} does not exist in database {_show(db['dbName'])} "
                            f"(table names are case-sensitive).",
                        )
                    )
                    continue
            elif document_rules:
                shape = None
            else:
                continue
            table_errors, table_warnings = check_table(entry, shape, tpath)
            errors.extend(table_errors)
            warnings.extend(table_warnings)

    if previous is not None:
        if not _entry_validator().is_valid(previous):
            errors.append(
                SchemaIssue(
                    "",
                    "previous-invalid",
                    "The previously accepted schema entry is not a valid dbSchema entry, so the upgrade can't be checked.",
                )
            )
        else:
            found = find_db_entry(doc, previous["bundleName"], previous["dbName"])
            if found is None:
                removed = [c for t in previous["tables"] for c in sync_columns(t)]
                if removed:
                    errors.append(
                        SchemaIssue(
                            "/dbSchema",
                            "sync-column-removed",
                            f"Database {_show(previous['dbName'])} of bundle {_show(previous['bundleName'])} is no "
                            f"longer in sync_schema.json, which removes all its sync columns; sync columns can only be added.",
                        )
                    )
            else:
                i, entry = found
                upgrade_errors, upgrade_added = check_upgrade(previous, entry, f"/dbSchema/{i}")
                errors.extend(upgrade_errors)
                added = {t: tuple(cols) for t, cols in upgrade_added.items()}

    return ValidationReport(tuple(_dedupe(errors)), tuple(_dedupe(warnings)), added)


def read_document(document: object) -> object:
    """The JSON values of a document given either as text (``str`` or
    ``bytes``: the file's content, parsed by :func:`parse_document`) or as
    already-decoded JSON values (anything else, taken as is).

    Raises ``SchemaInvalid`` (rule ``invalid-json``) for text that isn't JSON.
    """
    if isinstance(document, (str, bytes, bytearray, memoryview)):
        return parse_document(document)
    return document


def validate_document(document: object, **kwargs: Any) -> ValidationReport:
    """:func:`validate` for a document given as text or as JSON values (see
    :func:`read_document`), and never raises: text that isn't JSON gives a
    report with one ``invalid-json`` error at the document's root. Keyword
    arguments are :func:`validate`'s.

    Why one function: the API (``schema.validate``) and the offline CLI both
    take "the file's text or its value" and must answer alike.
    """
    try:
        doc = read_document(document)
    except SchemaInvalid as exc:
        return invalid_json_report(exc)
    return validate(doc, **kwargs)


def invalid_json_report(exc: SchemaInvalid) -> ValidationReport:
    """A report for the ``SchemaInvalid`` that :func:`parse_document` raised."""
    where = str(exc.data.get("path", ""))  # set when the place is known (an out-of-range integer)
    return ValidationReport((SchemaIssue(where, "invalid-json", exc.message),))


# --------------------------------------------------------------------------
# Small helpers


def pointer(parts: Sequence[Any]) -> str:
    """RFC 6901 JSON pointer for a path of keys and indexes."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _sort_key(parts: Iterable[Any]) -> tuple[tuple[int, Any], ...]:
    return tuple((0, p) if isinstance(p, int) else (1, str(p)) for p in parts)


def _dedupe(issues: Iterable[SchemaIssue]) -> list[SchemaIssue]:
    return list(dict.fromkeys(issues))


def _show(value: Any) -> str:
    """A value for a message: quoted, and short even for hostile input."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            text = repr(type(value).__name__)
    return text if len(text) <= 60 else text[:57] + "..."


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


_CONTAINERS = {"dbSchema": "database", "tables": "table", "fields": "field", "deviceSyncFields": "sync column"}
_NAME_KEYS = {"dbSchema": "dbName", "tables": "tableName", "fields": "columnName"}


def _where(doc: object, parts: Sequence[Any]) -> str:
    """Name the node at ``parts`` in words: "'type' of field 'AGE' in table
    'EMPLOYEE'", so a message is a sentence rather than a pointer."""
    if not parts:
        return "the document"
    entities: list[tuple[int, str]] = []
    node: Any = doc
    for n, part in enumerate(parts):
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
        parent_key = parts[n - 1] if n else None
        if isinstance(part, int) and parent_key in _CONTAINERS:
            kind = _CONTAINERS[parent_key]
            name_key = _NAME_KEYS.get(parent_key)
            if isinstance(node, dict) and isinstance(node.get(name_key), str) and node[name_key]:
                label = f"{kind} {_show(node[name_key])}"
            elif kind == "sync column" and isinstance(node, str) and node:
                label = f"{kind} {_show(node)}"
            else:
                label = f"{kind} #{part}"
            entities.append((n, label))
    if not entities:
        return f"{_show(parts[-1])} of the document" if len(parts) == 1 else "'" + "/".join(map(str, parts)) + "'"
    last_at, last = entities[-1]
    context = last if len(entities) == 1 else f"{last} in {entities[-2][1]}"
    rest = parts[last_at + 1 :]
    if not rest:
        return context
    return f"{_show('/'.join(map(str, rest)))} of {context}"
