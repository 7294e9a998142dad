"""Store (in-process, real SQLite file in a temp dir): open, labels, SQL, the
API guard rails, distributed and device tables.

Another connection to the same file stands in for "another program" here;
tests/integration does the same with real other processes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from p2pstore.errors import (
    ColumnNotFound,
    CompositeKeyNotSupported,
    ConstraintViolation,
    InvalidParams,
    InvalidPredicate,
    P2PStoreError,
    PermissionDenied,
    ReadOnlyTable,
    ResultTooLarge,
    SecurityLabelMismatch,
    SqlError,
    StoreInvalid,
    TableNotDistributed,
    TableNotFound,
    TableTypeLocked,
)
from p2pstore.store import capture
from p2pstore.store.database import BACKGROUND_QUEUED, BACKGROUND_QUIET_S, MAX_QUERY_ROWS, VACUUM_MIN_PAGES, Store

DEVICE = "ABCDEFG-HIJKLMN-OPQRSTU"


async def open_store(path: Path, **kw: Any) -> Store:
    return await Store.open(path, bundle="default", name=path.stem, **kw)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "shop.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    s = await open_store(db_path)
    await s.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT UNIQUE, photo BLOB, n REAL)")
    yield s
    await s.close()


@pytest.fixture
def announced(store: Store) -> list[list[dict[str, Any]]]:
    seen: list[list[dict[str, Any]]] = []
    store.on_changes = lambda _store, batch: seen.append(batch.change_infos())
    return seen


async def rows(store: Store, sql: str, params: Any = None) -> list[list[Any]]:
    return (await store.query(sql, params))["rows"]


async def log_size(store: Store) -> int:
    return (await rows(store, "SELECT count(*) FROM _p2p_log"))[0][0]


# -- open ------------------------------------------------------------------------------

async def test_open_creates_the_file_in_wal_mode(db_path: Path) -> None:
    s = await open_store(db_path)
    try:
        assert db_path.exists()
        other = sqlite3.connect(db_path)
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        other.close()
    finally:
        await s.close()


async def test_busy_timeout_is_set_on_the_connection(db_path: Path) -> None:
    s = await open_store(db_path, busy_timeout_ms=1234)
    try:
        assert await s.run(lambda c: c.execute("PRAGMA busy_timeout").fetchone()[0]) == 1234
    finally:
        await s.close()


async def test_api_write_waits_for_another_writer_instead_of_failing(store: Store, db_path: Path) -> None:
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO T(name) VALUES ('outside')")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    start = time.monotonic()  # before the timer runs: the commit comes >= 0.3 s after this
    release.start()
    try:
        await store.insert("T", {"name": "api"})
        assert time.monotonic() - start >= 0.2  # it really waited for the lock
        assert await rows(store, "SELECT name FROM T ORDER BY id") == [["outside"], ["api"]]
    finally:
        release.join()
        other.close()


async def test_busy_past_the_timeout_is_a_clear_error_and_the_store_recovers(db_path: Path) -> None:
    s = await open_store(db_path, busy_timeout_ms=100)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        await s.execute("CREATE TABLE T (id INTEGER PRIMARY KEY)")
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(SqlError) as info:
            await s.insert("T", {"id": 1})
        assert "locked" in info.value.message
        other.execute("ROLLBACK")
        assert await s.insert("T", {"id": 2}) == 2
    finally:
        other.close()
        await s.close()


async def test_a_file_that_is_not_sqlite_is_store_invalid(db_path: Path) -> None:
    db_path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreInvalid) as info:
        await open_store(db_path)
    assert str(db_path) in info.value.message


# -- security label ----------------------------------------------------------------------

async def test_label_defaults_to_s1(db_path: Path) -> None:
    s = await open_store(db_path)
    assert s.security_label == 1
    await s.close()


async def test_label_is_stored_with_the_store(db_path: Path) -> None:
    s = await open_store(db_path, security_label=3)
    assert s.security_label == 3
    await s.close()
    s = await open_store(db_path)  # no label given: the stored one
    assert s.security_label == 3
    await s.close()


async def test_reopening_with_a_lower_label_is_refused(db_path: Path) -> None:
    s = await open_store(db_path, security_label=3)
    await s.close()
    with pytest.raises(SecurityLabelMismatch) as info:
        await open_store(db_path, security_label=2)
    assert info.value.data == {"stored": "S3", "requested": "S2"}
    s = await open_store(db_path)
    assert s.security_label == 3  # unchanged by the refused open
    await s.close()


async def test_reopening_with_a_higher_label_raises_it(db_path: Path) -> None:
    s = await open_store(db_path, security_label=2)
    await s.close()
    s = await open_store(db_path, security_label=4)
    assert s.security_label == 4
    await s.close()
    s = await open_store(db_path)
    assert s.security_label == 4
    await s.close()


async def test_set_security_label_only_raises(store: Store) -> None:
    await store.set_security_label(2)
    assert store.security_label == 2
    with pytest.raises(SecurityLabelMismatch):
        await store.set_security_label(1)
    assert store.security_label == 2


# -- execute / query ------------------------------------------------------------------------

async def test_execute_reports_rows_affected_and_last_rowid(store: Store) -> None:
    assert await store.execute("INSERT INTO T(name) VALUES (?), (?)", ["a", "b"]) == {"rows_affected": 2, "last_insert_rowid": 2}
    assert (await store.execute("UPDATE T SET n = 1.5"))["rows_affected"] == 2
    assert (await store.execute("DELETE FROM T WHERE name = :name", {"name": "a"}))["rows_affected"] == 1


async def test_query_returns_columns_and_rows_with_blobs_as_bytes(store: Store) -> None:
    await store.insert("T", {"name": "a", "photo": b"\x00\xff", "n": None})
    result = await store.query("SELECT id, name, photo, n FROM T WHERE name = ?", ["a"])
    assert result == {"columns": ["id", "name", "photo", "n"], "rows": [[1, "a", b"\x00\xff", None]]}


async def test_sql_errors(store: Store) -> None:
    with pytest.raises(SqlError) as info:
        await store.execute("SELEC 1")
    assert "syntax error" in info.value.data["sqlite"]
    with pytest.raises(SqlError):
        await store.query("SELECT nope FROM T")
    with pytest.raises(SqlError):
        await store.execute("INSERT INTO missing VALUES (1)")
    with pytest.raises(SqlError):
        await store.execute("INSERT INTO T(name) VALUES ('a'); INSERT INTO T(name) VALUES ('b')")
    assert await rows(store, "SELECT count(*) FROM T") == [[0]]  # nothing of the two-statement string ran


async def test_constraint_violation(store: Store) -> None:
    await store.insert("T", {"name": "a"})
    with pytest.raises(ConstraintViolation):
        await store.insert("T", {"name": "a"})
    with pytest.raises(ConstraintViolation):
        await store.execute("INSERT INTO T(id) VALUES (1)")


async def test_a_failed_statement_leaves_no_trace(store: Store, announced: list[Any]) -> None:
    await store.set_distributed_tables(["T"])
    await store.insert("T", {"name": "a"})
    before = await log_size(store)
    with pytest.raises(ConstraintViolation):
        await store.execute("INSERT INTO T(name) VALUES ('b'), ('a')")  # second row fails
    assert await rows(store, "SELECT name FROM T") == [["a"]]
    assert await log_size(store) == before
    assert len(announced) == 1


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO T(name) VALUES ('q') RETURNING id",
        "DELETE FROM T RETURNING id",
        "UPDATE T SET name = 'changed' RETURNING id",
        "CREATE TABLE sneaky(a)",
        "DELETE FROM T",
    ],
)
async def test_query_cannot_modify_data(store: Store, announced: list[Any], sql: str) -> None:
    await store.set_distributed_tables(["T"])
    await store.insert("T", {"name": "keep"})
    before = await log_size(store)
    try:
        await store.query(sql)
    except P2PStoreError:
        pass  # refusing is fine too; changing data is not
    assert await rows(store, "SELECT id, name FROM T") == [[1, "keep"]]
    assert await rows(store, "SELECT count(*) FROM sqlite_master WHERE name = 'sneaky'") == [[0]]
    assert await log_size(store) == before
    await store.poll()
    assert len(announced) == 1


async def test_query_row_cap(store: Store) -> None:
    sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT ?) SELECT x FROM c"
    assert len(await rows(store, sql, [MAX_QUERY_ROWS])) == MAX_QUERY_ROWS
    with pytest.raises(ResultTooLarge) as info:
        await store.query(sql, [MAX_QUERY_ROWS + 1])
    assert "LIMIT" in info.value.message


async def test_pragma_reads_are_allowed(store: Store) -> None:
    assert await rows(store, "PRAGMA journal_mode") == [["wal"]]


async def test_a_row_returning_statement_through_execute_does_not_break_the_store(store: Store) -> None:
    await store.execute("SELECT * FROM T")
    assert await store.insert("T", {"name": "after"}) == 1


async def test_insert_returning_through_execute(store: Store) -> None:
    await store.set_distributed_tables(["T"])
    result = await store.execute("INSERT INTO T(name) VALUES ('r') RETURNING id")
    assert result["rows_affected"] == 1
    assert await rows(store, "SELECT name FROM T") == [["r"]]


# -- what the API may not do (authorizer) --------------------------------------------------------

DENIED = [
    # BEGIN IMMEDIATE and COMMIT: see test_cached_daemon_statements_are_still_checked
    "BEGIN",
    "BEGIN DEFERRED",
    "ROLLBACK",
    "END",
    "SAVEPOINT s1",
    "RELEASE s1",
    "ATTACH DATABASE ':memory:' AS other",
    "DETACH DATABASE main",
    "INSERT INTO _p2p_log(tid, pk, op) VALUES (1, 1, 1)",
    "UPDATE _p2p_meta SET value = 1",
    "DELETE FROM _p2p_tables",
    "INSERT INTO _p2p_apply VALUES (1)",
    "INSERT INTO _P2P_APPLY VALUES (1)",
    "INSERT INTO main._p2p_apply VALUES (1)",
    "DELETE FROM _p2p_stamps",
    "DROP TABLE _p2p_log",
    "DROP VIEW _p2p_changes",
    "DROP TRIGGER _p2p_ins_T",
    "DROP TABLE T",  # would drop T's capture triggers with it
    "PRAGMA journal_mode = DELETE",
    "PRAGMA locking_mode = EXCLUSIVE",
    "PRAGMA writable_schema = ON",
    "PRAGMA query_only = 1",
    "PRAGMA recursive_triggers = 1",
]


@pytest.mark.parametrize("sql", DENIED)
async def test_statements_the_api_refuses(store: Store, announced: list[Any], sql: str) -> None:
    await store.set_distributed_tables(["T"])
    with pytest.raises(PermissionDenied) as info:
        await store.execute(sql)
    assert info.value.name == "PERMISSION_DENIED"
    # The store is intact: capture still works and the file is still WAL.
    await store.insert("T", {"name": "still works"})
    assert announced[-1] == [{"table": "T", "type": "data", "inserted": [1], "updated": [], "deleted": []}]
    assert await rows(store, "PRAGMA journal_mode") == [["wal"]]


INTERNAL_DDL = [
    "ALTER TABLE _p2p_log RENAME TO moved",
    "ALTER TABLE _p2p_meta ADD COLUMN x",
    "CREATE TRIGGER _p2p_ins_U AFTER INSERT ON T BEGIN SELECT 1; END",
    "CREATE TABLE _p2p_mine(a)",
    "CREATE INDEX _p2p_idx ON T(name)",
    "CREATE TRIGGER on_log AFTER INSERT ON _p2p_log BEGIN SELECT 1; END",
]


@pytest.mark.parametrize("sql", INTERNAL_DDL)
async def test_ddl_on_internals_is_refused(store: Store, sql: str) -> None:
    await store.set_distributed_tables(["T"])
    with pytest.raises(PermissionDenied):
        await store.execute(sql)
    await store.insert("T", {"name": "still works"})


async def test_user_trigger_cannot_write_internals_through_the_api(store: Store) -> None:
    await store.set_distributed_tables(["T"])
    await store.insert("T", {"name": "a"})
    before = await log_size(store)
    try:
        await store.execute("CREATE TRIGGER wipe AFTER UPDATE ON T BEGIN DELETE FROM _p2p_log; END")
    except PermissionDenied:
        return  # refusing the trigger itself is fine
    with pytest.raises(PermissionDenied):
        await store.execute("UPDATE T SET name = 'b'")
    assert await log_size(store) == before


async def test_cached_daemon_statements_are_still_checked(store: Store) -> None:
    await store.set_security_label(3)
    await store.query("SELECT 1")  # the daemon has now prepared BEGIN and ROLLBACK (and BEGIN IMMEDIATE, COMMIT)
    for sql in ("BEGIN", "ROLLBACK", "BEGIN IMMEDIATE", "COMMIT"):
        with pytest.raises(PermissionDenied):
            await store.execute(sql)
    with pytest.raises(PermissionDenied):
        await store.execute("INSERT OR REPLACE INTO _p2p_meta(key, value) VALUES (?, ?)", ["security_label", 1])
    assert await rows(store, "SELECT value FROM _p2p_meta WHERE key = 'security_label'") == [[3]]


async def test_renaming_a_distributed_table_is_a_clear_error(store: Store) -> None:
    await store.set_distributed_tables(["T"])
    with pytest.raises(PermissionDenied):
        await store.execute("ALTER TABLE T RENAME TO U")
    await store.insert("T", {"name": "still there"})


# -- insert / update / delete ------------------------------------------------------------------

async def test_insert_returns_rowid_and_round_trips_values(store: Store) -> None:
    assert await store.insert("T", {"name": "a", "photo": b"\x01\x02", "n": 2.5}) == 1
    assert await store.insert("T", {}) == 2  # DEFAULT VALUES
    assert await rows(store, "SELECT * FROM T") == [[1, "a", b"\x01\x02", 2.5], [2, None, None, None]]


async def test_insert_into_unknown_or_internal_table(store: Store) -> None:
    for table in ("missing", "_p2p_log", "_P2P_META", "sqlite_master"):
        with pytest.raises(TableNotFound):
            await store.insert(table, {"x": 1})


async def test_insert_checks_columns(store: Store) -> None:
    with pytest.raises(ColumnNotFound) as info:
        await store.insert("T", {"name": "a", "nope": 1})
    assert "'nope'" in info.value.message and info.value.data["columns"] == ["nope"]
    with pytest.raises(ColumnNotFound):
        await store.insert("T", {'name" ) VALUES (1); --': 1})
    with pytest.raises(InvalidParams):
        await store.insert("T", {"name": ["not", "a", "value"]})
    with pytest.raises(InvalidParams):
        await store.insert("T", ["name"])  # type: ignore[arg-type]
    assert await rows(store, "SELECT count(*) FROM T") == [[0]]


async def test_update_and_delete_with_predicates(store: Store) -> None:
    for name in ("a", "b", "c"):
        await store.insert("T", {"name": name, "n": 1})
    assert await store.update({"n": 9}, {"table": "T", "where": [["name", "in", ["a", "c"]]]}) == 2
    assert await rows(store, "SELECT name FROM T WHERE n = 9") == [["a"], ["c"]]
    assert await store.delete({"table": "T", "where": [["n", "=", 9]]}) == 2
    assert await rows(store, "SELECT name FROM T") == [["b"]]
    assert await store.delete({"table": "T"}) == 1  # no where: every row


async def test_update_refusals(store: Store) -> None:
    await store.insert("T", {"name": "a"})
    with pytest.raises(InvalidParams):
        await store.update({}, {"table": "T"})
    with pytest.raises(ColumnNotFound):
        await store.update({"nope": 1}, {"table": "T"})
    with pytest.raises(InvalidPredicate):
        await store.update({"n": 1}, {"where": []})  # no table
    with pytest.raises(TableNotFound):
        await store.update({"n": 1}, {"table": "missing"})
    with pytest.raises(InvalidParams):
        await store.update({"n": 1}, {"table": "T", "limit": 1})
    with pytest.raises(InvalidParams):
        await store.delete({"table": "T", "order_by": [["id", "asc"]]})
    assert await rows(store, "SELECT name, n FROM T") == [["a", None]]


@pytest.mark.parametrize("column", ["name = name OR 1=1 --", 'name" OR "1"="1', "1", "id); DROP TABLE T; --"])
async def test_injection_in_predicate_columns_is_refused_before_any_sql(store: Store, column: str) -> None:
    await store.insert("T", {"name": "a"})
    with pytest.raises(InvalidPredicate):
        await store.delete({"table": "T", "where": [[column, "=", "x"]]})
    with pytest.raises(InvalidPredicate):
        await store.update({"n": 1}, {"table": "T", "where": [["name", "= 'x' OR 1=1 --", "x"]]})
    assert await rows(store, "SELECT name, n FROM T") == [["a", None]]


# -- distributed tables ---------------------------------------------------------------------

async def test_composite_key_is_refused_and_nothing_changes(store: Store) -> None:
    await store.execute("CREATE TABLE C (a INTEGER, b TEXT, PRIMARY KEY (a, b))")
    with pytest.raises(CompositeKeyNotSupported) as info:
        await store.set_distributed_tables(["T", "C"])
    assert info.value.data["table"] == "C"
    assert store.distributed == {} and store.table_type is None
    assert await rows(store, "SELECT count(*) FROM sqlite_master WHERE type = 'trigger'") == [[0]]


async def test_unknown_table_cannot_be_distributed(store: Store) -> None:
    with pytest.raises(TableNotFound):
        await store.set_distributed_tables(["missing"])
    with pytest.raises(TableNotFound):
        await store.set_distributed_tables(["_p2p_log"])


async def test_table_type_is_locked_after_the_first_call(store: Store) -> None:
    await store.execute("CREATE TABLE U (id INTEGER PRIMARY KEY)")
    await store.set_distributed_tables(["T"])
    with pytest.raises(TableTypeLocked) as info:
        await store.set_distributed_tables(["U"], table_type="single_version")
    assert info.value.data == {"current": "collaborative", "requested": "single_version"}
    await store.set_distributed_tables(["U"])  # same type: adds
    assert sorted(store.distributed) == ["T", "U"]


async def test_table_type_must_be_known(store: Store) -> None:
    with pytest.raises(InvalidParams):
        await store.set_distributed_tables(["T"], table_type="device")


async def test_existing_rows_are_logged_but_not_announced(store: Store, announced: list[Any]) -> None:
    await store.insert("T", {"name": "a"})
    await store.insert("T", {"name": "b"})
    await store.set_distributed_tables(["T"])
    assert announced == []
    logged = await rows(store, "SELECT tbl, pk, op FROM _p2p_changes ORDER BY seq")
    assert logged == [["T", 1, 1], ["T", 2, 1]]
    await store.poll()
    assert announced == []
    # Setting it again logs nothing twice.
    await store.set_distributed_tables(["T"], auto_sync=True)
    assert await log_size(store) == 2
    assert store.auto_sync == {"T": True}


async def test_distributed_tables_survive_reopen(db_path: Path) -> None:
    s = await open_store(db_path)
    await s.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT)")
    await s.set_distributed_tables(["T"], auto_sync=True)
    await s.close()
    s = await open_store(db_path)
    try:
        assert list(s.distributed) == ["T"] and s.table_type == "collaborative" and s.auto_sync == {"T": True}
        assert s.require_distributed("T").key == "id"
        with pytest.raises(TableNotDistributed):
            s.require_distributed("U")
    finally:
        await s.close()


# -- collaborative device tables -------------------------------------------------------------

@pytest.fixture
async def device_table(store: Store) -> str:
    await store.set_distributed_tables(["T"])
    return await store.create_device_table(DEVICE, "T")


async def test_device_table_name_and_shape(store: Store, device_table: str) -> None:
    assert device_table == "dev_ABCDEFGHIJKLMNOPQRSTU_T"
    assert await store.create_device_table(DEVICE, "T") == device_table  # idempotent
    cols = await rows(store, f"SELECT name, pk FROM pragma_table_info('{device_table}')")
    assert cols == [["id", 1], ["name", 0], ["photo", 0], ["n", 0]]


async def test_device_table_needs_a_distributed_source(store: Store) -> None:
    with pytest.raises(TableNotDistributed):
        await store.create_device_table(DEVICE, "T")


async def test_device_id_is_checked(store: Store) -> None:
    await store.set_distributed_tables(["T"])
    with pytest.raises(InvalidParams):
        await store.create_device_table("bad id; DROP TABLE T", "T")


@pytest.mark.parametrize(
    "write",
    [
        lambda s, t: s.insert(t, {"id": 1, "name": "x"}),
        lambda s, t: s.execute(f'INSERT INTO "{t}"(id, name) VALUES (1, \'x\')'),
        lambda s, t: s.update({"name": "y"}, {"table": t}),
        lambda s, t: s.delete({"table": t}),
        lambda s, t: s.execute(f'DELETE FROM "{t}"'),
    ],
    ids=["insert", "execute-insert", "update", "delete", "execute-delete"],
)
async def test_device_table_is_read_only_to_the_api(store: Store, device_table: str, write: Any) -> None:
    await _apply(store, device_table, [(1, "from peer")])
    with pytest.raises(ReadOnlyTable) as info:
        await write(store, device_table)
    assert info.value.name == "READ_ONLY_TABLE"
    assert DEVICE in info.value.message
    assert await rows(store, f'SELECT id, name FROM "{device_table}"') == [[1, "from peer"]]


async def test_device_table_is_read_only_to_other_programs(store: Store, device_table: str, db_path: Path) -> None:
    other = sqlite3.connect(db_path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="READ_ONLY_TABLE"):
            other.execute(f'INSERT INTO "{device_table}"(id, name) VALUES (1, \'x\')')
        other.rollback()
    finally:
        other.close()


async def _apply(store: Store, table: str, values: list[tuple[int, str]]) -> None:
    """What the sync apply path does: write inside the _p2p_apply guard, one transaction."""

    def op(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO _p2p_apply VALUES (1)")
        conn.executemany(f'INSERT OR REPLACE INTO "{table}"(id, name) VALUES (?, ?)', values)
        conn.execute("DELETE FROM _p2p_apply")
        conn.execute("COMMIT")

    await store.run(op)


async def test_apply_guard_lets_writes_through_and_they_are_not_captured(
    store: Store, device_table: str, announced: list[Any]
) -> None:
    before = await log_size(store)
    await _apply(store, device_table, [(1, "a"), (2, "b")])
    assert await rows(store, f'SELECT id, name FROM "{device_table}" ORDER BY id') == [[1, "a"], [2, "b"]]
    await store.poll()
    assert await log_size(store) == before
    assert announced == []
    assert await rows(store, "SELECT count(*) FROM _p2p_apply") == [[0]]


async def test_device_table_cannot_be_distributed(store: Store, device_table: str) -> None:
    with pytest.raises(ReadOnlyTable):
        await store.set_distributed_tables([device_table])


# -- the store stays usable after errors ------------------------------------------------------

async def test_many_errors_in_a_row_leave_the_connection_clean(store: Store) -> None:
    await store.set_distributed_tables(["T"])
    for sql in ["SELEC", "BEGIN", "INSERT INTO _p2p_log VALUES (1)", "INSERT INTO T(id) VALUES ('x', 2)"] * 5:
        with pytest.raises(P2PStoreError):
            await store.execute(sql)
    assert not await store.run(lambda c: c.in_transaction)
    await store.insert("T", {"name": "ok"})
    assert await rows(store, "SELECT name FROM T") == [["ok"]]


async def test_concurrent_api_writes_are_serialised(store: Store) -> None:
    await store.set_distributed_tables(["T"])
    await asyncio.gather(*(store.insert("T", {"name": f"n{i}"}) for i in range(50)))
    assert await rows(store, "SELECT count(*) FROM T") == [[50]]
    hlcs = [r[0] for r in await rows(store, "SELECT hlc FROM _p2p_changes ORDER BY seq")]
    assert len(hlcs) == 50 and hlcs == sorted(hlcs) and len(set(hlcs)) == 50


async def test_adding_a_column_to_a_distributed_table_keeps_capturing_it(store: Store, announced: list[Any]) -> None:
    await store.set_distributed_tables(["T"])
    await store.insert("T", {"name": "a"})
    await store.execute("ALTER TABLE T ADD COLUMN extra TEXT")
    await store.update({"extra": "x"}, {"table": "T", "where": [["name", "=", "a"]]})
    assert announced[-1] == [{"table": "T", "type": "data", "inserted": [], "updated": [1], "deleted": []}]
    # The changed-column mask covers the new column (bit of its position).
    columns = (await store.query("SELECT name FROM pragma_table_info('T')"))["rows"]
    position = [c[0] for c in columns].index("extra")
    mask = (await store.query("SELECT cols FROM _p2p_log ORDER BY seq DESC LIMIT 1"))["rows"][0][0]
    assert mask == 1 << position


@pytest.mark.parametrize("sql", [
    "-- a note first\nALTER TABLE T ADD COLUMN extra TEXT",
    "/* a comment */ alter table T add column extra TEXT",
    "\n\n  ALTER TABLE \"T\" ADD extra TEXT",
])
async def test_a_schema_change_is_seen_however_it_is_written(store: Store, announced: list[Any], sql: str) -> None:
    """The authorizer, not the statement's first word, says a statement changed
    the schema: the capture triggers are rebuilt for the new column whatever
    comes before ALTER."""
    await store.set_distributed_tables(["T"])
    await store.insert("T", {"name": "a"})
    await store.execute(sql)
    await store.update({"extra": "x"}, {"table": "T", "where": [["name", "=", "a"]]})
    columns = [c[0] for c in (await store.query("SELECT name FROM pragma_table_info('T')"))["rows"]]
    mask = (await store.query("SELECT cols FROM _p2p_log ORDER BY seq DESC LIMIT 1"))["rows"][0][0]
    assert mask == 1 << columns.index("extra"), "the changed-column mask must cover the column the ALTER added"


@pytest.mark.parametrize("sql", ["/* c */ ALTER TABLE T RENAME TO U", "-- bye\nDROP TABLE T", "  /**/drop table T"])
async def test_renaming_or_dropping_behind_a_comment_is_refused_like_any_other(store: Store, sql: str) -> None:
    await store.set_distributed_tables(["T"])
    with pytest.raises(PermissionDenied):
        await store.execute(sql)  # (a DROP is refused earlier, by the authorizer: it would drop our triggers)
    await store.insert("T", {"name": "still there"})
    assert await rows(store, "SELECT name FROM T") == [["still there"]]


async def test_dropping_a_distributed_table_through_the_api_is_refused(store: Store) -> None:
    await store.set_distributed_tables(["T"])
    with pytest.raises(PermissionDenied):
        await store.execute("DROP TABLE T")
    await store.insert("T", {"name": "still there"})


async def test_compact_keeps_the_stream_and_announces_what_it_stamps(store: Store, announced: list[Any], db_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Store.compact: a collaborative store keeps its own changes (its stream);
    an outside write it stamps on the way is announced like a poll's."""
    await store.set_distributed_tables(["T"])
    for i in range(30):
        await store.insert("T", {"name": f"n{i}"})
    announced.clear()
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("UPDATE T SET n = 1 WHERE id = 5")
    other.close()
    before = await log_size(store)
    assert await store.compact() == 0  # all of it is recent history, kept
    assert [c["updated"] for batch in announced for c in batch] == [[5]]
    monkeypatch.setattr(capture, "COMPACT_KEEP_RECENT", 0)
    assert await store.compact() == 0
    assert await log_size(store) == before
    assert await rows(store, "SELECT count(DISTINCT pk) FROM _p2p_log") == [[30]]


