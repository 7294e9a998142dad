"""Change capture: every change of a distributed table reaches the log with a
clock value and "this device" as origin, whoever wrote it, and is announced
as ChangeInfo.

``_p2p_changes`` (the view that resolves each change's hlc and origin) is
read to check the log; "another program" is a second sqlite3 connection to
the same file (tests/integration uses real other processes).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pstore.clock import physical_ms, wall_ms
from p2pstore.store.capture import OP_DELETE, OP_INSERT, OP_UPDATE, ChangeBatch
from p2pstore.store.database import Store

I, U, D = OP_INSERT, OP_UPDATE, OP_DELETE


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "cap.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(db_path, bundle="default", name="cap")
    await s.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)")
    await s.execute("CREATE TABLE K (code TEXT PRIMARY KEY, v INTEGER)")           # text key, has a rowid
    await s.execute("CREATE TABLE W (code TEXT PRIMARY KEY, v INTEGER) WITHOUT ROWID")
    await s.execute("CREATE TABLE R (name TEXT, v INTEGER)")                       # no declared key: rowid
    await s.execute("CREATE TABLE plain (id INTEGER PRIMARY KEY, v INTEGER)")      # never distributed
    await s.set_distributed_tables(["T", "K", "W", "R"])
    yield s
    await s.close()


@pytest.fixture
def announced(store: Store) -> list[list[dict[str, Any]]]:
    seen: list[list[dict[str, Any]]] = []
    store.on_changes = lambda _s, batch: seen.append(batch.change_infos())
    return seen


@pytest.fixture
def outside(db_path: Path, store: Store) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    yield conn
    conn.close()


async def log(store: Store, table: str | None = None) -> list[tuple[Any, ...]]:
    sql = "SELECT tbl, pk, op, hlc, origin FROM _p2p_changes"
    params: list[Any] = []
    if table:
        sql += " WHERE tbl = ?"
        params.append(table)
    return [tuple(r) for r in (await store.query(sql + " ORDER BY seq", params))["rows"]]


def ops(entries: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [(tbl, pk, op) for tbl, pk, op, _hlc, _origin in entries]


def info(table: str, inserted: list[Any] = (), updated: list[Any] = (), deleted: list[Any] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    return {"table": table, "type": "data", "inserted": list(inserted), "updated": list(updated), "deleted": list(deleted)}


# -- API writes -----------------------------------------------------------------------------

async def test_insert_update_delete_are_logged_with_clock_and_local_origin(store: Store, announced: list[Any]) -> None:
    before = wall_ms()
    await store.insert("T", {"id": 1, "name": "a"})
    await store.update({"name": "b"}, {"table": "T", "where": [["id", "=", 1]]})
    await store.delete({"table": "T", "where": [["id", "=", 1]]})
    entries = await log(store, "T")
    assert ops(entries) == [("T", 1, I), ("T", 1, U), ("T", 1, D)]
    hlcs = [e[3] for e in entries]
    assert all(h is not None for h in hlcs) and hlcs == sorted(hlcs) and len(set(hlcs)) == 3
    assert physical_ms(hlcs[0]) >= before
    assert {e[4] for e in entries} == {None}  # NULL origin = this device
    assert announced == [[info("T", inserted=[1])], [info("T", updated=[1])], [info("T", deleted=[1])]]


async def test_update_mask_records_changed_columns(store: Store) -> None:
    await store.insert("T", {"id": 1, "name": "a", "n": 1})
    await store.update({"n": 2}, {"table": "T"})
    await store.update({"name": "z", "n": 2}, {"table": "T"})  # n unchanged
    masks = (await store.query("SELECT cols FROM _p2p_changes WHERE op = 2 ORDER BY seq"))["rows"]
    assert masks == [[0b100], [0b010]]  # columns id=bit0, name=bit1, n=bit2


async def test_key_update_is_delete_of_old_and_insert_of_new(store: Store, announced: list[Any]) -> None:
    await store.insert("T", {"id": 1, "name": "a"})
    await store.update({"id": 7}, {"table": "T", "where": [["id", "=", 1]]})
    after = ops(await log(store, "T"))[1:]
    # The new key may be logged twice (by the trigger and as an appended
    # rowid); what matters is delete-of-old before insert-of-new, nothing else.
    assert after[0] == ("T", 1, D) and set(after[1:]) == {("T", 7, I)}
    assert announced[-1] == [info("T", inserted=[7], deleted=[1])]


async def test_text_key_without_rowid_and_rowid_tables(store: Store, announced: list[Any]) -> None:
    await store.insert("K", {"code": "k1", "v": 1})
    await store.insert("W", {"code": "w1", "v": 1})
    rowid = await store.insert("R", {"name": "r", "v": 1})
    await store.execute("UPDATE K SET code = 'k2'")
    await store.execute("UPDATE W SET v = 2")
    await store.execute("DELETE FROM R")
    assert ops(await log(store)) == [
        ("K", "k1", I), ("W", "w1", I), ("R", rowid, I),
        ("K", "k1", D), ("K", "k2", I), ("W", "w1", U), ("R", rowid, D),
    ]


async def test_one_statement_is_one_announcement_grouped_by_table(store: Store, announced: list[Any]) -> None:
    await store.execute("INSERT INTO T(id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    await store.execute("UPDATE T SET n = 5 WHERE id > 1")
    assert announced == [[info("T", inserted=[1, 2, 3])], [info("T", updated=[2, 3])]]


async def test_writes_to_tables_that_are_not_distributed_are_not_captured(store: Store, announced: list[Any]) -> None:
    n = len(await log(store))
    await store.insert("plain", {"v": 1})
    await store.execute("UPDATE plain SET v = 2")
    assert len(await log(store)) == n
    assert announced == []


async def test_clock_is_persisted_across_reopen(db_path: Path, store: Store) -> None:
    await store.insert("T", {"id": 1})
    last = (await log(store, "T"))[-1][3]
    await store.close()
    reopened = await Store.open(db_path, bundle="default", name="cap")
    try:
        assert reopened.clock.last >= last  # rebuilt from the file, not from the wall clock
        await reopened.insert("T", {"id": 2})
        entries = await log(reopened, "T")
        assert entries[-1][1] == 2 and entries[-1][3] > last
        assert reopened.clock.last >= entries[-1][3]
    finally:
        await reopened.close()
    # The fixture closes ``store`` again; closing twice must be harmless.


# -- other programs' writes ------------------------------------------------------------------

async def test_outside_insert_update_delete_are_captured_and_announced(
    store: Store, outside: sqlite3.Connection, announced: list[Any]
) -> None:
    await store.insert("T", {"id": 1, "name": "api"})
    api_hlc = (await log(store, "T"))[-1][3]
    outside.execute("INSERT INTO T(id, name) VALUES (2, 'outside')")
    batch = await store.poll()
    assert isinstance(batch, ChangeBatch) and batch
    assert announced[-1] == [info("T", inserted=[2])]
    outside.execute("UPDATE T SET name = 'x' WHERE id = 1")
    outside.execute("DELETE FROM T WHERE id = 2")
    await store.poll()
    assert announced[-1] == [info("T", updated=[1], deleted=[2])]
    entries = (await log(store, "T"))[1:]
    assert ops(entries) == [("T", 2, I), ("T", 1, U), ("T", 2, D)]
    assert all(e[3] > api_hlc for e in entries) and {e[4] for e in entries} == {None}


async def test_poll_without_outside_changes_announces_nothing(store: Store, announced: list[Any]) -> None:
    await store.insert("T", {"id": 1})
    assert not await store.poll()
    assert not await store.poll()
    assert len(announced) == 1


async def test_outside_insert_with_an_explicit_low_key_is_captured(
    store: Store, outside: sqlite3.Connection, announced: list[Any]
) -> None:
    for i in (1, 2, 3, 4, 5):
        await store.insert("T", {"id": i})
    await store.delete({"table": "T", "where": [["id", "in", [3, 5]]]})
    outside.execute("INSERT INTO T(id) VALUES (3)")   # below the highest key ever seen
    outside.execute("INSERT INTO T(id) VALUES (5)")   # reuses the top rowid
    outside.execute("INSERT INTO T(name) VALUES ('auto')")  # next free rowid
    await store.poll()
    assert sorted(announced[-1][0]["inserted"]) == [3, 5, 6]


async def test_outside_bulk_insert_is_captured_in_one_poll(store: Store, outside: sqlite3.Connection, announced: list[Any]) -> None:
    outside.execute("BEGIN")
    outside.executemany("INSERT INTO T(name) VALUES (?)", [(f"n{i}",) for i in range(1000)])
    outside.execute("COMMIT")
    await store.poll()
    assert len(announced) == 1
    assert announced[0][0]["inserted"] == list(range(1, 1001))
    hlcs = [e[3] for e in await log(store, "T")]
    assert len(hlcs) == 1000 and len(set(hlcs)) == 1000


async def test_outside_writes_to_text_key_and_without_rowid_tables(
    store: Store, outside: sqlite3.Connection, announced: list[Any]
) -> None:
    outside.execute("INSERT INTO K VALUES ('a', 1)")
    outside.execute("INSERT INTO W VALUES ('b', 1)")
    outside.execute("INSERT INTO R VALUES ('c', 1)")
    await store.poll()
    assert sorted(map(str, announced[-1])) == sorted(map(str, [info("K", inserted=["a"]), info("R", inserted=[1]), info("W", inserted=["b"])]))


async def test_outside_key_update_is_delete_and_insert(store: Store, outside: sqlite3.Connection, announced: list[Any]) -> None:
    await store.insert("K", {"code": "old", "v": 1})
    outside.execute("UPDATE K SET code = 'new'")
    await store.poll()
    assert announced[-1] == [info("K", inserted=["new"], deleted=["old"])]


async def test_outside_writes_made_while_the_store_was_closed_are_logged_not_announced(db_path: Path, store: Store) -> None:
    await store.close()
    conn = sqlite3.connect(db_path)
    conn.execute("INSERT INTO T(id, name) VALUES (10, 'offline')")
    conn.execute("DELETE FROM T WHERE id = 10")
    conn.execute("INSERT INTO K VALUES ('kk', 1)")
    conn.commit()
    conn.close()
    reopened = await Store.open(db_path, bundle="default", name="cap")
    seen: list[Any] = []
    reopened.on_changes = lambda _s, b: seen.append(b)
    try:
        entries = await log(reopened)
        assert ("K", "kk", I) in ops(entries) and ("T", 10, D) in ops(entries)
        assert all(e[3] is not None for e in entries)
        await reopened.poll()
        assert seen == []
    finally:
        await reopened.close()


async def test_outside_writes_before_set_distributed_tables_of_a_new_table(
    store: Store, outside: sqlite3.Connection, announced: list[Any]
) -> None:
    await store.execute("CREATE TABLE N (id INTEGER PRIMARY KEY)")
    outside.execute("INSERT INTO N VALUES (1)")
    outside.execute("INSERT INTO T(id) VALUES (99)")  # distributed already: announced
    await store.set_distributed_tables(["N"])
    assert announced == [[info("T", inserted=[99])]]
    assert ("N", 1, I) in ops(await log(store, "N"))


# -- the apply guard (no echo of writes applied from peers) -------------------------------------

async def test_updates_and_deletes_inside_the_apply_guard_are_not_captured(store: Store, announced: list[Any]) -> None:
    await store.insert("T", {"id": 1, "name": "a"})
    await store.insert("T", {"id": 2, "name": "b"})
    before = await log(store)

    def apply(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO _p2p_apply VALUES (1)")
        conn.execute("UPDATE T SET name = 'from peer' WHERE id = 1")
        conn.execute("DELETE FROM T WHERE id = 2")
        conn.execute("DELETE FROM _p2p_apply")
        conn.execute("COMMIT")

    await store.run(apply)
    await store.poll()
    assert await log(store) == before
    assert len(announced) == 2


async def test_an_outside_program_is_never_exempt_from_capture(
    store: Store, outside: sqlite3.Connection, announced: list[Any]
) -> None:
    await store.insert("T", {"id": 1})
    # The daemon's guard row is only visible inside its own transaction, so a
    # concurrent outside write still fires the triggers.
    outside.execute("UPDATE T SET name = 'x'")
    await store.poll()
    assert announced[-1] == [info("T", updated=[1])]


# -- ChangeBatch ---------------------------------------------------------------------------------

def test_change_batch_truthiness_and_change_infos() -> None:
    assert not ChangeBatch()
    batch = ChangeBatch(first_seq=3, last_seq=4, by_table={
        "b": {"inserted": [1], "updated": [], "deleted": []},
        "a": {"inserted": [], "updated": [], "deleted": ["k"]},
    })
    assert batch
    assert batch.change_infos() == [info("a", deleted=["k"]), info("b", inserted=[1])]


async def test_repeated_changes_of_one_row_are_reported_once_per_kind(store: Store, announced: list[Any]) -> None:
    await store.insert("T", {"id": 1, "n": 0})
    await store.execute(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 5) "
        "UPDATE T SET n = n + (SELECT count(*) FROM c) WHERE id = 1"
    )
    outside_updates = sqlite3.connect(store.path, isolation_level=None)
    outside_updates.execute("BEGIN")
    for _ in range(5):
        outside_updates.execute("UPDATE T SET n = n + 1")
    outside_updates.execute("COMMIT")
    outside_updates.close()
    await store.poll()
    assert announced[-1] == [info("T", updated=[1])]
    assert ops(await log(store, "T")).count(("T", 1, U)) == 6  # but every change is logged


# -- the read-only guard of collaborative device tables, from the sqlite3 shell ------------------

async def test_sqlite3_cli_cannot_write_a_device_table(store: Store, db_path: Path) -> None:
    import subprocess

    def shell(sql: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sqlite3", "-cmd", ".timeout 5000", str(db_path), sql], capture_output=True, text=True, timeout=30)

    table = await store.create_device_table("ABCDEFG-HIJKLMN-OPQRSTU", "T")
    # The apply path (guard row in the same transaction) can write it, even from the shell...
    applied = shell(f'BEGIN; INSERT INTO _p2p_apply VALUES (1); INSERT INTO "{table}"(id, name) VALUES (1, \'peer\'); '
                    "DELETE FROM _p2p_apply; COMMIT;")
    assert applied.returncode == 0, applied.stderr
    assert not await store.poll()  # ...and nothing of it is captured
    # ...but no plain write gets through.
    for sql in (f'INSERT INTO "{table}"(id, name) VALUES (2, \'x\')', f'UPDATE "{table}" SET name = \'y\'', f'DELETE FROM "{table}"'):
        result = shell(sql)
        assert result.returncode != 0, sql
        assert "READ_ONLY_TABLE" in result.stderr and "ABCDEFG-HIJKLMN-OPQRSTU" in result.stderr
    assert (await store.query(f'SELECT id, name FROM "{table}"'))["rows"] == [[1, "peer"]]


# -- a bulk insert by another program, stamped in steps ------------------------------------

BULK = 25_000


def _bulk(outside: sqlite3.Connection) -> None:
    outside.execute(f"INSERT INTO T(id, name, n) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                    f"WHERE x < {BULK}) SELECT x, 'o' || x, x FROM c")


async def _logged(store: Store) -> int:
    return (await store.query("SELECT count(*) FROM _p2p_log WHERE tid = (SELECT tid FROM _p2p_tables WHERE name = 'T')"))["rows"][0][0]


async def test_a_poll_stamps_a_bulk_insert_in_steps_and_announces_every_row(
    store: Store, outside: sqlite3.Connection, announced: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``STAMP_CHUNK_ROWS`` appended rows a step, each its own transaction,
    until none is left; every row logged once, in rowid order, and announced."""
    from p2pstore.store import database

    monkeypatch.setattr(database, "STAMP_CHUNK_ROWS", 10_000)
    _bulk(outside)
    batch = await store.poll()
    assert len(announced) == 3  # 10k + 10k + 5k
    assert sorted(batch.by_table["T"]["inserted"]) == list(range(1, BULK + 1))
    rows = (await store.query("SELECT pk FROM _p2p_changes WHERE tbl = 'T' ORDER BY seq"))["rows"]
    assert [r[0] for r in rows] == list(range(1, BULK + 1))
    assert not await store.poll()  # nothing left


