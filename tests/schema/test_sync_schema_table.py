"""Layer 2 beyond the seed's examples: type/autoIncrement agreement, the
rowid-alias choice, composite keys, the selection rules of ``validate`` and
the document-only mode of ``check_table``."""

from __future__ import annotations

from typing import Any

import pytest
from schema_helpers import BUNDLE, DB_NAME, DEFAULT_EMPLOYEE, check, issues, load_seed, mutate

from p2pstore.schema.sync_schema import (
    ColumnShape,
    TableShape,
    check_table,
    column_affinity,
    conflict_column,
    sync_columns,
    validate,
)

T0 = "/dbSchema/0/tables/0"


def table_doc(sync: list[str] | None, fields: list[dict[str, Any]], table: str = "EMPLOYEE") -> dict[str, Any]:
    entry: dict[str, Any] = {"tableName": table, "fields": fields}
    if sync is not None:
        entry["deviceSyncFields"] = sync
    return {"dbSchema": [{"version": 0, "bundleName": BUNDLE, "dbName": DB_NAME, "tables": [entry]}]}


def f(name: str, type_: str, *, conflict: bool = False, auto: bool = False) -> dict[str, Any]:
    return {"columnName": name, "type": type_, "primaryKey": conflict, "notNull": False, "autoIncrement": auto}


def test_field_type_must_agree_with_the_column_affinity() -> None:
    doc = mutate(load_seed("valid_employee"), lambda d: d["dbSchema"][0]["tables"][0]["fields"][2].update(type="Text"))
    report = check(doc, DEFAULT_EMPLOYEE)
    assert issues(report.errors) == {("field-type-mismatch", f"{T0}/fields/2/type")}
    assert "'AGE'" in report.errors[0].message and "INTEGER" in report.errors[0].message


@pytest.mark.parametrize(
    ("declared", "ok", "bad"),
    [
        ("TEXT", ["Text"], ["Integer", "Float", "Blob"]),
        ("VARCHAR(40)", ["Text"], ["Long"]),
        ("INTEGER", ["Integer", "Long"], ["Text", "Double", "Blob"]),
        ("BIGINT", ["Integer", "Long"], ["Float"]),
        ("REAL", ["Float", "Double"], ["Integer", "Text"]),
        ("DOUBLE PRECISION", ["Float", "Double"], ["Blob"]),
        ("BLOB", ["Blob"], ["Text"]),
        ("", ["Blob"], ["Text", "Integer"]),
        ("NUMERIC", ["Integer", "Long", "Float", "Double"], ["Text", "Blob"]),
    ],
)
def test_type_agreement_follows_sqlite_affinity(declared: str, ok: list[str], bad: list[str]) -> None:
    create = f"CREATE TABLE T (U TEXT PRIMARY KEY NOT NULL, C {declared})"
    for type_ in ok + bad:
        doc = table_doc(["U", "C"], [f("U", "Text", conflict=True), f("C", type_)], table="T")
        report = check(doc, create, tables=("T",))
        expected = set() if type_ in ok else {("field-type-mismatch", f"{T0}/fields/1/type")}
        assert issues(report.errors) == expected, (declared, type_)


def test_column_affinity_rules() -> None:
    assert column_affinity("INT") == "INTEGER"
    assert column_affinity("CHARINT") == "INTEGER"  # SQLite's own order: INT wins
    assert column_affinity("NVARCHAR(10)") == "TEXT"
    assert column_affinity("FLOATING POINT") == "INTEGER"  # "POINT" contains INT, as in SQLite
    assert column_affinity("DECIMAL(10,5)") == "NUMERIC"
    assert column_affinity("") == "BLOB"
    assert column_affinity("ANY") == "ANY"


