"""Remote query end to end (issue 6): ``store.remote_query`` and
``p2pstore query --remote`` between real daemons linked over TLS on 127.0.0.1.

The asking device A sends structured predicates; the answering device B
compiles them against the columns it syncs (collaborative: its own table
``T``; single_version: the sync columns only), checks trust and the
security-level rule itself, reads through a read-only connection and sends
pages of about 4 MiB, each acknowledged. Here: every operator of SPEC §5 and
ordering/paging against a Python oracle, what may be read, injection attempts
(refused, the remote table unchanged), a 50 MB result, and every error a
caller can get (DEVICE_OFFLINE, DEVICE_UNTRUSTED, INVALID_DEVICE_ID,
SECURITY_LEVEL decided by B, TIMEOUT with B stopped).

Most tests share one linked pair (module fixture ``pair``) and only read B;
tests that stop, untrust or reconfigure a daemon start their own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from p2ps_helpers import LOOPBACK, DaemonProcess, write_config
from sync_helpers import (
    EMPLOYEE,
    LO,
    SV_REF,
    Node,
    cli,
    collect_notifications,
    link,
    linked_daemons,  # noqa: F401  (fixture)
    setup_employee,
    wait_linked,
    wait_until,
    write_schema,
)

from p2pstore.errors import (
    DeviceOffline,
    DeviceUntrusted,
    InvalidDeviceId,
    InvalidPredicate,
    P2PStoreError,
    SecurityLevelDenied,
    StoreNotOpen,
    SyncTimeout,
    TableNotDistributed,
)
from p2pstore.net.identity import device_id_from_key_hash

pytestmark = pytest.mark.timeout(120)

RQ = {"store": "rq"}
T_CREATE = "CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, salary REAL, data BLOB)"
T_COLUMNS = ["id", "name", "age", "salary", "data"]
#: B's own rows of T (id, name, age, salary, data): NULLs, quotes, a % in a name, blobs.
ROWS: list[list[Any]] = [
    [1, "alice", 30, 100.0, b"\x00\x01"],
    [2, "Alfred", 25, None, None],
    [3, "bob", 35, 300.5, b"bob"],
    [4, "O'Brien", None, 50.0, None],
    [5, "carol", 30, 75.25, b"\xff"],
    [6, "dave", 41, None, b"dave"],
    [7, "al%ice", 18, 10.0, None],
    [8, "eve", 25, 220.0, None],
    [9, None, 60, 0.0, None],
    [10, "Zoe", 33, -5.5, b"z"],
    [11, "mallory", 29, 1e6, None],
    [12, "trent", 30, 99.99, None],
]
#: A's own rows of T: pushed to B, they live in B's device table for A, never in B's T.
A_ROWS: list[list[Any]] = [[100, "from-a", 30, 1.0, None], [101, "alice", 30, 2.0, None]]
SV_COLUMNS = ["NAME", "AGE", "SALARY", "CODES"]  # the seed's sync columns of EMPLOYEE, in its order
EMPLOYEE_WITH_SECRET = EMPLOYEE[:-1] + ", SECRET TEXT)"  # a column B has but does not sync


# ---------------------------------------------------------------------- the shared pair


class Pair:
    def __init__(self, a: Node, b: Node) -> None:
        self.a, self.b = a, b

    def query(self, table: str = "T", ref: dict[str, Any] = RQ, predicates: dict[str, Any] | None = None,
              columns: list[str] | None = None, device: str | None = None, via: Node | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {**ref, "device": device or self.b.id, "table": table}
        if predicates is not None:
            params["predicates"] = predicates
        if columns is not None:
            params["columns"] = columns
        return (via or self.a).call("store.remote_query", **params)

    def ids(self, **predicates: Any) -> list[int]:
        result = self.query(predicates=predicates, columns=["id"])
        assert result["columns"] == ["id"]
        return [r[0] for r in result["rows"]]


def start_node(root: Path, name: str, *extra: str) -> Node:
    proc = DaemonProcess(root, name, ["--no-discovery", *LOOPBACK, *extra])
    proc.start()
    return Node(proc)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """B (answers) and A (asks, dials B): linked, with a collaborative store ``rq``
    (T on both, B's rows ROWS, A's rows pushed to B) and the seed's single-version
    store (B's EMPLOYEE has an unsynced SECRET column; one row came from A)."""
    root = Path(tempfile.mkdtemp(prefix="p2ps-", dir="/tmp"))
    os.chmod(root, 0o700)
    nodes: list[Node] = []
    try:
        for name in ("b", "a"):
            write_schema(root / name, True)
        b = start_node(root, "b")
        nodes.append(b)
        a = start_node(root, "a", "--peer", f"{LO}:{b.port}")
        nodes.append(a)
        link(a, b)
        wait_linked([a, b])

        for node, rows in ((b, ROWS), (a, A_ROWS)):
            node.call("store.open", **RQ)
            node.call("store.execute", **RQ, sql=T_CREATE)
            node.call("store.execute", **RQ, sql="CREATE TABLE T2 (id INTEGER PRIMARY KEY)")
            for row in rows:
                node.call("store.insert", **RQ, table="T", values=dict(zip(T_COLUMNS, row)))
        b.call("store.set_distributed_tables", **RQ, tables=["T"])
        a.call("store.set_distributed_tables", **RQ, tables=["T", "T2"])  # B does not distribute T2
        assert a.sync("push", RQ, [b], table="T")[b.id]["code"] == 0

        setup_employee(b, create=EMPLOYEE_WITH_SECRET)
        setup_employee(a)
        for i, name in enumerate(["Ann", "Ben", "Cid", "Dot"]):
            b.call("store.insert", **SV_REF, table="EMPLOYEE",
                   values={"NAME": name, "AGE": 20 + 10 * i, "SALARY": 1000.0 * i, "SECRET": f"secret-{name}"})
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "FromA", "AGE": 99, "CODES": b"\x01\x02"})
        assert a.sync("push", SV_REF, [b])[b.id]["code"] == 0
        yield Pair(a, b)
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- a Python oracle


