"""A JSON-RPC fuzzer over every API method, against ONE real daemon.

Methods come from the registry (``p2pstore.api.methods.METHODS``) and params
from each method's schema in ``schemas/api.schema.json``, so a new method is
fuzzed without touching this file. Each request is a valid params object,
or one with a mutation: a wrong type, a missing or extra member, a lone
surrogate, an integer outside 64 bits, deep nesting, a huge string (within
the line cap), a bad blob. Every request has an id, and each must get, within
a timeout, either a result or an error whose code and name are in the
errors table of docs/api.md — never INTERNAL_ERROR. After all of it the
daemon is alive, still serves, and logged no traceback.

Bounded for CI: a fixed pass of every method x every mutation, then 300
hypothesis examples, derandomized (same cases every run), no deadline.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.conftest import DaemonProcess  # noqa: E402  (the one definition of a daemon subprocess)

from p2pstore.api.methods import METHODS  # noqa: E402
from p2pstore.config import load_json_schema  # noqa: E402
from p2pstore.errors import by_name  # noqa: E402

SCHEMA = load_json_schema("api.schema.json")
DEFS = SCHEMA["$defs"]
STORE = "fz"
#: A reply must come within this many seconds (a loaded 2-core CI machine).
REPLY_TIMEOUT = 30.0
#: Stands for an integer literal too long for Python's int(); replaced in the encoded line.
HUGE_LITERAL = "\u0000HUGE\u0000"
HUGE_DIGITS = "9" * 5000


def documented_errors() -> dict[str, int]:
    """name -> code, from the errors table of docs/api.md."""
    doc = (REPO / "docs" / "api.md").read_text()
    table = {name: int(code) for code, name in re.findall(r"^\| (-\d+) \| `([A-Z_]+)` \|", doc, re.M)}
    assert len(table) > 20, "the errors table of docs/api.md was not found"
    return table


DOCUMENTED = documented_errors()


# -- params from the schema ---------------------------------------------------------------------

#: Plausible values for params by name: valid often enough to reach the core.
NAMES = st.sampled_from([STORE, STORE, STORE, "fz_other", "default", "never_opened"]) | st.text(min_size=1, max_size=70)
TABLES = st.sampled_from(["T", "T", "C", "missing", "_p2p_log", "sqlite_master", 'T"; DROP TABLE T; --']) | st.text(max_size=130)
COLUMNS = st.sampled_from(["id", "name", "data", "nope", "rowid"]) | st.text(max_size=20)
DEVICES = st.sampled_from(["ABCDEFG-HIJKLMN-OPQRSTU", "", "x" * 200]) | st.text(max_size=40)
SQL = st.sampled_from([
    "SELECT * FROM T", "SELECT ?", "SELECT :a", "SELECT count(*) FROM T", "INSERT INTO T(name) VALUES (?)",
    "UPDATE T SET name = ? WHERE id = 1", "DELETE FROM T WHERE id > 1000", "DROP TABLE T", "BEGIN", "PRAGMA journal_mode",
    "SELECT randomblob(1000) FROM T", "CREATE TABLE IF NOT EXISTS Z (a)", "SELECT * FROM _p2p_log", "VACUUM",
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 5000) SELECT x FROM c",
]) | st.text(min_size=1, max_size=50)
BLOBS = st.binary(max_size=64).map(lambda b: {"$blob": __import__("base64").b64encode(b).decode()})
SQL_VALUES = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=30) | BLOBS
CONDITION = st.tuples(COLUMNS, st.sampled_from(["=", "!=", "<", ">", "like", "in", "not_in", "between", "is_null", "===", "glob"]),
                      SQL_VALUES | st.lists(SQL_VALUES, max_size=3)).map(list)
PREDICATES = st.fixed_dictionaries({}, optional={
    "table": TABLES, "where": st.lists(CONDITION | st.fixed_dictionaries({"or": st.lists(CONDITION, max_size=3)}), max_size=4),
    "order_by": st.lists(st.tuples(COLUMNS, st.sampled_from(["asc", "desc", "up"])).map(list), max_size=2),
    "limit": st.integers(-5, 300), "offset": st.integers(-5, 300), "devices": st.lists(DEVICES, max_size=2),
})
DOCUMENTS = st.sampled_from(["{}", "", "not json", '{"dbSchema": []}', "[" * 50]) | st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10)
BY_NAME: dict[str, st.SearchStrategy[Any]] = {
    "store": NAMES, "bundle": NAMES, "table": TABLES, "device": DEVICES, "device_id": DEVICES, "sql": SQL,
    "predicates": PREDICATES, "document": DOCUMENTS, "columns": st.lists(COLUMNS, max_size=3),
    "values": st.dictionaries(COLUMNS, SQL_VALUES, max_size=3),
    "tables": st.lists(TABLES, min_size=1, max_size=3, unique=True),
    "subscription": st.integers(0, 50), "id": st.integers(1, 50),
}


def from_schema(schema: dict[str, Any], name: str | None = None) -> st.SearchStrategy[Any]:
    """A strategy for values of ``schema`` (the subset api.schema.json uses)."""
    if name in BY_NAME:
        return BY_NAME[name]
    if "$ref" in schema:
        return from_schema(DEFS[schema["$ref"].rsplit("/", 1)[-1]], name)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([from_schema(s, name) for s in schema["anyOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}, name) for k in kind])
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: from_schema(v, k) for k, v in props.items() if k in required},
            optional={k: from_schema(v, k) for k, v in props.items() if k not in required},
        )
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), name), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 4), 4))
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 20), 20))
    if kind == "integer":
        return st.integers(schema.get("minimum", -1000), schema.get("maximum", 1000))
    if kind == "number":
        return st.floats(allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return st.none() | st.integers() | st.text(max_size=10)


def params_for(method: str) -> st.SearchStrategy[dict[str, Any]]:
    return from_schema(SCHEMA["methods"][method])


# -- mutations ------------------------------------------------------------------------------------

def _nest(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


#: Each takes valid params and a value drawn for it, and returns hostile params.
MUTATIONS: dict[str, Any] = {
    "valid": lambda p, key, x: p,
    "wrong type": lambda p, key, x: {**p, key: x},
    "missing": lambda p, key, x: {k: v for k, v in p.items() if k != key},
    "extra member": lambda p, key, x: {**p, "bogus": x},
    "lone surrogate": lambda p, key, x: {**p, key: "a\ud800b"} if key else {"x\udfff": 1},
    "surrogate key": lambda p, key, x: {**p, "values": {"na\ud800me": 1}} if "values" in p else {**p, "k\ud800": 1},
    "huge int": lambda p, key, x: {**p, key: 2**64} if key else {"n": -(2**70)},
    "huge literal": lambda p, key, x: {**p, key: HUGE_LITERAL} if key else {"n": HUGE_LITERAL},
    "deep nesting": lambda p, key, x: {**p, key or "p": _nest(x, 900)},
    "medium nesting": lambda p, key, x: {**p, key or "p": _nest({"a": x}, 30)},
    "huge string": lambda p, key, x: {**p, key or "p": "x" * 900_000},
    "bad blob": lambda p, key, x: {**p, key or "p": {"$blob": "@@not base64"}},
    "bad blob in values": lambda p, key, x: {**p, "values": {"data": {"$blob": 5}}} if "values" in p else
    {**p, "params": [{"$blob": "AAA"}, {"$blob": "", "x": 1}]},
    "positional params": lambda p, key, x: [list(p.values())],
}
HOSTILE = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | \
    st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)


# -- the daemon and the wire ----------------------------------------------------------------------

class Wire:
    """One raw connection: send a request, wait for the reply with its id (notifications skipped)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(REPLY_TIMEOUT)
        self.sock.connect(str(path))
        self.buf = b""
        self.ids = itertools.count(1)

    def ask(self, method: str, params: Any) -> dict[str, Any]:
        rid = next(self.ids)
        line = json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode()
        line = line.replace(json.dumps(HUGE_LITERAL).encode(), HUGE_DIGITS.encode())
        self.sock.sendall(line + b"\n")
        for _ in range(100_000):
            while b"\n" not in self.buf:
                try:
                    chunk = self.sock.recv(1 << 20)
                except TimeoutError:
                    raise AssertionError(f"silence: no reply to {method} within {REPLY_TIMEOUT} s") from None
                assert chunk, f"the daemon closed the connection after {method}"
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\n", 1)
            msg = json.loads(raw)
            if msg.get("id") == rid:
                return msg
            assert "id" not in msg, f"a reply to another request: {msg}"
        raise AssertionError("no reply among 100,000 notifications")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[DaemonProcess]:
    root = Path(tempfile.mkdtemp(prefix="p2ps-fz-", dir="/tmp"))
    os.chmod(root, 0o700)
    d = DaemonProcess(root, "fuzz", ["--no-discovery", "--interface", "127.0.0.1"])
    try:
        d.start()
        yield d
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def wire(fuzz_daemon: DaemonProcess) -> Iterator[Wire]:
    w = Wire(fuzz_daemon.socket)
    for method, params in [
        ("store.open", {"store": STORE}),
        ("store.execute", {"store": STORE, "sql": "CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT UNIQUE, data BLOB)"}),
        ("store.execute", {"store": STORE, "sql": "CREATE TABLE C (a INTEGER, b INTEGER, PRIMARY KEY (a, b))"}),
        ("store.execute", {"store": STORE, "sql": "INSERT INTO T(id, name) VALUES (1, 'one'), (2, 'two')"}),
        ("store.set_distributed_tables", {"store": STORE, "tables": ["T"]}),
    ]:
        assert "result" in w.ask(method, params), (method, params)
    yield w
    w.close()


