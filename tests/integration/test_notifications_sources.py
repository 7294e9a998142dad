"""Notifications by source of change (issue 6), on real daemons.

tests/integration/test_api_notifications.py covers ``local_details`` on
collaborative stores (API writes, the sqlite3 shell, a second Python process)
and the subscription rules; this module covers what it does not:

- each source of change and the notification it gives: API and outside
  writes on a single-version store (``local_details``), rows written by a
  sync (``remote`` and ``remote_details`` with the origin, collaborative and
  single-version, push and pull) — and that each source reaches only its
  own kind of subscriber;
- ``deviceChange`` on a clean stop and a restart; ``syncProgress`` to the
  caller of ``store.sync`` only;
- the default subscription limit (8) and the limit error on the wire;
- a subscriber that never reads: bounded daemon memory, writers not slowed,
  and ``overflow`` once it reads;
- coalescing of 10k-row bursts (pipelined API writes, an outside writer);
- ``p2pstore watch --local`` / ``--remote``.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from p2ps_helpers import REPO, DaemonProcess, RawConnection, error_name, unique, write_config
from sync_helpers import (
    SV_REF,
    Node,
    collect_notifications,
    linked_daemons,  # noqa: F401  (fixture)
    setup_employee,
    sqlite3_shell,
    wait_until,
)

from p2pstore.api.subscriptions import Outbox, Subscriptions, drain_outbox
from p2pstore.client import BlockingClient
from p2pstore.config import Config
from p2pstore.errors import TooManySubscriptions

pytestmark = pytest.mark.timeout(120)

COLLAB = {"store": "notes"}
T_CREATE = "CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)"
SILENCE_S = 0.4


def setup_collab(*nodes: Node, ref: dict[str, Any] = COLLAB) -> dict[str, Any]:
    for node in nodes:
        node.call("store.open", **ref)
        node.call("store.execute", **ref, sql=T_CREATE)
        node.call("store.set_distributed_tables", **ref, tables=["T"])
    return ref


def ok(results: dict[str, dict[str, Any]], node: Node) -> dict[str, Any]:
    r = results[node.id]
    assert r["code"] == 0, results
    return r


def data_changes(got: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [n for n in got if n["method"] == "dataChange"]


def keys_of(notes: list[dict[str, Any]], kind: str, table: str | None = None, origin: str | None = None) -> list[Any]:
    return [k for n in notes for c in n["params"].get("changes", [])
            if (table is None or c["table"] == table) and (origin is None or c.get("origin") == origin)
            for k in c[kind]]


def until_keys(kind: str, expected: set[Any]) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda got: set(keys_of(data_changes(got), kind)) >= expected


def silent(client: BlockingClient, seconds: float = SILENCE_S) -> list[dict[str, Any]]:
    """Whatever arrives within ``seconds`` (expected: nothing)."""
    return collect_notifications(client, lambda got: False, seconds)


# ====================================================================== 1. sources of change


def test_single_version_local_details_from_api_and_sqlite3_but_not_from_sync(linked_daemons) -> None:
    """``local_details`` on a single-version store: API writes and an outside sqlite3
    write are announced with the table's local keys; rows a sync writes are not
    (they go to ``remote_details``, with the origin)."""
    a, b = linked_daemons(2, schema=True)
    setup_employee(a)
    setup_employee(b)
    local, details = b.client(), b.client()
    local.call("store.subscribe", **SV_REF, type="local_details")
    details.call("store.subscribe", **SV_REF, type="remote_details")

    rowid = b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Ann", "AGE": 30})["rowid"]
    got = collect_notifications(local, until_keys("inserted", {rowid}), 3.0)
    assert keys_of(data_changes(got), "inserted", "EMPLOYEE") == [rowid], got
    assert all("origin" not in c for n in data_changes(got) for c in n["params"]["changes"])

    path = b.call("store.open", **SV_REF)["path"]
    shell = sqlite3_shell(path, "UPDATE EMPLOYEE SET AGE = 31 WHERE NAME = 'Ann'; "
                                "INSERT INTO EMPLOYEE(NAME, AGE) VALUES ('Bob', 40)")
    assert shell.returncode == 0, shell.stderr
    bob = b.rows(SV_REF, "SELECT ID FROM EMPLOYEE WHERE NAME = 'Bob'")[0][0]
    got = collect_notifications(local, lambda g: rowid in keys_of(data_changes(g), "updated")
                                and bob in keys_of(data_changes(g), "inserted"), 3.0)
    assert set(keys_of(data_changes(got), "updated")) == {rowid}, got
    assert set(keys_of(data_changes(got), "inserted")) == {bob}, got
    assert not silent(details), "local writes must not reach remote_details subscribers"

    # A sync writes rows on B: remote_details (origin A, B's local key), no local_details.
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Cat", "AGE": 50})
    ok(a.sync("push", SV_REF, [b]), b)
    cat = b.rows(SV_REF, "SELECT ID FROM EMPLOYEE WHERE NAME = 'Cat'")[0][0]
    got = collect_notifications(details, until_keys("inserted", {cat}), 3.0)
    assert keys_of(data_changes(got), "inserted", "EMPLOYEE", origin=a.id) == [cat], got
    assert not silent(local), "rows written by a sync must not be announced as local changes"


def test_remote_and_remote_details_after_collaborative_push_and_pull(linked_daemons) -> None:
    a, b = linked_daemons(2)
    setup_collab(a, b)
    remote, details, local = b.client(), b.client(), b.client()
    sub_remote = remote.call("store.subscribe", **COLLAB, type="remote")["subscription"]
    sub_details = details.call("store.subscribe", **COLLAB, type="remote_details")["subscription"]
    local.call("store.subscribe", **COLLAB, type="local_details")

    for i in (1, 2, 3):
        a.call("store.insert", **COLLAB, table="T", values={"id": i, "name": f"a{i}", "n": i})
    ok(a.sync("push", COLLAB, [b]), b)

    got = collect_notifications(remote, lambda g: bool(data_changes(g)), 3.0)
    note = data_changes(got)[0]
    assert note["params"] == {"subscription": sub_remote, "store": COLLAB["store"], "bundle": "default", "devices": [a.id]}
    got = collect_notifications(details, until_keys("inserted", {1, 2, 3}), 3.0)
    notes = data_changes(got)
    assert all(n["params"]["subscription"] == sub_details and n["params"]["store"] == COLLAB["store"] for n in notes)
    changes = [c for n in notes for c in n["params"]["changes"]]
    # Reported under the logical table name, with the origin; the rows are in A's device table.
    assert {(c["table"], c["type"], c["origin"]) for c in changes} == {("T", "data", a.id)}, changes
    assert sorted(keys_of(notes, "inserted")) == [1, 2, 3]
    dev_a = b.call("store.distributed_table_name", **COLLAB, device=a.id, table="T")["table"]
    assert b.rows(COLLAB, f'SELECT id FROM "{dev_a}" ORDER BY id') == [[1], [2], [3]]

    # Updates and deletes, pulled by B this time.
    a.call("store.update", **COLLAB, values={"n": 20}, predicates={"table": "T", "where": [["id", "=", 2]]})
    a.call("store.delete", **COLLAB, predicates={"table": "T", "where": [["id", "=", 3]]})
    ok(b.sync("pull", COLLAB, [a]), a)
    got = collect_notifications(details, lambda g: keys_of(data_changes(g), "updated") and keys_of(data_changes(g), "deleted"), 3.0)
    notes = data_changes(got)
    assert keys_of(notes, "updated", "T", a.id) == [2] and keys_of(notes, "deleted", "T", a.id) == [3], got
    assert keys_of(notes, "inserted") == []
    got = collect_notifications(remote, lambda g: bool(data_changes(g)), 3.0)
    assert {d for n in data_changes(got) for d in n["params"]["devices"]} == {a.id}

    # None of it is a local change on B, and an empty sync announces nothing.
    assert not silent(local)
    ok(a.sync("push", COLLAB, [b]), b)
    assert not silent(remote, 0.3) and not silent(details, 0.3)


def test_remote_and_remote_details_after_single_version_sync(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    setup_employee(a)
    setup_employee(b)
    remote, details = b.client(), b.client()
    remote.call("store.subscribe", **SV_REF, type="remote")
    details.call("store.subscribe", **SV_REF, type="remote_details")
    # B's own row: the merge updates it in place (same conflict column) and keeps B's key.
    b_key = b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Same", "AGE": 1})["rowid"]
    for name in ("Eve", "Fay"):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": 20})
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Same", "AGE": 99})
    ok(a.sync("push", SV_REF, [b]), b)

    keys = dict(b.rows(SV_REF, "SELECT NAME, ID FROM EMPLOYEE"))
    got = collect_notifications(details, until_keys("inserted", {keys["Eve"], keys["Fay"]}), 3.0)
    got += collect_notifications(details, lambda g: bool(data_changes(g)), 0.3)  # anything in a later window
    notes = data_changes(got)
    changes = [c for n in notes for c in n["params"]["changes"]]
    assert {(c["table"], c["origin"]) for c in changes} == {("EMPLOYEE", a.id)}, changes
    inserted, updated = keys_of(notes, "inserted"), keys_of(notes, "updated")
    assert sorted(inserted) == sorted([keys["Eve"], keys["Fay"]]), got   # B's local keys, not A's
    # "Same" (same conflict column): A's write is the later one, so it wins, and B's
    # row is updated in place under B's key.
    assert keys["Same"] == b_key
    assert b.rows(SV_REF, "SELECT AGE FROM EMPLOYEE WHERE NAME = 'Same'") == [[99]]
    assert updated == [b_key], got
    got = collect_notifications(remote, lambda g: bool(data_changes(g)), 3.0)
    assert data_changes(got)[0]["params"]["devices"] == [a.id]

    a.call("store.delete", **SV_REF, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Eve"]]})
    ok(b.sync("pull", SV_REF, [a]), a)
    got = collect_notifications(details, until_keys("deleted", {keys["Eve"]}), 3.0)
    assert keys_of(data_changes(got), "deleted", "EMPLOYEE", a.id) == [keys["Eve"]], got


def test_device_change_on_stop_and_restart(linked_daemons) -> None:
    a, b = linked_daemons(2)
    watcher = a.client()
    sub = watcher.call("devices.subscribe")["subscription"]
    level = a.view(b)["security_level"]
    b.stop()
    got = collect_notifications(watcher, lambda g: any(n["method"] == "deviceChange" for n in g), 20.0)
    changes = [n["params"] for n in got if n["method"] == "deviceChange"]
    assert changes and changes[0]["device_id"] == b.id and changes[0]["online"] is False, got
    assert changes[0]["subscription"] == sub and changes[0]["trusted"] is True
    assert changes[0]["name"] == b.name and changes[0]["security_level"] == level
    assert not a.sees_online(b)

    b.restart()
    got = collect_notifications(watcher, lambda g: any(n["method"] == "deviceChange" and n["params"]["online"] for n in g), 15.0)
    online = [n["params"] for n in got if n["method"] == "deviceChange" and n["params"]["online"]]
    assert online and online[0]["device_id"] == b.id and online[0]["trusted"] is True, got
    wait_until(lambda: a.sees_online(b), 5.0, "A sees B online again")


def test_sync_progress_goes_to_the_caller_only(linked_daemons) -> None:
    a, b = linked_daemons(2)
    setup_collab(a, b)
    bystander = a.client()
    bystander.call("store.subscribe", **COLLAB, type="local_details")
    for i in range(5):
        a.call("store.insert", **COLLAB, table="T", values={"id": i, "name": "x", "n": i})
    collect_notifications(bystander, lambda g: len(keys_of(data_changes(g), "inserted")) >= 5, 3.0)

    caller = a.client()
    assert caller.call("store.sync", **COLLAB, mode="push", predicates={"devices": [b.id]})["results"][0]["code"] == 0
    got = collect_notifications(caller, lambda g: any(n["params"].get("schedule") == "finish" for n in g), 3.0)
    progress = [n["params"] for n in got if n["method"] == "syncProgress"]
    schedules = [p["schedule"] for p in progress]
    assert schedules[0] == "begin" and schedules[-1] == "finish" and set(schedules[1:-1]) <= {"in_progress"}, schedules
    assert "in_progress" in schedules
    assert all(p["store"] == COLLAB["store"] and p["bundle"] == "default" for p in progress)
    assert progress[-1]["code"] == 0
    upload = [p["details"]["T"]["upload"] for p in progress if "T" in p["details"]]
    assert upload and upload[-1]["total"] == 5 and upload[-1]["successful"] == 5 and upload[-1]["failed"] == 0, progress
    assert upload[-1]["remained"] == 0
    assert not [n for n in silent(bystander) if n["method"] == "syncProgress"]

    # Pull: download details; a sync to an offline device ends with its code.
    b.call("store.insert", **COLLAB, table="T", values={"id": 1, "name": "b", "n": 1})
    caller.call("store.sync", **COLLAB, mode="pull", predicates={"devices": [b.id]})
    got = collect_notifications(caller, lambda g: any(n["params"].get("schedule") == "finish" for n in g), 3.0)
    progress = [n["params"] for n in got if n["method"] == "syncProgress"]
    assert any(p["details"].get("T", {}).get("download", {}).get("total") == 1 for p in progress), progress
    b.stop()
    wait_until(lambda: not a.sees_online(b), 20.0, "A sees B offline")
    result = caller.call("store.sync", **COLLAB, mode="push", predicates={"devices": [b.id]})["results"]
    assert result[0]["code"] == 2, result
    got = collect_notifications(caller, lambda g: any(n["params"].get("schedule") == "finish" for n in g), 3.0)
    assert [n["params"]["code"] for n in got if n["params"].get("schedule") == "finish"] == [2], got


# ====================================================================== 2. subscription limits


def test_default_limit_is_eight_per_store_over_all_connections() -> None:
    assert Config().max_subscriptions == 8
    subs = Subscriptions()
    assert subs.max_per_store == 8
    box, other_box = object(), object()
    store, other_store = ("default", "s"), ("default", "t")
    ids = [subs.subscribe(box, store, f"kind{i}") for i in range(8)]  # type: ignore[arg-type]
    assert len(set(ids)) == 8
    with pytest.raises(TooManySubscriptions) as err:
        subs.subscribe(box, store, "kind8")  # type: ignore[arg-type]
    assert err.value.data == {"limit": 8} and "limit 8" in err.value.message
    assert subs.subscribe(box, store, "kind3") == ids[3]  # a duplicate: the same one, no error  # type: ignore[arg-type]
    subs.subscribe(box, other_store, "kind8")  # another store      # type: ignore[arg-type]
    with pytest.raises(TooManySubscriptions):
        subs.subscribe(other_box, store, "kind8")  # another connection: the same budget  # type: ignore[arg-type]
    for i in range(20):  # device events are not a store's subscriptions
        subs.subscribe(box, None, f"devices{i}")  # type: ignore[arg-type]


def test_default_daemon_takes_every_kind_and_duplicates(shared_daemon: DaemonProcess) -> None:
    name = unique("lim")
    with shared_daemon.client() as c:
        c.call("store.open", store=name)
        subs = [c.call("store.subscribe", store=name, type=t)["subscription"] for t in ("remote", "local_details", "remote_details")]
        assert len(set(subs)) == 3
        for _ in range(10):  # duplicates are harmless and never count
            assert [c.call("store.subscribe", store=name, type=t)["subscription"]
                    for t in ("remote", "local_details", "remote_details")] == subs
        assert c.call("devices.subscribe")["subscription"] == c.call("devices.subscribe")["subscription"]


def test_limit_error_on_the_wire_keeps_the_connection(start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
                                                      raw_factory: Callable[[Path], RawConnection]) -> None:
    d = start_daemon("lim1", "--config", str(write_config(tmp_path, "max_subscriptions = 1\n")))
    raw = raw_factory(d.socket)
    assert "result" in raw.call("store.open", rid=1, store="s")
    assert "result" in raw.call("store.subscribe", rid=2, store="s", type="local_details")
    resp = raw.call("store.subscribe", rid=3, store="s", type="remote")
    assert error_name(resp) == "TOO_MANY_SUBSCRIPTIONS" and resp["error"]["code"] == TooManySubscriptions.code
    assert "limit 1" in resp["error"]["message"] and resp["error"]["data"]["limit"] == 1
    assert "result" in raw.call("devices.subscribe", rid=4)  # not a store subscription
    assert "result" in raw.call("store.subscribe", rid=5, store="s", type="local_details")  # duplicate: fine
    assert raw.call("device.info", rid=6)["result"]["device_id"]


# ====================================================================== 3. a subscriber that never reads


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def timed_writes(c: BlockingClient, store: str, start: int, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(start, start + n):
        c.call("store.insert", store=store, table="T", values={"id": i, "name": "single"})
    return time.perf_counter() - t0


def bulk_insert(c: BlockingClient, store: str, start: int, rows: int, per_statement: int = 1000) -> None:
    for base in range(start, start + rows, per_statement):
        values = ",".join(f"({i},'bulk row {i}')" for i in range(base, min(base + per_statement, start + rows)))
        c.call("store.execute", store=store, sql=f"INSERT INTO T(id, name) VALUES {values}")


RSS_LIMIT_KB = 150 * 1024
RSS_GROWTH_KB = 50 * 1024


class GatedWriter:
    """A client socket that takes one line per ``release()``."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.gate = asyncio.Semaphore(0)

    def write(self, data: bytes) -> None:
        self.lines.append(json.loads(data))

    async def drain(self) -> None:
        await self.gate.acquire()

    def methods(self, since: int = 0) -> list[str]:
        return [m["method"] for m in self.lines[since:]]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_drop_after_the_overflow_was_delivered_is_announced_again() -> None:
    """A slow (not stuck) client: its queue never empties completely. A
    notification dropped after it has already received the ``overflow`` must
    be followed by another ``overflow``, or the client (which re-read when it
    saw the first) never learns that this later change was lost."""
    box, w = Outbox(queue_limit=2), GatedWriter()
    drainer = asyncio.create_task(drain_outbox(box, w))  # type: ignore[arg-type]
    try:
        await settle()
        for n in "abc":           # c is dropped: queue [a, b, overflow]
            box.notify("dataChange", {"n": n})
        await settle()            # a written; the client is slow
        box.notify("dataChange", {"n": "d"})
        w.gate.release()
        await settle()            # b written
        box.notify("dataChange", {"n": "e"})
        w.gate.release()
        await settle()            # the overflow written: the client re-reads now
        assert w.methods() == ["dataChange", "dataChange", "overflow"]
        delivered = len(w.lines)
        box.notify("dataChange", {"n": "f"})  # the queue (d, e) is full again: f is dropped
        assert box.pending_notifications == 2
        for _ in range(10):
            w.gate.release()
        await settle()
        assert [m["params"].get("n") for m in w.lines[delivered:] if m["method"] == "dataChange"] == ["d", "e"]
        assert "overflow" in w.methods(delivered), f"f was dropped silently: {w.methods()}"
    finally:
        box.close()
        for _ in range(10):
            w.gate.release()
        await asyncio.wait_for(drainer, 5)


