"""Applying peers' changes (store/merge.py): merge rules, relay, conflicts,
failures, watermarks, crash safety.

Two or three real SQLite files in a temp dir act as devices
(``replicas.Replica``); changes travel as the sync engine will carry them:
``changes_since`` on the sender, msgpack-ready plain form, ``apply_batch``
on the receiver.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from replicas import Replica, applied, field, schema_doc

from p2pstore.errors import FailureNotFound, StoreInvalid
from p2pstore.store import capture, changes, collaborative, merge, policies
from p2pstore.store.changes import Cell, OutBatch, RowChange
from p2pstore.store.tables import device_table_name, read_table_info

ITEMS = "CREATE TABLE items(id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL UNIQUE, a INTEGER, b TEXT, note TEXT)"
ITEMS_FIELDS = [
    field("id", "Integer", autoinc=True), field("uid", "Text", pk=True, not_null=True),
    field("a", "Integer"), field("b", "Text"), field("note", "Text"),
]
ITEMS_DOC = schema_doc({"items": (ITEMS_FIELDS, ["uid", "a", "b"])})
NOTES = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT, n INTEGER)"
TAGS = "CREATE TABLE tags(name TEXT, x INTEGER)"
SYNCED = "SELECT uid, a, b FROM items ORDER BY uid"


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(device_id: str, *, kind: str = "single_version", table: str = ITEMS, doc: dict[str, Any] = ITEMS_DOC,
             wall: int | None = None) -> Replica:
        r = Replica(tmp_path / f"{device_id}.db", device_id, wall=wall)
        if kind == "single_version":
            r.write(table)
            r.make_distributed("items", doc=doc)
        else:
            r.write(NOTES)
            r.write(TAGS)
            r.make_distributed("notes", "tags")
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def local_changes(r: Replica) -> dict[str, Any]:
    """What the next stamp would announce as local changes."""
    with r.outside():
        pass
    r.conn.execute("BEGIN IMMEDIATE")
    batch = capture.stamp(r.conn, r.state, r.clock)
    r.conn.execute("COMMIT")
    return batch.by_table


# --------------------------------------------------------------------------
# collaborative


def test_collaborative_rows_land_in_the_senders_device_table(device) -> None:
    a, b = device("DEVA", kind="collaborative"), device("DEVB", kind="collaborative")
    a.write("INSERT INTO notes(id, body, n) VALUES (1, 'one', 1), (2, 'two', 2)")
    a.write("INSERT INTO tags(name, x) VALUES ('t', 7)")
    b.write("INSERT INTO notes(id, body, n) VALUES (1, 'b own', 0)")
    (result,) = a.push(b)
    assert (result.applied, result.failed) == (3, 0)
    notes, tags = device_table_name("DEVA", "notes"), device_table_name("DEVA", "tags")
    assert b.rows(f'SELECT * FROM "{notes}" ORDER BY id') == [(1, "one", 1), (2, "two", 2)]
    assert b.rows(f'SELECT name, x, _p2p_rowid FROM "{tags}"') == [("t", 7, 1)]
    assert b.rows("SELECT * FROM notes") == [(1, "b own", 0)]  # B's own table is untouched
    assert result.remote_change_infos() == {"DEVA": [
        {"table": "notes", "type": "data", "inserted": [1, 2], "updated": [], "deleted": []},
        {"table": "tags", "type": "data", "inserted": [1], "updated": [], "deleted": []},
    ]}

    a.write("UPDATE notes SET body = 'ONE' WHERE id = 1")
    a.write("DELETE FROM notes WHERE id = 2")
    (result,) = a.push(b)
    assert b.rows(f'SELECT * FROM "{notes}"') == [(1, "ONE", 1)]
    assert result.remote["DEVA"]["notes"] == {"inserted": [], "updated": [1], "deleted": [2]}

    # Device tables stay read-only to everyone else.
    with b.outside() as other, pytest.raises(Exception, match="READ_ONLY_TABLE"):
        other.execute(f'DELETE FROM "{notes}"')


def test_collaborative_changes_are_idempotent_and_never_relayed(device) -> None:
    a, b, c = (device(d, kind="collaborative") for d in ("DEVA", "DEVB", "DEVC"))
    a.write("INSERT INTO notes(id, body) VALUES (1, 'one')")
    stale = a.read(0)
    a.write("UPDATE notes SET body = 'newer' WHERE id = 1")
    a.push(b)
    notes = device_table_name("DEVA", "notes")
    assert b.apply(stale, "DEVA").applied == 0  # older than what B has
    assert b.rows(f'SELECT body FROM "{notes}"') == [("newer",)]
    assert applied(b.push(c)) == 0  # B sends only its own rows
    assert c.rows("SELECT name FROM sqlite_master WHERE name LIKE 'dev_%'") == []
    assert local_changes(b) == {}  # the apply path is not a local change


def test_collaborative_rows_are_only_taken_from_their_own_device(device) -> None:
    a, b = device("DEVA", kind="collaborative"), device("DEVB", kind="collaborative")
    a.write("INSERT INTO notes(id, body) VALUES (1, 'one')")
    batch = a.read(0)
    result = b.apply(batch, "DEVC")  # C relaying A's rows
    assert (result.applied, result.failed) == (0, 1)
    assert "only accepted from their own device" in merge.sync_failures(b.conn)[0].reason


def test_collaborative_unknown_column_is_parked_and_merged_when_the_column_is_added(device, tmp_path: Path) -> None:
    a = Replica(tmp_path / "wide.db", "DEVA")
    a.write("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT, n INTEGER, extra TEXT)")
    a.write("CREATE TABLE tags(name TEXT, x INTEGER)")
    a.make_distributed("notes", "tags")
    b = device("DEVB", kind="collaborative")
    a.write("INSERT INTO notes VALUES (1, 'one', 1, 'more')")
    a.write("INSERT INTO tags VALUES ('t', 1)")
    (result,) = a.push(b)
    assert (result.applied, result.failed, result.parked) == (2, 0, 1)  # tags applies as before
    assert merge.sync_failures(b.conn) == []
    dev = capture.device_table_name("DEVA", "notes")
    assert b.rows(f"SELECT id, body, n FROM {dev}") == [(1, "one", 1)]
    assert b.rows("SELECT col, value FROM _p2p_parked") == [("extra", "more")]
    assert merge.watermark(b.conn, "DEVA") == result.last_seq > 0
    a.write("UPDATE notes SET extra = 'newer' WHERE id = 1")
    (result,) = a.push(b)
    assert b.rows("SELECT col, value FROM _p2p_parked") == [("extra", "newer")]  # the newest kept

    b.write("ALTER TABLE notes ADD COLUMN extra TEXT")  # B catches up (Store._after_ddl calls the mode's hook)
    with b.conn:
        collaborative.columns_changed(b.conn, read_table_info(b.conn, "notes"), "test")
    assert b.rows(f"SELECT id, body, n, extra FROM {dev}") == [(1, "one", 1, "newer")]
    assert b.rows("SELECT count(*) FROM _p2p_parked") == [(0,)]
    a.close()


# --------------------------------------------------------------------------
# single_version: rows, keys, columns


def test_rows_merge_by_conflict_column_with_local_keys_and_local_columns(device) -> None:
    a, b = device("DEVA"), device("DEVB")
    b.write("INSERT INTO items(uid, a, note) VALUES ('b0', 0, 'b only'), ('b1', 1, NULL)")
    a.write("INSERT INTO items(uid, a, b, note) VALUES ('x', 1, 'p', 'secret of A')")
    batch = a.read(0)
    assert "id" not in {c.column for r in batch.rows for c in r.cells}  # auto-increment keys never travel
    b.apply(batch, "DEVA")
    assert b.rows("SELECT id, uid, a, b, note FROM items WHERE uid = 'x'") == [(3, "x", 1, "p", None)]

    b.write("UPDATE items SET note = 'B note' WHERE uid = 'x'")
    a.write("UPDATE items SET a = 2, note = 'A changed note' WHERE uid = 'x'")
    a.push(b)
    assert b.rows("SELECT id, uid, a, b, note FROM items WHERE uid = 'x'") == [(3, "x", 2, "p", "B note")]
    assert a.rows("SELECT id, note FROM items") == [(1, "A changed note")]


def test_concurrent_edits_of_different_columns_both_survive(device) -> None:
    a, b = device("DEVA"), device("DEVB")
    a.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p')")
    a.push(b)
    a.write("UPDATE items SET a = 10 WHERE uid = 'x'")
    b.write("UPDATE items SET b = 'bb' WHERE uid = 'x'")
    a.push(b)
    b.push(a)
    assert a.rows(SYNCED) == b.rows(SYNCED) == [("x", 10, "bb")]
    assert merge.conflicts(a.conn) == merge.conflicts(b.conn) == []


def test_same_column_last_writer_wins_by_clock_and_the_loser_is_logged(device) -> None:
    # B's wall clock is ahead: its write wins although A writes later in real time.
    a, b = device("DEVA", wall=1_000_000), device("DEVB", wall=1_100_000)
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1)")
    a.push(b)
    b.write("UPDATE items SET a = 20 WHERE uid = 'x'")
    a.write("UPDATE items SET a = 10 WHERE uid = 'x'")
    a.push(b)
    b.push(a)
    assert a.rows(SYNCED) == b.rows(SYNCED) == [("x", 20, None)]
    (lost,) = merge.conflicts(b.conn)  # A's incoming value lost on B
    assert (lost.table, lost.key, lost.column, lost.losing_value, lost.winner, lost.loser) == ("items", "x", "a", 10, "DEVB", "DEVA")
    assert lost.winner_hlc > lost.loser_hlc
    (over,) = merge.conflicts(a.conn)  # A's own value overwritten on A
    assert (over.column, over.losing_value, over.winner, over.loser) == ("a", 10, "DEVB", "DEVA")
    assert merge.conflicts(a.conn, table="other") == []


def test_equal_clocks_are_broken_by_device_id(device) -> None:
    a, b = device("DEVA"), device("DEVB")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1)")
    a.push(b)
    hlc = a.rows("SELECT hlc FROM _p2p_clocks WHERE col = 'a'")[0][0]

    def edit(value: int, origin: str) -> OutBatch:
        row = RowChange("items", "uid", "x", 1, (Cell("a", value, hlc + 5, origin),))
        return OutBatch("single_version", 0, 0, (row,), False, False)

    b.apply(edit(100, "DEVA"), "DEVA")
    b.apply(edit(200, "DEVZ"), "DEVZ")  # same hlc, greater device ID: wins
    b.apply(edit(300, "DEVC"), "DEVC")  # same hlc, smaller: loses
    assert b.rows(SYNCED) == [("x", 200, None)]
    assert {(c.losing_value, c.winner, c.loser) for c in merge.conflicts(b.conn)} == {(100, "DEVZ", "DEVA"), (300, "DEVZ", "DEVC")}


def test_a_changed_conflict_value_moves_the_row(device) -> None:
    a, b = device("DEVA"), device("DEVB")
    a.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p')")
    a.push(b)
    a.write("UPDATE items SET uid = 'y' WHERE uid = 'x'")
    a.push(b)
    assert b.rows(SYNCED) == [("y", 1, "p")]


def test_columns_this_device_does_not_sync_are_skipped(device) -> None:
    a = device("DEVA")
    narrow = schema_doc({"items": (ITEMS_FIELDS, ["uid", "a"])})
    b = device("DEVB", doc=narrow)
    a.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p')")
    (result,) = a.push(b)
    assert (result.applied, result.failed) == (1, 0)
    assert b.rows(SYNCED) == [("x", 1, None)]
    assert b.rows("SELECT DISTINCT col FROM _p2p_clocks ORDER BY col") == [("a",), ("uid",)]


def test_an_added_sync_column_is_sent_again_for_existing_rows(device) -> None:
    narrow = schema_doc({"items": (ITEMS_FIELDS, ["uid", "a"])})
    a, b = device("DEVA", doc=narrow), device("DEVB", doc=narrow)
    a.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p')")
    a.push(b)
    assert b.rows(SYNCED) == [("x", 1, None)]
    wide = schema_doc({"items": (ITEMS_FIELDS, ["uid", "a", "b"])}, version=1)
    b.accept_schema(wide)
    assert a.accept_schema(wide).resent == {"items": 1}
    a.push(b)
    assert b.rows(SYNCED) == [("x", 1, "p")]


# --------------------------------------------------------------------------
# single_version: deletes


def test_delete_beats_an_older_update_and_loses_to_a_newer_one(device) -> None:
    a, b = device("DEVA", wall=1_000_000), device("DEVB", wall=1_000_000)
    a.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p'), ('y', 2, 'q')")
    a.push(b)
    # x: B updates (older), A deletes (newer) -> deleted everywhere.
    b.write("UPDATE items SET a = 11 WHERE uid = 'x'")
    a.wall = b.wall = 1_100_000
    a.write("DELETE FROM items WHERE uid = 'x'")
    # y: A deletes (older), B updates (newer) -> the row comes back with the newer column only.
    a.write("DELETE FROM items WHERE uid = 'y'")
    b.wall = 1_200_000
    b.write("UPDATE items SET b = 'qq' WHERE uid = 'y'")
    a.push(b)
    b.push(a)
    assert a.rows(SYNCED) == b.rows(SYNCED) == [("y", None, "qq")]
    lost = {(c.key, c.column, c.losing_value, c.winner, c.loser) for c in merge.conflicts(b.conn)}
    assert ("x", "a", 11, "DEVA", "DEVB") in lost  # B's update hidden by A's newer delete
    assert ("y", "a", 2, "DEVA", "DEVA") not in lost  # A hiding its own value is no conflict
    assert ("y", None, None, "DEVB", "DEVA") in lost  # A's delete outlived by B's newer update


def test_delete_of_an_unknown_row_keeps_a_late_older_insert_out(device) -> None:
    a, b, c = device("DEVA", wall=1_000_000), device("DEVB", wall=1_000_000), device("DEVC", wall=1_250_000)
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1)")
    a.push(c)
    c.write("DELETE FROM items WHERE uid = 'x'")
    (result,) = c.push(b)  # B has never seen x: the delete is remembered
    assert result.applied == 1 and result.remote == {}
    assert b.rows("SELECT ck FROM _p2p_tombs") == [("x",)]
    a.push(b)  # the older insert arrives late
    assert b.rows(SYNCED) == []
    assert merge.conflicts(b.conn) == []  # C had seen A's insert when it deleted: no conflict, just history


def test_a_re_inserted_row_after_a_delete_comes_back_everywhere(device) -> None:
    a, b = device("DEVA"), device("DEVB")
    a.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p')")
    a.push(b)
    a.write("DELETE FROM items WHERE uid = 'x'")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 2)")
    a.push(b)
    assert a.rows(SYNCED) == b.rows(SYNCED) == [("x", 2, None)]


# --------------------------------------------------------------------------
# Routes: relay, cycles, repeats


def test_relay_delivers_changes_with_their_original_origin(device) -> None:
    a, b, c = device("DEVA"), device("DEVB"), device("DEVC")
    a.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p')")
    a.push(b)
    (result,) = b.push(c)
    assert c.rows(SYNCED) == [("x", 1, "p")]
    assert result.remote_devices() == ["DEVA"]
    assert set(c.rows("SELECT origin FROM _p2p_clocks")) == {("DEVA",)}
    hlc_a = a.rows("SELECT hlc FROM _p2p_clocks ORDER BY col")
    assert c.rows("SELECT hlc FROM _p2p_clocks ORDER BY col") == hlc_a
    assert c.rows("SELECT origin FROM _p2p_changes WHERE origin IS NOT NULL") == [("DEVA",)]


def test_a_cycle_delivers_once_and_stops(device) -> None:
    a, b, c = device("DEVA"), device("DEVB"), device("DEVC")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1), ('y', 2)")
    b.write("INSERT INTO items(uid, a) VALUES ('z', 3)")
    first = [applied(a.push(b)), applied(b.push(c)), applied(c.push(a))]
    assert first == [2, 3, 1]  # A's own rows come back to A as no-ops
    second = [applied(a.push(b)), applied(b.push(c)), applied(c.push(a))]
    assert second == [0, 0, 0]
    assert a.rows(SYNCED) == b.rows(SYNCED) == c.rows(SYNCED) == [("x", 1, None), ("y", 2, None), ("z", 3, None)]
    counts = [r.rows("SELECT count(*) FROM items")[0][0] for r in (a, b, c)]
    assert counts == [3, 3, 3]


def test_re_applying_a_batch_changes_nothing(device) -> None:
    a, b = device("DEVA"), device("DEVB")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1)")
    a.write("DELETE FROM items WHERE uid = 'x'")
    a.write("INSERT INTO items(uid, a) VALUES ('y', 2)")
    batch = a.read(0)
    first = b.apply(batch, "DEVA")
    before = (b.rows("SELECT * FROM items"), b.rows("SELECT * FROM _p2p_log"), b.rows("SELECT * FROM _p2p_clocks"))
    again = b.apply(batch, "DEVA")
    assert (first.applied, again.applied, again.conflicts) == (2, 0, 0)
    assert (b.rows("SELECT * FROM items"), b.rows("SELECT * FROM _p2p_log"), b.rows("SELECT * FROM _p2p_clocks")) == before


def test_an_edit_made_after_seeing_a_value_is_not_a_conflict_by_any_route(device) -> None:
    a, b, c = device("DEVA"), device("DEVB"), device("DEVC")
    a.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p')")
    a.push(b)
    b.write("UPDATE items SET a = 2 WHERE uid = 'x'")  # B saw A's value: an ordinary later edit
    b.write("UPDATE items SET a = 3 WHERE uid = 'x'")  # and edits its own value again
    a.push(c)
    b.push(c)  # C has A's value, gets B's (B superseded it knowingly)
    b.push(a)
    assert a.rows(SYNCED) == b.rows(SYNCED) == c.rows(SYNCED) == [("x", 3, "p")]
    assert merge.conflicts(a.conn) == merge.conflicts(c.conn) == []


def test_a_losing_change_is_logged_once_whatever_the_routes(device) -> None:
    a, b, c = device("DEVA", wall=1_000_000), device("DEVB", wall=2_000_000), device("DEVC")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1)")
    a.push(b)
    a.push(c)
    a.write("UPDATE items SET a = 10 WHERE uid = 'x'")  # concurrent with B's, older clock
    b.write("UPDATE items SET a = 20 WHERE uid = 'x'")
    b.push(c)
    a.push(c)  # A's loser reaches C directly...
    a.push(b)
    b.push(c)  # ...and B has nothing new for C about it
    c.push(b)
    losers = [(x.column, x.losing_value, x.loser) for x in merge.conflicts(c.conn)]
    assert losers == [("a", 10, "DEVA")]
    assert [(x.column, x.losing_value, x.loser) for x in merge.conflicts(b.conn)] == [("a", 10, "DEVA")]


def test_collaborative_key_change_moves_the_row(device) -> None:
    a, b = device("DEVA", kind="collaborative"), device("DEVB", kind="collaborative")
    a.write("INSERT INTO notes(id, body) VALUES (1, 'one')")
    a.push(b)
    a.write("UPDATE notes SET id = 7 WHERE id = 1")
    (result,) = a.push(b)
    assert b.rows(f'SELECT id, body FROM "{device_table_name("DEVA", "notes")}"') == [(7, "one")]
    assert result.remote["DEVA"]["notes"] == {"inserted": [7], "updated": [], "deleted": [1]}


# --------------------------------------------------------------------------
# Echo, local changes, clocks


def test_applied_rows_are_not_local_changes_and_not_echoed(device) -> None:
    a, b = device("DEVA"), device("DEVB")
    with b.outside() as other:  # pending outside write on B: stamped first, returned for announcing
        other.execute("INSERT INTO items(uid, a) VALUES ('b1', 1)")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1)")
    (result,) = a.push(b)
    assert result.local.change_infos() == [{"table": "items", "type": "data", "inserted": [1], "updated": [], "deleted": []}]
    assert local_changes(b) == {}  # the applied row (rowid 2) is not logged as a local insert
    assert b.rows("SELECT hw FROM _p2p_hw") == [(2,)]
    assert b.rows("SELECT count(*) FROM _p2p_log WHERE hlc IS NULL") == [(1,)]
    (back,) = b.push(a)
    assert back.applied == 1 and a.rows(SYNCED) == [("b1", 1, None), ("x", 1, None)]  # only B's own row


def test_the_clock_moves_past_what_it_received(device) -> None:
    a, b = device("DEVA", wall=290_000), device("DEVB", wall=1_000)  # within the clock bound (5 min)
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1)")
    a.push(b)
    received = a.rows("SELECT max(hlc) FROM _p2p_clocks")[0][0]
    assert int(capture.get_meta(b.conn, "hlc_last")) >= received
    b.write("UPDATE items SET a = 2 WHERE uid = 'x'")  # B's wall is far behind, its clock is not
    b.push(a)
    assert a.rows(SYNCED) == [("x", 2, None)]


def test_merging_needs_the_device_id(device, tmp_path: Path) -> None:
    a = device("DEVA")
    a.write("INSERT INTO items(uid) VALUES ('x')")
    batch = a.read(0)
    b = device("DEVB")
    b.conn.execute("DELETE FROM _p2p_meta WHERE key = 'device_id'")
    with pytest.raises(StoreInvalid):
        b.apply(batch, "DEVA")
    assert b.rows("SELECT count(*) FROM items") == [(0,)] and b.rows("SELECT count(*) FROM _p2p_apply") == [(0,)]


# --------------------------------------------------------------------------
# Watermarks and crash safety


def test_the_watermark_moves_with_the_batch_and_only_for_the_whole_stream(device) -> None:
    a, b = device("DEVA"), device("DEVB")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1)")
    assert merge.watermark(b.conn, "DEVA") == 0
    a.push(b, table="items")
    assert merge.watermark(b.conn, "DEVA") == 0  # a table sync proves nothing about the stream
    (result,) = a.push(b)
    assert merge.watermark(b.conn, "DEVA") == result.last_seq > 0
    a.write("INSERT INTO items(uid, a) VALUES ('y', 2)")
    a.write("INSERT INTO items(uid, a) VALUES ('z', 3)")
    gap = a.read(result.last_seq + 1)  # starts after B's watermark: would skip 'y'
    assert b.apply(gap, "DEVA").last_seq == result.last_seq
    a.push(b)
    assert b.rows(SYNCED) == [("x", 1, None), ("y", 2, None), ("z", 3, None)]


def test_compaction_drops_what_nothing_reads_and_sync_goes_on(device) -> None:
    a, b, c = device("DEVA"), device("DEVB"), device("DEVC")
    for i in range(50):
        a.write("INSERT INTO items(uid, a) VALUES ('x', ?) ON CONFLICT(uid) DO UPDATE SET a = excluded.a", (i,))
        if i % 10 == 9:
            a.push(b)  # B's log gets a row applied from A each time
    b.push(c)
    top = a.rows("SELECT max(seq) FROM _p2p_log")[0][0]
    assert a.rows("SELECT count(*) FROM _p2p_log")[0][0] >= 50
    stamps = a.rows("SELECT count(*) FROM _p2p_stamps")[0][0]
    assert a.compact() > 0 and b.compact() > 0
    assert a.rows("SELECT seq FROM _p2p_log") == [(top,)]  # only the highest seq stays
    assert a.rows("SELECT count(*) FROM _p2p_stamps")[0][0] == 1 < stamps  # and the clock range it needs
    assert b.rows("SELECT count(*) FROM _p2p_log")[0][0] == 1
    assert a.compact() == 0  # nothing more
    # Sync after compaction: new writes, a new peer from scratch, relay.
    a.write("UPDATE items SET b = 'later' WHERE uid = 'x'")
    assert a.rows("SELECT max(seq) FROM _p2p_log")[0][0] > top  # seqs are not reused
    a.push(b)
    b.push(c)
    d = device("DEVD")
    a.push(d)
    assert b.rows(SYNCED) == c.rows(SYNCED) == d.rows(SYNCED) == a.rows(SYNCED) == [("x", 49, "later")]


def test_compaction_keeps_a_collaborative_table_s_own_changes(device) -> None:
    a, b = device("DEVA", kind="collaborative"), device("DEVB", kind="collaborative")
    for i in range(5):
        a.write("INSERT INTO notes(id, body) VALUES (?, 'x')", (i,))
    a.write("UPDATE notes SET n = 1 WHERE id = 0")
    a.push(b)
    local_rows = a.rows("SELECT count(*) FROM _p2p_log")[0][0]
    applied_rows = b.rows("SELECT count(*) FROM _p2p_log WHERE origin IS NOT NULL")[0][0]
    assert a.compact() == 0 and a.rows("SELECT count(*) FROM _p2p_log")[0][0] == local_rows
    assert b.compact() == applied_rows - 1  # B's own table has no changes; the highest seq stays
    assert a.rows("SELECT count(*) FROM _p2p_changes WHERE hlc IS NULL") == [(0,)]  # every row kept has its clock
    # A write by another program is stamped (every compaction stamps first), kept and sent.
    with a.outside() as other:
        other.execute("UPDATE notes SET body = 'outside' WHERE id = 3")
    a.compact()
    assert a.rows("SELECT count(*) FROM _p2p_log")[0][0] == local_rows + 1
    c = device("DEVC", kind="collaborative")
    a.push(b)
    a.push(c)
    expected = a.rows("SELECT id, body, n FROM notes ORDER BY id")
    assert b.rows("SELECT id, body, n FROM dev_DEVA_notes ORDER BY id") == expected
    assert c.rows("SELECT id, body, n FROM dev_DEVA_notes ORDER BY id") == expected


def test_clearing_conflicts_up_to_an_id_keeps_later_ones(device) -> None:
    b = device("DEVB")
    for i in range(1, 6):
        b.conn.execute(
            "INSERT INTO _p2p_conflicts(tbl, ck, col, losing_value, winner, winner_hlc, loser, loser_hlc, at) "
            "VALUES (?, ?, 'a', 1, 'DEVA', ?, 'DEVC', 1, 0)", ("items" if i % 2 else "other", f"k{i}", 10 + i))
    assert merge.clear_conflicts(b.conn, up_to=3, table="items") == 2  # ids 1 and 3
    assert [c.id for c in merge.conflicts(b.conn)] == [5, 4, 2]
    assert merge.clear_conflicts(b.conn, up_to=4) == 2
    assert merge.clear_conflicts(b.conn) == 1 and merge.conflicts(b.conn) == []


def _remove_store_file(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def test_a_recreated_sender_store_is_read_again_from_its_start(device) -> None:
    """The sender's store was deleted and created again: its seqs restart at 1,
    below the receiver's watermark. A new stream ID makes the receiver start over."""
    a, b = device("DEVA"), device("DEVB")
    for i in range(5):
        a.write("INSERT INTO items(uid, a) VALUES (?, ?)", (f"old{i}", i))
    a.push(b)
    assert merge.watermark(b.conn, "DEVA") >= 5
    a.close()
    _remove_store_file(a.path)
    a = device("DEVA")  # the same device, a new empty store
    a.write("INSERT INTO items(uid, a) VALUES ('new', 9)")
    (result,) = a.push(b)
    assert result.applied == 1 and ("new", 9, None) in b.rows(SYNCED)
    assert merge.position(b.conn, "DEVA") == (result.last_seq, capture.stream_id(a.conn))
    (again,) = a.push(b)
    assert again.applied == 0 and again.last_seq == result.last_seq  # caught up: nothing is sent twice