def like(pattern: str) -> Callable[[Any], bool]:
    """SQLite LIKE (ASCII case-insensitive, % and _) for the oracle."""
    rx = re.compile("".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern), re.I | re.S)
    return lambda v: v is not None and rx.fullmatch(str(v)) is not None


def col(name: str) -> int:
    return T_COLUMNS.index(name)


def cmp(name: str, fn: Callable[[Any], bool]) -> Callable[[list[Any]], bool]:
    return lambda row: row[col(name)] is not None and fn(row[col(name)])


OPERATOR_CASES: dict[str, tuple[list[Any], Callable[[list[Any]], bool]]] = {
    "=": ([["age", "=", 30]], cmp("age", lambda v: v == 30)),
    "!=": ([["age", "!=", 30]], cmp("age", lambda v: v != 30)),
    "<": ([["age", "<", 30]], cmp("age", lambda v: v < 30)),
    "<=": ([["age", "<=", 30]], cmp("age", lambda v: v <= 30)),
    ">": ([["age", ">", 30]], cmp("age", lambda v: v > 30)),
    ">=": ([["age", ">=", 30]], cmp("age", lambda v: v >= 30)),
    "real <": ([["salary", "<", 75.25]], cmp("salary", lambda v: v < 75.25)),
    "like prefix": ([["name", "like", "a%"]], cmp("name", like("a%"))),
    "like _": ([["name", "like", "%l_ce"]], cmp("name", like("%l_ce"))),
    "in": ([["age", "in", [25, 35, 99]]], cmp("age", lambda v: v in (25, 35, 99))),
    "in text": ([["name", "in", ["bob", "O'Brien", "nobody"]]], cmp("name", lambda v: v in ("bob", "O'Brien"))),
    "in empty": ([["age", "in", []]], lambda row: False),
    "not_in": ([["age", "not_in", [25, 35]]], cmp("age", lambda v: v not in (25, 35))),
    "not_in empty": ([["age", "not_in", []]], lambda row: True),
    "between": ([["age", "between", 25, 30]], cmp("age", lambda v: 25 <= v <= 30)),
    "between real": ([["salary", "between", 0, 100]], cmp("salary", lambda v: 0 <= v <= 100)),
    "is_null": ([["salary", "is_null"]], lambda row: row[col("salary")] is None),
    "is_not_null": ([["salary", "is_not_null"]], lambda row: row[col("salary")] is not None),
    "quote in value": ([["name", "=", "O'Brien"]], cmp("name", lambda v: v == "O'Brien")),
    "blob =": ([["data", "=", b"bob"]], cmp("data", lambda v: v == b"bob")),
    "and (items)": ([["age", ">=", 25], ["age", "<=", 30], ["salary", "is_not_null"]],
                    lambda r: r[2] is not None and 25 <= r[2] <= 30 and r[3] is not None),
    "or group": ([["age", ">", 20], {"or": [["name", "like", "a%"], ["salary", "is_null"]]}],
                 lambda r: r[2] is not None and r[2] > 20 and (like("a%")(r[1]) or r[3] is None)),
    "and in or": ([{"or": [{"and": [["age", ">=", 30], ["salary", "<", 100]]}, ["name", "=", "eve"]]}],
                  lambda r: (r[2] is not None and r[2] >= 30 and r[3] is not None and r[3] < 100) or r[1] == "eve"),
    "nested or of or": ([{"or": [["id", "=", 1], {"or": [["id", "=", 2], {"or": [["id", "=", 3]]}]}]}],
                        lambda r: r[0] in (1, 2, 3)),
    "no where": ([], lambda r: True),
}


