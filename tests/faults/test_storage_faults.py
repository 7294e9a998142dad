"""Fault suite, storage: real daemons on real failing storage.

- a receiver whose data dir is a small tmpfs, filled by a push (or by its
  own pull): sync result code 15 DISK_FULL, one log line on each side (no traceback), nothing lost,
  and once the disk has room again the next push brings every row and the
  receiver's file passes ``PRAGMA integrity_check``;
- a read-only data dir (fresh, or with a daemon's files in it): the daemon
  exits 1 with one line naming it; a store directory that can't be written:
  ``STORE_READ_ONLY`` naming the path;
- a store file deleted, replaced (``mv`` over it) or overwritten with garbage
  while the daemon runs: noticed by the poll loop (one log line), every
  request refused with ``STORE_FILE_CHANGED``, no write acknowledged after
  the change, every acknowledged row in the rescued copy, and
  ``store.close`` + ``store.open`` serve what is at the path now.

Mounts need root (they skip otherwise); root ignores permission bits, so
"read-only" is a read-only bind mount.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parents[1]
for helpers in (TESTS / "integration", TESTS / "store"):  # shared helpers live beside their own tests
    if str(helpers) not in sys.path:
        sys.path.insert(0, str(helpers))

from p2ps_helpers import LOOPBACK, REPO, DaemonProcess  # noqa: E402
from storage_mounts import read_only, resize_tmpfs, small_tmpfs  # noqa: E402
from sync_helpers import Node, linked_daemons, wait_until  # noqa: E402,F401  (linked_daemons: a fixture)

from p2pstore.errors import DiskFull, StoreFileChanged, StoreReadOnly  # noqa: E402
from p2pstore.schema.predicates import quote_ident  # noqa: E402
from p2pstore.store.tables import device_table_name  # noqa: E402

STORE = {"store": "faults"}
TABLE = "CREATE TABLE T (id INTEGER PRIMARY KEY, v BLOB)"
ROWS, ROW_BYTES = 600, 8000  # ~4.8 MB: more than the receiver's 3 MB disk
#: Each row as the receiver must hold it: id, size and both ends of the blob.
DIGEST = "SELECT id, length(v), hex(substr(v, 1, 16)), hex(substr(v, -16)) FROM {} ORDER BY id"


def log_lines(node_or_proc: Node | DaemonProcess, *needles: str) -> list[str]:
    proc = node_or_proc.proc if isinstance(node_or_proc, Node) else node_or_proc
    return [line for line in proc.log().splitlines() if all(n in line for n in needles)]


# -- disk full -------------------------------------------------------------------------

@pytest.fixture
def receiver_disk(short_tmp: Path) -> Iterator[Path]:
    """Node b's data dir, a 3 MB tmpfs. Requested before ``linked_daemons``
    so it is unmounted only after the daemons stopped."""
    with small_tmpfs(short_tmp / "b", "3m") as mount:
        yield mount


def more_than_the_disk_holds(linked_daemons: Callable[..., list[Node]]) -> tuple[Node, Node, list[list[object]], str]:
    """Two linked daemons sharing T, with ~4.8 MB of rows on a: (a, b, a's
    rows as DIGEST reads them, b's device table for them)."""
    a, b = linked_daemons(2)
    for node in (a, b):
        node.call("store.open", **STORE)
        node.call("store.execute", **STORE, sql=TABLE)
        node.call("store.set_distributed_tables", **STORE, tables=["T"])
    a.call("store.execute", **STORE, sql=f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS}) "
                                          f"INSERT INTO T SELECT i, randomblob({ROW_BYTES}) FROM n")
    return a, b, a.rows(STORE, DIGEST.format("T")), quote_ident(device_table_name(a.id, "T"))


