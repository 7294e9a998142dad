"""Origin marks (protocol 3, ``have``): what a receiver says it holds per
origin (store/merge.py ``origin_marks``) and what a sender leaves out for it
(store/stream.py ``_uncovered``). That leaving rows out never changes what
replicas converge to is the convergence property's business
(tests/store/test_merge.py, its marked syncs); here, what the marks claim
and when."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from replicas import Replica, applied, replica_maker
from test_merge import ITEMS, ITEMS_DOC, NOTES, SYNCED

from p2pstore.protocol.batch import Grant
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


# -- pushes of a device's own changes (protocol 4, ``SyncOpen.own``) -------------


def test_an_own_push_carries_no_relayed_row_and_leaves_the_watermark_for_a_whole_push(device) -> None:
    a, b, c = device("DEVA"), device("DEVB"), device("DEVC")
    insert(a, "a1")
    a.push(b)
    insert(b, "b1")
    # B's own push to C: B's row only; A's row, which C's marks don't cover, is left out ...
    out = b.push(c, own=True)
    assert applied(out) == 1 and c.rows(SYNCED) == [("b1", 1, "p")]
    # ... so C's watermark for B stays (a whole push must still bring A's row); its eager position moves.
    assert merge.position(c.conn, "DEVB")[0] == 0
    assert merge.eager_position(c.conn, "DEVB")[0] == capture.last_seq(b.conn) > 0
    out = b.push(c, marks=True)
    assert applied(out) == 1 and c.rows(SYNCED) == b.rows(SYNCED) == [("a1", 1, "p"), ("b1", 1, "p")]
    assert merge.position(c.conn, "DEVB")[0] == capture.last_seq(b.conn)
    # The next own push starts where C holds all of B's changes: nothing again.
    assert b.read(merge.eager_position(c.conn, "DEVB")[0], own_only=True).count == 0


def test_an_own_push_with_nothing_relayed_to_leave_out_is_a_whole_one(device) -> None:
    a, b, c = device("DEVA"), device("DEVB"), device("DEVC")
    insert(a, "a1")
    a.push(b)
    a.push(c)  # C has A's row from A: its marks cover it
    insert(b, "b1")
    batch = b.read(0, covered=marks(c), own_only=True)
    assert batch.full and batch.count == 1
    b.push(c, own=True)
    assert merge.position(c.conn, "DEVB")[0] == capture.last_seq(b.conn)


def test_an_own_push_gives_the_mark_of_its_sender_only_from_where_all_its_changes_are_here(device) -> None:
    b, c = device("DEVB"), device("DEVC")
    insert(b, "b1")
    first = newest(b)
    insert(b, "b2")
    # A run that starts past the first change (C never had it) says nothing of B's changes ...
    late = b.read(1, own_only=True, covered={})
    assert late.count == 1
    c.apply(dataclasses.replace(late, full=False, own=True), "DEVB")
    assert "DEVB" not in marks(c) and merge.eager_position(c.conn, "DEVB")[0] == 0
    # ... one from where C holds all of them does, once it reaches the end.
    b.push(c, own=True)
    assert marks(c)["DEVB"] == newest(b) > first
    # A whole push from elsewhere leaves out B's rows, which the mark covers.
    a = device("DEVA")
    b.push(a)
    assert a.read(0, covered=marks(c)).count == 0


def test_a_row_an_own_push_left_out_still_arrives_from_its_writer(device) -> None:
    """B's older change to a row that A changed since is covered by C's mark
    for B without ever reaching C: A's newer change does, from A."""
    a, b, c = device("DEVA"), device("DEVB"), device("DEVC")
    insert(b, "k")
    b.push(a)
    a.write("DELETE FROM items WHERE uid = 'k'")
    a.write("INSERT INTO items(uid, a, b) VALUES ('k', 5, 'p')")  # every clock of k is A's now
    a.push(b)
    insert(b, "b2")
    b.push(c, own=True)  # k: left out
    assert c.rows(SYNCED) == [("b2", 1, "p")] and marks(c)["DEVB"] == b.rows(
        "SELECT max(hlc) FROM _p2p_clocks WHERE origin IS NULL")[0][0]
    # A whole push from B would leave k's older change by B out too (covered); A's own push brings it.
    assert [r for r in b.read(0, covered=marks(c)).blocks[0].rows if r[0] == "k"]  # A's clocks: not covered
    a.push(c, own=True)
    assert c.rows(SYNCED) == b.rows(SYNCED) == [("b2", 1, "p"), ("k", 5, "p")]


def test_an_own_push_that_left_nothing_out_goes_on_from_where_the_last_one_ended(device) -> None:
    """Own pushes, one leaving A's row out, the next with nothing to leave out
    (C got A's row meanwhile): that whole batch starts past C's watermark for
    B, where the first one ended — it moves the eager position and the mark."""
    a, b, c = device("DEVA"), device("DEVB"), device("DEVC")
    insert(a, "a1")
    a.push(b)
    insert(b, "b1")
    b.push(c, own=True)  # A's row left out: eager position, not watermark
    a.push(c)
    insert(b, "b2")
    out = b.push(c, own=True)
    assert applied(out) == 1 and merge.position(c.conn, "DEVB")[0] == 0
    assert merge.eager_position(c.conn, "DEVB")[0] == capture.last_seq(b.conn)
    assert marks(c)["DEVB"] == b.rows("SELECT max(hlc) FROM _p2p_clocks WHERE origin IS NULL")[0][0]


