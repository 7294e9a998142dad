"""Row clocks keyed by the row's local key (store/cells.py): what happens
when a row leaves its key — a delete, a new conflict value, an ``INSERT OR
REPLACE`` by another program, a key reused by the next row — and that the
stream, the merge and compaction treat every case as the clocks say.

A single_version table's key is either an AUTOINCREMENT id beside its
conflict column (``things`` here) or the conflict column itself
(``words``): sync_schema.json allows nothing else. An id is never given
again by SQLite, but a program may insert a row with an explicit one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from replicas import Replica, field, schema_doc

from p2pstore.protocol.batch import KEY
from p2pstore.store import capture, cells

THINGS = "CREATE TABLE things(id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL UNIQUE, a INTEGER, b TEXT)"
WORDS = "CREATE TABLE words(w TEXT PRIMARY KEY, n INTEGER)"
DOC = schema_doc({
    "things": ([field("id", "Integer", autoinc=True), field("uid", "Text", pk=True, not_null=True), field("a", "Integer"),
                field("b", "Text")], ["uid", "a", "b"]),
    "words": ([field("w", "Text", pk=True, not_null=True), field("n", "Integer")], ["w", "n"]),
})
SYNCED = "SELECT uid, a, b FROM things ORDER BY uid"


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Replica, Replica]]:
    a, b = Replica(tmp_path / "a.db", "DEVA"), Replica(tmp_path / "b.db", "DEVB")
    for r in (a, b):
        r.write(THINGS)
        r.write(WORDS)
        r.make_distributed("things", "words", doc=DOC)
    yield a, b
    a.close()
    b.close()


def _clocks(r: Replica, uid: str) -> list[tuple[object, ...]]:
    """Row ``uid``'s logical cells: (column, hlc, writer), origin NULL being this device."""
    return r.rows("SELECT col, hlc, coalesce(origin, ?) FROM _p2p_clocks WHERE ck = ? ORDER BY col", (r.id, uid))


def _orphans(r: Replica) -> int:
    """Row clocks whose row is not in the table."""
    return r.rows("SELECT count(*) FROM _p2p_rows r JOIN _p2p_tables t ON t.tid = r.tid WHERE "
                  "(t.name = 'things' AND pk NOT IN (SELECT id FROM things)) OR "
                  "(t.name = 'words' AND pk NOT IN (SELECT w FROM words))")[0][0]