def test_a_sender_restored_from_a_backup_starts_a_new_stream(device, tmp_path: Path) -> None:
    """The sender's file went back in time: the receiver's watermark is past
    every seq it has. Its next writes must not hide below that watermark."""
    a, b = device("DEVA"), device("DEVB")
    a.write("INSERT INTO items(uid, a) VALUES ('kept', 1)")
    a.push(b)
    a.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    backup = tmp_path / "backup.db"
    shutil.copy(a.path, backup)
    for i in range(5):
        a.write("INSERT INTO items(uid, a) VALUES (?, ?)", (f"later{i}", i))
    a.push(b)
    stream = capture.stream_id(a.conn)
    a.close()
    _remove_store_file(a.path)
    shutil.copy(backup, a.path)
    restored = Replica(a.path, "DEVA")
    try:
        restored.write("INSERT INTO items(uid, a) VALUES ('after', 7)")
        (result,) = restored.push(b)
        assert ("after", 7, None) in b.rows(SYNCED)
        assert capture.stream_id(restored.conn) != stream
        (again,) = restored.push(b)
        assert again.applied == 0  # caught up in the new stream
        # What B has that the backup lacks stays on B (it is B's copy now), and
        # the restored device gets it back from B like any other change.
        b.push(restored)
        assert restored.rows(SYNCED) == b.rows(SYNCED)
    finally:
        restored.close()


