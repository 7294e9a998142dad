"""Other processes sharing a store file with the daemon: the busy timeout
lets both sides write, and every change is captured once, stamped in order."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from p2ps_helpers import DaemonProcess, unique

from p2pstore.client import BlockingClient

HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO T(id, who) VALUES (1000, 'holder')")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""

WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
for i in range(int(sys.argv[2]), int(sys.argv[3])):
    conn.execute("INSERT INTO T(id, who) VALUES (?, 'process')", (i,))
"""


@pytest.fixture
def shared_store(api: BlockingClient) -> tuple[str, str]:
    name = unique("outside")
    path = api.call("store.open", store=name)["path"]
    api.call("store.execute", store=name, sql="CREATE TABLE T (id INTEGER PRIMARY KEY, who TEXT)")
    api.call("store.set_distributed_tables", store=name, tables=["T"])
    return name, path


def test_api_write_waits_for_another_process_holding_the_lock(api: BlockingClient, shared_store: tuple[str, str]) -> None:
    name, path = shared_store
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, path, "0.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        api.call("store.insert", store=name, table="T", values={"id": 1, "who": "api"})
        waited = time.monotonic() - start
        assert waited >= 0.2, "the API write should have waited for the other process's lock"
    finally:
        assert holder.wait(timeout=10) == 0
    rows = api.call("store.query", store=name, sql="SELECT id, who FROM T ORDER BY id")["rows"]
    assert rows == [[1, "api"], [1000, "holder"]]


def test_daemon_and_another_process_writing_at_once(api: BlockingClient, shared_daemon: DaemonProcess, shared_store: tuple[str, str]) -> None:
    name, path = shared_store
    n = 150
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path, str(n), str(2 * n)], stderr=subprocess.PIPE, text=True)
    errors: list[BaseException] = []

    def api_writes() -> None:
        try:
            with shared_daemon.client() as c:
                for i in range(n):
                    c.call("store.insert", store=name, table="T", values={"id": i, "who": "api"})
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=api_writes)
    t.start()
    t.join(60)
    _, err = proc.communicate(timeout=60)
    assert not t.is_alive() and not errors, errors
    assert proc.returncode == 0, err
    assert api.call("store.query", store=name, sql="SELECT count(*) FROM T")["rows"] == [[2 * n]]
    # Every row captured (the daemon notices the process's commits by polling), each with its own clock value.
    deadline = time.monotonic() + 5
    while True:
        logged = api.call("store.query", store=name,
                          sql="SELECT count(DISTINCT pk), count(hlc), count(DISTINCT hlc), count(*) FROM _p2p_changes WHERE tbl = 'T'")["rows"][0]
        if logged[0] == 2 * n or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    distinct_keys, stamped, distinct_hlc, total = logged
    assert distinct_keys == 2 * n
    assert stamped == total == distinct_hlc
    # The clock order follows the log order.
    hlcs = [r[0] for r in api.call("store.query", store=name, sql="SELECT hlc FROM _p2p_changes WHERE tbl = 'T' ORDER BY seq")["rows"]]
    assert hlcs == sorted(hlcs)


def test_outside_writes_while_the_store_is_closed_are_caught_up_on_open(api: BlockingClient, shared_store: tuple[str, str]) -> None:
    name, path = shared_store
    api.call("store.close", store=name)
    subprocess.run(["sqlite3", "-cmd", ".timeout 5000", path, "INSERT INTO T(id, who) VALUES (5, 'offline')"], check=True, timeout=30)
    api.call("store.open", store=name)
    row = api.call("store.query", store=name, sql="SELECT op, hlc IS NOT NULL FROM _p2p_changes WHERE tbl = 'T' AND pk = 5")["rows"]
    assert row == [[1, 1]]