def test_the_outbox_is_bounded_in_bytes_too() -> None:
    box = Outbox(queue_limit=1000, byte_limit=10_000)
    big = {"changes": [{"table": "T", "inserted": ["k" * 7000]}]}
    box.notify("dataChange", big)      # alone: always fits, even over the byte limit
    box.notify("dataChange", {"n": 1})  # small, fits beside it? 7 kB + small < 10 kB: yes
    box.notify("dataChange", big)      # would pass 10 kB: dropped
    box.notify("dataChange", {"n": 2})  # fits: queued after the overflow
    items = []
    while not box.queue.empty():
        entry = box.queue.get_nowait()
        assert entry is not None
        items.append(json.loads(entry.lstrip(b"\x00")))
    assert [m["method"] for m in items] == ["dataChange", "dataChange", "overflow", "dataChange"]
    assert items[1]["params"] == {"n": 1} and items[3]["params"] == {"n": 2}
    assert box.pending_notifications == 3 and 7000 < box.pending_bytes < 10_000


def test_a_subscriber_that_never_reads(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    d = start_daemon("stuck", "--config", str(write_config(tmp_path, "notification_queue = 20\n")))
    pid = d.proc.pid
    store = "s"
    with d.client() as writer:
        writer.call("store.open", store=store)
        writer.call("store.execute", store=store, sql="CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT)")
        writer.call("store.set_distributed_tables", store=store, tables=["T"])
        # Warm up (SQLite cache, code paths), then the baseline: no subscriber at all.
        bulk_insert(writer, store, 1_000_000, 5_000)
        timed_writes(writer, store, 2_000_000, 200)
        baseline = timed_writes(writer, store, 3_000_000, 500)
        rss_before = rss_kb(pid)

        # The stuck subscriber: a small receive buffer, subscribes, never reads again.
        raw = RawConnection(d.socket)
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            raw.send({"jsonrpc": "2.0", "id": 0, "method": "store.open", "params": {"store": store}})
            raw.send({"jsonrpc": "2.0", "id": 1, "method": "store.subscribe", "params": {"store": store, "type": "local_details"}})
            # 100k rows in multi-row statements, interleaved with single writes.
            peak = rss_before
            for chunk in range(10):
                bulk_insert(writer, store, chunk * 10_000, 10_000)
                timed_writes(writer, store, 4_000_000 + chunk * 100, 100)
                peak = max(peak, rss_kb(pid))
            # (The better of two runs: one slow moment of a loaded machine is not a stall.)
            with_stuck = min(timed_writes(writer, store, 5_000_000, 500), timed_writes(writer, store, 5_001_000, 500))
            peak = max(peak, rss_kb(pid))
            assert writer.call("store.query", store=store, sql="SELECT count(*) FROM T WHERE id < 100000")["rows"] == [[100_000]]

            print(f"RSS {rss_before // 1024} -> peak {peak // 1024} MB; 500 writes {baseline:.2f} s alone, {with_stuck:.2f} s stuck")
            assert peak < RSS_LIMIT_KB, f"daemon RSS {peak // 1024} MB with a stuck subscriber"
            assert peak - rss_before < RSS_GROWTH_KB, f"daemon RSS grew {rss_before // 1024} -> {peak // 1024} MB"
            # Blocked by the subscriber, the writer would stall outright; the margin is for a noisy machine.
            assert with_stuck < 3 * baseline + 0.5, f"500 writes: {baseline:.2f} s alone, {with_stuck:.2f} s with a stuck subscriber"

            # It finally reads: its two answers, some notifications, then one overflow.
            raw.sock.settimeout(5.0)
            got: list[dict[str, Any]] = []
            delivered = 0
            for _ in range(10_000):
                line = raw.read_line()
                assert line, "the daemon closed the stuck connection"
                delivered += len(line) + 1
                got.append(json.loads(line))
                if got[-1].get("method") == "overflow":
                    break
            responses = [m for m in got if "id" in m]
            assert [m["id"] for m in responses] == [0, 1] and all("result" in m for m in responses), responses
            notes = [m for m in got if "id" not in m]
            assert notes[-1]["method"] == "overflow", f"no overflow in {len(notes)} notifications"
            assert "re-read" in notes[-1]["params"]["message"]
            # What was queued (at most 20) plus what the kernel's socket buffers held.
            assert [m for m in notes if m["method"] == "dataChange"]
            assert delivered < 2 << 20, f"{delivered} bytes of notifications were kept for a stuck client"
            # Drained, it is an ordinary client again: answers, and new notifications.
            raw.send({"jsonrpc": "2.0", "id": 99, "method": "device.info", "params": {}})
            writer.call("store.insert", store=store, table="T", values={"id": 9_000_000, "name": "after"})
            rest = [raw.read() for _ in range(2)]
            for _ in range(50):
                if any(m.get("method") == "dataChange" and 9_000_000 in keys_of([m], "inserted") for m in rest):
                    break
                rest.append(raw.read())
            assert any(m.get("id") == 99 and "result" in m for m in rest), rest
            assert any(m.get("method") == "dataChange" and 9_000_000 in keys_of([m], "inserted") for m in rest), rest
        finally:
            raw.close()


LONG_KEY = 1000


def long_key_workload(c: BlockingClient, store: str, pid: int) -> int:
    """50k rows with 1 KB text keys in 10k-row statements, then 300 updates of 1,000 rows
    each; returns the daemon's peak RSS (kB) meanwhile."""
    peak = rss_kb(pid)
    for chunk in range(5):
        c.call("store.execute", store=store, sql=(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000) "
            f"INSERT INTO K(k, v) SELECT printf('%0{LONG_KEY}d', x + {chunk * 10_000}), 0 FROM c"))
        peak = max(peak, rss_kb(pid))
    # ~300 MB of keys in notifications: an unbounded queue would hold them all;
    # the bounded one holds at most 8 MiB (+ one notification of <= 1 MiB of keys).
    for i in range(300):
        first = (i * 1000) % 50_000
        c.call("store.execute", store=store, sql=f"UPDATE K SET v = v + 1 WHERE rowid BETWEEN {first + 1} AND {first + 1000}")
        if i % 10 == 0:
            peak = max(peak, rss_kb(pid))
    time.sleep(0.3)
    return max(peak, rss_kb(pid))


