"""Outgoing changes (store/changes.py) and what stamping records for them.

Real SQLite files in a temp dir act as devices (``replicas.Replica``); no
daemon, no sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from replicas import Replica, field, schema_doc

from p2pstore.errors import InvalidParams, ProtocolError
from p2pstore.schema.predicates import compile_predicates
from p2pstore.store import changes, merge, stream
from p2pstore.store.changes import Cell, OutBatch, RowChange

ITEMS = "CREATE TABLE items(id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL UNIQUE, a INTEGER, b TEXT, note TEXT)"
ITEMS_DOC = schema_doc({"items": (
    [field("id", "Integer", autoinc=True), field("uid", "Text", pk=True, not_null=True),
     field("a", "Integer"), field("b", "Text"), field("note", "Text")],
    ["uid", "a", "b"],
)})
NOTES = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT, n INTEGER)"
TAGS = "CREATE TABLE tags(name TEXT, x INTEGER)"  # keyed by rowid


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(device_id: str, *, kind: str = "single_version", wall: int | None = None) -> Replica:
        r = Replica(tmp_path / f"{device_id}.db", device_id, wall=wall)
        if kind == "single_version":
            r.write(ITEMS)
            r.make_distributed("items", doc=ITEMS_DOC)
        else:
            r.write(NOTES)
            r.write(TAGS)
            r.make_distributed("notes", "tags")
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def cells(r: Replica) -> list[tuple[Any, ...]]:
    return r.rows("SELECT ck, col, seq FROM _p2p_clocks ORDER BY ck, col")


# --------------------------------------------------------------------------
# What stamping records for single_version tables


def test_stamp_keeps_one_clock_per_synced_column_and_a_tomb_per_delete(device) -> None:
    a = device("DEVA")
    a.write("INSERT INTO items(uid, a, b, note) VALUES ('x', 1, 'p', 'n')")
    first = cells(a)
    assert [(ck, col) for ck, col, _ in first] == [("x", "a"), ("x", "b"), ("x", "uid")]  # not id, not note
    assert len({seq for *_, seq in first}) == 1

    a.write("UPDATE items SET note = 'only local' WHERE uid = 'x'")
    assert cells(a) == first  # an unsynced column changes no clock

    a.write("UPDATE items SET a = 2 WHERE uid = 'x'")
    after = dict(((ck, col), seq) for ck, col, seq in cells(a))
    assert after[("x", "a")] > after[("x", "b")] == after[("x", "uid")]

    a.write("DELETE FROM items WHERE uid = 'x'")
    assert a.rows("SELECT ck, origin FROM _p2p_tombs") == [("x", None)]  # origin NULL = this device
    clocks = a.rows("SELECT hlc FROM _p2p_clocks UNION ALL SELECT hlc FROM _p2p_tombs")
    assert a.rows("SELECT hlc FROM _p2p_tombs")[0][0] == max(h for (h,) in clocks)


def test_a_changed_conflict_value_is_a_delete_and_an_insert(device) -> None:
    a = device("DEVA")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1)")
    a.write("UPDATE items SET uid = 'y' WHERE uid = 'x'")
    assert a.rows("SELECT ck FROM _p2p_tombs") == [("x",)]
    assert {ck for ck, _, _ in cells(a)} == {"x", "y"}
    ops = a.rows("SELECT op, ck FROM _p2p_log ORDER BY seq")
    assert ops[-2:] == [(3, "x"), (1, "y")]


def test_outside_writers_are_stamped_into_cells_too(device) -> None:
    a = device("DEVA")
    with a.outside() as other:
        other.execute("INSERT INTO items(uid, a) VALUES ('x', 1)")
        other.execute("UPDATE items SET b = 'q' WHERE uid = 'x'")
    assert cells(a) == []  # not stamped yet
    batch = a.read_rows(0)
    assert [r.key for r in batch.rows] == ["x"]
    assert {c.column: c.value for c in batch.rows[0].cells} == {"uid": "x", "a": 1, "b": "q"}


# --------------------------------------------------------------------------
# Reading batches


def test_single_version_batch_has_only_sync_columns_with_their_clocks(device) -> None:
    a = device("DEVA")
    a.write("INSERT INTO items(uid, a, b, note) VALUES ('x', 1, 'p', 'secret')")
    batch = a.read_rows(0)
    assert batch.mode == "single_version" and batch.full and not batch.more
    (row,) = batch.rows
    assert (row.table, row.key_column, row.key) == ("items", "uid", "x")
    assert sorted(c.column for c in row.cells) == ["a", "b", "uid"]  # no auto-increment key, no unsynced column
    assert {c.origin for c in row.cells} == {"DEVA"}
    assert row.tomb is None
    assert batch.last_seq == row.seq


def test_a_deleted_row_travels_as_its_tomb_and_old_cells_carry_no_value(device) -> None:
    a = device("DEVA")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1)")
    a.write("DELETE FROM items WHERE uid = 'x'")
    (row,) = a.read_rows(0).rows
    assert row.tomb is not None and row.tomb[1] == "DEVA"
    assert all(c.value is None and c.hlc < row.tomb[0] for c in row.cells)
    # Read from after the insert: only the tomb is new.
    insert_seq = a.rows("SELECT min(seq) FROM _p2p_clocks")[0][0]
    (row,) = a.read_rows(insert_seq).rows
    assert row.cells == () and row.tomb is not None


def test_the_tomb_always_travels_with_its_row(device) -> None:
    a = device("DEVA")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1)")
    a.write("DELETE FROM items WHERE uid = 'x'")
    after_delete = a.read_rows(0).last_seq
    a.write("INSERT INTO items(uid, a) VALUES ('x', 2)")
    (row,) = a.read_rows(after_delete).rows
    assert row.tomb is not None  # older than the watermark, still sent: the row is self-contained
    assert {c.column: c.value for c in row.cells}["a"] == 2


def test_batches_are_bounded_and_resume_exactly(device) -> None:
    a = device("DEVA")
    for i in range(23):
        a.write("INSERT INTO items(uid, a) VALUES (?, ?)", (f"k{i:02}", i))
    a.write("UPDATE items SET a = -1 WHERE uid IN ('k00', 'k10', 'k20')")
    seen: list[str] = []
    since, batches = 0, 0
    while True:
        batch = a.read_rows(since, limit=5)
        assert len(batch.rows) <= 5 and batch.since_seq == since
        seen += [r.key for r in batch.rows]
        batches += 1
        since = batch.last_seq
        if not batch.more:
            break
    # k00, k10, k20 were sent twice (insert, then update): each batch holds
    # whole seqs, and a later seq of a row travels in a later batch.
    assert sorted(set(seen)) == [f"k{i:02}" for i in range(23)]
    assert batches == 6
    assert a.read_rows(since).rows == ()


_sized_op = st.tuples(st.sampled_from(["insert", "update", "delete"]), st.integers(0, 7), st.integers(0, 3000))


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(_sized_op, st.sampled_from(["", "push", "compact", "compact push"])), min_size=1, max_size=30),
       max_bytes=st.integers(1, 6000), limit=st.integers(1, 8))
def test_byte_bounded_batches_lose_nothing(tmp_path_factory: Any, ops: list[Any], max_bytes: int, limit: int) -> None:
    """Batches cut by size (rows of 0-3000 bytes, budgets of 1-6000) still carry
    every change: pushed in such batches (with pushes in between, so rows change
    across batch boundaries, and log compactions at random points), B ends
    with exactly A's rows, in both modes."""
    root = tmp_path_factory.mktemp("bytes")
    a, b = Replica(root / "a.db", "DEVA"), Replica(root / "b.db", "DEVB")
    ca, cb = Replica(root / "ca.db", "DEVA"), Replica(root / "cb.db", "DEVB")
    try:
        for r in (a, b):
            r.write(ITEMS)
            r.make_distributed("items", doc=ITEMS_DOC)
        for r in (ca, cb):
            r.write(NOTES)
            r.make_distributed("notes")
        for (op, key, size), then in ops:
            body = "x" * size
            if op == "insert":
                a.write("INSERT OR IGNORE INTO items(uid, a, b) VALUES (?, ?, ?)", (f"k{key}", size, body))
                ca.write("INSERT OR IGNORE INTO notes(id, body, n) VALUES (?, ?, ?)", (key, body, size))
            elif op == "update":
                a.write("UPDATE items SET b = ?, a = ? WHERE uid = ?", (body, size, f"k{key}"))
                ca.write("UPDATE notes SET body = ?, n = ? WHERE id = ?", (body, size, key))
            else:
                a.write("DELETE FROM items WHERE uid = ?", (f"k{key}",))
                ca.write("DELETE FROM notes WHERE id = ?", (key,))
            if "compact" in then:
                for r in (a, b, ca, cb):
                    r.compact()
            if "push" in then:
                a.push(b, limit=limit, max_bytes=max_bytes)
                ca.push(cb, limit=limit, max_bytes=max_bytes)
        for result in a.push(b, limit=limit, max_bytes=max_bytes) + ca.push(cb, limit=limit, max_bytes=max_bytes):
            assert result.failed == 0
        assert b.rows("SELECT uid, a, b FROM items ORDER BY uid") == a.rows("SELECT uid, a, b FROM items ORDER BY uid")
        received = cb.rows("SELECT id, body, n FROM dev_DEVA_notes ORDER BY id") if cb.rows(
            "SELECT 1 FROM sqlite_master WHERE name = 'dev_DEVA_notes'") else []
        assert received == ca.rows("SELECT id, body, n FROM notes ORDER BY id")
    finally:
        for r in (a, b, ca, cb):
            r.close()


