"""sync_schema.json end to end: real daemons (subprocesses), the API, SIGHUP,
the ``sqlite3`` shell as an outside writer, and the ``p2pstore schema
validate`` command.

The daemon reads the schema from its default path, ``<data dir>/sync_schema.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from p2pstore.errors import ConstraintViolation, SchemaInvalid, SchemaNotFound

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "tests" / "schema" / "seed_examples"
BUNDLE, STORE = "com.example.rdbDataSync", "RdbTest"
REF = {"store": STORE, "bundle": BUNDLE}
SV = {"table_type": "single_version"}
EMPLOYEE = (
    "CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, "
    "NAME TEXT NOT NULL UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB)"
)
EMPLOYEE2 = "CREATE TABLE EMPLOYEE2 (NAME TEXT NOT NULL UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB, PRIMARY KEY (NAME))"
EMPLOYEE_NULLABLE = (
    "CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, NAME TEXT UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB)"
)

pytestmark = pytest.mark.timeout(120)


def seed(name: str) -> Any:
    return json.loads((SEED / f"{name}.json").read_text(encoding="utf-8"))


def write_schema(daemon: Any, doc: Any) -> Path:
    path = daemon.data_dir / "sync_schema.json"
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return path


def open_store(client: Any, *creates: str) -> Path:
    path = Path(client.call("store.open", **REF)["path"])
    for sql in creates:
        client.call("store.execute", **REF, sql=sql)
    return path


def wait_for_log(daemon: Any, text: str, count: int = 1, timeout: float = 10.0) -> str:
    """Wait until ``text`` appears ``count`` times in the daemon's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = daemon.log()
        if log.count(text) >= count:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} did not appear {count} time(s) in the log:\n{daemon.log()[-4000:]}")


def sighup(daemon: Any) -> None:
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)


def schema_version(client: Any) -> int | None:
    [summary] = [s for s in client.call("status")["stores"] if s["store"] == STORE]
    return summary["schema_version"]


def changes(client: Any) -> list[list[Any]]:
    return client.call("store.query", **REF, sql="SELECT seq, tbl, pk, op, cols, hlc FROM _p2p_changes ORDER BY seq")["rows"]


def cli(*args: str, socket: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "p2pstore", *args]
    if socket is not None:
        argv += ["--socket", str(socket)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)