def test_a_failure_after_rows_were_written_leaves_nothing_behind(device) -> None:
    a, b = device("DEVA"), device("DEVB")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1)")
    a.push(b)
    a.write("INSERT INTO items(uid, a) VALUES ('y', 2)")
    a.write("UPDATE items SET a = 5 WHERE uid = 'x'")
    mark = merge.watermark(b.conn, "DEVA")
    snapshot = [b.rows(f"SELECT * FROM {t}") for t in ("items", "_p2p_log", "_p2p_clocks", "_p2p_hw", "_p2p_meta")]
    # The watermark is written last: make that fail, after every row was applied.
    b.conn.execute("CREATE TRIGGER boom BEFORE INSERT ON _p2p_watermarks BEGIN SELECT RAISE(ABORT, 'simulated crash'); END")
    b.conn.execute("CREATE TRIGGER boom2 BEFORE UPDATE ON _p2p_watermarks BEGIN SELECT RAISE(ABORT, 'simulated crash'); END")
    with pytest.raises(Exception, match="simulated crash"):
        a.push(b)
    assert [b.rows(f"SELECT * FROM {t}") for t in ("items", "_p2p_log", "_p2p_clocks", "_p2p_hw", "_p2p_meta")] == snapshot
    assert merge.watermark(b.conn, "DEVA") == mark and b.rows("SELECT count(*) FROM _p2p_apply") == [(0,)]
    b.conn.execute("DROP TRIGGER boom")
    b.conn.execute("DROP TRIGGER boom2")
    a.push(b)  # sending again is harmless
    assert b.rows(SYNCED) == [("x", 5, None), ("y", 2, None)]