def test_autoincrement_field_on_an_autoincrement_column_must_say_true() -> None:
    doc = mutate(load_seed("valid_employee"), lambda d: d["dbSchema"][0]["tables"][0]["fields"][0].update(autoIncrement=False))
    report = check(doc, DEFAULT_EMPLOYEE)
    # ID then counts as AUTOINCREMENT from the table, so only the mismatch is reported.
    assert issues(report.errors) == {("field-autoincrement-mismatch", f"{T0}/fields/0/autoIncrement")}


def test_autoincrement_true_on_a_column_that_is_not_integer_primary_key() -> None:
    doc = mutate(load_seed("valid_employee"), lambda d: d["dbSchema"][0]["tables"][0]["fields"][2].update(autoIncrement=True))
    report = check(doc, DEFAULT_EMPLOYEE)
    assert issues(report.errors) == {("field-autoincrement-mismatch", f"{T0}/fields/2/autoIncrement")}


def test_missing_autoincrement_key_points_at_the_field() -> None:
    doc = mutate(load_seed("valid_employee"), lambda d: d["dbSchema"][0]["tables"][0]["fields"][0].pop("autoIncrement"))
    report = check(doc, DEFAULT_EMPLOYEE)
    assert issues(report.errors) == {("field-autoincrement-mismatch", f"{T0}/fields/0")}


ROWID_ALIAS = "CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY, NAME TEXT NOT NULL UNIQUE, AGE INTEGER)"


def test_plain_integer_primary_key_declared_autoincrement_is_a_local_key() -> None:
    # Our choice: a rowid alias without AUTOINCREMENT still gets values from
    # SQLite, so "autoIncrement": true is accepted for it and it is then an
    # auto-assigned key (must not be synced, must not resolve conflicts).
    ok = table_doc(["NAME", "AGE"], [f("ID", "Integer", auto=True), f("NAME", "Text", conflict=True), f("AGE", "Integer")])
    assert check(ok, ROWID_ALIAS).valid
    synced = mutate(ok, lambda d: d["dbSchema"][0]["tables"][0]["deviceSyncFields"].insert(0, "ID"))
    assert issues(check(synced, ROWID_ALIAS).errors) == {("autoincrement-key-synced", f"{T0}/deviceSyncFields/0")}


def test_plain_integer_primary_key_not_declared_autoincrement_is_an_ordinary_key() -> None:
    # ... and with "autoIncrement": false it is a real key: synced, resolving conflicts.
    as_key = table_doc(["ID", "NAME"], [f("ID", "Integer", conflict=True), f("NAME", "Text")])
    assert check(as_key, ROWID_ALIAS).valid
    not_key = table_doc(["NAME"], [f("ID", "Integer"), f("NAME", "Text", conflict=True)])
    assert issues(check(not_key, ROWID_ALIAS).errors) == {
        ("primary-key-not-conflict-column", f"{T0}/fields/0/primaryKey"),
        ("primary-key-not-synced", f"{T0}/deviceSyncFields"),
    }


def test_without_rowid_integer_primary_key_is_not_auto_assigned() -> None:
    create = "CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY, NAME TEXT) WITHOUT ROWID"
    doc = table_doc(["ID", "NAME"], [f("ID", "Integer", conflict=True, auto=True), f("NAME", "Text")])
    assert issues(check(doc, create).errors) == {("field-autoincrement-mismatch", f"{T0}/fields/0/autoIncrement")}


def test_composite_primary_key_is_refused() -> None:
    create = "CREATE TABLE EMPLOYEE (A TEXT NOT NULL, B TEXT NOT NULL, U TEXT UNIQUE, PRIMARY KEY (A, B))"
    doc = table_doc(["A", "B", "U"], [f("A", "Text"), f("B", "Text"), f("U", "Text", conflict=True)])
    assert issues(check(doc, create).errors) == {("composite-primary-key", T0)}


