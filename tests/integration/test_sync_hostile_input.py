"""Sync end to end with hostile or broken input (issue 10, items 1 and 2):
real daemons linked over TLS on 127.0.0.1, the ``sqlite3`` shell as an
outside writer, and a trusted peer (a PeerManager in the test process,
tests/net/peer_agent.py) that sends what a broken or hostile device would.

- TEXT that is not valid UTF-8, written by another program, syncs byte-exact
  (same bytes, still TEXT) in both modes; every other row syncs; a row keyed
  by such text stays behind alone; the API answers queries of it.
- A peer's change with a clock near the end of the 64-bit range goes to the
  sync-failure log; the rest of its batch applies; the receiver's writes keep
  working (also after a restart) and nothing of it reaches the next peer.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from p2ps_helpers import LOOPBACK, DaemonProcess
from sync_helpers import (
    SV_REF,
    Node,
    link,
    linked_daemons,  # noqa: F401  (fixture)
    setup_employee,
    sqlite3_shell,
    wait_linked,
    wait_until,
)

from p2pstore.clock import HybridClock
from p2pstore.protocol.messages import SyncAck, SyncBatch, SyncEnd, SyncOpen, SyncReady, TableOffer, pack_values
from p2pstore.store.changes import Cell, OutBatch, RowChange, batch_to_plain

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "net"))
from peer_agent import Device, eventually  # noqa: E402

pytestmark = pytest.mark.timeout(180)

SUCCESS = 0
COLLAB = {"store": "s"}
T_CREATE = "CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)"
BAD = "CAST(X'41FF42' AS TEXT)"  # 'A', a byte that is not UTF-8, 'B'
HOSTILE = (1 << 63) - 6


def ok(results: dict[str, dict[str, Any]], node: Node) -> dict[str, Any]:
    assert list(results) == [node.id], results
    r = results[node.id]
    assert r["code"] == SUCCESS, r
    return r


def setup(kind: str, *nodes: Node) -> tuple[dict[str, Any], str]:
    """The store and table of ``kind`` on every node; returns (store ref, table)."""
    for node in nodes:
        if kind == "single_version":
            setup_employee(node)
        else:
            node.call("store.open", **COLLAB)
            node.call("store.execute", **COLLAB, sql=T_CREATE)
            node.call("store.set_distributed_tables", **COLLAB, tables=["T"], config={"auto_sync": False})
    return (SV_REF, "EMPLOYEE") if kind == "single_version" else (COLLAB, "T")


@pytest.mark.parametrize("kind", ["collaborative", "single_version"])
def test_invalid_utf8_text_from_an_outside_writer_syncs_byte_identical(linked_daemons, kind: str) -> None:
    a, b = linked_daemons(2, schema=True)
    ref, table = setup(kind, a, b)
    path = a.call("store.open", **ref)["path"]
    if kind == "single_version":
        sql = (f"INSERT INTO EMPLOYEE (NAME, AGE, CODES) VALUES ('good', 1, 'fine'), ('bad', 2, {BAD}), ('é', 3, 'ü');"
               f"INSERT INTO EMPLOYEE (NAME, AGE) VALUES ({BAD}, 4)")  # keyed by bad text: stays behind
        where, col, expected = "NAME = 'bad'", "CODES", 3
        here = "EMPLOYEE"
        good = "SELECT NAME, AGE, CODES FROM {t} WHERE NAME IN ('good', 'é') ORDER BY NAME"
    else:
        sql = f"INSERT INTO T (id, name, n) VALUES (1, 'good', 1), (2, {BAD}, 2), (3, 'é', 3)"
        where, col, expected = "id = 2", "name", 3
        here = b.call("store.distributed_table_name", **COLLAB, device=a.id, table="T")["table"]
        good = "SELECT id, name, n FROM \"{t}\" WHERE id != 2 ORDER BY id"
    shell = sqlite3_shell(path, sql)
    assert shell.returncode == 0, shell.stderr

    r = ok(a.sync("push", ref, [b]), b)
    assert (r["applied"], r["failed"]) == (expected, 0), r
    # The bad value arrived with the same bytes and type.
    assert b.rows(ref, f'SELECT typeof({col}), hex({col}) FROM "{here}" WHERE {where}') == [["text", "41FF42"]]
    assert b.rows(ref, good.format(t=here)) == a.rows(ref, good.format(t=table))
    # The API answers a query of it on both sides (each bad byte as U+FFFD), never INTERNAL_ERROR.
    for node, t in ((a, table), (b, here)):
        assert node.rows(ref, f'SELECT {col} FROM "{t}" WHERE {where}') == [["A\ufffdB"]]
    # So does a remote query of A's copy (its pages carry the bytes; the API shows U+FFFD).
    rows = b.call("store.remote_query", **ref, device=a.id, table=table, columns=[col])["rows"]
    assert ["A\ufffdB"] in rows and len(rows) == (4 if kind == "single_version" else 3)
    # Syncs go on: a pull answers SUCCESS, a later change of the value travels too.
    ok(b.sync("pull", ref, [a]), a)
    shell = sqlite3_shell(path, f"UPDATE {table} SET {col} = CAST(X'FE00FF' AS TEXT) WHERE {where}")
    assert shell.returncode == 0, shell.stderr
    ok(a.sync("push", ref, [b]), b)
    assert b.rows(ref, f'SELECT typeof({col}), hex({col}) FROM "{here}" WHERE {where}') == [["text", "FE00FF"]]
    if kind == "single_version":
        assert b.rows(ref, "SELECT count(*) FROM EMPLOYEE") == [[3]]  # not the row keyed by bad text
        ok(b.sync("push", ref, [a]), a)  # relayed back to A: nothing fails


def hostile_batch(origin: str, now: int) -> bytes:
    """One sync_batch payload: a good row and a row whose clock is near the end of the range."""
    def row(name: str, age: int, hlc: int, seq: int) -> RowChange:
        return RowChange("EMPLOYEE", "NAME", name, seq, (Cell("NAME", name, hlc, origin), Cell("AGE", age, hlc, origin)))

    batch = OutBatch("single_version", 0, 2, (row("good", 1, now, 1), row("evil", 66, HOSTILE, 2)), False, True, "evilstream")
    return pack_values(batch_to_plain(batch))


async def push_as_peer(evil: Device, target: Node, payload: bytes) -> SyncAck:
    """What a trusted peer's push is on the wire: open, wait for ready, one batch, end."""
    await evil.manager.start()
    try:
        await evil.manager.connect("127.0.0.1", target.port, target.id)
        offer = (TableOffer("EMPLOYEE", 0, ("NAME", "AGE", "SALARY", "CODES"), "NAME"),)
        await evil.manager.send(target.id, SyncOpen(7, SV_REF["bundle"], SV_REF["store"], "push", None, None, None, offer))

        def received(kind: type) -> Any:
            return next((m for _, m in evil.messages if isinstance(m, kind) and m.req == 7), None)

        await eventually(lambda: received(SyncReady) is not None or received(SyncEnd) is not None, 30, "sync_ready")
        assert received(SyncEnd) is None, received(SyncEnd)
        await evil.manager.send(target.id, SyncBatch(7, payload))
        await eventually(lambda: received(SyncAck) is not None or received(SyncEnd) is not None, 30, "sync_ack")
        assert received(SyncEnd) is None, received(SyncEnd)
        await evil.manager.send(target.id, SyncEnd(7, SUCCESS, ""))
        return received(SyncAck)
    finally:
        await evil.manager.stop()