def test_a_batch_holds_as_many_large_rows_as_fit_and_at_least_one(device) -> None:
    a = device("DEVA")
    for i in range(10):
        a.write("INSERT INTO items(uid, a, b) VALUES (?, ?, ?)", (f"k{i}", i, "x" * 1000))
    first = a.read_rows(0, max_bytes=3500)
    assert [r.key for r in first.rows] == ["k0", "k1", "k2"] and first.more  # 3 × (1000 + overhead) fit
    one = a.read_rows(0, max_bytes=10)
    assert [r.key for r in one.rows] == ["k0"] and one.more  # never empty
    rest = a.read_rows(first.last_seq, max_bytes=100_000)
    assert [r.key for r in rest.rows] == [f"k{i}" for i in range(3, 10)] and not rest.more


def test_collaborative_batch_sends_current_rows_and_deletes(device) -> None:
    a = device("DEVA", kind="collaborative")
    a.write("INSERT INTO notes(id, body, n) VALUES (1, 'one', 1), (2, 'two', 2)")
    a.write("UPDATE notes SET body = 'ONE' WHERE id = 1")
    a.write("DELETE FROM notes WHERE id = 2")
    a.write("INSERT INTO tags(name, x) VALUES ('t', 7)")
    batch = a.read_rows(0)
    assert batch.mode == "collaborative"
    by_key = {(r.table, r.key): r for r in batch.rows}
    one = by_key[("notes", 1)]
    assert {c.column: c.value for c in one.cells} == {"id": 1, "body": "ONE", "n": 1}
    assert len({(c.hlc, c.origin) for c in one.cells}) == 1 and one.cells[0].origin == "DEVA"
    two = by_key[("notes", 2)]
    assert two.cells == () and two.tomb is not None
    tag = next(r for r in batch.rows if r.table == "tags")
    assert tag.key_column == "" and {c.column: c.value for c in tag.cells} == {"name": "t", "x": 7}