async def test_a_new_store_file_gives_the_pages_compaction_frees_back_to_the_disk(store: Store, db_path: Path) -> None:
    """Store files are made with auto_vacuum INCREMENTAL: what compaction (or
    the application) frees is given back after it, a step at a time; a file
    made without it keeps its free pages for later writes."""
    pragma = sqlite3.connect(db_path)
    try:
        assert pragma.execute("PRAGMA auto_vacuum").fetchone() == (2,)
    finally:
        pragma.close()
    await store.execute("CREATE TABLE scratch(x BLOB)")
    await store.execute("WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 3000) "
                        "INSERT INTO scratch SELECT randomblob(3000) FROM c")
    await store.execute("DELETE FROM scratch")
    free = (await rows(store, "PRAGMA freelist_count"))[0][0]
    assert free > 2500
    given = await store.compact()
    assert given == 0  # (compaction dropped no log row: the pages were the application's)
    assert (await rows(store, "PRAGMA freelist_count"))[0][0] < VACUUM_MIN_PAGES
    assert (await rows(store, "PRAGMA page_count"))[0][0] < 500


async def test_a_file_made_without_auto_vacuum_keeps_its_free_pages(db_path: Path) -> None:
    plain = sqlite3.connect(db_path)
    plain.execute("CREATE TABLE scratch(x BLOB)")
    plain.execute("WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 1000) "
                  "INSERT INTO scratch SELECT randomblob(3000) FROM c")
    plain.execute("DELETE FROM scratch")
    plain.commit()
    plain.close()
    store = await open_store(db_path)
    try:
        free = (await rows(store, "PRAGMA freelist_count"))[0][0]
        assert free > 900 and await store.give_back_space() == 0
        assert (await rows(store, "PRAGMA freelist_count"))[0][0] == free
    finally:
        await store.close()


