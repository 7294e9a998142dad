"""Deletes in query syncs, and bounded tombstones / own-log with per-peer
acks (issue 10, item 9): real daemons linked over TLS on 127.0.0.1.

The compaction rules themselves are covered at store level in
tests/store/test_gc.py; here: that the daemon records what each peer
acknowledged, compacts below it, tells a peer that was away past the
horizon to resync, and that the resync brings it to the right rows without
bringing any deleted row back.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from p2pstore.store import cells
from sync_helpers import (
    SV_REF,
    Node,
    linked_daemons,  # noqa: F401  (fixture)
    setup_employee,
    stays,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

SUCCESS = 0
COLLAB = {"store": "s"}
T_CREATE = "CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)"


def setup_collab(*nodes: Node) -> dict[str, Any]:
    for node in nodes:
        node.call("store.open", **COLLAB)
        node.call("store.execute", **COLLAB, sql=T_CREATE)
        node.call("store.set_distributed_tables", **COLLAB, tables=["T"], config={"auto_sync": False})
    return COLLAB


def result(results: dict[str, dict[str, Any]], node: Node) -> dict[str, Any]:
    assert list(results) == [node.id], results
    return results[node.id]


def ok(results: dict[str, dict[str, Any]], node: Node) -> dict[str, Any]:
    r = result(results, node)
    assert r["code"] == SUCCESS, r
    return r


def collab_rows(node: Node, origin: Node) -> list[list[Any]]:
    table = node.call("store.distributed_table_name", **COLLAB, device=origin.id, table="T")["table"]
    return node.rows(COLLAB, f'SELECT id, name, n FROM "{table}" ORDER BY id')


def names(node: Node) -> list[str]:
    return [r[0] for r in node.rows(SV_REF, "SELECT NAME FROM EMPLOYEE ORDER BY NAME")]


# --------------------------------------------------------------------------
# a) a query sync carries deletes


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_query_sync_carries_deletes_of_matching_rows_collaborative(linked_daemons, mode: str) -> None:
    a, b = linked_daemons(2)
    setup_collab(a, b)
    for i, n in ((1, 10), (2, 40), (3, 50), (4, 60)):
        a.call("store.insert", **COLLAB, table="T", values={"id": i, "name": f"r{i}", "n": n})
    where = [["n", ">", 30]]

    def query_sync() -> dict[str, Any]:
        if mode == "push":
            return ok(a.sync("push", COLLAB, [b], table="T", where=where), b)
        return ok(b.sync("pull", COLLAB, [a], table="T", where=where), a)

    query_sync()
    assert collab_rows(b, a) == [[2, "r2", 40], [3, "r3", 50], [4, "r4", 60]]
    # A deletes a matching row, and one that became non-matching first.
    a.call("store.execute", **COLLAB, sql="DELETE FROM T WHERE id = 2")
    a.call("store.execute", **COLLAB, sql="UPDATE T SET n = 5 WHERE id = 3")
    a.call("store.execute", **COLLAB, sql="DELETE FROM T WHERE id = 3")
    query_sync()
    assert collab_rows(b, a) == [[4, "r4", 60]]


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_query_sync_carries_deletes_of_matching_rows_single_version(linked_daemons, mode: str) -> None:
    a, b = linked_daemons(2, schema=True)
    setup_employee(a)
    setup_employee(b)
    for name, age in (("kid", 10), ("adult", 40), ("elder", 80), ("sage", 70)):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": age})
    where = [["AGE", ">", 30]]

    def query_sync() -> dict[str, Any]:
        if mode == "push":
            return ok(a.sync("push", SV_REF, [b], table="EMPLOYEE", where=where), b)
        return ok(b.sync("pull", SV_REF, [a], table="EMPLOYEE", where=where), a)

    query_sync()
    assert names(b) == ["adult", "elder", "sage"]
    a.call("store.execute", **SV_REF, sql="DELETE FROM EMPLOYEE WHERE NAME = 'adult'")
    a.call("store.execute", **SV_REF, sql="UPDATE EMPLOYEE SET AGE = 5 WHERE NAME = 'elder'")
    a.call("store.execute", **SV_REF, sql="DELETE FROM EMPLOYEE WHERE NAME = 'elder'")
    query_sync()
    assert names(b) == ["sage"]
    # Nothing comes back with a full sync either way.
    ok(a.sync("push", SV_REF, [b]), b)
    ok(b.sync("push", SV_REF, [a]), a)
    assert names(a) == ["kid", "sage"] and names(b) == ["kid", "sage"]


# --------------------------------------------------------------------------
# b) tombstones are forgotten once acked; a peer away past the horizon is resynced

RESYNC_REQUIRED = 14


def internal_count(node: Node, table: str) -> int:
    """Rows of an internal table, read from the store file (another reader)."""
    path = node.proc.data_dir / "stores" / SV_REF["bundle"] / f"{SV_REF['store']}.db"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        if table == "_p2p_clocks":
            cells.clocks_view(conn)  # a TEMP view, made for the asking
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def gc_config(short_tmp: Path, horizon_s: float) -> list[str]:
    path = short_tmp / f"gc-{horizon_s}.toml"
    path.write_text(f"tombstone_horizon_days = {horizon_s / 86400!r}\ncompact_interval_s = 0.2\n")
    return ["--config", str(path)]


def test_tombs_are_forgotten_and_a_peer_back_after_the_horizon_is_resynced(linked_daemons, short_tmp: Path) -> None:
    a, b, c = linked_daemons(3, schema=True, flags=gc_config(short_tmp, 4.0))
    for node in (a, b, c):
        setup_employee(node)
    for i in range(8):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": f"e{i}", "AGE": 20 + i})
    ok(a.sync("push", SV_REF, [c]), c)
    ok(a.sync("push", SV_REF, [b]), b)
    assert names(c) == names(b) == names(a)
    c.stop()
    a.call("store.execute", **SV_REF, sql="DELETE FROM EMPLOYEE WHERE AGE < 24")
    assert internal_count(a, "_p2p_tombs") == 4
    ok(a.sync("push", SV_REF, [b]), b)
    # B acked the deletes; once C's last ack is older than the horizon, A forgets them.
    wait_until(lambda: internal_count(a, "_p2p_tombs") == 0, 30, "A forgets the acked tombs")
    assert internal_count(a, "_p2p_clocks") == 4 * 4  # four rows left, four sync columns each
    c.restart()
    c.call("store.open", **SV_REF)
    wait_until(lambda: c.sees_online(a) and a.sees_online(c), 15, "C and A see each other again")
    # C would bring the deleted rows back: A refuses its changes until C is resynced.
    refused = result(c.sync("push", SV_REF, [a]), a)
    assert refused["code"] == RESYNC_REQUIRED, refused
    assert result(a.sync("push", SV_REF, [c], table="EMPLOYEE", where=[["AGE", ">", 1]]), c)["code"] == RESYNC_REQUIRED
    ok(a.sync("push", SV_REF, [c]), c)  # the resync
    assert names(c) == names(a) == ["e4", "e5", "e6", "e7"]
    ok(c.sync("push", SV_REF, [a]), a)
    ok(c.sync("push", SV_REF, [b]), b)
    ok(b.sync("push", SV_REF, [a]), a)
    assert names(a) == names(b) == names(c) == ["e4", "e5", "e6", "e7"]


def test_an_untrusted_peer_no_longer_holds_gc_back(linked_daemons, short_tmp: Path) -> None:
    a, b, c = linked_daemons(3, schema=True, flags=gc_config(short_tmp, 30 * 86400.0))
    for node in (a, b, c):
        setup_employee(node)
    for i in range(4):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": f"e{i}", "AGE": i})
    ok(a.sync("push", SV_REF, [b]), b)
    ok(a.sync("push", SV_REF, [c]), c)
    c.stop()
    a.call("store.execute", **SV_REF, sql="DELETE FROM EMPLOYEE WHERE AGE < 2")
    ok(a.sync("push", SV_REF, [b]), b)
    stays(lambda: internal_count(a, "_p2p_tombs") == 2, 1.0, "C, trusted, holds the tombs back")
    assert internal_count(a, "_p2p_tombs") == 2
    a.call("devices.untrust", device_id=c.id)
    wait_until(lambda: internal_count(a, "_p2p_tombs") == 0, 30, "A forgets the tombs C held back")