def check_reply(method: str, params: Any, reply: dict[str, Any]) -> None:
    assert reply.get("jsonrpc") == "2.0"
    if "result" in reply:
        return
    error = reply["error"]
    name = error["data"]["name"]
    assert name != "INTERNAL_ERROR", f"{method} {str(params)[:300]!r}: {error['message'][:1000]}"
    assert DOCUMENTED.get(name) == error["code"], f"undocumented error {name} {error['code']} from {method}"
    assert by_name(name).code == error["code"]
    assert error["message"]


def send(wire: Wire, method: str, params: Any) -> None:
    check_reply(method, params, wire.ask(method, params))
    if method == "store.close":  # keep the fuzzed store open for what follows
        wire.ask("store.open", {"store": STORE})


def test_every_registered_method_has_a_params_schema() -> None:
    assert set(METHODS) == set(SCHEMA["methods"])


def _key_of(params: dict[str, Any], draw_index: int) -> str | None:
    keys = sorted(params)
    return keys[draw_index % len(keys)] if keys else None


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_with_every_mutation(wire: Wire, method: str) -> None:
    """One fixed case of each mutation for each method (derandomized examples)."""
    examples = iter(_examples(method))
    for i, (kind, mutate) in enumerate(MUTATIONS.items()):
        params, hostile = next(examples)
        send(wire, method, mutate(params, _key_of(params, i), hostile))