def test_a_killed_receiver_loses_and_duplicates_nothing(device, tmp_path: Path) -> None:
    """kill -9 of the receiving process in the middle of apply_batch."""
    a, b = device("DEVA"), device("DEVB")
    for i in range(50):
        a.write("INSERT INTO items(uid, a) VALUES (?, ?)", (f"k{i}", i))
    b.close()
    batch = a.read(0)
    wire = tmp_path / "batch.msgpack"
    wire.write_bytes(msgpack.packb(changes.batch_to_plain(batch), use_bin_type=True))
    script = textwrap.dedent(f"""
        import os, sys, msgpack
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from replicas import Replica
        from p2pstore.store import changes
        b = Replica(__import__('pathlib').Path({str(b.path)!r}), "DEVB")
        calls = []
        def maybe_die():
            calls.append(1)
            if len(calls) == 30:
                os.kill(os.getpid(), 9)  # in the middle of the batch
            return 0
        b.conn.create_function("maybe_die", 0, maybe_die)
        b.conn.execute("CREATE TEMP TRIGGER die AFTER INSERT ON main._p2p_rows BEGIN SELECT maybe_die(); END")
        batch = changes.batch_from_plain(msgpack.unpackb(open({str(wire)!r}, 'rb').read(), raw=False))
        b.apply(batch, "DEVA")
        print("survived")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    b2 = Replica(b.path, "DEVB")
    assert b2.rows("SELECT count(*) FROM items") == [(0,)]
    assert merge.watermark(b2.conn, "DEVA") == 0 and b2.rows("SELECT count(*) FROM _p2p_apply") == [(0,)]
    a.push(b2)
    assert b2.rows("SELECT count(*), count(DISTINCT uid) FROM items") == [(50, 50)]
    assert local_changes(b2) == {}
    b2.close()


# --------------------------------------------------------------------------
# Failures


CONSTRAINED = (
    "CREATE TABLE items(id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL UNIQUE, "
    "a INTEGER CHECK (a IS NULL OR a >= 0), b TEXT NOT NULL DEFAULT '-', email TEXT UNIQUE, note TEXT)"
)
LOOSE = "CREATE TABLE items(id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL UNIQUE, a INTEGER, b TEXT, email TEXT UNIQUE, note TEXT)"
EMAIL_DOC = schema_doc({"items": ([*ITEMS_FIELDS, field("email", "Text")], ["uid", "a", "b", "email"])})


def test_rows_that_cannot_be_applied_are_kept_and_the_rest_applies(device) -> None:
    a = device("DEVA", table=LOOSE, doc=EMAIL_DOC)
    b = device("DEVB", table=CONSTRAINED, doc=EMAIL_DOC)
    b.write("INSERT INTO items(uid, b, email) VALUES ('mine', 'x', 'taken@example.com')")
    a.write("INSERT INTO items(uid, a, b) VALUES ('ok1', 1, 'fine')")
    a.write("INSERT INTO items(uid, a, b, email) VALUES ('dup', 2, 'x', 'taken@example.com')")  # UNIQUE email
    a.write("INSERT INTO items(uid, a, b) VALUES ('neg', -5, 'x')")  # CHECK
    a.write("INSERT INTO items(uid, a, b) VALUES ('nul', 3, NULL)")  # NOT NULL
    a.write("INSERT INTO items(uid, a, b) VALUES ('ok2', 4, 'fine')")
    (result,) = a.push(b)
    assert (result.applied, result.failed) == (2, 3)
    assert b.rows("SELECT uid FROM items ORDER BY uid") == [("mine",), ("ok1",), ("ok2",)]
    failures = {f.change.key: f for f in merge.sync_failures(b.conn) if f.change is not None}
    assert set(failures) == {"dup", "neg", "nul"}
    assert "UNIQUE" in failures["dup"].reason and failures["dup"].reason.startswith("constraint:")
    assert "CHECK" in failures["neg"].reason
    assert "NOT NULL" in failures["nul"].reason
    assert all(f.origin == "DEVA" and f.table == "items" and f.mode == "single_version" for f in failures.values())
    assert merge.watermark(b.conn, "DEVA") == result.last_seq  # kept, not lost: the stream moves on

    # Fix the cause of one, retry: it applies and leaves the log.
    b.write("UPDATE items SET email = 'other@example.com' WHERE uid = 'mine'")
    retried = merge.retry_failure(b.conn, b.state, b.clock, failures["dup"].id)
    assert (retried.applied, retried.failed) == (1, 0)
    assert b.rows("SELECT uid, email FROM items WHERE uid = 'dup'") == [("dup", "taken@example.com")]
    # Retrying one that still fails keeps it, with its reason.
    again = merge.retry_failure(b.conn, b.state, b.clock, failures["neg"].id)
    assert (again.applied, again.failed) == (0, 1)
    assert {f.id for f in merge.sync_failures(b.conn)} == {failures["neg"].id, failures["nul"].id}
    # Discard removes.
    merge.discard_failure(b.conn, failures["neg"].id)
    assert [f.id for f in merge.sync_failures(b.conn)] == [failures["nul"].id]
    with pytest.raises(FailureNotFound):
        merge.discard_failure(b.conn, failures["neg"].id)
    with pytest.raises(FailureNotFound):
        merge.retry_failure(b.conn, b.state, b.clock, failures["neg"].id)
    assert local_changes(b) == {}  # the retried row is no local change either


def test_a_table_that_is_not_distributed_here_is_a_failure(device, tmp_path: Path) -> None:
    a, b = device("DEVA"), device("DEVB")
    row = RowChange("elsewhere", "uid", "x", 1, (Cell("uid", "x", 5, "DEVA"),))
    result = b.apply(OutBatch("single_version", 0, 1, (row,), False, True), "DEVA")
    assert result.failed == 1 and merge.sync_failures(b.conn)[0].reason.startswith("not_distributed:")
    wrong_mode = OutBatch("collaborative", 0, 1, (RowChange("items", "", 1, 1, (Cell("uid", "x", 5, "DEVA"),)),), False, True)
    assert b.apply(wrong_mode, "DEVA").failed == 1
    assert merge.sync_failures(b.conn)[1].reason.startswith("schema_mismatch:")
    wrong_key = OutBatch("single_version", 0, 1, (RowChange("items", "a", 1, 1, (Cell("uid", "x", 5, "DEVA"),)),), False, True)
    assert b.apply(wrong_key, "DEVA").failed == 1
    assert merge.watermark(b.conn, "DEVA") == 1


# --------------------------------------------------------------------------
# Convergence, whatever the order and route


KEYS = ["k1", "k2", "k3"]
DEVICES = ["DEVA", "DEVB", "DEVC"]

_upsert = st.tuples(st.just("upsert"), st.integers(0, 2), st.sampled_from(KEYS), st.integers(0, 9), st.sampled_from(["p", "q", None]))
_set = st.tuples(st.just("set"), st.integers(0, 2), st.sampled_from(KEYS), st.sampled_from(["a", "b"]), st.integers(0, 9))
_delete = st.tuples(st.just("delete"), st.integers(0, 2), st.sampled_from(KEYS))
_sync = st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2), st.integers(1, 4))
# Weighted by repetition: edits of single columns and syncs are what make
# concurrent updates meet deletes (partial resurrection) and each other.
# A sync whose sender leaves out what the receiver's origin marks say it holds (protocol 3).
_marked_sync = st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2), st.integers(1, 4), st.just("marks"))
# An auto push after local writes: the sender's own changes only, from the receiver's eager position (protocol 4).
_own_sync = st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2), st.integers(1, 4), st.just("own"))
# An eager push that also forwards other devices' changes along their trees, granting marks for
# them from the sender's bookkeeping (protocol 5); the forwarded set changes from push to push.
_fwd_sync = st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2), st.integers(1, 4), st.just("fwd"),
                      st.integers(0, 7))
_op = st.one_of(
    _upsert, _set, _set, _delete, _sync, _sync, _marked_sync, _own_sync, _own_sync, _fwd_sync, _fwd_sync,
    st.tuples(st.just("rekey"), st.integers(0, 2), st.sampled_from(KEYS), st.sampled_from(KEYS)),
    st.tuples(st.just("tick"), st.integers(0, 2), st.integers(0, 3)),
    st.tuples(st.just("compact"), st.integers(0, 2)),
)


def _write_op(r: Replica, op: tuple[Any, ...]) -> None:
    """One random local write of the convergence tests: upsert, set one column, delete."""
    if op[0] == "upsert":
        _, _, key, a, b = op
        r.write("INSERT INTO items(uid, a, b) VALUES (?, ?, ?) ON CONFLICT(uid) DO UPDATE SET a = excluded.a, b = excluded.b", (key, a, b))
    elif op[0] == "set":
        _, _, key, col, value = op
        r.write(f"UPDATE items SET {col} = ? WHERE uid = ?", (value, key))
    else:
        r.write("DELETE FROM items WHERE uid = ?", (op[2],))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=20, max_size=60), walls=st.lists(st.sampled_from([1_000, 1_000, 1_001]), min_size=3, max_size=3),
       own_first=st.booleans(), marked=st.booleans())
def test_replicas_converge_whatever_the_order_and_route(ops: list[tuple[Any, ...]], walls: list[int], own_first: bool,
                                                        marked: bool) -> None:
    """Random writes on 3 replicas with nearly equal (often identical) wall
    clocks, exchanged pairwise in random orders and routes and batch sizes
    (whole streams, with or without origin marks, and pushes of a device's
    own changes, and eager pushes forwarding others' changes with the marks
    they grant), then everything with everyone: the synced contents are
    identical. ``own_first``: that last round starts with own changes only,
    so what the second leaves out rests on the marks those pushes gave;
    ``marked``: both rounds leave out what the marks cover, so a mark that
    claims a row its device lacks leaves the replicas apart."""
    books: dict[tuple[int, int], dict[str, int]] = {}  # (sender, receiver) -> the engine's grant bookkeeping
    with tempfile.TemporaryDirectory(prefix="p2p-conv-") as tmp:
        reps = []
        for device_id, wall in zip(DEVICES, walls):
            r = Replica(Path(tmp) / f"{device_id}.db", device_id, wall=wall)
            r.write(ITEMS)
            r.make_distributed("items", doc=ITEMS_DOC)
            reps.append(r)
        try:
            for op in ops:
                kind, i = op[0], op[1]
                r = reps[i]
                if kind in ("upsert", "set", "delete"):
                    _write_op(r, op)
                elif kind == "rekey":
                    _, _, old, new = op
                    if not r.rows("SELECT 1 FROM items WHERE uid = ?", (new,)):
                        r.write("UPDATE items SET uid = ? WHERE uid = ?", (new, old))
                elif kind == "sync":
                    j, limit = op[2], op[3]
                    if i != j and op[4:5] == ("fwd",):
                        forwarding = frozenset(DEVICES[k] for k in range(3) if op[5] >> k & 1 and k not in (i, j))
                        r.push(reps[j], limit=limit, own=True, forwarding=forwarding, book=books.setdefault((i, j), {}))
                    elif i != j:
                        r.push(reps[j], limit=limit, marks=len(op) > 4, own=op[4:] == ("own",))
                elif kind == "compact":
                    r.compact()
                else:
                    r.wall = (r.wall or 0) + op[2]
            for hop in range(2):  # twice: a relay needs two hops (the second leaving out what origin marks cover)
                for src in reps:
                    for dst in reps:
                        if src is not dst:
                            src.push(dst, marks=hop == 1 or marked, own=own_first and hop == 0)
            contents = [r.rows(SYNCED) for r in reps]
            assert contents[0] == contents[1] == contents[2]
            assert [applied(src.push(dst)) for src in reps for dst in reps if src is not dst] == [0] * 6
            assert all(local_changes(r) == {} for r in reps)
        finally:
            for r in reps:
                r.close()


def test_a_late_schema_upgrade_does_not_win_old_columns_with_stale_values(device) -> None:
    """The re-send after an added sync column carries the new column only: the
    device that upgrades last must not overwrite newer values of the columns
    everyone already syncs (it used to re-stamp every column)."""
    narrow = schema_doc({"items": (ITEMS_FIELDS, ["uid", "a"])})
    a, b = device("DEVA", doc=narrow, wall=1_000_000), device("DEVB", doc=narrow, wall=1_000_000)
    a.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p')")
    a.push(b)
    b.wall = 1_100_000
    b.write("UPDATE items SET a = 2 WHERE uid = 'x'")  # B's newer edit, not yet seen by A
    wide = schema_doc({"items": (ITEMS_FIELDS, ["uid", "a", "b"])}, version=1)
    b.accept_schema(wide)
    a.wall = 1_200_000
    assert a.accept_schema(wide).resent == {"items": 1}  # A upgrades last, holding the stale a = 1
    a.push(b)
    b.push(a)
    assert a.rows(SYNCED) == b.rows(SYNCED) == [("x", 2, "p")]


_resolve = st.tuples(st.just("resolve"), st.just(1), st.sampled_from(["local", "remote", "value"]), st.integers(0, 9))
_manual_op = st.one_of(_upsert, _set, _set, _delete, _sync, _sync, _resolve,
                       st.tuples(st.just("tick"), st.integers(0, 2), st.integers(0, 3)))


def _resolve_oldest(r: Replica, take: str, value: int) -> bool:
    """Settle the oldest entry of ``r``'s queue (as conflicts.resolve does); whether there was one."""
    entries = policies.entries(r.conn, 1)
    if not entries:
        return False
    column_value = value if entries[0]["column"] == "a" else f"v{value}"
    r.conn.execute("BEGIN IMMEDIATE")
    try:
        capture.stamp(r.conn, r.state, r.clock, wall=r.wall)
        merge.settle(r.conn, r.state, r.clock, entries[0]["id"], take, column_value, wall=r.wall)
        r.conn.execute("COMMIT")
    except BaseException:
        r.conn.execute("ROLLBACK")
        raise
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_manual_op, min_size=20, max_size=60), walls=st.lists(st.sampled_from([1_000, 1_000, 1_001]), min_size=3, max_size=3),
       detect=st.sampled_from([policies.COLUMN, policies.ROW]))
