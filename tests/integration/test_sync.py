"""Sync end to end (issue 5): real daemons (subprocesses) linked over TLS on
127.0.0.1, the API, the ``sqlite3`` shell as an outside writer, the CLI, and
real kill -9.

The merge rules themselves (clock order, tombs, conflict-log contents,
convergence in any order) are covered at store level in
tests/store/test_merge.py; here the question is whether the daemon, the
engine, the protocol and the API put them together so that a user gets the
behaviour SPEC §2 promises: what arrives where, which result code each
device gets, what is logged, what is notified, what survives a crash.

``linked_daemons(n)`` (sync_helpers.py) starts n daemons, each trusting the
others, and waits until all see each other online.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sync_helpers import (
    BUNDLE,
    EMPLOYEE,
    STORE,
    SV,
    SV_REF,
    Node,
    cli,
    collect_notifications,
    linked_daemons,  # noqa: F401  (fixture)
    schema_doc,
    setup_employee,
    sqlite3_shell,
    stays,
    wait_linked,
    wait_until,
    write_schema,
)

from p2pstore.errors import FailureNotFound, ReadOnlyTable, SyncInProgress
from p2pstore.net.identity import device_id_from_key_hash

pytestmark = pytest.mark.timeout(120)

# Result codes (SPEC §2).
SUCCESS, OFFLINE, DISTRIBUTED_TABLE_NOT_SET, TIMEOUT, UNTRUSTED, SECURITY_LEVEL = 0, 2, 4, 9, 12, 13

COLLAB = {"store": "s"}
T_CREATE = "CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)"


def setup_collab(*nodes: Node, ref: dict[str, Any] = COLLAB, create: str = T_CREATE, table: str = "T",
                 auto_sync: bool = False, label: str | None = None) -> dict[str, Any]:
    for node in nodes:
        node.call("store.open", **ref, **({"security_level": label} if label else {}))
        node.call("store.execute", **ref, sql=create)
        node.call("store.set_distributed_tables", **ref, tables=[table], config={"auto_sync": auto_sync})
    return ref


def dev_table(node: Node, origin: Node, ref: dict[str, Any] = COLLAB, table: str = "T") -> str:
    return node.call("store.distributed_table_name", **ref, device=origin.id, table=table)["table"]


def table_exists(node: Node, ref: dict[str, Any], name: str) -> bool:
    return bool(node.rows(ref, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]))


def employees(node: Node, columns: str = "NAME, AGE, SALARY") -> list[list[Any]]:
    return node.rows(SV_REF, f"SELECT {columns} FROM EMPLOYEE ORDER BY NAME")


def random_device_id() -> str:
    return device_id_from_key_hash(os.urandom(32))


def blob(data: bytes) -> dict[str, str]:
    return {"$blob": base64.b64encode(data).decode()}


def one(results: dict[str, dict[str, Any]], node: Node | str) -> dict[str, Any]:
    """The result for ``node``, the only one there is."""
    device = node if isinstance(node, str) else node.id
    assert list(results) == [device], results
    return results[device]


def ok(results: dict[str, dict[str, Any]], node: Node, *, sent: int | None = None, applied: int | None = None) -> dict[str, Any]:
    r = one(results, node)
    assert r["code"] == SUCCESS, r
    if sent is not None:
        assert r["sent"] == sent, r
    if applied is not None:
        assert r["applied"] == applied, r
    return r


def insert_many(node: Node, ref: dict[str, Any], n: int, *, table: str = "T", start: int = 1) -> None:
    """``n`` rows in one statement (captured like any other write)."""
    if table == "EMPLOYEE":
        sql = ("WITH RECURSIVE c(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
               "INSERT INTO EMPLOYEE (NAME, AGE, SALARY) SELECT 'e' || x, x % 90, x * 0.5 FROM c")
    else:
        sql = (f"WITH RECURSIVE c(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
               f"INSERT INTO {table} (id, name, n) SELECT x, 'n' || x, x FROM c")
    node.call("store.execute", **ref, sql=sql, params=[start, start + n - 1])


def digest(rows: list[list[Any]]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


class Background:
    """A blocking call on its own client connection in a thread, with a bounded wait."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # handed to the test
            self.error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"call still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.result


def sync_in_background(node: Node, mode: str, ref: dict[str, Any], devices: list[Node], **predicates: Any) -> Background:
    api = node.client()
    preds = {"devices": [d.id for d in devices], **predicates}
    return Background(lambda: {r["device"]: r for r in api.call("store.sync", **ref, mode=mode, predicates=preds)["results"]})


# ====================================================================== 1. collaborative


def test_collaborative_push_and_pull_into_device_tables(linked_daemons) -> None:
    a, b = linked_daemons(2)
    setup_collab(a, b)
    # Inserts, an update and a delete before the first push: B gets the current rows.
    for i in (1, 2, 3):
        a.call("store.insert", **COLLAB, table="T", values={"id": i, "name": f"a{i}", "n": i})
    a.call("store.update", **COLLAB, values={"n": 20}, predicates={"table": "T", "where": [["id", "=", 2]]})
    a.call("store.delete", **COLLAB, predicates={"table": "T", "where": [["id", "=", 3]]})
    ok(a.sync("push", COLLAB, [b]), b)
    dev_a = dev_table(b, a)
    assert dev_a != "T" and a.id.replace("-", "") in dev_a.replace("-", "")
    assert b.rows(COLLAB, f'SELECT id, name, n FROM "{dev_a}" ORDER BY id') == [[1, "a1", 1], [2, "a2", 20]]
    assert b.count(COLLAB, "T") == 0, "peer rows must not land in B's own table"

    # Updates and deletes of rows B already has.
    a.call("store.update", **COLLAB, values={"name": "A1"}, predicates={"table": "T", "where": [["id", "=", 1]]})
    a.call("store.delete", **COLLAB, predicates={"table": "T", "where": [["id", "=", 2]]})
    a.call("store.insert", **COLLAB, table="T", values={"id": 4, "name": "a4", "n": 4})
    ok(a.sync("push", COLLAB, [b]), b, sent=3, applied=3)
    assert b.rows(COLLAB, f'SELECT id, name, n FROM "{dev_a}" ORDER BY id') == [[1, "A1", 1], [4, "a4", 4]]
    ok(a.sync("push", COLLAB, [b]), b, sent=0, applied=0)  # nothing new: nothing moves

    # B -> A by pull: B's own rows land in A's device table for B; A's own table is untouched.
    b.call("store.insert", **COLLAB, table="T", values={"id": 1, "name": "b1", "n": 100})
    b.call("store.insert", **COLLAB, table="T", values={"id": 2, "name": "b2", "n": 200})
    ok(a.sync("pull", COLLAB, [b]), b, sent=2, applied=2)
    dev_b = dev_table(a, b)
    assert a.rows(COLLAB, f'SELECT id, name, n FROM "{dev_b}" ORDER BY id') == [[1, "b1", 100], [2, "b2", 200]]
    b.call("store.update", **COLLAB, values={"n": 101}, predicates={"table": "T", "where": [["id", "=", 1]]})
    b.call("store.delete", **COLLAB, predicates={"table": "T", "where": [["id", "=", 2]]})
    ok(a.sync("pull", COLLAB, [b]), b, sent=2, applied=2)
    assert a.rows(COLLAB, f'SELECT id, name, n FROM "{dev_b}" ORDER BY id') == [[1, "b1", 101]]
    ok(a.sync("pull", COLLAB, [b]), b, sent=0, applied=0)
    assert a.rows(COLLAB, "SELECT id, name, n FROM T ORDER BY id") == [[1, "A1", 1], [4, "a4", 4]]
    # Received rows are not echoed back as B's or A's own changes.
    ok(b.sync("push", COLLAB, [a]), a, sent=0)
    ok(b.sync("pull", COLLAB, [a]), a, sent=0)