# ====================================================================== 1. operators, order, paging (collaborative)


@pytest.mark.parametrize("case", list(OPERATOR_CASES), ids=list(OPERATOR_CASES))
def test_every_operator_matches_the_oracle(pair: Pair, case: str) -> None:
    where, keep = OPERATOR_CASES[case]
    expected = [r[0] for r in ROWS if keep(r)]
    assert pair.ids(where=where, order_by=[["id", "asc"]]) == expected


def test_all_operators_are_covered() -> None:
    from p2pstore.schema.predicates import ALL_OPS
    used = {term[1] for where, _ in OPERATOR_CASES.values() for term in where if isinstance(term, list)}
    assert set(ALL_OPS) <= used, set(ALL_OPS) - used


def test_whole_rows_and_chosen_columns(pair: Pair) -> None:
    # Collaborative: B's own table T, all its columns, values (blobs, NULLs, reals) intact.
    everything = pair.query(predicates={"order_by": [["id", "asc"]]})
    assert everything == {"columns": T_COLUMNS, "rows": ROWS}
    # Not the rows B received from A (they are in B's device table for A).
    assert pair.b.count(RQ, pair.b.call("store.distributed_table_name", **RQ, device=pair.a.id, table="T")["table"]) == 2
    chosen = pair.query(columns=["name", "id"], predicates={"where": [["id", "<=", 2]], "order_by": [["id", "asc"]]})
    assert chosen == {"columns": ["name", "id"], "rows": [["alice", 1], ["Alfred", 2]]}
    # No predicates at all: every row.
    assert sorted(r[0] for r in pair.query()["rows"]) == [r[0] for r in ROWS]


def test_order_by_limit_offset(pair: Pair) -> None:
    # SQLite orders NULL first ascending, last descending.
    by_age_desc = sorted(ROWS, key=lambda r: (r[2] is None, -(r[2] or 0), r[0]))
    assert pair.ids(order_by=[["age", "desc"], ["id", "asc"]]) == [r[0] for r in by_age_desc]
    by_salary = sorted(ROWS, key=lambda r: (r[3] is not None, r[3] if r[3] is not None else 0, r[0]))
    assert pair.ids(order_by=[["salary", "asc"], ["id", "asc"]]) == [r[0] for r in by_salary]
    assert pair.ids(order_by=["name", "id"])[:2] == [9, 2]  # a bare name is ascending; NULL first, then 'Alfred'
    ids = [r[0] for r in ROWS]
    assert pair.ids(order_by=[["id", "asc"]], limit=3) == ids[:3]
    assert pair.ids(order_by=[["id", "asc"]], limit=3, offset=2) == ids[2:5]
    assert pair.ids(order_by=[["id", "asc"]], offset=10) == ids[10:]
    assert pair.ids(order_by=[["id", "desc"]], limit=2, offset=1) == ids[::-1][1:3]
    assert pair.ids(order_by=[["id", "asc"]], limit=0) == []
    assert pair.ids(order_by=[["id", "asc"]], offset=1000) == []
    assert pair.ids(where=[["age", "=", 30]], order_by=[["salary", "desc"]], limit=2) == [1, 12]


def test_cli_query_remote(pair: Pair) -> None:
    a, b = pair.a, pair.b
    run = cli(a, "query", "--remote", b.id, "--store", "rq", "T", "--columns", "id,name,age",
              "--where", "age >= 30", "--where", "name like %l%", "--order-by", "age:desc", "--order-by", "id",
              "--limit", "2", "--offset", "1", "--json")
    assert run.returncode == 0, run.stderr
    expected = sorted([r for r in ROWS if r[2] is not None and r[2] >= 30 and like("%l%")(r[1])],
                      key=lambda r: (-r[2], r[0]))[1:3]
    assert json.loads(run.stdout) == {"columns": ["id", "name", "age"], "rows": [r[:3] for r in expected]}
    # in, text output (header line, tab-separated, NULL, blobs as $blob).
    run = cli(a, "query", "--remote", b.id, "--store", "rq", "T", "--where", "id in 3,4", "--order-by", "id")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split("\t") == T_COLUMNS
    assert lines[1].split("\t") == ["3", "bob", "35", "300.5", json.dumps({"$blob": base64.b64encode(b"bob").decode()})]
    assert lines[2].split("\t") == ["4", "O'Brien", "NULL", "50.0", "NULL"]
    assert len(lines) == 3
    # Errors: exit 1 with the reason on stderr; bad usage: exit 2.
    run = cli(a, "query", "--remote", b.id, "--store", "rq", "T", "--columns", "nope")
    assert run.returncode == 1 and "nope" in run.stderr, run
    run = cli(a, "query", "--remote", "not-a-device", "--store", "rq", "T")
    assert run.returncode == 1 and run.stderr.strip(), run
    run = cli(a, "query", "--remote", b.id, "--store", "rq", "T", "--where", "age ~~ 3")
    assert run.returncode == 2, run