async def test_a_push_reading_a_bulk_insert_stamps_it_as_it_needs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read finds nothing stamped, stamps one step and reads it; the next
    reads send those rows without stamping; each batch says ``more`` until
    every appended row is stamped and sent; every row goes exactly once.
    A poll meanwhile leaves the rest to the reading push."""
    from p2pstore.store import database

    monkeypatch.setattr(database, "STAMP_CHUNK_ROWS", 10_000)
    path = tmp_path / "sender.db"
    store = await Store.open(path, bundle="default", name="sender", device_id="DEVA")
    try:
        await store.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)")
        await store.set_distributed_tables(["T"])
        announced: list[Any] = []
        store.on_changes = lambda _s, batch: announced.append(batch.change_infos())
        outside = sqlite3.connect(path, isolation_level=None)
        _bulk(outside)
        outside.close()
        first = await store.read_changes(None, 0, limit=1000)
        assert first.count == 1000 and first.more
        assert await _logged(store) == 10_000  # one step, not the whole insert
        await store.poll()  # a push is reading: the poll takes one step and leaves the rest to it
        assert await _logged(store) == 20_000
        keys, batch = [], first
        for _ in range(100):  # bounded
            keys += [r.key for r in batch.as_rows().rows]
            if not batch.more:
                break
            batch = await store.read_changes(None, batch.last_seq, limit=1000)
        assert sorted(keys) == list(range(1, BULK + 1)) and len(keys) == BULK
        assert await _logged(store) == BULK
        assert sum(len(info["inserted"]) for infos in announced for info in infos) == BULK
    finally:
        await store.close()


async def test_stamping_a_bulk_insert_into_a_single_version_table_keeps_its_log_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step of stamping another program's bulk insert (a poll's, a
    reading push's) drops the log rows of the single_version rows stamped
    before it beyond the newest ``compact_keep_recent``: the log stays near a
    step long instead of growing by a row per row until the minutely
    compaction. Every row still gets its row clock, is read by the push
    exactly once and announced; the highest seq stays."""
    import json

    from replicas import BUNDLE, STORE, field, schema_doc

    from p2pstore.store import accepted_schema, database

    monkeypatch.setattr(database, "STAMP_CHUNK_ROWS", 5_000)
    schema = tmp_path / "sync_schema.json"
    schema.write_text(json.dumps(schema_doc({"T": ([field("id", "Integer", autoinc=True), field("name", "Text", pk=True, not_null=True),
                                                   field("n", "Integer")], ["name", "n"])})), encoding="utf-8")
    path = tmp_path / "sender.db"
    store = await Store.open(path, bundle=BUNDLE, name=STORE, device_id="DEVA")
    try:
        await store.execute("CREATE TABLE T (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, n INTEGER)")
        await accepted_schema.set_tables(store, ["T"], auto_sync=False, schema_path=schema)
        store.compact_keep_recent = 1_000
        announced: list[Any] = []
        store.on_changes = lambda _s, batch: announced.append(batch.change_infos())
        outside = sqlite3.connect(path, isolation_level=None)
        _bulk(outside)
        outside.close()
        await store.poll()  # no push is reading: the poll stamps it all, step by step
        log = "SELECT count(*), max(seq) FROM _p2p_log"
        (kept, top), = (await store.query(log))["rows"]
        assert kept <= 1_000 + 5_000 and top == BULK  # not BULK rows: each step dropped the ones before
        assert (await store.query("SELECT count(*) FROM _p2p_rows"))["rows"] == [[BULK]]
        assert sum(len(info["inserted"]) for infos in announced for info in infos) == BULK
        keys: list[Any] = []
        batch = await store.read_changes(None, 0, limit=1000)
        for _ in range(100):  # bounded
            keys += [r.key for r in batch.as_rows().rows]
            if not batch.more:
                break
            batch = await store.read_changes(None, batch.last_seq, limit=1000)
        assert sorted(keys) == sorted(f"o{i}" for i in range(1, BULK + 1))
    finally:
        await store.close()