def test_a_manual_policy_converges_once_the_queue_is_resolved(ops: list[tuple[Any, ...]], walls: list[int], detect: str) -> None:
    """Issue 13's property: random writes on 3 replicas, the table reconciled
    by hand on DEVB; DEVB sends nothing while it has queued entries (in
    conflict) and resolves them at random with local, remote or a new
    value. Once its queue is empty and everyone synced with everyone, the
    synced contents are identical."""
    with tempfile.TemporaryDirectory(prefix="p2p-manual-") as tmp:
        reps = _replicas_with_policy(Path(tmp), walls, policies.Policy(policies.MANUAL, "DEVB", detect))
        b = reps[1]

        def push(src: Replica, dst: Replica, limit: int = changes.DEFAULT_BATCH_ROWS) -> int:
            if src is b and policies.queued(b.conn):
                return 0  # in conflict: the reconciler sends nothing
            return applied(src.push(dst, limit=limit))

        try:
            for op in ops:
                kind, i = op[0], op[1]
                r = reps[i]
                if kind in ("upsert", "set", "delete"):
                    _write_op(r, op)
                elif kind == "sync":
                    _, _, j, limit = op
                    if i != j:
                        push(r, reps[j], limit)
                elif kind == "resolve":
                    _resolve_oldest(b, op[2], op[3])
                else:
                    r.wall = (r.wall or 0) + op[2]
            _sync_until_quiet(reps, push, settle=lambda: _resolve_all(b), pending=lambda: policies.queued(b.conn))
            assert policies.queued(b.conn) == 0
            contents = [r.rows(SYNCED) for r in reps]
            assert contents[0] == contents[1] == contents[2]
        finally:
            for r in reps:
                r.close()