# ====================================================================== 2. single_version: sync columns only


def test_single_version_reads_the_merged_table_and_only_sync_columns(pair: Pair) -> None:
    result = pair.query("EMPLOYEE", SV_REF, predicates={"order_by": [["NAME", "asc"]]})
    assert result["columns"] == SV_COLUMNS
    assert [r[0] for r in result["rows"]] == ["Ann", "Ben", "Cid", "Dot", "FromA"]  # merged: A's row too
    assert result["rows"][-1] == ["FromA", 99, None, b"\x01\x02"]
    assert "secret" not in json.dumps(result, default=repr).lower()
    got = pair.query("EMPLOYEE", SV_REF, columns=["NAME"],
                     predicates={"where": [["AGE", "between", 30, 50], ["SALARY", "is_not_null"]], "order_by": [["AGE", "desc"]]})
    assert got == {"columns": ["NAME"], "rows": [["Dot"], ["Cid"], ["Ben"]]}


@pytest.mark.parametrize("columns, predicates", [
    (["ID"], {}),                                    # the auto-increment key never travels
    (["SECRET"], {}),                                # a column B does not sync
    (["NAME", "SECRET"], {}),
    ([], {"where": [["SECRET", "like", "secret%"]]}),  # not even as a filter...
    ([], {"where": [{"or": [["NAME", "=", "x"], ["SECRET", "is_not_null"]]}]}),
    ([], {"where": [["ID", ">", 0]]}),
    ([], {"order_by": [["SECRET", "asc"]]}),          # ...or an order (it would leak through the order)
    ([], {"order_by": [["ID", "desc"]]}),
    (["name"], {}),                                  # names are case-sensitive
], ids=["ID", "SECRET", "NAME+SECRET", "where SECRET", "where in or", "where ID", "order SECRET", "order ID", "case"])
def test_single_version_unsynced_columns_are_refused(pair: Pair, columns: list[str], predicates: dict[str, Any]) -> None:
    with pytest.raises(InvalidPredicate) as err:
        pair.query("EMPLOYEE", SV_REF, predicates=predicates, columns=columns)
    assert err.value.message.startswith(f"device {pair.b.id}"), err.value.message  # B's decision


# ====================================================================== 3. injection, read-only


def fingerprint(node: Node) -> tuple[Any, ...]:
    """Everything a write could change in B's store ``rq``."""
    path = node.call("store.open", **RQ)["path"]
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT * FROM T ORDER BY id").fetchall()
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        changes = conn.execute("SELECT count(*), max(seq) FROM _p2p_changes").fetchone()
        return (hashlib.sha256(repr(rows).encode()).hexdigest(), len(rows), schema, changes)
    finally:
        conn.close()


BAD_NAMES = [
    'name"; DROP TABLE T; --',
    'id FROM T; DELETE FROM T; --',
    "id) OR 1=1 --",
    '"id"',
    "*",
    "rowid",
    "count(*)",
    "sqlite_version()",
    "(SELECT group_concat(name) FROM sqlite_master)",
    "_p2p_changes.seq",
    "id; ATTACH DATABASE '/tmp/x' AS x",
    "",
]
BAD_OPS = ["== 1 OR 1=1 --", "LIKE", "IS", "glob", "match", "regexp", "; DROP TABLE T", "=1) OR (1", "in (SELECT 1)", "<>", None, 1]


def injection_attempts() -> list[tuple[str, dict[str, Any], list[str] | None]]:
    attempts: list[tuple[str, dict[str, Any], list[str] | None]] = []
    for name in BAD_NAMES:
        if name:
            attempts.append((f"columns {name!r}", {}, [name]))
        attempts.append((f"where column {name!r}", {"where": [[name, "=", 1]]}, None))
        attempts.append((f"order_by column {name!r}", {"order_by": [[name, "asc"]]}, None))
    for op in BAD_OPS:
        attempts.append((f"operator {op!r}", {"where": [["id", op, 1]]}, None))
    attempts += [
        ("direction", {"order_by": [["id", "asc; DROP TABLE T"]]}, None),
        ("direction sql", {"order_by": [["id", "DESC NULLS FIRST"]]}, None),
        ("value object", {"where": [["id", "=", {"sql": "1 OR 1=1"}]]}, None),
        ("value list", {"where": [["id", "=", [1, 2]]]}, None),
        ("in of objects", {"where": [["id", "in", [{"x": 1}]]]}, None),
        ("between arity", {"where": [["id", "between", 1]]}, None),
        ("group keyword", {"where": [{"xor": [["id", "=", 1]]}]}, None),
        ("group with two keys", {"where": [{"or": [["id", "=", 1]], "and": [["id", "=", 2]]}]}, None),
        ("raw sql where", {"where": "1=1; DELETE FROM T"}, None),
        ("raw sql term", {"where": ["id = 1 OR 1=1"]}, None),
        ("unknown key", {"having": "1=1"}, None),
        ("sql key", {"sql": "DELETE FROM T"}, None),
        ("limit text", {"limit": "1; DELETE FROM T"}, None),
        ("offset negative", {"offset": -1}, None),
        ("limit bool", {"limit": True}, None),
    ]
    return attempts