def test_device_tables_are_read_only(linked_daemons) -> None:
    a, b = linked_daemons(2)
    setup_collab(a, b)
    a.call("store.insert", **COLLAB, table="T", values={"id": 1, "name": "a1", "n": 1})
    ok(a.sync("push", COLLAB, [b]), b, applied=1)
    dev_a = dev_table(b, a)
    before = b.rows(COLLAB, f'SELECT * FROM "{dev_a}"')
    assert before == [[1, "a1", 1]]

    with pytest.raises(ReadOnlyTable):
        b.call("store.insert", **COLLAB, table=dev_a, values={"id": 2, "name": "x", "n": 0})
    with pytest.raises(ReadOnlyTable):
        b.call("store.update", **COLLAB, values={"n": 9}, predicates={"table": dev_a, "where": [["id", "=", 1]]})
    with pytest.raises(ReadOnlyTable):
        b.call("store.delete", **COLLAB, predicates={"table": dev_a})
    with pytest.raises(ReadOnlyTable):
        b.call("store.execute", **COLLAB, sql=f'UPDATE "{dev_a}" SET n = 9')

    path = b.call("store.open", **COLLAB)["path"]
    for sql in (f"INSERT INTO \"{dev_a}\" VALUES (2, 'x', 0)", f'UPDATE "{dev_a}" SET n = 9', f'DELETE FROM "{dev_a}"'):
        shell = sqlite3_shell(path, sql)
        assert shell.returncode != 0, f"{sql}: the sqlite3 shell could write a device table"
        assert "READ_ONLY_TABLE" in shell.stderr or "read-only" in shell.stderr.lower(), shell.stderr
    assert b.rows(COLLAB, f'SELECT * FROM "{dev_a}"') == before
    # ...and syncing still writes it.
    a.call("store.update", **COLLAB, values={"n": 2}, predicates={"table": "T", "where": [["id", "=", 1]]})
    ok(a.sync("push", COLLAB, [b]), b, applied=1)
    assert b.rows(COLLAB, f'SELECT * FROM "{dev_a}"') == [[1, "a1", 2]]


def test_the_same_added_column_on_both_devices_syncs_into_the_device_table(linked_daemons) -> None:
    """Collaborative: A and B make the same ALTER TABLE ... ADD COLUMN (B's
    device table of A already exists): A's later rows carry the column and
    apply on B, into B's copy of A's rows (issue 12: they used to fail for
    ever with unknown_column)."""
    a, b = linked_daemons(2)
    setup_collab(a, b)
    a.call("store.insert", **COLLAB, table="T", values={"id": 1, "name": "before", "n": 1})
    ok(a.sync("push", COLLAB, [b]), b, applied=1)
    dev_a = dev_table(b, a)
    for node in (a, b):
        node.call("store.execute", **COLLAB, sql="-- v2\nALTER TABLE T ADD COLUMN w TEXT")
    assert [r[0] for r in b.rows(COLLAB, f"SELECT name FROM pragma_table_info('{dev_a}')")] == ["id", "name", "n", "w"]
    a.call("store.insert", **COLLAB, table="T", values={"id": 2, "name": "after", "n": 2, "w": "new"})
    a.call("store.update", **COLLAB, values={"w": "old row too"}, predicates={"table": "T", "where": [["id", "=", 1]]})
    r = ok(a.sync("push", COLLAB, [b]), b, applied=2)
    assert r["failed"] == 0, r
    assert b.rows(COLLAB, f'SELECT id, name, n, w FROM "{dev_a}" ORDER BY id') == [[1, "before", 1, "old row too"], [2, "after", 2, "new"]]
    assert b.call("store.sync_failures", **COLLAB) == []
    # The device table is still read-only to applications.
    with pytest.raises(ReadOnlyTable):
        b.call("store.execute", **COLLAB, sql=f'UPDATE "{dev_a}" SET w = NULL')


# ====================================================================== 2. single_version


