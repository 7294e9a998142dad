"""Columnar blocks (protocol 2): the sender's block reads
(store/changes.py ``_collaborative_block``, ``_single_version_block``), their
wire form (protocol/batch.py ``block_from_plain``) and the receiver's
set-based apply (store/blocks.py ``apply_block``).

The invariants checked here, each against the row form rather than itself:

- sender: ``changes_since(..., columnar=True).as_rows()`` is exactly
  ``changes_since(..., columnar=False)``, at any position and limit;
- receiver: a batch with blocks, applied through the wire, writes exactly
  what its ``as_rows()`` form writes applied row by row — tables and local
  keys, log rows and seqs, row and column clocks, tombs, conflicts,
  failures, watermarks, the clock — and gives the same ApplyResult;
- the set-based path is really taken for an ordinary batch (so the
  comparison is not vacuous), and a block it can't take (known rows, a
  hostile clock, a row the table refuses) leaves the decisions to the row
  path, which isolates the bad row in the failure log;
- ``decode`` refuses every malformed block with ``ProtocolError``.

Real SQLite files (``replicas.Replica``), one fixed wall clock for every
device, so that two receivers give identical hlc values.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from replicas import Replica, field, schema_doc

from p2pstore.clock import MAX_HLC
from p2pstore.errors import ProtocolError
from p2pstore.protocol.batch import (
    HLC, KEY, ORIGIN, PREV_HLC, PREV_ORIGIN, SEQ, TOMB_HLC, TOMB_ORIGIN, TOMB_PREV_HLC, TOMB_PREV_ORIGIN, VALUES,
    MAX_BATCH_ROWS, Block, OutBatch, batch_to_plain, decode, encode,
)
from p2pstore.protocol.messages import pack_values
from p2pstore.store import capture, changes, merge, stream

WALL = 1_700_000_000_000
SENDER, OTHER, ME = "DEVA", "DEVC", "DEVB"
HOSTILE = (1 << 63) - 6  # as tests/store/test_merge_clock.py: far beyond any clock bound, inside MAX_HLC

NOTES = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT, n INTEGER)"
WORDS = "CREATE TABLE words(w TEXT PRIMARY KEY, n INTEGER)"
TAGS = "CREATE TABLE tags(name TEXT, x INTEGER)"  # keyed by rowid
ITEMS = "CREATE TABLE items(id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL UNIQUE, a INTEGER, b TEXT, note TEXT)"
DOC = schema_doc({"items": ([field("id", "Integer", autoinc=True), field("uid", "Text", pk=True, not_null=True),
                             field("a", "Integer"), field("b", "Text"), field("note", "Text")], ["uid", "a", "b"])})
COLLABORATIVE, SINGLE_VERSION = "collaborative", "single_version"
MODES = (COLLABORATIVE, SINGLE_VERSION)
_files = itertools.count()


def _device(root: Path, device_id: str, mode: str, *, items: str = ITEMS, doc: dict[str, Any] = DOC) -> Replica:
    r = Replica(root / f"{device_id}-{next(_files)}.db", device_id, wall=WALL)
    if mode == SINGLE_VERSION:
        r.write(items)
        r.make_distributed("items", doc=doc)
    else:
        for sql in (NOTES, WORDS, TAGS):
            r.write(sql)
        r.make_distributed("notes", "words", "tags")
    return r


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(device_id: str, mode: str, **kw: Any) -> Replica:
        made.append(_device(tmp_path, device_id, mode, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


#: Rows that differ between any two stores: each has its own stream ID.
_DEVICE_TIDS = "(SELECT tid FROM _p2p_tables WHERE kind = 'device')"
#: A device table's row clocks: a run of them (store/row_runs.py) or an entry each, compared as the clocks they are.
_OWN = {"_p2p_meta": " WHERE key != 'stream'", "_p2p_cells": f" WHERE tid NOT IN {_DEVICE_TIDS}"}
#: Columns holding origin numbers (store/origins.py): local to a file, they never travel.


def _dump(r: Replica) -> dict[str, Any]:
    """Everything a store holds, exactly (temp staging tables are not in
    sqlite_master): origin numbers and ``sqlite_sequence`` included."""
    names = [n for (n,) in r.rows("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    skip = {"_p2p_failures", "_p2p_conflicts", "_p2p_row_runs"}
    out: dict[str, Any] = {}
    for n in names:
        if n in skip:
            continue
        cursor = r.conn.execute(f'SELECT * FROM "{n}"' + _OWN.get(n, ""))
        rows = [tuple(row) for row in cursor]
        out[n] = sorted(map(repr, rows))
    return out | {
        "device row clocks": sorted(map(repr, r.rows(f"SELECT * FROM _p2p_clocks WHERE tid IN {_DEVICE_TIDS}"))),
        "failures": r.rows("SELECT origin, tbl, change, reason, at FROM _p2p_failures ORDER BY id"),
        "conflicts": r.rows("SELECT id, tbl, ck, col, losing_value, winner, winner_hlc, loser, loser_hlc, at "
                            "FROM _p2p_conflicts ORDER BY id"),
    }


def _result(res: merge.ApplyResult) -> tuple[Any, ...]:
    return (res.applied, res.conflicts, res.failed, res.last_seq, res.remote)


def _no_bulk(self: merge._Applier, rows: Any, **kw: Any) -> bool:
    return False


def _no_block(*args: Any) -> bool:
    raise AssertionError("a batch in row form must not reach apply_block")


def _apply_pair(monkeypatch: pytest.MonkeyPatch, x: Replica, y: Replica, batch: OutBatch, sender: str,
                taken: list[bool] | None = None) -> tuple[merge.ApplyResult, merge.ApplyResult]:
    """``batch`` through the wire to ``x`` as it is (blocks), and to ``y`` in
    row form applied strictly row by row; both must end up the same."""
    columnar = decode(encode(batch))
    rows = decode(encode(batch, columnar=False))
    assert not rows.blocks and rows == columnar.as_rows() == batch.as_rows()
    calls: list[bool] = []
    real = merge.apply_block

    def spy(ap: merge._Applier, block: Block, fields: Any = None) -> bool:
        calls.append(real(ap, block, fields))
        return calls[-1]

    with monkeypatch.context() as m:
        m.setattr(merge, "apply_block", spy)
        a = x.apply(columnar, sender)
    with monkeypatch.context() as m:
        m.setattr(merge, "apply_block", _no_block)
        m.setattr(merge._Applier, "apply_bulk", _no_bulk)
        b = y.apply(rows, sender)
    assert _result(a) == _result(b)
    assert _dump(x) == _dump(y)
    assert x.clock.last == y.clock.last
    if taken is not None:
        taken.extend(calls)
    return a, b


def _record(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[Any]:
    """What each call of ``owner.name`` returns from now on (the calls go through)."""
    returned: list[Any] = []
    real = getattr(owner, name)

    def spy(*args: Any) -> Any:
        returned.append(real(*args))
        return returned[-1]

    monkeypatch.setattr(owner, name, spy)
    return returned


def _sync(monkeypatch: pytest.MonkeyPatch, src: Replica, x: Replica, y: Replica, *, limit: int = 500,
          repeat: bool = False, since: int | None = None, table: str | None = None,
          taken: list[bool] | None = None) -> None:
    """Send ``x`` and ``y`` what ``src`` has (from ``since``, else from their
    watermark), batch by batch; ``repeat``: every batch twice."""
    assert merge.position(x.conn, src.id) == merge.position(y.conn, src.id)
    start = src.start_position(*merge.position(x.conn, src.id)) if since is None else since
    for _ in range(1000):
        batch = src.read(start, limit=limit, table=table)
        _apply_pair(monkeypatch, x, y, batch, src.id, taken)
        if repeat:
            again, _ = _apply_pair(monkeypatch, x, y, batch, src.id, taken)
            assert again.applied == 0
        start = batch.last_seq
        if not batch.more:
            return
    raise AssertionError("the stream did not end")


# --------------------------------------------------------------------------
# Local operations (hypothesis)

_KEY = st.integers(1, 5)
_VALUE = st.sampled_from([None, 0, 1, -7, 1 << 62, -(1 << 63), 1.5, "x", "é", "", b"\x00\xff", b""])
_RAW = st.sampled_from([b"\xff", b"a\xfe\xfdz"])  # bytes that are not UTF-8, stored as TEXT by another program
_UID = _KEY.map("u{}".format)


def _many(sql: str, width: int, key: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, tuple[Any, ...]]]:
    """One statement writing 1..4 rows (``sql`` ends with one row's placeholders)."""
    row = st.tuples(key, *[_VALUE] * (width - 1))
    return st.lists(row, min_size=1, max_size=4).map(
        lambda rows: (sql + f", ({', '.join('?' * width)})" * (len(rows) - 1), tuple(v for r in rows for v in r)))


_SV_OPS = st.one_of(
    _many("INSERT OR IGNORE INTO items(uid, a, b) VALUES (?, ?, ?)", 3, _UID),
    _many("INSERT OR IGNORE INTO items(uid, a, b) VALUES (?, ?, ?)", 3, _UID),
    _many("INSERT OR REPLACE INTO items(uid, a, b) VALUES (?, ?, ?)", 3, _UID),
    st.tuples(st.just("UPDATE items SET a = ? WHERE uid = ?"), st.tuples(_VALUE, _UID)),
    st.tuples(st.just("UPDATE items SET a = ?, b = ? WHERE uid = ?"), st.tuples(_VALUE, _VALUE, _UID)),
    st.tuples(st.just("UPDATE items SET note = ? WHERE uid = ?"), st.tuples(_VALUE, _UID)),
    st.tuples(st.just("UPDATE OR IGNORE items SET uid = ? WHERE uid = ?"), st.tuples(_UID, _UID)),
    st.tuples(st.just("DELETE FROM items WHERE uid = ?"), st.tuples(_UID)),
    st.tuples(st.just("UPDATE items SET b = CAST(? AS TEXT) WHERE uid = ?"), st.tuples(_RAW, _UID)),
)

_COLLABORATIVE_OPS = st.one_of(
    _many("INSERT OR REPLACE INTO notes(id, body, n) VALUES (?, ?, ?)", 3, _KEY),
    _many("INSERT OR REPLACE INTO notes(id, body, n) VALUES (?, ?, ?)", 3, _KEY),
    st.tuples(st.just("UPDATE notes SET body = ? WHERE id = ?"), st.tuples(_VALUE, _KEY)),
    st.tuples(st.just("UPDATE OR IGNORE notes SET id = ? WHERE id = ?"), st.tuples(_KEY, _KEY)),
    st.tuples(st.just("DELETE FROM notes WHERE id = ?"), st.tuples(_KEY)),
    _many("INSERT OR REPLACE INTO words(w, n) VALUES (?, ?)", 2, _KEY.map("w{}".format)),
    st.tuples(st.just("DELETE FROM words WHERE w = ?"), st.tuples(_KEY.map("w{}".format))),
    _many("INSERT INTO tags(x, name) VALUES (?, ?)", 2, _VALUE),
    st.tuples(st.just("UPDATE tags SET x = ? WHERE rowid = ?"), st.tuples(_VALUE, _KEY)),
    st.tuples(st.just("DELETE FROM tags WHERE rowid = ?"), st.tuples(_KEY)),
    st.tuples(st.just("UPDATE notes SET body = CAST(? AS TEXT) WHERE id = ?"), st.tuples(_RAW, _KEY)),
)
_OPS = {SINGLE_VERSION: _SV_OPS, COLLABORATIVE: _COLLABORATIVE_OPS}


def _write(r: Replica, op: tuple[str, tuple[Any, ...]], outside: bool) -> None:
    """One local write, through the daemon or by another program (stamped at the next read or write)."""
    sql, params = op
    if outside:
        other = r.outside()
        try:
            other.execute(sql, params)
        finally:
            other.close()
    else:
        r.write(sql, params)


@st.composite
def _rounds(draw: st.DrawFn, mode: str) -> list[tuple[Any, ...]]:
    """Rounds of local writes (mostly on the sender A, some on C and on both
    receivers, some by another program) each followed by a sync: from A or
    C, in batches of a few rows or all at once, maybe every batch twice,
    maybe from the start again (rows the receivers know), maybe one table."""
    ops = _OPS[mode]
    steps: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 4))):
        for who, most in (("A", 6), ("C", 2), ("XY", 2)):
            for op in draw(st.lists(ops, min_size=1 if who == "A" else 0, max_size=most)):
                steps.append(("local", who, op, draw(st.integers(0, 4)) == 0))
        if mode == SINGLE_VERSION and draw(st.booleans()):  # rows relayed through A, other origins, prev clocks
            steps.append(("push", draw(st.sampled_from(["AC", "CA", "XA"])), 500, False))
        limit, repeat = draw(st.sampled_from([1, 2, 3, 500])), draw(st.booleans())
        steps.append((draw(st.sampled_from(["sync", "sync", "resend", "table"])), draw(st.sampled_from(["A", "A", "C"])), limit, repeat))
    return steps


