"""Per-peer traffic counters in ``status`` / ``devices.list`` (docs/sync.md,
"Traffic"), with real daemons: sessions, batches, bytes and rows each way,
and rows received that changed nothing (duplicates) — what makes a fleet's
amplification visible (issue 15 item 4) — and the rows a receiver's origin
marks keep from travelling at all (protocol 3, ``have``)."""

from __future__ import annotations

import json
from typing import Any

from sync_helpers import (
    SV_REF,
    Node,
    cli,
    linked_daemons,  # noqa: F401  (fixture)
    setup_employee,
    wait_until,
)

ROWS = 2_500  # more than one batch


def traffic(me: Node, other: Node, *, method: str = "status") -> dict[str, int]:
    answer = me.api.call(method)
    devices = answer["devices"] if method == "status" else answer
    [device] = [d for d in devices if d["device_id"] == other.id]
    return device["traffic"]


def insert(node: Node, n: int, prefix: str) -> None:
    node.call("store.execute", **SV_REF, sql=(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
        "INSERT INTO EMPLOYEE (NAME, AGE, SALARY) SELECT ? || x, x % 90, x * 0.5 FROM c"), params=[n, prefix])


def sync(node: Node, other: Node, mode: str) -> dict[str, Any]:
    [entry] = node.call("store.sync", **SV_REF, mode=mode, predicates={"devices": [other.id]})["results"]
    assert entry["code"] == 0, entry
    return entry


def test_counters_follow_a_push_an_echo_and_a_pull(linked_daemons) -> None:
    a, b, c = linked_daemons(3, schema=True)
    for node in (a, b, c):
        setup_employee(node)
    zero = traffic(a, b)
    assert set(zero) >= {"sessions_started", "sessions_served", "batches_sent", "bytes_sent", "rows_sent",
                         "batches_received", "bytes_received", "rows_received", "rows_applied", "conflicts",
                         "failed", "duplicates_received", "commits_received"}
    assert not any(zero.values())

    insert(a, ROWS, "a")
    sync(a, b, "push")
    sent, got = traffic(a, b), traffic(b, a)
    assert sent["sessions_started"] == 1 and sent["sessions_served"] == 0
    assert got["sessions_served"] == 1 and got["sessions_started"] == 0
    assert sent["rows_sent"] == ROWS == got["rows_received"] == got["rows_applied"]
    assert sent["batches_sent"] == got["batches_received"] >= 2
    assert 1 <= got["commits_received"] <= got["batches_received"]
    assert sent["bytes_sent"] == got["bytes_received"] > ROWS * 10
    assert got["duplicates_received"] == 0 and got["conflicts"] == 0 and got["failed"] == 0
    # devices.list carries the same counters as status
    assert traffic(b, a, method="devices.list") == got

    # B relays A's rows to C, and C pushes them back to B: an echo. B's origin marks say it
    # holds A's rows (it took A's stream whole), so C leaves them out: nothing travels.
    sync(b, c, "push")
    assert traffic(c, b)["rows_applied"] == ROWS
    sync(c, b, "push")
    echo = traffic(b, c)
    assert echo["sessions_served"] == 1 and echo["rows_received"] == echo["duplicates_received"] == 0
    # A pulls from C: A's own rows, which A holds (its own mark): left out too.
    sync(a, c, "pull")
    assert traffic(a, c)["rows_received"] == 0

    # A --refresh pull sends no marks: A's own rows come back, all duplicates.
    [refreshed] = a.call("store.sync", **SV_REF, mode="pull", refresh=True, predicates={"devices": [c.id]})["results"]
    assert refreshed["code"] == 0, refreshed
    pulled = traffic(a, c)
    assert pulled["sessions_started"] == 2 and pulled["rows_applied"] == 0
    assert pulled["duplicates_received"] == pulled["rows_received"] >= ROWS
    assert traffic(c, a)["sessions_served"] == 2 and traffic(c, a)["rows_sent"] == pulled["rows_received"]

    # status sums every device's counters; the CLI prints them per device.
    totals = a.api.call("status")["traffic"]
    assert totals["rows_sent"] == ROWS and totals["sessions_started"] == 3
    out = cli(a, "status")
    assert out.returncode == 0, out.stderr
    assert f"{pulled['duplicates_received']} duplicate(s)" in out.stdout
    assert json.loads(cli(a, "status", "--json").stdout)["traffic"]["duplicates_received"] == pulled["duplicates_received"]
    assert f"{ROWS} applied" in cli(b, "status").stdout


def test_an_auto_push_goes_on_in_its_session_while_writes_keep_coming(linked_daemons) -> None:
    """Coalescing (issue 15 item 2): changes made while an auto push's
    batches are in flight go out in the same session (the sender lingers,
    protocol/sync_session.py) instead of a new session each: more batches
    than sessions. Without lingering every session sends exactly one batch here."""
    a, b = linked_daemons(2, schema=True)
    for node in (a, b):
        setup_employee(node, auto_sync=True)
    writes = 60
    for i in range(writes):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": f"w{i}", "AGE": i})
    wait_until(lambda: b.rows(SV_REF, "SELECT count(*) FROM EMPLOYEE") == [[writes]], 30, "B has every write")
    sent = wait_until(lambda: (t := traffic(a, b))["rows_sent"] == writes and t, 10, "A's counters settle")
    assert sent["batches_sent"] > sent["sessions_started"] >= 1, sent
    assert sent["sessions_started"] < writes, sent