def test_a_table_or_a_filter_never_moves_a_watermark(device) -> None:
    a = device("DEVA")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1), ('y', 20), ('z', 30)")
    a.write("DELETE FROM items WHERE uid = 'z'")
    assert a.read_rows(0).full
    assert not a.read_rows(0, table="items").full
    where = compile_predicates({"table": "items", "where": [["a", ">", 10]]}, ["uid", "a", "b"])
    filtered = a.read_rows(0, table="items", where=where)
    assert not filtered.full
    # x does not match; z is gone, so its delete travels (a query sync carries deletes)
    assert sorted(r.key for r in filtered.rows) == ["y", "z"]
    assert next(r for r in filtered.rows if r.key == "z").tomb is not None
    with pytest.raises(InvalidParams):
        stream.changes_since(a.conn, None, 0, where=where)


def test_unstamped_local_changes_hold_the_stream_back(device) -> None:
    a = device("DEVA")
    a.write("INSERT INTO items(uid, a) VALUES ('x', 1)")
    stamped = a.read_rows(0).last_seq
    with a.outside() as other:
        other.execute("INSERT INTO items(uid, a) VALUES ('y', 2)")
        other.execute("UPDATE items SET a = 5 WHERE uid = 'x'")  # logged by trigger, not stamped
    # Read without stamping: nothing past the first unstamped log row.
    batch = stream.changes_since(a.conn, None, 0).as_rows()
    assert batch.last_seq == stamped and [r.key for r in batch.rows] == ["x"]
    assert {c.column: c.value for c in batch.rows[0].cells}["a"] == 5  # (values are current; clocks follow on stamp)