def test_conflict_column_missing_and_not_synced() -> None:
    none = table_doc(["NAME"], [f("NAME", "Text")])
    assert issues(check(none, DEFAULT_EMPLOYEE).errors) == {("conflict-column-missing", f"{T0}/fields")}
    unsynced = table_doc(["AGE"], [f("NAME", "Text", conflict=True), f("AGE", "Integer")])
    assert issues(check(unsynced, DEFAULT_EMPLOYEE).errors) == {("conflict-column-not-synced", f"{T0}/deviceSyncFields")}


def test_three_conflict_columns_give_one_error_per_extra_column() -> None:
    doc = table_doc(
        ["NAME", "AGE", "SALARY"],
        [f("NAME", "Text", conflict=True), f("AGE", "Integer", conflict=True), f("SALARY", "Float", conflict=True)],
    )
    assert issues(check(doc, DEFAULT_EMPLOYEE).errors) == {
        ("conflict-column-multiple", f"{T0}/fields/1/primaryKey"),
        ("conflict-column-multiple", f"{T0}/fields/2/primaryKey"),
    }


def test_field_that_is_not_a_column() -> None:
    doc = table_doc(["NAME"], [f("NAME", "Text", conflict=True), f("name", "Text")])
    report = check(doc, DEFAULT_EMPLOYEE)
    assert issues(report.errors) == {("field-not-in-table", f"{T0}/fields/1/columnName")}
    assert "case-sensitive" in report.errors[0].message


def test_partial_unique_index_does_not_make_a_conflict_column_unique() -> None:
    create = (
        "CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, NAME TEXT NOT NULL);"
        "CREATE UNIQUE INDEX name_partial ON EMPLOYEE(NAME) WHERE NAME <> ''"
    )
    doc = table_doc(["NAME"], [f("NAME", "Text", conflict=True)])
    parts = create.split(";")
    assert issues(check(doc, *parts).errors) == {("conflict-column-not-unique", f"{T0}/fields/0/primaryKey")}
    full = ["CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, NAME TEXT NOT NULL)",
            "CREATE UNIQUE INDEX name_unique ON EMPLOYEE(NAME)"]
    assert check(doc, *full).valid


def test_not_null_default_null_is_no_default() -> None:
    create = (
        "CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, NAME TEXT NOT NULL UNIQUE, "
        "AGE INTEGER NOT NULL DEFAULT NULL)"
    )
    doc = table_doc(["NAME"], [f("NAME", "Text", conflict=True)])
    assert issues(check(doc, create).errors) == {("not-null-column-not-synced", f"{T0}/deviceSyncFields")}


def test_not_null_unique_column_gives_one_error_not_two() -> None:
    create = (
        "CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, NAME TEXT NOT NULL UNIQUE, "
        "AGE INTEGER NOT NULL UNIQUE)"
    )
    doc = table_doc(["NAME"], [f("NAME", "Text", conflict=True)])
    report = check(doc, create)
    assert [e.rule for e in report.errors] == ["unique-column-not-synced"]


# -- validate's selection rules ---------------------------------------------


def test_db_not_in_schema() -> None:
    report = validate(load_seed("valid_employee"), bundle=BUNDLE, db_name="Other")
    assert issues(report.errors) == {("db-not-in-schema", "/dbSchema")}
    assert "'Other'" in report.errors[0].message


def test_table_not_in_schema() -> None:
    report = validate(load_seed("valid_employee"), bundle=BUNDLE, db_name=DB_NAME, tables=["EMPLOYEE", "MANAGER"])
    assert issues(report.errors) == {("table-not-in-schema", "/dbSchema/0/tables")}
    assert "'MANAGER'" in report.errors[0].message


def test_table_not_found() -> None:
    report = check(load_seed("valid_employee"), DEFAULT_EMPLOYEE, tables=("EMPLOYEE", "EMPLOYEE2"))
    assert issues(report.errors) == {("table-not-found", "/dbSchema/0/tables/1/tableName")}


