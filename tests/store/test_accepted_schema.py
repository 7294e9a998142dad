"""Single-version tables in a real store: the accepted sync_schema.json entry,
the NULL guards on the conflict column, upgrades and the open-time re-check.

Every test runs an in-process ``Store`` on a real SQLite file; outside
writers are real second connections to that file.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from p2pstore.errors import ConstraintViolation, SchemaInvalid, SchemaNotFound, TableTypeLocked
from p2pstore.store import accepted_schema
from p2pstore.store.capture import OP_INSERT, OP_UPDATE
from p2pstore.store.database import Store

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "tests" / "schema" / "seed_examples"
BUNDLE, NAME = "com.example.rdbDataSync", "RdbTest"
EMPLOYEE = (
    "CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, "
    "NAME TEXT NOT NULL UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB)"
)
EMPLOYEE2 = "CREATE TABLE EMPLOYEE2 (NAME TEXT NOT NULL UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB, PRIMARY KEY (NAME))"
#: The seed's NULL example: the conflict column is UNIQUE but may hold NULL.
EMPLOYEE_NULLABLE = (
    "CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, NAME TEXT UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB)"
)


def seed(name: str) -> Any:
    return json.loads((SEED / f"{name}.json").read_text(encoding="utf-8"))


def valid_example() -> Any:
    return json.loads((REPO / "sync_schema.json").read_text(encoding="utf-8"))


def nullable_example() -> Any:
    # The seed prints this example with "primaryKey": false (no conflict
    # column at all, see docs/sync_schema.md); NAME is meant to be it.
    doc = seed("conflict_column_nullable")
    doc["dbSchema"][0]["tables"][0]["fields"][0]["primaryKey"] = True
    return doc


def changed(doc: Any, fn: Callable[[Any], None]) -> Any:
    new = copy.deepcopy(doc)
    fn(new)
    return new


@pytest.fixture
def schema_file(tmp_path: Path) -> Callable[[Any], Path]:
    path = tmp_path / "sync_schema.json"

    def write(doc: Any) -> Path:
        path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
        return path

    return write


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / f"{NAME}.db", bundle=BUNDLE, name=NAME)
    yield s
    await s.close()


async def make(store: Store, *sql: str) -> None:
    for statement in sql:
        await store.execute(statement)


async def set_sv(store: Store, path: Path, *tables: str) -> accepted_schema.SchemaOutcome:
    return await accepted_schema.set_tables(store, list(tables), auto_sync=False, schema_path=path)


def rules(exc: SchemaInvalid) -> set[tuple[str, str]]:
    return {(e["rule"], e["path"]) for e in exc.data["errors"]}


def outside(store: Store) -> sqlite3.Connection:
    """Another program's connection to the store's file."""
    conn = sqlite3.connect(store.path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


async def log_rows(store: Store) -> list[tuple[Any, ...]]:
    result = await store.query("SELECT seq, tbl, pk, op, cols, hlc FROM _p2p_changes ORDER BY seq")
    return [tuple(r) for r in result["rows"]]


# --------------------------------------------------------------------------
# Accepting


async def test_seed_valid_example_is_accepted_and_kept_in_the_store(store: Store, schema_file) -> None:
    await make(store, EMPLOYEE, EMPLOYEE2)
    outcome = await set_sv(store, schema_file(valid_example()), "EMPLOYEE", "EMPLOYEE2")

    assert outcome.version == 0 and outcome.previous_version is None and outcome.changed
    assert outcome.to_result() == {"schema_version": 0, "warnings": [], "resent": {}}
    assert store.table_type == "single_version" and set(store.distributed) == {"EMPLOYEE", "EMPLOYEE2"}
    assert store.sync_schema_version == 0
    assert store.sync_schema is not None
    assert store.sync_schema.tables["EMPLOYEE"] == accepted_schema.SyncColumns(
        "EMPLOYEE", ("NAME", "AGE", "SALARY", "CODES"), "NAME"
    )
    assert store.sync_schema.tables["EMPLOYEE2"].conflict == "NAME"
    # ... and it is in the file, for the sync engine and for the next daemon.
    with outside(store) as conn:
        rows = conn.execute("SELECT tbl, col, pos, conflict FROM _p2p_sync_columns ORDER BY tbl, pos").fetchall()
        entry = json.loads(conn.execute("SELECT value FROM _p2p_meta WHERE key = 'sync_schema'").fetchone()[0])
    assert rows[:4] == [("EMPLOYEE", "NAME", 0, 1), ("EMPLOYEE", "AGE", 1, 0), ("EMPLOYEE", "SALARY", 2, 0), ("EMPLOYEE", "CODES", 3, 0)]
    assert entry == valid_example()["dbSchema"][0]


async def test_warnings_are_returned(store: Store, schema_file) -> None:
    await make(store, EMPLOYEE)
    outcome = await set_sv(store, schema_file(seed("sync_column_not_in_fields")), "EMPLOYEE")
    assert [(w.rule, w.path) for w in outcome.warnings] == [
        ("sync-column-not-in-fields", "/dbSchema/0/tables/0/deviceSyncFields/1")
    ]
    assert outcome.to_result()["warnings"][0]["rule"] == "sync-column-not-in-fields"
    # AGE is not described in fields, so it doesn't travel.
    assert store.sync_schema.tables["EMPLOYEE"].columns == ("NAME",)


@pytest.mark.parametrize(
    ("example", "create", "expected"),
    [
        ("two_conflict_columns", EMPLOYEE, ("conflict-column-multiple", "/dbSchema/0/tables/0/fields/1/primaryKey")),
        ("sync_column_wrong_case", EMPLOYEE, ("sync-column-not-in-table", "/dbSchema/0/tables/0/deviceSyncFields/0")),
        ("no_device_sync_fields", EMPLOYEE, ("sync-fields-missing", "/dbSchema/0/tables/0")),
        ("autoincrement_key_synced", EMPLOYEE, ("autoincrement-key-synced", "/dbSchema/0/tables/0/deviceSyncFields/0")),
    ],
)
async def test_refused_schema_leaves_the_store_untouched(store: Store, schema_file, example: str, create: str, expected: tuple[str, str]) -> None:
    await make(store, create, "INSERT INTO EMPLOYEE(NAME) VALUES ('a')")
    with pytest.raises(SchemaInvalid) as info:
        await set_sv(store, schema_file(seed(example)), "EMPLOYEE")
    assert expected in rules(info.value)
    assert info.value.data["warnings"] == []
    assert store.table_type is None and store.distributed == {} and store.sync_schema is None
    with outside(store) as conn:
        assert conn.execute("SELECT count(*) FROM _p2p_tables").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM _p2p_meta WHERE key IN ('sync_schema', 'table_type')").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM _p2p_sync_columns").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'trigger'").fetchone()[0] == 0


async def test_missing_file_is_schema_not_found_naming_the_path(store: Store, tmp_path: Path) -> None:
    await make(store, EMPLOYEE)
    path = tmp_path / "nowhere" / "sync_schema.json"
    with pytest.raises(SchemaNotFound) as info:
        await set_sv(store, path, "EMPLOYEE")
    assert str(path) in info.value.message and info.value.data["file"] == str(path)
    assert store.table_type is None


async def test_file_that_is_not_json_is_refused_with_its_rule(store: Store, schema_file, tmp_path: Path) -> None:
    await make(store, EMPLOYEE)
    path = tmp_path / "sync_schema.json"
    path.write_text('{"dbSchema": [\n  {"version": 0,}\n]}')
    with pytest.raises(SchemaInvalid) as info:
        await set_sv(store, path, "EMPLOYEE")
    assert info.value.data["errors"][0]["rule"] == "invalid-json"
    assert info.value.data["line"] == 2


async def test_store_without_an_entry_or_table_entry(store: Store, schema_file) -> None:
    await make(store, EMPLOYEE, "CREATE TABLE OTHER (ID TEXT PRIMARY KEY)")
    other_store = changed(valid_example(), lambda d: d["dbSchema"][0].update(dbName="Other"))
    with pytest.raises(SchemaInvalid) as info:
        await set_sv(store, schema_file(other_store), "EMPLOYEE")
    assert ("db-not-in-schema", "/dbSchema") in rules(info.value)
    with pytest.raises(SchemaInvalid) as info:
        await set_sv(store, schema_file(valid_example()), "OTHER")
    assert ("table-not-in-schema", "/dbSchema/0/tables") in rules(info.value)


async def test_collaborative_store_asked_for_single_version_reports_the_type_not_the_file(store: Store, tmp_path: Path) -> None:
    await make(store, EMPLOYEE)
    await store.set_distributed_tables(["EMPLOYEE"], table_type="collaborative")
    with pytest.raises(TableTypeLocked):
        await set_sv(store, tmp_path / "absent.json", "EMPLOYEE")


async def test_adding_a_table_later_checks_all_single_version_tables(store: Store, schema_file) -> None:
    await make(store, EMPLOYEE, EMPLOYEE2)
    path = schema_file(valid_example())
    await set_sv(store, path, "EMPLOYEE")
    outcome = await set_sv(store, path, "EMPLOYEE2")
    assert not outcome.changed and set(store.sync_schema.tables) == {"EMPLOYEE", "EMPLOYEE2"}
    # A file that no longer covers EMPLOYEE is refused even when only EMPLOYEE2 is asked for.
    without = changed(valid_example(), lambda d: d["dbSchema"][0]["tables"].pop(0))
    with pytest.raises(SchemaInvalid) as info:
        await set_sv(store, schema_file(without), "EMPLOYEE2")
    assert {r for r, _ in rules(info.value)} >= {"table-not-in-schema"}


# --------------------------------------------------------------------------
# NULL in the conflict column


async def test_existing_nulls_fail_naming_how_many_rows(store: Store, schema_file) -> None:
    await make(
        store,
        EMPLOYEE_NULLABLE,
        "INSERT INTO EMPLOYEE(NAME, AGE) VALUES (NULL, 25), (NULL, 26), ('x', 27), (NULL, 28)",
    )
    with pytest.raises(SchemaInvalid) as info:
        await set_sv(store, schema_file(nullable_example()), "EMPLOYEE")
    [error] = info.value.data["errors"]
    assert (error["rule"], error["path"]) == ("conflict-column-has-nulls", "/dbSchema/0/tables/0/fields/0/primaryKey")
    assert "3 rows" in error["message"] and "'NAME'" in error["message"]
    assert "3 rows" in info.value.message
    assert store.table_type is None

    await store.execute("DELETE FROM EMPLOYEE WHERE NAME IS NULL")
    await set_sv(store, schema_file(nullable_example()), "EMPLOYEE")


async def test_writing_null_afterwards_fails_for_every_writer(store: Store, schema_file) -> None:
    await make(store, EMPLOYEE_NULLABLE, "INSERT INTO EMPLOYEE(NAME, AGE) VALUES ('a', 1)")
    await set_sv(store, schema_file(nullable_example()), "EMPLOYEE")

    with pytest.raises(ConstraintViolation) as info:
        await store.insert("EMPLOYEE", {"NAME": None, "AGE": 25, "SALARY": 23456.7, "CODES": b"\x01\x02\x03\x04\x05"})
    assert "conflict column NAME" in info.value.message and "EMPLOYEE" in info.value.message
    with pytest.raises(ConstraintViolation):
        await store.insert("EMPLOYEE", {"AGE": 30})  # NAME left out: NULL too
    with pytest.raises(ConstraintViolation):
        await store.update({"NAME": None}, {"table": "EMPLOYEE", "where": [["AGE", "=", 1]]})
    with pytest.raises(ConstraintViolation):
        await store.execute("INSERT OR REPLACE INTO EMPLOYEE(ID, NAME) VALUES (1, NULL)")

    with outside(store) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="CONSTRAINT_VIOLATION"):
            conn.execute("INSERT INTO EMPLOYEE(NAME) VALUES (NULL)")
        with pytest.raises(sqlite3.IntegrityError, match="CONSTRAINT_VIOLATION"):
            conn.execute("UPDATE EMPLOYEE SET NAME = NULL")
        # Writes that leave the column alone, or set a value, still work.
        conn.execute("UPDATE EMPLOYEE SET AGE = 2")
        conn.execute("INSERT INTO EMPLOYEE(NAME) VALUES ('b')")
    assert (await store.query("SELECT NAME, AGE FROM EMPLOYEE ORDER BY ID"))["rows"] == [["a", 2], ["b", None]]


# --------------------------------------------------------------------------
# Upgrades (layer 3): what the store keeps


async def _accepted_text(store: Store) -> str:
    return (await store.query("SELECT value FROM _p2p_meta WHERE key = 'sync_schema'"))["rows"][0][0]


async def _upgrade_setup(store: Store, schema_file) -> Any:
    await make(store, EMPLOYEE)
    for i in range(5):
        await store.insert("EMPLOYEE", {"NAME": f"n{i}", "AGE": 20 + i})
    old = seed("sync_column_removed_old")  # version 0, syncs NAME and AGE
    await set_sv(store, schema_file(old), "EMPLOYEE")
    return old


@pytest.mark.parametrize(
    ("new", "rule"),
    [
        ("version_not_increased", "version-not-increased"),
        ("conflict_changed", "conflict-column-changed"),
        ("sync_column_removed", "sync-column-removed"),
    ],
)
@pytest.mark.parametrize("how", ["reload", "set_distributed_tables"])
async def test_refused_upgrade_keeps_the_accepted_version(store: Store, schema_file, new: str, rule: str, how: str) -> None:
    old = await _upgrade_setup(store, schema_file)
    if new == "version_not_increased":
        # As in the seed's example: a sync column added without a new version.
        doc = changed(old, lambda d: d["dbSchema"][0]["tables"][0]["deviceSyncFields"].append("SALARY"))
        doc["dbSchema"][0]["tables"][0]["fields"].append(
            {"columnName": "SALARY", "type": "Float", "primaryKey": False, "notNull": False, "autoIncrement": False}
        )
    else:
        doc = seed(f"{new}_new")
    before_text = await _accepted_text(store)
    before_log = await log_rows(store)
    before_triggers = (await store.query("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"))["rows"]

    with pytest.raises(SchemaInvalid) as info:
        if how == "reload":
            await store.reload_sync_schema(doc)
        else:
            await set_sv(store, schema_file(doc), "EMPLOYEE")
    assert rule in {r for r, _ in rules(info.value)}

    assert store.sync_schema_version == 0
    assert store.sync_schema.tables["EMPLOYEE"].columns == ("NAME", "AGE")
    assert await _accepted_text(store) == before_text
    assert await log_rows(store) == before_log
    assert (await store.query("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"))["rows"] == before_triggers


@pytest.mark.parametrize("how", ["reload", "set_distributed_tables"])
async def test_added_sync_column_is_accepted_and_existing_rows_are_marked(store: Store, schema_file, how: str) -> None:
    await make(store, EMPLOYEE)
    for i in range(5):
        await store.insert("EMPLOYEE", {"NAME": f"n{i}", "AGE": 20 + i})
    old = seed("version_not_increased_old")  # version 0, syncs NAME only
    await set_sv(store, schema_file(old), "EMPLOYEE")
    # A write by another program that the daemon hasn't stamped yet: it must
    # still be announced as a local change, unlike the rows marked again.
    with outside(store) as conn:
        conn.execute("INSERT INTO EMPLOYEE(NAME, AGE) VALUES ('outside', 99)")
    announced: list[Any] = []
    store.on_changes = lambda s, batch: announced.append(batch.change_infos())
    before = await log_rows(store)

    new = changed(seed("version_not_increased_new"), lambda d: d["dbSchema"][0].update(version=1))  # adds AGE
    if how == "reload":
        outcome = await store.reload_sync_schema(new)
    else:
        outcome = await set_sv(store, schema_file(new), "EMPLOYEE")

    assert (outcome.version, outcome.previous_version, outcome.changed) == (1, 0, True)
    assert outcome.resent == {"EMPLOYEE": 6}
    assert store.sync_schema_version == 1
    assert store.sync_schema.tables["EMPLOYEE"].columns == ("NAME", "AGE")

    after = await log_rows(store)
    added = after[len(before):]
    # The outside insert, then one update entry per existing row naming only the
    # added column (AGE, position 2), all stamped: old columns keep their clocks.
    assert [(r[1], r[3]) for r in added[:1]] == [("EMPLOYEE", OP_INSERT)]
    marked = added[1:]
    ids = (await store.query("SELECT ID FROM EMPLOYEE ORDER BY ID"))["rows"]
    assert sorted(r[2] for r in marked) == [row[0] for row in ids]
    assert all(r[1] == "EMPLOYEE" and r[3] == OP_UPDATE and r[4] == 1 << 2 and r[5] is not None for r in marked)
    # Only the outside write was announced; the marked rows are not local changes.
    assert announced == [[{"table": "EMPLOYEE", "type": "data", "inserted": [6], "updated": [], "deleted": []}]]


async def test_same_file_again_changes_nothing(store: Store, schema_file) -> None:
    await make(store, EMPLOYEE, "INSERT INTO EMPLOYEE(NAME) VALUES ('a')")
    path = schema_file(valid_example())
    await set_sv(store, path, "EMPLOYEE")
    before = await log_rows(store)
    # Reformatted and reordered: not a change, so the same version is fine.
    doc = valid_example()
    doc["dbSchema"][0]["tables"].reverse()
    outcome = await store.reload_sync_schema(doc)
    assert outcome.version == 0 and outcome.resent == {}
    assert await log_rows(store) == before


async def test_adding_a_table_with_an_upgrade_marks_the_tables_already_synced(store: Store, schema_file) -> None:
    await make(store, EMPLOYEE, EMPLOYEE2, "INSERT INTO EMPLOYEE(NAME, SALARY) VALUES ('a', 1.5), ('b', NULL)",
               "INSERT INTO EMPLOYEE2(NAME) VALUES ('z')")
    v0 = changed(valid_example(), lambda d: d["dbSchema"][0]["tables"][0].update(deviceSyncFields=["NAME", "AGE"]))
    await set_sv(store, schema_file(v0), "EMPLOYEE")
    v1 = changed(valid_example(), lambda d: d["dbSchema"][0].update(version=1))  # EMPLOYEE gains SALARY, CODES
    before = await log_rows(store)
    outcome = await set_sv(store, schema_file(v1), "EMPLOYEE2")
    # EMPLOYEE's row with a value in an added column is marked again ('b' holds
    # only NULLs there: no fresh clock for them); EMPLOYEE2 is new, so its row is logged as an insert.
    assert outcome.resent == {"EMPLOYEE": 1}
    added = [(r[1], r[3]) for r in (await log_rows(store))[len(before):]]
    assert sorted(added) == [("EMPLOYEE", OP_UPDATE), ("EMPLOYEE2", OP_INSERT)]


# --------------------------------------------------------------------------
# Opening a store again


async def test_reopen_rechecks_live_tables_and_restores_the_guards(tmp_path: Path, schema_file) -> None:
    path = tmp_path / f"{NAME}.db"
    store = await Store.open(path, bundle=BUNDLE, name=NAME)
    await make(store, EMPLOYEE_NULLABLE)
    await set_sv(store, schema_file(nullable_example()), "EMPLOYEE")
    assert store.schema_problems == ()
    await store.close()

    # While the daemon is away another program drops a guard and adds a
    # UNIQUE column that the accepted schema doesn't sync.
    with sqlite3.connect(path) as conn:
        conn.execute('DROP TRIGGER "_p2p_nn_ins_EMPLOYEE"')
        conn.execute("ALTER TABLE EMPLOYEE ADD COLUMN TAG TEXT")
        conn.execute("CREATE UNIQUE INDEX tag_unique ON EMPLOYEE(TAG)")
    conn.close()

    store = await Store.open(path, bundle=BUNDLE, name=NAME)
    try:
        assert store.sync_schema_version == 0
        assert [(p.rule, p.path) for p in store.schema_problems] == [
            ("unique-column-not-synced", "/dbSchema/0/tables/0/deviceSyncFields")
        ]
        with pytest.raises(ConstraintViolation):
            await store.insert("EMPLOYEE", {"NAME": None})
    finally:
        await store.close()


# --------------------------------------------------------------------------
# schema.validate against a store


async def test_check_document_against_the_store(store: Store, schema_file) -> None:
    await make(store, EMPLOYEE_NULLABLE, "INSERT INTO EMPLOYEE(AGE) VALUES (1), (2)")
    doc = nullable_example()
    # Text or value, same answer; NULLs are counted.
    for document in (doc, json.dumps(doc)):
        report = await store.check_sync_schema(document)
        assert not report.valid
        assert [(e.rule, e.path) for e in report.errors] == [
            ("conflict-column-has-nulls", "/dbSchema/0/tables/0/fields/0/primaryKey")
        ]
        assert "2 rows" in report.errors[0].message
    await store.execute("UPDATE EMPLOYEE SET NAME = 'n' || ID")
    assert (await store.check_sync_schema(doc)).valid
    await set_sv(store, schema_file(doc), "EMPLOYEE")

    # Layer 3 against the accepted version.
    bumped_bad_type = changed(doc, lambda d: (d["dbSchema"][0].update(version=1), d["dbSchema"][0]["tables"][0]["fields"].append(
        {"columnName": "AGE", "type": "Text", "primaryKey": False}
    )))
    report = await store.check_sync_schema(bumped_bad_type)
    assert {(e.rule, e.path) for e in report.errors} == {
        ("field-type-mismatch", "/dbSchema/0/tables/0/fields/1/type")
    }
    unbumped = changed(doc, lambda d: d["dbSchema"][0]["tables"][0]["fields"].append(
        {"columnName": "AGE", "type": "Integer", "primaryKey": False}
    ))
    report = await store.check_sync_schema(unbumped)
    assert [e.rule for e in report.errors] == ["version-not-increased"]
    # Never raises for a bad document, and nothing was changed by checking.
    for bad in ("{not json", "[]", {"dbSchema": 5}, 42, None, b"\xff"):
        assert not (await store.check_sync_schema(bad)).valid
    assert store.sync_schema_version == 0


async def test_check_document_tables_not_created_yet_get_document_rules(store: Store) -> None:
    await make(store, EMPLOYEE)  # no EMPLOYEE2 yet
    report = await store.check_sync_schema(valid_example())
    assert report.valid, report.to_dict()
    broken = changed(valid_example(), lambda d: d["dbSchema"][0]["tables"][1].pop("deviceSyncFields"))
    report = await store.check_sync_schema(broken)
    assert [(e.rule, e.path) for e in report.errors] == [("sync-fields-missing", "/dbSchema/0/tables/1")]
