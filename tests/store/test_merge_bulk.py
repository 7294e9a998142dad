"""The set-based collaborative apply (``_Applier.apply_bulk``)
must leave exactly what applying row by row leaves: device table rows, log
rows and their seqs, row clocks, failures, watermark, and the same
ApplyResult. Checked on random batches (valid ones, which take the bulk path,
and odd ones: duplicate keys, mixed key types, relayed rows, unknown columns,
stale and repeated clocks, which fall back to row by row).
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from replicas import Replica

from p2pstore.store import merge
from p2pstore.store.changes import Cell, OutBatch, RowChange

NOTES = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT, n INTEGER)"
TAGS = "CREATE TABLE tags(name TEXT, x INTEGER)"
WORDS = "CREATE TABLE words(w TEXT PRIMARY KEY, n INTEGER)"
SENDER, OTHER = "DEVA", "DEVC"
_dirs = itertools.count()


def _receiver(root: Path) -> Replica:
    r = Replica(root / f"b{next(_dirs)}.db", "DEVB", wall=1_700_000_000_000)  # one fixed wall clock: same hlc values
    for sql in (NOTES, TAGS, WORDS):
        r.write(sql)
    r.make_distributed("notes", "tags", "words")
    return r


#: Rows that differ between any two stores: each has its own stream ID.
_OWN = {"_p2p_meta": " WHERE key != 'stream'"}


def _dump(r: Replica) -> dict[str, Any]:
    names = [n for (n,) in r.rows("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {n: sorted(map(repr, r.rows(f'SELECT * FROM "{n}"' + _OWN.get(n, "")))) for n in names if n not in ("_p2p_failures",)} | {
        "failures": r.rows("SELECT origin, tbl, change, reason FROM _p2p_failures ORDER BY id"),
    }


def _result(res: merge.ApplyResult) -> tuple[Any, ...]:
    return (res.applied, res.conflicts, res.failed, res.last_seq, res.remote)


_COLUMNS = {"notes": ("id", "body", "n"), "tags": ("name", "x"), "words": ("w", "n")}
_KEYCOL = {"notes": "id", "tags": "", "words": "w"}


@st.composite
def _rows(draw: st.DrawFn, odd: bool) -> list[RowChange]:
    out = []
    for _ in range(draw(st.integers(1, 12))):
        table = draw(st.sampled_from(sorted(_COLUMNS)))
        key: Any = draw(st.integers(1, 6))
        if table == "words":
            key = f"k{key}"
        if odd and draw(st.integers(0, 9)) == 0:
            key = str(key) if isinstance(key, int) else draw(st.integers(1, 3))  # a mixed key type
        hlc = draw(st.integers(1, 8))
        origin = OTHER if odd and draw(st.integers(0, 9)) == 0 else SENDER
        if draw(st.integers(0, 3)) == 0:
            out.append(RowChange(table, _KEYCOL[table], key, 0, (), hlc, origin))
            continue
        cols = [c for c in _COLUMNS[table]]
        if odd and draw(st.integers(0, 9)) == 0:
            cols.append("nope")
        values = {"body": draw(st.sampled_from(["a", "b", None])), "n": draw(st.integers(0, 3)),
                  "name": "t", "x": draw(st.integers(0, 3)), "nope": 1}
        cells = tuple(Cell(c, key if c == _KEYCOL[table] else values[c], hlc, origin) for c in cols)
        out.append(RowChange(table, _KEYCOL[table], key, 0, cells))
    if not odd:  # each key once per table: the bulk path's case
        seen, unique = set(), []
        for r in out:
            if (r.table, r.key) not in seen:
                seen.add((r.table, r.key))
                unique.append(r)
        out = unique
    return [RowChange(r.table, r.key_column, r.key, i + 1, r.cells, r.tomb_hlc, r.tomb_origin) for i, r in enumerate(out)]


def _apply_both(monkeypatch: pytest.MonkeyPatch, batches: list[list[RowChange]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bulk, rowwise = _receiver(Path(tmp)), _receiver(Path(tmp))
        try:
            since = 0
            for rows in batches:
                batch = OutBatch("collaborative", since, since + len(rows), tuple(rows), False, True)
                since += len(rows)
                a = bulk.apply(batch, SENDER)
                with monkeypatch.context() as m:
                    m.setattr(merge._Applier, "apply_bulk", lambda self, rows, **kw: False)
                    b = rowwise.apply(batch, SENDER)
                assert _result(a) == _result(b)
                assert _dump(bulk) == _dump(rowwise)
                assert bulk.clock.last == rowwise.clock.last
        finally:
            bulk.close()
            rowwise.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.one_of(_rows(False), _rows(True)), min_size=1, max_size=4))
def test_bulk_apply_equals_row_by_row(monkeypatch: pytest.MonkeyPatch, batches: list[list[RowChange]]) -> None:
    _apply_both(monkeypatch, batches)


def test_bulk_apply_is_taken_for_an_ordinary_batch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    r = _receiver(tmp_path)
    try:
        calls: list[bool] = []
        real = merge._Applier.apply_bulk

        def spy(self: merge._Applier, rows: Any, **kw: Any) -> bool:
            calls.append(real(self, rows, **kw))
            return calls[-1]

        monkeypatch.setattr(merge._Applier, "apply_bulk", spy)
        rows = [RowChange("notes", "id", k, k, (Cell("id", k, 10 + k, SENDER), Cell("body", f"b{k}", 10 + k, SENDER),
                                                 Cell("n", k, 10 + k, SENDER))) for k in range(1, 501)]
        res = r.apply(OutBatch("collaborative", 0, 500, tuple(rows), False, True), SENDER)
        assert calls == [True]
        assert res.applied == 500 and res.last_seq == 500
        assert r.rows("SELECT count(*) FROM dev_DEVA_notes") == [(500,)]
        # A duplicate key falls back to row by row.
        dup = OutBatch("collaborative", 500, 502, (rows[0], rows[0]), False, True)
        assert r.apply(dup, SENDER).applied == 0 and calls[-1] is False
    finally:
        r.close()
