"""Every rule the seed illustrates, checked with the seed's own example.

Each wrong example from "schema约束与示意" is stored verbatim (re-indented)
in seed_examples/; its CREATE TABLE runs in a real SQLite database. Where the
seed gives no CREATE statement the test says so and uses the seed's default
EMPLOYEE table (DEFAULT_EMPLOYEE). Every test asserts the rule name and the
JSON path of the error.
"""

from __future__ import annotations

import sqlite3

from schema_helpers import (
    BUNDLE,
    DB_NAME,
    DEFAULT_EMPLOYEE,
    EMPLOYEE2,
    check,
    issues,
    load_seed,
    mutate,
)

from p2pstore.schema.shape import read_table_shape
from p2pstore.schema.sync_schema import validate

T0 = "/dbSchema/0/tables/0"


def test_valid_example_is_accepted_against_the_seeds_tables() -> None:
    report = check(load_seed("valid_employee"), DEFAULT_EMPLOYEE, EMPLOYEE2, tables=("EMPLOYEE", "EMPLOYEE2"))
    assert report.valid, report.to_dict()
    assert report.warnings == ()
    assert report.to_dict() == {"valid": True, "errors": [], "warnings": []}


def test_repo_root_sync_schema_json_is_the_seeds_valid_example() -> None:
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "sync_schema.json"
    assert json.loads(root.read_text(encoding="utf-8")) == load_seed("valid_employee")


def test_only_one_conflict_column() -> None:
    # 解冲突列只能有一个. The seed gives no CREATE statement: default EMPLOYEE.
    report = check(load_seed("two_conflict_columns"), DEFAULT_EMPLOYEE)
    assert issues(report.errors) == {("conflict-column-multiple", f"{T0}/fields/1/primaryKey")}


def test_sync_column_must_exist_in_the_table_case_sensitively() -> None:
    # 同步列必须存在表中: "NAMe" against the column "NAME".
    create = (
        "CREATE TABLE IF NOT EXISTS EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, "
        "NAME TEXT NOT NULL, AGE INTEGER, SALARY REAL, CODES BLOB)"
    )
    report = check(load_seed("sync_column_wrong_case"), create)
    assert ("sync-column-not-in-table", f"{T0}/deviceSyncFields/0") in issues(report.errors)
    wrong = next(e for e in report.errors if e.rule == "sync-column-not-in-table")
    assert "'NAMe'" in wrong.message and "'NAME'" in wrong.message
    # The seed's table also makes NAME (the conflict column) unsynced and
    # not UNIQUE; those are separate mistakes with their own rules.
    assert issues(report.errors) == {
        ("sync-column-not-in-table", f"{T0}/deviceSyncFields/0"),
        ("conflict-column-not-synced", f"{T0}/deviceSyncFields"),
        ("conflict-column-not-unique", f"{T0}/fields/0/primaryKey"),
    }


def test_all_unique_columns_must_be_synced() -> None:
    # 单版本表模式下,表中所有UNIQUE列必须同步: AGE is UNIQUE but not synced.
    create = (
        "CREATE TABLE IF NOT EXISTS EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, "
        "NAME TEXT NOT NULL UNIQUE, AGE INTEGER UNIQUE, SALARY REAL, CODES BLOB)"
    )
    report = check(load_seed("unique_column_not_synced"), create)
    assert issues(report.errors) == {("unique-column-not-synced", f"{T0}/deviceSyncFields")}
    assert "'AGE'" in report.errors[0].message


def test_autoincrement_table_must_not_sync_the_key_when_a_non_key_column_resolves_conflicts() -> None:
    # 自增表下,不支持指定非主键列解冲突又同步主键: NAME resolves, ID is synced.
    report = check(load_seed("autoincrement_key_synced_non_key_conflict"), DEFAULT_EMPLOYEE)
    assert issues(report.errors) == {("autoincrement-key-synced", f"{T0}/deviceSyncFields/0")}