def test_one_row_clock_per_row_keyed_by_the_local_key_no_conflict_value_stored(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    a.write("INSERT INTO things(uid, a, b) VALUES ('u1', 1, 'x'), ('u2', 2, 'y')")
    a.push(b)
    for r in (a, b):
        assert r.rows("SELECT pk FROM _p2p_rows ORDER BY pk") == r.rows("SELECT id FROM things ORDER BY id")
        assert r.rows("SELECT count(*) FROM _p2p_cells") == [(0,)]
        assert "ck" not in {c for (c,) in r.rows("SELECT name FROM pragma_table_info('_p2p_rows')")}
    assert _clocks(a, "u1") == _clocks(b, "u1")


def test_a_deleted_row_keeps_its_clocks_by_value_and_its_key_reused_starts_fresh(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    a.write("INSERT INTO things(uid, a, b) VALUES ('u1', 1, 'x'), ('u2', 2, 'y')")
    a.push(b)
    before = _clocks(a, "u2")
    (key,) = a.rows("SELECT id FROM things WHERE uid = 'u2'")[0]
    out = a.outside()  # another program: delete a row, then insert one with its id, before the daemon stamps either
    out.execute("DELETE FROM things WHERE uid = 'u2'")
    out.execute("INSERT INTO things(id, uid, a, b) VALUES (?, 'u3', 3, 'z')", (key,))
    out.close()
    assert a.rows("SELECT id FROM things WHERE uid = 'u3'") == [(key,)]  # the same key
    a.write("SELECT 1")  # stamps
    assert _clocks(a, "u2") == before  # per column now, by value, beside its tomb
    assert a.rows("SELECT count(*) FROM _p2p_tombs") == [(1,)]
    assert min(hlc for _, hlc, _ in _clocks(a, "u3")) > max(hlc for _, hlc, _ in before)
    a.push(b)
    assert b.rows(SYNCED) == a.rows(SYNCED) == [("u1", 1, "x"), ("u3", 3, "z")]
    assert _clocks(b, "u3") == _clocks(a, "u3")
    assert _clocks(b, "u2") == before  # the delete travelled with the clocks it hides


def test_a_new_conflict_value_is_a_delete_and_an_insert_on_the_same_key(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    a.write("INSERT INTO things(uid, a, b) VALUES ('u1', 1, 'x')")
    a.push(b)
    old = _clocks(a, "u1")
    a.write("UPDATE things SET uid = 'v1' WHERE uid = 'u1'")
    assert _clocks(a, "u1") == old  # the old value's clocks stay, by value
    assert [col for col, _, _ in _clocks(a, "v1")] == ["a", "b", "uid"]
    a.push(b)
    assert b.rows(SYNCED) == [("v1", 1, "x")]
    b.write("UPDATE things SET b = 'edited on b' WHERE uid = 'v1'")
    b.push(a)
    assert a.rows(SYNCED) == b.rows(SYNCED) == [("v1", 1, "edited on b")]


def test_insert_or_replace_by_another_program_leaves_an_orphan_that_nothing_reads_and_compaction_drops(
        pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    a.write("INSERT INTO things(uid, a, b) VALUES ('u1', 1, 'x'), ('u2', 2, 'y')")
    a.push(b)
    out = a.outside()
    out.execute("INSERT OR REPLACE INTO things(uid, a, b) VALUES ('u1', 10, 'replaced')")  # no delete trigger fires
    out.close()
    a.write("SELECT 1")
    assert _orphans(a) == 1  # u1's old row clock, under a key no row has
    batch = a.read(0)
    keys = sorted([r.key for r in batch.rows] + [row[KEY] for block in batch.blocks for row in block.rows])
    assert keys == ["u1", "u2"]  # each row once: the orphan is not sent
    a.push(b)
    assert b.rows(SYNCED) == a.rows(SYNCED) == [("u1", 10, "replaced"), ("u2", 2, "y")]
    capture.compact(a.conn, a.state, sweep=False)  # a large sync's in-line compaction: log rows only
    assert _orphans(a) == 1
    a.compact()
    assert _orphans(a) == 0
    assert a.rows("SELECT count(*) FROM _p2p_rows") == [(2,)]
    # The key taken again by another insert is the new row's alone.
    a.write("INSERT INTO things(id, uid, a, b) VALUES (1, 'u9', 9, 'q')")
    a.push(b)
    assert b.rows(SYNCED) == a.rows(SYNCED)
    assert _clocks(b, "u9") == _clocks(a, "u9")


def test_a_peers_delete_moves_the_rows_clocks_to_cells_and_a_later_edit_resurrects_it(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    a.write("INSERT INTO things(uid, a, b) VALUES ('u1', 1, 'x')")
    a.push(b)
    b.write("DELETE FROM things WHERE uid = 'u1'")
    a.clock.observe(b.clock.last, None)  # a's edit, concurrent with the delete, comes after it on the clock
    a.write("UPDATE things SET b = 'later' WHERE uid = 'u1'")  # so it outlives it
    b.push(a)
    a.push(b)
    b.push(a)
    assert a.rows(SYNCED) == b.rows(SYNCED) == [("u1", None, "later")]
    for r in (a, b):
        assert _orphans(r) == 0
    assert _clocks(a, "u1") == _clocks(b, "u1")


def test_insert_or_replace_of_a_key_that_is_the_conflict_value_keeps_its_clocks_going(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    b.write("INSERT INTO words(w, n) VALUES ('hello', 1)")
    b.push(a)
    (theirs,) = a.rows("SELECT hlc, origin FROM _p2p_clocks WHERE ck = 'hello' AND col = 'n'")
    assert theirs[1] == "DEVB"
    out = a.outside()
    out.execute("INSERT OR REPLACE INTO words(w, n) VALUES ('hello', 2)")  # same key: delete and insert, no trigger for the delete
    out.close()
    a.write("SELECT 1")
    assert _orphans(a) == 0
    assert a.rows("SELECT count(*) FROM _p2p_tombs") == [(0,)]  # a replace is no delete
    # The new value knowingly replaced B's: its prev is B's clock (a conflict policy sees no conflict).
    assert a.rows("SELECT prev_hlc, prev_origin FROM _p2p_clocks WHERE ck = 'hello' AND col = 'n'") == [theirs]
    a.push(b)
    assert b.rows("SELECT w, n FROM words") == [("hello", 2)]


def test_the_orphan_sweep_walks_a_table_a_chunk_at_a_time(pair: tuple[Replica, Replica]) -> None:
    a, _ = pair
    a.write("INSERT INTO things(uid, a, b) VALUES " + ", ".join(f"('u{i}', {i}, 'x')" for i in range(10)))
    out = a.outside()
    out.execute("INSERT OR REPLACE INTO things(uid, a, b) VALUES ('u8', 0, 'y')")  # id 9 becomes an orphan, 11 is new
    out.close()
    a.write("SELECT 1")
    assert _orphans(a) == 1
    keys = cells.RowKeys.of(next(t for t in a.state.tables.values() if t.info.name == "things"))
    marks: list[object] = []
    mark = None
    for _ in range(10):
        mark = cells.sweep_orphans(a.conn, keys, mark, chunk=3)
        marks.append(mark)
        if mark is None:
            break
    assert marks == [3, 6, 9, 11, None]  # 11 row clocks, 3 a call; the orphan (9) went in the third
    assert _orphans(a) == 0
    assert a.rows("SELECT count(*) FROM _p2p_rows r JOIN _p2p_tables t ON t.tid = r.tid WHERE t.name = 'things'") == [(10,)]


def test_a_bulk_append_by_another_program_is_stamped_as_the_general_path_stamps_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shortcut of store/capture.py for a range of appended rows only
    (``_only_appended_rows``) writes the same clocks, log and stream as the
    statements it skips; a range with anything else takes the general path."""
    from p2pstore.store import capture

    taken: list[tuple[str, bool]] = []
    shortcut = capture._only_appended_rows

    def spy(conn: object, table: capture.CapturedTable, *args: object) -> bool:
        taken.append((table.info.name, shortcut(conn, table, *args)))  # type: ignore[arg-type]
        return taken[-1][1]

    def replica(name: str) -> Replica:
        r = Replica(tmp_path / f"{name}.db", "DEVA", wall=1_000)
        r.write(THINGS)
        r.write(WORDS)
        r.make_distributed("things", "words", doc=DOC)
        return r

    def appended_then(r: Replica) -> None:
        out = r.outside()
        out.executemany("INSERT INTO things(uid, a, b) VALUES (?, ?, ?)", [(f"u{i}", i, None if i % 3 else "x") for i in range(50)])
        out.close()
        r.write("SELECT 1")
        out = r.outside()  # then an update among appended rows: not a bulk append any more
        out.executemany("INSERT INTO things(uid, a, b) VALUES (?, ?, ?)", [(f"v{i}", i, "y") for i in range(5)])
        out.execute("UPDATE things SET a = 99 WHERE uid = 'u7'")
        out.close()
        r.write("SELECT 1")

    state = "SELECT * FROM {} ORDER BY 1, 2"
    fast, general = replica("fast"), replica("general")
    monkeypatch.setattr(capture, "_only_appended_rows", spy)
    appended_then(fast)
    monkeypatch.setattr(capture, "_only_appended_rows", lambda *args: False)
    appended_then(general)
    assert [t for t in taken if t[0] == "things"] == [("things", True), ("things", False)]
    for table in ("_p2p_rows", "_p2p_cells", "_p2p_tombs", "_p2p_log"):
        assert fast.rows(state.format(table)) == general.rows(state.format(table)), table
    assert fast.rows("SELECT count(*) FROM _p2p_rows") == [(55,)]  # one row clock a row
    for r in (fast, general):
        peer = Replica(tmp_path / f"peer-of-{r.path.stem}.db", "DEVB", wall=1_000)
        peer.write(THINGS)
        peer.write(WORDS)
        peer.make_distributed("things", "words", doc=DOC)
        r.push(peer)
        assert peer.rows(SYNCED) == r.rows(SYNCED)
        peer.close()
    fast.close()
    general.close()