def test_single_version_merges_by_conflict_column_with_local_keys(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    setup_employee(a)
    # B's table has a column of its own (not in sync_schema.json: never synced).
    setup_employee(b, extra_sql=["ALTER TABLE EMPLOYEE ADD COLUMN NOTE TEXT"])
    # B's own rows first, so its IDs differ from A's.
    b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Zed", "AGE": 70, "NOTE": "b only"})
    b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Yan", "AGE": 71})
    a.call("store.insert", **SV_REF, table="EMPLOYEE",
           values={"NAME": "Alice", "AGE": 30, "SALARY": 1.5, "CODES": blob(b"\x00\x01\xff")})
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Bob", "AGE": 40, "SALARY": 2.5})
    a_ids = dict(a.rows(SV_REF, "SELECT NAME, ID FROM EMPLOYEE"))
    assert a_ids == {"Alice": 1, "Bob": 2}

    ok(a.sync("push", SV_REF, [b]), b, sent=2, applied=2)
    rows = b.rows(SV_REF, "SELECT ID, NAME, AGE, SALARY, CODES, NOTE FROM EMPLOYEE ORDER BY ID")
    assert rows == [
        [1, "Zed", 70, None, None, "b only"],
        [2, "Yan", 71, None, None, None],
        [3, "Alice", 30, 1.5, b"\x00\x01\xff", None],
        [4, "Bob", 40, 2.5, None, None],
    ], "A's rows merge into EMPLOYEE by NAME with keys B assigns (A's IDs 1, 2 are B's Zed and Yan)"

    # B notes something on Bob locally; A's later edit of Bob leaves B's column alone.
    b.call("store.update", **SV_REF, values={"NOTE": "b's note"}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Bob"]]})
    a.call("store.update", **SV_REF, values={"AGE": 41}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Bob"]]})
    ok(a.sync("push", SV_REF, [b]), b, sent=1, applied=1)
    assert b.rows(SV_REF, "SELECT ID, AGE, SALARY, NOTE FROM EMPLOYEE WHERE NAME = 'Bob'") == [[4, 41, 2.5, "b's note"]]

    # B's rows reach A with A's own keys; NOTE does not travel (A has no such column, and nothing fails).
    r = ok(a.sync("pull", SV_REF, [b]), b)
    assert r["failed"] == 0, r
    on_a = {name: (key, age) for key, name, age in a.rows(SV_REF, "SELECT ID, NAME, AGE FROM EMPLOYEE")}
    assert {n: v[1] for n, v in on_a.items()} == {"Alice": 30, "Bob": 41, "Yan": 71, "Zed": 70}
    assert (on_a["Alice"][0], on_a["Bob"][0]) == (1, 2) and {on_a["Yan"][0], on_a["Zed"][0]} == {3, 4}, on_a
    assert a.call("store.sync_failures", **SV_REF) == [] and b.call("store.sync_failures", **SV_REF) == []

    # A delete travels as a tomb by NAME.
    a.call("store.delete", **SV_REF, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Alice"]]})
    ok(a.sync("push", SV_REF, [b]), b, applied=1)
    assert [r[0] for r in employees(b)] == ["Bob", "Yan", "Zed"]
    assert b.call("store.conflicts", **SV_REF) == []


def test_concurrent_edits_of_different_columns_both_survive(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    setup_employee(a)
    setup_employee(b)
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Carol", "AGE": 30, "SALARY": 100.0})
    ok(a.sync("push", SV_REF, [b]), b, applied=1)
    # Concurrent: neither has seen the other's edit.
    a.call("store.update", **SV_REF, values={"AGE": 31}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Carol"]]})
    b.call("store.update", **SV_REF, values={"SALARY": 200.0}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Carol"]]})
    ok(a.sync("push", SV_REF, [b]), b, applied=1)
    ok(b.sync("push", SV_REF, [a]), a, applied=1)
    for node in (a, b):
        assert employees(node) == [["Carol", 31, 200.0]], node
        assert node.call("store.conflicts", **SV_REF) == [], f"{node}: different columns are no conflict"
    # Converged: nothing more moves either way.
    ok(a.sync("push", SV_REF, [b]), b, applied=0)
    ok(b.sync("push", SV_REF, [a]), a, applied=0)


def test_same_column_last_writer_wins_and_loser_is_logged(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    setup_employee(a)
    setup_employee(b)
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Dan", "AGE": 30})
    ok(a.sync("push", SV_REF, [b]), b, applied=1)
    a.call("store.update", **SV_REF, values={"AGE": 40}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Dan"]]})
    time.sleep(0.01)  # B's edit is the later one on the hybrid clock (no tie to break)
    b.call("store.update", **SV_REF, values={"AGE": 50}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Dan"]]})

    r = ok(a.sync("push", SV_REF, [b]), b)
    assert (r["applied"], r["conflicts"]) == (0, 1), r
    assert employees(b) == [["Dan", 50, None]], "the later write (B's) wins on B"
    [conflict] = b.call("store.conflicts", **SV_REF)
    assert conflict["table"] == "EMPLOYEE" and conflict["key"] == "Dan" and conflict["column"] == "AGE", conflict
    assert (conflict["losing_value"], conflict["loser"], conflict["winner"]) == (40, a.id, b.id), conflict
    assert conflict["winner_hlc"] > conflict["loser_hlc"], conflict

    r = ok(b.sync("push", SV_REF, [a]), a)
    assert (r["applied"], r["conflicts"]) == (1, 1), r
    assert employees(a) == [["Dan", 50, None]], "and on A"
    [on_a] = a.call("store.conflicts", **SV_REF, table="EMPLOYEE")
    assert (on_a["column"], on_a["losing_value"], on_a["loser"], on_a["winner"]) == ("AGE", 40, a.id, b.id), on_a
    assert a.call("store.conflicts", **SV_REF, table="NO_SUCH_TABLE") == []

    # The CLI shows the same log.
    shown = cli(b, "conflicts", "--store", STORE, "--bundle", BUNDLE, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == [conflict]
    text = cli(b, "conflicts", "--store", STORE, "--bundle", BUNDLE, "--table", "EMPLOYEE")
    assert text.returncode == 0, text.stderr
    assert "Dan" in text.stdout and "AGE" in text.stdout and "40" in text.stdout and a.id in text.stdout, text.stdout
    empty = cli(b, "conflicts", "--store", STORE, "--bundle", BUNDLE, "--table", "EMPLOYEE2")
    assert empty.returncode == 0 and "no conflicts" in empty.stdout, empty

    # Clearing: another table's (none), then by the CLI up to this id, then all on A.
    assert b.call("store.clear_conflicts", **SV_REF, table="EMPLOYEE2") == {"cleared": 0}
    assert b.call("store.conflicts", **SV_REF) == [conflict]
    cleared = cli(b, "conflicts", "--store", STORE, "--bundle", BUNDLE, "--clear", "--up-to", str(conflict["id"]))
    assert cleared.returncode == 0 and "1 conflict(s) cleared" in cleared.stdout, cleared
    assert b.call("store.conflicts", **SV_REF) == []
    assert a.call("store.clear_conflicts", **SV_REF) == {"cleared": 1}
    assert a.call("store.conflicts", **SV_REF) == []


# ====================================================================== 3. relay


def test_relay_a_to_b_to_c_delivers_a_s_changes_as_a_s(linked_daemons) -> None:
    a, b, c = linked_daemons(3, schema=True)
    for node in (a, b, c):
        setup_employee(node)
    details = c.client()
    details.call("store.subscribe", **SV_REF, type="remote_details")
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Eve", "AGE": 20})
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Fay", "AGE": 21})
    ok(a.sync("push", SV_REF, [b]), b, applied=2)
    ok(b.sync("push", SV_REF, [c]), c, sent=2, applied=2)
    assert employees(c) == [["Eve", 20, None], ["Fay", 21, None]]
    # C learns the rows came from A, not from B, the device that relayed them.
    got = collect_notifications(details, lambda got: any(n["method"] == "dataChange" for n in got), 5.0)
    origins = {ch["origin"] for n in got if n["method"] == "dataChange" for ch in n["params"]["changes"]}
    assert origins == {a.id}, got
    # Keys are C's own: the local key of each row written (EMPLOYEE's key is its integer rowid ID).
    inserted = sorted(k for n in got if n["method"] == "dataChange" for ch in n["params"]["changes"] for k in ch["inserted"])
    assert inserted == sorted(r[0] for r in c.rows(SV_REF, "SELECT ID FROM EMPLOYEE")), got

    # An update and a delete relay too.
    a.call("store.update", **SV_REF, values={"AGE": 30}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Eve"]]})
    a.call("store.delete", **SV_REF, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Fay"]]})
    ok(a.sync("push", SV_REF, [b]), b, applied=2)
    ok(c.sync("pull", SV_REF, [b]), b, sent=2, applied=2)
    assert employees(c) == [["Eve", 30, None]]
    # C already has A's changes: a direct push from A applies nothing new.
    ok(a.sync("push", SV_REF, [c]), c, applied=0)
    assert employees(c) == employees(b) == employees(a) == [["Eve", 30, None]]


def test_cycle_a_b_c_a_does_not_loop_or_duplicate(linked_daemons) -> None:
    a, b, c = linked_daemons(3, schema=True)
    for node in (a, b, c):
        setup_employee(node)
    for node, names in ((a, ["a1", "a2", "a3"]), (b, ["b1", "b2"]), (c, ["c1"])):
        for i, name in enumerate(names):
            node.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": i})
    a.call("store.update", **SV_REF, values={"SALARY": 9.5}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "a1"]]})
    ring = ((a, b), (b, c), (c, a))

    def round_() -> list[tuple[int, int]]:
        return [(r["sent"], r["applied"]) for r in (ok(src.sync("push", SV_REF, [dst]), dst) for src, dst in ring)]

    first, second, third = round_(), round_(), round_()
    # Each receiver's origin marks (protocol 3) keep what it holds from travelling:
    # 1: A -> B A's 3; B -> C B's 2 + A's 3 (relayed); C -> A C's 1 + B's 2 (A's own 3 left out).
    # 2: A -> B forwards c1 only (B holds its own b1, b2); B -> C c1 is C's own: nothing; C -> A nothing.
    # 3: nothing moves: a change seen again gets no new seq, so it stops travelling.
    assert (first, second, third) == ([(3, 3), (5, 5), (3, 3)], [(1, 1), (0, 0), (0, 0)], [(0, 0)] * 3)

    expected = [[n, i, 9.5 if n == "a1" else None] for names in (["a1", "a2", "a3"], ["b1", "b2"], ["c1"])
                for i, n in enumerate(names)]
    for node in (a, b, c):
        assert employees(node) == sorted(expected), node
        assert node.rows(SV_REF, "SELECT count(*), count(DISTINCT NAME) FROM EMPLOYEE") == [[6, 6]], node
        assert node.call("store.conflicts", **SV_REF) == [], node


# ====================================================================== 4. result codes per device


def test_every_sync_leaves_one_sync_log_entry_on_each_side(linked_daemons) -> None:
    """Issue 12 item 5: a push leaves one entry on the sender (send, manual)
    and one on the receiver (receive, served) with matching counts; a push
    to a device that is offline is logged with its code; `p2pstore log`
    prints them."""
    a, b, c = linked_daemons(3)
    setup_collab(a, b, c)
    for i in range(3):
        a.call("store.insert", **COLLAB, table="T", values={"id": i, "name": f"a{i}", "n": i})
    ok(a.sync("push", COLLAB, [b]), b, applied=3)
    [mine] = a.call("store.sync_log", **COLLAB, device=b.id)
    assert (mine["direction"], mine["kind"], mine["code"], mine["table"], mine["filter"]) == ("send", "manual", SUCCESS, None, None)
    wait_until(lambda: b.call("store.sync_log", **COLLAB, device=a.id), 10, "b logged the session it served")
    [theirs] = b.call("store.sync_log", **COLLAB, device=a.id)
    assert (theirs["direction"], theirs["kind"], theirs["code"]) == ("receive", "served", SUCCESS)
    counts = ("sent", "applied", "conflicts", "failed")
    assert [mine[k] for k in counts] == [theirs[k] for k in counts] == [3, 3, 0, 0]
    assert mine["duration_ms"] >= 0 and mine["at"] > 0

    # A table sync with a filter says so.
    r = a.sync("pull", COLLAB, [b], table="T", where=[["n", ">", 0]])
    assert r[b.id]["code"] == SUCCESS, r
    newest = a.call("store.sync_log", **COLLAB, limit=1)[0]
    assert (newest["direction"], newest["table"], newest["filter"]) == ("receive", "T", '[["n", ">", 0]]')

    c.stop()
    wait_until(lambda: not a.sees_online(c), 10, "a sees c offline")
    assert a.sync("push", COLLAB, [c])[c.id]["code"] == OFFLINE
    [offline] = a.call("store.sync_log", **COLLAB, device=c.id)
    assert (offline["code"], offline["sent"], offline["message"]) == (OFFLINE, 0, a.call("store.sync_log", **COLLAB, device=c.id)[0]["message"])
    assert "offline" in offline["message"]
    text = cli(a, "log", "--store", COLLAB["store"])
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert len(lines) == 3 and f"code {OFFLINE}" in lines[0] and "sent 3 applied 3" in lines[2], text.stdout
    assert [e["kind"] for e in json.loads(cli(a, "log", "--store", COLLAB["store"], "--json").stdout)] == ["manual"] * 3


def test_offline_and_untrusted_devices_get_their_codes(linked_daemons) -> None:
    a, b, c = linked_daemons(3)
    setup_collab(a, b, c)
    a.call("store.insert", **COLLAB, table="T", values={"id": 1, "name": "a1", "n": 1})
    stranger = random_device_id()
    c.stop()  # trusted, but its daemon is down
    wait_until(lambda: not a.sees_online(c), 10, "a sees c offline")

    for mode in ("push", "pull"):
        results = a.sync(mode, COLLAB, [b, c, stranger])
        assert set(results) == {b.id, c.id, stranger}, results
        assert results[b.id]["code"] == SUCCESS, results
        assert results[c.id]["code"] == OFFLINE, results
        assert results[stranger]["code"] == UNTRUSTED, results
        assert all(r["message"] for r in results.values()), results
    assert b.rows(COLLAB, f'SELECT id FROM "{dev_table(b, a)}"') == [[1]], "one failing device does not stop the others"
    # "all" means the online trusted devices: C is left out rather than failing.
    assert set(a.sync("push", COLLAB, "all")) == {b.id}
    # A device that was trusted and online, then untrusted: 12 at once, nothing sent.
    a.call("devices.untrust", device_id=b.id)
    a.call("store.insert", **COLLAB, table="T", values={"id": 2, "name": "a2", "n": 2})
    assert one(a.sync("push", COLLAB, [b]), b)["code"] == UNTRUSTED
    assert one(b.sync("pull", COLLAB, [a]), a)["code"] in (OFFLINE, UNTRUSTED)  # A closed the channel
    assert b.rows(COLLAB, f'SELECT id FROM "{dev_table(b, a)}"') == [[1]]
    assert a.sync("push", COLLAB, []) == {}


def test_auto_sync_respects_the_security_level(linked_daemons) -> None:
    a, b = linked_daemons(2, flags={0: ["--security-level", "S3"], 1: ["--security-level", "S1"]})
    secret = {"store": "secret"}
    setup_collab(a, ref=secret, label="S3", auto_sync=True)
    setup_collab(b, ref=secret, auto_sync=True)
    setup_collab(a, b, auto_sync=True)  # control: an S1 store on the same link
    a.call("store.insert", **secret, table="T", values={"id": 1, "name": "classified", "n": 1})
    a.call("store.insert", **COLLAB, table="T", values={"id": 1, "name": "public", "n": 1})
    wait_until(lambda: table_exists(b, COLLAB, dev_table(b, a)) and b.count(COLLAB, dev_table(b, a)) == 1, 5.0,
               "the S1 store auto-syncs")
    name = dev_table(b, a, secret)
    stays(lambda: not table_exists(b, secret, name) or b.count(secret, name) == 0, 1.0, "S3 rows auto-synced to S1")


def test_sync_target_ids_in_another_spelling(linked_daemons) -> None:
    a, b = linked_daemons(2)
    setup_collab(a, b)
    a.call("store.insert", **COLLAB, table="T", values={"id": 1, "name": "a1", "n": 1})
    for spelling in (b.id.lower(), b.id.replace("-", "")):
        [r] = a.sync("push", COLLAB, [spelling]).values()
        assert r["code"] == SUCCESS, r
    assert b.count(COLLAB, dev_table(b, a)) == 1


def test_sync_target_listed_twice_gets_one_session(linked_daemons) -> None:
    a, b = linked_daemons(2)
    setup_collab(a, b)
    insert_many(a, COLLAB, 50)
    results = a.api.call("store.sync", **COLLAB, mode="push", predicates={"devices": [b.id, b.id]})["results"]
    assert [(r["device"], r["code"], r["sent"]) for r in results] == [(b.id, SUCCESS, 50)], results


def test_security_level_rule_push_and_pull(linked_daemons) -> None:
    # A is an S3 device, B an S1 device.
    a, b = linked_daemons(2, flags={0: ["--security-level", "S3"], 1: ["--security-level", "S1"]})
    assert b.view(a)["security_level"] == "S3" and a.view(b)["security_level"] == "S1"
    secret = {"store": "secret"}
    setup_collab(a, ref=secret, label="S3")
    setup_collab(b, ref=secret)
    a.call("store.insert", **secret, table="T", values={"id": 1, "name": "classified", "n": 1})
    # Control: an S1 store between the same two devices syncs.
    setup_collab(a, b)
    a.call("store.insert", **COLLAB, table="T", values={"id": 1, "name": "public", "n": 1})
    ok(a.sync("push", COLLAB, [b]), b, applied=1)

    r = one(a.sync("push", secret, [b]), b)
    assert r["code"] == SECURITY_LEVEL and "S3" in r["message"], r
    # B asks for it: A (the sender) refuses.
    r = one(b.sync("pull", secret, [a]), a)
    assert r["code"] == SECURITY_LEVEL, r
    name = dev_table(b, a, secret)
    assert not table_exists(b, secret, name) or b.count(secret, name) == 0, "no S3 data may reach an S1 device"
    # The other way is fine: B's S1 store may go to the S3 device.
    b.call("store.insert", **secret, table="T", values={"id": 7, "name": "from b", "n": 7})
    ok(b.sync("push", secret, [a]), a, applied=1)
    ok(a.sync("pull", secret, [b]), b, applied=0)


def test_table_not_distributed_on_the_peer(linked_daemons) -> None:
    a, b = linked_daemons(2)
    setup_collab(a)
    a.call("store.insert", **COLLAB, table="T", values={"id": 1, "name": "a1", "n": 1})
    # B has no such store at all.
    r = one(a.sync("push", COLLAB, [b]), b)
    assert r["code"] == DISTRIBUTED_TABLE_NOT_SET, r
    # B has the store and the table, but T is not distributed there.
    b.call("store.open", **COLLAB)
    b.call("store.execute", **COLLAB, sql=T_CREATE)
    for predicates in ({}, {"table": "T"}):
        r = one(a.sync("push", COLLAB, [b], **predicates), b)
        assert r["code"] == DISTRIBUTED_TABLE_NOT_SET and "T" in r["message"], r
    assert b.count(COLLAB, "T") == 0
    # Once B distributes it, the same push goes through.
    b.call("store.set_distributed_tables", **COLLAB, tables=["T"])
    ok(a.sync("push", COLLAB, [b]), b, applied=1)


def test_pull_of_a_table_the_peer_has_not_distributed(linked_daemons) -> None:
    a, b = linked_daemons(2)
    setup_collab(a)
    b.call("store.open", **COLLAB)
    b.call("store.execute", **COLLAB, sql=T_CREATE)  # exists on B, not distributed there
    call = sync_in_background(a, "pull", COLLAB, [b], table="T")
    wait_until(call.done, 5.0, "the pull answers within 5 s")
    assert one(call.wait(1), b)["code"] == DISTRIBUTED_TABLE_NOT_SET


def test_query_sync_sends_only_matching_rows_and_keeps_the_watermark(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    setup_employee(a)
    setup_employee(b)
    for name, age in (("kid", 10), ("teen", 17), ("adult", 30), ("elder", 80)):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": age})
    ok(a.sync("push", SV_REF, [b], table="EMPLOYEE", where=[["AGE", ">", 18]]), b, sent=2, applied=2)
    assert employees(b) == [["adult", 30, None], ["elder", 80, None]]
    # Again: the filtered push did not move B's watermark, but re-sending is harmless.
    ok(a.sync("push", SV_REF, [b], table="EMPLOYEE", where=[["AGE", ">", 18]]), b, sent=2, applied=0)
    # A full push still sends the rest (and only changes B's state for them).
    r = ok(a.sync("push", SV_REF, [b]), b)
    assert r["applied"] == 2 and r["sent"] >= 2, r
    assert [e[0] for e in employees(b)] == ["adult", "elder", "kid", "teen"]
    ok(a.sync("push", SV_REF, [b]), b, sent=0)

    # A pull with a filter: the serving side filters what it sends.
    b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "b-young", "AGE": 5})
    b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "b-old", "AGE": 50})
    # (B's stream also holds A's rows it received — adult and elder match too — but A's
    # origin mark says it holds all it wrote: B leaves them out, protocol 3.)
    ok(a.sync("pull", SV_REF, [b], table="EMPLOYEE", where=[["AGE", ">", 18]]), b, sent=1, applied=1)
    assert "b-young" not in [e[0] for e in employees(a)]
    ok(a.sync("pull", SV_REF, [b]), b, sent=2, applied=1)
    assert "b-young" in [e[0] for e in employees(a)]


def test_second_sync_of_a_store_while_one_runs_is_refused(linked_daemons) -> None:
    a, b = linked_daemons(2)
    setup_collab(a, b)
    other = {"store": "other"}
    setup_collab(a, b, ref=other)
    insert_many(a, COLLAB, 20_000)
    a.call("store.insert", **other, table="T", values={"id": 1, "name": "o", "n": 1})
    dev = dev_table(b, a)

    first = sync_in_background(a, "push", COLLAB, [b])
    wait_until(lambda: table_exists(b, COLLAB, dev) and b.count(COLLAB, dev) > 0, 20, "the first push is under way")
    assert not first.done(), "the push of 20k rows finished too soon for this test"
    for mode in ("push", "pull"):
        with pytest.raises(SyncInProgress) as err:
            a.call("store.sync", **COLLAB, mode=mode, predicates={"devices": [b.id]})
        assert "already in progress" in err.value.message
    # Another store of the same daemon is not held up.
    ok(a.sync("push", other, [b]), b, applied=1)
    ok(first.wait(60), b, sent=20_000, applied=20_000)
    assert b.count(COLLAB, dev) == 20_000
    ok(a.sync("push", COLLAB, [b]), b, sent=0)  # the lock is released


# ====================================================================== 5. sync failures


def test_unappliable_change_is_logged_the_rest_applies_retry_and_discard(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    setup_employee(a)
    # B has a rule A doesn't: ages are unique, and below 100.
    setup_employee(b, create=EMPLOYEE.replace("AGE INTEGER", "AGE INTEGER CHECK (AGE < 100)"),
                   extra_sql=["CREATE UNIQUE INDEX age_unique ON EMPLOYEE(AGE)"])
    for name, age in (("Ann", 30), ("Ben", 30), ("Cat", 40), ("Old", 120), ("Dot", 50)):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": age})

    r = one(a.sync("push", SV_REF, [b]), b)
    assert (r["sent"], r["applied"], r["failed"]) == (5, 3, 2), r
    assert [e[0] for e in employees(b)] == ["Ann", "Cat", "Dot"], "the rest of the batch applies"
    failures = b.call("store.sync_failures", **SV_REF)
    by_key = {f["change"]["key"]: f for f in failures}
    assert set(by_key) == {"Ben", "Old"}, failures
    for f in failures:
        assert f["origin"] == a.id and f["table"] == "EMPLOYEE" and f["at"], f
        assert f["change"]["key_column"] == "NAME" and not f["change"]["deleted"], f
    assert by_key["Ben"]["change"]["values"]["AGE"] == 30 and "UNIQUE" in by_key["Ben"]["reason"].upper(), by_key["Ben"]
    assert by_key["Old"]["change"]["values"]["AGE"] == 120 and "CHECK" in by_key["Old"]["reason"].upper(), by_key["Old"]
    # Pushing again does not duplicate the log entries.
    one(a.sync("push", SV_REF, [b]), b)
    assert sorted(f["id"] for f in b.call("store.sync_failures", **SV_REF)) == sorted(f["id"] for f in failures)

    # Still failing: the retry keeps it (with its reason).
    assert b.call("store.retry_failure", **SV_REF, id=by_key["Ben"]["id"])["failed"] == 1
    assert len(b.call("store.sync_failures", **SV_REF)) == 2
    # Fix the cause, retry: applied and gone.
    b.call("store.execute", **SV_REF, sql="DROP INDEX age_unique")
    result = b.call("store.retry_failure", **SV_REF, id=by_key["Ben"]["id"])
    assert (result["applied"], result["failed"]) == (1, 0), result
    assert ["Ben", 30, None] in employees(b)
    assert [f["change"]["key"] for f in b.call("store.sync_failures", **SV_REF)] == ["Old"]
    # Discard: removed without applying.
    assert b.call("store.discard_failure", **SV_REF, id=by_key["Old"]["id"]) == {}
    assert b.call("store.sync_failures", **SV_REF) == []
    assert "Old" not in [e[0] for e in employees(b)]
    with pytest.raises(FailureNotFound):
        b.call("store.discard_failure", **SV_REF, id=by_key["Old"]["id"])
    with pytest.raises(FailureNotFound):
        b.call("store.retry_failure", **SV_REF, id=by_key["Ben"]["id"])


def test_failures_cli_list_retry_discard(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    setup_employee(a)
    setup_employee(b, extra_sql=["CREATE UNIQUE INDEX age_unique ON EMPLOYEE(AGE)"])
    for name, age in (("Ann", 30), ("Ben", 30), ("Cy", 30)):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": age})
    r = one(a.sync("push", SV_REF, [b]), b)
    assert (r["applied"], r["failed"]) == (1, 2), r
    store = ("--store", STORE, "--bundle", BUNDLE)

    listed = cli(b, "failures", *store, "--json")
    assert listed.returncode == 0, listed.stderr
    failures = json.loads(listed.stdout)
    assert failures == b.call("store.sync_failures", **SV_REF) and len(failures) == 2
    ben, cy = sorted(failures, key=lambda f: f["change"]["key"])
    text = cli(b, "failures", "list", *store)
    assert text.returncode == 0 and a.id in text.stdout and "Ben" in text.stdout and str(ben["id"]) in text.stdout, text

    still = cli(b, "failures", *store, "retry", str(ben["id"]))
    assert still.returncode == 1 and "still failing" in still.stdout, still
    b.call("store.execute", **SV_REF, sql="DROP INDEX age_unique")
    retried = cli(b, "failures", *store, "retry", str(ben["id"]))
    assert retried.returncode == 0 and "applied" in retried.stdout, retried
    discarded = cli(b, "failures", *store, "discard", str(cy["id"]))
    assert discarded.returncode == 0 and "discarded" in discarded.stdout, discarded
    empty = cli(b, "failures", *store)
    assert empty.returncode == 0 and "no sync failures" in empty.stdout, empty
    assert [e[0] for e in employees(b)] == ["Ann", "Ben"]

    missing = cli(b, "failures", *store, "discard", str(cy["id"]))
    assert missing.returncode == 1 and "FAILURE_NOT_FOUND" in missing.stderr, missing
    usage = cli(b, "failures", *store, "retry")
    assert usage.returncode == 2, usage


# ====================================================================== 6. auto-sync


def has_employee(node: Node, name: str, age: Any = None) -> bool:
    rows = node.rows(SV_REF, "SELECT AGE FROM EMPLOYEE WHERE NAME = ?", [name])
    return bool(rows) and (age is None or rows[0][0] == age)


def test_auto_sync_pushes_api_and_outside_writes_both_ways(linked_daemons, record_property) -> None:
    a, b = linked_daemons(2, schema=True)
    setup_employee(a, auto_sync=True)
    setup_employee(b, auto_sync=True)
    latencies = []
    for i in range(5):
        t0 = time.monotonic()
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": f"api{i}", "AGE": i})
        latencies.append(wait_until(lambda: has_employee(b, f"api{i}") and time.monotonic() - t0, 5.0, f"api{i} reaches B",
                                    interval=0.002))
    record_property("auto_sync_latency_s", [round(x, 4) for x in latencies])
    print("auto-sync API insert -> visible on B (s):", [round(x, 4) for x in latencies])

    # A write by another program (the sqlite3 shell) on A's file.
    path = a.call("store.open", **SV_REF)["path"]
    shell = sqlite3_shell(path, "INSERT INTO EMPLOYEE (NAME, AGE) VALUES ('shell', 77)")
    assert shell.returncode == 0, shell.stderr
    wait_until(lambda: has_employee(b, "shell", 77), 5.0, "the shell's row reaches B")
    # Updates and deletes too, and the other way round.
    a.call("store.update", **SV_REF, values={"AGE": 99}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "api0"]]})
    wait_until(lambda: has_employee(b, "api0", 99), 5.0, "the update reaches B")
    b.call("store.delete", **SV_REF, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "api1"]]})
    b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "from-b", "AGE": 1})
    wait_until(lambda: has_employee(a, "from-b") and not has_employee(a, "api1"), 5.0, "B's changes reach A")
    wait_until(lambda: employees(a) == employees(b), 5.0, "A and B converge")
    stays(lambda: employees(a) == employees(b), 0.3, "no echo keeps changing them")
    assert len(employees(a)) == 6


def test_auto_sync_catches_up_after_the_peer_restarts(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    setup_employee(a, auto_sync=True)
    setup_employee(b, auto_sync=True)
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "before", "AGE": 1})
    wait_until(lambda: has_employee(b, "before"), 5.0, "auto-sync works")

    b.stop()
    wait_until(lambda: not a.sees_online(b), 10, "a sees b offline")
    for i in range(3):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": f"missed{i}", "AGE": 10 + i})
    a.call("store.update", **SV_REF, values={"AGE": 2}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "before"]]})
    b.restart()  # B dials A again; neither side is asked to sync
    wait_linked([a, b])
    b.call("store.open", **SV_REF)
    wait_until(lambda: all(has_employee(b, f"missed{i}", 10 + i) for i in range(3)) and has_employee(b, "before", 2),
               5.0, "B gets what it missed after reconnecting")
    assert employees(a) == employees(b)


