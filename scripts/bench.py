"""p2pstore benchmarks: each prints one JSON object; medians of several runs.

capture   insert rate into a distributed table (capture triggers on) divided by
          the rate into a plain table of the same shape, same file settings,
          same run. Goal >= 0.67 (cr-sqlite is about 0.4).
notify    latency from a write to the local_details notification through a
          real daemon: API writes (goal <= 50 ms) and sqlite3-process writes
          (goal <= 200 ms).
api       single-row store.insert calls per second through the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from p2pstore.clock import HybridClock  # noqa: E402
from p2pstore.store import capture  # noqa: E402
from p2pstore.store.tables import read_table_info  # noqa: E402

SHAPE = "(ID INTEGER PRIMARY KEY AUTOINCREMENT, NAME TEXT NOT NULL, AGE INTEGER, SALARY REAL, CODES BLOB)"


def _rows(n: int, start: int = 0) -> list[tuple]:
    return [(f"name-{i}", i % 90, i * 1.5, b"\x01\x02\x03\x04") for i in range(start, start + n)]


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _make_distributed(conn: sqlite3.Connection, table: str) -> capture.CaptureState:
    conn.executescript(capture.SCHEMA_SQL)
    state = capture.CaptureState()
    capture.register_table(conn, state, read_table_info(conn, table), auto_sync=False)
    return state


def _rate(conn: sqlite3.Connection, table: str, rows: list[tuple], per_row_tx: bool) -> float:
    """Rows per second an application writing the file sees."""
    sql = f"INSERT INTO {table}(NAME, AGE, SALARY, CODES) VALUES (?, ?, ?, ?)"
    t0 = time.perf_counter()
    if per_row_tx:
        for row in rows:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql, row)
            conn.execute("COMMIT")
    else:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")
    return len(rows) / (time.perf_counter() - t0)


def _stamp_seconds(conn: sqlite3.Connection, state: capture.CaptureState) -> float:
    """The daemon's share: log appended rows and stamp them, in one transaction."""
    t0 = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    capture.stamp(conn, state, HybridClock(), collect=True)
    conn.execute("COMMIT")
    return time.perf_counter() - t0


def bench_capture(quick: bool) -> dict:
    """Same file, two tables of one shape; runs interleaved so drift hits both."""
    runs = 3 if quick else 7
    bulk_n = 20_000 if quick else 100_000
    single_n = 2_000 if quick else 10_000
    tmp = Path(tempfile.mkdtemp(prefix="p2ps-bench-"))
    results: dict[str, list[float]] = {k: [] for k in ("plain_bulk", "dist_bulk", "plain_tx", "dist_tx", "stamp_bulk", "dist_bulk_e2e")}
    try:
        for r in range(runs):
            path = tmp / f"b{r}.db"
            conn = _connect(path)
            conn.execute(f"CREATE TABLE plain {SHAPE}")
            conn.execute(f"CREATE TABLE dist {SHAPE}")
            state = _make_distributed(conn, "dist")
            # Alternate which table goes first so file growth and cache warmth favour neither.
            if r % 2:
                rate = _rate(conn, "dist", _rows(bulk_n), False)
                results["plain_bulk"].append(_rate(conn, "plain", _rows(bulk_n), False))
            else:
                results["plain_bulk"].append(_rate(conn, "plain", _rows(bulk_n), False))
                rate = _rate(conn, "dist", _rows(bulk_n), False)
            results["dist_bulk"].append(rate)
            stamp_s = _stamp_seconds(conn, state)
            results["stamp_bulk"].append(bulk_n / stamp_s)
            results["dist_bulk_e2e"].append(bulk_n / (bulk_n / rate + stamp_s))
            results["plain_tx"].append(_rate(conn, "plain", _rows(single_n, bulk_n), True))
            results["dist_tx"].append(_rate(conn, "dist", _rows(single_n, bulk_n), True))
            _stamp_seconds(conn, state)
            logged = conn.execute("SELECT count(*), count(hlc) FROM _p2p_changes").fetchone()
            assert logged[0] == logged[1] == bulk_n + single_n, logged
            conn.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    return {
        "bench": "capture",
        "runs": runs,
        "rows_bulk": bulk_n,
        "rows_single_tx": single_n,
        "plain_bulk_rows_per_s": round(med["plain_bulk"]),
        "distributed_bulk_rows_per_s": round(med["dist_bulk"]),
        "ratio_bulk": round(med["dist_bulk"] / med["plain_bulk"], 3),
        "daemon_stamp_rows_per_s": round(med["stamp_bulk"]),
        "distributed_bulk_incl_daemon_stamp_rows_per_s": round(med["dist_bulk_e2e"]),
        "ratio_bulk_incl_daemon_stamp": round(med["dist_bulk_e2e"] / med["plain_bulk"], 3),
        "plain_tx_rows_per_s": round(med["plain_tx"]),
        "distributed_tx_rows_per_s": round(med["dist_tx"]),
        "ratio_single_row_tx": round(med["dist_tx"] / med["plain_tx"], 3),
        "goal_ratio": 0.67,
        "note": "rates an application writing the store file sees; plain = same shape without capture. "
                "incl_daemon_stamp adds the daemon's later logging+stamping of the same rows (done on its own thread).",
    }


