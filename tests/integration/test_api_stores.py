"""The local API against a real daemon: device.info, status, stores, SQL,
predicates, distributed tables, security labels and the per-bundle limit."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from p2ps_helpers import DaemonProcess, unique, write_config

from p2pstore import __version__
from p2pstore.client import BlockingClient
from p2pstore.errors import (
    CompositeKeyNotSupported,
    ColumnNotFound,
    InvalidParams,
    InvalidPredicate,
    PermissionDenied,
    SecurityLabelMismatch,
    SqlError,
    StoreNotOpen,
    TableNotDistributed,
    TableTypeLocked,
    TooManyStores,
)


def make_table(api: BlockingClient, store: str, bundle: str = "default", table: str = "T") -> None:
    api.call("store.execute", store=store, bundle=bundle,
             sql=f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY, name TEXT, photo BLOB, n REAL)")


# -- device.info / status -------------------------------------------------------------------

def test_device_info(api: BlockingClient, shared_daemon: DaemonProcess) -> None:
    info = api.call("device.info")
    assert info["name"] == shared_daemon.name
    assert info["security_level"] == "S1"
    assert info["version"] == __version__
    assert isinstance(info["port"], int) and info["port"] > 0  # --port 0: the port actually bound
    assert isinstance(info["device_id"], str) and len(info["device_id"]) >= 16
    assert api.call("device.info") == info  # stable


def test_status_lists_open_stores(api: BlockingClient) -> None:
    name = unique()
    api.call("store.open", store=name, security_level="S2")
    make_table(api, name)
    api.call("store.set_distributed_tables", store=name, tables=["T"])
    status = api.call("status")
    assert status["device"] == api.call("device.info")
    assert status["uptime_s"] >= 0
    mine = [s for s in status["stores"] if s["store"] == name]
    assert len(mine) == 1
    assert mine[0]["bundle"] == "default" and mine[0]["security_level"] == "S2"
    assert mine[0]["table_type"] == "collaborative" and mine[0]["distributed_tables"] == ["T"]


# -- store.open / close ---------------------------------------------------------------------------

def test_open_creates_the_file_under_the_data_dir_in_wal_mode(api: BlockingClient, shared_daemon: DaemonProcess) -> None:
    name = unique()
    result = api.call("store.open", store=name, bundle="shop")
    expected = shared_daemon.data_dir / "stores" / "shop" / f"{name}.db"
    assert Path(result["path"]) == expected
    assert result == {"store": name, "bundle": "shop", "path": str(expected), "security_level": "S1"}
    assert expected.exists()
    conn = sqlite3.connect(expected)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_opening_an_open_store_returns_it(api: BlockingClient) -> None:
    name = unique()
    first = api.call("store.open", store=name)
    make_table(api, name)
    api.call("store.insert", store=name, table="T", values={"name": "kept"})
    assert api.call("store.open", store=name) == first
    assert api.call("store.query", store=name, sql="SELECT name FROM T")["rows"] == [["kept"]]


def test_same_name_in_two_bundles_is_two_stores(api: BlockingClient) -> None:
    name = unique()
    a = api.call("store.open", store=name, bundle="ba")
    b = api.call("store.open", store=name, bundle="bb")
    assert a["path"] != b["path"]
    make_table(api, name, "ba")
    with pytest.raises(SqlError, match="no such table"):
        api.call("store.query", store=name, bundle="bb", sql="SELECT * FROM T")


def test_close_then_calls_fail_and_reopen_keeps_data(api: BlockingClient) -> None:
    name = unique()
    api.call("store.open", store=name)
    make_table(api, name)
    api.call("store.insert", store=name, table="T", values={"name": "persisted"})
    assert api.call("store.close", store=name) == {}
    with pytest.raises(StoreNotOpen) as info:
        api.call("store.query", store=name, sql="SELECT 1")
    assert info.value.name == "STORE_NOT_OPEN" and name in info.value.message
    with pytest.raises(StoreNotOpen):
        api.call("store.close", store=name)
    api.call("store.open", store=name)
    assert api.call("store.query", store=name, sql="SELECT name FROM T")["rows"] == [["persisted"]]


def test_security_label_is_kept_raised_never_lowered(api: BlockingClient) -> None:
    name = unique()
    assert api.call("store.open", store=name, security_level="S3")["security_level"] == "S3"
    with pytest.raises(SecurityLabelMismatch) as info:
        api.call("store.open", store=name, security_level="S2")  # while open
    assert info.value.data == {"stored": "S3", "requested": "S2"}
    api.call("store.close", store=name)
    with pytest.raises(SecurityLabelMismatch):
        api.call("store.open", store=name, security_level="S1")  # reopening from the file
    assert api.call("store.open", store=name)["security_level"] == "S3"  # the refused open changed nothing
    assert api.call("store.open", store=name, security_level="S4")["security_level"] == "S4"
    api.call("store.close", store=name)
    assert api.call("store.open", store=name)["security_level"] == "S4"


# -- SQL and the structured writes ----------------------------------------------------------------

def test_execute_query_and_blobs(api: BlockingClient) -> None:
    name = unique()
    api.call("store.open", store=name)
    make_table(api, name)
    photo = bytes(range(256))
    result = api.call("store.execute", store=name, sql="INSERT INTO T(name, photo, n) VALUES (?, ?, ?)", params=["a", photo, 1.5])
    assert result == {"rows_affected": 1, "last_insert_rowid": 1}
    named = api.call("store.execute", store=name, sql="INSERT INTO T(name) VALUES (:n)", params={"n": "b"})
    assert named["last_insert_rowid"] == 2
    got = api.call("store.query", store=name, sql="SELECT id, name, photo, n FROM T WHERE photo = ?", params=[photo])
    assert got == {"columns": ["id", "name", "photo", "n"], "rows": [[1, "a", photo, 1.5]]}
    assert api.call("store.query", store=name, sql="SELECT photo FROM T WHERE id = 2")["rows"] == [[None]]


def test_insert_update_delete_with_predicates(api: BlockingClient) -> None:
    name = unique()
    api.call("store.open", store=name)
    make_table(api, name)
    for i, who in enumerate(["ann", "bob", "cid", "dan"]):
        assert api.call("store.insert", store=name, table="T", values={"name": who, "n": i, "photo": who.encode()}) == {"rowid": i + 1}
    changed = api.call("store.update", store=name, values={"n": 100, "photo": b"\x00"},
                       predicates={"table": "T", "where": [{"or": [["name", "=", "ann"], ["n", "between", 2, 3]]}]})
    assert changed == {"rows_affected": 3}
    rows = api.call("store.query", store=name, sql="SELECT name, n, photo FROM T ORDER BY id")["rows"]
    assert rows == [["ann", 100, b"\x00"], ["bob", 1, b"bob"], ["cid", 100, b"\x00"], ["dan", 100, b"\x00"]]
    assert api.call("store.delete", store=name, predicates={"table": "T", "where": [["photo", "=", b"bob"]]}) == {"rows_affected": 1}
    assert api.call("store.delete", store=name, predicates={"table": "T", "where": [["name", "like", "%z%"]]}) == {"rows_affected": 0}
    assert api.call("store.query", store=name, sql="SELECT count(*) FROM T")["rows"] == [[3]]


def test_columns_are_checked(api: BlockingClient) -> None:
    name = unique()
    api.call("store.open", store=name)
    make_table(api, name)
    with pytest.raises(ColumnNotFound) as info:
        api.call("store.insert", store=name, table="T", values={"nmae": "typo"})
    assert "nmae" in info.value.message and info.value.data["columns"] == ["nmae"]
    with pytest.raises(InvalidPredicate) as pinfo:
        api.call("store.delete", store=name, predicates={"table": "T", "where": [["nmae", "=", 1]]})
    assert pinfo.value.data["path"] == "/where/0/0"


def test_query_cannot_modify_data(api: BlockingClient) -> None:
    name = unique()
    api.call("store.open", store=name)
    make_table(api, name)
    api.call("store.insert", store=name, table="T", values={"name": "only"})
    for sql in ("INSERT INTO T(name) VALUES ('sneaky') RETURNING id", "DELETE FROM T RETURNING id", "UPDATE T SET name = 'x' RETURNING id"):
        try:
            api.call("store.query", store=name, sql=sql)
        except PermissionDenied:
            pass
    assert api.call("store.query", store=name, sql="SELECT id, name FROM T")["rows"] == [[1, "only"]]


def test_transaction_control_and_attach_are_refused(api: BlockingClient) -> None:
    name = unique()
    api.call("store.open", store=name)
    make_table(api, name)
    for sql in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT x", "ATTACH DATABASE ':memory:' AS m", "DELETE FROM _p2p_log"):
        with pytest.raises(PermissionDenied):
            api.call("store.execute", store=name, sql=sql)
    api.call("store.insert", store=name, table="T", values={"name": "still fine"})


# -- distributed tables ---------------------------------------------------------------------------

def test_set_distributed_tables_and_device_table_names(api: BlockingClient) -> None:
    name = unique()
    api.call("store.open", store=name)
    make_table(api, name)
    assert api.call("store.set_distributed_tables", store=name, tables=["T"], config={"table_type": "collaborative", "auto_sync": False}) == {}
    dev = "ABCDEFG-HIJKLMN-OPQRSTU"
    assert api.call("store.distributed_table_name", store=name, device=dev, table="T") == {"table": "dev_ABCDEFGHIJKLMNOPQRSTU_T"}
    with pytest.raises(TableNotDistributed):
        api.call("store.distributed_table_name", store=name, device=dev, table="U")
    with pytest.raises(InvalidParams):
        api.call("store.distributed_table_name", store=name, device="not a device!", table="T")


def test_composite_keys_are_refused(api: BlockingClient) -> None:
    name = unique()
    api.call("store.open", store=name)
    api.call("store.execute", store=name, sql="CREATE TABLE C (a INTEGER, b TEXT, PRIMARY KEY (a, b))")
    with pytest.raises(CompositeKeyNotSupported) as info:
        api.call("store.set_distributed_tables", store=name, tables=["C"])
    assert info.value.data["table"] == "C"
    status = [s for s in api.call("status")["stores"] if s["store"] == name][0]
    assert status["distributed_tables"] == [] and status["table_type"] is None


def test_table_type_cannot_be_switched(api: BlockingClient) -> None:
    name = unique()
    api.call("store.open", store=name)
    make_table(api, name)
    make_table(api, name, table="U")
    api.call("store.set_distributed_tables", store=name, tables=["T"])
    with pytest.raises(TableTypeLocked) as info:
        api.call("store.set_distributed_tables", store=name, tables=["U"], config={"table_type": "single_version"})
    assert info.value.data["current"] == "collaborative"
    api.call("store.set_distributed_tables", store=name, tables=["U"])  # same type is fine
    status = [s for s in api.call("status")["stores"] if s["store"] == name][0]
    assert status["distributed_tables"] == ["T", "U"]


# -- at most N stores with distributed tables per bundle ---------------------------------------------

def distribute_new_store(api: BlockingClient, bundle: str, name: str) -> None:
    api.call("store.open", store=name, bundle=bundle)
    make_table(api, name, bundle)
    api.call("store.set_distributed_tables", store=name, bundle=bundle, tables=["T"])


def test_default_limit_is_16_stores_with_distributed_tables_per_bundle(api: BlockingClient) -> None:
    bundle = unique("bundle")
    for i in range(16):
        distribute_new_store(api, bundle, f"s{i}")
    api.call("store.open", store="s16", bundle=bundle)
    make_table(api, "s16", bundle)
    with pytest.raises(TooManyStores) as info:
        api.call("store.set_distributed_tables", store="s16", bundle=bundle, tables=["T"])
    assert info.value.data == {"bundle": bundle, "limit": 16}
    # Adding tables to a store that already has some is not a new store.
    make_table(api, "s0", bundle, table="U")
    api.call("store.set_distributed_tables", store="s0", bundle=bundle, tables=["U"])


def test_lowered_limit_from_the_config_file(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    config = write_config(tmp_path, "max_stores_per_bundle = 2\n")
    d = start_daemon("limited", "--config", str(config))
    with d.client() as api:
        distribute_new_store(api, "b", "one")
        distribute_new_store(api, "b", "two")
        api.call("store.open", store="three", bundle="b")  # opening is fine: no distributed tables yet
        make_table(api, "three", "b")
        with pytest.raises(TooManyStores):
            api.call("store.set_distributed_tables", store="three", bundle="b", tables=["T"])
        distribute_new_store(api, "other", "three")  # another bundle has its own budget
        # Closing one frees a place.
        api.call("store.close", store="one", bundle="b")
        api.call("store.set_distributed_tables", store="three", bundle="b", tables=["T"])
        # Reopening a store file that has distributed tables counts too.
        with pytest.raises(TooManyStores):
            api.call("store.open", store="one", bundle="b")
        with pytest.raises(StoreNotOpen):
            api.call("store.query", store="one", bundle="b", sql="SELECT 1")


def test_the_limit_holds_under_concurrent_calls(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    import asyncio

    from p2pstore.client import Client

    d = start_daemon("racy", "--config", str(write_config(tmp_path, "max_stores_per_bundle = 2\n")))

    async def go() -> list[object]:
        async with Client(d.socket) as c:
            for i in range(4):
                await c.call("store.open", store=f"s{i}")
                await c.call("store.execute", store=f"s{i}", sql="CREATE TABLE T (id INTEGER PRIMARY KEY)")
            return await asyncio.gather(
                *(c.call("store.set_distributed_tables", store=f"s{i}", tables=["T"]) for i in range(4)), return_exceptions=True
            )

    results = asyncio.run(go())
    assert sum(isinstance(r, TooManyStores) for r in results) == 2, results
    with d.client() as c:
        assert sum(1 for s in c.call("status")["stores"] if s["distributed_tables"]) == 2
