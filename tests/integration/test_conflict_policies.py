"""Conflict policies (issue 13 items 2 and 3), with two real daemons:

- manual: the reconciler queues a concurrent change instead of applying it,
  is *in conflict* (receives, sends nothing: code 19) until a person
  resolves the entry, and the resolution reaches the other device as an
  ordinary later edit (no conflict logged there);
- priority: concurrent edits end with the favoured device's value on every
  device, whoever wrote later; lww: the later clock wins;
- detect: row logs concurrent edits of different columns (and keeps both)."""

from __future__ import annotations

import json
import time

import pytest

from sync_helpers import SV_REF, cli, linked_daemons, setup_employee, wait_until  # noqa: F401  (linked_daemons: a fixture)

from p2pstore.errors import ConflictNotFound, InvalidDeviceId, InvalidParams

IN_CONFLICT = 19
BOB = [["NAME", "=", "Bob"]]


def age(node, name: str = "Bob") -> int:
    return node.rows(SV_REF, "SELECT AGE FROM EMPLOYEE WHERE NAME = ?", [name])[0][0]


def set_age(node, value: int, name: str = "Bob") -> None:
    node.call("store.update", **SV_REF, values={"AGE": value}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", name]]})


@pytest.mark.parametrize("take", ["remote", "local", "value"])
def test_manual_policy_queues_on_the_reconciler_until_a_person_resolves(linked_daemons, take: str) -> None:
    a, b = linked_daemons(2, schema=True)
    for node in (a, b):
        setup_employee(node)
    sub = b.client()
    sub.call("store.subscribe", **SV_REF, type="conflict")
    for node in (a, b):
        out = cli(node, "conflicts", "policy", "manual", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"],
                  "--table", "EMPLOYEE", "--reconciler", b.id)
        assert out.returncode == 0 and f"reconciler {b.id}" in out.stdout, out
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Bob", "AGE": 40})
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Ann", "AGE": 30})
    assert a.sync("push", SV_REF, [b])[b.id]["code"] == 0

    # Concurrent edits of Bob's AGE; A's push: B queues it and keeps its own value.
    set_age(b, 42)
    set_age(a, 41)
    r = a.sync("push", SV_REF, [b])[b.id]
    assert r["code"] == 0 and r["conflicts"] == 0, r
    assert age(b) == 42, "the reconciler keeps its value while the change waits"
    (entry,) = b.call("conflicts.queue", **SV_REF)
    assert (entry["table"], entry["key"], entry["column"], entry["local_value"], entry["remote_value"]) == ("EMPLOYEE", "Bob", "AGE", 42, 41)
    note = sub.next_notification(timeout=10)
    assert note["method"] == "conflict" and (note["params"]["queued"], note["params"]["device"]) == (1, a.id), note
    listed = json.loads(cli(b, "conflicts", "queue", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"], "--json").stdout)
    assert [e["id"] for e in listed] == [entry["id"]]
    (summary,) = [s for s in b.call("status")["stores"] if s["store"] == SV_REF["store"]]
    assert summary["queued_conflicts"] == 1
    assert "IN CONFLICT: 1 change(s)" in cli(b, "status").stdout

    # In conflict: B receives but sends nothing; A's pushes still succeed.
    r = b.sync("push", SV_REF, [a])[a.id]
    assert (r["code"], r["name"]) == (IN_CONFLICT, "IN_CONFLICT") and "1 change(s)" in r["message"], r
    assert a.sync("pull", SV_REF, [b])[b.id]["code"] == IN_CONFLICT
    set_age(a, 31, "Ann")  # not concurrent with anything on B: applied as usual
    assert a.sync("push", SV_REF, [b])[b.id]["applied"] == 1 and age(b, "Ann") == 31

    with pytest.raises(ConflictNotFound):
        b.call("conflicts.resolve", **SV_REF, id=entry["id"] + 100, take="local")
    with pytest.raises(InvalidParams):
        b.call("conflicts.resolve", **SV_REF, id=entry["id"], take="value")  # no value
    args = ["conflicts", "resolve", str(entry["id"]), "--store", SV_REF["store"], "--bundle", SV_REF["bundle"], "--take", take]
    out = cli(b, *args, *(["--value", "50"] if take == "value" else []))
    assert out.returncode == 0 and "0 still queued" in out.stdout, out
    expected = {"remote": 41, "local": 42, "value": 50}[take]
    assert age(b) == expected and b.call("conflicts.queue", **SV_REF) == []

    before = a.call("store.conflicts", **SV_REF)
    r = b.sync("push", SV_REF, [a])[a.id]
    assert r["code"] == 0 and r["applied"] >= 1, r
    assert age(a) == expected, "the resolution replaces A's value"
    assert a.call("store.conflicts", **SV_REF) == before, "the resolution is an ordinary later edit on A: no conflict logged"
    assert a.sync("push", SV_REF, [b])[b.id]["code"] == 0 and age(b) == expected, "and it stays"


def test_detect_row_queues_concurrent_edits_of_different_columns(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    for node in (a, b):
        setup_employee(node)
        node.call("conflicts.policy", **SV_REF, table="EMPLOYEE", policy="manual", reconciler=b.id, detect="row")
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Bob", "AGE": 40, "SALARY": 1.0})
    assert a.sync("push", SV_REF, [b])[b.id]["code"] == 0
    set_age(b, 42)
    a.call("store.update", **SV_REF, values={"SALARY": 2.0}, predicates={"table": "EMPLOYEE", "where": BOB})
    assert a.sync("push", SV_REF, [b])[b.id]["code"] == 0
    (entry,) = b.call("conflicts.queue", **SV_REF)
    assert (entry["column"], entry["remote_value"]) == ("SALARY", 2.0)
    assert b.rows(SV_REF, "SELECT AGE, SALARY FROM EMPLOYEE") == [[42, 1.0]]
    # A policy that differs between the two is reported.
    a.call("conflicts.policy", **SV_REF, table="EMPLOYEE", policy="lww")
    view = wait_until(lambda: (b.view(a) or {}).get("policy_mismatches"), 10, "B sees A's policy differ")
    assert view[0]["policy"]["kind"] == "manual" and view[0]["peer_policy"]["kind"] == "lww"


def _both_ways(a, b, first) -> None:
    """Push ``first``'s changes to the other, then back, then once more (the arbiter's decision travels)."""
    second = b if first is a else a
    for src, dst in ((first, second), (second, first), (first, second)):
        r = src.sync("push", SV_REF, [dst])[dst.id]
        assert r["code"] == 0, r


def _concurrent_ages(a, b, a_value: int, b_value: int) -> None:
    """A writes, then B, each before seeing the other's: B's clock is the later one."""
    set_age(a, a_value)
    time.sleep(0.005)  # a few ms apart, so B's hybrid clock is later (what lww would keep)
    set_age(b, b_value)


@pytest.mark.parametrize("first", ["a", "b"])
def test_priority_keeps_the_favoured_devices_value_everywhere_and_lww_the_later_one(linked_daemons, first: str) -> None:
    a, b = linked_daemons(2, schema=True)
    for node in (a, b):
        setup_employee(node)
    out = cli(a, "conflicts", "policy", "priority", a.id, "--store", SV_REF["store"], "--bundle", SV_REF["bundle"], "--table", "EMPLOYEE")
    assert out.returncode == 0 and f"priority, in favour of {a.id}" in out.stdout, out
    b.call("conflicts.policy", **SV_REF, table="EMPLOYEE", policy="priority", devices=[a.id])
    wait_until(lambda: not b.call("devices.list")[0].get("policy_mismatches"), 10, "B sees A's policy equal its own")
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Bob", "AGE": 40})
    assert a.sync("push", SV_REF, [b])[b.id]["code"] == 0

    # priority [A]: B's edit is later, yet after syncing both ways (either first) both hold A's.
    _concurrent_ages(a, b, 41, 42)
    _both_ways(a, b, a if first == "a" else b)
    assert age(a) == age(b) == 41
    (logged,) = a.call("store.conflicts", **SV_REF)  # on the arbiter, where it was decided
    assert (logged["column"], logged["losing_value"], logged["winner"], logged["loser"], logged["kind"]) == ("AGE", 42, a.id, b.id, "value")
    assert b.call("store.conflicts", **SV_REF) == [], "B took the decision as an ordinary later edit"

    # lww, as before: the later clock wins.
    for node in (a, b):
        assert cli(node, "conflicts", "policy", "lww", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"],
                   "--table", "EMPLOYEE").returncode == 0
    _concurrent_ages(a, b, 51, 52)
    _both_ways(a, b, a if first == "a" else b)
    assert age(a) == age(b) == 52


def test_detect_row_logs_concurrent_edits_of_different_columns(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    for node in (a, b):
        setup_employee(node)
        out = cli(node, "conflicts", "policy", "lww", "--detect", "row", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"],
                  "--table", "EMPLOYEE")
        assert out.returncode == 0 and "lww, detect row" in out.stdout, out
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Bob", "AGE": 40, "SALARY": 1.0})
    assert a.sync("push", SV_REF, [b])[b.id]["code"] == 0
    set_age(a, 41)
    b.call("store.update", **SV_REF, values={"SALARY": 2.0}, predicates={"table": "EMPLOYEE", "where": BOB})
    _both_ways(a, b, a)
    for node in (a, b):
        assert node.rows(SV_REF, "SELECT AGE, SALARY FROM EMPLOYEE") == [[41, 2.0]], "both edits stay"
    (on_b,) = b.call("store.conflicts", **SV_REF)
    assert (on_b["kind"], on_b["column"], on_b["other_column"], on_b["winner"], on_b["loser"]) == ("row", "AGE", "SALARY", a.id, b.id)
    (on_a,) = a.call("store.conflicts", **SV_REF)
    assert (on_a["kind"], on_a["column"], on_a["other_column"]) == ("row", "SALARY", "AGE")
    out = cli(b, "conflicts", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"])
    assert "row conflict: AGE edited on" in out.stdout and "(both kept)" in out.stdout, out
    # An edit made after seeing the other's is no conflict.
    set_age(b, 43)
    _both_ways(a, b, b)
    assert len(a.call("store.conflicts", **SV_REF)) == len(b.call("store.conflicts", **SV_REF)) == 1


def test_a_policy_is_checked(linked_daemons) -> None:
    (a,) = linked_daemons(1, schema=True)
    setup_employee(a)
    bad = [({"policy": "priority"}, "devices"), ({"policy": "lww", "devices": [a.id]}, "devices"),
           ({"policy": "priority", "devices": [a.id], "reconciler": a.id}, "reconciler"),
           ({"policy": "priority", "devices": [a.id, a.id]}, "listed twice"), ({"policy": "manual"}, "reconciler"),
           ({"policy": "priority", "devices": []}, "devices")]
    for params, what in bad:
        with pytest.raises(InvalidParams, match=what):
            a.call("conflicts.policy", **SV_REF, table="EMPLOYEE", **params)
    with pytest.raises(InvalidDeviceId):
        a.call("conflicts.policy", **SV_REF, table="EMPLOYEE", policy="priority", devices=["not a device"])
    out = cli(a, "conflicts", "policy", "priority", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"], "--table", "EMPLOYEE")
    assert out.returncode == 2 and "priority" in out.stderr, out
    out = cli(a, "conflicts", "policy", "lww", a.id, "--store", SV_REF["store"], "--bundle", SV_REF["bundle"], "--table", "EMPLOYEE")
    assert out.returncode == 2 and "goes with priority" in out.stderr, out
