"""``p2pstore backup`` / ``store.backup``: a consistent copy of a store while
it is being written, and a restore from it (docs/operations.md)."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from p2ps_helpers import REPO, DaemonProcess, wait_for

from p2pstore.errors import BackupFailed, InvalidParams

ROWS = 20_000
PAD = "x" * 200


def cli(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2pstore", *args, "--socket", str(d.socket)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def make_store(d: DaemonProcess) -> Path:
    with d.client() as c:
        path = Path(c.call("store.open", store="shop")["path"])
        c.call("store.execute", store="shop", sql="CREATE TABLE NOTE (ID INTEGER PRIMARY KEY, BODY TEXT NOT NULL)")
        c.call("store.set_distributed_tables", store="shop", tables=["NOTE"])
    with sqlite3.connect(path, timeout=10) as conn:
        conn.executemany("INSERT INTO NOTE (BODY) VALUES (?)", ((PAD,) for _ in range(ROWS)))
    return path


def test_a_backup_taken_under_concurrent_writes_is_consistent(start_daemon: Callable[..., DaemonProcess],
                                                              short_tmp: Path) -> None:
    d = start_daemon("backup")
    path = make_store(d)
    stop = threading.Event()
    written = [ROWS]

    def writer() -> None:
        # Another process's writes (captured by the triggers) and the daemon's
        # own stamping of them both go on while the backup runs.
        with sqlite3.connect(path, timeout=10, isolation_level=None) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO NOTE (BODY) VALUES (?)", (PAD,))
                written[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: written[0] > ROWS + 50, timeout=30)
        before = written[0]
        target = short_tmp / "shop.backup.db"
        result = cli(d, "backup", "--store", "shop", str(target))
        during = written[0] - before
    finally:
        stop.set()
        thread.join(30)
    assert result.returncode == 0, result.stderr
    assert f"backed up default/shop to {target}" in result.stdout
    assert during > 0, "the writer went on while the backup ran"

    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not [p.name for p in short_tmp.iterdir() if "partial" in p.name]
    with sqlite3.connect(f"file:{target}?mode=ro", uri=True) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
        count, low, high = copy.execute("SELECT count(*), min(ID), max(ID) FROM NOTE").fetchone()
        # One snapshot: every row up to some point, none missing in between.
        assert before <= count <= written[0] and (low, high) == (1, count), (before, count, written[0])
        assert copy.execute("SELECT count(*) FROM NOTE WHERE BODY != ?", (PAD,)).fetchone()[0] == 0
        assert copy.execute("SELECT count(*) FROM _p2p_tables WHERE name = 'NOTE'").fetchone()[0] >= 1


def test_backup_refuses_an_existing_file_a_missing_directory_and_a_relative_path(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    d = start_daemon("backup-bad")
    make_store(d)
    existing = short_tmp / "existing.db"
    existing.write_bytes(b"keep me")
    result = cli(d, "backup", "--store", "shop", str(existing))
    assert result.returncode == 1 and "BACKUP_FAILED" in result.stderr and "already exists" in result.stderr, result.stderr
    assert existing.read_bytes() == b"keep me"
    with d.client() as c:
        with pytest.raises(BackupFailed, match="No such file or directory"):
            c.call("store.backup", store="shop", path=str(short_tmp / "nowhere" / "x.db"))
        with pytest.raises(InvalidParams, match="path"):
            c.call("store.backup", store="shop", path="relative.db")
        assert c.call("store.query", store="shop", sql="SELECT count(*) FROM NOTE")["rows"] == [[ROWS]]  # still serving


def test_a_store_restored_from_a_backup_opens_with_its_rows(start_daemon: Callable[..., DaemonProcess],
                                                          short_tmp: Path) -> None:
    d = start_daemon("restore")
    path = make_store(d)
    target = short_tmp / "shop.backup.db"
    assert cli(d, "backup", "--store", "shop", str(target)).returncode == 0
    with d.client() as c:
        c.call("store.execute", store="shop", sql="DELETE FROM NOTE")
    assert d.stop() == 0
    # The restore procedure of docs/operations.md: daemon stopped, WAL files gone, copy in place.
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    os.replace(target, path)
    d.start()
    with d.client() as c:
        c.call("store.open", store="shop")
        assert c.call("store.query", store="shop", sql="SELECT count(*) FROM NOTE")["rows"] == [[ROWS]]
        c.call("store.insert", store="shop", table="NOTE", values={"BODY": "after restore"})