def test_injection_attempts_are_refused_and_b_is_unchanged(pair: Pair) -> None:
    a, b = pair.a, pair.b
    before = fingerprint(b)
    watcher = b.client()
    watcher.call("store.subscribe", **RQ, type="local_details")
    accepted = []
    for what, predicates, columns in injection_attempts():
        try:
            pair.query(predicates=predicates, columns=columns)
        except InvalidPredicate as exc:
            assert exc.message.startswith(f"device {b.id}"), (what, exc.message)
        except P2PStoreError as exc:
            # Refused before it left A (the API's own parameter check) is fine too.
            assert exc.name == "INVALID_PARAMS", (what, exc.name, exc.message)
        else:
            accepted.append(what)
    assert not accepted, f"accepted: {accepted}"
    assert fingerprint(b) == before
    assert not [n for n in collect_notifications(watcher, lambda g: False, 0.3) if n["method"] == "dataChange"]
    assert pair.ids(order_by=[["id", "asc"]]) == [r[0] for r in ROWS]  # and B still answers


@pytest.mark.parametrize("value", ["x' OR '1'='1", "1; DELETE FROM T; --", "' UNION SELECT sql FROM sqlite_master --",
                                   "%' OR 1=1 --", "alice\x00' OR 1=1"])
def test_sql_in_values_is_only_data(pair: Pair, value: str) -> None:
    before = fingerprint(pair.b)
    assert pair.ids(where=[["name", "=", value]]) == []
    assert pair.ids(where=[["name", "in", [value, "bob"]]]) == [3]
    assert pair.ids(where=[["name", "between", value, value]]) == []
    # SQLite's LIKE reads its pattern up to a NUL ("alice\0..." is "alice"): still only data.
    assert pair.ids(where=[["name", "like", value]]) == ([1] if "\x00" in value else [])
    assert fingerprint(pair.b) == before


def test_blob_values_travel_in_predicates(pair: Pair) -> None:
    assert pair.ids(where=[["data", "in", [b"\xff", b"z", b"nope"]]], order_by=[["id", "asc"]]) == [5, 10]
    assert pair.ids(where=[["data", "between", b"a", b"c"]]) == [3]
    assert pair.ids(where=[["data", "!=", b""]], order_by=[["id", "asc"]]) == [r[0] for r in ROWS if r[4] is not None]
    # A value shaped like a blob but not one is refused (by A's API check or B's).
    with pytest.raises((InvalidPredicate, P2PStoreError)) as err:
        pair.query(predicates={"where": [["data", "=", {"$blob": "not base64!"}]]})
    assert err.value.name in ("INVALID_PARAMS", "INVALID_PREDICATE")


def test_predicate_text_from_a_peer_is_decoded_strictly() -> None:
    from p2pstore.schema.predicates import decode_predicates, encode_predicates
    plain = {"where": [["data", "=", b"\x00\xff"], ["n", "in", [1, "x", None, 1.5]]], "limit": 3}
    assert decode_predicates(encode_predicates(plain)) == plain
    for text in ('{"where": [["data", "=", {"$blob": 5}]]}', '{"where": [["data", "=", {"$blob": "@@@"}]]}',
                 '{"where": [["data", "=", {"$blob": "AA==", "x": 1}]]}'):
        with pytest.raises(InvalidPredicate):
            decode_predicates(text)


def test_table_names_are_not_sql(pair: Pair) -> None:
    for table in ('T"; DROP TABLE T; --', "sqlite_master", "_p2p_changes", "T2", "main.T"):
        with pytest.raises((TableNotDistributed, InvalidPredicate)):
            pair.query(table=table)
    assert pair.ids(order_by=[["id", "asc"]]) == [r[0] for r in ROWS]


def test_reading_is_read_only_and_leaves_b_writable(pair: Pair) -> None:
    """Queries change nothing on B (no change logged, nothing announced), and B's
    own writes go on while a query is being paged."""
    b = pair.b
    before = fingerprint(b)
    watcher = b.client()
    watcher.call("store.subscribe", **RQ, type="local_details")
    for predicates in ({}, {"where": [["age", ">", 1]], "order_by": [["name", "desc"]], "limit": 5}):
        pair.query(predicates=predicates)
    pair.query("EMPLOYEE", SV_REF)
    assert fingerprint(b) == before
    assert not [n for n in collect_notifications(watcher, lambda g: False, 0.3) if n["method"] == "dataChange"]