def test_a_stuck_subscriber_costs_bounded_memory_whatever_the_notification_size(
        start_daemon: Callable[..., DaemonProcess], raw_factory: Callable[[Path], RawConnection]) -> None:
    """Default queue (1000 notifications), but each notification lists up to 10k keys
    of 1 KB: the queue must be bounded in bytes too, not only in count. Two daemons run
    the same writes; the one with a subscriber that never reads may use a little more."""
    peaks = {}
    for stuck in (False, True):
        d = start_daemon(f"mem{int(stuck)}")
        with d.client() as c:
            c.call("store.open", store="s")
            c.call("store.execute", store="s", sql="CREATE TABLE K (k TEXT PRIMARY KEY, v INTEGER)")
            c.call("store.set_distributed_tables", store="s", tables=["K"])
            if stuck:
                raw = raw_factory(d.socket)
                raw.call("store.open", rid=1, store="s")
                raw.call("store.subscribe", rid=2, store="s", type="local_details")
            peaks[stuck] = long_key_workload(c, "s", d.proc.pid)
            if stuck:  # it reads at last: what was kept, then overflow (and the writes' keys were dropped)
                raw.sock.settimeout(2)
                seen: list[dict[str, Any]] = []
                for _ in range(2000):
                    try:
                        seen.append(json.loads(raw.read_line()))
                    except TimeoutError:
                        break
        d.stop()
    extra = peaks[True] - peaks[False]
    print(f"peak RSS {peaks[False] // 1024} MB without, {peaks[True] // 1024} MB with a stuck subscriber")
    # The client is told it missed keys: an overflow, or notifications marked truncated
    # (each lists at most 1 MiB of keys), never silence.
    told = [m["method"] for m in seen][-1] == "overflow" or any(
        c.get("truncated") for m in seen if m.get("method") == "dataChange" for c in m["params"]["changes"])
    assert told, [m["method"] for m in seen]
    # RSS of two separate daemons differs by tens of MB on a loaded machine (allocator
    # high-water marks); an unbounded queue would add ~300 MB here.
    assert extra < 100 * 1024, f"a stuck subscriber cost {extra // 1024} MB ({peaks[False] // 1024} -> {peaks[True] // 1024} MB)"


