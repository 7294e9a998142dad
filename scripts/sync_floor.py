"""The floor of a synced row: what SQLite alone costs, with no Python between
the statements, to store on the receiver and read on the sender the rows of
``./scripts/bench push`` (100k API-written rows, sequential ``name-N`` keys),
against raw ``executemany`` of the same rows (docs/performance.md, round 9).

    .venv/bin/python scripts/sync_floor.py [ROWS]

Each figure is one process, a fresh file with the daemon's settings (WAL,
``synchronous = NORMAL``, its page cache), 1,000-row batches in one
transaction, median of 3, in microseconds a row:

- ``raw``: ``executemany`` into a plain table of the mode's shape (what the
  ``push`` case divides by).
- ``receiver, staged``: the least a receiver does that takes rows from
  Python: ``executemany`` of the wire values into a staging table, one
  ``INSERT ... SELECT`` into the table, one into the row clocks
  (``_p2p_rows`` and its seq index, the store's own DDL), one into the
  change log (``_p2p_log``, which relays read) — no capture triggers, no
  checks, no conflicts, no bookkeeping.
- ``receiver, from an image``: the same rows already in an attached
  database (a block sent as a SQLite image, never built): no binding at all.
- ``sender``: the stream's read, the row clocks by seq joined to the table,
  ``fetchmany`` of 1,000, without building a batch.

Then the same receiver by what it writes a row (round 11): today's table,
row clock and log row against less metadata (a clock inline in the table,
no log row, the table alone).

If the receiver's floor alone is near 0.5 x raw, no data path that keeps a
row clock and a log row per synced row (issue 11, item 1) can reach it once
the decode, the sender, TLS and two event loops share the machine.
Nothing here is used by the daemon.
"""

from __future__ import annotations

import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pstore.store import capture, database  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
BATCH = 1000
SHAPES = {  # scripts/bench.py: the collaborative table, and single_version's with its UNIQUE conflict column
    "collaborative": "(ID INTEGER PRIMARY KEY AUTOINCREMENT, NAME TEXT NOT NULL, AGE INTEGER, SALARY REAL, CODES BLOB)",
    "single_version": "(ID INTEGER PRIMARY KEY AUTOINCREMENT, NAME TEXT NOT NULL UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB)",
}
ROWS = [(f"name-{i}", i % 90, i * 1.5, b"\x01\x02\x03\x04") for i in range(N)]
HLC0, ORIGIN = 1 << 40, 1


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA cache_size = {-database.CACHE_KIB}")
    return conn


def raw(d: Path, shape: str) -> float:
    conn = _connect(d / "raw.db")
    conn.execute(f"CREATE TABLE T {shape}")
    t = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO T(NAME, AGE, SALARY, CODES) VALUES (?, ?, ?, ?)", ROWS)
    conn.execute("COMMIT")
    return time.perf_counter() - t


def _receiver_file(d: Path, name: str, shape: str) -> sqlite3.Connection:
    conn = _connect(d / name)
    conn.executescript(capture.SCHEMA_SQL)
    conn.execute(f"CREATE TABLE T {shape}")
    return conn


def _store(conn: sqlite3.Connection, source: str, start: int, count: int) -> None:
    """Batch ``source``'s rows into the table, then their row clocks and log rows (ids are consecutive: one writer)."""
    lo = conn.execute("SELECT ifnull(max(ID), 0) FROM T").fetchone()[0]
    conn.execute(f"INSERT INTO T(NAME, AGE, SALARY, CODES) SELECT k, a, b, c FROM {source}")
    conn.execute("INSERT INTO _p2p_rows(tid, pk, hlc, origin, seq) SELECT 1, ID, ?1 + ID, ?2, ?3 + ID FROM T WHERE ID > ?4",
                 (HLC0, ORIGIN, start - lo, lo))
    conn.execute("INSERT INTO _p2p_log(seq, tid, pk, op, hlc, origin) SELECT ?3 + ID, 1, ID, 1, ?1 + ID, ?2 FROM T WHERE ID > ?4",
                 (HLC0, ORIGIN, start - lo, lo))


def receiver_staged(d: Path, shape: str) -> float:
    conn = _receiver_file(d, "staged.db", shape)
    conn.execute("CREATE TEMP TABLE s(k, hlc, a, b, c)")
    t = time.perf_counter()
    conn.execute("BEGIN")
    for start in range(0, N, BATCH):
        conn.executemany("INSERT INTO s VALUES (?, ?, ?, ?, ?)",
                         [(k, HLC0 + start + j, a, b, c) for j, (k, a, b, c) in enumerate(ROWS[start:start + BATCH])])
        _store(conn, "temp.s", start, BATCH)
        conn.execute("DELETE FROM temp.s")
    conn.execute("COMMIT")
    return time.perf_counter() - t


