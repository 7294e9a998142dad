"""The set-based single_version apply (``_Applier.apply_bulk``)
must leave exactly what applying row by row leaves: table rows and their
local keys, log rows and their seqs, cells, tombs, conflicts, failures,
watermark, the clock and the same ApplyResult.

Checked on random batches against a receiver that also writes locally
between batches (so incoming changes meet local values, older and newer
clocks, deletes and resurrections): ordinary batches, which take the bulk
path, and odd ones (duplicate keys, keys of another type, a wrong conflict
column, a NOT NULL clash), which fall back to row by row. The row-by-row
side also plans rows never seen here with the general merge, so the
shortcut for them (``single_version.plan_new``) is proven equal to it.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from replicas import Replica, field, schema_doc

from p2pstore.store import merge, single_version
from p2pstore.store.changes import Cell, OutBatch, RowChange

ITEMS = ("CREATE TABLE items(id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL UNIQUE, a INTEGER, "
         "b TEXT CHECK (b IS NULL OR b != 'bad'), note TEXT)")
DOC = schema_doc({"items": ([field("id", "Integer", autoinc=True), field("uid", "Text", pk=True, not_null=True),
                             field("a", "Integer"), field("b", "Text"), field("note", "Text")], ["uid", "a", "b"])})
SENDER, OTHER, ME = "DEVA", "DEVC", "DEVB"
WALL = 1_700_000_000_000
_dirs = itertools.count()


def _receiver(root: Path) -> Replica:
    r = Replica(root / f"b{next(_dirs)}.db", ME, wall=WALL)  # one fixed wall clock: same hlc values in both
    r.write(ITEMS)
    r.make_distributed("items", doc=DOC)
    return r


#: Rows that differ between any two stores: each has its own stream ID.
_OWN = {"_p2p_meta": " WHERE key != 'stream'"}


def _dump(r: Replica) -> dict[str, Any]:
    names = [n for (n,) in r.rows("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    skip = {"_p2p_failures", "_p2p_conflicts"}
    return {n: sorted(map(repr, r.rows(f'SELECT * FROM "{n}"' + _OWN.get(n, "")))) for n in names if n not in skip} | {
        "failures": r.rows("SELECT origin, tbl, change, reason FROM _p2p_failures ORDER BY id"),
        "conflicts": r.rows("SELECT id, tbl, ck, col, losing_value, winner, winner_hlc, loser, loser_hlc "
                            "FROM _p2p_conflicts ORDER BY id"),
    }


def _result(res: merge.ApplyResult) -> tuple[Any, ...]:
    return (res.applied, res.conflicts, res.failed, res.last_seq, res.remote)


_clock = st.tuples(st.integers(1, 6).map(lambda h: WALL * 65536 + h * 1000), st.sampled_from([SENDER, OTHER, ME]))


@st.composite
def _rows(draw: st.DrawFn, odd: bool) -> list[RowChange]:
    out = []
    for _ in range(draw(st.integers(1, 10))):
        key: Any = f"u{draw(st.integers(1, 6))}"
        if odd and draw(st.integers(0, 9)) == 0:
            key = draw(st.integers(1, 3))  # a key of another type
        key_column = "note" if odd and draw(st.integers(0, 14)) == 0 else "uid"
        cells = []
        for col in draw(st.lists(st.sampled_from(["uid", "a", "b"]), unique=True, max_size=3)):
            value = key if col == "uid" else draw(st.sampled_from([None, 1, 2, "x"]) if col == "a" else
                                                  st.sampled_from([None, "p", "q"] + (["bad"] if odd else [])))
            hlc, origin = draw(_clock)
            prev = draw(st.one_of(st.none(), _clock))
            cells.append(Cell(col, value, hlc, origin, *(prev or (None, None))))
        tomb = draw(st.one_of(st.none(), _clock)) if cells and draw(st.booleans()) else draw(_clock) if not cells else None
        tomb_prev = draw(st.one_of(st.none(), _clock)) if tomb else None
        out.append(RowChange("items", key_column, key, 0, tuple(cells), *(tomb or (None, None)), *(tomb_prev or (None, None))))
    if not odd:  # each key once: the bulk path's case
        seen, unique = set(), []
        for r in out:
            if r.key not in seen:
                seen.add(r.key)
                unique.append(r)
        out = unique
    return [RowChange(r.table, r.key_column, r.key, i + 1, r.cells, r.tomb_hlc, r.tomb_origin, r.tomb_prev_hlc,
                      r.tomb_prev_origin) for i, r in enumerate(out)]


_local = st.one_of(
    st.tuples(st.just("INSERT OR IGNORE INTO items(uid, a, b) VALUES (?, ?, ?)"),
              st.tuples(st.integers(1, 6).map(lambda k: f"u{k}"), st.integers(0, 3), st.sampled_from(["p", "r"]))),
    st.tuples(st.just("UPDATE items SET a = ? WHERE uid = ?"), st.tuples(st.integers(0, 3), st.integers(1, 6).map(lambda k: f"u{k}"))),
    st.tuples(st.just("DELETE FROM items WHERE uid = ?"), st.tuples(st.integers(1, 6).map(lambda k: f"u{k}"))),
    st.tuples(st.just("UPDATE items SET note = ? WHERE uid = ?"), st.tuples(st.just("mine"), st.integers(1, 6).map(lambda k: f"u{k}"))),
)


def _apply_both(monkeypatch: pytest.MonkeyPatch, steps: list[tuple[list[RowChange], list[tuple[str, tuple[Any, ...]]]]]) -> list[bool]:
    taken: list[bool] = []
    real = merge._Applier.apply_bulk

    def spy(self: merge._Applier, rows: Any, **kw: Any) -> bool:
        taken.append(real(self, rows, **kw))
        return taken[-1]

    with tempfile.TemporaryDirectory() as tmp:
        bulk, rowwise = _receiver(Path(tmp)), _receiver(Path(tmp))
        try:
            since = 0
            for rows, local in steps:
                for sql, params in local:
                    bulk.write(sql, params)
                    rowwise.write(sql, params)
                batch = OutBatch("single_version", since, since + len(rows), tuple(rows), False, True)
                since += len(rows)
                with monkeypatch.context() as m:
                    m.setattr(merge._Applier, "apply_bulk", spy)
                    a = bulk.apply(batch, SENDER)
                with monkeypatch.context() as m:
                    m.setattr(merge._Applier, "apply_bulk", lambda self, rows, **kw: False)
                    # and without the shortcut for rows never seen here (single_version.plan_new)
                    m.setattr(single_version, "plan_row", single_version.plan_merge)
                    b = rowwise.apply(batch, SENDER)
                assert _result(a) == _result(b)
                assert _dump(bulk) == _dump(rowwise)
                assert bulk.clock.last == rowwise.clock.last
        finally:
            bulk.close()
            rowwise.close()
    return taken


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.one_of(_rows(False), _rows(True)), st.lists(_local, max_size=3)), min_size=1, max_size=5))
def test_single_version_bulk_apply_equals_row_by_row(monkeypatch: pytest.MonkeyPatch, steps: Any) -> None:
    _apply_both(monkeypatch, steps)


def test_single_version_bulk_apply_is_taken_for_an_ordinary_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    hlc = WALL * 65536
    rows = [RowChange("items", "uid", f"u{k}", k, (Cell("uid", f"u{k}", hlc + k, SENDER), Cell("a", k, hlc + k, SENDER),
                                                  Cell("b", "p", hlc + k, SENDER))) for k in range(1, 501)]
    edits = [RowChange("items", "uid", f"u{k}", 500 + k, (Cell("a", -k, hlc + 1000 + k, SENDER),)) for k in range(1, 251)]
    deletes = [RowChange("items", "uid", f"u{k}", 750 + k, (), hlc + 2000 + k, SENDER) for k in range(251, 301)]
    taken = _apply_both(monkeypatch, [(rows, []), (edits + deletes, [("UPDATE items SET note = 'mine' WHERE uid = 'u1'", ())])])
    assert taken == [True, True]
    # A duplicate key, or a NOT NULL / CHECK clash in one row, falls back to row by row.
    dup = [RowChange("items", "uid", "u9", 1, (Cell("a", 1, hlc + 5000, SENDER),))] * 2
    bad = [RowChange("items", "uid", "z1", 1, (Cell("uid", "z1", hlc + 5000, SENDER), Cell("b", "bad", hlc + 5000, SENDER))),
           RowChange("items", "uid", "z2", 2, (Cell("uid", "z2", hlc + 5000, SENDER), Cell("b", "q", hlc + 5000, SENDER)))]
    taken = _apply_both(monkeypatch, [(dup, []), (bad, [])])
    assert taken == [False, False]


def test_cells_of_columns_not_synced_here_are_parked_the_same_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer on a newer sync_schema.json also syncs ``note`` (here a local
    column): its cells are parked — newest per cell, a repeat is a no-op, a
    change of ``note`` alone still counts as applied — by the bulk path
    exactly as row by row (issue 12)."""
    hlc = WALL * 65536
    first = [RowChange("items", "uid", f"u{k}", k, (Cell("uid", f"u{k}", hlc + k, SENDER), Cell("a", k, hlc + k, SENDER),
                                                   Cell("note", f"n{k}", hlc + k, SENDER))) for k in range(1, 4)]
    newer = [RowChange("items", "uid", "u1", 10, (Cell("note", "newer", hlc + 100, SENDER),)),
             RowChange("items", "uid", "u2", 11, (Cell("note", "older", hlc, OTHER),))]
    taken: list[bool] = []
    real = merge._Applier.apply_bulk
    with tempfile.TemporaryDirectory() as tmp:
        bulk, rowwise = _receiver(Path(tmp)), _receiver(Path(tmp))
        try:
            results = []
            for since, rows in ((0, first), (3, newer), (3, newer)):
                batch = OutBatch("single_version", since, since + len(rows), tuple(rows), False, True)
                with monkeypatch.context() as m:
                    m.setattr(merge._Applier, "apply_bulk", lambda self, rows, **kw: taken.append(real(self, rows, **kw)) or taken[-1])
                    a = bulk.apply(batch, SENDER)
                with monkeypatch.context() as m:
                    m.setattr(merge._Applier, "apply_bulk", lambda self, rows, **kw: False)
                    b = rowwise.apply(batch, SENDER)
                assert _result(a) == _result(b)
                assert _dump(bulk) == _dump(rowwise)
                results.append(a.applied)
            assert taken == [True, True, True]
            assert results == [3, 1, 0], "u1's newer note counts; u2's older one and the repeat change nothing"
            assert [tuple(r) for r in bulk.rows("SELECT ck, col, value, origin FROM _p2p_parked ORDER BY ck")] == [
                ("u1", "note", "newer", SENDER), ("u2", "note", "n2", SENDER), ("u3", "note", "n3", SENDER)]
            assert [tuple(r) for r in bulk.rows("SELECT uid, note FROM items ORDER BY uid")] == [("u1", None), ("u2", None), ("u3", None)]
            assert [tuple(r) for r in bulk.rows("SELECT count(*) FROM _p2p_failures")] == [(0,)]
        finally:
            bulk.close()
            rowwise.close()