def test_arguments_are_checked(device) -> None:
    a = device("DEVA")
    for kwargs in ({"limit": 0}, {"limit": changes.MAX_BATCH_ROWS + 1}):
        with pytest.raises(InvalidParams):
            stream.changes_since(a.conn, None, 0, **kwargs)
    with pytest.raises(InvalidParams):
        stream.changes_since(a.conn, None, -1)
    with pytest.raises(InvalidParams):
        stream.changes_since(a.conn, "nope", 0)


# --------------------------------------------------------------------------
# Plain form


def test_plain_form_round_trips_through_msgpack(device) -> None:
    a = device("DEVA")
    a.write("INSERT INTO items(uid, a, b) VALUES ('x', 9223372036854775807, ?)", ("ü",))
    a.write("INSERT INTO items(uid, a, b) VALUES (?, 1.5, NULL)", ("y",))
    a.write("DELETE FROM items WHERE uid = 'y'")
    batch = a.read_rows(0)
    wire = msgpack.packb(changes.batch_to_plain(batch), use_bin_type=True)
    assert changes.batch_from_plain(msgpack.unpackb(wire, raw=False)) == batch
    row = batch.rows[0]
    assert changes.decode_change(changes.encode_change("single_version", row)) == ("single_version", row)


def _c(column: str = "a", value: Any = 1, hlc: Any = 5, origin: Any = "DEVA", prev: tuple[Any, Any] = (None, None)) -> list[Any]:
    """A cell in plain form: [column, value, hlc, origin, prev hlc, prev origin]."""
    return [column, value, hlc, origin, *prev]


def _r(table: str = "items", key_column: str = "uid", key: Any = "x", seq: int = 3, cells: Any = None,
       tomb: Any = None) -> list[Any]:
    """A row change in plain form: [table, key column, key, seq, cells, tomb]."""
    return [table, key_column, key, seq, [_c()] if cells is None else cells, tomb]


def _plain(**over: Any) -> dict[str, Any]:
    base = {"mode": "single_version", "since_seq": 0, "last_seq": 3, "more": False, "full": True, "stream": "s1",
            "rows": [_r()]}
    base.update(over)
    return base