def test_a_hostile_peer_clock_goes_to_the_failure_log_and_writes_keep_working(linked_daemons, short_tmp: Path) -> None:
    a, b = linked_daemons(2, schema=True)
    for node in (a, b):
        setup_employee(node)
    evil = Device(short_tmp / "evil", "evil")
    evil.trust.trust(a.id)
    a.call("devices.trust", device_id=evil.id, name="evil")

    ack = asyncio.run(push_as_peer(evil, a, hostile_batch(evil.id, HybridClock().now())))
    assert (ack.applied, ack.failed) == (1, 1), ack

    (failure,) = a.call("store.sync_failures", **SV_REF)
    assert failure["origin"] == evil.id and failure["table"] == "EMPLOYEE"
    assert failure["reason"].startswith("clock_ahead: EMPLOYEE: clock 6429-") and "max offset 300000 ms" in failure["reason"]
    assert a.rows(SV_REF, "SELECT NAME, AGE FROM EMPLOYEE ORDER BY NAME") == [["good", 1]]
    # Writes keep working: far more than the 5 stamps the hostile clock left in the range.
    for i in range(20):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": f"a{i}", "AGE": i})
    a.call("store.execute", **SV_REF, sql="UPDATE EMPLOYEE SET AGE = AGE + 1")
    # Nothing of it spreads: B gets every row but the hostile one, and B's writes work.
    r = ok(a.sync("push", SV_REF, [b]), b)
    assert r["failed"] == 0, r
    assert b.rows(SV_REF, "SELECT count(*) FROM EMPLOYEE WHERE NAME = 'evil'") == [[0]]
    assert b.rows(SV_REF, "SELECT count(*) FROM EMPLOYEE") == [[21]]
    b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "b0", "AGE": 1})
    ok(b.sync("push", SV_REF, [a]), a)
    # And after a restart.
    a.restart()
    a.call("store.open", **SV_REF)
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "after", "AGE": 1})
    wait_until(lambda: a.sees_online(b), 20, "a sees b again")
    r = ok(a.sync("push", SV_REF, [b]), b)
    assert r["failed"] == 0, r
    assert b.rows(SV_REF, "SELECT AGE FROM EMPLOYEE WHERE NAME = 'after'") == [[1]]