def _replicas_with_policy(tmp: Path, walls: list[int], policy: policies.Policy) -> list[Replica]:
    """DEVA, DEVB, DEVC with table ``items`` under ``policy`` (the policy properties' set-up)."""
    reps = []
    for device_id, wall in zip(DEVICES, walls):
        r = Replica(tmp / f"{device_id}.db", device_id, wall=wall)
        r.write(ITEMS)
        r.make_distributed("items", doc=ITEMS_DOC)
        reps.append(_with_policy(r, policy))
    return reps


def _resolve_all(r: Replica) -> None:
    while _resolve_oldest(r, "remote", 0):
        pass


def _sync_until_quiet(reps: list[Replica], push: Callable[[Replica, Replica], int], settle: Callable[[], None] = lambda: None,
                      pending: Callable[[], int] = lambda: 0) -> None:
    """Bounded: settle what waits (a reconciler's queue), then everyone with
    everyone (twice: a relay needs two hops), until nothing moves."""
    for _ in range(10):
        settle()
        moved = sum(push(src, dst) for _ in range(2) for src in reps for dst in reps if src is not dst)
        if moved == 0 and not pending():
            return
    raise AssertionError("the replicas still exchange changes after 10 rounds")


# Edits of one row's cells between syncs: what makes concurrent pairs for the arbiter to decide.
_set_k1 = st.tuples(st.just("set"), st.integers(0, 2), st.just("k1"), st.sampled_from(["a", "b"]), st.integers(0, 9))
_priority_op = st.one_of(_upsert, _set, _set_k1, _set_k1, _delete, _sync, _sync,
                         st.tuples(st.just("tick"), st.integers(0, 2), st.integers(0, 3)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_priority_op, min_size=20, max_size=60),
       walls=st.lists(st.sampled_from([1_000, 1_000, 1_001]), min_size=3, max_size=3),
       policy=st.sampled_from([policies.Policy(policies.PRIORITY, None, policies.COLUMN, ("DEVB", "DEVA")),
                               policies.Policy(policies.PRIORITY, None, policies.ROW, ("DEVC",)),
                               policies.Policy(policies.LWW, None, policies.ROW)]))