class _Daemon:
    def __init__(self, root: Path) -> None:
        self.socket = root / "d.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2pstore", "daemon", "--data-dir", str(root / "data"), "--socket", str(self.socket),
             "--port", "0", "--no-discovery", "--log-level", "warning"],
            cwd=REPO, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("daemon did not start")
            time.sleep(0.02)
        time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def _notify_and_api(root: Path, quick: bool) -> dict:
    from p2pstore.client import Client

    d = _Daemon(root)
    try:
        async with Client(d.socket) as c:
            await c.call("store.open", store="bench")
            await c.call("store.execute", store="bench", sql=f"CREATE TABLE T {SHAPE}")
            await c.call("store.set_distributed_tables", store="bench", tables=["T"])
            await c.call("store.subscribe", store="bench", type="local_details")
            api_lat, out_lat = [], []
            n = 100 if quick else 500
            for i in range(n):
                t0 = time.perf_counter()
                await c.call("store.insert", store="bench", table="T", values={"NAME": f"n{i}"})
                await asyncio.wait_for(c.notifications.get(), 5)
                api_lat.append((time.perf_counter() - t0) * 1000)
            path = root / "data" / "stores" / "default" / "bench.db"
            outside = sqlite3.connect(path, isolation_level=None)
            outside.execute("PRAGMA busy_timeout = 5000")
            for i in range(20 if quick else 100):
                t0 = time.perf_counter()
                outside.execute("INSERT INTO T(NAME) VALUES (?)", (f"o{i}",))
                await asyncio.wait_for(c.notifications.get(), 5)
                out_lat.append((time.perf_counter() - t0) * 1000)
            outside.close()
            m = 1000 if quick else 5000
            t0 = time.perf_counter()
            for i in range(m):
                await c.call("store.insert", store="bench", table="T", values={"NAME": f"r{i}"})
            api_rate = m / (time.perf_counter() - t0)
    finally:
        d.stop()
    return {
        "bench": "notify",
        "api_write_to_notification_ms": {"p50": round(statistics.median(api_lat), 2), "p99": round(_pct(api_lat, 99), 2), "n": len(api_lat)},
        "outside_write_to_notification_ms": {"p50": round(statistics.median(out_lat), 2), "p99": round(_pct(out_lat, 99), 2), "n": len(out_lat)},
        "goal_ms": {"api": 50, "outside": 200},
        "api_single_insert_calls_per_s": round(api_rate),
    }


def bench_notify(quick: bool) -> dict:
    root = Path(tempfile.mkdtemp(prefix="p2ps-bench-", dir="/tmp"))
    try:
        return asyncio.run(_notify_and_api(root, quick))
    finally:
        shutil.rmtree(root, ignore_errors=True)


BENCHES = {"capture": bench_capture, "notify": bench_notify}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rows and runs (a smoke run)")
    parser.add_argument("names", nargs="*", choices=[[], *BENCHES], default=[], metavar="NAME", help=f"one of {', '.join(BENCHES)} (default: all)")
    args = parser.parse_args()
    for name in args.names or list(BENCHES):
        print(json.dumps(BENCHES[name](args.quick)), flush=True)


if __name__ == "__main__":
    main()
