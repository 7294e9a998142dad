"""Bad input for every API method, over a raw socket to a real daemon.

Every bad request gets an error response with the right ``data.name`` and
the same connection keeps working; only a line over ``max_request_bytes``
breaks the framing (one REQUEST_TOO_LARGE, then the daemon hangs up).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from p2ps_helpers import DaemonProcess, RawConnection, error_name, unique, write_config

from p2pstore.net.identity import device_id_from_key_hash

STORE = unique("bad")
DEVICE = "ABCDEFG-HIJKLMN-OPQRSTU"


@pytest.fixture(scope="module")
def conn(shared_daemon: DaemonProcess) -> Iterator[RawConnection]:
    """One raw connection for the whole module: it must survive everything."""
    c = RawConnection(shared_daemon.socket)
    assert "result" in c.call("store.open", store=STORE)
    for sql in (
        "CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT UNIQUE, photo BLOB)",
        "CREATE TABLE C (a INTEGER, b INTEGER, PRIMARY KEY (a, b))",
        "INSERT INTO T(id, name) VALUES (1, 'one'), (2, 'two')",
    ):
        assert "result" in c.call("store.execute", store=STORE, sql=sql), sql
    yield c
    c.close()


_ids = itertools.count(1000)


def request(conn: RawConnection, method: str, params: Any) -> dict[str, Any]:
    rid = next(_ids)
    conn.send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
    return conn.read_response(rid)


def assert_usable(conn: RawConnection) -> None:
    response = request(conn, "store.query", {"store": STORE, "sql": "SELECT count(*) FROM T"})
    assert response["result"]["rows"] == [[2]], "the bad request changed T or broke the connection"


# -- params: missing, unknown, wrong type, for every method ---------------------------------------

#: A valid params object per method (the baseline the cases below break).
VALID: dict[str, dict[str, Any]] = {
    "device.info": {},
    "status": {},
    "devices.list": {},
    "devices.subscribe": {},
    "devices.trust": {"device_id": DEVICE},
    "devices.untrust": {"device_id": DEVICE},
    "devices.unsubscribe": {"subscription": 1},
    "store.open": {"store": STORE, "bundle": "default", "security_level": "S1"},
    "store.close": {"store": STORE, "bundle": "default"},
    "store.execute": {"store": STORE, "sql": "SELECT 1", "params": []},
    "store.query": {"store": STORE, "sql": "SELECT 1", "params": []},
    "store.insert": {"store": STORE, "table": "T", "values": {"name": "x"}},
    "store.update": {"store": STORE, "values": {"name": "x"}, "predicates": {"table": "T"}},
    "store.delete": {"store": STORE, "predicates": {"table": "T"}},
    "store.set_distributed_tables": {"store": STORE, "tables": ["T"], "type": "device", "config": {"auto_sync": False}},
    "store.distributed_table_name": {"store": STORE, "device": DEVICE, "table": "T"},
    "store.subscribe": {"store": STORE, "type": "local_details"},
    "store.unsubscribe": {"store": STORE, "subscription": 1},
    "schema.validate": {"document": "{}"},
    "store.sync": {"store": STORE, "mode": "push", "predicates": {"table": "T"}, "refresh": False},
    "store.sync_failures": {"store": STORE, "limit": 10},
    "store.conflicts": {"store": STORE, "table": "T", "limit": 10},
    "store.clear_conflicts": {"store": STORE, "table": "T", "up_to": 3},
    "conflicts.policy": {"store": STORE, "bundle": "default", "table": "T", "policy": "manual", "reconciler": DEVICE, "detect": "row"},
    "conflicts.queue": {"store": STORE, "bundle": "default", "limit": 5},
    "conflicts.resolve": {"store": STORE, "bundle": "default", "id": 1, "take": "local"},
    "store.retry_failure": {"store": STORE, "id": 1},
    "store.discard_failure": {"store": STORE, "id": 1},
    "store.remote_query": {"store": STORE, "device": DEVICE, "table": "T", "predicates": {}, "columns": ["name"]},
    "store.backup": {"store": STORE, "bundle": "default", "path": "/nonexistent/backup.db"},
    "evolutions.status": {"store": STORE, "bundle": "default"},
    "store.sync_log": {"store": STORE, "bundle": "default", "limit": 5, "device": DEVICE},
    "evolutions.log": {"store": STORE, "bundle": "default"},
    "versions.list": {"store": STORE, "bundle": "default"},
    "store.rebuild": {"store": STORE, "bundle": "default", "table": "T", "yes_destroy_local_data": True},
    "store.checkout": {"store": STORE, "bundle": "default", "device": DEVICE, "table": "T", "where": [["id", ">", 1]]},
    "store.checkin": {"store": STORE, "bundle": "default", "device": DEVICE},
    "replica.set": {"store": STORE, "bundle": "default", "peer": DEVICE, "kind": "send"},
    "replica.list": {"store": STORE, "bundle": "default"},
    "versions.diff": {"store": STORE, "bundle": "default", "from": 1, "to": 2},
    "evolutions.apply": {"store": STORE, "bundle": "default", "up_to": 1},
    "evolutions.mark_applied": {"store": STORE, "bundle": "default", "revision": 1},
    "evolutions.resolve": {"store": STORE, "bundle": "default", "revision": 1},
}
REQUIRED = {
    "devices.trust": ["device_id"], "devices.untrust": ["device_id"], "devices.unsubscribe": ["subscription"],
    "store.open": ["store"], "store.close": ["store"], "store.execute": ["store", "sql"], "store.query": ["store", "sql"],
    "store.insert": ["store", "table", "values"], "store.update": ["store", "values", "predicates"],
    "store.delete": ["store", "predicates"], "store.set_distributed_tables": ["store", "tables"],
    "store.distributed_table_name": ["store", "device", "table"], "store.subscribe": ["store", "type"],
    "store.unsubscribe": ["store", "subscription"], "schema.validate": ["document"],
    "store.sync": ["store", "mode"], "store.sync_failures": ["store"], "store.conflicts": ["store"], "store.clear_conflicts": ["store"],
    "conflicts.policy": ["store", "table", "policy"], "conflicts.queue": ["store"], "conflicts.resolve": ["store", "id", "take"],
    "store.retry_failure": ["store", "id"], "store.discard_failure": ["store", "id"],
    "store.remote_query": ["store", "device", "table"], "store.backup": ["store", "path"],
    "store.sync_log": ["store"], "evolutions.status": ["store"], "evolutions.log": ["store"], "versions.list": ["store"], "store.rebuild": ["store", "table", "yes_destroy_local_data"], "store.checkout": ["store", "device"],
    "store.checkin": ["store"], "replica.set": ["store", "peer", "kind"], "versions.diff": ["store"], "evolutions.apply": ["store"],
    "evolutions.mark_applied": ["store", "revision"], "evolutions.resolve": ["store", "revision"],
}
#: A value of the wrong type (or outside the allowed set) for each param name.
WRONG = {
    "store": 5, "bundle": ["default"], "security_level": "S9", "sql": {"text": "SELECT 1"}, "params": "1, 2",
    "table": None, "values": [["name", "x"]], "predicates": "id = 1", "tables": "T", "type": "everything",
    "config": {"table_type": "both"}, "device": 42, "subscription": "1", "device_id": 7,
    "mode": "sideways", "limit": 0, "id": "one", "columns": "name", "up_to": 0,
    "path": "relative/backup.db", "revision": "1", "from": "1", "to": 0, "yes_destroy_local_data": "yes", "refresh": 1, "peer": 7, "kind": "both-ways", "where": "id > 1", "policy": "first-wins", "reconciler": 9, "detect": "cell", "take": "mine",
}


def test_every_api_method_has_a_case() -> None:
    schema = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "api.schema.json").read_text())
    assert set(VALID) == set(schema["methods"])


CASES = (
    [(m, {k: v for k, v in VALID[m].items() if k != r}, f"missing {r}") for m in REQUIRED for r in REQUIRED[m]]
    + [(m, {**VALID[m], "bogus": 1}, "unknown param") for m in VALID]
    + [(m, {**VALID[m], k: WRONG[k]}, f"wrong type of {k}") for m in VALID for k in VALID[m] if k in WRONG]  # "document" takes any JSON
    + [(m, [1, 2], "positional params") for m in VALID]
    + [(m, "params", "string params") for m in VALID]
)


@pytest.mark.parametrize(("method", "params", "why"), CASES, ids=[f"{m}: {w}" for m, _, w in CASES])
def test_bad_params_are_invalid_params(conn: RawConnection, method: str, params: Any, why: str) -> None:
    response = request(conn, method, params)
    assert error_name(response) == "INVALID_PARAMS", f"{method} with {why}: {response}"
    assert response["error"]["code"] == -32602
    assert_usable(conn)


#: The list form of devices.trust, ``{"devices": [{"device_id", "name"?}, ...]}``.
TRUST_LIST_CASES = [
    ({"devices": []}, "empty list"),
    ({"devices": DEVICE}, "devices not a list"),
    ({"devices": [DEVICE]}, "entry not an object"),
    ({"devices": [{"name": "x"}]}, "entry without device_id"),
    ({"devices": [{"device_id": 7}]}, "wrong type of an entry's device_id"),
    ({"devices": [{"device_id": DEVICE, "name": 5}]}, "wrong type of an entry's name"),
    ({"devices": [{"device_id": DEVICE, "bogus": 1}]}, "unknown key in an entry"),
    ({"devices": [{"device_id": DEVICE}], "device_id": DEVICE}, "both forms"),
    ({"devices": [{"device_id": DEVICE}], "name": "x"}, "name beside devices"),
    ({"devices": [{"device_id": DEVICE}] * 1025}, "over 1024 entries"),
    ({"name": "x"}, "name without device_id"),
]


@pytest.mark.parametrize(("params", "why"), TRUST_LIST_CASES, ids=[w for _, w in TRUST_LIST_CASES])
def test_bad_trust_lists_are_invalid_params(conn: RawConnection, params: Any, why: str) -> None:
    response = request(conn, "devices.trust", params)
    assert error_name(response) == "INVALID_PARAMS", f"devices.trust with {why}: {response}"
    assert response["error"]["message"].startswith("devices.trust: "), response
    assert_usable(conn)


def test_bad_id_in_a_trust_list_names_its_index_and_trusts_none(conn: RawConnection) -> None:
    good = device_id_from_key_hash(os.urandom(32))
    response = request(conn, "devices.trust", {"devices": [{"device_id": good, "name": "ok"}, {"device_id": "not-an-id"}]})
    assert error_name(response) == "INVALID_DEVICE_ID", response
    assert response["error"]["data"]["index"] == 1 and "devices[1]" in response["error"]["message"], response
    listed = request(conn, "devices.list", {})["result"]
    assert not any(d["device_id"] == good and d["trusted"] for d in listed), "a list with a bad ID trusted some of it"
    assert_usable(conn)


def test_unknown_param_is_named(conn: RawConnection) -> None:
    response = request(conn, "store.query", {"store": STORE, "sql": "SELECT 1", "sqll": "x"})
    assert "sqll" in response["error"]["message"]


def test_missing_param_is_named(conn: RawConnection) -> None:
    response = request(conn, "store.insert", {"store": STORE, "values": {}})
    assert "table" in response["error"]["message"]


# -- the request envelope -------------------------------------------------------------------------

ENVELOPES = [
    (b"{not json}\n", "PARSE_ERROR"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "status"\n', "PARSE_ERROR"),
    (b"\xff\xfe\xfd\n", "PARSE_ERROR"),
    (b"[" * 100_000 + b"\n", "PARSE_ERROR"),
    (b"[]\n", "INVALID_REQUEST"),
    (b'[{"jsonrpc": "2.0", "id": 1, "method": "status"}]\n', "INVALID_REQUEST"),
    (b"42\n", "INVALID_REQUEST"),
    (b'"status"\n', "INVALID_REQUEST"),
    (b"null\n", "INVALID_REQUEST"),
    (b'{"jsonrpc": "1.0", "id": 1, "method": "status"}\n', "INVALID_REQUEST"),
    (b'{"id": 1, "method": "status"}\n', "INVALID_REQUEST"),
    (b'{"jsonrpc": 2.0, "id": 1, "method": "status"}\n', "INVALID_REQUEST"),
    (b'{"jsonrpc": "2.0", "id": 1.5, "method": "status"}\n', "INVALID_REQUEST"),
    (b'{"jsonrpc": "2.0", "id": true, "method": "status"}\n', "INVALID_REQUEST"),
    (b'{"jsonrpc": "2.0", "id": [1], "method": "status"}\n', "INVALID_REQUEST"),
    (b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "status"}\n', "INVALID_REQUEST"),
    (b'{"jsonrpc": "2.0", "id": 1}\n', "INVALID_REQUEST"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": ""}\n', "INVALID_REQUEST"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": 5}\n', "INVALID_REQUEST"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "status", "extra": 1}\n', "INVALID_REQUEST"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "nope"}\n', "METHOD_NOT_FOUND"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "store.drop_everything", "params": {}}\n', "METHOD_NOT_FOUND"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "__init__"}\n', "METHOD_NOT_FOUND"),
]


@pytest.mark.parametrize(("line", "name"), ENVELOPES, ids=[e[1] + ":" + e[0][:30].decode(errors="replace") for e in ENVELOPES])
def test_malformed_envelopes(conn: RawConnection, line: bytes, name: str) -> None:
    conn.send_raw(line)
    response = conn.read()
    assert error_name(response) == name
    assert response["jsonrpc"] == "2.0"
    assert_usable(conn)


def test_error_keeps_the_request_id_when_it_is_valid(conn: RawConnection) -> None:
    conn.send_raw(b'{"jsonrpc": "1.0", "id": "abc", "method": "status"}\n')
    assert conn.read()["id"] == "abc"
    conn.send_raw(b'{"jsonrpc": "2.0", "id": true, "method": "status"}\n')
    assert conn.read()["id"] is None  # an invalid id is never echoed


def test_blank_lines_are_ignored(conn: RawConnection) -> None:
    conn.send_raw(b"\n   \n\r\n")
    assert_usable(conn)


def test_a_notification_gets_no_answer_even_when_it_fails(conn: RawConnection) -> None:
    conn.send({"jsonrpc": "2.0", "method": "store.query", "params": {"store": STORE, "sql": "SELECT 1"}})
    conn.send({"jsonrpc": "2.0", "method": "store.query", "params": {"store": STORE, "sql": "SELEC"}})
    conn.send({"jsonrpc": "2.0", "id": "next", "method": "device.info"})
    response = conn.read()  # the very next line answers the request, not the notifications
    assert response["id"] == "next" and "device_id" in response["result"]


# -- errors of the methods themselves ------------------------------------------------------------

def blob(data: bytes) -> dict[str, str]:
    return {"$blob": base64.b64encode(data).decode()}


SEMANTIC = [
    ("store.query", {"store": "never_opened", "sql": "SELECT 1"}, "STORE_NOT_OPEN"),
    ("store.insert", {"store": STORE, "bundle": "other", "table": "T", "values": {}}, "STORE_NOT_OPEN"),
    ("store.open", {"store": "../escape"}, "INVALID_PARAMS"),
    ("store.open", {"store": ".hidden"}, "INVALID_PARAMS"),
    ("store.open", {"store": "a/b"}, "INVALID_PARAMS"),
    ("store.open", {"store": "x", "bundle": ".."}, "INVALID_PARAMS"),
    ("store.execute", {"store": STORE, "sql": "SELEC 1"}, "SQL_ERROR"),
    ("store.execute", {"store": STORE, "sql": "INSERT INTO nope VALUES (1)"}, "SQL_ERROR"),
    ("store.execute", {"store": STORE, "sql": "SELECT ?", "params": []}, "SQL_ERROR"),
    ("store.execute", {"store": STORE, "sql": "SELECT 1; DELETE FROM T"}, "SQL_ERROR"),
    ("store.query", {"store": STORE, "sql": "SELECT nope FROM T"}, "SQL_ERROR"),
    ("store.execute", {"store": STORE, "sql": "INSERT INTO T(name) VALUES ('one')"}, "CONSTRAINT_VIOLATION"),
    ("store.execute", {"store": STORE, "sql": "BEGIN"}, "PERMISSION_DENIED"),
    ("store.execute", {"store": STORE, "sql": "COMMIT"}, "PERMISSION_DENIED"),
    ("store.execute", {"store": STORE, "sql": "ATTACH DATABASE '/tmp/x.db' AS x"}, "PERMISSION_DENIED"),
    ("store.execute", {"store": STORE, "sql": "DELETE FROM _p2p_log"}, "PERMISSION_DENIED"),
    ("store.execute", {"store": STORE, "sql": "INSERT INTO _p2p_apply VALUES (1)"}, "PERMISSION_DENIED"),
    ("store.execute", {"store": STORE, "sql": "UPDATE _p2p_meta SET value = 1"}, "PERMISSION_DENIED"),
    ("store.execute", {"store": STORE, "sql": "DROP TABLE _p2p_log"}, "PERMISSION_DENIED"),
    ("store.execute", {"store": STORE, "sql": "PRAGMA journal_mode = DELETE"}, "PERMISSION_DENIED"),
    ("store.query", {"store": STORE, "sql": "DELETE FROM _p2p_log"}, "PERMISSION_DENIED"),
    ("store.insert", {"store": STORE, "table": "missing", "values": {"a": 1}}, "TABLE_NOT_FOUND"),
    ("store.insert", {"store": STORE, "table": "_p2p_log", "values": {"op": 1}}, "TABLE_NOT_FOUND"),
    ("store.insert", {"store": STORE, "table": "T; DROP TABLE T", "values": {}}, "TABLE_NOT_FOUND"),
    ("store.insert", {"store": STORE, "table": "T", "values": {"missing": 1}}, "COLUMN_NOT_FOUND"),
    ("store.insert", {"store": STORE, "table": "T", "values": {"name) VALUES (1); DROP TABLE T; --": 1}}, "COLUMN_NOT_FOUND"),
    ("store.insert", {"store": STORE, "table": "T", "values": {"photo": {"$blob": "not base64!"}}}, "INVALID_PARAMS"),
    ("store.insert", {"store": STORE, "table": "T", "values": {"photo": {"$blob": "AAA"}}}, "INVALID_PARAMS"),
    ("store.insert", {"store": STORE, "table": "T", "values": {"photo": {"$blob": 5}}}, "INVALID_PARAMS"),
    ("store.query", {"store": STORE, "sql": "SELECT ?", "params": [{"$blob": "@@@@"}]}, "INVALID_PARAMS"),
    ("store.update", {"store": STORE, "values": {}, "predicates": {"table": "T"}}, "INVALID_PARAMS"),
    ("store.update", {"store": STORE, "values": {"nope": 1}, "predicates": {"table": "T"}}, "COLUMN_NOT_FOUND"),
    ("store.update", {"store": STORE, "values": {"name": "x"}, "predicates": {"table": "missing"}}, "TABLE_NOT_FOUND"),
    ("store.update", {"store": STORE, "values": {"name": "x"}, "predicates": {"where": []}}, "INVALID_PREDICATE"),
    ("store.update", {"store": STORE, "values": {"name": "x"}, "predicates": {"table": "T", "limit": 1}}, "INVALID_PARAMS"),
    ("store.delete", {"store": STORE, "predicates": {}}, "INVALID_PREDICATE"),
    ("store.delete", {"store": STORE, "predicates": {"table": "T", "where": "id = 1"}}, "INVALID_PREDICATE"),
    ("store.delete", {"store": STORE, "predicates": {"table": "T", "where": [["nope", "=", 1]]}}, "INVALID_PREDICATE"),
    ("store.delete", {"store": STORE, "predicates": {"table": "T", "where": [["id", "===", 1]]}}, "INVALID_PREDICATE"),
    ("store.delete", {"store": STORE, "predicates": {"table": "T", "sql": "1=1"}}, "INVALID_PREDICATE"),
    ("store.set_distributed_tables", {"store": STORE, "tables": ["missing"]}, "TABLE_NOT_FOUND"),
    ("store.set_distributed_tables", {"store": STORE, "tables": ["C"]}, "COMPOSITE_KEY_NOT_SUPPORTED"),
    ("store.distributed_table_name", {"store": STORE, "device": DEVICE, "table": "T"}, "TABLE_NOT_DISTRIBUTED"),
    ("store.unsubscribe", {"store": STORE, "subscription": 999_999}, "SUBSCRIPTION_NOT_FOUND"),
    ("store.close", {"store": "never_opened"}, "STORE_NOT_OPEN"),
]


@pytest.mark.parametrize(("method", "params", "name"), SEMANTIC, ids=[f"{n}: {m}" for m, _, n in SEMANTIC])
def test_method_errors_have_stable_names(conn: RawConnection, method: str, params: dict[str, Any], name: str) -> None:
    response = request(conn, method, params)
    assert error_name(response) == name, response
    assert response["error"]["message"]
    assert_usable(conn)


#: Injection attempts in predicate column names and operators: refused by the
#: compiler, never executed (T still has its two rows afterwards).
INJECTIONS = [
    ["id = 1 OR 1=1 --", "=", 1],
    ['id" OR "1"="1', "=", 1],
    ["id; DROP TABLE T; --", "=", 1],
    ["(SELECT 1)", "=", 1],
    ["id", "= 1 OR 1=1 --", 1],
    ["id", "; DELETE FROM T", 1],
    ["id", "IS NOT", None],
    ["id", "glob", "*"],
    ["id", "in", "(1) OR 1=1"],
]


@pytest.mark.parametrize("condition", INJECTIONS, ids=[json.dumps(c) for c in INJECTIONS])
@pytest.mark.parametrize("method", ["store.delete", "store.update"])
def test_injection_in_predicates_is_invalid_predicate_and_never_runs(conn: RawConnection, method: str, condition: list[Any]) -> None:
    params: dict[str, Any] = {"store": STORE, "predicates": {"table": "T", "where": [condition]}}
    if method == "store.update":
        params["values"] = {"name": "pwned"}
    response = request(conn, method, params)
    assert error_name(response) == "INVALID_PREDICATE"
    assert "path" in response["error"]["data"]
    assert_usable(conn)  # both rows still there
    names = request(conn, "store.query", {"store": STORE, "sql": "SELECT name FROM T ORDER BY id"})["result"]["rows"]
    assert names == [["one"], ["two"]]


def test_injection_in_order_by_is_refused(conn: RawConnection) -> None:
    # order_by is refused for deletes anyway; the column check comes first or second, never execution.
    response = request(conn, "store.delete", {"store": STORE, "predicates": {"table": "T", "order_by": [["id; DROP TABLE T", "asc"]]}})
    assert error_name(response) in {"INVALID_PREDICATE", "INVALID_PARAMS"}
    assert_usable(conn)


def test_an_integer_too_large_for_sqlite_is_a_clean_error(conn: RawConnection) -> None:
    response = request(conn, "store.query", {"store": STORE, "sql": "SELECT ?", "params": [2**64]})
    assert error_name(response) == "INVALID_PARAMS", response
    response = request(conn, "store.insert", {"store": STORE, "table": "T", "values": {"name": 2**63}})
    assert error_name(response) == "INVALID_PARAMS", response
    ok = request(conn, "store.query", {"store": STORE, "sql": "SELECT ?, ?", "params": [2**63 - 1, -(2**63)]})
    assert ok["result"]["rows"] == [[2**63 - 1, -(2**63)]]  # the edges of the 64-bit range are fine
    assert_usable(conn)


def test_blobs_round_trip(conn: RawConnection) -> None:
    data = bytes(range(256)) * 4
    response = request(conn, "store.query", {"store": STORE, "sql": "SELECT ?, length(?)", "params": [blob(data), blob(data)]})
    assert response["result"]["rows"] == [[blob(data), 1024]]
    assert request(conn, "store.query", {"store": STORE, "sql": "SELECT x''"})["result"]["rows"] == [[blob(b"")]]


# -- 1,000 malformed requests on one connection -----------------------------------------------------

def malformed_lines() -> list[tuple[bytes, str]]:
    """Every kind of bad request above, as raw lines with the expected error name."""
    lines = list(ENVELOPES)
    for method, params, why in CASES:
        lines.append((json.dumps({"jsonrpc": "2.0", "id": why, "method": method, "params": params}).encode() + b"\n", "INVALID_PARAMS"))
    for method, params, name in SEMANTIC:
        if method == "store.open" or name == "CONSTRAINT_VIOLATION":
            lines.append((json.dumps({"jsonrpc": "2.0", "id": "s", "method": method, "params": params}).encode() + b"\n", name))
    for condition in INJECTIONS:
        params = {"store": STORE, "predicates": {"table": "T", "where": [condition]}}
        lines.append((json.dumps({"jsonrpc": "2.0", "id": "i", "method": "store.delete", "params": params}).encode() + b"\n", "INVALID_PREDICATE"))
    return lines


def test_one_thousand_malformed_requests_on_one_connection(
    shared_daemon: DaemonProcess, raw_factory: Callable[[Path], RawConnection]
) -> None:
    c = raw_factory(shared_daemon.socket)
    kinds = malformed_lines()
    assert len(kinds) >= 100
    sent = [kinds[i % len(kinds)] for i in range(1000)]
    answered = 0
    # Pipelined in chunks: responses may arrive in any order, so compare counts per name.
    for start in range(0, len(sent), 50):
        chunk = sent[start : start + 50]
        c.send_raw(b"".join(line for line, _ in chunk))
        names = sorted(error_name(c.read()) for _ in chunk)
        assert names == sorted(name for _, name in chunk)
        answered += len(chunk)
    assert answered == 1000
    # Same connection, then a new one: both still served.
    assert "device_id" in c.call("device.info", rid="after")["result"]
    fresh = raw_factory(shared_daemon.socket)
    assert "device_id" in fresh.call("device.info")["result"]
    assert shared_daemon.proc is not None and shared_daemon.proc.poll() is None


# -- request size ----------------------------------------------------------------------------------

def _big_query_line(size: int, rid: int = 77) -> bytes:
    """A valid store.query request line of exactly ``size`` bytes (without the newline)."""
    head = json.dumps({"jsonrpc": "2.0", "id": rid, "method": "store.query", "params": {"store": STORE, "sql": "SELECT length(?)", "params": [""]}})
    pad = size - len(head)
    assert pad > 0
    line = head.replace('"params": [""]', '"params": ["' + "x" * pad + '"]').encode()
    assert len(line) == size
    return line


def test_a_line_at_the_limit_is_served(conn: RawConnection) -> None:
    limit = 1 << 20  # default max_request_bytes
    conn.send_raw(_big_query_line(limit) + b"\n")
    response = conn.read_response(77)
    assert response["result"]["rows"][0][0] > limit - 200
    assert_usable(conn)


def test_a_line_over_the_limit_gets_one_error_and_the_connection_closes(
    shared_daemon: DaemonProcess, raw_factory: Callable[[Path], RawConnection]
) -> None:
    c = raw_factory(shared_daemon.socket)
    c.call("store.open", store=STORE)
    try:
        c.send_raw(b'{"jsonrpc": "2.0", "id": 5, "method": "status", "params": {"x": "' + b"y" * (1 << 20) + b'"}}\n')
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon may hang up before we finish sending
    response = c.read()
    assert error_name(response) == "REQUEST_TOO_LARGE"
    assert response["id"] is None
    assert c.read_line() == b"", "exactly one error, then the connection is closed"
    # The daemon is fine.
    fresh = raw_factory(shared_daemon.socket)
    assert "device_id" in fresh.call("device.info")["result"]


def test_the_limit_follows_the_config(start_daemon: Callable[..., DaemonProcess], raw_factory: Callable[[Path], RawConnection], tmp_path: Path) -> None:
    config = write_config(tmp_path, "max_request_bytes = 2048\n")
    d = start_daemon("small", "--config", str(config))
    ok = raw_factory(d.socket)
    ok.call("store.open", store=STORE)
    ok.send_raw(_big_query_line(2048, rid=1) + b"\n")
    assert "result" in ok.read_response(1)
    too_big = raw_factory(d.socket)
    too_big.call("store.open", store=STORE)
    too_big.send_raw(_big_query_line(2049, rid=2) + b"\n")
    assert error_name(too_big.read()) == "REQUEST_TOO_LARGE"
    assert too_big.read_line() == b""
    assert "result" in ok.call("device.info", rid=3)


# -- text no UTF-8 can carry, numbers SQLite can't hold, nesting (issue 10, item 3) ----------------

LONE = "\\ud800"  # a JSON escape for a lone UTF-16 surrogate

HOSTILE_LINES = [
    ('{"jsonrpc":"2.0","id":"x' + LONE + '","method":"device.info"}', None, "INVALID_REQUEST"),
    ('{"jsonrpc":"2.0","id":71,"method":"store.qu' + LONE + 'ery"}', 71, "INVALID_REQUEST"),
    ('{"jsonrpc":"2.0","id":72,"method":"status","p' + LONE + '":{}}', 72, "INVALID_REQUEST"),
    ('{"jsonrpc":"2.0","id":73,"method":"store.insert","params":{"store":"%s","table":"T","values":{"name":"a' + LONE + '"}}}',
     73, "INVALID_PARAMS"),
    ('{"jsonrpc":"2.0","id":74,"method":"store.insert","params":{"store":"%s","table":"T","values":{"na' + LONE + 'me":"a"}}}',
     74, "INVALID_PARAMS"),
    ('{"jsonrpc":"2.0","id":75,"method":"store.query","params":{"store":"%s","sql":"SELECT ?","params":["' + LONE + '"]}}',
     75, "INVALID_PARAMS"),
    ('{"jsonrpc":"2.0","id":76,"method":"store.query","params":{"store":"%s","sql":"SELECT \'' + LONE + '\'"}}',
     76, "INVALID_PARAMS"),
    ('{"jsonrpc":"2.0","id":77,"method":"store.delete","params":{"store":"%s","predicates":{"table":"T","where":'
     + "[" * 900 + "]" * 900 + "}}}", 77, "INVALID_PARAMS"),
    ('{"jsonrpc":"2.0","id":78,"method":"store.insert","params":{"store":"%s","table":"T","values":{"id":' + "9" * 5000 + "}}}",
     78, "INVALID_PARAMS"),
    ('{"jsonrpc":"2.0","id":79,"method":"store.retry_failure","params":{"store":"%s","id":' + str(2**64) + "}}",
     79, "INVALID_PARAMS"),
]


@pytest.mark.parametrize(("line", "rid", "name"), HOSTILE_LINES, ids=[f"{n}:{r}" for _, r, n in HOSTILE_LINES])
def test_hostile_text_numbers_and_nesting_get_their_documented_error(conn: RawConnection, line: str, rid: Any, name: str) -> None:
    conn.send_raw((line.replace("%s", STORE)).encode() + b"\n")
    response = conn.read()
    assert response["id"] == rid and error_name(response) == name, response
    assert_usable(conn)


def test_one_hundred_requests_with_lone_surrogates_get_one_hundred_answers(
    shared_daemon: DaemonProcess, raw_factory: Callable[[Path], RawConnection]
) -> None:
    c = raw_factory(shared_daemon.socket)
    c.send_raw(b"".join((HOSTILE_LINES[i % 7][0].replace("%s", STORE)).encode() + b"\n" for i in range(100)))
    names = [error_name(c.read()) for _ in range(100)]
    assert sorted(names) == sorted(HOSTILE_LINES[i % 7][2] for i in range(100))
    assert "never retrieved" not in shared_daemon.log() and "Traceback" not in shared_daemon.log()