# ====================================================================== 4. errors the asker sees


def test_store_and_table_b_does_not_have(pair: Pair) -> None:
    a, b = pair.a, pair.b
    with pytest.raises(TableNotDistributed) as err:
        pair.query(table="T2")  # distributed on A, a plain table on B
    assert err.value.message.startswith(f"device {b.id}")
    a.call("store.open", store="only_a")
    a.call("store.execute", store="only_a", sql="CREATE TABLE T (id INTEGER PRIMARY KEY)")
    a.call("store.set_distributed_tables", store="only_a", tables=["T"])
    with pytest.raises(StoreNotOpen) as err:
        pair.query(ref={"store": "only_a"})
    assert err.value.message.startswith(f"device {b.id}")
    # A table A itself does not distribute is refused by A.
    with pytest.raises(TableNotDistributed):
        pair.query(table="nope")


def test_a_closed_store_on_b_is_still_answered(pair: Pair) -> None:
    """B answers for a store whose file exists even when no local client has it open."""
    a, b = pair.a, pair.b
    ref = {"store": "closed_on_b"}
    for node in (a, b):
        node.call("store.open", **ref)
        node.call("store.execute", **ref, sql="CREATE TABLE T (id INTEGER PRIMARY KEY, v TEXT)")
        node.call("store.set_distributed_tables", **ref, tables=["T"])
    b.call("store.insert", **ref, table="T", values={"id": 1, "v": "kept"})
    b.call("store.close", **ref)
    assert pair.query(ref=ref) == {"columns": ["id", "v"], "rows": [[1, "kept"]]}


def mistype(device_id: str) -> str:
    """The ID with one character changed (the check character catches it)."""
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    c = device_id[3]
    return device_id[:3] + next(x for x in alphabet if x != c and x not in "01") + device_id[4:]


@pytest.mark.parametrize("device", ["not-a-device", "ABC", "x" * 100, "!!!!!!!-!!!!!!!-!!!!!!!-!!!!!!!", "typo"])
def test_malformed_device_id(pair: Pair, device: str) -> None:
    if device == "typo":
        device = mistype(pair.b.id)
    with pytest.raises(InvalidDeviceId):
        pair.query(device=device)


def test_unknown_device_is_untrusted(pair: Pair) -> None:
    stranger = device_id_from_key_hash(os.urandom(32))
    with pytest.raises(DeviceUntrusted) as err:
        pair.query(device=stranger)
    assert err.value.data.get("device_id") == stranger
    # The device's own ID is not a peer either.
    with pytest.raises((DeviceUntrusted, DeviceOffline)):
        pair.query(device=pair.a.id)


def test_offline_and_untrusted_devices(linked_daemons) -> None:
    b, a = linked_daemons(2)  # a dials b
    for node in (a, b):
        node.call("store.open", **RQ)
        node.call("store.execute", **RQ, sql=T_CREATE)
        node.call("store.set_distributed_tables", **RQ, tables=["T"])
    b.call("store.insert", **RQ, table="T", values={"id": 1})
    ask = {**RQ, "device": b.id, "table": "T"}
    assert a.call("store.remote_query", **ask)["rows"] == [[1, None, None, None, None]]

    # One-way trust: B stops trusting A. A still trusts B, but gets nothing from it.
    b.call("devices.untrust", device_id=a.id)
    wait_until(lambda: not a.sees_online(b), 10.0, "A sees B offline after B untrusted it")
    with pytest.raises((DeviceOffline, DeviceUntrusted)):
        a.call("store.remote_query", **ask)
    b.call("devices.trust", device_id=a.id, name=a.name)
    wait_linked([a, b])
    assert a.call("store.remote_query", **ask)["rows"] == [[1, None, None, None, None]]

    # A stops trusting B.
    a.call("devices.untrust", device_id=b.id)
    with pytest.raises(DeviceUntrusted):
        a.call("store.remote_query", **ask)
    a.call("devices.trust", device_id=b.id, name=b.name)
    wait_linked([a, b])

    # B stops: offline, in the API and in the CLI.
    b.stop()
    wait_until(lambda: not a.sees_online(b), 20.0, "A sees B offline")
    t0 = time.monotonic()
    with pytest.raises(DeviceOffline) as err:
        a.call("store.remote_query", **ask)
    assert time.monotonic() - t0 < 2.0, "an offline device fails at once, not at the timeout"
    assert err.value.data.get("device_id") == b.id
    run = cli(a, "query", "--remote", b.id, "--store", "rq", "T")
    assert run.returncode == 1 and "offline" in run.stderr.lower(), run
    answered = [line for line in b.proc.log().splitlines() if "answered remote query" in line]
    assert len(answered) == 2, answered  # the two that succeeded, nothing while A was untrusted


