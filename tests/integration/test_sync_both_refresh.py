"""``sync --both`` and ``--refresh`` (issue 13 item 4, seed 001's gaps), with two real daemons."""

from __future__ import annotations

import json

from sync_helpers import SV_REF, cli, linked_daemons, setup_employee  # noqa: F401  (linked_daemons: a fixture)


def names(node) -> list[str]:
    return [r[0] for r in node.rows(SV_REF, "SELECT NAME FROM EMPLOYEE ORDER BY NAME")]


def test_both_pushes_then_pulls_the_same_selection_and_counts_each_direction(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    for node in (a, b):
        setup_employee(node)
    for name, age in (("Ann", 31), ("Abe", 20)):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": age})
    for name, age in (("Bea", 40), ("Bob", 10)):
        b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": age})

    r = a.sync("both", SV_REF, [b], table="EMPLOYEE", where=[["AGE", ">", 30]])[b.id]
    assert (r["code"], r["name"]) == (0, "SUCCESS"), r
    # (B's stream holds Ann too once it has her — single_version streams relay — but A's origin
    # mark says it holds what it wrote: she is left out, protocol 3.)
    assert (r["push"]["sent"], r["push"]["applied"]) == (1, 1) and (r["pull"]["sent"], r["pull"]["applied"]) == (1, 1), r
    assert names(a) == ["Abe", "Ann", "Bea"] and names(b) == ["Ann", "Bea", "Bob"], "only the selection, both ways"

    out = cli(a, "sync", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"], "--both", "--devices", b.id, "--json")
    assert out.returncode == 0, out
    (entry,) = json.loads(out.stdout)["results"]
    assert entry["push"]["applied"] == 1 and entry["pull"]["applied"] == 1  # Abe went, Bob came
    assert names(a) == names(b) == ["Abe", "Ann", "Bea", "Bob"]
    log = a.call("store.sync_log", **SV_REF, limit=2)
    assert [e["direction"] for e in log] == ["receive", "send"], "one log entry per direction"


def test_refresh_sends_the_selected_rows_again_whatever_the_watermarks(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    for node in (a, b):
        setup_employee(node)
    for i in range(5):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": f"n{i}", "AGE": i})
    assert a.sync("push", SV_REF, [b])[b.id]["sent"] == 5
    assert a.sync("push", SV_REF, [b])[b.id]["sent"] == 0, "the watermark says B has them"
    r = a.call("store.sync", **SV_REF, mode="push", predicates={"devices": [b.id]}, refresh=True)["results"][0]
    assert (r["code"], r["sent"], r["applied"]) == (0, 5, 0), "all again, each a no-op there"
    r = b.call("store.sync", **SV_REF, mode="pull", predicates={"devices": [a.id], "table": "EMPLOYEE",
                                                               "where": [["AGE", ">=", 3]]}, refresh=True)["results"][0]
    assert (r["code"], r["sent"], r["applied"]) == (0, 2, 0), r
    assert b.sync("pull", SV_REF, [a])[a.id]["sent"] == 0, "a refresh never moves a watermark back"
    out = cli(b, "sync", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"], "--pull", "--refresh", "--devices", a.id)
    assert out.returncode == 0 and "pulled 5 change(s)" in out.stdout, out