def test_auto_sync_reconnect_pushes_writes_made_while_the_daemon_was_down(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    setup_employee(a, auto_sync=True)
    path = setup_employee(b, auto_sync=True) and b.call("store.open", **SV_REF)["path"]
    b.stop()
    wait_until(lambda: not a.sees_online(b), 10, "a sees b offline")
    shell = sqlite3_shell(path, "INSERT INTO EMPLOYEE (NAME, AGE) VALUES ('offline-b', 5)")
    assert shell.returncode == 0, shell.stderr
    b.restart()
    wait_linked([a, b])
    b.call("store.open", **SV_REF)  # what B's application does after a restart
    wait_until(lambda: has_employee(a, "offline-b"), 5.0, "B's offline write reaches A after reconnecting")


# ====================================================================== 7. notifications


def data_changes(got: list[dict[str, Any]], subscription: str) -> list[dict[str, Any]]:
    return [n["params"] for n in got if n["method"] == "dataChange" and n["params"]["subscription"] == subscription]


def test_remote_and_remote_details_notifications_name_the_origin(linked_daemons) -> None:
    a, b = linked_daemons(2)
    setup_collab(a, b)
    watcher = b.client()
    remote = watcher.call("store.subscribe", **COLLAB, type="remote")["subscription"]
    details = watcher.call("store.subscribe", **COLLAB, type="remote_details")["subscription"]
    local = watcher.call("store.subscribe", **COLLAB, type="local_details")["subscription"]

    a.call("store.insert", **COLLAB, table="T", values={"id": 1, "name": "a1", "n": 1})
    a.call("store.insert", **COLLAB, table="T", values={"id": 2, "name": "a2", "n": 2})
    ok(a.sync("push", COLLAB, [b]), b, applied=2)
    got = collect_notifications(watcher, lambda g: data_changes(g, remote) and data_changes(g, details), 5.0)
    [r] = data_changes(got, remote)
    assert r["store"] == "s" and r["devices"] == [a.id], r
    [d] = data_changes(got, details)
    assert d["store"] == "s" and len(d["changes"]) == 1, d
    change = d["changes"][0]
    assert change["origin"] == a.id and change["table"] == "T" and change["type"] == "data", change
    assert (sorted(change["inserted"]), change["updated"], change["deleted"]) == ([1, 2], [], []), change
    assert not data_changes(got, local), "rows written by a sync are not local changes"

    # Update and delete, this time pulled by B.
    a.call("store.update", **COLLAB, values={"n": 10}, predicates={"table": "T", "where": [["id", "=", 1]]})
    a.call("store.delete", **COLLAB, predicates={"table": "T", "where": [["id", "=", 2]]})
    ok(b.sync("pull", COLLAB, [a]), a, applied=2)
    got = collect_notifications(watcher, lambda g: data_changes(g, remote) and data_changes(g, details), 5.0)
    assert [r["devices"] for r in data_changes(got, remote)] == [[a.id]], got
    [d] = data_changes(got, details)
    assert [(c["origin"], c["inserted"], c["updated"], c["deleted"]) for c in d["changes"]] == [(a.id, [], [1], [2])], d

    # A sync that writes nothing notifies nobody.
    ok(a.sync("push", COLLAB, [b]), b, applied=0)
    got = collect_notifications(watcher, lambda g: bool(g), 0.5)
    assert not [n for n in got if n["method"] == "dataChange"], got


def progress_notes(api: Any) -> list[dict[str, Any]]:
    got = collect_notifications(api, lambda g: any(n["method"] == "syncProgress" and n["params"]["schedule"] == "finish"
                                                   for n in g), 5.0)
    return [n["params"] for n in got if n["method"] == "syncProgress"]


def test_the_syncing_client_gets_sync_progress(linked_daemons) -> None:
    a, b, c = linked_daemons(3)
    setup_collab(a, b)
    insert_many(a, COLLAB, 1200)
    caller = a.client()
    results = caller.call("store.sync", **COLLAB, mode="push", predicates={"devices": [b.id]})["results"]
    assert [r["code"] for r in results] == [SUCCESS]
    notes = progress_notes(caller)
    schedules = [n["schedule"] for n in notes]
    assert schedules[0] == "begin" and schedules[-1] == "finish", schedules
    assert set(schedules[1:-1]) == {"in_progress"} and len(schedules) >= 3, schedules
    assert all(n["store"] == "s" for n in notes) and notes[-1]["code"] == SUCCESS, notes
    totals = [n["details"]["T"]["upload"]["total"] for n in notes if n["schedule"] == "in_progress"]
    assert totals == sorted(totals) and totals[-1] == 1200, totals
    last = [n for n in notes if n["schedule"] == "in_progress"][-1]["details"]["T"]["upload"]
    assert (last["successful"], last["failed"], last["remained"]) == (1200, 0, 0), last
    # Nobody else hears of it.
    assert not [n for n in collect_notifications(a.api, lambda g: False, 0.2) if n["method"] == "syncProgress"]

    # A pull reports downloads; a failed device shows in the finish code.
    b.call("store.insert", **COLLAB, table="T", values={"id": 1, "name": "b1", "n": 1})
    c.stop()
    wait_until(lambda: not a.sees_online(c), 10, "a sees c offline")
    results = caller.call("store.sync", **COLLAB, mode="pull", predicates={"devices": [b.id, c.id]})["results"]
    assert sorted(r["code"] for r in results) == [SUCCESS, OFFLINE], results
    notes = progress_notes(caller)
    assert notes[0]["schedule"] == "begin" and notes[-1]["schedule"] == "finish" and notes[-1]["code"] == OFFLINE, notes
    assert any(n["details"].get("T", {}).get("download", {}).get("total") == 1 for n in notes), notes


# ====================================================================== 8. crash safety

CRASH_ROWS = 100_000


def table_digest(node: Node) -> tuple[int, int, str]:
    rows = node.rows(SV_REF, "SELECT NAME, AGE, SALARY FROM EMPLOYEE ORDER BY NAME")
    return len(rows), len({r[0] for r in rows}), digest(rows)


@pytest.mark.slow
def test_kill_9_of_the_receiver_mid_push_loses_and_duplicates_nothing(linked_daemons, record_property) -> None:
    a, b = linked_daemons(2, schema=True)
    setup_employee(a)
    setup_employee(b)
    insert_many(a, SV_REF, CRASH_ROWS, table="EMPLOYEE")
    t0 = time.monotonic()
    push = sync_in_background(a, "push", SV_REF, [b])
    seen = wait_until(lambda: (n := b.count(SV_REF, "EMPLOYEE")) >= 5_000 and n, 30, "B is receiving", interval=0.05)
    b.kill()
    assert seen < CRASH_ROWS, "the push finished before the kill; nothing was tested"
    r = one(push.wait(120), b)  # at once on an idle machine; a loaded one is slow to read the next batch
    assert r["code"] in (OFFLINE, TIMEOUT), r
    print(f"killed B after {time.monotonic() - t0:.2f} s with >= {seen} rows applied; A's result: {r}")

    b.restart()
    wait_linked([a, b])
    b.call("store.open", **SV_REF)
    assert b.rows(SV_REF, "PRAGMA integrity_check") == [["ok"]]
    kept = b.count(SV_REF, "EMPLOYEE")
    assert seen <= kept < CRASH_ROWS, (seen, kept)

    t1 = time.monotonic()
    r = ok(a.sync("push", SV_REF, [b]), b)
    record_property("resume_push_s", round(time.monotonic() - t1, 2))
    # The receiver's watermark moved with each batch it committed: the push resumes there.
    assert r["sent"] == CRASH_ROWS - kept and r["applied"] == CRASH_ROWS - kept and r["failed"] == 0, (kept, r)
    assert table_digest(b) == table_digest(a) == (CRASH_ROWS, CRASH_ROWS, table_digest(a)[2])
    assert b.call("store.sync_failures", **SV_REF) == []
    ok(a.sync("push", SV_REF, [b]), b, sent=0)


# ====================================================================== 9. schema versions between peers

DEPT_FIELD = {"columnName": "DEPT", "type": "Text", "primaryKey": False, "notNull": False, "autoIncrement": False}


def mismatch_fields(view: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in view.items() if "schema" in k.lower() or "mismatch" in k.lower()}


def test_peers_on_different_schema_versions_sync_the_common_columns(linked_daemons) -> None:
    v1 = schema_doc(1, ("NAME", "AGE", "SALARY", "CODES", "DEPT"), [DEPT_FIELD])
    a, b = linked_daemons(2, schema={0: v1, 1: schema_doc(0)})
    setup_employee(a, create=EMPLOYEE.replace("CODES BLOB", "CODES BLOB, DEPT TEXT"))
    setup_employee(b)
    assert [s["schema_version"] for s in a.call("status")["stores"] if s["store"] == STORE] == [1]
    assert [s["schema_version"] for s in b.call("status")["stores"] if s["store"] == STORE] == [0]

    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Gus", "AGE": 40, "DEPT": "ops"})
    b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Hal", "AGE": 50, "SALARY": 5.0})
    r = ok(a.sync("push", SV_REF, [b]), b, applied=1)
    assert r["failed"] == 0, r
    r = ok(a.sync("pull", SV_REF, [b]), b, applied=1)
    assert r["failed"] == 0, r
    assert employees(b) == employees(a) == [["Gus", 40, None], ["Hal", 50, 5.0]]
    assert a.rows(SV_REF, "SELECT NAME, DEPT FROM EMPLOYEE ORDER BY NAME") == [["Gus", "ops"], ["Hal", None]]
    # A later edit of a common column still travels; the column B does not sync never fails there.
    a.call("store.update", **SV_REF, values={"AGE": 41, "DEPT": "dev"}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Gus"]]})
    ok(a.sync("push", SV_REF, [b]), b, applied=1)
    assert employees(b)[0] == ["Gus", 41, None]
    assert a.call("store.sync_failures", **SV_REF) == [] and b.call("store.sync_failures", **SV_REF) == []

    # The mismatch is reported (SPEC §6), if the daemon reports it yet.
    fields = mismatch_fields(a.view(b) or {})
    if not fields:
        pytest.skip("devices.list has no schema/mismatch field yet: the version mismatch report is not implemented")
    for me, other, mine, theirs in ((a, b, 1, 0), (b, a, 0, 1)):
        listed = mismatch_fields(me.view(other))
        text = json.dumps(listed)
        assert any(listed.values()) and "EMPLOYEE" in text, (me, listed)
        [entry] = [e for v in listed.values() if isinstance(v, list) for e in v if e.get("table") == "EMPLOYEE"] or [None]
        if entry is not None:
            assert (entry.get("version"), entry.get("peer_version")) == (mine, theirs), entry
            assert entry.get("code", SUCCESS) == SUCCESS, entry
        [in_status] = [d for d in me.call("status")["devices"] if d["device_id"] == other.id]
        assert mismatch_fields(in_status) == listed


def test_a_late_upgrade_keeps_the_values_peers_sent_before_it(linked_daemons) -> None:
    """Single_version, issue 12: A upgrades to v1 (adds the synced column
    DEPT) and writes DEPT; B, still on v0, receives the rows without DEPT.
    When B upgrades, DEPT's values are there (parked, then merged under A's
    clocks), and B's upgrade gives no fresh clock to the NULLs its ALTER left:
    after syncing both ways every device holds A's values. (It used to end
    with DEPT NULL everywhere: B's re-sent NULLs beat A's older clocks.)"""
    v1 = schema_doc(1, ("NAME", "AGE", "SALARY", "CODES", "DEPT"), [DEPT_FIELD])
    a, b = linked_daemons(2, schema={0: v1, 1: schema_doc(0)})
    setup_employee(a, create=EMPLOYEE.replace("CODES BLOB", "CODES BLOB, DEPT TEXT"))
    setup_employee(b)
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Gus", "AGE": 40, "DEPT": "p"})
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Ann", "AGE": 30})
    b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Hal", "AGE": 50})
    ok(a.sync("push", SV_REF, [b]), b, applied=2)
    a.call("store.update", **SV_REF, values={"DEPT": "q"}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Ann"]]})
    r = ok(a.sync("push", SV_REF, [b]), b, applied=1)  # only DEPT changed: kept on B, not a failure
    assert r["failed"] == 0 and b.call("store.sync_failures", **SV_REF) == []
    ok(a.sync("pull", SV_REF, [b]), b)

    # B upgrades late: the column, then the schema.
    b.call("store.execute", **SV_REF, sql="ALTER TABLE EMPLOYEE ADD COLUMN DEPT TEXT")
    write_schema(b.proc.data_dir, v1)
    result = b.call("store.set_distributed_tables", **SV_REF, tables=["EMPLOYEE"], config=SV)
    assert result["schema_version"] == 1
    assert result["resent"] == {"EMPLOYEE": 0}, "no row of B holds a DEPT written on B: nothing gets a fresh clock"
    expected = [["Ann", "q"], ["Gus", "p"], ["Hal", None]]
    assert b.rows(SV_REF, "SELECT NAME, DEPT FROM EMPLOYEE ORDER BY NAME") == expected

    for direction in ("push", "pull", "push"):
        r = ok(b.sync(direction, SV_REF, [a]), a)
        assert r["failed"] == 0, r
    for node in (a, b):
        assert node.rows(SV_REF, "SELECT NAME, DEPT FROM EMPLOYEE ORDER BY NAME") == expected, node
    # A value B writes now travels as usual.
    b.call("store.update", **SV_REF, values={"DEPT": "r"}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Hal"]]})
    ok(b.sync("push", SV_REF, [a]), a, applied=1)
    assert a.rows(SV_REF, "SELECT DEPT FROM EMPLOYEE WHERE NAME = 'Hal'") == [["r"]]


def test_same_schema_version_reports_no_mismatch(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    setup_employee(a)
    setup_employee(b)
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Ida", "AGE": 1})
    ok(a.sync("push", SV_REF, [b]), b, applied=1)
    ok(a.sync("pull", SV_REF, [b]), b)
    fields = mismatch_fields(a.view(b) or {})
    if not fields:
        pytest.skip("devices.list has no schema/mismatch field yet: the version mismatch report is not implemented")
    assert not any(mismatch_fields(a.view(b)).values()) and not any(mismatch_fields(b.view(a)).values())


# ====================================================================== 10. the sync command


def test_cli_sync_push_pull_devices_all_table_where_json_and_exit_codes(linked_daemons) -> None:
    a, b, c = linked_daemons(3, schema=True)
    for node in (a, b, c):
        setup_employee(node)
    store = ("--store", STORE, "--bundle", BUNDLE)
    for name, age in (("kid", 10), ("adult", 30), ("elder", 80)):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": age})

    # --where (query sync) to one device: only matching rows.
    run = cli(a, "sync", *store, "--push", "--devices", b.id, "--table", "EMPLOYEE", "--where", "AGE > 18", "--where", "AGE < 50")
    assert run.returncode == 0, run.stderr
    assert b.id in run.stdout and "code 0 SUCCESS" in run.stdout, run.stdout
    assert employees(b) == [["adult", 30, None]]
    assert employees(c) == []

    # --json: the API's result.
    run = cli(a, "sync", *store, "--push", "--devices", b.id, "--table", "EMPLOYEE", "--json")
    assert run.returncode == 0, run.stderr
    [result] = json.loads(run.stdout)["results"]
    assert (result["device"], result["code"], result["sent"], result["applied"]) == (b.id, SUCCESS, 3, 2), result
    assert [e[0] for e in employees(b)] == ["adult", "elder", "kid"]

    # --all: every online trusted device.
    run = cli(a, "sync", *store, "--push", "--all", "--json")
    assert run.returncode == 0, run.stderr
    assert {r["device"]: r["code"] for r in json.loads(run.stdout)["results"]} == {b.id: SUCCESS, c.id: SUCCESS}
    assert employees(c) == employees(a)

    # --pull, several devices in one --devices list.
    c.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "from-c", "AGE": 5})
    run = cli(a, "sync", *store, "--pull", "--devices", f"{b.id},{c.id}", "--json")
    assert run.returncode == 0, run.stderr
    assert sorted(r["device"] for r in json.loads(run.stdout)["results"]) == sorted([b.id, c.id])
    assert "from-c" in [e[0] for e in employees(a)]

    # Exit status 1 when any device failed; the others still sync and every device has its line.
    stranger = random_device_id()
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "late", "AGE": 44})
    run = cli(a, "sync", *store, "--push", "--devices", f"{b.id},{stranger}")
    assert run.returncode == 1, (run.stdout, run.stderr)
    lines = run.stdout.strip().splitlines()
    assert any(b.id in line and "code 0" in line for line in lines), lines
    assert any(stranger in line and f"code {UNTRUSTED}" in line for line in lines), lines
    assert "late" in [e[0] for e in employees(b)]
    run = cli(a, "sync", *store, "--push", "--devices", f"{b.id},{stranger}", "--json")
    assert run.returncode == 1
    assert {r["device"]: r["code"] for r in json.loads(run.stdout)["results"]} == {b.id: SUCCESS, stranger: UNTRUSTED}
    c.stop()
    wait_until(lambda: not a.sees_online(c), 10, "a sees c offline")
    run = cli(a, "sync", *store, "--push", "--devices", c.id)
    assert run.returncode == 1 and f"code {OFFLINE}" in run.stdout, run

    # Bad usage: exit 2.
    for argv in (("--push",), ("--push", "--pull", "--all"), ("--push", "--all", "--where", "AGE ~ 3")):
        run = cli(a, "sync", *store, *argv)
        assert run.returncode == 2, (argv, run.stdout, run.stderr)
    # Errors from the daemon: exit 1 with the error's name.
    run = cli(a, "sync", *store, "--push", "--all", "--table", "NOPE")
    assert run.returncode == 1 and "TABLE_NOT_DISTRIBUTED" in run.stderr, run
    run = cli(a, "sync", *store, "--push", "--all", "--table", "EMPLOYEE", "--where", "NOPE = 1")
    assert run.returncode == 1 and run.stderr.strip(), run


def test_cli_sync_shows_a_progress_bar_on_a_terminal(linked_daemons) -> None:
    """On a terminal, `p2pstore sync` draws progress on stderr from syncProgress notifications."""
    import pty
    import select

    a, b = linked_daemons(2)
    for node in (a, b):
        node.call("store.open", store="bar")
        node.call("store.execute", store="bar", sql="CREATE TABLE T (id INTEGER PRIMARY KEY, v TEXT)")
        node.call("store.set_distributed_tables", store="bar", tables=["T"])
    a.call("store.execute", store="bar", sql="WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000) "
                                            "INSERT INTO T(v) SELECT 'row ' || x FROM c")
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "p2pstore", "sync", "--store", "bar", "--push", "--devices", b.id,
                                 "--socket", str(a.proc.socket)], stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        seen = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        out, _ = proc.communicate(timeout=30)
    finally:
        os.close(master)
    assert proc.returncode == 0, out
    assert b"push:" in seen and b"row(s)" in seen, seen[-300:]
    assert "code 0" in out
