"""Store on failing storage (in-process, real SQLite on real mounts): a full
disk, a read-only directory, a file deleted / replaced / overwritten under
an open store. The daemon-level versions are in tests/faults/.

Each case asserts the clear error (its name and the path in the message),
that nothing is half-written, and what works again afterwards.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from typing import Any
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from storage_mounts import read_only, resize_tmpfs, small_tmpfs

from p2pstore.errors import DiskFull, StoreFileChanged, StoreInvalid, StoreReadOnly
from p2pstore.schema.predicates import quote_ident
from p2pstore.store import capture, merge
from p2pstore.store.database import Store
from p2pstore.store.tables import device_table_name

PEER = "PEERPEE-RPEERPE-ERPEERP"


SELF = "SELFSEL-FSELFSE-LFSELFS"


async def open_store(path: Path, device: str = SELF) -> Store:
    return await Store.open(path, bundle="default", name=path.stem, device_id=device)


def count(path: Path, table: str = "T") -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "disk", "1m") as mount:
        yield mount


async def fill(store: Store, table: str = "T", size: int = 20_000, limit: int = 200) -> int:
    """Insert rows until the disk is full (bounded); the number acknowledged."""
    acked = 0
    for _ in range(limit):
        try:
            await store.insert(table, {"v": os.urandom(size)})
        except DiskFull:
            return acked
        acked += 1
    raise AssertionError(f"the disk did not fill in {limit} inserts")


# -- disk full -----------------------------------------------------------------------

async def test_an_insert_on_a_full_disk_is_disk_full_naming_the_store(small_disk: Path) -> None:
    path = small_disk / "shop.db"
    store = await open_store(path)
    try:
        await store.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, v BLOB)")
        acked = await fill(store)
        with pytest.raises(DiskFull) as info:
            await store.insert("T", {"v": os.urandom(20_000)})
        assert info.value.name == "DISK_FULL"
        assert str(path) in info.value.message and "default/shop" in info.value.message
        assert (await store.query("SELECT count(*) FROM T"))["rows"] == [[acked]]  # nothing half-written
        resize_tmpfs(small_disk, "8m")  # space returns
        await store.insert("T", {"v": b"after"})
        assert (await store.query("SELECT count(*) FROM T"))["rows"] == [[acked + 1]]
    finally:
        await store.close()
    assert integrity(path) == "ok"
    assert count(path) == acked + 1


async def _sender_and_small_receiver(tmp_path: Path, small_disk: Path) -> tuple[Store, Store]:
    """A sender with ~2.4 MB of rows of a collaborative table: more than the receiver's disk holds."""
    sender = await open_store(tmp_path / "src.db", PEER)
    receiver = await open_store(small_disk / "dst.db")
    for s in (sender, receiver):
        await s.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, v BLOB)")
        await s.set_distributed_tables(["T"])
    for i in range(120):
        await sender.insert("T", {"id": i, "v": os.urandom(20_000)})
    return sender, receiver


async def test_a_batch_applied_on_a_full_disk_applies_nothing_and_keeps_the_watermark(tmp_path: Path, small_disk: Path) -> None:
    sender, receiver = await _sender_and_small_receiver(tmp_path, small_disk)
    try:
        copy = quote_ident(device_table_name(PEER, "T"))  # a collaborative peer's rows land in its device table
        acked_seq = 0
        with pytest.raises(DiskFull) as info:
            for _ in range(50):
                batch = await sender.read_changes(None, (await receiver.position(PEER))[0], limit=10)
                await receiver.apply_changes(batch, PEER)
                acked_seq = batch.last_seq
        message = info.value.message
        assert f"disk full while applying batch from {PEER}" in message
        assert "nothing applied, watermark unchanged" in message and str(small_disk / "dst.db") in message
        assert acked_seq > 0  # some batches went in before the disk filled
        assert (await receiver.position(PEER))[0] == acked_seq  # the failed batch moved nothing
        got = (await receiver.query(f"SELECT count(*) FROM {copy}"))["rows"][0][0]
        assert got == acked_seq  # ... and wrote no row (one seq per inserted row)
        resize_tmpfs(small_disk, "16m")
        for _ in range(50):  # a later sync from the unchanged watermark brings everything
            batch = await sender.read_changes(None, (await receiver.position(PEER))[0], limit=10)
            await receiver.apply_changes(batch, PEER)
            if not batch.more:
                break
        assert (await receiver.query(f"SELECT count(*) FROM {copy}"))["rows"] == [[120]]
        assert (await receiver.query("PRAGMA integrity_check"))["rows"] == [["ok"]]
    finally:
        await sender.close()
        await receiver.close()