def test_autoincrement_key_is_never_synced_nor_the_conflict_column() -> None:
    # 自增主键不允许同步,若主键为自增,必须配置一个非主键列解冲突: ID synced and resolving.
    report = check(load_seed("autoincrement_key_synced"), DEFAULT_EMPLOYEE)
    assert issues(report.errors) == {
        ("autoincrement-key-synced", f"{T0}/deviceSyncFields/0"),
        ("autoincrement-key-is-conflict-column", f"{T0}/fields/0/primaryKey"),
    }


def test_device_sync_fields_is_required() -> None:
    # 同步列不能为空: no deviceSyncFields at all. No CREATE given: default EMPLOYEE.
    doc = load_seed("no_device_sync_fields")
    assert validate(doc).valid  # not a shape error: it has its own rule
    report = check(doc, DEFAULT_EMPLOYEE)
    assert issues(report.errors) == {("sync-fields-missing", T0)}


def test_device_sync_fields_must_not_be_empty() -> None:
    # Same seed rule ("长度至少为1") with an empty list instead of none.
    doc = mutate(load_seed("no_device_sync_fields"), lambda d: d["dbSchema"][0]["tables"][0].update(deviceSyncFields=[]))
    report = check(doc, DEFAULT_EMPLOYEE)
    assert issues(report.errors) == {("sync-fields-empty", f"{T0}/deviceSyncFields")}


def test_not_null_columns_without_default_must_be_synced() -> None:
    # 表中not null字段必须有默认值,否则要指定同步: AGE INTEGER NOT NULL, not synced.
    create = (
        "CREATE TABLE IF NOT EXISTS EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, "
        "NAME TEXT NOT NULL UNIQUE, AGE INTEGER NOT NULL, SALARY REAL, CODES BLOB)"
    )
    report = check(load_seed("not_null_column_not_synced"), create)
    assert issues(report.errors) == {("not-null-column-not-synced", f"{T0}/deviceSyncFields")}
    assert "'AGE'" in report.errors[0].message


def test_not_null_column_with_a_default_need_not_be_synced() -> None:
    create = (
        "CREATE TABLE IF NOT EXISTS EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, "
        "NAME TEXT NOT NULL UNIQUE, AGE INTEGER NOT NULL DEFAULT 0, SALARY REAL, CODES BLOB)"
    )
    assert check(load_seed("not_null_column_not_synced"), create).valid


def test_table_without_primary_key_is_refused() -> None:
    # 无主键表不支持...单版本表模式.
    create = "CREATE TABLE IF NOT EXISTS EMPLOYEE (NAME TEXT NOT NULL UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB)"
    report = check(load_seed("table_without_primary_key"), create)
    assert issues(report.errors) == {("table-without-primary-key", T0)}


def test_non_autoincrement_primary_key_must_be_synced_and_be_the_conflict_column() -> None:
    # 主键为非自增,主键必须同步,且解冲突列必须为主键: NAME is the key, AGE resolves.
    create = (
        "CREATE TABLE IF NOT EXISTS EMPLOYEE (NAME TEXT NOT NULL PRIMARY KEY, "
        "AGE INTEGER NOT NULL UNIQUE, SALARY REAL, CODES BLOB)"
    )
    report = check(load_seed("primary_key_not_conflict_column"), create)
    assert issues(report.errors) == {
        ("primary-key-not-conflict-column", f"{T0}/fields/0/primaryKey"),
        ("primary-key-not-synced", f"{T0}/deviceSyncFields"),
    }


def test_conflict_column_must_be_unique() -> None:
    # 配置解冲突列必须为UNIQUE属性: NAME TEXT NOT NULL without UNIQUE.
    create = (
        "CREATE TABLE IF NOT EXISTS EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, "
        "NAME TEXT NOT NULL, AGE INTEGER, SALARY REAL, CODES BLOB)"
    )
    report = check(load_seed("conflict_column_not_unique"), create)
    assert issues(report.errors) == {("conflict-column-not-unique", f"{T0}/fields/0/primaryKey")}