def sqlite3_shell(path: Path, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sqlite3", "-cmd", ".timeout 5000", str(path), sql], capture_output=True, text=True, timeout=30)


# --------------------------------------------------------------------------
# set_distributed_tables with table_type single_version


def test_seed_example_is_accepted_and_reported(daemon, client) -> None:
    shutil.copy(REPO / "sync_schema.json", daemon.data_dir / "sync_schema.json")
    open_store(client, EMPLOYEE, EMPLOYEE2)
    result = client.call("store.set_distributed_tables", **REF, tables=["EMPLOYEE", "EMPLOYEE2"], config=SV)
    assert result == {"schema_version": 0, "warnings": [], "resent": {}}
    assert schema_version(client) == 0
    wait_for_log(daemon, f"store {BUNDLE}/{STORE}: schema version 0 accepted")
    # Single-version rows merge into the table itself.
    client.call("store.insert", **REF, table="EMPLOYEE", values={"NAME": "Lisa", "AGE": 18})
    assert client.call("store.query", **REF, sql="SELECT NAME FROM EMPLOYEE")["rows"] == [["Lisa"]]


def test_warnings_are_returned_and_logged(daemon, client) -> None:
    write_schema(daemon, seed("sync_column_not_in_fields"))
    open_store(client, EMPLOYEE)
    result = client.call("store.set_distributed_tables", **REF, tables=["EMPLOYEE"], config=SV)
    assert result["warnings"] == [{
        "path": "/dbSchema/0/tables/0/deviceSyncFields/1",
        "rule": "sync-column-not-in-fields",
        "message": "Sync column 'AGE' of table 'EMPLOYEE' is not described in fields, so it will not be synced.",
    }]
    wait_for_log(daemon, "schema warning: sync-column-not-in-fields at /dbSchema/0/tables/0/deviceSyncFields/1")


@pytest.mark.parametrize(
    ("example", "create", "rule", "path"),
    [
        ("two_conflict_columns", EMPLOYEE, "conflict-column-multiple", "/dbSchema/0/tables/0/fields/1/primaryKey"),
        ("sync_column_wrong_case", EMPLOYEE, "sync-column-not-in-table", "/dbSchema/0/tables/0/deviceSyncFields/0"),
        (
            "unique_column_not_synced",
            "CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, NAME TEXT NOT NULL UNIQUE, AGE INTEGER UNIQUE, "
            "SALARY REAL, CODES BLOB)",
            "unique-column-not-synced",
            "/dbSchema/0/tables/0/deviceSyncFields",
        ),
        (
            "table_without_primary_key",
            "CREATE TABLE EMPLOYEE (NAME TEXT NOT NULL UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB)",
            "table-without-primary-key",
            "/dbSchema/0/tables/0",
        ),
    ],
)
def test_seed_wrong_examples_are_refused_through_the_api(daemon, client, example: str, create: str, rule: str, path: str) -> None:
    write_schema(daemon, seed(example))
    open_store(client, create)
    with pytest.raises(SchemaInvalid) as info:
        client.call("store.set_distributed_tables", **REF, tables=["EMPLOYEE"], config=SV)
    assert (rule, path) in {(e["rule"], e["path"]) for e in info.value.data["errors"]}
    assert info.value.code == -31300 and info.value.data["warnings"] == []
    wait_for_log(daemon, f"schema refused: {rule} at {path}")
    # Nothing changed: the table isn't distributed, and the store can still
    # become collaborative (its type wasn't fixed).
    [summary] = [s for s in client.call("status")["stores"] if s["store"] == STORE]
    assert summary["distributed_tables"] == [] and summary["table_type"] is None and summary["schema_version"] is None


def test_missing_schema_file(daemon, client) -> None:
    open_store(client, EMPLOYEE)
    with pytest.raises(SchemaNotFound) as info:
        client.call("store.set_distributed_tables", **REF, tables=["EMPLOYEE"], config=SV)
    assert str(daemon.data_dir / "sync_schema.json") in info.value.message


def test_collaborative_store_never_reads_the_schema_file(daemon, client) -> None:
    (daemon.data_dir / "sync_schema.json").write_text("this is not JSON {")
    open_store(client, EMPLOYEE)
    assert client.call("store.set_distributed_tables", **REF, tables=["EMPLOYEE"]) == {}
    assert client.call("store.set_distributed_tables", **REF, tables=["EMPLOYEE"],
                       config={"table_type": "collaborative"}) == {}
    sighup(daemon)
    log = wait_for_log(daemon, "no open store has single_version tables")
    assert "schema refused" not in log and "invalid-json" not in log and "schema version" not in log


# --------------------------------------------------------------------------
# NULL in the conflict column


def nullable_schema() -> Any:
    doc = seed("conflict_column_nullable")
    doc["dbSchema"][0]["tables"][0]["fields"][0]["primaryKey"] = True  # see docs/sync_schema.md
    return doc


def test_existing_nulls_fail_then_null_writes_fail_for_api_and_sqlite3_shell(daemon, client) -> None:
    write_schema(daemon, nullable_schema())
    path = open_store(client, EMPLOYEE_NULLABLE)
    for age in (25, 26):
        client.call("store.insert", **REF, table="EMPLOYEE",
                    values={"NAME": None, "AGE": age, "SALARY": 23456.7, "CODES": b"\x01\x02\x03\x04\x05"})

    with pytest.raises(SchemaInvalid) as info:
        client.call("store.set_distributed_tables", **REF, tables=["EMPLOYEE"], config=SV)
    [error] = info.value.data["errors"]
    assert error["rule"] == "conflict-column-has-nulls"
    assert error["path"] == "/dbSchema/0/tables/0/fields/0/primaryKey"
    assert "2 rows" in error["message"]

    client.call("store.execute", **REF, sql="UPDATE EMPLOYEE SET NAME = 'n' || ID")
    client.call("store.set_distributed_tables", **REF, tables=["EMPLOYEE"], config=SV)

    with pytest.raises(ConstraintViolation) as err:
        client.call("store.insert", **REF, table="EMPLOYEE", values={"NAME": None, "AGE": 25})
    assert "conflict column NAME" in err.value.message
    with pytest.raises(ConstraintViolation):
        client.call("store.update", **REF, values={"NAME": None}, predicates={"table": "EMPLOYEE", "where": [["AGE", "=", 25]]})

    shell = sqlite3_shell(path, "INSERT INTO EMPLOYEE(NAME, AGE) VALUES (NULL, 30);")
    assert shell.returncode != 0 and "CONSTRAINT_VIOLATION" in shell.stderr
    shell = sqlite3_shell(path, "UPDATE EMPLOYEE SET NAME = NULL;")
    assert shell.returncode != 0 and "CONSTRAINT_VIOLATION" in shell.stderr
    shell = sqlite3_shell(path, "INSERT INTO EMPLOYEE(NAME, AGE) VALUES ('shell', 31);")
    assert shell.returncode == 0, shell.stderr
    rows = client.call("store.query", **REF, sql="SELECT NAME FROM EMPLOYEE ORDER BY ID")["rows"]
    assert rows == [["n1"], ["n2"], ["shell"]]


# --------------------------------------------------------------------------
# Upgrades: a new file, then SIGHUP or set_distributed_tables


#: AGE is UNIQUE too, so the seed's "conflict column changed to AGE" file
#: breaks only the upgrade rule, not layer 2.
EMPLOYEE_AGE_UNIQUE = EMPLOYEE.replace("AGE INTEGER", "AGE INTEGER UNIQUE")


def _accepted_v0(daemon, client, create: str = EMPLOYEE, rows: int = 4) -> None:
    write_schema(daemon, seed("sync_column_removed_old"))  # version 0: NAME (conflict) and AGE
    open_store(client, create)
    for i in range(rows):
        client.call("store.insert", **REF, table="EMPLOYEE", values={"NAME": f"n{i}", "AGE": 20 + i})
    client.call("store.set_distributed_tables", **REF, tables=["EMPLOYEE"], config=SV)
    assert schema_version(client) == 0


def _same_version_more_columns() -> Any:
    doc = seed("sync_column_removed_old")
    table = doc["dbSchema"][0]["tables"][0]
    table["deviceSyncFields"].append("SALARY")
    table["fields"].append({"columnName": "SALARY", "type": "Float", "primaryKey": False, "notNull": False, "autoIncrement": False})
    return doc


REFUSED = [
    ("version_not_increased", EMPLOYEE, _same_version_more_columns, "version-not-increased", "/dbSchema/0/version"),
    ("conflict_changed", EMPLOYEE_AGE_UNIQUE, lambda: seed("conflict_changed_new"), "conflict-column-changed",
     "/dbSchema/0/tables/0/fields/1/primaryKey"),
    ("sync_column_removed", EMPLOYEE, lambda: seed("sync_column_removed_new"), "sync-column-removed",
     "/dbSchema/0/tables/0/deviceSyncFields"),
]


@pytest.mark.parametrize(("case", "create", "make", "rule", "path"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_upgrade_on_sighup_keeps_the_old_schema(daemon, client, case, create, make, rule, path) -> None:
    _accepted_v0(daemon, client, create)
    before = changes(client)
    write_schema(daemon, make())
    sighup(daemon)
    log = wait_for_log(daemon, f"store {BUNDLE}/{STORE}: schema refused: {rule} at {path}")
    assert "keeping version 0" in log.split(f"schema refused: {rule}", 1)[1].splitlines()[0]
    assert schema_version(client) == 0
    assert changes(client) == before
    # The store goes on with version 0: writes work and are captured as before.
    client.call("store.insert", **REF, table="EMPLOYEE", values={"NAME": "after", "AGE": 1})
    assert len(changes(client)) == len(before) + 1
    accepted = client.call("store.query", **REF, sql="SELECT value FROM _p2p_meta WHERE key = 'sync_schema'")["rows"][0][0]
    assert json.loads(accepted) == seed("sync_column_removed_old")["dbSchema"][0]


@pytest.mark.parametrize(("case", "create", "make", "rule", "path"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_upgrade_on_set_distributed_tables(daemon, client, case, create, make, rule, path) -> None:
    _accepted_v0(daemon, client, create)
    write_schema(daemon, make())
    with pytest.raises(SchemaInvalid) as info:
        client.call("store.set_distributed_tables", **REF, tables=["EMPLOYEE"], config=SV)
    assert (rule, path) in {(e["rule"], e["path"]) for e in info.value.data["errors"]}
    assert schema_version(client) == 0


@pytest.mark.parametrize("how", ["sighup", "set_distributed_tables"])
def test_added_sync_column_is_accepted_and_rows_are_marked_to_be_sent_again(daemon, client, how: str) -> None:
    write_schema(daemon, seed("version_not_increased_old"))  # version 0: NAME only
    open_store(client, EMPLOYEE)
    for i in range(3):
        client.call("store.insert", **REF, table="EMPLOYEE", values={"NAME": f"n{i}", "AGE": 20 + i})
    client.call("store.set_distributed_tables", **REF, tables=["EMPLOYEE"], config=SV)
    before = changes(client)

    new = seed("version_not_increased_new")  # adds AGE ...
    new["dbSchema"][0]["version"] = 1  # ... this time with a new version
    write_schema(daemon, new)
    if how == "sighup":
        sighup(daemon)
        wait_for_log(daemon, f"store {BUNDLE}/{STORE}: schema version 1 accepted (was version 0)")
    else:
        result = client.call("store.set_distributed_tables", **REF, tables=["EMPLOYEE"], config=SV)
        assert result == {"schema_version": 1, "warnings": [], "resent": {"EMPLOYEE": 3}}
    wait_for_log(daemon, "3 existing row(s) marked to be sent again")
    assert schema_version(client) == 1

    added = changes(client)[len(before):]
    assert len(added) == 3
    assert sorted(r[2] for r in added) == [1, 2, 3]
    # Only the added column (AGE, position 2) is marked: the others keep their clocks.
    assert all(r[1] == "EMPLOYEE" and r[3] == 2 and r[4] == 1 << 2 and r[5] is not None for r in added)
    sync_columns = client.call("store.query", **REF, sql="SELECT col, conflict FROM _p2p_sync_columns ORDER BY pos")["rows"]
    assert sync_columns == [["NAME", 1], ["AGE", 0]]


def test_accepted_schema_survives_a_restart_and_is_rechecked_at_open(daemon_factory) -> None:
    d = daemon_factory("a")
    with d.client() as c:
        write_schema(d, seed("sync_column_removed_old"))
        path = open_store(c, EMPLOYEE)
        c.call("store.set_distributed_tables", **REF, tables=["EMPLOYEE"], config=SV)
    d.stop()
    # While the daemon is down another program adds a UNIQUE column the
    # accepted schema doesn't sync, and the schema file disappears.
    shell = sqlite3_shell(path, "ALTER TABLE EMPLOYEE ADD COLUMN TAG TEXT; CREATE UNIQUE INDEX tag_u ON EMPLOYEE(TAG);")
    assert shell.returncode == 0, shell.stderr
    (d.data_dir / "sync_schema.json").unlink()
    d.start()
    with d.client() as c:
        open_store(c)
        assert schema_version(c) == 0  # kept in the store, not in the file
        wait_for_log(d, "live table no longer matches accepted schema version 0: unique-column-not-synced")
        # SIGHUP with no file: refused, version 0 kept.
        sighup(d)
        wait_for_log(d, "schema refused: no sync_schema.json at")
        assert schema_version(c) == 0


def test_garbage_and_odd_files_never_take_the_daemon_down(daemon, client) -> None:
    _accepted_v0(daemon, client)
    path = daemon.data_dir / "sync_schema.json"
    for n, content in enumerate([b"\xff\xfe garbage", b"[]", b'{"dbSchema": [{"version": 1e999}]}', b"{" * 100_000], start=1):
        path.write_bytes(content)
        sighup(daemon)
        wait_for_log(daemon, "schema refused", count=n)
    path.unlink()
    os.mkfifo(path)  # a reader that opened it would block forever
    sighup(daemon)
    log = wait_for_log(daemon, "is not a regular file")
    assert daemon.proc.poll() is None and "Traceback" not in log
    assert schema_version(client) == 0


# --------------------------------------------------------------------------
# schema.validate


def test_schema_validate_without_a_store(daemon, client) -> None:
    text = (REPO / "sync_schema.json").read_text()
    assert client.call("schema.validate", document=text) == {"valid": True, "errors": [], "warnings": []}
    assert client.call("schema.validate", document=json.loads(text))["valid"]

    report = client.call("schema.validate", document=seed("two_conflict_columns"))
    assert report["valid"] is False
    assert report["errors"] == [{
        "path": "/dbSchema/0/tables/0/fields/1/primaryKey",
        "rule": "conflict-column-multiple",
        "message": "Table 'EMPLOYEE' already has the conflict column 'NAME', so 'AGE' can't be one too; "
                   "only one field may have \"primaryKey\": true.",
    }]
    # Bad documents are answers, not errors.
    for bad in ("{", "", "[1, 2]", 5, None, [], {"dbSchema": "x"}):
        result = client.call("schema.validate", document=bad)
        assert result["valid"] is False and result["errors"], bad
    assert client.call("schema.validate", document="{")["errors"][0]["rule"] == "invalid-json"
    # bundle selects entries.
    report = client.call("schema.validate", document=text, bundle="other.bundle")
    assert [e["rule"] for e in report["errors"]] == ["db-not-in-schema"]


def test_schema_validate_with_a_store(daemon, client) -> None:
    open_store(client, EMPLOYEE_NULLABLE, "INSERT INTO EMPLOYEE(AGE) VALUES (1)")
    doc = nullable_schema()
    report = client.call("schema.validate", document=json.dumps(doc), **REF)
    assert [(e["rule"], e["path"]) for e in report["errors"]] == [
        ("conflict-column-has-nulls", "/dbSchema/0/tables/0/fields/0/primaryKey")
    ]
    client.call("store.execute", **REF, sql="UPDATE EMPLOYEE SET NAME = 'x'")
    assert client.call("schema.validate", document=doc, **REF)["valid"]
    # Layer 2 against the live table.
    wrong_case = seed("sync_column_wrong_case")
    report = client.call("schema.validate", document=wrong_case, **REF)
    assert ("sync-column-not-in-table", "/dbSchema/0/tables/0/deviceSyncFields/0") in {
        (e["rule"], e["path"]) for e in report["errors"]
    }
    # Layer 3 against the accepted version.
    write_schema(daemon, doc)
    client.call("store.set_distributed_tables", **REF, tables=["EMPLOYEE"], config=SV)
    more = json.loads(json.dumps(doc))
    more["dbSchema"][0]["tables"][0]["fields"].append({"columnName": "AGE", "type": "Integer"})
    more["dbSchema"][0]["tables"][0]["deviceSyncFields"].append("AGE")
    report = client.call("schema.validate", document=more, **REF)
    assert [(e["rule"], e["path"]) for e in report["errors"]] == [("version-not-increased", "/dbSchema/0/version")]
    more["dbSchema"][0]["version"] = 1
    assert client.call("schema.validate", document=more, **REF) == {"valid": True, "errors": [], "warnings": []}
    assert schema_version(client) == 0  # validating accepts nothing


# --------------------------------------------------------------------------
# p2pstore schema validate


def test_cli_exit_codes_and_json(daemon, client, tmp_path: Path) -> None:
    good = REPO / "sync_schema.json"
    bad = SEED / "two_conflict_columns.json"
    warn = SEED / "sync_column_not_in_fields.json"

    out = cli("schema", "validate", str(good), socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{good}: valid")

    out = cli("schema", "validate", str(bad), socket=daemon.socket)
    assert out.returncode == 1
    assert "invalid (1 error)" in out.stdout
    assert "/dbSchema/0/tables/0/fields/1/primaryKey  conflict-column-multiple  Table 'EMPLOYEE'" in out.stdout

    out = cli("schema", "validate", str(warn), "--json", socket=daemon.socket)
    assert out.returncode == 0
    report = json.loads(out.stdout)
    assert report["valid"] is True and [w["rule"] for w in report["warnings"]] == ["sync-column-not-in-fields"]

    out = cli("schema", "validate", str(bad), "--json", socket=daemon.socket)
    assert out.returncode == 1 and json.loads(out.stdout)["errors"][0]["rule"] == "conflict-column-multiple"

    broken = tmp_path / "broken.json"
    broken.write_text('{"dbSchema": [}')
    out = cli("schema", "validate", str(broken), socket=daemon.socket)
    assert out.returncode == 1 and "invalid-json" in out.stdout and "line 1" in out.stdout

    out = cli("schema", "validate", str(tmp_path / "absent.json"), socket=daemon.socket)
    assert out.returncode == 1 and "cannot read" in out.stderr and out.stdout == ""

    assert cli("schema", "validate", socket=daemon.socket).returncode == 2
    assert cli("schema", "validate", str(good), "--bogus", socket=daemon.socket).returncode == 2
    assert cli("schema", socket=None).returncode == 2


def test_cli_with_a_store(daemon, client) -> None:
    open_store(client, EMPLOYEE_AGE_UNIQUE)
    unique_not_synced = SEED / "unique_column_not_synced.json"
    # Valid as a document (only the table knows AGE is UNIQUE) ...
    assert cli("schema", "validate", str(unique_not_synced), socket=daemon.socket).returncode == 0
    # ... but not against the store's EMPLOYEE table.
    out = cli("schema", "validate", str(unique_not_synced), "--store", STORE, "--bundle", BUNDLE, "--json",
              socket=daemon.socket)
    assert out.returncode == 1
    assert [e["rule"] for e in json.loads(out.stdout)["errors"]] == ["unique-column-not-synced"]
    out = cli("schema", "validate", str(REPO / "sync_schema.json"), "--store", STORE, "--bundle", BUNDLE, socket=daemon.socket)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_without_a_daemon(short_tmp: Path) -> None:
    socket = short_tmp / "nobody.sock"
    out = cli("schema", "validate", str(REPO / "sync_schema.json"), socket=socket)
    assert out.returncode == 0 and "no daemon running" in out.stderr
    out = cli("schema", "validate", str(SEED / "no_device_sync_fields.json"), "--json", socket=socket)
    assert out.returncode == 1
    assert [e["rule"] for e in json.loads(out.stdout)["errors"]] == ["sync-fields-missing"]
    out = cli("schema", "validate", str(REPO / "sync_schema.json"), "--store", STORE, socket=socket)
    assert out.returncode == 1 and "DAEMON_NOT_RUNNING" in out.stderr