def test_a_client_that_never_reads_its_answers_costs_bounded_memory(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("answers")
    with d.client() as c:
        c.call("store.open", store="s")
        before = rss_kb(d.proc.pid)
        stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            stuck.connect(str(d.socket))
            stuck.settimeout(0.5)
            payload = b"".join(json.dumps({"jsonrpc": "2.0", "id": i, "method": "store.query",
                                           "params": {"store": "s", "sql": "SELECT randomblob(1000000)"}}).encode() + b"\n"
                               for i in range(150))
            sent, deadline = 0, time.monotonic() + 10
            while sent < len(payload) and time.monotonic() < deadline:  # the daemon may stop reading: fine
                try:
                    sent += stuck.send(payload[sent:sent + 65536])
                except TimeoutError:
                    pass
            peak = before
            for _ in range(30):
                time.sleep(0.1)
                peak = max(peak, rss_kb(d.proc.pid))
            assert c.call("device.info")["name"] == "answers"  # others are served meanwhile
            assert peak - before < 50 * 1024, f"the daemon grew {(peak - before) // 1024} MB for one client's unread answers"
        finally:
            stuck.close()


# ====================================================================== 4. coalescing


class RecordingSubscriptions(Subscriptions):
    def __init__(self) -> None:
        super().__init__()
        self.published: list[tuple[float, dict[str, Any]]] = []

    def has(self, store: Any, type_: str) -> bool:
        return True

    def publish(self, store: Any, type_: str, method: str, params: dict[str, Any]) -> int:
        self.published.append((asyncio.get_running_loop().time(), params))
        return 1


async def test_coalescer_keeps_one_notification_per_window_when_the_loop_is_late() -> None:
    """The event loop is busy past the end of a window (a long write, a big page): the
    next change flushes at once, and the window's timer, still armed, must not flush
    again right after it — that was two notifications within one window."""
    from p2pstore.api.subscriptions import Coalescer
    window = 0.05
    subs = RecordingSubscriptions()
    co = Coalescer(subs, window=window)
    store = ("default", "s")

    def change(k: int) -> None:
        co.changes(store, "local_details", {"store": "s"}, [{"table": "T", "type": "data", "inserted": [k], "updated": [], "deleted": []}])

    change(1)                      # at once
    change(2)                      # within the window: a timer for its end
    time.sleep(window * 1.5)       # the loop is busy past the window's end
    change(3)                      # late: flushed at once
    change(4)                      # within the new window: waits for its end
    await asyncio.sleep(window * 3)
    times = [t for t, _ in subs.published]
    keys = [k for _, p in subs.published for c in p["changes"] for k in c["inserted"]]
    assert sorted(keys) == [1, 2, 3, 4]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g >= window * 0.9 for g in gaps), f"notifications {[round(g, 3) for g in gaps]} s apart (window {window})"