#: An endless result: only a cap counted while reading can stop it.
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x, randomblob(1000) FROM c"


async def test_query_byte_cap_stops_reading_at_the_cap(store: Store) -> None:
    """Issue 10 item 7: store.query had no byte limit (3,000 x 100 KB blobs -> 2 GB RSS)."""
    with pytest.raises(ResultTooLarge) as info:
        await store.query(ENDLESS, max_bytes=1 << 20)
    assert "LIMIT" in info.value.message and "OFFSET" in info.value.message
    assert info.value.data["max_bytes"] == 1 << 20
    # The store is fine after: no transaction or statement left open.
    await store.execute("CREATE TABLE after_cap (id INTEGER PRIMARY KEY)")
    assert await rows(store, "SELECT count(*) FROM after_cap") == [[0]]


async def test_query_byte_cap_counts_blobs_as_the_json_line_carries_them(store: Store) -> None:
    # 3 rows of a 3000-byte blob: 4000 bytes of base64 each in the answer.
    sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 3) SELECT zeroblob(3000) FROM c"
    assert len(await rows(store, sql)) == 3
    with pytest.raises(ResultTooLarge):
        await store.query(sql, max_bytes=3 * 4000)  # the raw bytes (9000) would fit, the JSON does not
    assert len((await store.query(sql, max_bytes=3 * 4100))["rows"]) == 3