def test_a_push_onto_a_full_disk_is_code_15_then_completes_once_there_is_room(
        receiver_disk: Path, linked_daemons: Callable[..., list[Node]]) -> None:
    a, b, sent, copy = more_than_the_disk_holds(linked_daemons)

    result = a.sync("push", STORE, [b])[b.id]
    assert result["code"] == 15, result
    assert "disk full" in result["message"] and "nothing applied, watermark unchanged" in result["message"]

    # One line each side, no traceback.
    receiver_says = log_lines(b, f"disk full while applying batch from {a.id}", "nothing applied, watermark unchanged")
    assert len(receiver_says) == 1, b.proc.log()[-3000:]
    assert len(log_lines(a, "the peer's disk is full", b.id)) == 1, a.proc.log()[-3000:]
    for node in (a, b):
        assert "Traceback" not in node.proc.log()

    # Nothing lost: what arrived is whole and equals what was sent (a batch
    # holds up to 4 MiB, more than this disk: maybe nothing arrived, and the
    # device table created with the first batch was rolled back with it).
    exists = b.rows(STORE, "SELECT count(*) FROM sqlite_master WHERE name = ?", [device_table_name(a.id, "T")]) == [[1]]
    got = b.rows(STORE, DIGEST.format(copy)) if exists else []
    assert len(got) < ROWS and got == sent[:len(got)]
    # A local write on the full disk is a clear API error too.
    with pytest.raises(DiskFull) as info:
        b.call("store.execute", **STORE, sql=f"INSERT INTO T VALUES (1, randomblob({ROWS * ROW_BYTES}))")
    assert str(receiver_disk) in info.value.message

    resize_tmpfs(receiver_disk, "64m")  # space returns
    result = a.sync("push", STORE, [b])[b.id]
    assert result["code"] == 0, result
    assert b.rows(STORE, DIGEST.format(copy)) == sent
    assert b.rows(STORE, "PRAGMA integrity_check") == [["ok"]]


def test_a_pull_onto_a_full_disk_is_code_15_then_completes_once_there_is_room(
        receiver_disk: Path, linked_daemons: Callable[..., list[Node]]) -> None:
    """The same, with the receiver starting the session (issue 12 item 6):
    its own result says DISK_FULL, nothing half-applied, and its next pull
    brings the rest."""
    a, b, sent, copy = more_than_the_disk_holds(linked_daemons)

    result = b.sync("pull", STORE, [a])[a.id]
    assert result["code"] == 15, result
    assert "disk full" in result["message"], result
    assert len(log_lines(b, f"disk full while applying batch from {a.id}", "nothing applied, watermark unchanged")) == 1, b.proc.log()[-3000:]
    for node in (a, b):
        assert "Traceback" not in node.proc.log()
    exists = b.rows(STORE, "SELECT count(*) FROM sqlite_master WHERE name = ?", [device_table_name(a.id, "T")]) == [[1]]
    got = b.rows(STORE, DIGEST.format(copy)) if exists else []
    assert len(got) < ROWS and got == sent[:len(got)], "what was applied is whole batches, in order"

    resize_tmpfs(receiver_disk, "64m")
    result = b.sync("pull", STORE, [a])[a.id]
    assert result["code"] == 0, result
    assert b.rows(STORE, DIGEST.format(copy)) == sent
    assert b.rows(STORE, "PRAGMA integrity_check") == [["ok"]]


# -- read-only data dir ------------------------------------------------------------------

def start_fails(proc: DaemonProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(proc.argv, capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "existing"])
def test_the_daemon_refuses_a_read_only_data_dir_in_one_line(short_tmp: Path, fresh: bool) -> None:
    proc = DaemonProcess(short_tmp, "ro", ["--no-discovery", *LOOPBACK])
    if fresh:
        proc.data_dir.mkdir(mode=0o700)
    else:  # a data dir a daemon has used: identity, trust list, a store
        proc.start()
        with proc.client() as api:
            api.call("store.open", **STORE)
            api.call("store.execute", **STORE, sql=TABLE)
        assert proc.stop() == 0
    with read_only(proc.data_dir):
        done = start_fails(proc)
    assert done.returncode == 1, done
    output = (done.stdout + done.stderr).splitlines()
    # The daemon runs at --log-level debug: only warnings and errors count here.
    lines = [line for line in output if line.strip() and " DEBUG " not in line and " INFO " not in line]
    assert "Traceback" not in done.stderr
    assert lines == [f"p2pstore: CONFIG_INVALID: data directory {proc.data_dir} is not writable: Read-only file system"], lines