def pipelined(d: DaemonProcess, requests: list[tuple[str, dict[str, Any]]]) -> None:
    """Send every request before reading any answer; all must succeed."""
    raw = RawConnection(d.socket, timeout=30)
    try:
        payload = b"".join(json.dumps({"jsonrpc": "2.0", "id": i, "method": m, "params": p}).encode() + b"\n"
                           for i, (m, p) in enumerate(requests))
        sender = threading.Thread(target=raw.send_raw, args=(payload,))
        sender.start()
        answered = 0
        for _ in range(len(requests)):
            msg = raw.read()
            assert "result" in msg, msg
            answered += 1
        sender.join(30)
        assert answered == len(requests)
    finally:
        raw.close()


def collect_burst(c: BlockingClient, kind: str, expected: set[Any], timeout: float) -> list[dict[str, Any]]:
    got = collect_notifications(c, until_keys(kind, expected), timeout)
    got += silent(c, 0.2)  # nothing more should follow
    return data_changes(got)


def test_burst_of_10k_pipelined_api_writes_is_coalesced(shared_daemon: DaemonProcess) -> None:
    name = unique("burst")
    n = 10_000
    with shared_daemon.client() as c:
        c.call("store.open", store=name)
        c.call("store.execute", store=name, sql="CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT)")
        c.call("store.set_distributed_tables", store=name, tables=["T"])
        c.call("store.subscribe", store=name, type="local_details")
        t0 = time.monotonic()
        pipelined(shared_daemon, [("store.insert", {"store": name, "table": "T", "values": {"id": i, "name": "x"}})
                                  for i in range(n)])
        notes = collect_burst(c, "inserted", set(range(n)), 20.0)
        elapsed = time.monotonic() - t0
        keys = keys_of(notes, "inserted")
        assert sorted(keys) == list(range(n)), f"{len(keys)} keys, {len(set(keys))} distinct"  # all, each once
        assert all(keys_of([m], "inserted") for m in notes), "a notification without keys"
        # One at once, then at most one per 20 ms window: far fewer than 10k.
        assert len(notes) <= elapsed / 0.02 + 2 and len(notes) < n / 20, f"{len(notes)} notifications in {elapsed:.1f} s"

        # 10k updates of the same 10 rows: every notification lists each key at most once.
        pipelined(shared_daemon, [("store.execute", {"store": name, "sql": "UPDATE T SET name = ? WHERE id = ?",
                                                     "params": [f"v{i}", i % 10]}) for i in range(n)])
        notes = collect_burst(c, "updated", set(range(10)), 20.0)
        assert notes and len(notes) < n / 20
        for m in notes:
            updated = keys_of([m], "updated")
            assert len(updated) == len(set(updated)) and set(updated) <= set(range(10)), updated
        assert set(keys_of(notes, "updated")) == set(range(10))