def _examples(method: str) -> list[tuple[dict[str, Any], Any]]:
    found: list[tuple[dict[str, Any], Any]] = []

    @settings(max_examples=len(MUTATIONS), deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(params_for(method), HOSTILE)
    def collect(params: dict[str, Any], hostile: Any) -> None:
        found.append((params, hostile))

    collect()
    while len(found) < len(MUTATIONS):  # hypothesis may find fewer distinct examples for a tiny schema
        found.append(found[len(found) % max(len(found), 1)] if found else ({}, None))
    return found


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_requests_get_a_result_or_a_documented_error(wire: Wire, data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(sorted(METHODS)), label="method")
    params = data.draw(params_for(method), label="params")
    kind = data.draw(st.sampled_from(sorted(MUTATIONS)), label="mutation")
    hostile = data.draw(HOSTILE, label="hostile")
    key = _key_of(params, data.draw(st.integers(0, 10), label="key"))
    send(wire, method, MUTATIONS[kind](params, key, hostile))


def test_the_daemon_is_alive_and_logged_no_crash_after_the_fuzzing(fuzz_daemon: DaemonProcess, wire: Wire) -> None:
    assert fuzz_daemon.proc is not None and fuzz_daemon.proc.poll() is None
    assert "result" in wire.ask("device.info", {})
    fresh = Wire(fuzz_daemon.socket)
    try:
        assert "result" in fresh.ask("store.query", {"store": STORE, "sql": "SELECT 1"})
    finally:
        fresh.close()
    log = fuzz_daemon.log()
    assert "Traceback" not in log and "never retrieved" not in log, log[-5000:]