def test_security_level_is_enforced_by_the_answering_device(linked_daemons) -> None:
    """B's store is labelled S3: a device at S1 is refused by B (B's log says so), one at S3 is answered."""
    b, low, high = linked_daemons(3, flags={1: ["--security-level", "S1"], 2: ["--security-level", "S3"]})
    secret, public = {"store": "labelled"}, {"store": "public"}
    for node in (b, low, high):
        for ref in (secret, public):
            node.call("store.open", **ref, **({"security_level": "S3"} if node is b and ref is secret else {}))
            node.call("store.execute", **ref, sql="CREATE TABLE T (id INTEGER PRIMARY KEY, v TEXT)")
            node.call("store.set_distributed_tables", **ref, tables=["T"])
    for ref in (secret, public):
        b.call("store.insert", **ref, table="T", values={"id": 1, "v": "classified" if ref is secret else "open"})
    assert b.call("store.open", **secret)["security_level"] == "S3"

    with pytest.raises(SecurityLevelDenied) as err:
        low.call("store.remote_query", **secret, device=b.id, table="T")
    assert err.value.message.startswith(f"device {b.id}"), err.value.message
    assert "classified" not in err.value.message
    wait_until(lambda: any("refused remote query" in line and low.id in line and "S3" in line
                           for line in b.proc.log().splitlines()), 5.0, "B logs that it refused the low device")
    # The same device may read a store with a lower label, and a device at S3 may read this one.
    assert low.call("store.remote_query", **public, device=b.id, table="T")["rows"] == [[1, "open"]]
    assert high.call("store.remote_query", **secret, device=b.id, table="T")["rows"] == [[1, "classified"]]
    # CLI: exit 1 and the reason.
    run = cli(low, "query", "--remote", b.id, "--store", "labelled", "T")
    assert run.returncode == 1 and "S3" in run.stderr, run


def test_timeout_when_the_answering_daemon_is_stopped(linked_daemons, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "remote_query_timeout_s = 2\n")
    b, a = linked_daemons(2, flags={1: ["--config", str(cfg)]})
    for node in (a, b):
        node.call("store.open", **RQ)
        node.call("store.execute", **RQ, sql=T_CREATE)
        node.call("store.set_distributed_tables", **RQ, tables=["T"])
    b.call("store.insert", **RQ, table="T", values={"id": 1})
    ask = {**RQ, "device": b.id, "table": "T"}
    assert len(a.call("store.remote_query", **ask)["rows"]) == 1
    other = a.client()
    pid = b.proc.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        failure: list[BaseException] = []
        took: list[float] = []

        def ask_stopped() -> None:
            t0 = time.monotonic()
            try:
                a.call("store.remote_query", **ask)
            except BaseException as exc:  # noqa: BLE001  (checked below)
                failure.append(exc)
            took.append(time.monotonic() - t0)

        t = threading.Thread(target=ask_stopped)
        t.start()
        # A stays responsive while its query waits.
        t0 = time.monotonic()
        assert other.call("device.info")["device_id"] == a.id
        assert time.monotonic() - t0 < 1.0  # blocked by the waiting query, it would take its 2 s timeout
        t.join(15)
        assert not t.is_alive()
        assert failure and isinstance(failure[0], SyncTimeout), failure
        assert failure[0].name == "TIMEOUT" and "2 s" in failure[0].message
        assert 1.8 <= took[0] < 6.0, took
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: a.sees_online(b), 20.0, "B back online")
    assert len(a.call("store.remote_query", **ask)["rows"]) == 1


# ====================================================================== 5. a 50 MB result in pages


BIG_ROWS = 50_000
BLOB = 1024