async def test_a_full_disk_in_the_middle_of_a_batch_is_disk_full_too(tmp_path: Path, small_disk: Path) -> None:
    """A batch bigger than the page cache spills to the WAL before COMMIT;
    SQLite then rolls the whole transaction back itself, and the error is
    still DISK_FULL (not "no such savepoint" from undoing a row)."""
    sender = await open_store(tmp_path / "src.db", PEER)
    receiver = await open_store(small_disk / "dst.db")
    try:
        for s in (sender, receiver):
            await s.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, v BLOB)")
            await s.set_distributed_tables(["T"])
        await receiver.run(lambda c: c.execute("PRAGMA cache_size = 10"))  # spill early
        for i in range(80):
            await sender.insert("T", {"id": i, "v": os.urandom(20_000)})
        batch = await sender.read_changes(None, 0, limit=80)
        with pytest.raises(DiskFull):
            await receiver.apply_changes(batch, PEER)
        assert (await receiver.query("SELECT count(*) FROM T"))["rows"] == [[0]]
        assert await receiver.position(PEER) == (0, None)
        assert not await receiver.run(lambda c: c.in_transaction)
    finally:
        await sender.close()
        await receiver.close()


# -- read-only -----------------------------------------------------------------------

async def test_opening_an_existing_store_on_a_read_only_mount_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    store = await open_store(folder / "shop.db")
    await store.execute("CREATE TABLE T (id INTEGER PRIMARY KEY)")
    await store.close()
    with read_only(folder):
        with pytest.raises(StoreReadOnly) as info:
            await open_store(folder / "shop.db")
    assert info.value.name == "STORE_READ_ONLY"
    assert str(folder) in info.value.message and "read-only file system" in info.value.message


async def test_a_new_store_in_a_read_only_directory_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    with read_only(folder):
        with pytest.raises(StoreReadOnly) as info:
            await open_store(folder / "new.db")
        with pytest.raises(StoreReadOnly) as nested:
            await open_store(folder / "bundle" / "new.db")  # its bundle directory can't be made
    assert str(folder) in info.value.message
    assert str(folder / "bundle") in nested.value.message and "not writable" in nested.value.message


# -- the file changes under an open store ----------------------------------------------

@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[tuple[Store, Path]]:
    path = tmp_path / "shop.db"
    store = await open_store(path)
    await store.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, v TEXT)")
    for i in range(5):
        await store.insert("T", {"id": i, "v": f"acked {i}"})
    yield store, path
    await store.close()


def rescued_rows(path: Path) -> list[tuple[int, str]]:
    copies = sorted(path.parent.glob(path.name + ".rescued-*"))
    assert len(copies) == 1, copies
    conn = sqlite3.connect(copies[0])
    try:
        return conn.execute("SELECT id, v FROM T ORDER BY id").fetchall()
    finally:
        conn.close()


ACKED = [(i, f"acked {i}") for i in range(5)]


async def test_a_deleted_file_stops_the_store_and_keeps_what_was_acknowledged(live: tuple[Store, Path]) -> None:
    store, path = live
    path.unlink()
    with pytest.raises(StoreFileChanged) as info:
        await store.insert("T", {"id": 99, "v": "never acked"})
    assert info.value.data["change"] == "deleted" and str(path) in info.value.message
    with pytest.raises(StoreFileChanged):  # reads too: the store serves nothing more
        await store.query("SELECT count(*) FROM T")
    assert rescued_rows(path) == ACKED
    await store.close()
    reopened = await open_store(path)  # store.open again: a new, empty store (no stale WAL replayed)
    try:
        assert (await reopened.query("SELECT name FROM sqlite_master WHERE name = 'T'"))["rows"] == []
    finally:
        await reopened.close()