def _run(monkeypatch: pytest.MonkeyPatch, mode: str, steps: list[tuple[Any, ...]], taken: list[bool] | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a, c = _device(root, SENDER, mode), _device(root, OTHER, mode)
        x, y = _device(root, ME, mode), _device(root, ME, mode)
        devices = {"A": a, "C": c}
        tables = ["notes", "words", "tags"] if mode == COLLABORATIVE else ["items"]
        try:
            for i, (kind, who, arg, flag) in enumerate(steps):
                if kind == "local":
                    for r in ([x, y] if who == "XY" else [devices[who]]):
                        _write(r, arg, flag)
                elif kind == "sync":
                    _sync(monkeypatch, devices[who], x, y, limit=arg, repeat=flag, taken=taken)
                elif kind == "resend":  # from the start: the receivers know (some of) these rows
                    _sync(monkeypatch, devices[who], x, y, limit=arg, since=0, repeat=flag, taken=taken)
                elif kind == "table":  # one table's changes: not a batch of the whole stream
                    _sync(monkeypatch, devices[who], x, y, limit=arg, since=0, table=tables[i % len(tables)], repeat=flag, taken=taken)
                elif who == "XA":  # the receivers' own rows come back to them through A
                    x.push(a)
                    y.read(0)  # (y stamps what x just stamped: the two stay the same)
                else:  # A and C exchange rows (single_version relays them)
                    src, dst = (a, c) if who == "AC" else (c, a)
                    src.push(dst)
            # Everything in the end, once more with the final state.
            for src in (a, c):
                _sync(monkeypatch, src, x, y, taken=taken)
        finally:
            for r in (a, c, x, y):
                r.close()


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_batch_of_blocks_applies_as_its_rows_do(monkeypatch: pytest.MonkeyPatch, mode: str, data: st.DataObject) -> None:
    _run(monkeypatch, mode, data.draw(_rounds(mode)))


# --------------------------------------------------------------------------
# The set-based path is taken (the comparison above is not vacuous)


def test_the_set_based_path_is_taken_for_ordinary_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    ins = ("INSERT INTO notes(id, body, n) VALUES (?, ?, ?)", (1, "a", 1))
    steps: list[tuple[Any, ...]] = [
        ("local", "A", ins, False), ("local", "A", ("INSERT INTO notes(id, body, n) VALUES (2, 'b', 2)", ()), False),
        ("sync", "A", 500, True),  # fresh rows, then the same batch again (stale)
        ("local", "A", ("UPDATE notes SET body = 'c' WHERE id = 1", ()), False),
        ("local", "A", ("DELETE FROM notes WHERE id = 2", ()), False),
        ("sync", "A", 500, False),  # an update and a delete of known rows
    ]
    taken: list[bool] = []
    _run(monkeypatch, COLLABORATIVE, steps, taken)
    assert taken == [True, True, True]  # collaborative: every one-block batch

    steps = [
        ("local", "A", ("INSERT INTO items(uid, a, b) VALUES ('u1', 1, 'p'), ('u2', 2, 'q')", ()), False),
        ("sync", "A", 500, True),  # fresh rows, then the same batch again (echoes: nothing to do)
        ("local", "A", ("INSERT INTO items(uid, a, b) VALUES ('u3', 3, 'r')", ()), False),
        ("sync", "A", 500, False),  # fresh again
        ("local", "A", ("UPDATE items SET a = 5 WHERE uid = 'u1'", ()), False),
        ("sync", "A", 500, False),  # a one-column edit: a row change, no block
        ("local", "A", ("INSERT OR REPLACE INTO items(uid, a, b) VALUES ('u2', 7, 's')", ()), False),
        ("sync", "A", 500, False),  # a known row, deleted and inserted again: the planner's
    ]
    taken = []
    _run(monkeypatch, SINGLE_VERSION, steps, taken)
    assert taken == [True, True, True, False]


@pytest.mark.parametrize("mode", MODES)
def test_a_fresh_batch_never_reaches_the_row_paths(monkeypatch: pytest.MonkeyPatch, device: Callable[..., Replica], mode: str) -> None:
    a, b = device(SENDER, mode), device(ME, mode)
    if mode == SINGLE_VERSION:
        for k in range(1, 301):
            a.conn.execute("INSERT INTO items(uid, a, b) VALUES (?, ?, ?)", (f"u{k}", k, None if k % 7 else f"b{k}"))
        table, count = "items", "SELECT count(*) FROM items"
    else:
        for k in range(1, 301):
            a.conn.execute("INSERT INTO notes(id, body, n) VALUES (?, ?, ?)", (k, f"b{k}", k))
        a.write("DELETE FROM notes WHERE id = 3")
        table, count = "notes", f"SELECT count(*) FROM {capture.device_table_name(SENDER, 'notes')}"
    batch = decode(encode(a.read(0)))
    assert not batch.rows and len(batch.blocks) == 1 and batch.blocks[0].table == table
    calls: list[bool] = []
    real = merge.apply_block

    def spy(ap: merge._Applier, block: Block, fields: Any = None) -> bool:
        calls.append(real(ap, block, fields))
        return calls[-1]

    def forbidden(*args: Any, **kw: Any) -> Any:
        raise AssertionError("the row path was taken")

    monkeypatch.setattr(merge, "apply_block", spy)
    monkeypatch.setattr(merge._Applier, "apply_bulk", forbidden)
    monkeypatch.setattr(merge._Applier, "apply", forbidden)
    res = b.apply(batch, SENDER)
    assert calls == [True]
    assert res.applied == batch.count and res.failed == 0 and res.last_seq == batch.last_seq
    expected = batch.count - (1 if mode == COLLABORATIVE else 0)  # (the delete of a row never sent)
    assert b.rows(count) == [(expected,)]


# --------------------------------------------------------------------------
# The sender: a batch read in columnar form is the row form, regrouped


def _read(r: Replica, since: int, *, columnar: bool, **kw: Any) -> OutBatch:
    """One read, in one transaction after stamping (as ``Replica.read``)."""
    r.conn.execute("BEGIN IMMEDIATE")
    try:
        capture.stamp(r.conn, r.state, r.clock, wall=r.wall)
        batch = stream.changes_since(r.conn, kw.pop("table", None), since, columnar=columnar, **kw)
        r.conn.execute("COMMIT")
    except BaseException:
        r.conn.execute("ROLLBACK")
        raise
    for block in batch.blocks:  # in the order the rows travel: by seq, as as_rows() orders them
        assert [row[SEQ] for row in block.rows] == sorted(row[SEQ] for row in block.rows)
    return batch


def _both_forms(r: Replica, since: int, **kw: Any) -> tuple[OutBatch, OutBatch]:
    return _read(r, since, columnar=True, **kw), _read(r, since, columnar=False, **kw)


def _check_bounded(r: Replica, since: int, max_bytes: int, **kw: Any) -> None:
    """A batch bounded by size ends where its estimate says (the two forms
    estimate differently), so it is compared with the row form of its own
    interval: each row it holds is that row, and a row it leaves out has a
    newer change past its ``last_seq`` (the next batch holds it)."""
    columnar = _read(r, since, columnar=True, max_bytes=max_bytes, **kw)
    assert columnar.count >= 1 or not columnar.more
    for limit in range(1, 1000):
        rows = _read(r, since, columnar=False, limit=limit, **kw)
        if rows.last_seq >= columnar.last_seq:
            break
    assert rows.last_seq == columnar.last_seq
    held = {(c.table, c.key): c for c in columnar.as_rows().rows}
    assert all(held[(c.table, c.key)] == c for c in rows.rows if (c.table, c.key) in held)
    assert set(held) <= {(c.table, c.key) for c in rows.rows}
    missing = {(c.table, c.key) for c in rows.rows} - set(held)
    if missing:
        after = _read(r, columnar.last_seq, columnar=False, **kw)
        assert missing <= {(c.table, c.key) for c in after.rows}


def _check_forms(columnar: OutBatch, rows: OutBatch) -> None:
    assert not rows.blocks
    assert columnar.as_rows() == rows
    assert columnar.count == rows.count == len(rows.rows) and columnar.tables() == rows.tables()
    if rows.count:
        assert columnar.first_change()[0] in rows.tables()
    in_rows = {(r.table, r.key) for r in columnar.rows}
    for block in columnar.blocks:
        assert block.rows and all(len(row) == VALUES + len(block.columns) for row in block.rows)
        keys = [row[KEY] for row in block.rows]
        assert len(set(keys)) == len(keys) and not in_rows & {(block.table, k) for k in keys}
        # In seq order, but for rows with a tomb (single_version: a later delete raises a row's seq).
        plain = [row[SEQ] for row in block.rows if row[TOMB_HLC] is None]
        assert plain == sorted(plain)
    assert len({b.table for b in columnar.blocks}) == len(columnar.blocks)  # one block per table
    # And through the wire: the decoder keeps both forms as they are.
    wired = decode(encode(columnar))
    assert wired.as_rows() == decode(encode(rows)) == rows
    assert [b._replace(rows=[tuple(r) for r in b.rows]) for b in columnar.blocks] == list(wired.blocks)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_columnar_read_is_the_row_read_regrouped(mode: str, data: st.DataObject) -> None:
    steps = [s for s in data.draw(_rounds(mode)) if s[0] in ("local", "push") and s[1] not in ("XY", "XA")]
    # (A block's clocks are worked out from the stamp ranges over it, or looked up past LITERAL_STAMPS of them.)
    literal = data.draw(st.sampled_from([capture.LITERAL_STAMPS, 1]), label="stamp ranges worked out at most")
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(capture, "LITERAL_STAMPS", literal):
        a, c = _device(Path(tmp), SENDER, mode), _device(Path(tmp), OTHER, mode)
        try:
            checked = 0
            for kind, who, arg, flag in [*steps, ("push", "CA", 500, False), ("local", "A", None, False)]:
                if kind == "push":
                    src, dst = (a, c) if who == "AC" else (c, a)
                    src.push(dst)
                elif arg is not None:
                    _write(a if who == "A" else c, arg, flag)
                if kind != "push" and arg is not None and data.draw(st.integers(0, 2), label="check now") != 0:
                    continue
                top = capture.last_seq(a.conn)
                for since in {0, top, data.draw(st.integers(0, max(top, 0)), label="since")}:
                    for limit in (1, 3, 500):
                        _check_forms(*_both_forms(a, since, limit=limit))
                        checked += 1
                    _check_bounded(a, since, data.draw(st.sampled_from([1, 200]), label="max_bytes"))
                    table = "items" if mode == SINGLE_VERSION else data.draw(st.sampled_from(["notes", "words", "tags"]), label="table")
                    _check_forms(*_both_forms(a, since, table=table, limit=data.draw(st.sampled_from([2, 500]), label="table limit")))
            assert checked
        finally:
            a.close()
            c.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_bytes", [1, 3_000, 40_000])  # (one row a batch, a few, most)
def test_size_bounded_columnar_batches_lose_nothing(device: Callable[..., Replica], mode: str, max_bytes: int) -> None:
    """Blocks that size themselves while they are read (more rows than one
    fetch, two tables of different row sizes): the batches of a stream,
    one after the other, hold every row of the unbounded read, each as it
    is there (the newest change of a key comes last)."""
    a = device(SENDER, mode)
    if mode == SINGLE_VERSION:
        for k in range(600):  # (more than one fetch of a block's cursor)
            a.conn.execute("INSERT INTO items(uid, a, b) VALUES (?, ?, ?)", (f"u{k}", k, "b" * (k % 50)))
        a.write("UPDATE items SET a = -a, b = 'x' WHERE id % 7 = 0")
        a.write("DELETE FROM items WHERE id % 11 = 0")
    else:
        for k in range(400):
            a.conn.execute("INSERT INTO notes(id, body, n) VALUES (?, ?, ?)", (k, "b" * (k % 50), k))
            a.conn.execute("INSERT INTO words(w, n) VALUES (?, ?)", (f"w{k}", k))
        a.write("UPDATE notes SET n = -n WHERE id % 7 = 0")
        a.write("DELETE FROM words WHERE rowid % 11 = 0")
    def merged(rows: Any, into: dict[tuple[str, Any], Any]) -> dict[tuple[str, Any], Any]:
        """What a receiver keeps of row changes: per column its newest cell, the newest tomb."""
        for r in rows:
            cells, tomb = into.setdefault((r.table, r.key), ({}, None))
            for c in r.cells:
                if c.column not in cells or c.clock > cells[c.column].clock:
                    cells[c.column] = c
            if r.tomb is not None and (tomb is None or r.tomb > tomb):
                into[(r.table, r.key)] = (cells, r.tomb)
        return into

    whole = merged(_read(a, 0, columnar=True, limit=changes.MAX_BATCH_ROWS).as_rows().rows, {})
    got: dict[tuple[str, Any], Any] = {}
    since, batches = 0, 0
    while True:
        batch = _read(a, since, columnar=True, limit=2000, max_bytes=max_bytes)
        assert batch.count or not batch.more
        merged(batch.as_rows().rows, got)
        since, batches = batch.last_seq, batches + 1
        if not batch.more:
            break
    assert got == whole
    assert batches > (len(whole) // 2 if max_bytes == 1 else 1)


def test_a_columnar_read_holds_blocks_and_rows(device: Callable[..., Replica]) -> None:
    """Not vacuous: a single_version read mixes a block (rows whose columns
    share one clock) and row changes (a one-column edit, a delete), with
    origins other than the sender's; a collaborative one has only blocks."""
    a, c = device(SENDER, SINGLE_VERSION), device(OTHER, SINGLE_VERSION)
    c.write("INSERT INTO items(uid, a, b) VALUES ('c1', 1, 'p'), ('c2', 2, 'q')")
    c.push(a)
    a.write("INSERT INTO items(uid, a, b) VALUES ('a1', 1, 'p'), ('a2', 2, 'q'), ('a3', 3, 'r')")
    a.write("UPDATE items SET a = 9 WHERE uid = 'a1'")
    a.write("DELETE FROM items WHERE uid = 'a2'")
    a.write("UPDATE items SET a = 8, b = 'z', uid = uid WHERE uid = 'c2'")
    columnar, rows = _both_forms(a, 0)
    _check_forms(columnar, rows)
    (block,) = columnar.blocks
    assert {r[KEY] for r in block.rows} >= {"c1", "a3"} and {r.key for r in columnar.rows} >= {"a1"}
    assert OTHER in {block.origins[r[ORIGIN]] for r in block.rows}
    assert block.columns == ("a", "b", "uid")

    n = device(SENDER, COLLABORATIVE)
    n.write("INSERT INTO notes(id, body) VALUES (1, 'x'), (2, 'y')")
    n.write("INSERT INTO tags(name) VALUES ('t')")
    n.write("DELETE FROM notes WHERE id = 2")
    columnar, rows = _both_forms(n, 0)
    _check_forms(columnar, rows)
    assert not columnar.rows and [b.table for b in columnar.blocks] == ["notes", "tags"]
    assert [r[KEY] for r in columnar.blocks[0].rows] == [1, 2] and columnar.blocks[0].rows[1][TOMB_HLC] is not None


@pytest.mark.parametrize("mode", MODES)
def test_counting_an_intervals_seqs_in_sql_gives_what_listing_them_gives(device: Callable[..., Replica], mode: str) -> None:
    """``_next_seqs`` counts the seqs of an interval (and takes the last) in
    SQL where the caller needs no list; over every interval and limit it
    gives what the listed seqs give — with one source holding seqs, and with
    several (two tables; a single_version table's row clocks, own cells
    and tombs)."""
    a = device(SENDER, mode)
    if mode == SINGLE_VERSION:
        a.write("INSERT INTO items(uid, a, b) VALUES ('a1', 1, 'p'), ('a2', 2, 'q'), ('a3', 3, 'r')")
        a.write("UPDATE items SET a = 9 WHERE uid = 'a1'")
        a.write("DELETE FROM items WHERE uid = 'a2'")
        a.write("INSERT INTO items(uid, a, b) VALUES ('a4', 4, 's'), ('a5', 5, 't')")
    else:
        a.write("INSERT INTO notes(id, body) VALUES (1, 'x'), (2, 'y'), (3, 'z')")
        a.write("INSERT INTO tags(name) VALUES ('t'), ('u')")
        a.write("DELETE FROM notes WHERE id = 2")
        a.write("INSERT INTO notes(id, body) VALUES (4, 'w')")
    _read(a, 0, columnar=True)  # stamps every change
    conn = a.conn
    tables = changes.sync_tables(conn)
    bound = changes.stable_bound(conn)
    sources = ("SELECT (SELECT count(*) > 0 FROM _p2p_rows WHERE seq > ?1 AND seq <= ?2) + (SELECT count(*) > 0 FROM _p2p_cells "
               "WHERE seq > ?1 AND seq <= ?2) + (SELECT count(*) > 0 FROM _p2p_tombs WHERE seq > ?1 AND seq <= ?2)"
               if mode == SINGLE_VERSION else
               "SELECT count(DISTINCT tid) FROM _p2p_log WHERE seq > ?1 AND seq <= ?2 AND origin IS NULL")
    several = 0
    for since in range(bound + 1):
        several += conn.execute(sources, (since, bound)).fetchone()[0] > 1
        for limit in range(1, bound + 2):
            count, top, listed = stream._next_seqs(conn, tables, since, bound, limit, None, listed=True)
            assert listed is not None and (count, top) == (len(listed), listed[-1] if listed else 0)
            assert listed == sorted(set(listed)) and len(listed) <= limit
            assert stream._next_seqs(conn, tables, since, bound, limit, None, listed=False) == (count, top, None)
    assert several and bound > 4  # not vacuous: intervals whose seqs are in more than one source


# --------------------------------------------------------------------------
# Decoding: every malformed block is a ProtocolError

H = WALL << 16  # a plausible clock value (clock.pack(WALL, 0))


def _good_rows(mode: str) -> list[Any]:
    """A well-formed block, its rows row by row: [table, key column, columns, origins, rows]."""
    if mode == COLLABORATIVE:
        block = ["notes", "id", ["id", "body", "n"], [SENDER], [
            [1, 1, H, 0, None, None, None, None, None, None, 1, "x", 5],
            [2, 2, None, None, None, None, H + 1, 0, None, None, None, None, None],
            [3, 3, H + 2, 0, None, None, None, None, None, None, 3, 2.5, b"\x00"],
        ]]
    else:
        block = ["items", "uid", ["a", "b", "uid"], [SENDER, OTHER], [
            ["u1", 1, H, 1, H - 1, 0, None, None, None, None, 1, "p", "u1"],
            ["u2", 2, None, None, None, None, H, 0, H - 1, 1, None, None, None],
            ["u3", 3, H + 2, 0, None, None, H + 1, 1, None, None, 1.5, None, "u3"],
        ]]
    return block


def _wire(block: list[Any]) -> list[Any]:
    """A block as it travels (protocol 6): [table, key column, columns,
    origins, row count, fields], each field a list of one value per row."""
    *head, rows = block
    return [*head, len(rows), [list(f) for f in zip(*rows)]]


def _good_plain(mode: str) -> dict[str, Any]:
    """A well-formed batch of one block (the base of the malformed ones)."""
    return {"mode": mode, "since_seq": 0, "last_seq": 3, "more": False, "full": True, "stream": "s1", "rows": [],
            "blocks": [_wire(_good_rows(mode))]}


def _set(row: int, index: int, value: Any) -> Callable[[list[Any]], None]:
    def change(block: list[Any]) -> None:
        block[5][index][row] = value
    return change


def _field(index: int, value: Any) -> Callable[[list[Any]], None]:
    def change(block: list[Any]) -> None:
        block[5][index] = value
    return change


def _item(index: int, value: Any) -> Callable[[list[Any]], None]:
    def change(block: list[Any]) -> None:
        block[index] = value
    return change


def _all(*changes: Callable[[list[Any]], None]) -> Callable[[list[Any]], None]:
    def change(block: list[Any]) -> None:
        for c in changes:
            c(block)
    return change


V = VALUES  # the first value of a block row
_BOTH = [COLLABORATIVE, SINGLE_VERSION]
_BAD: list[tuple[str, list[str], Callable[[list[Any]], None]]] = [
    # the block's shape
    ("block not a list", _BOTH, lambda b: b.__setitem__(slice(None), [])),
    ("block of 5 items", _BOTH, lambda b: b.pop()),
    ("block of 7 items", _BOTH, lambda b: b.append([])),
    ("table name empty", _BOTH, _item(0, "")),
    ("table name raw text", _BOTH, _item(0, "no\udcfftes")),
    ("single_version without its conflict column", [SINGLE_VERSION], _item(1, "")),
    ("key column not a string", _BOTH, _item(1, 7)),
    ("columns not a list", _BOTH, _item(2, "id")),
    ("columns empty", _BOTH, _all(_item(2, []), lambda b: b.__setitem__(5, b[5][:V]))),
    ("column name not a string", _BOTH, lambda b: b[2].__setitem__(0, 1)),
    ("column name empty", _BOTH, lambda b: b[2].__setitem__(0, "")),
    ("column name too long", _BOTH, lambda b: b[2].__setitem__(0, "c" * 1025)),
    ("column name raw text", _BOTH, lambda b: b[2].__setitem__(0, "c\udcff")),
    ("duplicate column names", _BOTH, lambda b: b[2].__setitem__(1, b[2][0])),
    ("origins not a list", _BOTH, _item(3, SENDER)),
    ("origins empty", _BOTH, _item(3, [])),
    ("origin empty", _BOTH, lambda b: b[3].__setitem__(0, "")),
    ("origin not a string", _BOTH, lambda b: b[3].__setitem__(0, 5)),
    ("origin raw text", _BOTH, lambda b: b[3].__setitem__(0, "DEV\udcff")),
    # the row count and the fields
    ("row count a string", _BOTH, _item(4, "3")),
    ("row count a bool", _BOTH, _item(4, True)),
    ("row count zero", _BOTH, _all(_item(4, 0), _item(5, [[] for _ in range(V + 3)]))),
    ("row count negative", _BOTH, _item(4, -3)),
    ("row count past the cap", _BOTH, _item(4, MAX_BATCH_ROWS + 1)),
    ("row count not what the fields hold", _BOTH, _item(4, 4)),
    ("fields not a list", _BOTH, _item(5, {"a": 1})),
    ("fields empty", _BOTH, _item(5, [])),
    ("a field too many", _BOTH, lambda b: b[5].append([None])),
    ("a field too few", _BOTH, lambda b: b[5].pop()),
    ("a field a map", _BOTH, _field(V, {"k": 1})),
    ("a field a number", _BOTH, _field(V, 7)),
    ("a field a string", _BOTH, _field(V, "abc")),
    ("a field null", _BOTH, _field(V, None)),
    ("a field empty", _BOTH, _field(V + 1, [])),
    ("a field of a value too many", _BOTH, lambda b: b[5][V].append(None)),
    ("a field of a value too few", _BOTH, lambda b: b[5][V].pop()),
    # one value for every row: checked as any value is
    ("one bool value for every row", _BOTH, _field(V + 1, [True])),
    ("one value above 64 bits for every row", _BOTH, _field(V, [1 << 63])),
    ("one NaN for every row", _BOTH, _field(V, [float("nan")])),
    ("one origin index past the origins for every row", [SINGLE_VERSION], _field(PREV_ORIGIN, [9])),
    ("one null key for every row", _BOTH, _field(KEY, [None])),
    ("one raw text key for every row", _BOTH, _field(KEY, ["u\udcff"])),
    ("one float seq for every row", _BOTH, _field(SEQ, [2.0])),
    ("one hlc for every row, and a row without cells", _BOTH, _field(HLC, [H])),
    # a field that counts (protocol 7): its form, and its field's rules over every value it stands for
    ("a count without its step", _BOTH, _field(SEQ, {"from": 1})),
    ("a count with a third item", _BOTH, _field(SEQ, {"from": 1, "step": 1, "to": 3})),
    ("a count from a float", _BOTH, _field(SEQ, {"from": 1.0, "step": 1})),
    ("a count by a bool", _BOTH, _field(SEQ, {"from": 1, "step": True})),
    ("a count of keys from null", _BOTH, _field(KEY, {"from": None, "step": 1})),
    ("a count past 64 bits", _BOTH, _field(V, {"from": (1 << 63) - 2, "step": 1})),
    ("a count below 64 bits", _BOTH, _field(V, {"from": -(1 << 63) + 1, "step": -1})),
    ("a count of seqs below zero", _BOTH, _field(SEQ, {"from": 1, "step": -1})),
    ("a count of origins past the origins", _BOTH, _field(ORIGIN, {"from": 0, "step": 1})),
    # values
    ("bool value", _BOTH, _set(0, V + 1, True)),
    ("list value", _BOTH, _set(0, V + 1, [1])),
    ("map value", _BOTH, _set(0, V + 1, {"a": 1})),
    ("value above 64 bits", _BOTH, _set(0, V, 1 << 63)),
    ("value far above 64 bits", _BOTH, _set(0, V, (1 << 64) - 1)),
    ("value above 64 bits in a mixed column", _BOTH, _all(_set(0, V + 1, "x"), _set(2, V + 1, 1 << 63))),
    ("NaN value", _BOTH, _set(2, V + 1, float("nan"))),
    ("NaN in a mixed column", _BOTH, _all(_set(0, V + 1, "x"), _set(2, V + 1, float("nan")))),
    ("NaN in an integer column", _BOTH, _set(0, V, float("nan"))),
    # keys
    ("null key", _BOTH, _set(1, KEY, None)),
    ("bool key", _BOTH, _set(0, KEY, False)),
    ("list key", _BOTH, _set(0, KEY, [1])),
    ("map key", _BOTH, _set(0, KEY, {"k": 1})),
    ("NaN key", _BOTH, _set(0, KEY, float("nan"))),
    ("key above 64 bits", _BOTH, _set(0, KEY, 1 << 63)),
    ("raw text key", _BOTH, _set(0, KEY, "u\udcff")),
    ("raw text key among text keys", _BOTH, _all(_set(0, KEY, "k1"), _set(1, KEY, "\udce9t\udcff"), _set(2, KEY, "k3"))),
    # seqs
    ("negative seq", _BOTH, _set(1, SEQ, -1)),
    ("null seq", _BOTH, _set(1, SEQ, None)),
    ("float seq", _BOTH, _set(1, SEQ, 2.0)),
    ("bool seq", _BOTH, _set(1, SEQ, True)),
    ("seq above 64 bits", _BOTH, _set(1, SEQ, 1 << 63)),
    # clocks
    ("negative hlc", _BOTH, _set(0, HLC, -1)),
    ("hlc above MAX_HLC", _BOTH, _set(0, HLC, MAX_HLC + 1)),
    ("string hlc", _BOTH, _set(0, HLC, "5")),
    ("bool hlc", _BOTH, _set(0, HLC, True)),
    ("float hlc", _BOTH, _set(0, HLC, float(H))),
    ("hlc without origin", _BOTH, _set(0, ORIGIN, None)),
    ("origin without hlc", _BOTH, _set(1, ORIGIN, 0)),
    ("prev hlc without prev origin", _BOTH, _all(_set(0, PREV_HLC, H - 1), _set(0, PREV_ORIGIN, None))),
    ("prev origin without prev hlc", _BOTH, _all(_set(0, PREV_HLC, None), _set(0, PREV_ORIGIN, 0))),
    ("tomb hlc without tomb origin", _BOTH, _set(1, TOMB_ORIGIN, None)),
    ("tomb origin without tomb hlc", _BOTH, _set(0, TOMB_ORIGIN, 0)),
    ("tomb prev hlc without its origin", _BOTH, _all(_set(1, TOMB_PREV_HLC, H - 1), _set(1, TOMB_PREV_ORIGIN, None))),
    ("tomb prev origin without its hlc", _BOTH, _all(_set(1, TOMB_PREV_HLC, None), _set(1, TOMB_PREV_ORIGIN, 0))),
    ("negative tomb prev hlc", _BOTH, _all(_set(1, TOMB_PREV_HLC, -5), _set(1, TOMB_PREV_ORIGIN, 0))),
    # origin indexes
    ("origin index past the origins", _BOTH, lambda b: b[5][ORIGIN].__setitem__(0, len(b[3]))),
    ("negative origin index", _BOTH, _set(0, ORIGIN, -1)),
    ("origin index a string", _BOTH, _set(0, ORIGIN, SENDER)),
    ("bool origin index", _BOTH, _set(0, ORIGIN, False)),
    ("prev origin index past the origins", _BOTH, _all(_set(0, PREV_HLC, H - 1), lambda b: b[5][PREV_ORIGIN].__setitem__(0, len(b[3])))),
    ("tomb origin index past the origins", _BOTH, lambda b: b[5][TOMB_ORIGIN].__setitem__(1, len(b[3]))),
    ("tomb prev origin index past the origins", _BOTH,
     _all(_set(1, TOMB_PREV_HLC, H - 1), lambda b: b[5][TOMB_PREV_ORIGIN].__setitem__(1, len(b[3])))),
    # what a row change is
    ("collaborative row both full and delete", [COLLABORATIVE], _all(_set(0, TOMB_HLC, H), _set(0, TOMB_ORIGIN, 0))),
    ("collaborative row neither full nor delete", [COLLABORATIVE], _all(_set(1, TOMB_HLC, None), _set(1, TOMB_ORIGIN, None))),
    # (as many NULLs in each field as a good block could have, in the wrong rows: the
    # counts agree, the rows don't)
    ("hlc and origin missing in different rows", _BOTH, _all(_set(0, ORIGIN, None), _set(1, ORIGIN, 0))),
    ("collaborative rows one both full and delete, one neither", [COLLABORATIVE],
     _all(_set(0, TOMB_HLC, H), _set(0, TOMB_ORIGIN, 0), _set(1, TOMB_HLC, None), _set(1, TOMB_ORIGIN, None))),
    ("single_version rows one with neither cells nor tomb, one with both", [SINGLE_VERSION],
     _all(_set(1, TOMB_HLC, None), _set(1, TOMB_ORIGIN, None), _set(1, TOMB_PREV_HLC, None), _set(1, TOMB_PREV_ORIGIN, None),
          _set(0, TOMB_HLC, H + 1), _set(0, TOMB_ORIGIN, 0))),
    ("single_version row with neither cells nor tomb", [SINGLE_VERSION], _all(_set(1, TOMB_HLC, None), _set(1, TOMB_ORIGIN, None),
                                                                          _set(1, TOMB_PREV_HLC, None), _set(1, TOMB_PREV_ORIGIN, None))),
]


@pytest.mark.parametrize("mode", MODES)
def test_the_well_formed_base_decodes(mode: str) -> None:
    plain = _good_plain(mode)
    batch = decode(pack_values(plain))
    assert not batch.rows and batch.count == 3 and batch.checked
    (block,) = batch.blocks
    table, key_column, columns, origins, rows = _good_rows(mode)
    assert block == Block(table, key_column, tuple(columns), tuple(origins), list(map(tuple, rows)))
    assert batch.columns_of(block).fields == [list(f) for f in zip(*rows)]


@pytest.mark.parametrize("mode", MODES)
def test_a_field_the_same_in_every_row_travels_once(mode: str) -> None:
    """Protocol 6: a field whose value every row holds (a one-device
    block's origin, the prevs and tombs most blocks leave NULL) travels as
    that one value, and decodes to it in every row. Equal numbers of
    another type or sign (1 and 1.0, 0.0 and -0.0) are not the same value:
    such a field travels whole, and comes back exactly."""
    table, key_column, columns, origins, rows = _good_rows(mode)
    rows = [[*r] for r in rows if r[HLC] is not None]  # rows with cells: values may be set
    for r in rows:
        r[PREV_HLC] = r[PREV_ORIGIN] = None
        r[V + 1] = "same"
    block = Block(table, key_column, tuple(columns), tuple(origins), list(map(tuple, rows)))
    batch = OutBatch(mode, 0, 3, (), False, True, "s1", blocks=(block,))
    fields = batch_to_plain(batch)["blocks"][0][5]
    assert fields[PREV_HLC] == fields[PREV_ORIGIN] == [None] and fields[V + 1] == ["same"]
    assert len(fields[KEY]) == len(fields[SEQ]) == len(rows) == 2
    assert decode(encode(batch)).blocks == batch.blocks
    for odd in ((1, 1.0), (0.0, -0.0), (1, True)):
        changed = block._replace(rows=[(*r[:V], v, *r[V + 1:]) for r, v in zip(block.rows, odd)])
        wired = batch_to_plain(dataclasses.replace(batch, blocks=(changed,)))["blocks"][0][5]
        assert len(wired[V]) == 2, odd
        if True in odd:
            continue  # (a bool is no SQLite value: the receiver refuses it, test_a_malformed_block_is_a_protocol_error)
        again = decode(encode(dataclasses.replace(batch, blocks=(changed,)))).blocks[0]
        assert [(type(r[V]), math.copysign(1, r[V])) for r in again.rows] == [(type(v), math.copysign(1, v)) for v in odd]


@pytest.mark.parametrize("mode", MODES)
def test_a_field_that_counts_travels_as_its_first_value_and_step(mode: str) -> None:
    """Protocol 7: a field of integers that counts (keys, seqs and clocks of
    rows appended together; any column of integers) travels as its first
    value and step, and decodes to every value, in every direction and up
    to the ends of 64 bits. A field that only looks like it — a value off
    the count, a float equal to an integer of it, two rows — travels whole,
    and comes back exactly."""
    table, key_column, columns, origins, rows = _good_rows(mode)
    base = [r for r in rows if r[HLC] is not None][0]
    top = (1 << 63) - 1
    wanted = {V: (10, -3), V + 1: (top - 4, 1)} if mode == COLLABORATIVE else {V: (top - 4, 1), V + 1: (10, -3)}
    made = []
    for i in range(5):
        r = [*base]
        r[KEY] = 5 + 2 * i if mode == COLLABORATIVE else f"u{i}"
        r[SEQ], r[HLC] = i + 1, H + i
        for f, (first, step) in wanted.items():
            r[f] = first + step * i
        r[V + 2] = [1, 2, 3, 5, 6][i] if mode == COLLABORATIVE else f"u{i}"
        made.append(tuple(r))
    block = Block(table, key_column, tuple(columns), tuple(origins), made)
    batch = OutBatch(mode, 0, 5, (), False, True, "s1", blocks=(block,))
    fields = batch_to_plain(batch)["blocks"][0][5]
    assert fields[SEQ] == {"from": 1, "step": 1} and fields[HLC] == {"from": H, "step": 1}
    assert fields[KEY] == ({"from": 5, "step": 2} if mode == COLLABORATIVE else [f"u{i}" for i in range(5)])
    assert [fields[f] for f in wanted] == [{"from": first, "step": step} for first, step in wanted.values()]
    assert isinstance(fields[V + 2], list)  # (1, 2, 3, 5, 6 does not count; text never does)
    assert decode(encode(batch)).blocks == batch.blocks
    for odd in ([1, 2, 3.0, 4, 5], [-1, 0, True, 2, 3], [1, 2, 4, 4, 5], [1, 2.0, 3, 4, 5], [1, 2, 3, 4, 4]):
        changed = block._replace(rows=[(*r[:V + 2], v) for r, v in zip(block.rows, odd)])
        wired = batch_to_plain(dataclasses.replace(batch, blocks=(changed,)))["blocks"][0][5]
        assert wired[V + 2] == odd and type(wired[V + 2]) is list, odd
        if True in odd:
            continue  # (a bool is no SQLite value: the receiver refuses it)
        again = decode(encode(dataclasses.replace(batch, blocks=(changed,)))).blocks[0]
        assert [(type(r[V + 2]), r[V + 2]) for r in again.rows] == [(type(v), v) for v in odd]
    two = block._replace(rows=block.rows[:2])
    assert all(type(f) is list for f in batch_to_plain(dataclasses.replace(batch, blocks=(two,)))["blocks"][0][5])


@pytest.mark.parametrize("mode", MODES)
def test_a_decoded_block_keeps_its_columns_for_itself_only(mode: str) -> None:
    """decode hands the receiver each block's rows column by column
    (``OutBatch.columns_of``), so the set-based path need not regroup them;
    a block put in its place since has none, and is regrouped from its own
    rows, never read from another block's columns."""
    batch = decode(pack_values(_good_plain(mode)))
    (block,) = batch.blocks
    assert batch.columns_of(block).fields == [list(f) for f in zip(*block.rows)]
    changed = block._replace(rows=[[*r] for r in block.rows])
    assert batch.columns_of(changed) is None
    assert dataclasses.replace(batch, blocks=(changed,)).columns_of(changed) is None
    assert not batch.as_rows().block_fields


@pytest.mark.parametrize(("what", "mode", "change"), [(w, m, c) for w, modes, c in _BAD for m in modes],
                         ids=[f"{w}-{m}" for w, modes, _ in _BAD for m in modes])
def test_a_malformed_block_is_a_protocol_error(what: str, mode: str, change: Callable[[list[Any]], None]) -> None:
    plain = _good_plain(mode)
    change(plain["blocks"][0])
    with pytest.raises(ProtocolError) as caught:
        decode(pack_values(plain))
    # Refused by a rule of block_from_plain, not by decode's catch-all for anything else.
    assert not caught.value.message.startswith("malformed batch"), caught.value.message


@pytest.mark.parametrize("blocks", [
    "not a list", [[]], [None],
])
def test_malformed_blocks_of_a_batch_are_protocol_errors(blocks: Any) -> None:
    plain = _good_plain(COLLABORATIVE) | {"blocks": blocks}
    with pytest.raises(ProtocolError):
        decode(pack_values(plain))


@pytest.mark.parametrize(("what", "change"), [
    ("a prev clock on a row without cells", _all(_set(1, PREV_HLC, H - 1), _set(1, PREV_ORIGIN, 0))),
    ("a tomb prev clock on a row without a tomb", _all(_set(0, TOMB_PREV_HLC, H - 1), _set(0, TOMB_PREV_ORIGIN, 0))),
    ("values on a row without cells", _set(1, V + 1, "lost")),
])

def test_what_no_row_change_can_hold_is_a_protocol_error(what: str, change: Callable[[list[Any]], None]) -> None:
    plain = _good_plain(SINGLE_VERSION)
    change(plain["blocks"][0])
    with pytest.raises(ProtocolError):
        decode(pack_values(plain))


@pytest.mark.parametrize("mode", MODES)
def test_a_block_round_trips(mode: str) -> None:
    table, key_column, columns, origins, rows = _good_rows(mode)
    rows.append([*rows[0][:V], *([-(1 << 63), "é\u2603", b""] if mode == COLLABORATIVE else [(1 << 63) - 1, "", "u9"])])
    rows[-1][KEY], rows[-1][SEQ] = (9 if mode == COLLABORATIVE else "u9"), 9
    rows.append([*rows[0][:V], float("inf"), -0.0, None])
    rows[-1][KEY], rows[-1][SEQ] = (10 if mode == COLLABORATIVE else "u10"), 10
    block = Block(table, key_column, tuple(columns), tuple(origins), list(map(tuple, rows)))
    batch = OutBatch(mode, 0, 10, (), False, True, "s1", blocks=(block,))
    again = decode(encode(batch))
    assert again.blocks == batch.blocks
    assert again == batch and again.as_rows() == batch.as_rows() == decode(encode(batch, columnar=False))
    assert batch_to_plain(again) == batch_to_plain(batch)


# --------------------------------------------------------------------------
# Hostile or unfitting rows in a block: the row path isolates them


def _replace_rows(batch: OutBatch, change: Callable[[list[Any]], list[Any]], *, origins: tuple[str, ...] | None = None) -> OutBatch:
    (block,) = batch.blocks
    rows = [change(list(r)) for r in block.rows]
    return dataclasses.replace(batch, blocks=(block._replace(rows=rows, origins=origins or block.origins),))


def _check_isolated(monkeypatch: pytest.MonkeyPatch, x: Replica, y: Replica, batch: OutBatch, bad_key: Any,
                    reason: str) -> merge.ApplyResult:
    taken: list[bool] = []
    res, _ = _apply_pair(monkeypatch, x, y, batch, SENDER, taken)
    assert taken == [False]  # the set-based path left it to the row path
    assert (res.applied, res.failed) == (batch.count - 1, 1)
    (failure,) = merge.sync_failures(x.conn)
    assert failure.origin == SENDER and failure.change is not None and failure.change.key == bad_key
    assert failure.reason.startswith(reason), failure.reason
    return res


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", [HLC, PREV_HLC, TOMB_HLC, TOMB_PREV_HLC], ids=["row", "prev", "tomb", "tomb prev"])
def test_a_hostile_clock_in_a_block_goes_to_the_failure_log(monkeypatch: pytest.MonkeyPatch, device: Callable[..., Replica],
                                                           mode: str, where: int) -> None:
    """A clock beyond the bound (tests/store/test_merge_clock.py) in one row
    of a block the set-based path would otherwise take (a fresh one; with a
    delete in it for the tomb clocks): that row goes to the failure log,
    never into the tables or the clock; the others apply."""
    a, x, y = device(SENDER, mode), device(ME, mode), device(ME, mode)
    deleted = where in (TOMB_HLC, TOMB_PREV_HLC)
    if mode == SINGLE_VERSION:
        a.write("INSERT INTO items(uid, a, b) VALUES ('good', 1, 'p'), ('evil', 2, 'q'), ('fine', 3, 'r')")
        bad, table = "evil", "SELECT uid, a FROM items ORDER BY uid"
    else:
        a.write("INSERT INTO notes(id, body) VALUES (1, 'good'), (2, 'evil'), (3, 'fine')")
        bad, table = 2, f"SELECT id, body FROM {capture.device_table_name(SENDER, 'notes')} ORDER BY id"
    if deleted:
        a.write("DELETE FROM " + ("items WHERE uid = 'evil'" if mode == SINGLE_VERSION else "notes WHERE id = 2"))
        if mode == SINGLE_VERSION:
            # A deleted row's clocks are kept per column (store/cells.py): it travels as a row change.
            # Written again, it has a row clock and its tomb: a block row with a tomb.
            a.write("INSERT INTO items(uid, a, b) VALUES ('evil', 4, 's')")
    batch = a.read(0)
    assert not batch.rows and len(batch.blocks) == 1

    def hostile(r: list[Any]) -> list[Any]:
        if r[KEY] == bad:
            assert (r[TOMB_HLC] is not None) == deleted
            r[where], r[where + 1] = HOSTILE, 0  # (the clock's origin index follows it)
        return r

    _check_isolated(monkeypatch, x, y, _replace_rows(batch, hostile), bad, "clock_ahead: ")
    assert x.clock.last < HOSTILE >> 1 and capture.get_meta(x.conn, "hlc_last", 0) < HOSTILE >> 1
    assert x.rows("SELECT count(*) FROM _p2p_log WHERE hlc >= ?", (HOSTILE,)) == [(0,)]
    got = x.rows(table)
    assert len(got) == 2 and not any(bad in r for r in got)
    # The row fails whenever it comes, set-based or not; the others are not applied twice.
    again, _ = _apply_pair(monkeypatch, x, y, _replace_rows(batch, hostile), SENDER)
    assert (again.applied, again.failed) == (0, 1)


@pytest.mark.parametrize("constraint", ["b TEXT NOT NULL", "b TEXT UNIQUE", "b TEXT CHECK (b != 'bad')"])
def test_a_block_row_the_table_refuses_goes_to_the_failure_log(monkeypatch: pytest.MonkeyPatch, device: Callable[..., Replica],
                                                                constraint: str) -> None:
    """The receiver's table has a constraint the sender's has not: the
    set-based insert fails, the row path applies all but that row."""
    strict = ITEMS.replace("b TEXT", constraint)
    a, x, y = device(SENDER, SINGLE_VERSION), device(ME, SINGLE_VERSION, items=strict), device(ME, SINGLE_VERSION, items=strict)
    bad_b = {"b TEXT NOT NULL": None, "b TEXT UNIQUE": "p", "b TEXT CHECK (b != 'bad')": "bad"}[constraint]
    a.write("INSERT INTO items(uid, a, b) VALUES ('u1', 1, 'p'), ('u2', 2, ?), ('u3', 3, 'q')", (bad_b,))
    batch = a.read(0)
    assert not batch.rows and len(batch.blocks) == 1
    _check_isolated(monkeypatch, x, y, batch, "u2", "constraint: ")
    assert x.rows("SELECT uid, a, b FROM items ORDER BY uid") == [("u1", 1, "p"), ("u3", 3, "q")]
    if constraint == "b TEXT UNIQUE":  # retried once it fits, it applies
        (failure,) = merge.sync_failures(x.conn)
        x.write("UPDATE items SET b = 'other' WHERE uid = 'u1'")
        assert merge.retry_failure(x.conn, x.state, x.clock, failure.id, wall=WALL).applied == 1
        assert x.rows("SELECT uid, b FROM items ORDER BY uid") == [("u1", "other"), ("u2", "p"), ("u3", "q")]


@pytest.mark.parametrize("case", ["float key", "relayed row", "unknown column"])
def test_a_collaborative_block_row_that_does_not_fit_goes_to_the_failure_log(
        monkeypatch: pytest.MonkeyPatch, device: Callable[..., Replica], case: str) -> None:
    """Device tables keep no constraint but their key (capture.create_device_table):
    what can fail there is the key's type, a row another device wrote (rows
    are not relayed), a column the receiver lacks."""
    a, x, y = device(SENDER, COLLABORATIVE), device(ME, COLLABORATIVE), device(ME, COLLABORATIVE)
    a.write("INSERT INTO notes(id, body, n) VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', 3)")
    batch = a.read(0)
    origins = None
    if case == "float key":  # an INTEGER PRIMARY KEY takes no 2.5
        batch = _replace_rows(batch, lambda r: [2.5, *r[1:V], 2.5, *r[V + 1:]] if r[KEY] == 2 else r)
        bad, reason = 2.5, "constraint: "
    elif case == "relayed row":
        origins = (SENDER, OTHER)
        batch = _replace_rows(batch, lambda r: [*r[:ORIGIN], 1, *r[ORIGIN + 1:]] if r[KEY] == 2 else r, origins=origins)
        bad, reason = 2, "invalid: collaborative rows are only accepted from their own device"
    else:  # a column only the sender has: every full row parks its cell, a delete still applies
        a.write("DELETE FROM notes WHERE id = 2")
        batch = a.read(0)
        (block,) = batch.blocks
        batch = dataclasses.replace(batch, blocks=(block._replace(columns=("id", "body", "nope")),))
        taken: list[bool] = []
        res, _ = _apply_pair(monkeypatch, x, y, batch, SENDER, taken)
        assert taken == [False] and (res.applied, res.failed, res.parked) == (3, 0, 2)
        assert x.rows("SELECT ck, col FROM _p2p_parked ORDER BY ck") == [(1, "nope"), (3, "nope")]
        assert x.rows(f"SELECT id, body FROM {capture.device_table_name(SENDER, 'notes')} ORDER BY id") == [(1, "a"), (3, "c")]
        return
    _check_isolated(monkeypatch, x, y, batch, bad, reason)
    assert x.rows(f"SELECT id, body FROM {capture.device_table_name(SENDER, 'notes')} ORDER BY id") == [(1, "a"), (3, "c")]


def _odd(case: str, batch: OutBatch) -> OutBatch:
    (block,) = batch.blocks
    rows = [list(r) for r in block.rows]
    if case == "duplicate key":
        rows.append([*rows[0][:SEQ], rows[-1][SEQ] + 1, *rows[0][SEQ + 1:]])
    elif case == "keys of two types":
        rows[1][KEY] = str(rows[1][KEY]) if isinstance(rows[1][KEY], int) else 7
    elif case == "text keys for an integer key":
        rows = [[str(r[KEY]) if i == KEY else str(v) if i == VALUES and r[HLC] is not None else v for i, v in enumerate(r)] for r in rows]
        rows[1][KEY] = "two"
    elif case == "integer keys for a text key":
        rows = [[k, *r[1:-1], k] for k, r in zip((1, 2, 3), rows)]
    elif case == "another key column":
        return dataclasses.replace(batch, blocks=(block._replace(key_column="n" if batch.mode == COLLABORATIVE else "b"),))
    elif case == "a table not distributed here":
        return dataclasses.replace(batch, blocks=(block._replace(table="nope"),))
    elif case == "a column not synced here":
        return dataclasses.replace(batch, blocks=(block._replace(columns=("a", "b2", "uid")),))
    return dataclasses.replace(batch, blocks=(block._replace(rows=rows),))


_ODD = {
    COLLABORATIVE: ["duplicate key", "keys of two types", "text keys for an integer key", "another key column",
                    "a table not distributed here"],
    SINGLE_VERSION: ["duplicate key", "keys of two types", "integer keys for a text key", "another key column",
                     "a table not distributed here", "a column not synced here", "another schema version"],
}


@pytest.mark.parametrize(("mode", "case"), [(m, c) for m in MODES for c in _ODD[m]])
def test_a_block_the_set_based_path_does_not_take_applies_as_its_rows_do(
        monkeypatch: pytest.MonkeyPatch, device: Callable[..., Replica], mode: str, case: str) -> None:
    """Blocks no honest sender makes, or that meet another schema here: the
    set-based path leaves them (having changed nothing), and the row path
    writes exactly what it writes for their rows."""
    doc = DOC
    if case == "another schema version":  # b is not synced here
        doc = schema_doc({"items": ([field("id", "Integer", autoinc=True), field("uid", "Text", pk=True, not_null=True),
                                     field("a", "Integer"), field("b", "Text"), field("note", "Text")], ["uid", "a"])})
    a = device(SENDER, mode)
    x, y = device(ME, mode, doc=doc), device(ME, mode, doc=doc)
    if mode == SINGLE_VERSION:
        a.write("INSERT INTO items(uid, a, b) VALUES ('u1', 1, 'p'), ('u2', 2, 'q'), ('u3', 3, 'r')")
    else:
        a.write("INSERT INTO notes(id, body, n) VALUES (1, '1', 1), (2, '2', 2), (3, '3', 3)")
    batch = _odd(case, a.read(0))
    taken: list[bool] = []
    res, _ = _apply_pair(monkeypatch, x, y, batch, SENDER, taken)
    assert taken == [False]
    assert res.applied + res.failed >= 2


@pytest.mark.parametrize("mode", MODES)
def test_a_block_whose_rows_share_one_clock_applies_as_its_rows_do(
        monkeypatch: pytest.MonkeyPatch, device: Callable[..., Replica], mode: str) -> None:
    """The staging binds only what varies: fields equal in every row (here
    the clock) go as literals, the key's own column not at all. Also a
    block whose only column is its key (a bare key a row: one field bound)."""
    a = device(SENDER, mode)
    x, y = device(ME, mode), device(ME, mode)
    table = "words" if mode == COLLABORATIVE else "items"
    if mode == SINGLE_VERSION:
        a.write("INSERT INTO items(uid, a, b) VALUES ('u1', 1, 'p'), ('u2', 2, 'q'), ('u3', 3, 'r')")
    else:
        a.write("INSERT INTO words(w, n) VALUES ('w1', 1), ('w2', 2), ('w3', 3)")
    batch = a.read(0, table=table)
    (block,) = batch.blocks
    def one_clock(hlc: int) -> list[list[Any]]:
        return [[*r[:HLC], hlc, 0, *r[PREV_HLC:]] for r in block.rows]

    forms = [block._replace(rows=one_clock(WALL + 5))]
    if mode == COLLABORATIVE:  # the key alone, a later change
        forms.append(block._replace(columns=("w",), rows=[[*r[:VALUES], r[KEY]] for r in one_clock(WALL + 6)]))
    for form in forms:
        taken: list[bool] = []
        res, _ = _apply_pair(monkeypatch, x, y, dataclasses.replace(batch, blocks=(form,)), SENDER, taken)
        assert taken == [True] and res.applied == 3 and res.failed == 0


# --------------------------------------------------------------------------
# Origin numbers


@pytest.mark.parametrize("case", ["relayed before own", "own row echoed back"])
def test_origin_numbers_are_given_as_row_by_row_gives_them(monkeypatch: pytest.MonkeyPatch, device: Callable[..., Replica],
                                                           case: str) -> None:
    a, c = device(SENDER, SINGLE_VERSION), device(OTHER, SINGLE_VERSION)
    x, y = device(ME, SINGLE_VERSION), device(ME, SINGLE_VERSION)
    if case == "relayed before own":  # the block's rows: C's (origin index 1), then A's (index 0)
        c.write("INSERT INTO items(uid, a, b) VALUES ('c1', 1, 'p')")
        c.push(a)
        a.write("INSERT INTO items(uid, a, b) VALUES ('a1', 2, 'q')")
    else:  # the receiver's own row, relayed back by A: an echo, nothing to write
        for r in (x, y):
            r.write("INSERT INTO items(uid, a, b) VALUES ('b1', 1, 'p')")
        x.push(a)
        y.read(0)
    taken: list[bool] = []
    _apply_pair(monkeypatch, x, y, a.read(0), SENDER, taken)  # equal as device IDs
    assert taken == [True]
    assert _dump(x) == _dump(y)


def test_an_echo_leaves_the_table_as_row_by_row_does(monkeypatch: pytest.MonkeyPatch, device: Callable[..., Replica]) -> None:
    a, x, y = device(SENDER, SINGLE_VERSION), device(ME, SINGLE_VERSION), device(ME, SINGLE_VERSION)
    a.write("INSERT INTO items(uid, a, b) VALUES ('u1', 1, 'p')")
    a.write("DELETE FROM items WHERE uid = 'u1'")
    a.write("INSERT INTO items(uid, a, b) VALUES ('u1', 2, 'q')")  # back: a row clock beside its tomb (store/cells.py)
    batch = a.read(0)
    taken: list[bool] = []
    _apply_pair(monkeypatch, x, y, batch, SENDER, taken)  # a row with its tomb: the planner's
    _apply_pair(monkeypatch, x, y, batch, SENDER, taken)  # again: an echo, nothing to write
    assert taken == [False, True]
    assert _dump(x) == _dump(y)


# --------------------------------------------------------------------------
# The local keys of rows a block inserts (single_version ``_new_keys``)

KEYED_BY_VALUE = "CREATE TABLE items(uid TEXT PRIMARY KEY, a INTEGER, b TEXT, note TEXT)"
KEYED_BY_VALUE_DOC = schema_doc({"items": ([field("uid", "Text", pk=True, not_null=True), field("a", "Integer"),
                                            field("b", "Text"), field("note", "Text")], ["uid", "a", "b"])})


@pytest.mark.parametrize("how", ["ids counted", "ids looked up", "key is the value"])
def test_a_block_gives_its_rows_clocks_under_the_keys_they_got(monkeypatch: pytest.MonkeyPatch, device: Callable[..., Replica],
                                                              how: str) -> None:
    """The set-based insert knows each new row's local key without looking
    it up by its conflict value (ids SQLite gave one after another, or the
    value itself); looked up, or counted, the store is what row by row writes."""
    from p2pstore.store import single_version

    shape = {"items": KEYED_BY_VALUE, "doc": KEYED_BY_VALUE_DOC} if how == "key is the value" else {}
    a, x, y = (device(d, SINGLE_VERSION, **shape) for d in (SENDER, ME, ME))
    for r in (x, y):  # ids already taken here, and a gap: the next ids are not the sender's
        r.write("INSERT INTO items(uid, a, b) VALUES ('mine1', 0, 'm'), ('mine2', 0, 'm')")
        if how != "key is the value":
            r.write("DELETE FROM items WHERE uid = 'mine2'")
    a.write("INSERT INTO items(uid, a, b) VALUES " + ", ".join(f"('u{i:03d}', {i}, 'b{i}')" for i in range(40)))
    real = single_version._new_keys
    seen: list[str] = []

    def spy(conn: Any, table: Any, stage: str, inserted: int, dense: bool = False) -> Any:
        out = real(conn, table, stage, 0 if how == "ids looked up" else inserted, dense)
        seen.append(out[0])
        return out

    taken: list[bool] = []
    with monkeypatch.context() as m:
        m.setattr(single_version, "_new_keys", spy)
        _apply_pair(monkeypatch, x, y, a.read(0), SENDER, taken)
    assert taken == [True]
    assert seen == [{"ids counted": "?3 + row_number() OVER (ORDER BY s.n) - 1", "ids looked up": 'x."id"',  # (a tomb: probed)
                     "key is the value": "s.k"}[how]]
    key, mine = ("uid", 2) if how == "key is the value" else ("id", 1)
    assert x.rows(f"SELECT count(*) FROM _p2p_rows r JOIN items i ON i.{key} = r.pk") == [(40 + mine,)]


def test_new_rows_are_inserted_without_a_probe_and_a_known_row_undoes_it(monkeypatch: pytest.MonkeyPatch,
                                                                         device: Callable[..., Replica]) -> None:
    """A single_version block of rows never seen here (no tomb nor column
    clock in the table) is inserted at once, the table's UNIQUE index being
    the probe (``_probe`` not called); a block whose first row is new but
    later ones are known (echoes) rolls that insert back and is probed; one
    whose first row is known is probed at once. Every time the store is what
    row by row writes, and the known rows are not written twice."""
    from p2pstore.store import single_version

    a = device(SENDER, SINGLE_VERSION)
    x, y = device(ME, SINGLE_VERSION), device(ME, SINGLE_VERSION)
    a.write("INSERT INTO items(uid, a, b) VALUES " + ", ".join(f"('u{i:03d}', {i}, 'b{i}')" for i in range(30)))
    probes = _record(monkeypatch, single_version, "_probe")
    taken: list[bool] = []
    _apply_pair(monkeypatch, x, y, a.read(10), SENDER, taken)  # u010 .. u029, all new here
    assert probes == [] and x.rows("SELECT count(*) FROM items") == [(20,)]
    log = x.rows("SELECT count(*) FROM _p2p_log")
    _apply_pair(monkeypatch, x, y, a.read(0), SENDER, taken)  # u000 new first, then the 20 known
    assert probes == ["fresh"] and x.rows("SELECT count(*) FROM items") == [(30,)]
    assert x.rows("SELECT count(*) FROM _p2p_log") == [(log[0][0] + 10,)]  # the 10 new rows only
    _apply_pair(monkeypatch, x, y, a.read(0), SENDER, taken)  # all known, the first too: probed at once
    assert probes == ["fresh", "echoes"]
    assert taken == [True, True, True]


def test_collaborative_rows_past_every_key_are_written_without_a_probe(monkeypatch: pytest.MonkeyPatch,
                                                                       device: Callable[..., Replica]) -> None:
    """A collaborative block of integer keys past every key the device table
    and its row clocks hold (rows appended since the last sync) is written
    without the per-row probes and with seqs counted from the staging; a
    block that starts below a known key is probed; so is one whose keys
    pass the table's but not its row clocks' (a deleted row's clock stays):
    a stale copy of that row must not come back. Each time the store is what
    row by row writes."""
    from p2pstore.store import collaborative

    a = device(SENDER, COLLABORATIVE)
    x, y = device(ME, COLLABORATIVE), device(ME, COLLABORATIVE)
    shortcuts = _record(monkeypatch, collaborative, "_past_every_key")
    a.write("INSERT INTO notes(id, body, n) VALUES " + ", ".join(f"({i}, 'b{i}', {i})" for i in range(1, 21)))
    taken: list[bool] = []
    _apply_pair(monkeypatch, x, y, a.read(10), SENDER, taken)  # ids 11 .. 20, all new here
    assert shortcuts == [True] and x.rows("SELECT count(*) FROM dev_DEVA_notes") == [(10,)]
    stale = a.read(0)  # ids 1 .. 20 as they are now
    _apply_pair(monkeypatch, x, y, stale, SENDER, taken)  # 1 .. 10 new, 11 .. 20 known (repeats): probed
    assert shortcuts == [True, False] and x.rows("SELECT count(*) FROM dev_DEVA_notes") == [(20,)]
    a.write("DELETE FROM notes WHERE id = 20")
    a.write("INSERT INTO notes(id, body, n) VALUES (21, 'b21', 21)")
    _apply_pair(monkeypatch, x, y, a.read(20), SENDER, taken)  # the delete of 20 and the new 21
    assert x.rows("SELECT max(id) FROM dev_DEVA_notes") == [(21,)]
    a.write("DELETE FROM notes WHERE id = 21")
    _apply_pair(monkeypatch, x, y, a.read(22), SENDER, taken)  # the table's keys end at 19, its clocks at 21
    assert x.rows("SELECT max(id) FROM dev_DEVA_notes") == [(19,)]
    resend = dataclasses.replace(stale, blocks=tuple(b._replace(rows=[r for r in b.rows if r[KEY] == 20]) for b in stale.blocks))
    _apply_pair(monkeypatch, x, y, resend, SENDER, taken)  # 20's old row, past the table's keys but not its clocks
    assert x.rows("SELECT count(*) FROM dev_DEVA_notes WHERE id = 20") == [(0,)]
    assert shortcuts == [True, False, False, False, False] and taken == [True] * 5


def test_collaborative_rows_appended_together_go_straight_to_the_device_table(monkeypatch: pytest.MonkeyPatch,
                                                                               device: Callable[..., Replica]) -> None:
    """A block of rows past every key here whose keys and clocks count (a
    peer's rows appended together: protocol 7 sends them as counts) is
    written without the staging table (``collaborative._append``): up,
    down and by two, a statement's worth and a remainder. Each time the
    store is what row by row writes (logging only the last change, as a
    large group's batch does: test_a_block_that_logs_only_its_last_change_
    writes_all_else_alike). Blocks of one or two rows (no count), or keys
    that do not count, are staged."""
    from p2pstore.store import collaborative

    a = device(SENDER, COLLABORATIVE)
    x, y = device(ME, COLLABORATIVE), device(ME, COLLABORATIVE)
    appended = _record(monkeypatch, collaborative, "_append")
    staged = _record(monkeypatch, collaborative, "load")
    writes = [
        [(i, f"b{i}", i) for i in range(1, 51)],  # a statement's worth (ROWS_PER_INSERT)
        [(i, f"b{i}", i * 2) for i in range(52, 191)],  # statements and a remainder
        [(300, "one", 1)],  # one row: no count
        [(301, "x", 1), (302, "y", 2)],  # two rows: no count
        [(i, "odd", i) for i in (400, 401, 403)],  # keys that do not count
    ]
    taken: list[bool] = []
    for rows in writes:
        top = capture.last_seq(a.conn)
        a.write("INSERT INTO notes(id, body, n) VALUES " + ", ".join("(?, ?, ?)" for _ in rows), [v for r in rows for v in r])
        _apply_pair(monkeypatch, x, y, a.read(top), SENDER, taken)
    # Keys that count down, or by two, a statement's worth and more (as another device's writes may come).
    # (And keys 2^61 apart, past every key: their differences near the ends of 64 bits, staged.)
    for n, (first, step), at in [(130, (1130, -1), 1000), (120, (2001, 2), 2000), (3, (1 << 60, 1 << 61), 3000)]:
        rows = [(first + i * step, at + i, H + at + i, 0, None, None, None, None, None, None, first + i * step, f"r{i}", i)
                for i in range(n)]
        block = Block("notes", "id", ("id", "body", "n"), (SENDER,), rows)
        _apply_pair(monkeypatch, x, y, OutBatch(COLLABORATIVE, at - 1, at + n, (), False, True, "s1", blocks=(block,)), SENDER, taken)
    assert taken == [True] * (len(writes) + 3)
    assert len(appended) == 4 and len(staged) == 4
    assert x.rows("SELECT count(*) FROM dev_DEVA_notes") == [(sum(map(len, writes)) + 253,)]


def test_a_run_of_row_clocks_is_each_rows_clock(monkeypatch: pytest.MonkeyPatch, device: Callable[..., Replica]) -> None:
    """Rows appended together keyed one more each time get one run of
    clocks (store/row_runs.py), not an entry each — and every reader takes
    the run for each row's clock: the same block again (a repeat) applies
    nothing set-based, in bulk or row by row; a newer change of one row
    gets that row an entry of its own, which wins over the run; a catch-up
    copy reads each row with its clock; with the rows gone but no entry
    written, a repeat is still a repeat (the run still holds their keys, so
    the block is not taken for new rows, and runs never overlap)."""
    from p2pstore.store import restore

    a = device(SENDER, COLLABORATIVE)
    x, y = device(ME, COLLABORATIVE), device(ME, COLLABORATIVE)
    a.write("INSERT INTO notes(id, body, n) VALUES " + ", ".join(f"({i}, 'b{i}', {i})" for i in range(1, 61)))
    batch = a.read(0)
    _apply_pair(monkeypatch, x, y, batch, SENDER)
    tid = x.rows("SELECT tid FROM _p2p_tables WHERE name = 'dev_DEVA_notes'")[0][0]
    assert x.rows("SELECT first, last FROM _p2p_row_runs") == [(1, 60)]
    assert x.rows("SELECT count(*) FROM _p2p_cells WHERE tid = ?", [tid]) == [(0,)]
    clocks = x.rows("SELECT ck, hlc, origin, seq FROM _p2p_clocks WHERE tid = ? ORDER BY ck", [tid])
    assert clocks == y.rows("SELECT ck, hlc, origin, seq FROM _p2p_clocks WHERE tid = ? ORDER BY ck", [tid])
    assert [c[0] for c in clocks] == list(range(1, 61)) and len({c[1] for c in clocks}) == 60
    rows = decode(encode(batch, columnar=False))
    for patches in ([("apply_block", _no_block)], [("apply_block", _no_block), ("apply_bulk", _no_bulk)]):  # in bulk; row by row
        with monkeypatch.context() as m:
            for name, fn in patches:
                m.setattr(merge if name == "apply_block" else merge._Applier, name, fn)
            assert x.apply(rows, SENDER).applied == 0
    assert x.apply(decode(encode(batch)), SENDER).applied == 0  # set-based
    assert x.rows("SELECT ck, hlc, origin, seq FROM _p2p_clocks WHERE tid = ? ORDER BY ck", [tid]) == clocks
    assert x.rows("SELECT * FROM dev_DEVA_notes ORDER BY id") == y.rows("SELECT * FROM dev_DEVA_notes ORDER BY id")
    x.apply(rows, SENDER)  # (y too, so that both have seen as much)
    # A newer change of row 7: an entry of its own, over the run.
    top = capture.last_seq(a.conn)
    a.write("UPDATE notes SET body = 'new' WHERE id = 7")
    _apply_pair(monkeypatch, x, y, a.read(top), SENDER)
    assert x.rows("SELECT ck FROM _p2p_cells WHERE tid = ?", [tid]) == [(7,)]
    assert x.rows("SELECT body FROM dev_DEVA_notes WHERE id = 7") == [("new",)]
    seven = x.rows("SELECT hlc FROM _p2p_clocks WHERE tid = ? AND ck = 7", [tid])
    assert seven == y.rows("SELECT hlc FROM _p2p_clocks WHERE tid = ? AND ck = 7", [tid]) and seven[0][0] > clocks[6][1]
    # A catch-up copy of A's rows: each with its clock, the run's or its own.
    copied, _ = restore.copy_batch(x.conn, SENDER, None, limit=100)
    assert sorted((r.key, r.cells[0].hlc) for r in copied.rows) == x.rows(
        "SELECT ck, hlc FROM _p2p_clocks WHERE tid = ? ORDER BY ck", [tid])
    # Rows gone without an entry of their own (sync never does that; the device table's
    # guard let through): the same block again is still a repeat, not rows past every key.
    top = capture.last_seq(a.conn)
    a.write("INSERT INTO tags(name, x) VALUES " + ", ".join(f"('t{i}', {i})" for i in range(5)))  # (keyed by rowid)
    tags = a.read(top)
    _apply_pair(monkeypatch, x, y, tags, SENDER)
    assert x.rows("SELECT last - first FROM _p2p_row_runs r JOIN _p2p_tables t ON t.tid = r.tid AND t.name = 'dev_DEVA_tags'") == [(4,)]
    for r in (x, y):
        other = r.outside()
        other.executescript("INSERT INTO _p2p_apply(x) VALUES (1); DELETE FROM dev_DEVA_tags; DELETE FROM _p2p_apply")
        other.close()
    later = dataclasses.replace(tags, blocks=tuple(b._replace(rows=list(b.rows)[1:]) for b in tags.blocks))  # (its rows but the first)
    for again in (tags, later):
        _apply_pair(monkeypatch, x, y, again, SENDER)
        assert x.rows("SELECT count(*) FROM dev_DEVA_tags") == [(0,)]


def test_single_version_rows_never_seen_go_straight_into_the_table(monkeypatch: pytest.MonkeyPatch,
                                                                    device: Callable[..., Replica]) -> None:
    """A single_version block of rows never seen here, one device's, with no
    prev and no tomb, whose clocks count, is written without the staging
    table (``single_version._append``): the table numbers the rows, and
    their row clocks and log come from the keys just written — a
    statement's worth and a remainder; fewer rows than a statement's worth
    (an auto-sync's) are staged. A block whose later row is here
    already (an echo among new rows) is undone and staged, and so is one
    whose first row is; each time the store is what row by row writes."""
    from p2pstore.store import single_version

    a, c = device(SENDER, SINGLE_VERSION), device(OTHER, SINGLE_VERSION)
    x, y = device(ME, SINGLE_VERSION), device(ME, SINGLE_VERSION)
    appended = _record(monkeypatch, single_version, "_append")
    taken: list[bool] = []

    def write(r: Replica, uids: list[int]) -> OutBatch:
        top = capture.last_seq(r.conn)
        r.write("INSERT INTO items(uid, a, b) VALUES " + ", ".join(f"('u{u:04d}', {u}, 'b{u}')" for u in uids))
        return r.read(top)

    for uids in (list(range(1, 51)), list(range(51, 190)), [300], [301, 302]):
        _apply_pair(monkeypatch, x, y, write(a, uids), SENDER, taken)
    assert [d is not None for d, _ in appended] == [True, True, False, False]  # (a block of fewer than ROWS_PER_INSERT rows: staged)
    # C wrote u0440 .. u0459; a block of A's rows u0400 .. u0459 then holds new rows and, later, rows C's rows made
    # known here (another clock): the insert meets them, is undone, and the staged path (the planner) decides.
    from_c = write(c, list(range(440, 460)))
    _apply_pair(monkeypatch, x, y, from_c, OTHER, taken)
    statements: list[str] = []
    x.conn.set_trace_callback(statements.append)
    _apply_pair(monkeypatch, x, y, write(a, list(range(400, 460))), SENDER, taken)
    x.conn.set_trace_callback(None)
    assert sum(s.startswith("SAVEPOINT p2p_fresh") for s in statements) == 1  # (undone once; the staged path only probes)
    _apply_pair(monkeypatch, x, y, write(c, list(range(500, 505))), OTHER, taken)
    _apply_pair(monkeypatch, x, y, write(a, list(range(500, 560))), SENDER, taken)  # its first row is here: not tried
    assert [d is not None for d, _ in appended] == [True, True, False, False, False, False, False, False]
    assert [tried for d, tried in appended] == [True, True, False, False, False, True, False, False]  # (undone once, then probed)
    assert taken == [True] * 5 + [False, True, False]  # (the planner's: rows known here with another clock)
    assert x.rows("SELECT count(*) FROM items") == [(50 + 139 + 3 + 60 + 60,)]  # (u0440-59 and u0500-04 from both)


def test_a_block_of_this_devices_own_rows_coming_back_applies_as_its_rows_do(monkeypatch: pytest.MonkeyPatch,
                                                                             device: Callable[..., Replica]) -> None:
    """Rows this device wrote, relayed back to it after it lost them (a store
    made again, or restored from an old backup): a single_version block of
    one origin, this device, fresh here. Their clocks keep this device as
    their origin the way row by row stores it (NULL in a clock, a number in
    the log), and both copies end the same."""
    old = device(ME, SINGLE_VERSION)
    a = device(SENDER, SINGLE_VERSION)
    old.write("INSERT INTO items(uid, a, b) VALUES " + ", ".join(f"('u{i:03d}', {i}, 'b{i}')" for i in range(12)))
    old.push(a)
    x, y = device(ME, SINGLE_VERSION), device(ME, SINGLE_VERSION)  # this device's store, made again
    taken: list[bool] = []
    batch = a.read(0)
    assert {b.origins[i] for b in batch.blocks for i in {r[ORIGIN] for r in b.rows}} == {ME}
    _apply_pair(monkeypatch, x, y, batch, SENDER, taken)
    assert taken == [True] and x.rows("SELECT count(*) FROM _p2p_rows WHERE origin IS NULL") == [(12,)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per", [3, None])  # several statements and a rest; the daemon's own size
def test_rows_staged_several_to_a_statement_apply_as_row_by_row(monkeypatch: pytest.MonkeyPatch, device: Callable[..., Replica],
                                                                mode: str, per: int | None) -> None:
    """``blocks.load`` stages ``ROWS_PER_INSERT`` rows a statement and the
    rest a row a run: blocks of every remainder, and a block longer than
    one statement of the daemon's size, write what row by row writes (the
    staging's ``n`` keeps the block's order: seqs and keys follow it)."""
    from p2pstore.store import blocks

    if per is not None:
        monkeypatch.setattr(blocks, "ROWS_PER_INSERT", per)
    a = device(SENDER, mode)
    x, y = device(ME, mode), device(ME, mode)
    insert = ("INSERT INTO items(uid, a, b) VALUES ('u{0:04d}', {0}, 'b{0}')" if mode == SINGLE_VERSION
              else "INSERT INTO notes(id, body, n) VALUES ({0}, 'b{0}', {0})")
    taken: list[bool] = []
    done = 0
    for size in [1, 2, 3, 4, 5, 7, 131]:
        for i in range(done, done + size):
            a.write(insert.format(i + 1))
        _apply_pair(monkeypatch, x, y, a.read(done), SENDER, taken)
        done += size
    assert taken == [True] * 7
    table = "items" if mode == SINGLE_VERSION else "dev_DEVA_notes"
    assert x.rows(f"SELECT count(*) FROM {table}") == [(done,)]


@pytest.mark.parametrize("mode", MODES)
def test_blob_values_are_staged_as_the_bytes_they_are(monkeypatch: pytest.MonkeyPatch, device: Callable[..., Replica],
                                                      mode: str) -> None:
    """The staging binds a column's bytes as bytearrays (``blocks.bindable``,
    a quarter of the cost): blobs — empty, with NUL bytes, beside NULLs,
    integers and text in one column, or alone in it — land as the same
    BLOBs, never NULL or TEXT, as row by row writes them."""
    a = device(SENDER, mode)
    x, y = device(ME, mode), device(ME, mode)
    mixed = [b"", None, 7, b"\x00\xff", "t", b"z" * 300]
    if mode == SINGLE_VERSION:
        a.write("INSERT INTO items(uid, a, b) VALUES (?, ?, ?), (?, ?, ?), (?, ?, ?), (?, ?, ?), (?, ?, ?), (?, ?, ?)",
                [v for i, m in enumerate(mixed) for v in (f"u{i}", b"\x01" * i, m)])
        read = "SELECT uid, a, typeof(a), b, typeof(b) FROM items ORDER BY uid"
    else:
        a.write("INSERT INTO notes(id, body, n) VALUES (?, ?, ?), (?, ?, ?), (?, ?, ?), (?, ?, ?), (?, ?, ?), (?, ?, ?)",
                [v for i, m in enumerate(mixed) for v in (i + 1, m, b"\x01" * i)])
        read = "SELECT id, n, typeof(n), body, typeof(body) FROM dev_DEVA_notes ORDER BY id"
    taken: list[bool] = []
    _apply_pair(monkeypatch, x, y, a.read(0), SENDER, taken)
    assert taken == [True]
    got = x.rows(read)
    assert [(r[1], r[2]) for r in got] == [(b"\x01" * i, "blob") for i in range(len(mixed))]
    assert [r[3] for r in got] == [b"", None, "7", b"\x00\xff", "t", b"z" * 300]  # (7: the TEXT column's affinity)
    assert [r[4] for r in got] == ["blob", "null", "text", "blob", "text", "blob"]


@pytest.mark.parametrize("mode", MODES)
def test_decode_says_when_no_text_can_be_raw(monkeypatch: pytest.MonkeyPatch, device: Callable[..., Replica], mode: str) -> None:
    """``decode`` reads a payload as UTF-8 first: then no text of it is raw,
    and the receiver does not look at every value for it. Text another
    program stored as bytes that are not UTF-8 makes it read the payload
    again with raw text: the block is marked so, and still applies as row
    by row applies it, byte-exact."""
    a = device(SENDER, mode)
    x, y = device(ME, mode), device(ME, mode)
    write = ("INSERT INTO items(uid, a, b) VALUES ('u3', 3, CAST(? AS TEXT))" if mode == SINGLE_VERSION
             else "INSERT INTO notes(id, body, n) VALUES (3, CAST(? AS TEXT), 3)")
    if mode == SINGLE_VERSION:
        a.write("INSERT INTO items(uid, a, b) VALUES ('u1', 1, 'é'), ('u2', 2, 'b')")
    else:
        a.write("INSERT INTO notes(id, body, n) VALUES (1, 'é', 1), (2, 'b', 2)")
    plain = decode(encode(a.read(0)))
    assert plain.columns_of(plain.blocks[0]).raw_text is False
    assert [k - {type(None)} for k in plain.columns_of(plain.blocks[0]).kinds] == [
        {int} if c in ("a", "n", "id") else {str} for c in plain.blocks[0].columns]
    top = a.read(0).last_seq
    a.write(write, (b"\xffraw",))
    raw = decode(encode(a.read(top)))
    assert raw.columns_of(raw.blocks[0]).raw_text is True
    taken: list[bool] = []
    _apply_pair(monkeypatch, x, y, a.read(0), SENDER, taken)
    assert taken == [False]  # (the raw text goes by the row path, which binds it as its bytes)
    table = "items" if mode == SINGLE_VERSION else "dev_DEVA_notes"
    column = "b" if mode == SINGLE_VERSION else "body"
    assert x.rows(f"SELECT CAST({column} AS BLOB), typeof({column}) FROM {table} ORDER BY 1") == [
        (b"b", "text"), ("é".encode(), "text"), (b"\xffraw", "text")]


@pytest.mark.parametrize("mode", MODES)
def test_a_block_that_logs_only_its_last_change_writes_all_else_alike(monkeypatch: pytest.MonkeyPatch,
                                                                      device: Callable[..., Replica], mode: str) -> None:
    """``log_all`` False (a batch early in a large group, store/database.py):
    a block of fresh rows logs only its last change — the seq counter's —
    and writes every row, row clock, seq and announcement as one that logs
    them all; a block that is not all fresh rows logs every change anyway.
    Compaction would drop the others (received changes' log rows are
    history only)."""
    a = device(SENDER, mode)
    x, y = device(ME, mode), device(ME, mode)
    if mode == COLLABORATIVE:
        a.write("INSERT INTO notes(id, body, n) VALUES " + ", ".join(f"({i}, 'b{i}', {i})" for i in range(1, 31)))
    else:
        a.write("INSERT INTO items(uid, a, b) VALUES " + ", ".join(f"('u{i:03d}', {i}, 'b{i}')" for i in range(30)))
    taken: list[bool] = []
    real = merge.apply_block

    def spy(ap: merge._Applier, block: Block, fields: Any = None) -> bool:
        taken.append(real(ap, block, fields))
        return taken[-1]

    monkeypatch.setattr(merge, "apply_block", spy)
    received = "SELECT seq, tid, pk, op, hlc, origin, ck FROM _p2p_log WHERE origin IS NOT NULL ORDER BY seq"

    def both(batch: OutBatch) -> list[Any]:
        """``batch`` to x logging last changes only, to y logging all; what y logged."""
        before = y.rows(received)
        got = [_result(merge.apply_batch(r.conn, r.state, r.clock, batch, SENDER, wall=r.wall, log_all=r is y))
               for r in (x, y)]
        assert got[0] == got[1]
        return [row for row in y.rows(received) if row not in before]

    from p2pstore.store import collaborative

    appended = _record(monkeypatch, collaborative, "_append")
    fresh = both(decode(encode(a.read(10))))  # 20 rows never seen here: one block, all fresh
    assert len(fresh) == 20 and x.rows(received) == [fresh[-1]]
    assert len(appended) == (2 if mode == COLLABORATIVE else 0)  # (keys and clocks that count: no staging)
    again = both(decode(encode(a.read(0))))  # 10 new rows, then 20 known: not all fresh, logged whole
    assert len(again) == 10 and x.rows(received) == [fresh[-1], *again]
    assert taken == [True] * 4
    dx, dy = _dump(x), _dump(y)
    assert dx.pop("_p2p_log") != dy.pop("_p2p_log") and dx == dy
    assert capture.last_seq(x.conn) == capture.last_seq(y.conn) == again[-1][0]


@pytest.mark.parametrize("mode", MODES)
def test_a_large_groups_lifted_triggers_are_put_back_as_they_were(device: Callable[..., Replica], mode: str) -> None:
    """A large group drops the store's own insert triggers on the tables it
    writes (they do nothing while a batch applies) and puts them back before
    it commits (``_Applier.lift``, ``put_back``): the store ends exactly as
    one that applied the same batches with its triggers in place, the
    triggers are the same SQL, and they work after — a write into a device
    table is refused, a single_version table's write is captured."""
    a = device(SENDER, mode)
    x, y = device(ME, mode), device(ME, mode)
    if mode == COLLABORATIVE:
        a.write("INSERT INTO notes(id, body, n) VALUES " + ", ".join(f"({i}, 'b{i}', {i})" for i in range(1, 31)))
        table = "dev_DEVA_notes"
    else:
        a.write("INSERT INTO items(uid, a, b) VALUES " + ", ".join(f"('u{i:03d}', {i}, 'b{i}')" for i in range(30)))
        table = "items"
    triggers = "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
    lifted: dict[str, tuple[str, str]] = {}
    x.conn.execute("BEGIN IMMEDIATE")
    for since in (0, 10, 20):  # three batches in one transaction on x (a group), one at a time on y
        batch = decode(encode(a.read(since, limit=10)))
        merge.apply_batch(x.conn, x.state, x.clock, batch, SENDER, wall=x.wall, lifted=lifted)
        y.apply(batch, SENDER)
        assert lifted and not [n for n in lifted if x.rows("SELECT 1 FROM sqlite_master WHERE name = ?", (n,))]
    assert {t for t, _ in lifted.values()} == {table}
    merge.put_back(x.conn, lifted)
    x.conn.execute("COMMIT")
    assert not lifted and x.rows(triggers) == y.rows(triggers) and any(table in n for n, _ in x.rows(triggers))
    assert _dump(x) == _dump(y)
    if mode == COLLABORATIVE:
        with pytest.raises(sqlite3.DatabaseError, match="READ_ONLY_TABLE"):
            x.conn.execute(f"INSERT INTO {table}(id, body, n) VALUES (99, 'x', 1)")
    else:
        captured = x.write("INSERT INTO items(uid, a, b) VALUES ('mine', 1, 'b')")
        assert captured.by_table["items"]["inserted"] == [x.rows("SELECT rowid FROM items WHERE uid = 'mine'")[0][0]]


@pytest.mark.parametrize("mode", MODES)
def test_triggers_a_rolled_back_batch_lifted_are_put_back_once(device: Callable[..., Replica], mode: str) -> None:
    """A batch rolled back after it lifted triggers (a savepoint: its block
    left to the row path, a failed batch) had them back already, or took
    them with the device table it made: ``put_back`` makes none twice, and
    none on a table that is gone."""
    a = device(SENDER, mode)
    x, y = device(ME, mode), device(ME, mode)
    a.write("INSERT INTO notes(id, body, n) VALUES (1, 'b', 1)" if mode == COLLABORATIVE
            else "INSERT INTO items(uid, a, b) VALUES ('u1', 1, 'b')")
    batch = decode(encode(a.read(0)))
    triggers = "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
    before = x.rows(triggers)
    lifted: dict[str, tuple[str, str]] = {}
    x.conn.execute("BEGIN IMMEDIATE")
    x.conn.execute("SAVEPOINT undone")
    merge.apply_batch(x.conn, x.state, x.clock, batch, SENDER, wall=x.wall, lifted=lifted)
    assert lifted
    x.conn.execute("ROLLBACK TO undone")
    x.conn.execute("RELEASE undone")
    merge.put_back(x.conn, lifted)
    x.conn.execute("COMMIT")
    x.state = capture.load_state(x.conn, x.clock)
    assert x.rows(triggers) == before
    y.apply(batch, SENDER)
    x.apply(batch, SENDER)  # (now for good, without lifting)
    assert x.rows(triggers) == y.rows(triggers) and _dump(x) == _dump(y)


@pytest.mark.parametrize(("values", "refused"), [
    ([float("inf"), float("-inf"), 1.5], False),  # (their sum is NaN: the values are looked at one by one)
    ([float("inf"), float("-inf"), float("nan")], True),
    ([1.5, None, float("nan")], True),
    ([1.5, None, -0.0], False),
])
def test_a_float_column_is_refused_for_a_nan_only(values: list[Any], refused: bool) -> None:
    """A column of floats is checked whole (its sum), and value by value
    only when the sum says a NaN may be there (or both infinities are)."""
    block = _good_rows(COLLABORATIVE)
    delete = block[4][1]  # made an upsert: every row holds a value
    delete[HLC], delete[ORIGIN], delete[TOMB_HLC], delete[TOMB_ORIGIN] = H + 1, 0, None, None
    delete[V:] = [2, "y", 0.5]
    for row, value in zip(block[4], values):
        row[V + 2] = value
    plain = _good_plain(COLLABORATIVE) | {"blocks": [_wire(block)]}
    if refused:
        with pytest.raises(ProtocolError, match="NaN"):
            decode(pack_values(plain))
    else:
        assert [r[V + 2] for r in decode(pack_values(plain)).blocks[0].rows] == values


@pytest.mark.parametrize("tomb", [False, True], ids=["no tomb in the table", "a tomb elsewhere"])
def test_a_single_version_block_carries_its_rows_prev_clocks(device: Callable[..., Replica], tomb: bool) -> None:
    """Rows whose clock records what their writer superseded (prev; here
    received so) go on in a block with their prevs, whether the table holds
    a tomb (the block query with its tomb join) or none (the query that
    reads only what varies): the columnar read is the row read, prevs
    included."""
    x = device(ME, SINGLE_VERSION)
    table, key_column, columns, origins, rows = _good_rows(SINGLE_VERSION)
    rows = [[*r[:TOMB_HLC], None, None, None, None, *r[VALUES:]] for r in rows if r[HLC] is not None]  # no tomb
    assert any(r[PREV_HLC] is not None for r in rows)
    block = Block(table, key_column, tuple(columns), tuple(origins), list(map(tuple, rows)))
    x.apply(decode(encode(OutBatch(SINGLE_VERSION, 0, 3, (), False, True, "s1", blocks=(block,)))), SENDER)
    if tomb:
        x.write("INSERT INTO items(uid, a, b) VALUES ('gone', 0, 'x')")
        x.write("DELETE FROM items WHERE uid = 'gone'")
    assert bool(x.rows("SELECT 1 FROM _p2p_tombs")) == tomb
    assert x.rows("SELECT count(*) FROM _p2p_rows WHERE prev_hlc IS NOT NULL") == [(1,)]
    columnar, as_rows = _both_forms(x, 0)
    _check_forms(columnar, as_rows)
    (sent,) = columnar.blocks
    with_prev = [r for r in sent.rows if r[PREV_HLC] is not None]
    assert [(r[KEY], r[PREV_HLC], sent.origins[r[PREV_ORIGIN]]) for r in with_prev] == [("u1", H - 1, SENDER)]


@pytest.mark.parametrize("tomb", [False, True], ids=["no tomb in the table", "a tomb elsewhere"])
def test_names_with_braces_are_read_as_names(tmp_path: Path, tomb: bool) -> None:
    """A single_version table and columns whose names hold ``{`` and ``}``
    (quoted identifiers may): the block queries put names in as SQL, never
    through a format string, and the columnar read is the row read."""
    table, ck = "it{0}ems", "u{id}"
    doc = schema_doc({table: ([field("id", "Integer", autoinc=True), field(ck, "Text", pk=True, not_null=True),
                               field("a{}", "Integer")], [ck, "a{}"])})
    a = Replica(tmp_path / "braces.db", SENDER, wall=WALL)
    try:
        a.write(f'CREATE TABLE "{table}"(id INTEGER PRIMARY KEY AUTOINCREMENT, "{ck}" TEXT NOT NULL UNIQUE, "a{{}}" INTEGER)')
        a.make_distributed(table, doc=doc)
        a.write(f'INSERT INTO "{table}"("{ck}", "a{{}}") VALUES (\'k1\', 1), (\'k2\', 2), (\'k3\', 3)')
        if tomb:
            a.write(f'DELETE FROM "{table}" WHERE "{ck}" = \'k3\'')
        columnar, rows = _both_forms(a, 0)
        _check_forms(columnar, rows)
        (block,) = columnar.blocks
        assert sorted([*(r[KEY] for r in block.rows), *(r.key for r in columnar.rows)]) == ["k1", "k2", "k3"]
    finally:
        a.close()
