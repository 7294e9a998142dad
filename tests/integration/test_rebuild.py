"""Rebuild vs update (issue 12 item 4), with two real daemons.

- single_version: B's copy of EMPLOYEE is dropped and pulled back from A
  whole; no delete reaches A; refused while B has a local change no peer
  acknowledged, and without the confirmation flag (API and CLI);
- collaborative: B's copy of A's rows (its device table) is dropped and
  pulled back; B's own rows stay.
"""

from __future__ import annotations

import pytest

from sync_helpers import SV_REF, Node, cli, linked_daemons, setup_employee  # noqa: F401  (linked_daemons: a fixture)

from p2pstore.errors import RebuildRefused

COLLAB = {"store": "rb"}
SUCCESS = 0


def employees(node: Node) -> list[list[object]]:
    return node.rows(SV_REF, "SELECT NAME, AGE FROM EMPLOYEE ORDER BY NAME")


def test_a_single_version_table_is_rebuilt_from_its_peer_and_no_delete_travels(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    for node in (a, b):
        setup_employee(node)
    for i, name in enumerate(("Ann", "Bob", "Cid")):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": 20 + i})
    assert a.sync("push", SV_REF, [b])[b.id]["code"] == SUCCESS
    expected = employees(a)

    # B changes a row: not acknowledged by anyone yet, so a rebuild would lose it.
    b.call("store.update", **SV_REF, values={"AGE": 99}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Bob"]]})
    with pytest.raises(RebuildRefused) as info:
        b.call("store.rebuild", **SV_REF, table="EMPLOYEE", yes_destroy_local_data=True)
    assert info.value.data["unsent"] == 1 and "no peer has acknowledged" in info.value.message
    with pytest.raises(RebuildRefused):
        b.call("store.rebuild", **SV_REF, table="EMPLOYEE", yes_destroy_local_data=False)
    assert employees(b)[1] == ["Bob", 99], "a refused rebuild changes nothing"
    assert b.sync("push", SV_REF, [a])[a.id]["code"] == SUCCESS  # now A has it
    expected = employees(a)
    assert expected[1] == ["Bob", 99]

    # B's copy goes wrong behind the daemon's back... and is rebuilt (CLI needs the flag).
    assert cli(b, "rebuild", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"], "--table", "EMPLOYEE").returncode == 2
    done = cli(b, "rebuild", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"], "--table", "EMPLOYEE",
               "--yes-destroy-local-data", "--json")
    assert done.returncode == 0, done.stderr
    assert '"dropped_rows": 3' in done.stdout and a.id in done.stdout
    assert employees(b) == expected, "the pull after the rebuild brought every row back"
    assert b.call("store.sync_failures", **SV_REF) == []

    # Nothing was sent as a delete: a push from B leaves A whole, and a pull keeps B whole.
    assert b.sync("push", SV_REF, [a])[a.id]["code"] == SUCCESS
    assert employees(a) == expected
    assert a.sync("pull", SV_REF, [b])[b.id]["code"] == SUCCESS
    assert employees(a) == expected and employees(b) == expected
    # The rebuilt table keeps capturing: a new local row travels.
    b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Dee", "AGE": 40})
    assert b.sync("push", SV_REF, [a])[a.id]["applied"] == 1
    assert ["Dee", 40] in employees(a)


def test_a_collaborative_rebuild_pulls_other_devices_rows_back_and_keeps_its_own(linked_daemons) -> None:
    a, b = linked_daemons(2)
    for node in (a, b):
        node.call("store.open", **COLLAB)
        node.call("store.execute", **COLLAB, sql="CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT)")
        node.call("store.set_distributed_tables", **COLLAB, tables=["T"])
    for i in range(1, 4):
        a.call("store.insert", **COLLAB, table="T", values={"id": i, "name": f"a{i}"})
    b.call("store.insert", **COLLAB, table="T", values={"id": 1, "name": "b's own"})
    assert a.sync("push", COLLAB, [b])[b.id]["code"] == SUCCESS
    dev_a = b.call("store.distributed_table_name", **COLLAB, device=a.id, table="T")["table"]
    copy = b.rows(COLLAB, f'SELECT id, name FROM "{dev_a}" ORDER BY id')
    assert len(copy) == 3

    result = b.call("store.rebuild", **COLLAB, table="T", yes_destroy_local_data=True)
    assert result["dropped_tables"] == [dev_a] and result["dropped_rows"] == 3
    assert [(r["code"], r["name"]) for r in result["results"]] == [(SUCCESS, "SUCCESS")]
    assert b.rows(COLLAB, f'SELECT id, name FROM "{dev_a}" ORDER BY id') == copy
    assert b.rows(COLLAB, "SELECT id, name FROM T") == [[1, "b's own"]], "the device's own rows are never dropped"
    assert a.rows(COLLAB, "SELECT count(*) FROM T") == [[3]]
