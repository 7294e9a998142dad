"""Row clock runs: the clocks of a peer's rows appended together, one row of metadata a block.

A collaborative device table's row has one clock (``_p2p_cells`` under
column ``*``: collaborative.py). The usual block a peer sends is rows it
appended since the last sync — keys one after another, clocks and seqs
counting with them (protocol 7 sends them as counts) — and their clocks
need not be a row each: one run holds them all. Key *k* of the run
``first``..``last`` has clock ``hlc + (k - first) × hlc_step``, its origin,
and local seq ``seq + (k - first)``: what a ``*`` entry a row would hold.
A row's own ``*`` entry, written by any later change of it (an update, a
delete), overrides its run; a run is never changed after it is written,
only dropped whole (a resync's sweep first gives its rows entries of their
own, ``spell_out``).

Only integer keys, each one more than the one before (rowids, AUTOINCREMENT
keys), and only rows past every key the table and its clocks held
(collaborative ``write_block`` checks both): runs of a table never overlap,
and the run with the highest ``first`` holds the highest key.

Every reader of a row's clock reads it through here: ``holds`` (SQL),
``clocks`` (Python), ``last_key_sql``, ``spell_out``; ``cells.clocks_view`` shows each run's
keys as the entries they stand for (``entries_sql``). Writing the run instead of a row each
took a fifth of the receiver's store work off a large collaborative push
(docs/performance.md, round 15).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS _p2p_row_runs(
    tid INTEGER NOT NULL,               -- the device table (_p2p_tables)
    first INTEGER NOT NULL, last INTEGER NOT NULL,  -- its keys first..last, each one more than the one before
    hlc INTEGER NOT NULL, hlc_step INTEGER NOT NULL,  -- key k's clock: hlc + (k - first) * hlc_step
    origin INTEGER,                     -- _p2p_origins.id
    seq INTEGER NOT NULL,               -- key k's local seq: seq + (k - first)
    PRIMARY KEY (tid, first)
) WITHOUT ROWID;
"""


def holds(tid: str, key: str) -> str:
    """SQL: run ``r`` (of ``_p2p_row_runs``) holds key ``key`` of device
    table ``tid`` (SQL expressions). The run is the last to start at or
    before the key; it holds it if it ends at or after it and the key is an
    integer step from its start (a REAL key in a table without a type may
    equal an integer; text and blobs sort after every integer and never fall
    in a run)."""
    return (f"r.tid = {tid} AND r.first = (SELECT max(first) FROM _p2p_row_runs WHERE tid = {tid} AND first <= {key}) "
            f"AND r.last >= {key} AND {key} - r.first = CAST({key} - r.first AS INTEGER)")


def hlc_sql(key: str) -> str:
    """SQL: the clock key ``key`` has in run ``r`` (``holds``)."""
    return f"r.hlc + CAST({key} - r.first AS INTEGER) * r.hlc_step"


def seq_sql(key: str) -> str:
    """SQL: the local seq key ``key`` has in run ``r`` (``holds``)."""
    return f"r.seq + CAST({key} - r.first AS INTEGER)"


def write(conn: sqlite3.Connection, tid: int, first: int, last: int, hlc: int, hlc_step: int, origin: int | None,
          seq: int) -> None:
    """The run of keys ``first``..``last`` (each one more than the one before)."""
    conn.execute("INSERT INTO _p2p_row_runs(tid, first, last, hlc, hlc_step, origin, seq) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (tid, first, last, hlc, hlc_step, origin, seq))


def any_in(conn: sqlite3.Connection, tid: int) -> bool:
    return conn.execute("SELECT 1 FROM _p2p_row_runs WHERE tid = ? LIMIT 1", (tid,)).fetchone() is not None


def last_key_sql(tid: str) -> str:
    """SQL: the highest key a run of device table ``tid`` holds (NULL: no
    run) — the last run's: runs never overlap and each starts past every
    key before it."""
    return f"(SELECT last FROM _p2p_row_runs WHERE tid = {tid} ORDER BY first DESC LIMIT 1)"


def clocks(conn: sqlite3.Connection, tid: int, keys: Sequence[Any]) -> dict[Any, tuple[int, int | None]]:
    """The run clock (hlc, stored origin) of each of ``keys`` a run holds."""
    if not keys or not any_in(conn, tid):
        return {}
    out: dict[Any, tuple[int, int | None]] = {}
    for i in range(0, len(keys), 500):
        chunk = keys[i:i + 500]
        values = ", ".join("(?)" for _ in chunk)
        for key, hlc, origin in conn.execute(
                f"WITH k(v) AS (VALUES {values}) SELECT k.v, {hlc_sql('k.v')}, r.origin FROM k JOIN _p2p_row_runs r "
                f"ON {holds(f'?{len(chunk) + 1}', 'k.v')}", (*chunk, tid)):
            out[key] = (int(hlc), origin)
    return out


def entries_sql(where: str = "") -> str:
    """SQL: the entries the runs stand for, a row a key they hold: (tid,
    ck, hlc, origin, seq). ``where``: which runs (a condition on their
    columns, unqualified)."""
    return ("(WITH RECURSIVE k(tid, first, v) AS ("
            f"SELECT tid, first, first FROM _p2p_row_runs{' WHERE ' + where if where else ''} UNION ALL "
            "SELECT k.tid, k.first, k.v + 1 FROM k JOIN _p2p_row_runs r ON r.tid = k.tid AND r.first = k.first WHERE k.v < r.last) "
            f"SELECT r.tid AS tid, k.v AS ck, {hlc_sql('k.v')} AS hlc, r.origin AS origin, {seq_sql('k.v')} AS seq "
            "FROM k JOIN _p2p_row_runs r ON r.tid = k.tid AND r.first = k.first)")


def spell_out(conn: sqlite3.Connection, tid: int) -> None:
    """Give every key a run of device table ``tid`` holds that has no
    ``*`` entry of its own one, and drop the table's runs: before rows go
    without a change of their own (a resync's sweep), which a run can't say."""
    if not any_in(conn, tid):
        return
    conn.execute(f"INSERT OR IGNORE INTO _p2p_cells(tid, ck, col, hlc, origin, seq) SELECT tid, ck, '*', hlc, origin, seq "
                 f"FROM {entries_sql('tid = ?1')}", (tid,))
    conn.execute("DELETE FROM _p2p_row_runs WHERE tid = ?", (tid,))