async def test_query_row_cap_stops_an_endless_result(store: Store) -> None:
    with pytest.raises(ResultTooLarge):
        await store.query("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c")


# --------------------------------------------------------------------------
# Local work first (Store.run_background)


def _slow(order: list[str], tag: str, seconds: float = 0.02) -> Any:
    def op(conn: sqlite3.Connection) -> None:
        time.sleep(seconds)
        order.append(tag)
    return op


async def test_sync_work_lets_the_application_s_operations_go_first(store: Store) -> None:
    """Sync operations queued before an application's write do not all run
    before it: at most those already in the connection's queue do."""
    order: list[str] = []
    await store.run(_slow(order, "app0", 0))  # the application is at work
    sync_work = [asyncio.create_task(store.run_background(_slow(order, f"sync{i}"))) for i in range(5)]
    await asyncio.sleep(0.005)  # the first is on the connection's thread now
    await store.run(_slow(order, "app"))
    assert order.index("app") <= 1 + BACKGROUND_QUEUED, order
    await asyncio.gather(*sync_work)
    assert sorted(order) == ["app", "app0", *(f"sync{i}" for i in range(5))]


async def test_while_the_application_is_quiet_sync_work_queues_freely(store: Store) -> None:
    """A change fanned out to many peers is not held back by the turn-taking
    when the application has not been at work for BACKGROUND_QUIET_S."""
    await asyncio.sleep(BACKGROUND_QUIET_S * 1.5)
    order: list[str] = []
    sync_work = [asyncio.create_task(store.run_background(_slow(order, f"sync{i}"))) for i in range(5)]
    await asyncio.sleep(0.005)
    await store.run(_slow(order, "app"))
    assert order[-1] == "app", order
    await asyncio.gather(*sync_work)


async def test_sync_work_is_not_starved_by_a_steady_stream_of_application_operations(store: Store) -> None:
    order: list[str] = []

    async def steady() -> None:  # back-to-back application operations for ~0.5 s
        for i in range(25):
            await store.run(_slow(order, f"app{i}"))

    app = asyncio.create_task(steady())
    await asyncio.sleep(0.005)
    await store.run_background(_slow(order, "sync"))
    assert "sync" in order and order.index("sync") < 15, order  # it waited BACKGROUND_YIELD_S at most, not for all
    await app