@pytest.mark.parametrize("bad", [
    None, [], {"mode": "single_version"},
    _plain(mode="other"), _plain(since_seq=-1), _plain(since_seq=5), _plain(more=1), _plain(full="yes"),
    _plain(stream=""), _plain(stream=5), _plain(stream=None), _plain(stream="s" * 10_000),
    {k: v for k, v in _plain().items() if k != "stream"},
    _plain(rows=[_r()[:5]]),  # a row of 5 items
    _plain(rows=[_r(cells=[_c()[:4]])]),  # a cell of 4 items
    _plain(rows=[_r(key=None, cells=[], tomb=[5, "DEVA", None, None])]),  # NULL key
    _plain(rows=[_r(key_column="")]),  # no conflict column
    _plain(rows=[_r(cells=[_c(hlc=-1)])]),  # clock out of range
    _plain(rows=[_r(cells=[_c(hlc=1 << 63)])]),
    _plain(rows=[_r(cells=[_c(origin="")])]),  # no origin
    _plain(rows=[_r(cells=[_c(prev=(4, None))])]),  # half a prev clock
    _plain(rows=[_r(cells=[_c("a", 1, 5, "D"), _c("a", 2, 6, "D")])]),  # column twice
    _plain(rows=[_r(cells=[_c(value=[1])])]),  # not a SQL value
    _plain(rows=[_r(cells=[_c(value=float("nan"))])]),
    _plain(rows=[_r(cells=[_c(value=True)])]),  # bool is not an integer here
    _plain(rows=[_r(cells=[], tomb=[5, None, None, None])]),  # half a tomb
    _plain(rows=[_r(cells=[], tomb=[5, "DEVA", None])]),  # a tomb of 3 items
    _plain(rows=[_r(cells=[], tomb=None)]),  # nothing at all
    _plain(mode="collaborative", rows=[_r("t", "", 1, 3, [_c("a", 1, 5, "D")], [6, "D", None, None])]),  # row and delete
    _plain(mode="collaborative", rows=[_r("t", "", 1, 3, [_c("a", 1, 5, "D"), _c("b", 1, 6, "D")])]),  # two clocks
])
def test_malformed_batches_are_protocol_errors(bad: Any) -> None:
    with pytest.raises(ProtocolError):
        changes.batch_from_plain(bad)


def test_the_well_formed_base_of_the_malformed_ones_is_accepted() -> None:
    """So each case above fails for its own defect, not for one they share."""
    assert changes.batch_from_plain(_plain()).stream == "s1"
    assert changes.batch_from_plain(_plain(rows=[_r(cells=[], tomb=[5, "DEVA", None, None])])).rows[0].tomb == (5, "DEVA")
    collaborative = _plain(mode="collaborative", rows=[_r("t", "", 1, 3, [_c("a", 1, 5, "D"), _c("b", 2, 5, "D")])])
    assert len(changes.batch_from_plain(collaborative).rows[0].cells) == 2


_scalar = (
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64) | st.floats()
    | st.text(max_size=5) | st.binary(max_size=5)
)


def _mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any] = _scalar) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten: near-valid input reaches the deep checks."""
    return st.integers(0, 9).flatmap(lambda n: good if n else bad)


_name = _mostly(st.sampled_from(["items", "uid", "a", "DEVA", ""]))
_hlc = _mostly(st.integers(0, 9))
_cell = _mostly(st.tuples(_name, _scalar, _hlc, _name, _mostly(st.none(), _hlc), _mostly(st.none(), _name)).map(list))
_tomb = _mostly(st.none() | st.tuples(_hlc, _name, _mostly(st.none(), _hlc), _mostly(st.none(), _name)).map(list))
_row = _mostly(st.tuples(_name, _name, _scalar, _hlc, st.lists(_cell, max_size=3), _tomb).map(list))
_batch = st.builds(
    lambda mode, rows, since, last, stream: _plain(mode=mode, rows=rows, since_seq=since, last_seq=last, stream=stream),
    _mostly(st.sampled_from(["single_version", "collaborative"])), st.lists(_row, max_size=3),
    _mostly(st.integers(0, 2)), _mostly(st.integers(2, 4)), _mostly(st.sampled_from(["s1", "0" * 32])),
)


@settings(max_examples=300, deadline=None)
@given(_mostly(_batch, st.one_of(_scalar, st.lists(_scalar, max_size=3), st.dictionaries(st.text(max_size=8), _scalar, max_size=6))))
def test_any_input_is_a_batch_or_a_protocol_error(obj: Any) -> None:
    try:
        batch = changes.batch_from_plain(obj)
    except ProtocolError as exc:
        event(f"refused: {str(exc.message).split(':')[-1].strip()[:30]}")
        return
    event(f"accepted with {len(batch.rows)} row(s)")
    assert isinstance(batch, OutBatch)
    assert all(isinstance(r, RowChange) and all(isinstance(c, Cell) for c in r.cells) for r in batch.rows)





def _often(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` three times in four: each field's edges get tried with the others valid."""
    return st.integers(0, 3).flatmap(lambda n: good if n else bad)


