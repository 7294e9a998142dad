"""The Python client (async Client and BlockingClient) against a real daemon."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from p2ps_helpers import DaemonProcess, unique

from p2pstore.client import BlockingClient, Client
from p2pstore.errors import (
    DaemonNotRunning,
    InvalidParams,
    InvalidPredicate,
    MethodNotFound,
    P2PStoreError,
    PermissionDenied,
    SqlError,
    StoreNotOpen,
    TableNotFound,
)

ERRORS = [
    (StoreNotOpen, "store.query", {"store": "never_opened_here", "sql": "SELECT 1"}),
    (MethodNotFound, "no.such.method", {}),
    (InvalidParams, "store.open", {"store": 5}),
    (SqlError, "store.query", {"sql": "SELEC"}),
    (PermissionDenied, "store.execute", {"sql": "BEGIN"}),
    (TableNotFound, "store.insert", {"table": "missing", "values": {}}),
    (InvalidPredicate, "store.delete", {"predicates": {"table": "T", "where": [["nope", "=", 1]]}}),
]


@pytest.fixture(scope="module")
def store_name(shared_daemon: DaemonProcess) -> str:
    name = unique("client")
    with shared_daemon.client() as c:
        c.call("store.open", store=name)
        c.call("store.execute", store=name, sql="CREATE TABLE T (id INTEGER PRIMARY KEY, data BLOB)")
    return name


def with_store(params: dict, store: str) -> dict:
    if "store" in params or not any(k in params for k in ("sql", "table", "predicates")):
        return params
    return {"store": store, **params}


# -- async Client ---------------------------------------------------------------------------------

async def test_async_client_calls_and_blobs(shared_daemon: DaemonProcess, store_name: str) -> None:
    async with Client(shared_daemon.socket) as c:
        assert (await c.call("device.info"))["name"] == shared_daemon.name
        await c.call("store.open", store=store_name)
        rowid = (await c.call("store.insert", store=store_name, table="T", values={"data": b"\x00\x01\xff"}))["rowid"]
        rows = (await c.call("store.query", store=store_name, sql="SELECT data FROM T WHERE id = ?", params=[rowid]))["rows"]
        assert rows == [[b"\x00\x01\xff"]]


@pytest.mark.parametrize(("cls", "method", "params"), ERRORS, ids=[e[0].__name__ for e in ERRORS])
async def test_async_client_reraises_the_same_error_class(
    shared_daemon: DaemonProcess, store_name: str, cls: type[P2PStoreError], method: str, params: dict
) -> None:
    async with Client(shared_daemon.socket) as c:
        await c.call("store.open", store=store_name)
        with pytest.raises(cls) as info:
            await c.call(method, **with_store(params, store_name))
        assert type(info.value) is cls
        assert info.value.name == cls.name and info.value.message
        assert "name" not in info.value.data  # the name is the class, not a detail
        assert (await c.call("device.info"))["name"]  # the connection goes on


async def test_error_details_survive_the_trip(shared_daemon: DaemonProcess) -> None:
    async with Client(shared_daemon.socket) as c:
        with pytest.raises(StoreNotOpen) as info:
            await c.call("store.query", store="not_open_x", bundle="b1", sql="SELECT 1")
    assert info.value.data == {"store": "not_open_x", "bundle": "b1"}


async def test_concurrent_calls_on_one_connection_get_their_own_answers(shared_daemon: DaemonProcess, store_name: str) -> None:
    async with Client(shared_daemon.socket) as c:
        await c.call("store.open", store=store_name)
        results = await asyncio.gather(*(c.call("store.query", store=store_name, sql="SELECT ?", params=[i]) for i in range(200)))
        assert [r["rows"][0][0] for r in results] == list(range(200))


async def test_async_client_receives_notifications(shared_daemon: DaemonProcess) -> None:
    name = unique("notes")
    async with Client(shared_daemon.socket) as c:
        await c.call("store.open", store=name)
        await c.call("store.execute", store=name, sql="CREATE TABLE T (id INTEGER PRIMARY KEY)")
        await c.call("store.set_distributed_tables", store=name, tables=["T"])
        sub = (await c.call("store.subscribe", store=name, type="local_details"))["subscription"]
        await c.call("store.insert", store=name, table="T", values={"id": 9})
        note = await asyncio.wait_for(c.notifications.get(), 1.0)
    assert note["method"] == "dataChange"
    assert note["params"]["subscription"] == sub
    assert note["params"]["changes"][0]["inserted"] == [9]


async def test_async_client_without_a_daemon(short_tmp: Path) -> None:
    with pytest.raises(DaemonNotRunning) as info:
        await Client(short_tmp / "nobody-home.sock").connect()
    assert "nobody-home.sock" in info.value.message
    with pytest.raises(DaemonNotRunning):
        await Client(short_tmp / "nobody-home.sock").call("device.info")  # call connects on demand


async def test_a_stale_socket_file_means_no_daemon(short_tmp: Path) -> None:
    path = short_tmp / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens
    with pytest.raises(DaemonNotRunning):
        await Client(path).connect()


async def test_calls_after_the_daemon_stopped_raise_a_p2pstore_error(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("leaving")
    c = await Client(d.socket).connect()
    try:
        assert (await c.call("device.info"))["name"] == "leaving"
        d.stop()
        # At once: the client has not yet read the daemon's EOF, so this call's
        # write meets a closed socket; that too is DaemonNotRunning.
        with pytest.raises(DaemonNotRunning):
            await asyncio.wait_for(c.call("device.info"), 5)
        with pytest.raises(DaemonNotRunning):  # and after the EOF was read
            await asyncio.wait_for(c.call("device.info"), 5)
    finally:
        await c.close()


async def test_env_variable_selects_the_socket(shared_daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PSTORE_SOCKET", str(shared_daemon.socket))
    async with Client() as c:
        assert (await c.call("device.info"))["name"] == shared_daemon.name


# -- BlockingClient -------------------------------------------------------------------------------

def test_blocking_client_calls_errors_and_notifications(shared_daemon: DaemonProcess) -> None:
    name = unique("blocking")
    with BlockingClient(shared_daemon.socket) as c:
        c.call("store.open", store=name)
        c.call("store.execute", store=name, sql="CREATE TABLE T (id INTEGER PRIMARY KEY, b BLOB)")
        c.call("store.set_distributed_tables", store=name, tables=["T"])
        c.call("store.subscribe", store=name, type="local_details")
        with pytest.raises(StoreNotOpen):
            c.call("store.query", store="nope_not_open", sql="SELECT 1")
        with pytest.raises(TimeoutError):
            c.next_notification(timeout=0.2)
        c.call("store.insert", store=name, table="T", values={"id": 3, "b": b"\x07"})
        assert c.next_notification(timeout=1.0)["params"]["changes"][0]["inserted"] == [3]
        assert c.call("store.query", store=name, sql="SELECT b FROM T")["rows"] == [[b"\x07"]]


@pytest.mark.parametrize(("cls", "method", "params"), ERRORS, ids=[e[0].__name__ for e in ERRORS])
def test_blocking_client_reraises_the_same_error_class(
    api: BlockingClient, store_name: str, cls: type[P2PStoreError], method: str, params: dict
) -> None:
    api.call("store.open", store=store_name)
    with pytest.raises(cls):
        api.call(method, **with_store(params, store_name))


def test_blocking_client_without_a_daemon(short_tmp: Path) -> None:
    start = time.monotonic()
    with pytest.raises(DaemonNotRunning):
        BlockingClient(short_tmp / "absent.sock")
    assert time.monotonic() - start < 5


def test_blocking_clients_can_be_made_and_closed_many_times(shared_daemon: DaemonProcess) -> None:
    for _ in range(20):
        with BlockingClient(shared_daemon.socket) as c:
            c.call("device.info")