def test_a_50_mb_result_arrives_whole_in_pages(pair: Pair) -> None:
    a, b = pair.a, pair.b
    ref = {"store": "big"}
    for node in (a, b):
        node.call("store.open", **ref)
        node.call("store.execute", **ref, sql="CREATE TABLE BIG (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        node.call("store.set_distributed_tables", **ref, tables=["BIG"])
    b.call("store.execute", **ref, sql=f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {BIG_ROWS}) "
                                       f"INSERT INTO BIG(id, data) SELECT x, randomblob({BLOB}) FROM c")
    path = b.call("store.open", **ref)["path"]
    expected = hashlib.sha256()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for rid, data in conn.execute("SELECT id, data FROM BIG ORDER BY id"):
            expected.update(rid.to_bytes(8, "big") + data)
    finally:
        conn.close()

    # B keeps serving its own writers while it pages the result out.
    latencies: list[float] = []
    stop = threading.Event()
    writer = b.client()
    writer.call("store.open", store="big_side")
    writer.call("store.execute", store="big_side", sql="CREATE TABLE IF NOT EXISTS W (id INTEGER PRIMARY KEY)")

    def write_on_b() -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            t0 = time.monotonic()
            writer.call("store.insert", store="big_side", table="W", values={"id": i})
            latencies.append(time.monotonic() - t0)
            time.sleep(0.01)

    side = threading.Thread(target=write_on_b)
    side.start()
    t0 = time.monotonic()
    try:
        result = a.call("store.remote_query", **ref, device=b.id, table="BIG", predicates={"order_by": [["id", "asc"]]})
    finally:
        stop.set()
        side.join(10)
    elapsed = time.monotonic() - t0
    assert result["columns"] == ["id", "data"]
    assert len(result["rows"]) == BIG_ROWS
    got = hashlib.sha256()
    for rid, data in result["rows"]:
        assert len(data) == BLOB
        got.update(rid.to_bytes(8, "big") + data)
    assert got.hexdigest() == expected.hexdigest()
    pages = [int(m.group(1)) for m in re.finditer(r"answered remote query from \S+ on default/big\.BIG \((\d+) page", b.proc.log())]
    assert pages and pages[-1] >= (BIG_ROWS * BLOB) // (4 << 20), pages
    assert latencies and max(latencies) < 1.0, f"B's writes took up to {max(latencies):.2f} s during the query"
    rss = {n.name: next(int(x.split()[1]) // 1024 for x in Path(f"/proc/{n.proc.proc.pid}/status").read_text().splitlines()
                        if x.startswith("VmRSS")) for n in (a, b)}
    print(f"50 MB remote query: {elapsed:.1f} s, {pages[-1]} pages, B write p100 {max(latencies) * 1000:.0f} ms, RSS MB {rss}")


def test_answerer_killed_mid_query_fails_fast_with_device_offline(linked_daemons) -> None:
    """Default 30 s timeout, but a peer that dies (kill -9) ends the query at once."""
    b, a = linked_daemons(2)
    ref = {"store": "mid"}
    for node in (a, b):
        node.call("store.open", **ref)
        node.call("store.execute", **ref, sql="CREATE TABLE BIG (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        node.call("store.set_distributed_tables", **ref, tables=["BIG"])
    b.call("store.execute", **ref, sql="WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 30000) "
                                       "INSERT INTO BIG(id, data) SELECT x, randomblob(1024) FROM c")
    outcome: list[BaseException | dict[str, Any]] = []

    def ask() -> None:
        try:
            outcome.append(a.call("store.remote_query", **ref, device=b.id, table="BIG"))
        except BaseException as exc:  # noqa: BLE001  (checked below)
            outcome.append(exc)

    t = threading.Thread(target=ask)
    t0 = time.monotonic()
    t.start()
    time.sleep(0.05)
    b.kill()
    t.join(20)
    assert not t.is_alive() and outcome
    if isinstance(outcome[0], dict):
        pytest.skip("the whole result arrived before the kill")  # a very fast machine
    assert isinstance(outcome[0], DeviceOffline), outcome
    assert time.monotonic() - t0 < 10.0
    assert a.call("device.info")["device_id"] == a.id  # A is fine


def test_sync_filter_with_a_blob_value(linked_daemons) -> None:
    """Same root cause as the remote-query predicates (fixed there): the filter is sent as JSON text."""
    b, a = linked_daemons(2)
    for node in (a, b):
        node.call("store.open", store="s")
        node.call("store.execute", store="s", sql="CREATE TABLE T (id INTEGER PRIMARY KEY, data BLOB)")
        node.call("store.set_distributed_tables", store="s", tables=["T"])
    a.call("store.insert", store="s", table="T", values={"id": 1, "data": b"x"})
    a.call("store.insert", store="s", table="T", values={"id": 2, "data": b"y"})
    results = a.sync("push", {"store": "s"}, [b], table="T", where=[["data", "=", b"x"]])
    assert results[b.id]["code"] == 0
    dev_a = b.call("store.distributed_table_name", store="s", device=a.id, table="T")["table"]
    assert b.rows({"store": "s"}, f'SELECT id FROM "{dev_a}"') == [[1]]


def test_a_predicate_too_big_for_one_message_is_refused_clearly(pair: Pair) -> None:
    """10k IN values are allowed by the predicate rules, but 330 kB of JSON exceeds the
    256 KiB a QueryRequest may carry: a clear error (not INTERNAL_ERROR), the link survives."""
    values = [f"name-{i:024d}" for i in range(10_000)]
    with pytest.raises(P2PStoreError) as err:
        pair.query(predicates={"where": [["name", "in", values]]})
    assert err.value.name in ("INVALID_PREDICATE", "PROTOCOL_ERROR"), err.value
    assert "limit" in err.value.message
    assert pair.a.sees_online(pair.b)
    assert pair.ids(where=[["name", "in", values[:5000] + ["bob"]]]) == [3]  # 165 kB: fine
