"""Layer 3: a new sync_schema.json against the previously accepted entry
(the seed's own upgrade examples are in test_sync_schema_seed.py)."""

from __future__ import annotations

from typing import Any

from schema_helpers import issues, load_seed, mutate

from p2pstore.schema.sync_schema import check_upgrade, validate

DB = "/dbSchema/0"
T0 = "/dbSchema/0/tables/0"


def entry() -> dict[str, Any]:
    return load_seed("valid_employee")["dbSchema"][0]


def bump(e: dict[str, Any]) -> None:
    e["version"] += 1


def test_unchanged_entry_needs_no_new_version() -> None:
    assert check_upgrade(entry(), entry(), DB) == ([], {})


def test_reordering_and_spelling_out_defaults_is_not_a_change() -> None:
    def reshuffle(e: dict[str, Any]) -> None:
        e["tables"].reverse()
        e["tables"][1]["fields"].reverse()
        e["tables"][1]["deviceSyncFields"].reverse()
        for table in e["tables"]:
            for fld in table["fields"]:
                if fld.get("notNull") is False:
                    del fld["notNull"]

    assert check_upgrade(entry(), mutate(entry(), reshuffle), DB) == ([], {})


def test_any_real_change_needs_a_higher_version() -> None:
    changed = mutate(entry(), lambda e: e["tables"][0]["fields"][2].update(notNull=True))
    errors, _ = check_upgrade(entry(), changed, DB)
    assert issues(errors) == {("version-not-increased", f"{DB}/version")}
    assert check_upgrade(entry(), mutate(changed, bump), DB) == ([], {})


def test_version_going_down_is_refused_even_without_a_change() -> None:
    old = mutate(entry(), lambda e: e.update(version=3))
    errors, _ = check_upgrade(old, entry(), DB)
    assert issues(errors) == {("version-not-increased", f"{DB}/version")}
    assert "went down" in errors[0].message


def test_higher_version_without_a_change_is_fine() -> None:
    assert check_upgrade(entry(), mutate(entry(), bump), DB) == ([], {})


def test_added_columns_are_returned_per_table() -> None:
    def add(e: dict[str, Any]) -> None:
        bump(e)
        e["tables"][0]["fields"].append({"columnName": "EMAIL", "type": "Text"})
        e["tables"][0]["deviceSyncFields"].append("EMAIL")

    old = mutate(entry(), lambda e: (e["tables"][1]["deviceSyncFields"].remove("CODES")))
    new = mutate(entry(), add)
    errors, added = check_upgrade(old, new, DB)
    assert errors == []
    assert added == {"EMPLOYEE": ["EMAIL"], "EMPLOYEE2": ["CODES"]}


def test_a_new_table_lists_all_its_sync_columns_as_added() -> None:
    old = mutate(entry(), lambda e: e["tables"].pop())
    errors, added = check_upgrade(old, mutate(entry(), bump), DB)
    assert errors == []
    assert added == {"EMPLOYEE2": ["NAME", "AGE", "SALARY", "CODES"]}


def test_a_removed_table_removes_its_sync_columns() -> None:
    new = mutate(entry(), lambda e: (bump(e), e["tables"].pop()))
    errors, _ = check_upgrade(entry(), new, DB)
    assert issues(errors) == {("sync-column-removed", f"{DB}/tables")}
    assert "'EMPLOYEE2'" in errors[0].message


def test_a_sync_column_dropped_from_fields_is_removed_too() -> None:
    # A column listed in deviceSyncFields but no longer in fields stops travelling.
    new = mutate(entry(), lambda e: (bump(e), e["tables"][0]["fields"].pop(2)))
    errors, _ = check_upgrade(entry(), new, DB)
    assert issues(errors) == {("sync-column-removed", f"{T0}/deviceSyncFields")}


def test_each_removed_column_is_its_own_error() -> None:
    new = mutate(entry(), lambda e: (bump(e), e["tables"][0].update(deviceSyncFields=["NAME"])))
    errors, _ = check_upgrade(entry(), new, DB)
    assert [e.rule for e in errors] == ["sync-column-removed"] * 3
    assert {e.message.split("'")[1] for e in errors} == {"AGE", "SALARY", "CODES"}


def test_conflict_column_unset_is_a_change() -> None:
    new = mutate(entry(), lambda e: (bump(e), e["tables"][0]["fields"][1].update(primaryKey=False)))
    errors, _ = check_upgrade(entry(), new, DB)
    assert issues(errors) == {("conflict-column-changed", f"{T0}/fields")}


def test_validate_finds_the_previous_entry_by_bundle_and_db_name() -> None:
    doc = load_seed("valid_employee")
    doc["dbSchema"].insert(0, mutate(doc["dbSchema"][0], lambda e: e.update(dbName="Other")))
    changed = mutate(doc, lambda d: d["dbSchema"][1]["tables"][0]["fields"][2].update(notNull=True))
    report = validate(changed, previous=entry())
    assert issues(report.errors) == {("version-not-increased", "/dbSchema/1/version")}


def test_validate_reports_a_removed_database() -> None:
    doc = mutate(load_seed("valid_employee"), lambda d: d["dbSchema"][0].update(dbName="Other"))
    report = validate(doc, previous=entry())
    assert issues(report.errors) == {("sync-column-removed", "/dbSchema")}


def test_validate_refuses_a_malformed_previous_entry() -> None:
    report = validate(load_seed("valid_employee"), previous={"version": "zero"})
    assert issues(report.errors) == {("previous-invalid", "")}


def test_upgrade_and_table_checks_combine() -> None:
    new = mutate(load_seed("valid_employee"), lambda d: d["dbSchema"][0]["tables"][0]["fields"][1].update(primaryKey=False))
    report = validate(new, previous=entry(), document_rules=True)
    assert issues(report.errors) == {
        ("conflict-column-missing", f"{T0}/fields"),
        ("version-not-increased", f"{DB}/version"),
        ("conflict-column-changed", f"{T0}/fields"),
    }