def test_priority_and_row_detection_converge(ops: list[tuple[Any, ...]], walls: list[int], policy: policies.Policy) -> None:
    """Issue 13's property for the automatic policies: random writes on 3
    replicas, random pairwise syncs, then everyone with everyone until
    nothing moves: the synced contents are identical — under ``priority``
    (the arbiter's decisions are later edits that settle too) and under
    ``lww`` with row detection (which only logs more)."""
    with tempfile.TemporaryDirectory(prefix="p2p-priority-") as tmp:
        reps = _replicas_with_policy(Path(tmp), walls, policy)
        try:
            for op in ops:
                kind, i = op[0], op[1]
                if kind in ("upsert", "set", "delete"):
                    _write_op(reps[i], op)
                elif kind == "sync":
                    if i != op[2]:
                        reps[i].push(reps[op[2]], limit=op[3])
                else:
                    reps[i].wall = (reps[i].wall or 0) + op[2]
            _sync_until_quiet(reps, lambda src, dst: applied(src.push(dst)))
            contents = [r.rows(SYNCED) for r in reps]
            assert contents[0] == contents[1] == contents[2]
        finally:
            for r in reps:
                r.close()


# --------------------------------------------------------------------------
# conflict policies: priority and row detection (store/policies.py)


def _with_policy(r: Replica, policy: policies.Policy) -> Replica:
    r.conn.execute("BEGIN IMMEDIATE")
    policies.put(r.conn, "items", policy)
    r.conn.execute("COMMIT")
    return r


