"""Helpers for the end-to-end sync tests: groups of linked daemons.

``linked_daemons(n, ...)`` starts ``n`` real daemons on 127.0.0.1 (discovery
off), each with a static ``--peer`` to every daemon started before it, makes
every pair trust each other both ways and waits until every daemon lists
every other one online. Node ``k`` dials nodes ``0..k-1``, so a restarted
node (``Node.restart``) reconnects by itself; it also keeps its port.

Single-version stores use the seed's names (the repo's sync_schema.json is
for bundle ``com.example.rdbDataSync``, dbName ``RdbTest``); ``schema=``
copies a document to ``<data dir>/sync_schema.json`` before the daemon starts.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from p2ps_helpers import LOOPBACK, REPO, DaemonProcess

from p2pstore.client import BlockingClient

LO = "127.0.0.1"
BUNDLE, STORE = "com.example.rdbDataSync", "RdbTest"
SV_REF = {"store": STORE, "bundle": BUNDLE}
SV = {"table_type": "single_version"}
EMPLOYEE = (
    "CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, "
    "NAME TEXT NOT NULL UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB)"
)
SEED_SCHEMA = REPO / "sync_schema.json"
#: How long two daemons may take to see each other online after mutual trust.
LINK_TIMEOUT = 10.0


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); bounded."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 10):
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


def stays(condition: Callable[[], Any], seconds: float, what: str, interval: float = 0.05) -> None:
    """``condition`` holds throughout ``seconds`` (bounded)."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / interval) + 10):
        assert condition(), what
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


class Node:
    """A running daemon, a blocking client of it, and its identity."""

    def __init__(self, proc: DaemonProcess) -> None:
        self.proc = proc
        self.api: BlockingClient = proc.client()
        info = self.api.call("device.info")
        self.id: str = info["device_id"]
        self.port: int = info["port"]
        self.name: str = info["name"]
        self._clients: list[BlockingClient] = [self.api]

    def __repr__(self) -> str:
        return f"Node({self.name}, {self.id[:8]}…, port {self.port})"

    # -- API shortcuts --------------------------------------------------------

    def call(self, method: str, **params: Any) -> Any:
        return self.api.call(method, **params)

    def client(self) -> BlockingClient:
        """Another client connection (closed at teardown)."""
        c = self.proc.client()
        self._clients.append(c)
        return c

    def view(self, other: Node | str) -> dict[str, Any] | None:
        device = other if isinstance(other, str) else other.id
        return next((d for d in self.api.call("devices.list") if d["device_id"] == device), None)

    def sees_online(self, other: Node | str) -> bool:
        v = self.view(other)
        return bool(v and v["online"] and v["trusted"])

    def sync(self, mode: str, ref: dict[str, Any], devices: Sequence[Node | str] | str | None = None,
             **predicates: Any) -> dict[str, dict[str, Any]]:
        """``store.sync``; returns the results keyed by device ID."""
        preds: dict[str, Any] = dict(predicates)
        if devices is not None:
            preds["devices"] = devices if isinstance(devices, str) else [d if isinstance(d, str) else d.id for d in devices]
        results = self.api.call("store.sync", **ref, mode=mode, predicates=preds)["results"]
        by_device = {r["device"]: r for r in results}
        assert len(by_device) == len(results), results
        return by_device

    def rows(self, ref: dict[str, Any], sql: str, params: list[Any] | None = None) -> list[list[Any]]:
        return self.api.call("store.query", **ref, sql=sql, params=params or [])["rows"]

    def count(self, ref: dict[str, Any], table: str) -> int:
        return self.rows(ref, f'SELECT count(*) FROM "{table}"')[0][0]

    # -- lifecycle ------------------------------------------------------------

    def close_clients(self) -> None:
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients = []

    def stop(self) -> None:
        self.close_clients()
        self.proc.stop()

    def kill(self) -> None:
        """kill -9."""
        self.close_clients()
        self.proc.kill()

    def restart(self) -> Node:
        """Start the same daemon again (same data dir, same port); it dials its peers itself."""
        if self.proc.proc is not None and self.proc.proc.poll() is None:
            self.stop()
        if "--port" not in self.proc.extra:
            self.proc.extra = [*self.proc.extra, "--port", str(self.port)]
        self.proc.start()
        self.api = self.proc.client()
        self._clients = [self.api]
        assert self.api.call("device.info")["device_id"] == self.id
        return self


def link(a: Node, b: Node) -> None:
    a.call("devices.trust", device_id=b.id, name=b.name)
    b.call("devices.trust", device_id=a.id, name=a.name)