# -- marks granted along a writer's tree (protocol 5, ``OutBatch.grants``) --------


def test_a_forwarded_push_grants_the_forwarder_s_mark_where_it_holds(device) -> None:
    a, p, q = device("DEVA"), device("DEVP"), device("DEVQ")
    insert(a, "a1", "a2")
    a.push(p)  # P holds all of A's changes: its mark for A
    assert marks(p)["DEVA"] == newest(a)
    # P passes A's rows on to Q (Q under P in A's tree), having forwarded A since seq 0: Q holds them all
    out = p.push(q, own=True, forwarding=frozenset({"DEVA"}), book={"DEVA": 0})
    assert applied(out) == 2 and q.rows(SYNCED) == a.rows(SYNCED)
    assert out[-1].marks and marks(q)["DEVA"] == newest(a)
    # ... and a whole push from anyone now leaves A's rows out for Q
    assert a.read(0, covered=marks(q)).count == 0


def test_no_grant_without_the_stream_before_from_seq_or_before_the_end(device) -> None:
    a, p, q = device("DEVA"), device("DEVP"), device("DEVQ")
    insert(a, "a1")
    a.push(p)
    insert(p, "p1")
    p.push(q, own=True)  # P did not forward A then: a1 stays behind, Q's eager position moves past it
    assert q.rows(SYNCED) == [("p1", 1, "p")]
    start = merge.eager_position(q.conn, "DEVP")[0]
    insert(a, "a2")
    a.push(p)
    # from here on P forwards A: a2 arrives, but Q lacks a1, before from_seq: no mark for A
    out = p.push(q, own=True, forwarding=frozenset({"DEVA"}), book={"DEVA": start})
    assert applied(out) == 1 and "DEVA" not in marks(q)
    # a run cut before its end grants nothing either, even from seq 0
    r = device("DEVR")
    first = p.read(0, limit=1, own_only=True, forwarding=frozenset({"DEVA"}), grants={"DEVA": 0})
    assert first.more and first.grants == ()
    r.apply(dataclasses.replace(first, own=not first.full), "DEVP")
    assert "DEVA" not in marks(r)
    # once Q holds P's stream whole (a whole push brings a1), the same claim holds
    p.push(q, marks=True)
    assert q.rows(SYNCED) == p.rows(SYNCED)
    insert(p, "p2")
    p.push(q, own=True, forwarding=frozenset({"DEVA"}), book={"DEVA": start})
    assert marks(q)["DEVA"] == newest(a)


def test_the_whole_push_that_moves_the_watermark_grants_too(device) -> None:
    """The lazy whole push that brings a peer P's stream up to where its
    forwarding began is often the last push of a quiet fleet: it carries
    the grants itself (a table's or a filtered sync's batches do not), so
    the peer's marks don't wait for the next write."""
    a, p, q = device("DEVA"), device("DEVP"), device("DEVQ")
    insert(a, "a1")
    a.push(p)
    insert(p, "p1")
    p.push(q, own=True)  # a1 stays behind on P
    start = merge.eager_position(q.conn, "DEVP")[0]
    insert(a, "a2")
    a.push(p)
    p.push(q, own=True, forwarding=frozenset({"DEVA"}), book={"DEVA": start})
    assert "DEVA" not in marks(q)  # Q lacks a1, before from_seq: the grant could not be taken
    for table in ("items", None):
        since = merge.position(q.conn, "DEVP")[0]
        batch = p.read(since, table=table, covered=marks(q), grants={"DEVA": start})
        assert not batch.more and batch.full is (table is None)
        assert batch.grants == (() if table else (Grant("DEVA", newest(a), start),))
        q.apply(batch, "DEVP")
        assert ("DEVA" in marks(q)) is (table is None)
    assert q.rows(SYNCED) == p.rows(SYNCED) and marks(q)["DEVA"] == newest(a)


def test_grants_travel_on_the_wire_and_a_rebuild_drops_them(device) -> None:
    from p2pstore.protocol.batch import decode, encode

    a, p, q = device("DEVA"), device("DEVP"), device("DEVQ")
    insert(a, "a1")
    a.push(p)
    batch = p.read(0, own_only=True, forwarding=frozenset({"DEVA"}), grants={"DEVA": 0})
    assert batch.grants == (Grant("DEVA", newest(a), 0),)
    assert decode(encode(batch)).grants == batch.grants
    p.push(q, own=True, forwarding=frozenset({"DEVA"}), book={"DEVA": 0})
    assert marks(q)["DEVA"] == newest(a)
    rebuild.drop_copy(q.conn, sync_tables(q.conn, "items")[0])  # a rebuild: the rows come back from peers
    assert "DEVA" not in marks(q)
