"""Replica kinds (issue 13 item 1), with two real daemons: a one-way
send/receive pair, ends that do not agree, and a checkout / checkin."""

from __future__ import annotations

import json

import pytest

from sync_helpers import SV_REF, cli, linked_daemons, setup_employee, sqlite3_shell  # noqa: F401  (linked_daemons: a fixture)

from p2pstore.errors import ReadOnlyTable, ReplicaMismatch

SUCCESS, REPLICA_MISMATCH = 0, 18


def store_file(node) -> str:
    return node.call("store.open", **SV_REF)["path"]


def ages(node) -> dict[str, int]:
    return dict(node.rows(SV_REF, "SELECT NAME, AGE FROM EMPLOYEE"))


def test_a_send_receive_pair_moves_rows_one_way_and_the_child_is_read_only(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    for node in (a, b):
        setup_employee(node)
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Ann", "AGE": 31})
    b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Bea", "AGE": 40})  # before B became a child

    # A send with B still two-way: the ends do not agree, nothing moves.
    assert a.call("replica.set", **SV_REF, peer=b.id, kind="send")["kind"] == "send"
    r = a.sync("push", SV_REF, [b])[b.id]
    assert (r["code"], r["name"]) == (REPLICA_MISMATCH, "REPLICA_MISMATCH") and "do not agree" in r["message"], r
    assert "Ann" not in ages(b)

    set_b = cli(b, "replica", "set", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"], "--peer", a.id, "--kind", "receive")
    assert set_b.returncode == 0 and "receive" in set_b.stdout, set_b
    r = a.sync("push", SV_REF, [b])[b.id]
    assert r["code"] == SUCCESS and r["applied"] == 1, r
    assert ages(b)["Ann"] == 31, "the parent's rows arrive"

    # The child's distributed table is read-only to applications: API and an outside sqlite3.
    with pytest.raises(ReadOnlyTable, match="receive replica"):
        b.call("store.update", **SV_REF, values={"AGE": 99}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Ann"]]})
    outside = sqlite3_shell(store_file(b), "UPDATE EMPLOYEE SET AGE = 99 WHERE NAME = 'Ann'")
    assert outside.returncode != 0 and "READ_ONLY_TABLE" in outside.stderr, outside
    assert ages(b)["Ann"] == 31

    # The child does not send: its push, and the parent's pull of it, answer REPLICA_MISMATCH.
    r = b.sync("push", SV_REF, [a])[a.id]
    assert r["code"] == REPLICA_MISMATCH and "does not send" in r["message"], r
    r = a.sync("pull", SV_REF, [b])[b.id]
    assert r["code"] == REPLICA_MISMATCH, r
    assert "Bea" not in ages(a)
    listed = json.loads(cli(b, "replica", "list", "--json").stdout)
    assert listed == [{"store": SV_REF["store"], "bundle": SV_REF["bundle"], "peer": a.id, "kind": "receive"}]
    assert f"replica: receive with {a.id}" in cli(b, "status").stdout

    # Back to two-way on both ends: writable again, and rows go both ways.
    b.call("replica.set", **SV_REF, peer=a.id, kind="two-way")
    a.call("replica.set", **SV_REF, peer=b.id, kind="two-way")
    b.call("store.update", **SV_REF, values={"AGE": 32}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Ann"]]})
    assert b.sync("push", SV_REF, [a])[a.id]["code"] == SUCCESS
    assert ages(a) == {"Ann": 32, "Bea": 40}
    assert b.call("replica.list", **SV_REF) == []


def test_checkout_edit_checkin_once(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    for node in (a, b):
        setup_employee(node)
    for name, age in (("Old1", 50), ("Old2", 60), ("Young", 20)):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": age})

    out = cli(b, "checkout", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"], "--from", a.id,
              "--table", "EMPLOYEE", "--where", "AGE > 30")
    assert out.returncode == 0 and "checked out" in out.stdout, out
    assert ages(b) == {"Old1": 50, "Old2": 60}, "only the selected rows"
    (link,) = b.call("replica.list", **SV_REF)
    assert (link["kind"], link["state"], link["table"]) == ("checkout", "open", "EMPLOYEE")
    for name in ("Old1", "Old2"):
        b.call("store.update", **SV_REF, values={"AGE": 70}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", name]]})

    done = cli(b, "checkin", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"])
    assert done.returncode == 0 and "link is closed" in done.stdout, done
    assert ages(a) == {"Old1": 70, "Old2": 70, "Young": 20}, "the parent has the edits"
    (link,) = b.call("replica.list", **SV_REF)
    assert link["state"] == "closed"

    again = cli(b, "checkin", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"])
    assert again.returncode != 0 and "already checked in" in again.stderr, again
    with pytest.raises(ReplicaMismatch, match="already checked in"):
        b.call("store.checkin", **SV_REF)
    r = b.sync("push", SV_REF, [a])[a.id]
    assert r["code"] == REPLICA_MISMATCH and "closed" in r["message"], r