def receiver_image(d: Path, shape: str) -> float:
    conn = _receiver_file(d, "image.db", shape)
    conn.execute("ATTACH ':memory:' AS img")
    conn.execute("CREATE TABLE img.b(n INTEGER PRIMARY KEY, k, hlc, a, b, c)")
    conn.executemany("INSERT INTO img.b VALUES (?, ?, ?, ?, ?, ?)", [(i, k, HLC0 + i, a, b, c) for i, (k, a, b, c) in enumerate(ROWS)])
    t = time.perf_counter()
    conn.execute("BEGIN")
    for start in range(0, N, BATCH):
        _store(conn, f"(SELECT * FROM img.b WHERE n >= {start} AND n < {start + BATCH})", start, BATCH)
    conn.execute("COMMIT")
    return time.perf_counter() - t


def sender(d: Path, _shape: str) -> float:
    conn = _connect(d / "staged.db")  # receiver_staged's file: a table, its row clocks and log
    t = time.perf_counter()
    cursor = conn.execute("SELECT r.seq, r.hlc, r.origin, x.NAME, x.AGE, x.SALARY, x.CODES FROM _p2p_rows r INDEXED BY _p2p_rows_seq "
                          "JOIN T x ON x.ID = r.pk WHERE r.seq > 0 AND r.tid = 1 ORDER BY r.seq")
    got = 0
    while rows := cursor.fetchmany(BATCH):
        got += len(rows)
    assert got == N, got
    return time.perf_counter() - t


def main() -> None:
    steps: dict[str, Callable[[Path, str], float]] = {
        "raw": raw, "receiver, staged": receiver_staged, "receiver, from an image": receiver_image, "sender": sender,
    }
    for mode, shape in SHAPES.items():
        seconds: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(3):
            with tempfile.TemporaryDirectory(prefix="p2ps-floor-", dir="/tmp") as d:
                for name, step in steps.items():
                    seconds[name].append(step(Path(d), shape))
        base = statistics.median(seconds["raw"])
        print(f"{mode}, {N} rows:")
        for name, runs in seconds.items():
            s = statistics.median(runs)
            print(f"  {name:24s} {s * 1e6 / N:5.2f} us a row  {N / s / 1e3:6.1f}k rows/s  {base / s:4.2f} x raw")
    layouts()


#: What a collaborative receiver writes for each row (round 11): the device table, its row clock
#: (``_p2p_cells`` and its seq index) and the log row — and what it would write with less.
LAYOUTS = {
    "table, row clock, log (today)": ("cells", "log"),
    "table, row clock": ("cells",),
    "table, log": ("log",),
    "table with its clock inline, log": ("inline", "log"),
    "table only": (),
}


def _layout(d: Path, name: str, parts: tuple[str, ...]) -> float:
    """2,000-row batches staged from Python and written as ``parts`` say, a transaction each."""
    conn = _connect(d / f"layout-{len(parts)}-{'-'.join(parts)}.db")
    conn.executescript(capture.SCHEMA_SQL)
    inline = "inline" in parts
    conn.execute("CREATE TABLE T(ID INTEGER PRIMARY KEY, NAME TEXT NOT NULL, AGE INTEGER, SALARY REAL, CODES BLOB"
                 + (", hlc INTEGER, seq INTEGER)" if inline else ")"))
    conn.execute("CREATE TEMP TABLE s(n INTEGER PRIMARY KEY, k, hlc, a, b, c, d)")
    batch = 2 * BATCH
    t = time.perf_counter()
    for start in range(0, N, batch):
        conn.execute("BEGIN")
        conn.execute("DELETE FROM temp.s")
        conn.executemany("INSERT INTO temp.s(k, hlc, a, b, c, d) VALUES (?, ?, ?, ?, ?, ?)",
                         [(start + j + 1, HLC0 + start + j, *row) for j, row in enumerate(ROWS[start:start + batch])])
        conn.execute("INSERT INTO T SELECT k, a, b, c, d" + (", hlc, ?1 + n" if inline else "") + " FROM temp.s ORDER BY n",
                     (start,) if inline else ())
        if "cells" in parts:
            conn.execute("INSERT INTO _p2p_cells(tid, ck, col, hlc, origin, seq) SELECT 2, k, '*', hlc, ?2, ?1 + n FROM temp.s ORDER BY n",
                         (start, ORIGIN))
        if "log" in parts:
            conn.execute("INSERT INTO _p2p_log(seq, tid, pk, op, hlc, origin) SELECT ?1 + n, 2, k, 1, hlc, ?2 FROM temp.s ORDER BY n",
                         (start, ORIGIN))
        conn.execute("COMMIT")
    return time.perf_counter() - t


def layouts() -> None:
    seconds: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for _ in range(3):
        with tempfile.TemporaryDirectory(prefix="p2ps-floor-", dir="/tmp") as d:
            for name, parts in LAYOUTS.items():
                seconds[name].append(_layout(Path(d), name, parts))
    print(f"collaborative receiver by what it writes a row, {N} rows, 2,000-row batches, a transaction each:")
    for name, runs in seconds.items():
        s = statistics.median(runs)
        print(f"  {name:34s} {s * 1e6 / N:5.2f} us a row")


if __name__ == "__main__":
    main()
