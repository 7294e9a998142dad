"""Origin marks (protocol 3, ``have``): what a receiver says it holds per
origin (store/merge.py ``origin_marks``) and what a sender leaves out for it
(store/stream.py ``_uncovered``). That leaving rows out never changes what
replicas converge to is the convergence property's business
(tests/store/test_merge.py, its marked syncs); here, what the marks claim
and when."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from replicas import Replica, applied, replica_maker
from test_merge import ITEMS, ITEMS_DOC, NOTES, SYNCED

from p2pstore.store import capture, merge, rebuild, restore
from p2pstore.store.changes import sync_tables


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    with replica_maker(tmp_path, ITEMS, ITEMS_DOC, NOTES) as make:
        yield make


def marks(r: Replica) -> dict[str, int]:
    return dict(merge.origin_marks(r.conn, r.clock.last))


def newest(r: Replica) -> int:
    return r.rows("SELECT max(hlc) FROM _p2p_clocks")[0][0]


def insert(r: Replica, *keys: str) -> None:
    for key in keys:
        r.write("INSERT INTO items(uid, a, b) VALUES (?, 1, 'p')", (key,))


def test_a_peer_s_own_changes_count_once_its_stream_was_taken_to_its_end(device) -> None:
    a, b = device("DEVA"), device("DEVB")
    assert marks(b) == {}  # nothing written, nothing received
    insert(a, "k1", "k2")
    a.push(b)
    assert marks(b)["DEVA"] == newest(a)
    before = marks(b)["DEVA"]
    insert(a, "k3", "k4", "k5")
    # One batch of three: the stream is not drained, so the mark does not move yet ...
    first = a.read(merge.position(b.conn, "DEVA")[0], limit=1)
    assert first.more
    b.apply(first, "DEVA")
    assert marks(b)["DEVA"] == before
    # ... and once the rest arrived it covers all of A's changes.
    a.push(b)
    assert marks(b)["DEVA"] == newest(a) > before
    b.write("UPDATE items SET a = 2 WHERE uid = 'k1'")
    assert marks(b)["DEVB"] == b.clock.last >= newest(b)


def test_a_sender_leaves_out_rows_the_marks_cover_and_the_watermark_still_moves(device) -> None:
    a, b, c = device("DEVA"), device("DEVB"), device("DEVC")
    insert(a, "k1", "k2", "k3")
    a.push(b)
    a.push(c)
    # B relays A's rows to C, which has them from A: nothing travels, C's watermark for B moves.
    batch = b.read(0, covered=marks(c))
    assert batch.count == 0 and batch.full and not batch.more
    c.apply(batch, "DEVB")
    assert merge.position(c.conn, "DEVB")[0] == batch.last_seq > 0
    # A row B changed travels whole: its other cells are A's, one is B's.
    b.write("UPDATE items SET a = 7 WHERE uid = 'k2'")
    out = b.push(c, marks=True)
    assert applied(out) == 1 and c.rows(SYNCED) == b.rows(SYNCED)
    # Without marks, B's stream would have sent every row again.
    assert b.read(0).count == 3


def test_a_device_that_dropped_rows_of_its_own_no_longer_claims_them(device, tmp_path: Path) -> None:
    a, b = device("DEVA"), device("DEVB")
    insert(a, "k1")
    a.push(b)
    assert "DEVA" in marks(a) and "DEVA" in marks(b)
    a.conn.execute("BEGIN IMMEDIATE")
    rebuild.drop_copy(a.conn, sync_tables(a.conn, "items")[0])
    a.conn.execute("COMMIT")
    assert marks(a) == {}, "a rebuild forgets its watermarks, and its own rows must come back from peers"
    b.push(a, marks=True)
    assert a.rows(SYNCED) == [("k1", 1, "p")]
    assert marks(a) == {"DEVB": newest(b)}, "and none of its own"

    b.conn.execute("BEGIN IMMEDIATE")
    restore.mark_restored(b.conn, capture.stream_id(b.conn))
    b.conn.execute("COMMIT")
    assert "DEVB" not in marks(b), "a file restored from a backup lacks what it wrote after the backup"
