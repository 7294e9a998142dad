"""Every statement of the sync data path finds the clocks of a row by their
full key, never by walking all of a table's clocks once per row.

A plan can go quadratic without any result changing: ``_p2p_rows.pk``
has no type affinity and a table's key has one, so ``r.pk = x.id`` makes
SQLite convert ``pk`` to the key's affinity and give up ``pk``'s index —
it then searches ``_p2p_rows`` by ``tid`` alone, all of the table's row
clocks, for each row it checks. That cost 27 µs a row of a batch of
duplicates at 3,200 rows, and grows with the table: the 16-host ``mesh``
bench, whose bursts are mostly duplicates, took twice as long. Timing
can't catch it in a test; the plan can: each statement the replicas run
here is explained just before it runs, and a search by ``tid`` alone is
allowed only as the outer loop of its statement.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from replicas import Replica
from test_row_clocks import DOC, THINGS, WORDS  # the two kinds of single_version key

NOTES = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"


class Explaining:
    """A connection that explains each data statement just before running
    it and keeps the plans that walk a table's clocks per row."""

    def __init__(self, conn: sqlite3.Connection, found: list[str]) -> None:
        self._conn, self._found = conn, found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def _check(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> None:
        if str(sql).lstrip().split(None, 1)[0].upper() not in ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "REPLACE"):
            return
        plan = self._conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        for bad in per_row_walks(plan):
            self._found.append(f"{bad}\n    in: {' '.join(str(sql).split())[:400]}")

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        self._check(sql, params)
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        rows = list(rows)
        if rows:
            self._check(sql, rows[0])
        return self._conn.executemany(sql, rows)


def per_row_walks(plan: list[tuple[int, int, int, str]]) -> list[str]:
    """Plan lines that search a ``_p2p`` clock table by ``tid`` alone inside
    a loop: not the first loop of their level, or under a correlated subquery."""
    details = {node: detail for node, _, _, detail in plan}
    parents = {node: parent for node, parent, _, _ in plan}
    seen_loop: set[int] = set()
    bad = []
    for node, parent, _, detail in plan:
        if not detail.startswith(("SCAN", "SEARCH")):
            continue
        inner = parent in seen_loop
        seen_loop.add(parent)
        up = parent
        while up and not inner:
            inner = details.get(up, "").startswith("CORRELATED")
            up = parents.get(up, 0)
        if inner and detail.startswith("SEARCH") and detail.endswith("(tid=?)"):
            bad.append(detail)
    return bad


def test_the_rule_sees_a_walk_per_row_and_lets_an_outer_walk_be() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE clocks(tid INTEGER NOT NULL, pk, hlc INTEGER, PRIMARY KEY (tid, pk)) WITHOUT ROWID")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT UNIQUE)")
    explain = lambda sql: conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()  # noqa: E731
    assert per_row_walks(explain("SELECT * FROM t x JOIN clocks r ON r.tid = 1 AND r.pk = x.id WHERE x.v = 'a'"))
    assert per_row_walks(explain("SELECT (SELECT hlc FROM clocks r WHERE r.tid = 1 AND r.pk = x.id) FROM t x"))
    assert not per_row_walks(explain("SELECT * FROM t x JOIN clocks r ON r.tid = 1 AND r.pk = +x.id WHERE x.v = 'a'"))
    assert not per_row_walks(explain("SELECT * FROM clocks r JOIN t x ON x.id = r.pk WHERE r.tid = 1"))


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[tuple[list[Replica], list[str]]]:
    found: list[str] = []
    replicas = [Replica(tmp_path / f"{d}.db", f"DEV{d}") for d in "ABC"]
    for r in replicas:
        r.write(THINGS)
        r.write(WORDS)
        r.make_distributed("things", "words", doc=DOC)
    replicas.append(Replica(tmp_path / "d.db", "DEVD"))
    replicas.append(Replica(tmp_path / "e.db", "DEVE"))
    for r in replicas[3:]:
        r.write(NOTES)
        r.make_distributed("notes")
    for r in replicas:
        r.conn = Explaining(r.conn, found)  # type: ignore[assignment]
    yield replicas, found
    for r in replicas:
        r.conn = r.conn._conn  # type: ignore[attr-defined]
        r.close()


def _everything(a: Replica, b: Replica, c: Replica) -> None:
    """Inserts, edits, deletes, new conflict values and rows another program
    wrote, on both kinds of key, pushed around (each more than once: the
    second time a receiver holds every row) and compacted."""
    for i in range(30):
        a.write("INSERT INTO things(uid, a, b) VALUES (?, ?, ?)", (f"a{i}", i, "x"))
        b.write("INSERT INTO words(w, n) VALUES (?, ?)", (f"w{i}", i))
    with a.outside() as other:
        other.executemany("INSERT INTO things(uid, a) VALUES (?, ?)", [(f"o{i}", i) for i in range(20)])
    for x, y in ((a, b), (b, c), (c, a), (a, c), (b, a)):
        x.push(y)
    a.write("UPDATE things SET a = a + 1 WHERE id % 3 = 0")
    b.write("UPDATE things SET b = 'y' WHERE id % 4 = 0")
    c.write("DELETE FROM things WHERE id % 5 = 0")
    c.write("UPDATE things SET uid = uid || '-renamed' WHERE id % 7 = 0")
    b.write("UPDATE words SET n = -n WHERE n % 2 = 0")
    a.write("DELETE FROM words WHERE n % 3 = 0")
    with b.outside() as other:
        other.execute("UPDATE things SET a = 0 WHERE id % 6 = 0")
        other.execute("INSERT OR REPLACE INTO things(id, uid, a) VALUES (2, 'replaced', 1)")
    for _ in range(2):
        for x, y in ((a, b), (b, c), (c, a), (b, a), (a, c), (c, b)):
            x.push(y, marks=True)
    for x in (a, b, c):
        for y in (a, b, c):
            if x is not y:  # forget every position: a full resend, all duplicates
                y.conn.execute("DELETE FROM _p2p_watermarks WHERE peer = ?", (x.id,))
                x.push(y)
        x.compact()


def test_no_statement_walks_a_tables_clocks_per_row(trio: tuple[list[Replica], list[str]]) -> None:
    replicas, found = trio
    a, b, c = replicas[:3]
    _everything(a, b, c)
    assert a.rows("SELECT uid, a, b FROM things ORDER BY uid") == c.rows("SELECT uid, a, b FROM things ORDER BY uid")
    assert len(a.rows("SELECT * FROM things")) > 40
    assert not found, "\n".join(sorted(set(found)))


def test_no_statement_walks_a_tables_clocks_per_row_collaborative(trio: tuple[list[Replica], list[str]]) -> None:
    replicas, found = trio
    d, e = replicas[3:]
    for i in range(30):
        d.write("INSERT INTO notes(body) VALUES (?)", (f"n{i}",))
    d.write("UPDATE notes SET body = 'x' WHERE id % 3 = 0")
    d.write("DELETE FROM notes WHERE id % 5 = 0")
    for _ in range(2):
        e.conn.execute("DELETE FROM _p2p_watermarks")
        d.push(e)
    d.compact()
    assert not found, "\n".join(sorted(set(found)))
