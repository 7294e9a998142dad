"""Bounded sync state (store/gc.py): per-peer acks, forgetting deletes below
the lowest ack of the holding peers, and the resync of a peer left behind.

``gc_push`` does what the sync engine does around a push: the receiver's
position is recorded as its ack, a peer below what was forgotten gets a
resync (snapshot) instead of the stream, and its last ack is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
from replicas import Replica, field, replica_maker, schema_doc

from p2pstore.store import capture, changes, gc, merge
from p2pstore.store.stream import changes_since
from p2pstore.store.tables import device_table_name

ITEMS = "CREATE TABLE items(id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL UNIQUE, a INTEGER, b TEXT)"
ITEMS_DOC = schema_doc({"items": (
    [field("id", "Integer", autoinc=True), field("uid", "Text", pk=True, not_null=True), field("a", "Integer"), field("b", "Text")],
    ["uid", "a", "b"],
)})
NOTES = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT, n INTEGER)"
NOW = 10_000_000  # the "unix ms" acks are recorded at in these tests
HOUR = 3_600_000


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    with replica_maker(tmp_path, ITEMS, ITEMS_DOC, NOTES) as make:
        yield make


def tx(r: Replica, fn: Callable[[], Any]) -> Any:
    r.conn.execute("BEGIN IMMEDIATE")
    try:
        capture.stamp(r.conn, r.state, r.clock)
        out = fn()
        r.conn.execute("COMMIT")
        return out
    except BaseException:
        r.conn.execute("ROLLBACK")
        raise


def wire(batch: changes.OutBatch) -> changes.OutBatch:
    return changes.batch_from_plain(msgpack.unpackb(msgpack.packb(changes.batch_to_plain(batch), use_bin_type=True), raw=False))


def gc_push(sender: Replica, receiver: Replica, *, at: int = NOW, limit: int = 2) -> str:
    """A push as the engine does it; "stream" or "resync" (what was sent)."""
    since, stream = merge.position(receiver.conn, sender.id)

    def begin() -> tuple[int, int | None]:
        start = changes.start_position(sender.conn, since, stream)
        gc.record_ack(sender.conn, receiver.id, since, stream, at)
        return start, gc.resync_hlc(sender.conn, start, since, stream)

    start, snapshot = tx(sender, begin)
    cursor: Any = None
    last = None
    for _ in range(10_000):
        if snapshot is None:
            batch = wire(tx(sender, lambda: changes_since(sender.conn, None, start, limit=limit)))
        else:
            batch, cursor = tx(sender, lambda: gc.snapshot_batch(sender.conn, cursor, snapshot, limit=limit))
            batch = wire(batch)
        result = receiver.apply(batch, sender.id)
        last = result.last_seq
        if snapshot is None:
            start = batch.last_seq
        if not batch.more:
            break
    tx(sender, lambda: gc.record_ack(sender.conn, receiver.id, last, capture.stream_id(sender.conn), at))
    return "stream" if snapshot is None else "resync"


def collect(r: Replica, holders: Sequence[str], *, now: int = NOW, horizon: int = HOUR, keep_recent: int = 0) -> int:
    total = 0
    for _ in range(1000):
        mark = capture.get_meta(r.conn, gc.GC_MARK_KEY, 0)
        total += tx(r, lambda: gc.collect(r.conn, r.state, gc.ack_floor(r.conn, holders, now - horizon),
                                          keep_recent=keep_recent, chunk=3))
        if capture.get_meta(r.conn, gc.GC_MARK_KEY, 0) == mark:
            return total
    raise AssertionError("collect did not finish")


def count(r: Replica, table: str) -> int:
    return r.rows(f"SELECT count(*) FROM {table}")[0][0]


SYNCED = "SELECT uid, a, b FROM items ORDER BY uid"


def test_tombs_go_only_once_every_holding_peer_acked_them(device) -> None:
    a, b, c = device("DEVA"), device("DEVB"), device("DEVC")
    for i in range(6):
        a.write("INSERT INTO items(uid, a) VALUES (?, ?)", (f"u{i}", i))
    gc_push(a, b)
    gc_push(a, c)
    a.write("DELETE FROM items WHERE a < 4")
    assert count(a, "_p2p_tombs") == 4
    gc_push(a, b)
    # C has not acked the deletes: nothing is forgotten.
    assert collect(a, ["DEVB", "DEVC"]) == 0 and count(a, "_p2p_tombs") == 4
    gc_push(a, c)
    assert collect(a, ["DEVB", "DEVC"]) == 4
    assert count(a, "_p2p_tombs") == 0
    assert count(a, "_p2p_clocks") == 2 * 3  # the two rows left, three sync columns each
    assert gc.gc_seq(a.conn) > 0 and gc.gc_hlc(a.conn) > 0
    assert a.rows(SYNCED) == b.rows(SYNCED) == c.rows(SYNCED) == [("u4", 4, None), ("u5", 5, None)]
    # A row that exists again keeps its tomb (it says which of its cells are hidden).
    a.write("DELETE FROM items WHERE uid = 'u4'")
    a.write("INSERT INTO items(uid) VALUES ('u4')")
    gc_push(a, b)
    gc_push(a, c)
    collect(a, ["DEVB", "DEVC"])
    assert count(a, "_p2p_tombs") == 1


def test_an_untrusted_or_expired_peer_no_longer_holds_gc_back(device) -> None:
    a, b, c = device("DEVA"), device("DEVB"), device("DEVC")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1), ('y', 2)")
    gc_push(a, b)
    gc_push(a, c, at=NOW - 2 * HOUR)  # C was last heard of two hours ago
    a.write("DELETE FROM items WHERE uid = 'x'")
    gc_push(a, b)
    assert collect(a, ["DEVB", "DEVC"], horizon=3 * HOUR) == 0  # within the horizon, C holds it back
    assert collect(a, ["DEVB"], horizon=3 * HOUR) == 1  # untrusted: it no longer does
    d, e = device("DEVD"), device("DEVE")
    a.write("INSERT INTO items(uid) VALUES ('z')")
    gc_push(a, d)
    gc_push(a, e, at=NOW - 2 * HOUR)  # E was last heard of two hours ago
    a.write("DELETE FROM items WHERE uid = 'z'")
    gc_push(a, d)
    assert collect(a, ["DEVD", "DEVE"], horizon=3 * HOUR) == 0  # E has not acked the delete
    assert collect(a, ["DEVD", "DEVE"], horizon=HOUR) == 1  # past the horizon: it stops holding


def test_a_peer_behind_what_was_forgotten_is_resynced_without_resurrection(device) -> None:
    a, b, c = device("DEVA"), device("DEVB"), device("DEVC")
    for i in range(7):
        a.write("INSERT INTO items(uid, a) VALUES (?, ?)", (f"u{i}", i))
    gc_push(a, b)
    gc_push(a, c)
    c.write("INSERT INTO items(uid, a) VALUES ('c-own', 1)")  # C's own row, never sent: must survive
    a.write("DELETE FROM items WHERE a % 2 = 0")
    a.write("UPDATE items SET b = 'new' WHERE uid = 'u1'")
    gc_push(a, b)
    assert collect(a, ["DEVB"]) == 4  # C untrusted (or away): the deletes are forgotten
    # C would resurrect them by pushing its stale rows: refused until resynced.
    assert tx(a, lambda: gc.must_resync_first(a.conn, "DEVC"))
    assert gc_push(a, c) == "resync"
    assert c.rows(SYNCED) == [("c-own", 1, None), ("u1", 1, "new"), ("u3", 3, None), ("u5", 5, None)]
    assert not tx(a, lambda: gc.must_resync_first(a.conn, "DEVC"))
    assert gc_push(c, a) == "stream"
    assert a.rows(SYNCED) == c.rows(SYNCED)
    assert gc_push(a, c) == "stream"  # caught up: the stream again
    gc_push(b, c)
    gc_push(c, b)
    assert b.rows(SYNCED) == a.rows(SYNCED)
    # A new peer that never received anything from A needs no resync.
    d = device("DEVD")
    assert gc_push(a, d) == "stream"
    assert d.rows(SYNCED) == [r for r in a.rows(SYNCED)]


def test_collaborative_own_log_is_forgotten_and_a_late_peer_resynced(device) -> None:
    a, b, c = (device(i, kind="collaborative") for i in ("DEVA", "DEVB", "DEVC"))
    a.write("INSERT INTO notes(id, body, n) VALUES " + ", ".join(f"({i}, 'x', {i})" for i in range(8)))
    gc_push(a, b)
    gc_push(a, c, limit=8)  # (rows appended together: one run of clocks on C, store/row_runs.py)
    a.write("DELETE FROM notes WHERE n < 3")
    a.write("UPDATE notes SET body = 'y' WHERE id = 5")
    gc_push(a, b)
    log_before = count(a, "_p2p_log")
    assert collect(a, ["DEVB", "DEVC"]) == 8  # the inserts both acked; C has not acked the rest
    assert tx(a, lambda: gc.resync_hlc(a.conn, merge.watermark(c.conn, "DEVA"), 1, "x")) is None  # C needs no resync yet
    assert collect(a, ["DEVB"]) > 0
    assert count(a, "_p2p_log") == 1 < log_before  # only the highest seq stays
    # keep_recent rows stay whatever the acks
    a.write("UPDATE notes SET n = 50 WHERE id = 7")
    a.write("UPDATE notes SET n = 51 WHERE id = 6")
    gc_push(a, b)
    assert collect(a, ["DEVB"], keep_recent=2) == 1  # the old highest seq; the newest two stay
    assert count(a, "_p2p_log") == 2
    expected = a.rows("SELECT id, body, n FROM notes ORDER BY id")
    dev_a = device_table_name("DEVA", "notes")
    runs_before = count(c, "_p2p_row_runs")
    assert gc_push(a, c) == "resync"
    assert c.rows(f'SELECT id, body, n FROM "{dev_a}" ORDER BY id') == expected
    # The rows the snapshot did not hold went with their clocks, a run's too (store/row_runs.py).
    assert runs_before == 1 and count(c, "_p2p_row_runs") == 0
    assert c.rows("SELECT ck FROM _p2p_clocks WHERE tid = (SELECT tid FROM _p2p_tables WHERE name = ?) ORDER BY ck",
                  [dev_a]) == [(k,) for k, _, _ in expected]
    assert gc_push(a, c) == "stream"
    # A later change still wins over the snapshot's clocks on C.
    a.write("UPDATE notes SET body = 'z' WHERE id = 4")
    assert gc_push(a, c) == "stream"
    assert c.rows(f'SELECT body FROM "{dev_a}" WHERE id = 4') == [("z",)]
    # A new peer from scratch gets every row, though their log rows are gone.
    d = device("DEVD", kind="collaborative")
    assert gc_push(a, d) == "resync"
    assert d.rows(f'SELECT id, body, n FROM "{dev_a}" ORDER BY id') == a.rows("SELECT id, body, n FROM notes ORDER BY id")


def test_a_resync_cut_short_starts_over_and_keeps_the_watermark(device) -> None:
    a, c = device("DEVA", kind="collaborative"), device("DEVC", kind="collaborative")
    for i in range(6):
        a.write("INSERT INTO notes(id, body) VALUES (?, 'x')", (i,))
    gc_push(a, c)
    a.write("DELETE FROM notes WHERE id < 2")
    collect(a, [])
    since = merge.position(c.conn, "DEVA")
    snapshot = gc.gc_hlc(a.conn)
    first, _cursor = tx(a, lambda: gc.snapshot_batch(a.conn, None, snapshot, limit=2))
    c.apply(wire(first), "DEVA")  # then the session breaks
    assert merge.position(c.conn, "DEVA") == since  # the watermark waits for the end
    assert gc_push(a, c) == "resync"
    dev_a = device_table_name("DEVA", "notes")
    assert c.rows(f'SELECT id FROM "{dev_a}" ORDER BY id') == [(i,) for i in range(2, 6)]
    assert count(c, "_p2p_resync") == 0
