"""Hostile and broken peer clocks (store/merge.py, clock.py): a change whose
clock is beyond ``max_offset_ms`` ahead of local time goes to the
sync-failure log and never into the tables or the clock; the rest of the
batch applies; the store keeps working, also after reopening, and a store
whose persisted clock is already poisoned (an older release) recovers.

Real SQLite files (``replicas.Replica``), batches through their plain
(wire) form as the engine carries them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from replicas import Replica, field, replica_maker, schema_doc

from p2pstore.clock import DEFAULT_MAX_OFFSET_MS, MAX_HLC, pack, physical_ms, wall_ms
from p2pstore.protocol.messages import pack_values, unpack
from p2pstore.store import capture, changes, merge
from p2pstore.store.changes import OutBatch, RowChange
from p2pstore.store.registry import StoreRegistry

HOSTILE = (1 << 63) - 6  # the value of the report: a few stamps short of the end of the range
ITEMS = "CREATE TABLE items(id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL UNIQUE, a INTEGER, b TEXT)"
ITEMS_DOC = schema_doc({"items": ([
    field("id", "Integer", autoinc=True), field("uid", "Text", pk=True, not_null=True), field("a", "Integer"), field("b", "Text"),
], ["uid", "a", "b"])})
NOTES = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    with replica_maker(tmp_path, ITEMS, ITEMS_DOC, NOTES) as make:
        yield make


def wire(batch: OutBatch) -> OutBatch:
    """Through msgpack and the one decoder of received batches, as the engine does."""
    return changes.batch_from_plain(unpack(pack_values(changes.batch_to_plain(batch)), "batch", raw_text=True))


def with_clock(row: RowChange, hlc: int, *, prev: bool = False) -> RowChange:
    """``row`` with every cell (or its tomb) at ``hlc``; ``prev``: only the superseded clocks."""
    if prev:
        return row._replace(cells=tuple(c._replace(prev_hlc=hlc, prev_origin="DEVX") for c in row.cells))
    if row.tomb_hlc is not None:
        return row._replace(tomb_hlc=hlc)
    return row._replace(cells=tuple(c._replace(hlc=hlc) for c in row.cells))


def hostile_batch(sender: Replica, key: Any, hlc: int, *, prev: bool = False) -> OutBatch:
    batch = sender.read_rows(0)
    rows = tuple(with_clock(r, hlc, prev=prev) if r.key == key else r for r in batch.rows)
    assert rows != batch.rows
    return wire(dataclasses.replace(batch, rows=rows))


def reopen(r: Replica) -> Replica:
    r.close()
    again = Replica(r.path, r.id, wall=r.wall)
    r.conn, r.clock, r.state = again.conn, again.clock, again.state
    return r


@pytest.mark.parametrize("kind", ["single_version", "collaborative"])
def test_a_hostile_clock_goes_to_the_failure_log_and_nothing_else_moves(device, kind: str) -> None:
    a, b = device("DEVA", kind), device("DEVB", kind)
    if kind == "single_version":
        a.write("INSERT INTO items(uid, a) VALUES ('good', 1), ('evil', 2)")
        key, table, rows = "evil", "items", "SELECT uid, a FROM items ORDER BY uid"
    else:
        a.write("INSERT INTO notes(id, body) VALUES (1, 'good'), (2, 'evil')")
        key, table, rows = 2, "notes", 'SELECT id, body FROM "dev_DEVA_notes" ORDER BY id'
    b.write("INSERT INTO " + ("items(uid, a) VALUES ('mine', 0)" if kind == "single_version" else "notes(id, body) VALUES (9, 'mine')"))
    clock_before = b.clock.last

    result = b.apply(hostile_batch(a, key, HOSTILE), "DEVA")

    assert (result.applied, result.failed) == (1, 1)  # the rest of the batch applied
    (failure,) = merge.sync_failures(b.conn)
    assert failure.origin == "DEVA" and failure.table == table
    assert failure.reason.startswith(f"clock_ahead: {table}: clock 6429-")
    assert f"max offset {DEFAULT_MAX_OFFSET_MS} ms" in failure.reason
    assert failure.change is not None and failure.change.key == key
    # Never into the clock, its persisted state, or the tables.
    assert b.clock.last < pack(wall_ms() + DEFAULT_MAX_OFFSET_MS, 0)
    assert b.clock.last >= clock_before
    assert capture.get_meta(b.conn, "hlc_last", 0) < pack(wall_ms() + DEFAULT_MAX_OFFSET_MS, 0)
    assert b.rows("SELECT max(hlc) FROM _p2p_clocks")[0][0] < HOSTILE
    assert b.rows("SELECT count(*) FROM _p2p_log WHERE hlc >= ?", (HOSTILE,)) == [(0,)]
    got = b.rows(rows)
    assert ("good", 1) in got or (1, "good") in got
    assert not any(key in r for r in got)
    # Later local writes work, many of them (the clock is nowhere near its end), and sync back.
    for i in range(20):
        if kind == "single_version":
            b.write("INSERT INTO items(uid, a) VALUES (?, ?)", (f"n{i}", i))
        else:
            b.write("INSERT INTO notes(id, body) VALUES (?, ?)", (100 + i, f"n{i}"))
    assert sum(r.failed for r in b.push(a)) == 0
    # And after a restart.
    reopen(b)
    assert b.clock.last < pack(wall_ms() + DEFAULT_MAX_OFFSET_MS, 0)
    b.write("INSERT INTO " + ("items(uid, a) VALUES ('after', 1)" if kind == "single_version" else "notes(id, body) VALUES (200, 'after')"))
    assert sum(r.failed for r in b.push(a)) == 0


def test_a_hostile_delete_and_a_hostile_superseded_clock_are_refused_too(device) -> None:
    a, b = device("DEVA", "single_version"), device("DEVB", "single_version")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1), ('y', 2)")
    a.push(b)
    a.write("DELETE FROM items WHERE uid = 'x'")
    a.write("UPDATE items SET a = 3 WHERE uid = 'y'")
    batch = a.read_rows(0)
    rows = tuple(with_clock(r, HOSTILE) if r.key == "x" else with_clock(r, MAX_HLC, prev=True) for r in batch.rows)
    result = b.apply(wire(dataclasses.replace(batch, rows=rows)), "DEVA")
    assert result.failed == 2 and result.applied == 0
    assert all(f.reason.startswith("clock_ahead: items:") for f in merge.sync_failures(b.conn))
    assert b.rows("SELECT uid, a FROM items ORDER BY uid") == [("x", 1), ("y", 2)]
    assert b.clock.last < pack(wall_ms() + DEFAULT_MAX_OFFSET_MS, 0)


def test_a_clock_just_inside_the_bound_applies_and_one_just_beyond_waits_for_local_time(device) -> None:
    now = 1_760_000_000_000
    a, b = device("DEVA", "single_version", wall=now), device("DEVB", "single_version", wall=now)
    b.clock.max_offset_ms = 60_000
    a.write("INSERT INTO items(uid, a) VALUES ('in', 1), ('out', 2)")
    batch = a.read_rows(0)
    edge = b.clock.limit(now)
    rows = tuple(with_clock(r, edge if r.key == "in" else edge + 1) for r in batch.rows)
    result = b.apply(wire(dataclasses.replace(batch, rows=rows)), "DEVA")
    assert (result.applied, result.failed) == (1, 1)
    (failure,) = merge.sync_failures(b.conn)
    assert "clock_ahead: items: clock 2025-" in failure.reason and "60001 ms ahead of local time" in failure.reason
    assert b.clock.last == edge  # dragged to the bound, not past it
    # Retried while the clock is still ahead: still refused; once local time caught up: applied.
    assert merge.retry_failure(b.conn, b.state, b.clock, failure.id, wall=now).failed == 1
    assert merge.retry_failure(b.conn, b.state, b.clock, failure.id, wall=now + 1).applied == 1
    assert merge.sync_failures(b.conn) == []
    assert b.rows("SELECT uid FROM items ORDER BY uid") == [("in",), ("out",)]


def test_a_store_whose_clock_an_older_release_let_be_poisoned_recovers_at_open(device) -> None:
    """Before the bound, a hostile clock was observed and persisted (hlc_last,
    and the stamps of the few local writes that still fit): every later
    write failed, also after a restart."""
    b = device("DEVB", "single_version")
    b.write("INSERT INTO items(uid, a) VALUES ('x', 1)")
    b.clock.last = HOSTILE  # what observing it did
    capture.set_meta(b.conn, "hlc_last", HOSTILE)
    b.write("INSERT INTO items(uid, a) VALUES ('y', 2)")  # stamped at HOSTILE + 1, persisted in _p2p_stamps
    first = b.rows("SELECT max(last_seq) FROM _p2p_stamps")[0][0]
    reopen(b)
    assert b.clock.last < pack(wall_ms() + DEFAULT_MAX_OFFSET_MS, 0)
    for i in range(10):
        b.write("UPDATE items SET a = ? WHERE uid = 'x'", (i,))
    assert b.rows("SELECT a FROM items WHERE uid = 'x'") == [(9,)]
    assert physical_ms(b.rows("SELECT max(base_hlc) FROM _p2p_stamps WHERE first_seq > ?", (first,))[0][0]) <= wall_ms()


async def test_the_configured_offset_bounds_every_store_clock_from_its_first_read(tmp_path: Path) -> None:
    """Config ``max_clock_offset_ms`` -> registry -> each store's clock, set
    before the store reads its persisted clock state at open."""
    path = tmp_path / "data" / "stores" / "b" / "s.db"
    path.parent.mkdir(parents=True)
    poisoned = Replica(path, "DEVB")
    capture.set_meta(poisoned.conn, "hlc_last", pack(wall_ms() + 120_000, 0))  # 2 min ahead: within the default
    poisoned.close()
    registry = StoreRegistry(tmp_path / "data", max_clock_offset_ms=60_000)
    try:
        store = await registry.open("b", "s")
        assert store.clock.max_offset_ms == 60_000
        assert store.clock.last < pack(wall_ms() + 60_000, 0)  # 2 min ahead is beyond 1 min: ignored at open
    finally:
        await registry.close_all()