_edge_hlc = _often(st.sampled_from([0, 7, (1 << 63) - 1]), st.sampled_from([None, -1, 1 << 63, True, 1.0, "7"]))
_edge_name = _often(st.sampled_from(["a", "DEVA", "x" * 1024]), st.sampled_from([None, "", "x" * 1025, 1, b"a"]))
_edge_value = st.sampled_from([None, 0, -(1 << 63), (1 << 63) - 1, 1 << 63, -(1 << 63) - 1, 1.5, float("nan"), float("inf"),
                               "s", b"b", True, [1], {"a": 1}])
_edge_cell = st.one_of(
    st.tuples(_edge_name, _edge_value, _edge_hlc, _edge_name, _edge_hlc, _edge_name).map(list),
    st.tuples(_edge_name, _edge_value, _edge_hlc, _edge_name, _often(st.none(), _edge_hlc), _often(st.none(), _edge_name)).map(list),
    st.lists(_edge_value, min_size=5, max_size=7),
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(_edge_cell | _cell, min_size=1, max_size=3), st.sampled_from(["single_version", "collaborative"]))
def test_the_quick_cell_check_agrees_with_the_full_checks(cells: list[Any], mode: str) -> None:
    """Decoding takes well-formed list cells the quick way (changes._plain_cell);
    tuples always go through the full checks: same row, or the same error."""

    def decode(cs: list[Any]) -> Any:
        try:
            return changes.row_from_plain(["items", "uid", "x", 3, cs, None], mode)
        except ProtocolError as exc:
            return exc.message

    as_tuples = [tuple(c) if isinstance(c, list) else c for c in cells]
    got = decode(cells)
    event("accepted" if isinstance(got, RowChange) else "refused")
    assert repr(got) == repr(as_tuples and decode(as_tuples))  # repr: NaN == NaN


# --------------------------------------------------------------------------
# Counting what a peer has not been sent (status: per-peer lag)


def _sent_rows(r: Replica, since: int) -> int:
    """What a full sync from ``since`` sends, read the way the stream reads it."""
    return len(r.read_rows(since, limit=changes.MAX_BATCH_ROWS).rows)


def _unsent(r: Replica, other: Replica) -> int:
    """``r``'s count for ``other``, from where ``other`` is in ``r``'s stream."""
    return stream.unsent_rows(r.conn, *merge_position(other, r))


def merge_position(receiver: Replica, sender: Replica) -> tuple[int, str | None]:
    return merge.position(receiver.conn, sender.id)