#: A daemon with a bug planted where a sync reads its changes (store ``buggy``
#: only): what any unexpected exception in a sync looks like to the engine.
BUGGY_BOOT = """
import runpy, sys
from p2pstore.store.database import Store
real = Store.read_changes
async def read_changes(self, *args, **kwargs):
    if self.name == "buggy":
        raise RuntimeError("planted bug")
    return await real(self, *args, **kwargs)
Store.read_changes = read_changes
sys.argv = ["p2pstore", *sys.argv[1:]]
runpy.run_module("p2pstore", run_name="__main__")
"""


class BuggyDaemon(DaemonProcess):
    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-c", BUGGY_BOOT, *super().argv[3:]]


def test_an_unexpected_error_in_a_sync_is_a_fail_result_and_a_logged_traceback(daemon_factory, short_tmp: Path) -> None:
    a = Node(BuggyDaemon(short_tmp, "a", ["--no-discovery", *LOOPBACK]).start())
    try:
        b = Node(daemon_factory("b", *LOOPBACK, "--peer", f"127.0.0.1:{a.port}"))
        link(a, b)
        wait_linked([a, b])
        buggy, fine = {"store": "buggy"}, {"store": "fine"}
        for node in (a, b):
            for ref in (buggy, fine):
                node.call("store.open", **ref)
                node.call("store.execute", **ref, sql=T_CREATE)
                node.call("store.set_distributed_tables", **ref, tables=["T"], config={"auto_sync": ref is buggy})
        a.call("store.insert", **buggy, table="T", values={"id": 1, "name": "x", "n": 1})  # auto-sync runs into it too
        a.call("store.insert", **fine, table="T", values={"id": 1, "name": "x", "n": 1})

        results = a.sync("push", buggy, [b])  # not INTERNAL_ERROR: a result per device
        assert results[b.id]["code"] == 1, results
        assert "internal error: RuntimeError: planted bug" in results[b.id]["message"]
        log = wait_until(lambda: (text := a.proc.log()).count("planted bug") >= 2 and text, 20, "the bug in a's log")
        assert "failed unexpectedly" in log and "Traceback" in log and "ERROR" in log
        # The daemon and every other sync go on.
        ok(a.sync("push", fine, [b]), b)
        assert b.rows(fine, f'SELECT name FROM "{b.call("store.distributed_table_name", **fine, device=a.id, table="T")["table"]}"') == [["x"]]
        assert b.sync("pull", buggy, [a])[a.id]["code"] == 1  # served by a: ends as FAIL too, a stays up
        ok(a.sync("push", fine, [b]), b)
    finally:
        a.stop()