def test_a_store_directory_that_cant_be_written_is_store_read_only(daemon_factory: Callable[..., DaemonProcess]) -> None:
    proc = daemon_factory("a", *LOOPBACK)
    with proc.client() as api:
        path = Path(api.call("store.open", **STORE)["path"])
        api.call("store.execute", **STORE, sql=TABLE)
        api.call("store.insert", **STORE, table="T", values={"id": 1})
        api.call("store.close", **STORE)
        with read_only(path.parent):
            with pytest.raises(StoreReadOnly) as existing:
                api.call("store.open", **STORE)
            with pytest.raises(StoreReadOnly) as new:
                api.call("store.open", store="another")
        assert str(path.parent) in existing.value.message and "read-only file system" in existing.value.message
        assert str(path.parent) in new.value.message
        api.call("store.open", **STORE)  # writable again: it opens, data intact
        assert api.call("store.query", **STORE, sql="SELECT id FROM T")["rows"] == [[1]]
    assert "Traceback" not in proc.log()


# -- the store file changes under the daemon ---------------------------------------------

def replace_with_other_db(path: Path) -> None:
    other = path.with_name("other.db")
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, v BLOB)")
    conn.execute("INSERT INTO T VALUES (1000, 'the other file')")
    conn.commit()
    conn.close()
    os.rename(other, path)


def overwrite_with_garbage(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(os.urandom(path.stat().st_size))


FAULTS: dict[str, tuple[Callable[[Path], None], list[list[Any]] | None]] = {
    # fault, and what store.close + store.open then find in T (None: not a database)
    "deleted": (Path.unlink, []),
    "replaced": (replace_with_other_db, [[1000]]),
    "overwritten": (overwrite_with_garbage, None),
}


@pytest.mark.parametrize("change", list(FAULTS))
def test_a_store_file_changed_under_the_daemon_is_refused_and_nothing_acked_is_lost(
        daemon_factory: Callable[..., DaemonProcess], change: str) -> None:
    fault, after_reopen = FAULTS[change]
    proc = daemon_factory("a", *LOOPBACK)
    with proc.client() as api:
        path = Path(api.call("store.open", **STORE)["path"])
        api.call("store.execute", **STORE, sql=TABLE)
        for i in range(20):
            api.call("store.insert", **STORE, table="T", values={"id": i, "v": f"acked {i}"})
        fault(path)
        # The poll loop notices with no request at all, and says so once.
        wait_until(lambda: log_lines(proc, "the store stops serving"), 10, "the daemon logs the changed file")
        with pytest.raises(StoreFileChanged) as refused:
            api.call("store.insert", **STORE, table="T", values={"id": 99, "v": "never acked"})
        assert refused.value.data["change"] == change and str(path) in refused.value.message
        with pytest.raises(StoreFileChanged):
            api.call("store.query", **STORE, sql="SELECT count(*) FROM T")
        assert len(log_lines(proc, "the store stops serving", change)) == 1
        rescued = Path(refused.value.data["rescued"])
        conn = sqlite3.connect(rescued)
        assert conn.execute("SELECT id, v FROM T ORDER BY id").fetchall() == [(i, f"acked {i}") for i in range(20)]
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        conn.close()

        api.call("store.close", **STORE)
        if after_reopen is None:
            overwrite_with_garbage(path)  # the other program's file, as it meant it (close checkpointed into it)
            with pytest.raises(Exception) as invalid:
                api.call("store.open", **STORE)
            assert getattr(invalid.value, "name", None) == "STORE_INVALID" and str(path) in str(invalid.value)
        else:
            api.call("store.open", **STORE)
            rows = api.call("store.query", **STORE, sql="SELECT id FROM T")["rows"] if after_reopen else \
                api.call("store.query", **STORE, sql="SELECT name FROM sqlite_master WHERE name = 'T'")["rows"]
            assert rows == after_reopen
        assert api.call("device.info")["device_id"]  # the daemon serves on
    assert "Traceback" not in proc.log()
