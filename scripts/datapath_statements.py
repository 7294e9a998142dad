"""Seconds per SQL statement of the sync data path, in one process.

The ``datapath`` bench's rows (written by another connection, random uuid
keys) read by A and applied by B batch by batch, with the daemon's batch
size and file settings, through ``tests/store/replicas.py``; every
statement either connection runs is timed and the top ones printed. It
says which statement a change to ``store/`` should look at, where py-spy
(without ``--native``) only names the Python line.

    .venv/bin/python scripts/datapath_statements.py [sv|collab] [ROWS]

Environment: ``ROWS`` / ``BYTES`` a batch's bounds, ``GROUP`` batches B
applies in one transaction (the daemon's group commit; default 1),
``WAL_PAGES`` the checkpoint interval, ``COMPACT`` (with ``GROUP``) the
log compaction a large group does.
"""

from __future__ import annotations

import collections
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "tests" / "store")]

import bench  # noqa: E402
from replicas import Replica, field, schema_doc  # noqa: E402

from p2pstore.protocol.messages import pack_values, unpack  # noqa: E402
from p2pstore.store import capture, changes, database  # noqa: E402
from p2pstore.sync.engine import DEFAULT_BATCH_ROWS, MAX_BATCH_BYTES  # noqa: E402

SECONDS: collections.Counter[str] = collections.Counter()
CALLS: collections.Counter[str] = collections.Counter()


class Timed:
    """A connection whose execute/executemany are timed by statement text."""

    def __init__(self, conn: sqlite3.Connection, side: str) -> None:
        self._conn, self._side = conn, side

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def _timed(self, how: str, sql: str, *args: Any) -> Any:
        key = f"{self._side} " + " ".join(str(sql).split())[:110]
        t = time.perf_counter()
        try:
            return getattr(self._conn, how)(sql, *args)
        finally:
            SECONDS[key] += time.perf_counter() - t
            CALLS[key] += 1

    def execute(self, sql: str, *args: Any) -> Any:
        return self._timed("execute", sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        return self._timed("executemany", sql, *args)


def main() -> None:
    single_version = (sys.argv[1] if len(sys.argv) > 1 else "sv") == "sv"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    root = Path(tempfile.mkdtemp(prefix="p2ps-statements-", dir="/tmp"))
    try:
        doc = schema_doc({bench._OUTSIDE_TABLE: ([field(c, t, pk=pk, not_null=nn, autoinc=ai)
                                                  for c, t, pk, nn, ai in bench._EMPLOYEE_DOC_FIELDS],
                                                 ["NAME", "AGE", "SALARY", "CODES"])})
        a, b = Replica(root / "a.db", "DEVA"), Replica(root / "b.db", "DEVB")
        for r in (a, b):  # the daemon's settings (Replica's are a test's)
            r.conn.execute("PRAGMA synchronous = NORMAL")
            r.conn.execute(f"PRAGMA cache_size = {-database.CACHE_KIB}")
            r.conn.execute(f"PRAGMA wal_autocheckpoint = {int(os.environ.get('WAL_PAGES', database.WAL_CHECKPOINT_PAGES))}")
            r.conn.execute(f"PRAGMA journal_size_limit = {database.WAL_KEEP_BYTES}")
            r.write(f"CREATE TABLE {bench._OUTSIDE_TABLE} {bench._OUTSIDE_SHAPE}")
            r.make_distributed(bench._OUTSIDE_TABLE, doc=doc if single_version else None)
        bench._outside_write(root / "a.db", n, 11, False)
        a.conn, b.conn = Timed(a.conn, "A"), Timed(b.conn, "B")  # type: ignore[assignment]
        since, read_s, apply_s = 0, 0.0, 0.0
        group, held = int(os.environ.get("GROUP", 1)), 0  # batches B applies in one transaction
        while True:
            t = time.perf_counter()
            batch = a.read(since, limit=int(os.environ.get("ROWS", DEFAULT_BATCH_ROWS)), max_bytes=int(os.environ.get("BYTES", MAX_BATCH_BYTES)))
            read_s += time.perf_counter() - t
            batch = changes.batch_from_plain(unpack(pack_values(changes.batch_to_plain(batch)), "batch", raw_text=True))
            t = time.perf_counter()
            if group > 1 and held == 0:
                b.conn.execute("BEGIN IMMEDIATE")
            b.apply(batch, a.id)
            held += 1
            if group > 1 and (held == group or not batch.more):
                if os.environ.get("COMPACT"):  # what Store.apply_changes_group adds to a large group
                    capture.compact(b.conn, b.state, chunk=2 * held * batch.count, keep_recent=capture.COMPACT_KEEP_RECENT, sweep=False)
                b.conn.execute("COMMIT")
                held = 0
            apply_s += time.perf_counter() - t
            since = batch.last_seq
            if not batch.more:
                break
        print(f"{'single_version' if single_version else 'collaborative'}, {n} rows: A read {read_s:.2f} s, B apply {apply_s:.2f} s")
        for key, seconds in SECONDS.most_common(int(os.environ.get("TOP", 14))):
            print(f"{seconds:6.2f} s {CALLS[key]:5d}x  {key}")
        for side in "AB":
            mine = [k for k in SECONDS if k.startswith(side + " ")]
            print(f"{side}: {sum(CALLS[k] for k in mine)} statements, {sum(SECONDS[k] for k in mine):.2f} s; "
                  f"{sum(CALLS[k] for k in mine if SECONDS[k] / CALLS[k] < 1e-4)} of them under 0.1 ms each, "
                  f"{sum(SECONDS[k] for k in mine if SECONDS[k] / CALLS[k] < 1e-4):.3f} s in all")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