def test_sync_column_missing_from_fields_is_a_warning() -> None:
    # deviceSyncFields中字段必须在fields中,否则该字段将不会同步: AGE is not in fields.
    create = DEFAULT_EMPLOYEE  # the seed's CREATE statement for this example is the default one
    report = check(load_seed("sync_column_not_in_fields"), create)
    assert report.valid
    assert issues(report.warnings) == {("sync-column-not-in-fields", f"{T0}/deviceSyncFields/1")}


def test_nullable_conflict_column_example_as_printed_has_no_conflict_column() -> None:
    # 指定解冲突列中的值不能出现null值. The seed's schema for this example
    # marks NAME "primaryKey": false, so as printed it has no conflict column
    # at all; that is what we report.
    create = (
        "CREATE TABLE IF NOT EXISTS EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, "
        "NAME TEXT UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB)"
    )
    report = check(load_seed("conflict_column_nullable"), create)
    assert issues(report.errors) == {("conflict-column-missing", f"{T0}/fields")}


def test_nullable_but_unique_conflict_column_is_accepted_the_store_enforces_not_null() -> None:
    # With NAME marked as the conflict column (what the example means), the
    # schema is accepted: the table's UNIQUE is all layer 2 requires; refusing
    # existing NULLs and NULL writes is the store's job (docs/sync_schema.md).
    create = (
        "CREATE TABLE IF NOT EXISTS EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, "
        "NAME TEXT UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB)"
    )
    doc = mutate(
        load_seed("conflict_column_nullable"),
        lambda d: d["dbSchema"][0]["tables"][0]["fields"][0].update(primaryKey=True),
    )
    report = check(doc, create)
    assert report.valid, report.to_dict()


def test_conflict_column_cannot_change() -> None:
    # 不支持解冲突列变化: NAME -> AGE between version 0 and 1.
    old, new = load_seed("conflict_changed_old"), load_seed("conflict_changed_new")
    report = validate(new, previous=old["dbSchema"][0], bundle=BUNDLE, db_name=DB_NAME)
    assert issues(report.errors) == {("conflict-column-changed", f"{T0}/fields/1/primaryKey")}


def test_a_change_needs_a_higher_version() -> None:
    # schema有变化时,version需要增加: AGE added as a sync column, version still 0.
    old, new = load_seed("version_not_increased_old"), load_seed("version_not_increased_new")
    report = validate(new, previous=old["dbSchema"][0])
    assert issues(report.errors) == {("version-not-increased", "/dbSchema/0/version")}


def test_sync_columns_can_only_be_added() -> None:
    # 指定同步列只能新增不能减少: AGE removed between version 0 and 1.
    old, new = load_seed("sync_column_removed_old"), load_seed("sync_column_removed_new")
    report = validate(new, previous=old["dbSchema"][0])
    assert issues(report.errors) == {("sync-column-removed", f"{T0}/deviceSyncFields")}
    assert "'AGE'" in report.errors[0].message


def test_added_sync_column_is_returned_so_existing_rows_sync_again() -> None:
    # 同步列变化时,存量数据会重新同步: the seed's version example with the version bumped.
    old = load_seed("version_not_increased_old")
    new = mutate(load_seed("version_not_increased_new"), lambda d: d["dbSchema"][0].update(version=1))
    report = validate(new, previous=old["dbSchema"][0])
    assert report.valid, report.to_dict()
    assert dict(report.added_sync_columns) == {"EMPLOYEE": ("AGE",)}


def test_seed_tables_are_read_from_a_real_file_database(tmp_path) -> None:
    # The same check through a database file, the way the store will call it.
    path = tmp_path / "RdbTest.db"
    with sqlite3.connect(path) as conn:
        conn.execute(DEFAULT_EMPLOYEE)
        conn.execute(EMPLOYEE2)
    conn = sqlite3.connect(path)
    try:
        shapes = {name: read_table_shape(conn, name) for name in ("EMPLOYEE", "EMPLOYEE2")}
    finally:
        conn.close()
    report = validate(load_seed("valid_employee"), shapes=shapes, bundle=BUNDLE, db_name=DB_NAME)
    assert report.valid, report.to_dict()
