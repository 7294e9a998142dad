"""Validation of sync_schema.json (SPEC §6), in three layers.

1. **Shape** (:func:`check_shape`, here): the JSON Schema
   ``p2pstore/schemas/sync_schema.schema.json`` plus the duplicate checks a JSON
   Schema can't express (two entries for one database, table, column or
   sync column).
2. **Against the live table** (:func:`check_table`, in ``table_rules``): one
   table entry against the :class:`TableShape` read from SQLite
   (``p2pstore.schema.shape``).
3. **Against the previously accepted version** (:func:`check_upgrade`, in
   ``upgrade_rules``).

This module is the entry point (:func:`validate`, :func:`parse_document`)
and re-exports what callers use from the others. Each layer-2 and layer-3
rule is one function registered in ``p2pstore.schema.rules``; :data:`RULES`
is derived from that registry.

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
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator

from p2pstore.errors import SchemaInvalid
from p2pstore.schema.entry import conflict_column, find_db_entry, sync_columns
from p2pstore.schema.rules import SchemaIssue, ValidationReport, declare, dedupe, pointer, rule_table, show
from p2pstore.schema.table_rules import check_table, conflict_column_nulls
from p2pstore.schema.table_shape import FIELD_TYPES, TYPE_AFFINITIES, ColumnShape, TableShape, column_affinity
from p2pstore.schema.upgrade_rules import check_upgrade, database_removed
from p2pstore.schemas import load_json_schema

__all__ = [
    "FIELD_TYPES", "MAX_DOCUMENT_BYTES", "RULES", "SCHEMA_NAME", "SQLITE_INT_MAX", "SQLITE_INT_MIN",
    "TYPE_AFFINITIES", "ColumnShape", "SchemaIssue", "TableShape", "ValidationReport", "check_shape",
    "check_table", "check_upgrade", "column_affinity", "conflict_column", "conflict_column_nulls",
    "find_db_entry", "invalid_json_report", "json_schema", "parse_document", "pointer", "read_document",
    "sync_columns", "validate", "validate_document",
]

#: The layer-1 JSON Schema's file name in the package's schemas/.
SCHEMA_NAME = "sync_schema.schema.json"

#: A sync_schema.json larger than this is refused unread: real files are a
#: few kilobytes, and the daemon re-reads the file on SIGHUP.
MAX_DOCUMENT_BYTES = 1024 * 1024


# --------------------------------------------------------------------------
# Layer 1: shape. Its rules are read off the JSON Schema's errors
# (_issues_from_error) and the duplicate checks, so they are declared here.

declare("invalid-json", "layer 1", note="raised by parse_document as SchemaInvalid; reported by validate_document")
for _rule_id in (
    "unknown-key", "missing-key", "wrong-type", "empty-value", "unknown-field-type", "negative-version",
    "db-name-extension", "shape", "duplicate-db", "duplicate-table", "duplicate-column", "duplicate-sync-column",
):
    declare(_rule_id, "layer 1")
# Selection: which entries and tables of the document apply (validate's arguments).
for _rule_id in ("db-not-in-schema", "table-not-in-schema", "table-not-found", "previous-invalid"):
    declare(_rule_id, "selection")


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
    return dedupe(issues)


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
                f"Unknown key {show(key)} in {where}; allowed keys are {', '.join(allowed)}.",
            )
            for key in err.instance
            if key not in allowed
        ]
    if kind == "required" and isinstance(err.instance, dict):
        return [
            SchemaIssue(path, "missing-key", f"{_cap(where)} lacks the required key {show(key)}.")
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
                f"{_cap(where)} is {show(err.instance)}, which is not one of {', '.join(FIELD_TYPES)}.",
            )
        ]
    if kind == "minimum":
        return [SchemaIssue(path, "negative-version", f"{_cap(where)} must be 0 or more, not {show(err.instance)}.")]
    if kind == "pattern" and parts and parts[-1] == "dbName" and isinstance(err.instance, str):
        return [
            SchemaIssue(
                path,
                "db-name-extension",
                f"dbName {show(err.instance)} must not end in '.db': give the store name without "
                f"the file extension ({show(err.instance[:-3])}).",
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
                    f"Database {show(name)} of bundle {show(bundle)} has two entries in dbSchema "
                    f"(#{seen_dbs[(bundle, name)]} and #{i}); keep one.",
                )
            else:
                seen_dbs[(bundle, name)] = i
        tables = db.get("tables")
        if not isinstance(tables, list):
            continue
        repeated_tables = dict(_repeats(t.get("tableName") if isinstance(t, dict) else None for t in tables))
        for j, table in enumerate(tables):
            if not isinstance(table, dict):
                continue
            tpath = f"/dbSchema/{i}/tables/{j}"
            tname = table.get("tableName")
            if j in repeated_tables:
                yield SchemaIssue(
                    f"{tpath}/tableName",
                    "duplicate-table",
                    f"Table {show(tname)} appears twice in database {show(name)}; keep one entry.",
                )
            fields = table.get("fields")
            if isinstance(fields, list):
                for k, col in _repeats(fld.get("columnName") if isinstance(fld, dict) else None for fld in fields):
                    yield SchemaIssue(
                        f"{tpath}/fields/{k}/columnName",
                        "duplicate-column",
                        f"Column {show(col)} is described twice in the fields of table {show(tname)}.",
                    )
            sync = table.get("deviceSyncFields")
            if isinstance(sync, list):
                for k, col in _repeats(sync):
                    yield SchemaIssue(
                        f"{tpath}/deviceSyncFields/{k}",
                        "duplicate-sync-column",
                        f"Sync column {show(col)} is listed twice in deviceSyncFields of table {show(tname)}.",
                    )


def _repeats(names: Iterable[object]) -> Iterator[tuple[int, str]]:
    """``(index, name)`` of every string name an earlier one already was
    (anything but a string is skipped: it failed the JSON Schema)."""
    seen: set[str] = set()
    for k, name in enumerate(names):
        if isinstance(name, str):
            if name in seen:
                yield k, name
            seen.add(name)


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
                f"bundle {show(bundle)}" if bundle is not None else "",
                f"database {show(db_name)}" if db_name is not None else "",
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
                            f"Table {show(name)} has no entry in database {show(db['dbName'])} of sync_schema.json.",
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
                            f"Table {show(name)} does not exist in database {show(db['dbName'])} "
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
                gone = database_removed(previous)
                if gone is not None:
                    errors.append(gone)
            else:
                i, entry = found
                upgrade_errors, upgrade_added = check_upgrade(previous, entry, f"/dbSchema/{i}")
                errors.extend(upgrade_errors)
                added = {t: tuple(cols) for t, cols in upgrade_added.items()}

    return ValidationReport(tuple(dedupe(errors)), tuple(dedupe(warnings)), added)


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



def _sort_key(parts: Iterable[Any]) -> tuple[tuple[int, Any], ...]:
    return tuple((0, p) if isinstance(p, int) else (1, str(p)) for p in parts)


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
                label = f"{kind} {show(node[name_key])}"
            elif kind == "sync column" and isinstance(node, str) and node:
                label = f"{kind} {show(node)}"
            else:
                label = f"{kind} #{part}"
            entities.append((n, label))
    if not entities:
        return f"{show(parts[-1])} of the document" if len(parts) == 1 else "'" + "/".join(map(str, parts)) + "'"
    last_at, last = entities[-1]
    context = last if len(entities) == 1 else f"{last} in {entities[-2][1]}"
    rest = parts[last_at + 1 :]
    if not rest:
        return context
    return f"{show('/'.join(map(str, rest)))} of {context}"


#: Every rule name this module can report → its layer and severity, derived
#: from the registry. docs/sync_schema.md documents each one (tests/schema
#: checks that).
RULES: Mapping[str, str] = rule_table()
