"""Per-peer lag in ``status`` / ``devices.list`` (docs/sync.md, "Lag"), with
two real daemons: rows not yet sent, rows not yet received (from the peer's
offer), the last sync and the throughput, before, during and after a push;
and ``p2pstore status`` (human, --json, --watch --count)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from sync_helpers import (
    SV_REF,
    Node,
    cli,
    link,
    linked_daemons,  # noqa: F401  (fixture)
    setup_employee,
    wait_linked,
    wait_until,
)

COLLAB = {"store": "lag", "bundle": "default"}
#: A's reoffer after local changes comes within REOFFER_INTERVAL_S (2 s); room for a loaded machine.
OFFER_TIMEOUT = 15.0
BIG = 300_000  # (a push of it lasts ~1 s: enough lag samples mid-push)


def setup(node: Node, mode: str) -> dict[str, Any]:
    if mode == "single_version":
        return setup_employee(node)
    node.call("store.open", **COLLAB)
    node.call("store.execute", **COLLAB, sql="CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)")
    node.call("store.set_distributed_tables", **COLLAB, tables=["T"])
    return COLLAB


def insert_many(node: Node, ref: dict[str, Any], n: int, start: int = 1) -> None:
    if ref is SV_REF:
        sql = ("WITH RECURSIVE c(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
               "INSERT INTO EMPLOYEE (NAME, AGE, SALARY) SELECT 'e' || x, x % 90, x * 0.5 FROM c")
    else:
        sql = ("WITH RECURSIVE c(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
               "INSERT INTO T (id, name, n) SELECT x, 'n' || x, x FROM c")
    node.call("store.execute", **ref, sql=sql, params=[start, start + n - 1])


def lag(me: Node, other: Node, ref: dict[str, Any], *, api: Any = None, method: str = "status") -> dict[str, Any] | None:
    """``me``'s lag entry for ``other`` on ``ref``'s store, from ``status`` (or ``devices.list``)."""
    answer = (api or me.api).call(method)
    devices = answer["devices"] if method == "status" else answer
    [device] = [d for d in devices if d["device_id"] == other.id]
    found = [s for s in device["stores"] if (s["bundle"], s["store"]) == (ref["bundle"], ref["store"])]
    return found[0] if found else None


def linked_pair(linked_daemons: Any, mode: str) -> tuple[Node, Node, dict[str, Any]]:
    """Two daemons with the store set up on both *before* they connect, so
    each one's first offer already names it."""
    a, b = linked_daemons(2, schema=True if mode == "single_version" else None, link_all=False)
    ref = setup(a, mode)
    setup(b, mode)
    link(a, b)
    wait_linked([a, b])
    return a, b, ref


@pytest.mark.parametrize("mode", ["collaborative", "single_version"])
def test_status_counts_unsent_and_unreceived_rows_and_the_last_sync(linked_daemons, mode: str) -> None:
    a, b, ref = linked_pair(linked_daemons, mode)
    wait_until(lambda: (e := lag(b, a, ref)) and e["unreceived"] == 0, OFFER_TIMEOUT, "B has A's first offer")
    before = lag(a, b, ref)
    assert before is not None and before["unsent"] == 0 and before["last_sync"] is None and before["rows_per_s"] == 0

    insert_many(a, ref, 300)
    a.call("store.execute", **ref, sql=("UPDATE EMPLOYEE SET AGE = AGE + 1 WHERE AGE < 5" if mode == "single_version"
                                        else "UPDATE T SET n = n + 1 WHERE n < 5"))  # changed again: still one row each
    assert lag(a, b, ref)["unsent"] == 300
    assert lag(a, b, ref, method="devices.list")["unsent"] == 300
    # B learns it from A's next offer (at most every 2 s after A's writes).
    wait_until(lambda: lag(b, a, ref)["unreceived"] == 300, OFFER_TIMEOUT, "B counts 300 rows to receive from A")
    assert lag(b, a, ref)["unsent"] == 0 and lag(a, b, ref)["unreceived"] == 0

    t0 = time.time()
    [result] = a.sync("push", ref, [b]).values()
    # (A row changed again after the first batch was cut is sent twice: once per batch its changes fall in.)
    assert result["code"] == 0 and result["sent"] >= 300, result
    after_a, after_b = lag(a, b, ref), lag(b, a, ref)
    assert after_a["unsent"] == 0 and after_b["unreceived"] == 0
    for entry, direction in ((after_a, "send"), (after_b, "receive")):
        last = entry["last_sync"]
        assert (last["code"], last["name"], last["direction"]) == (0, "SUCCESS", direction), entry
        assert t0 - 1 <= last["at"] <= time.time() + 1 and entry["last_success_at"] == last["at"], entry
        assert entry["syncing"] is False and entry["rows_per_s"] == 0, entry

    # A failed sync is the last sync; the last success stays.
    b.call("store.execute", **ref, sql="DELETE FROM EMPLOYEE WHERE AGE = 1" if mode == "single_version" else "DELETE FROM T WHERE n = 2")
    b.stop()
    wait_until(lambda: not a.sees_online(b), 20, "A sees B offline")
    [result] = a.sync("push", ref, [b]).values()
    assert result["code"] == 2, result  # OFFLINE
    entry = lag(a, b, ref)
    assert entry is not None and entry["last_sync"]["code"] == 2 and entry["last_sync"]["name"] == "OFFLINE"
    assert entry["last_success_at"] == after_a["last_success_at"]