@pytest.mark.parametrize("ranges", [1, 3, 16, 17, 40])
def test_an_intervals_clocks_worked_out_are_the_clocks_looked_up(ranges: int) -> None:
    """``interval_stamps`` and ``stamped`` (a block query's clocks, worked
    out from the seqs and the ranges over the interval) give each row the
    clock ``hlc_sql`` looks up — across range boundaries, for every
    interval; rows before the first range (none) are left out by the
    caller; with more ranges than ``LITERAL_STAMPS`` the caller looks up."""
    from p2pstore.store import capture

    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(capture.SCHEMA_SQL)
    conn.executemany("INSERT INTO _p2p_log(seq, tid, pk, op) VALUES (?, 1, ?, 1)", [(s, s) for s in range(1, 3 * ranges + 6)])
    # Ranges of 1..3 seqs from seq 4 on (seqs 1-3: no range yet), bases far apart.
    first, stamps = 4, []
    for i in range(ranges):
        last = first + i % 3
        stamps.append((first, last, 1_000_000 * (i + 1)))
        first = last + 1
    conn.executemany("INSERT INTO _p2p_stamps(first_seq, last_seq, base_hlc) VALUES (?, ?, ?)", stamps)
    top = first - 1
    looked_up = dict(conn.execute(f"SELECT seq, {capture.hlc_sql('seq')} FROM _p2p_log"))
    assert looked_up[3] is None and looked_up[4] == 1_000_000 and looked_up[top] is not None
    literal = lookups = 0
    for since in range(0, top + 1):
        for last in range(since, top + 2):
            over = capture.interval_stamps(conn, since, last)
            seqs = [s for s in range(since + 1, last + 1) if s in looked_up]
            if over is None:
                lookups += 1
                assert ranges > capture.LITERAL_STAMPS
                continue
            literal += 1
            assert over == sorted(over) and len(over) <= capture.LITERAL_STAMPS
            stamped_seqs = [s for s in seqs if over and s >= over[0][0]]
            assert all(looked_up[s] is None for s in seqs if s not in stamped_seqs), (since, last, over)
            assert capture.stamped(stamped_seqs, over) == [looked_up[s] for s in stamped_seqs], (since, last, over)
    assert lookups or ranges <= capture.LITERAL_STAMPS
    assert literal  # (every interval of a few ranges is written in)