def wait_linked(nodes: Sequence[Node], timeout: float = LINK_TIMEOUT) -> None:
    for me in nodes:
        for other in nodes:
            if other is not me:
                wait_until(lambda: me.sees_online(other), timeout, f"{me.name} sees {other.name} online")


@pytest.fixture
def linked_daemons(daemon_factory: Callable[..., DaemonProcess], short_tmp: Path) -> Iterator[Callable[..., list[Node]]]:
    """``linked_daemons(n, flags=..., schema=..., link_all=True)`` -> nodes a, b, c...

    ``flags`` and ``schema`` may be a dict by node index or one value for all
    nodes. ``schema``: a document (dict), or True for the repo's
    sync_schema.json; written to ``<data dir>/sync_schema.json`` (the
    daemon's default path) before the daemon starts.
    """
    made: list[Node] = []

    def start(n: int, *, flags: dict[int, Sequence[str]] | Sequence[str] = (), schema: Any = None,
              link_all: bool = True) -> list[Node]:
        nodes: list[Node] = []
        for i in range(n):
            name = chr(ord("a") + i)
            extra = list(flags.get(i, ()) if isinstance(flags, dict) else flags)
            doc = schema.get(i) if isinstance(schema, dict) and "dbSchema" not in schema else schema
            if doc is not None:
                write_schema(short_tmp / name, doc)
            peers = [arg for other in nodes for arg in ("--peer", f"{LO}:{other.port}")]
            node = Node(daemon_factory(name, *LOOPBACK, *extra, *peers))
            assert node.port not in (0, None)
            nodes.append(node)
            made.append(node)
        if link_all:
            for i, a in enumerate(nodes):
                for b in nodes[i + 1:]:
                    link(a, b)
            wait_linked(nodes)
        return nodes

    yield start
    for node in made:
        node.close_clients()


def write_schema(data_dir: Path, doc: Any) -> Path:
    """``doc`` (True: the repo's file) as ``<data_dir>/sync_schema.json``."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / "sync_schema.json"
    if doc is True:
        shutil.copy(SEED_SCHEMA, path)
    else:
        path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return path


def schema_doc(version: int = 0, columns: Sequence[str] = ("NAME", "AGE", "SALARY", "CODES"),
               extra_fields: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The seed's EMPLOYEE entry (only), at ``version`` with ``columns`` synced."""
    doc = json.loads(SEED_SCHEMA.read_text())
    entry = doc["dbSchema"][0]
    entry["version"] = version
    entry["tables"] = [t for t in entry["tables"] if t["tableName"] == "EMPLOYEE"]
    table = entry["tables"][0]
    table["deviceSyncFields"] = list(columns)
    table["fields"] += list(extra_fields)
    return doc


def setup_employee(node: Node, *, auto_sync: bool = False, extra_sql: Sequence[str] = (), label: str | None = None,
                   create: str = EMPLOYEE) -> dict[str, Any]:
    """Open the seed's store on ``node``, create EMPLOYEE and distribute it single_version."""
    params = dict(SV_REF)
    if label is not None:
        params["security_level"] = label
    node.call("store.open", **params)
    node.call("store.execute", **SV_REF, sql=create)
    for sql in extra_sql:
        node.call("store.execute", **SV_REF, sql=sql)
    node.call("store.set_distributed_tables", **SV_REF, tables=["EMPLOYEE"], config={**SV, "auto_sync": auto_sync})
    return SV_REF


def cli(node: Node, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``p2pstore ARGS --socket <node's socket>``."""
    argv = [sys.executable, "-m", "p2pstore", *args, "--socket", str(node.proc.socket)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=timeout)


def sqlite3_shell(path: Path | str, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sqlite3", "-cmd", ".timeout 5000", str(path), sql], capture_output=True, text=True, timeout=30)


def collect_notifications(api: BlockingClient, until: Callable[[list[dict[str, Any]]], bool],
                          timeout: float) -> list[dict[str, Any]]:
    """Notifications until ``until(collected)`` or the timeout (bounded)."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    for _ in range(10_000):
        if until(got):
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            got.append(api.next_notification(timeout=min(left, 0.5)))
        except TimeoutError:
            pass
    return got


def fleet_sessions(nodes: Sequence[Node]) -> int:
    """Sync sessions the fleet's daemons started, summed (``status`` ``traffic``)."""
    return sum(n.call("status")["traffic"]["sessions_started"] for n in nodes)


def quiet_sessions(nodes: Sequence[Node], quiet_s: float = 1.0, timeout: float = 30.0) -> int:
    """The fleet's session count once it stopped growing for ``quiet_s`` (bounded)."""
    last, since = fleet_sessions(nodes), time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = fleet_sessions(nodes)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise AssertionError(f"the fleet did not go quiet in {timeout:g} s")