def _lost(r: Replica) -> list[tuple[Any, ...]]:
    return [(c.column, c.losing_value, c.winner, c.loser, c.other_column) for c in merge.conflicts(r.conn)]


@pytest.mark.parametrize("first", ["favoured", "other"])
def test_priority_keeps_the_favoured_value_of_concurrent_edits_whoever_wrote_later(device, first: str) -> None:
    """priority [DEVA]: B's concurrent edit is later on the clock (lww would
    keep it) — after syncing both ways, in either order, both hold A's; the
    arbiter alone logs the conflict, and its decision is no conflict on B."""
    favour_a = policies.Policy(policies.PRIORITY, devices=("DEVA",))
    a, b = _with_policy(device("DEVA", wall=1_000_000), favour_a), _with_policy(device("DEVB", wall=1_000_000), favour_a)
    a.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p')")
    a.push(b)
    a.write("UPDATE items SET a = 2 WHERE uid = 'x'")
    b.wall = 1_100_000
    b.write("UPDATE items SET a = 3 WHERE uid = 'x'")
    if first == "favoured":
        a.push(b)
        assert b.rows(SYNCED) == [("x", 3, "p")], "B merges as lww until the arbiter decided"
        b.push(a)
    else:
        b.push(a)
    assert a.rows(SYNCED) == [("x", 2, "p")], "the arbiter keeps the favoured value"
    a.push(b)
    assert a.rows(SYNCED) == b.rows(SYNCED) == [("x", 2, "p")]
    assert _lost(a) == [("a", 3, "DEVA", "DEVB", None)] and _lost(b) == []
    assert applied(a.push(b)) == applied(b.push(a)) == 0


def test_priority_lets_a_later_edit_win_and_ranks_devices_the_arbiter_does_not_hold(device) -> None:
    """priority [DEVB, DEVA]: an edit made after seeing the favoured value is an
    ordinary later edit (no conflict), whoever made it; of concurrent edits by
    DEVA and DEVC (not listed: ranks last), the arbiter DEVB takes DEVA's
    although DEVC's is later and DEVB holds neither."""
    policy = policies.Policy(policies.PRIORITY, devices=("DEVB", "DEVA"))
    a, b, c = (_with_policy(device(d, wall=1_000_000), policy) for d in ("DEVA", "DEVB", "DEVC"))
    b.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p')")
    b.push(a)
    b.push(c)
    c.write("UPDATE items SET a = 5 WHERE uid = 'x'")  # after seeing B's: a later edit
    c.push(b)
    assert b.rows(SYNCED) == [("x", 5, "p")] and _lost(b) == []
    c.push(a)
    a.write("UPDATE items SET b = 'q' WHERE uid = 'x'")
    c.wall = 1_200_000
    c.write("UPDATE items SET b = 'r' WHERE uid = 'x'")  # concurrent with A's, later
    c.push(b)
    a.push(b)
    assert b.rows(SYNCED) == [("x", 5, "q")], "DEVA ranks above DEVC"
    for src, dst in ((b, a), (b, c), (a, c), (c, a)):
        src.push(dst)
    assert a.rows(SYNCED) == b.rows(SYNCED) == c.rows(SYNCED) == [("x", 5, "q")]
    assert _lost(b) == [("b", "r", "DEVA", "DEVC", None)]


def test_priority_leaves_deletes_and_equal_ranks_to_lww(device) -> None:
    policy = policies.Policy(policies.PRIORITY, devices=("DEVA",))
    a, b, c = (_with_policy(device(d, wall=1_000_000), policy) for d in ("DEVA", "DEVB", "DEVC"))
    a.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p'), ('y', 1, 'p')")
    a.push(b)
    a.push(c)
    b.write("UPDATE items SET a = 2 WHERE uid = 'x'")
    c.wall = 1_100_000
    c.write("UPDATE items SET a = 3 WHERE uid = 'x'")  # B and C rank alike: the later clock wins
    a.write("UPDATE items SET a = 4 WHERE uid = 'y'")
    c.write("DELETE FROM items WHERE uid = 'y'")  # a later delete beats the favoured device's edit
    for src, dst in ((b, a), (c, a), (a, b), (a, c)):
        src.push(dst)
    assert a.rows(SYNCED) == b.rows(SYNCED) == c.rows(SYNCED) == [("x", 3, "p")]


def test_row_detection_logs_concurrent_edits_of_different_columns_and_keeps_both(device) -> None:
    by_row = policies.Policy(policies.LWW, detect=policies.ROW)
    a, b = _with_policy(device("DEVA", wall=1_000_000), by_row), _with_policy(device("DEVB", wall=1_000_000), by_row)
    a.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p'), ('y', 1, 'p')")
    a.push(b)
    a.write("UPDATE items SET a = 2 WHERE uid = 'x'")
    b.write("UPDATE items SET b = 'q' WHERE uid = 'x'")
    a.push(b)
    b.push(a)
    assert a.rows(SYNCED) == b.rows(SYNCED) == [("x", 2, "q"), ("y", 1, "p")], "per-column merging keeps both edits"
    assert _lost(b) == [("a", None, "DEVA", "DEVB", "b")] and _lost(a) == [("b", None, "DEVB", "DEVA", "a")]
    # An edit made after seeing the other's is no conflict; and column detection logs none of this.
    b.write("UPDATE items SET a = 3 WHERE uid = 'y'")
    b.push(a)
    a.write("UPDATE items SET b = 'r' WHERE uid = 'y'")
    a.push(b)
    assert len(merge.conflicts(a.conn)) == len(merge.conflicts(b.conn)) == 1
    c, d = device("DEVC", wall=1_000_000), device("DEVD", wall=1_000_000)
    c.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p')")
    c.push(d)
    c.write("UPDATE items SET a = 2 WHERE uid = 'x'")
    d.write("UPDATE items SET b = 'q' WHERE uid = 'x'")
    c.push(d)
    d.push(c)
    assert merge.conflicts(c.conn) == merge.conflicts(d.conn) == []