def test_table_names_are_case_sensitive() -> None:
    doc = mutate(load_seed("valid_employee"), lambda d: d["dbSchema"][0]["tables"][0].update(tableName="employee"))
    report = check(doc, DEFAULT_EMPLOYEE, tables=("employee",))
    assert issues(report.errors) == {("table-not-found", "/dbSchema/0/tables/0/tableName")}


def test_layer_two_runs_only_for_tables_with_a_shape() -> None:
    doc = load_seed("two_conflict_columns")
    assert validate(doc).valid  # shape only
    assert validate(doc, shapes={}).valid
    report = validate(doc, document_rules=True)
    assert issues(report.errors) == {("conflict-column-multiple", f"{T0}/fields/1/primaryKey")}


def test_layer_two_is_skipped_when_layer_one_fails() -> None:
    doc = mutate(load_seed("two_conflict_columns"), lambda d: d["dbSchema"][0].update(extra=1))
    report = check(doc, DEFAULT_EMPLOYEE)
    assert issues(report.errors) == {("unknown-key", "/dbSchema/0/extra")}


def test_without_bundle_every_db_entry_is_checked() -> None:
    doc = load_seed("two_conflict_columns")
    doc["dbSchema"].append(mutate(doc["dbSchema"][0], lambda e: e.update(dbName="Second")))
    report = validate(doc, document_rules=True)
    assert {e.path for e in report.errors} == {
        "/dbSchema/0/tables/0/fields/1/primaryKey",
        "/dbSchema/1/tables/0/fields/1/primaryKey",
    }
    only_second = validate(doc, document_rules=True, db_name="Second")
    assert {e.path for e in only_second.errors} == {"/dbSchema/1/tables/0/fields/1/primaryKey"}


# -- check_table used directly, and the small helpers ------------------------


def test_check_table_without_a_shape_uses_the_documents_own_claims() -> None:
    entry = load_seed("autoincrement_key_synced")["dbSchema"][0]["tables"][0]
    errors, warnings = check_table(entry, None, "/x")
    assert {(e.rule, e.path) for e in errors} == {
        ("autoincrement-key-synced", "/x/deviceSyncFields/0"),
        ("autoincrement-key-is-conflict-column", "/x/fields/0/primaryKey"),
    }
    assert warnings == []


def test_check_table_with_a_hand_made_shape() -> None:
    shape = TableShape(
        "T",
        (
            ColumnShape("K", "TEXT", True, None, 1, True, False),
            ColumnShape("V", "INTEGER", False, None, 0, False, False),
        ),
    )
    assert shape.column("K") is not None and shape.column("k") is None
    assert shape.primary_key == ("K",) and shape.rowid_alias is None
    entry = {"tableName": "T", "deviceSyncFields": ["K", "V"], "fields": [f("K", "Text", conflict=True), f("V", "Long")]}
    assert check_table(entry, shape, "/t") == ([], [])


def test_sync_columns_and_conflict_column() -> None:
    entry = load_seed("sync_column_not_in_fields")["dbSchema"][0]["tables"][0]
    assert sync_columns(entry) == ["NAME"]
    assert conflict_column(entry) == "NAME"
    assert conflict_column(load_seed("two_conflict_columns")["dbSchema"][0]["tables"][0]) is None
    assert sync_columns({"tableName": "T", "fields": []}) == []


def test_report_to_dict_and_raise() -> None:
    from p2pstore.errors import SchemaInvalid

    report = check(load_seed("two_conflict_columns"), DEFAULT_EMPLOYEE)
    d = report.to_dict()
    assert d["valid"] is False
    assert d["errors"] == [{"path": f"{T0}/fields/1/primaryKey", "rule": "conflict-column-multiple", "message": report.errors[0].message}]
    with pytest.raises(SchemaInvalid) as info:
        report.raise_if_invalid()
    assert info.value.name == "SCHEMA_INVALID"
    assert info.value.data["errors"] == d["errors"]
    check(load_seed("valid_employee"), DEFAULT_EMPLOYEE).raise_if_invalid()
