"""Auto-sync in a fleet (docs/sync.md, "Auto-sync in a fleet"; issue 15):
bounded relay and anti-entropy, with real daemons on loopback.

- With every device relaying every received change to every peer, one
  single-row insert cost (N-1)^2 sync sessions; with ``relay_fanout = 1``
  it costs at most 2 (N-1), counted by the daemons themselves (``status``
  ``traffic``), and every device still gets the row.
- A device that was down while others wrote converges through anti-entropy
  alone: the writers have no auto-sync (so they push nothing, on reconnect
  or otherwise) and each holds only its own rows, so the returning device
  must pull from each of them, picked at random, interval after interval.
- A push after a local write carries the writer's own changes only; what it
  left out comes in the whole-stream push that follows once the store is
  quiet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sync_helpers import (
    SV_REF,
    Node,
    link,
    linked_daemons,  # noqa: F401  (fixture)
    quiet_sessions,
    setup_employee,
    wait_linked,
    wait_until,
)

N = 5


def config_flag(root: Path, name: str, text: str) -> list[str]:
    path = root / f"{name}-config.toml"
    path.write_text(text, encoding="utf-8")
    return ["--config", str(path)]


def names(node: Node) -> set[str]:
    return {r[0] for r in node.rows(SV_REF, "SELECT NAME FROM EMPLOYEE")}


def test_one_insert_costs_at_most_2_n_minus_1_sessions_and_reaches_everyone(linked_daemons, short_tmp: Path) -> None:
    flags = {i: config_flag(short_tmp, f"n{i}", "relay_fanout = 1\nanti_entropy_interval_s = 0\n") for i in range(N)}
    nodes = linked_daemons(N, schema=True, flags=flags)
    for node in nodes:
        setup_employee(node, auto_sync=True)
    before = quiet_sessions(nodes)
    for k, writer in enumerate(nodes[:3]):
        writer.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": f"one{k}", "AGE": k})
        wait_until(lambda: all(f"one{k}" in names(n) for n in nodes), 10, f"row one{k} on all {N} devices")
        after = quiet_sessions(nodes)
        cost = after - before
        # the writer's N-1 pushes, plus at most one relay by each receiver
        assert N - 1 <= cost <= 2 * (N - 1), f"insert {k}: {cost} sessions (full relay: {(N - 1) ** 2})"
        before = after


def test_a_returning_device_converges_through_anti_entropy_alone(linked_daemons, short_tmp: Path) -> None:
    writers_conf = "relay_fanout = 0\nanti_entropy_interval_s = 0\n"
    flags: dict[int, Any] = {i: config_flag(short_tmp, f"w{i}", writers_conf) for i in range(3)}
    flags[3] = config_flag(short_tmp, "late", "relay_fanout = 0\nanti_entropy_interval_s = 0.3\n")
    *writers, late = linked_daemons(4, schema=True, flags=flags)
    for w in writers:
        setup_employee(w, auto_sync=False)  # they push nothing, ever
    setup_employee(late, auto_sync=True)

    late.stop()
    wait_until(lambda: not any(w.sees_online(late) for w in writers), 15, "the writers see the device gone")
    for i, w in enumerate(writers):
        for k in range(20):
            w.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": f"w{i}-{k}", "AGE": k})
    expected = {f"w{i}-{k}" for i in range(3) for k in range(20)}
    assert all(len(names(w)) == 20 for w in writers)  # nobody pushed anything to anybody

    late.restart()
    wait_until(lambda: all(late.sees_online(w) for w in writers), 15, "the device is back online")
    late.call("store.open", **SV_REF)
    wait_until(lambda: names(late) == expected, 30, "the returning device has every writer's rows", interval=0.1)

    # It pulled (anti-entropy); no writer opened a session to it.
    mine = late.call("status")["traffic"]
    assert mine["sessions_started"] >= 3 and mine["rows_applied"] == len(expected)
    for w in writers:
        [view] = [d for d in w.call("devices.list") if d["device_id"] == late.id]
        assert view["traffic"]["sessions_started"] == 0
        assert view["traffic"]["sessions_served"] >= 1


def test_a_fruitful_anti_entropy_pull_is_followed_by_pulls_from_the_other_holders(linked_daemons, short_tmp: Path) -> None:
    """Pushes missed changes (here: the writers push nothing): after a pull
    that brought some, the device pulls again from a holder it has not asked
    yet, about a second later, instead of waiting an interval for each
    (sync/engine.py ``ANTI_ENTROPY_STREAK``) — so the three writers' rows all
    arrive before a second regular pull could even start."""
    interval = 8.0
    quiet = "relay_fanout = 0\nanti_entropy_interval_s = 0\n"
    flags: dict[int, Any] = {i: config_flag(short_tmp, f"w{i}", quiet) for i in range(3)}
    flags[3] = config_flag(short_tmp, "puller", f"relay_fanout = 0\nanti_entropy_interval_s = {interval}\n")
    *writers, puller = linked_daemons(4, schema=True, flags=flags)
    for i, w in enumerate(writers):
        setup_employee(w, auto_sync=False)  # they push nothing, ever
        for k in range(10):
            w.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": f"w{i}-{k}", "AGE": k})
    setup_employee(puller, auto_sync=True)
    expected = {f"w{i}-{k}" for i in range(3) for k in range(10)}
    wait_until(lambda: names(puller) == expected, 6 * interval, "the puller has every writer's rows", interval=0.1)

    def fruitful_pulls() -> list[dict[str, Any]]:
        return sorted((e for e in puller.call("store.sync_log", **SV_REF, limit=100)
                       if e["kind"] == "anti-entropy" and e["applied"]), key=lambda e: e["at"])

    # A session is logged when it ends, a moment after its rows are in the table.
    wait_until(lambda: len(fruitful_pulls()) >= len(writers), 5, "the last fruitful pull's log entry", interval=0.05)
    pulls = fruitful_pulls()
    assert sorted(e["peer"] for e in pulls) == sorted(w.id for w in writers), pulls  # each writer once
    span_s = (pulls[-1]["at"] - pulls[0]["at"]) / 1000
    # regular pulls come at least 0.75 x the interval apart (ANTI_ENTROPY_JITTER)
    assert span_s < 0.75 * interval, f"the three fruitful pulls took {span_s:.1f} s: {pulls}"


def test_a_push_after_a_write_carries_own_changes_and_a_whole_one_follows(linked_daemons, short_tmp: Path) -> None:
    """A - B - C, A and C strangers, no relay and no anti-entropy: B's push
    after its own write carries B's row only (protocol 4, ``own``), and A's
    row, which B left out, reaches C through the whole-stream push that
    follows once B's store is quiet — the only way it can."""
    flags = {i: config_flag(short_tmp, f"o{i}", "relay_fanout = 0\nanti_entropy_interval_s = 0\n") for i in range(3)}
    a, b, c = linked_daemons(3, schema=True, flags=flags, link_all=False)
    link(a, b)
    link(b, c)
    wait_linked([a, b])
    wait_linked([b, c])
    for node in (a, b, c):
        setup_employee(node, auto_sync=True)
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "fromA", "AGE": 1})
    wait_until(lambda: "fromA" in names(b), 10, "A's row on B")
    b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "fromB", "AGE": 2})
    wait_until(lambda: names(c) == {"fromA", "fromB"}, 15, "both rows on C")
    log = c.proc.log()
    assert f"received 1 change(s) of {SV_REF['bundle']}/{SV_REF['store']} from {b.id} (its own changes, 1 applied" in log, log