@pytest.mark.parametrize("kind", ["collaborative", "single_version"])
def test_unsent_rows_counts_each_row_the_stream_would_send_once(device, kind: str) -> None:
    a, b = device("DEVA", kind=kind), device("DEVB", kind=kind)
    if kind == "collaborative":
        insert, update, delete = ("INSERT INTO notes(id, body, n) VALUES (?, 'x', ?)", "UPDATE notes SET n = n + 1 WHERE id = ?",
                                  "DELETE FROM notes WHERE id = ?")
    else:
        insert, update, delete = ("INSERT INTO items(uid, a, b) VALUES ('u' || ?, ?, 'b')", "UPDATE items SET a = a + 1 WHERE uid = 'u' || ?",
                                  "DELETE FROM items WHERE uid = 'u' || ?")
    assert _unsent(a, b) == 0
    for i in range(1, 6):
        a.write(insert, (i, i))
    assert _unsent(a, b) == 5 == _sent_rows(a, 0)

    a.write(update, (1,))
    a.write(update, (1,))  # changed three times, still one row to send
    assert _unsent(a, b) == 5 == _sent_rows(a, 0)

    a.push(b)
    assert _unsent(a, b) == 0
    since = merge_position(b, a)[0]

    a.write(update, (2,))
    a.write(delete, (3,))
    a.write(update, (2,))
    assert _unsent(a, b) == 2 == _sent_rows(a, since)

    # A position in another stream (or beyond this file's log) counts from 0, as the stream would send.
    assert stream.unsent_rows(a.conn, since, "another stream") == _sent_rows(a, 0) == 5
    assert stream.unsent_rows(a.conn, 10**9, merge_position(b, a)[1]) == 5

    a.push(b)
    assert _unsent(a, b) == 0


def test_unsent_rows_never_counts_rows_received_from_peers_collaborative(device) -> None:
    a, b, c = (device(d, kind="collaborative") for d in ("DEVA", "DEVB", "DEVC"))
    for i in range(4):
        a.write("INSERT INTO notes(id, body, n) VALUES (?, 'a', 0)", (i,))
    a.push(b)
    assert _unsent(b, c) == 0 == _sent_rows(b, 0)  # A's rows live in B's device table: never relayed
    b.write("INSERT INTO tags(name, x) VALUES ('t', 1)")
    assert _unsent(b, c) == 1 == _sent_rows(b, 0)


def test_unsent_rows_counts_relayed_rows_single_version(device) -> None:
    a, b, c = (device(d) for d in ("DEVA", "DEVB", "DEVC"))
    for i in range(3):
        a.write("INSERT INTO items(uid, a) VALUES (?, ?)", (f"r{i}", i))
    a.push(b)
    assert _unsent(b, c) == 3 == _sent_rows(b, 0)  # B passes A's rows on
    b.push(c)
    assert _unsent(b, c) == 0


_SIZED = [None, 0, -5, 2 ** 62, -(2 ** 63), 1.5, -0.0, float("inf"), "", "abc", "12", "1e5", " 7", "é", "\x00x", b"", b"\x00\x01",
          b"abc" * 40, "x" * 300]


@pytest.mark.parametrize("decl", ["INTEGER", "TEXT", "REAL", "BLOB", "NUMERIC", "", "TEXT COLLATE NOCASE", "TEXT COLLATE RTRIM"])
def test_a_row_size_counts_text_and_blobs_by_length_and_anything_else_as_8(decl: str) -> None:
    """``changes.size_sql`` (the byte bound's size of a row): ``length()`` of
    a text or blob value, 8 for a number or NULL — whatever the column's
    affinity or collation turned the value into, and with ``>= ''`` in
    place of ``typeof()`` the same as ``typeof()`` says."""
    import sqlite3

    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE TABLE t(v {decl})")
    conn.executemany("INSERT INTO t(v) VALUES (?)", [(v,) for v in _SIZED])
    by_type = "CASE typeof(v) WHEN 'text' THEN length(v) WHEN 'blob' THEN length(v) ELSE 8 END"
    got = conn.execute(f"SELECT typeof(v), {changes.size_sql(['v'], '')}, {by_type} FROM t").fetchall()
    assert {t for t, _, _ in got} >= ({"integer", "real", "null", "text", "blob"} if decl in ("", "BLOB") else {"text", "null"})
    assert [size for _, size, _ in got] == [expected for _, _, expected in got]
    conn.close()