async def test_a_file_moved_over_the_store_is_noticed_before_commit(live: tuple[Store, Path], tmp_path: Path) -> None:
    store, path = live
    keep = tmp_path / "keep.db"
    os.link(path, keep)  # the store's own inode, to look at afterwards
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, v TEXT)")
    conn.execute("INSERT INTO T VALUES (1000, 'other')")
    conn.commit()
    conn.close()
    os.rename(other, path)
    with pytest.raises(StoreFileChanged) as info:
        await store.insert("T", {"id": 99, "v": "never acked"})
    assert info.value.data["change"] == "replaced" and "replaced by another file" in info.value.message
    assert rescued_rows(path) == ACKED
    await store.close()
    # The WAL was emptied into the store's own file: the newcomer is untouched
    # (not overlaid with our pages), and our file holds every acknowledged row.
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT id, v FROM T").fetchall() == [(1000, "other")]
    conn.close()
    conn = sqlite3.connect(keep)
    assert conn.execute("SELECT id, v FROM T ORDER BY id").fetchall() == ACKED
    conn.close()
    reopened = await open_store(path)  # store.open again: the file now at the path
    try:
        assert (await reopened.query("SELECT v FROM T"))["rows"] == [["other"]]
    finally:
        await reopened.close()


async def test_a_file_overwritten_in_place_is_noticed_and_keeps_what_was_acknowledged(live: tuple[Store, Path]) -> None:
    store, path = live
    garbage = os.urandom(path.stat().st_size)
    with open(path, "r+b") as f:
        f.write(garbage)
    with pytest.raises(StoreFileChanged) as info:
        await store.insert("T", {"id": 99, "v": "never acked"})
    assert info.value.data["change"] == "overwritten" and str(path) in info.value.message
    assert rescued_rows(path) == ACKED
    assert (await store.poll()).by_table == {}  # the poll loop skips it quietly
    await store.close()
    path.write_bytes(garbage)  # what the other program meant the file to be
    with pytest.raises(StoreInvalid) as reopen:  # store.open again: the file now at the path, as it is
        await open_store(path)
    assert str(path) in reopen.value.message


async def test_the_check_runs_before_commit(live: tuple[Store, Path]) -> None:
    """A file deleted after the operation started, before COMMIT: not acknowledged."""
    store, path = live

    def op(conn: sqlite3.Connection) -> None:
        with store._transaction(conn):
            conn.execute("INSERT INTO T VALUES (50, 'inside')")
            path.unlink()

    with pytest.raises(StoreFileChanged):
        await store.run(op)
    assert rescued_rows(path) == ACKED  # rolled back: not in what the store kept


async def test_an_untouched_store_is_not_flagged(live: tuple[Store, Path]) -> None:
    store, path = live
    outside = sqlite3.connect(path)  # another program's commits and checkpoints are fine
    outside.execute("INSERT INTO T VALUES (10, 'outside')")
    outside.commit()
    outside.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    outside.close()
    await store.poll()
    await store.insert("T", {"id": 11, "v": "after"})
    assert (await store.query("SELECT count(*) FROM T"))["rows"] == [[7]]
    assert not list(path.parent.glob("*.rescued-*"))


async def _batches(sender: Store, n: int, since: int = 0) -> list[Any]:
    out = []
    for _ in range(n):
        batch = await sender.read_changes(None, since, limit=10)
        out.append(batch)
        since = batch.last_seq
    return out


async def test_a_group_of_batches_applies_as_they_apply_one_by_one(tmp_path: Path) -> None:
    """Store.apply_changes_group (a receiver's group commit): the same rows,
    watermarks and results as applying the batches one at a time."""
    sender = await open_store(tmp_path / "src.db", PEER)
    one, group = await open_store(tmp_path / "one.db"), await open_store(tmp_path / "group.db")
    try:
        for s in (sender, one, group):
            await s.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, v BLOB)")
            await s.set_distributed_tables(["T"])
        for i in range(30):
            await sender.insert("T", {"id": i, "v": os.urandom(10)})
        batches = await _batches(sender, 3)
        singly = [await one.apply_changes(b, PEER) for b in batches]
        together = await group.apply_changes_group(batches, PEER)
        assert [(r.applied, r.last_seq) for r in together] == [(r.applied, r.last_seq) for r in singly] == [
            (10, b.last_seq) for b in batches]
        copy = quote_ident(device_table_name(PEER, "T"))
        for s in (one, group):
            assert (await s.query(f"SELECT count(*) FROM {copy}"))["rows"] == [[30]]
        assert await group.position(PEER) == await one.position(PEER)
    finally:
        for s in (sender, one, group):
            await s.close()