OUTSIDE_WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
for i in range(int(sys.argv[2])):
    conn.execute("INSERT INTO T(id, name) VALUES (?, 'outside')", (i,))   # one transaction per row
"""


def test_burst_of_10k_outside_single_row_transactions_is_coalesced(shared_daemon: DaemonProcess) -> None:
    name = unique("outside")
    n = 10_000
    with shared_daemon.client() as c:
        path = c.call("store.open", store=name)["path"]
        c.call("store.execute", store=name, sql="CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT)")
        c.call("store.set_distributed_tables", store=name, tables=["T"])
        c.call("store.subscribe", store=name, type="local_details")
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", OUTSIDE_WRITER, path, str(n)], check=True, timeout=60)
        notes = collect_burst(c, "inserted", set(range(n)), 20.0)
        elapsed = time.monotonic() - t0
        keys = keys_of(notes, "inserted")
        assert sorted(keys) == list(range(n)), f"{len(keys)} keys, {len(set(keys))} distinct"
        assert all(keys_of([m], "inserted") for m in notes)
        assert len(notes) <= elapsed / 0.02 + 2 and len(notes) < n / 20, f"{len(notes)} notifications in {elapsed:.1f} s"


# ====================================================================== 5. p2pstore watch


class Watch:
    """``p2pstore watch ...`` as a subprocess; lines read by a thread (bounded waits)."""

    def __init__(self, socket_path: Path, *args: str) -> None:
        argv = [sys.executable, "-m", "p2pstore", "watch", *args, "--socket", str(socket_path)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def line(self, timeout: float = 5.0) -> dict[str, Any]:
        try:
            text = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"watch printed nothing in {timeout} s; stderr: {self.stop()}") from None
        assert text.endswith("\n")
        return json.loads(text)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


@pytest.fixture
def watches() -> Iterator[Callable[..., Watch]]:
    made: list[Watch] = []

    def start(socket_path: Path, *args: str) -> Watch:
        made.append(Watch(socket_path, *args))
        return made[-1]

    yield start
    for w in made:
        w.stop()


def test_watch_local_prints_one_json_line_per_notification(shared_daemon: DaemonProcess, watches) -> None:
    name = unique("watch")
    with shared_daemon.client() as c:
        path = c.call("store.open", store=name)["path"]
        c.call("store.execute", store=name, sql="CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT)")
        c.call("store.set_distributed_tables", store=name, tables=["T"])
        w = watches(shared_daemon.socket, "--store", name, "--local")
        assert w.line(15.0) == {"watching": name, "types": ["local_details"]}
        c.call("store.insert", store=name, table="T", values={"id": 7, "name": "x"})
        note = w.line()
        assert note["method"] == "dataChange"
        assert note["params"]["store"] == name
        assert note["params"]["changes"] == [{"table": "T", "type": "data", "inserted": [7], "updated": [], "deleted": []}]
        time.sleep(0.1)  # past the coalescing window: the next write is a notification of its own
        assert sqlite3_shell(path, "DELETE FROM T WHERE id = 7").returncode == 0
        note = w.line()
        assert note["params"]["changes"][0]["deleted"] == [7]
        assert w.lines.empty()
    stderr = w.stop()
    assert "Traceback" not in stderr, stderr


def test_watch_remote_prints_devices_after_a_sync(linked_daemons, watches) -> None:
    a, b = linked_daemons(2)
    setup_collab(a, b)
    w = watches(b.proc.socket, "--store", COLLAB["store"], "--remote")
    assert w.line(15.0) == {"watching": COLLAB["store"], "types": ["remote"]}
    b.call("store.insert", **COLLAB, table="T", values={"id": 1, "name": "own", "n": 0})  # local: not printed
    a.call("store.insert", **COLLAB, table="T", values={"id": 1, "name": "a", "n": 1})
    ok(a.sync("push", COLLAB, [b]), b)
    note = w.line()
    assert note["method"] == "dataChange" and note["params"]["devices"] == [a.id], note
    assert note["params"]["store"] == COLLAB["store"]
    time.sleep(SILENCE_S)
    assert w.lines.empty(), "one line per notification"
    stderr = w.stop()
    assert "Traceback" not in stderr, stderr