@pytest.mark.slow
def test_status_during_a_big_push_shows_throughput_and_falling_lag(linked_daemons) -> None:
    a, b, ref = linked_pair(linked_daemons, "collaborative")
    insert_many(a, ref, BIG)
    assert lag(a, b, ref)["unsent"] == BIG
    wait_until(lambda: lag(b, a, ref)["unreceived"] == BIG, OFFER_TIMEOUT, "B counts every row to receive")

    outcome: dict[str, Any] = {}
    pusher = a.client()

    def push() -> None:
        outcome["results"] = pusher.call("store.sync", **ref, mode="push", predicates={"devices": [b.id]})["results"]

    thread = threading.Thread(target=push, daemon=True)
    thread.start()
    watch_a, watch_b = a.client(), b.client()
    samples: list[tuple[dict[str, Any], dict[str, Any]]] = []
    deadline = time.monotonic() + 120
    for _ in range(10_000):
        if not thread.is_alive() or time.monotonic() > deadline:
            break
        samples.append((lag(a, b, ref, api=watch_a), lag(b, a, ref, api=watch_b)))
        time.sleep(0.02)
    thread.join(60)
    assert not thread.is_alive(), "the push did not finish"
    [result] = outcome["results"]
    assert result["code"] == 0 and result["sent"] == BIG, result

    mid = [(sa, sb) for sa, sb in samples if sa["syncing"] and 0 < sa["unsent"] < BIG]
    print(f"{len(samples)} samples, {len(mid)} mid-push; A unsent/rate, B unreceived/rate:",
          [(sa["unsent"], sa["rows_per_s"], sb["unreceived"], sb["rows_per_s"]) for sa, sb in samples[::max(1, len(samples) // 8)]])
    assert len(mid) >= 2, f"too few samples mid-push to judge: {samples[:3]}...{len(samples)}"
    assert any(sa["rows_per_s"] > 0 for sa, _ in mid), mid
    assert any(sb["rows_per_s"] > 0 and sb["syncing"] for _, sb in samples), "B never showed its receiving rate"
    unsent = [sa["unsent"] for sa, _ in mid]
    assert any(later < earlier for earlier, later in zip(unsent, unsent[1:])), unsent
    assert all(later <= earlier for earlier, later in zip(unsent, unsent[1:])), unsent
    unreceived = [sb["unreceived"] for _, sb in samples if sb["syncing"]]
    assert any(0 < u < BIG for u in unreceived) and any(l < e for e, l in zip(unreceived, unreceived[1:])), unreceived

    after_a, after_b = lag(a, b, ref), lag(b, a, ref)
    assert (after_a["unsent"], after_b["unreceived"]) == (0, 0)
    assert after_a["last_sync"]["code"] == 0 and after_b["last_sync"]["code"] == 0
    assert after_a["rows_per_s"] == 0 and not after_a["syncing"]


def test_cli_status_shows_the_lag_table_and_watch_refreshes(linked_daemons) -> None:
    a, b, ref = linked_pair(linked_daemons, "collaborative")
    insert_many(a, ref, 42)
    text = cli(a, "status")
    assert text.returncode == 0, text.stderr
    assert "unsent" in text.stdout and "unreceived" in text.stdout
    [row] = [line for line in text.stdout.splitlines() if line.startswith("      default/lag")]  # the lag table's row
    assert row.split()[1:4] == ["42", "0", "-"] and row.rstrip().endswith("never"), row

    watched = cli(a, "status", "--watch", "--interval", "0.2", "--count", "3", "--json")
    assert watched.returncode == 0, watched.stderr
    frames = [json.loads(line) for line in watched.stdout.splitlines()]
    assert len(frames) == 3
    for frame in frames:
        [device] = [d for d in frame["devices"] if d["device_id"] == b.id]
        assert [(s["store"], s["unsent"]) for s in device["stores"]] == [("lag", 42)]
    human = cli(a, "status", "--watch", "--interval", "0.1", "--count", "2")
    assert human.returncode == 0 and human.stdout.count("      default/lag") == 2, human.stdout
    bad = cli(a, "status", "--count", "2")
    assert bad.returncode == 1 and "--watch" in bad.stderr
    assert cli(a, "status", "--watch", "--interval", "0").returncode == 2