async def test_a_group_transaction_ends_after_the_batch_in_hand_when_the_application_asks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group commit with a budget (the engine's) stops taking batches once
    an application operation waits for the connection: the application
    waits for one batch and the commit, not for the whole group, and the
    caller applies the rest later. A budget of 0 takes one batch a time."""
    sender = await open_store(tmp_path / "src.db", PEER)
    receiver = await open_store(tmp_path / "dst.db")
    try:
        for s in (sender, receiver):
            await s.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, v BLOB)")
            await s.set_distributed_tables(["T"])
        for i in range(60):
            await sender.insert("T", {"id": i, "v": os.urandom(10)})
        batches = await _batches(sender, 6)
        started, release = threading.Event(), threading.Event()
        apply_batch = merge.apply_batch

        def held_first(conn: sqlite3.Connection, *args: Any, **kw: Any) -> Any:
            if not started.is_set():
                started.set()
                assert release.wait(10)
            return apply_batch(conn, *args, **kw)

        monkeypatch.setattr(merge, "apply_batch", held_first)
        group = asyncio.create_task(receiver.apply_changes_group(batches, PEER, budget_s=60))
        assert await asyncio.to_thread(started.wait, 10)  # the group's first batch is being applied
        copy = quote_ident(device_table_name(PEER, "T"))
        query = asyncio.create_task(receiver.query(f"SELECT count(*) FROM {copy}"))
        for _ in range(1000):  # bounded: the query is counted as waiting at its first step
            if receiver._foreground:
                break
            await asyncio.sleep(0)
        assert receiver._foreground
        release.set()
        first = await group
        assert [r.applied for r in first] == [10]  # the application asked: the group ended there
        assert (await query)["rows"] == [[10]]  # and the query ran next, before the rest
        assert [r.applied for r in await receiver.apply_changes_group(batches[1:3], PEER, budget_s=0)] == [10]
        rest = await receiver.apply_changes_group(batches[2:], PEER, budget_s=60)  # quiet: all of them
        assert [r.applied for r in rest] == [10] * 4
        assert (await receiver.position(PEER))[0] == batches[-1].last_seq
        assert (await receiver.query(f"SELECT count(*) FROM {copy}"))["rows"] == [[60]]
    finally:
        await sender.close()
        await receiver.close()


async def test_a_group_of_batches_on_a_full_disk_applies_nothing_of_any(tmp_path: Path, small_disk: Path) -> None:
    sender, receiver = await _sender_and_small_receiver(tmp_path, small_disk)
    try:
        group = await _batches(sender, 12)
        with pytest.raises(DiskFull):
            await receiver.apply_changes_group(group, PEER)
        assert (await receiver.position(PEER))[0] == 0  # not even the first batch's watermark moved
        resize_tmpfs(small_disk, "16m")
        results = await receiver.apply_changes_group(group, PEER)  # the same group again, once it fits: all of it
        assert [r.applied for r in results] == [10] * 12 and (await receiver.position(PEER))[0] == group[-1].last_seq
        copy = quote_ident(device_table_name(PEER, "T"))
        assert (await receiver.query(f"SELECT count(*) FROM {copy}"))["rows"] == [[120]]
    finally:
        await sender.close()
        await receiver.close()


async def test_a_large_group_compacts_the_log_of_what_it_received(tmp_path: Path) -> None:
    """A group that writes ``COMPACT_WHILE_APPLYING_ROWS`` rows or more drops
    the log rows of received rows beyond the newest ``compact_keep_recent``
    in its own transaction (a large sync does not first grow the file by a
    log), and does not write most of them in the first place; a smaller one
    leaves the log to the minutely compaction. The rows themselves, the
    watermark, the highest seq and the newest log rows stay."""
    from p2pstore.store import database

    sender = await open_store(tmp_path / "src.db", PEER)
    small, large = await open_store(tmp_path / "small.db"), await open_store(tmp_path / "large.db")
    try:
        for s in (sender, small, large):
            await s.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, v INTEGER)")
            await s.set_distributed_tables(["T"])
            s.compact_keep_recent = 100
        await sender.execute("INSERT INTO T (id, v) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                             "WHERE x < 3000) SELECT x, x FROM c")
        batches, since = [], 0
        for _ in range(10):  # bounded
            batch = await sender.read_changes(None, since, limit=500)
            batches.append(batch)
            since = batch.last_seq
            if not batch.more:
                break
        assert sum(b.count for b in batches) == 3000 and database.COMPACT_WHILE_APPLYING_ROWS <= 2000
        put_back: list[list[str]] = []
        real_put_back = merge.put_back

        def spy(conn: sqlite3.Connection, lifted: dict[str, Any]) -> None:
            put_back.append(sorted(lifted))
            real_put_back(conn, lifted)

        read_by_a_batch: list[Any] = []
        with pytest.MonkeyPatch.context() as m:
            m.setattr(merge, "put_back", spy)
            m.setattr(database, "LIFT_TRIGGERS_ROWS", 1500)
            m.setattr(merge, "sync_tables", lambda *args: read_by_a_batch.append(args) or [])
            for group in (batches[:4], batches[4:]):  # 2,000 rows, then 1,000 and an empty end
                await large.apply_changes_group(group, PEER)
        assert read_by_a_batch == []  # the group read its tables once, for every batch
        # The first group lifted the device table's insert guard and put it back; the second, smaller, did not lift.
        assert put_back == [[capture.read_only_trigger_names(device_table_name(PEER, "T"))[0]]]
        for b in batches:  # 500 rows a transaction
            await small.apply_changes_group([b], PEER)
        received = "SELECT count(*), max(seq) FROM _p2p_log WHERE origin IS NOT NULL"
        (kept, top), = (await large.query(received))["rows"]
        assert kept <= 100 + 1000 and top == 3000  # the newest stay, and the highest seq
        assert (await small.query(received))["rows"] == [[3000, 3000]]
        # What compaction drops is not even written (a batch with 100 rows or more after it in
        # its group logs only its last change): the newest 100 are there exactly as small logged them.
        newest = "SELECT seq, tid, pk, op, hlc FROM _p2p_log WHERE origin IS NOT NULL AND seq > 2900 ORDER BY seq"
        assert (await large.query(newest))["rows"] == (await small.query(newest))["rows"]
        assert len((await small.query(newest))["rows"]) == 100
        # Without the compaction (to see what was written): each batch with 100 rows or more after
        # it in its group logged its last change only — 3 of the first group's 4 batches, 1 of the
        # second's — and the rest every change.
        unpacked = await open_store(tmp_path / "unpacked.db")
        try:
            await unpacked.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, v INTEGER)")
            await unpacked.set_distributed_tables(["T"])
            unpacked.compact_keep_recent = 100
            with pytest.MonkeyPatch.context() as m:
                m.setattr(capture, "compact", lambda *args, **kw: 0)
                for group in (batches[:4], batches[4:]):
                    await unpacked.apply_changes_group(group, PEER)
            assert (await unpacked.query(received))["rows"] == [[3 + 500 + 1 + 500, 3000]]
            assert (await unpacked.query(newest))["rows"] == (await small.query(newest))["rows"]
        finally:
            await unpacked.close()
        copy = quote_ident(device_table_name(PEER, "T"))
        triggers = "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
        assert (await large.query(triggers))["rows"] == (await small.query(triggers))["rows"]
        for s in (small, large):
            assert (await s.query(f"SELECT count(*), sum(v) FROM {copy}"))["rows"] == [[3000, 3000 * 3001 // 2]]
            assert (await s.position(PEER))[0] == since
    finally:
        for s in (sender, small, large):
            await s.close()
