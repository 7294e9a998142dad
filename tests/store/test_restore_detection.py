"""store/restore.py at the store's level: a restored file is told at open by
the state file beside it; a new or recreated file, or a missing state file,
is not (the peer-side check then covers it)."""

from __future__ import annotations

import shutil
from pathlib import Path

from p2pstore.store import capture, restore
from p2pstore.store.database import Store, backup_file

DEVICE = "A" * 52


async def open_store(path: Path) -> Store:
    return await Store.open(path, bundle="default", name=path.stem, device_id=DEVICE)


async def made(path: Path) -> Store:
    store = await open_store(path)
    await store.execute("CREATE TABLE NOTE (ID INTEGER PRIMARY KEY, BODY TEXT)")
    await store.set_distributed_tables(["NOTE"])
    return store


async def stream_of(store: Store) -> str:
    return await store.run(capture.stream_id)


async def test_a_file_older_than_what_was_sent_takes_a_new_stream_and_a_pending_catch_up(tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    store = await made(path)
    await store.insert("NOTE", {"ID": 1, "BODY": "one"})
    backup = tmp_path / "backup.db"
    await store.backup(backup)
    await store.insert("NOTE", {"ID": 2, "BODY": "two"})
    sent = await store.read_changes(None, 0)  # the seqs leave: the state file covers them first
    old = await stream_of(store)
    assert restore.read_state(path) == restore.State(old, sent.last_seq)
    await store.close()

    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, path)
    store = await open_store(path)
    try:
        assert store.restore_pending
        assert await stream_of(store) != old
        assert restore.read_state(path).stream == await stream_of(store)
    finally:
        await store.close()
    # Still pending after a restart, until a catch-up ends it.
    store = await open_store(path)
    try:
        assert store.restore_pending
    finally:
        await store.close()


async def test_a_file_that_only_moved_on_is_not_restored(tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    store = await made(path)
    await store.insert("NOTE", {"ID": 1, "BODY": "one"})
    await store.read_changes(None, 0)
    stream = await stream_of(store)
    await store.close()
    store = await open_store(path)
    try:
        assert not store.restore_pending and await stream_of(store) == stream
    finally:
        await store.close()


async def test_a_recreated_store_or_a_missing_or_damaged_state_file_is_not_a_restore(tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    store = await made(path)
    await store.insert("NOTE", {"ID": 1, "BODY": "one"})
    await store.read_changes(None, 0)
    await store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    store = await made(path)  # the application wiped its data and starts again
    assert not store.restore_pending
    await store.close()

    backup = tmp_path / "other.db"
    backup_file(path, backup)
    restore.state_path(path).unlink()
    store = await open_store(path)
    assert not store.restore_pending
    await store.close()
    restore.state_path(path).write_text("{not json")
    store = await open_store(path)
    assert not store.restore_pending
    assert restore.read_state(path) is not None  # written again
    await store.close()
