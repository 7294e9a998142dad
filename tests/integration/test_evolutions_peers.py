"""Evolutions between peers, end to end (docs/evolutions.md, docs/api.md
"evolutions.*", "versions.*", "store.sync_log", "devices.list"): real daemons
(subprocesses) linked over TLS on 127.0.0.1, the API and the CLI.

What this file shows, with two real daemons:

1. A store's revisions go pending -> applied; an edited script reads
   ``diverged``; a revision that fails leaves the schema as it was, makes the
   CLI exit 1 and the store *inconsistent*, and while it is, every sync of
   the store answers code 17 (EVOLUTION_INCONSISTENT) whichever side starts
   it; ``evolutions resolve`` clears it and syncing resumes.
2. Peers on different revisions keep syncing (both table types): values of a
   column the receiver lacks are *parked* (not failures), and land there when
   it applies the revision (single_version: and accepts the schema listing
   the column); no conflict, no failure anywhere.
3. ``devices.list`` tells who should upgrade: ``behind`` then ``same``.
4. An evolution that would drop (or rename) a synced column is refused and
   changes nothing, and says why; the column keeps syncing.
5. ``versions diff`` names the column a revision added (API and CLI).
6. Each push leaves one sync-log entry on each side, with the same counts
   (parked too); a push to an offline device is logged with code 2.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sync_helpers import (
    EMPLOYEE,
    SV,
    SV_REF,
    Node,
    cli,
    linked_daemons,  # noqa: F401  (fixture)
    schema_doc,
    wait_until,
    write_schema,
)

from p2pstore.errors import EvolutionDestructive

pytestmark = pytest.mark.timeout(120)

# Sync result codes (docs/sync.md).
SUCCESS, OFFLINE, EVOLUTION_INCONSISTENT = 0, 2, 17

#: A collaborative store (bundle "default").
SHOP = {"store": "shop"}
BUNDLE_OF_SHOP = "default"

# Collaborative scripts: 1 creates T, 2 adds the column b.
T_R1 = "-- Items\n-- !Ups\nCREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER);\n-- !Downs\nDROP TABLE T;\n"
T_R2 = "-- Column b\n-- !Ups\nALTER TABLE T ADD COLUMN b TEXT;\n-- !Downs\nALTER TABLE T DROP COLUMN b;\n"

# Single-version scripts (the seed's store): 1 creates EMPLOYEE, 2 adds DEPT.
SV_R1 = f"-- Employees\n-- !Ups\n{EMPLOYEE};\n"
SV_R2 = "-- Department\n-- !Ups\nALTER TABLE EMPLOYEE ADD COLUMN DEPT TEXT;\n"
DEPT_FIELD = {"columnName": "DEPT", "type": "Text", "primaryKey": False, "notNull": False, "autoIncrement": False}
SV_V1 = schema_doc(1, ("NAME", "AGE", "SALARY", "CODES", "DEPT"), [DEPT_FIELD])


# ---------------------------------------------------------------------------- helpers


def scripts_dir(node: Node, ref: dict[str, Any]) -> Path:
    """``<data dir>/evolutions/<bundle>/<store>/`` of ``node``."""
    return node.proc.data_dir / "evolutions" / ref.get("bundle", BUNDLE_OF_SHOP) / ref["store"]


def write_script(node: Node, ref: dict[str, Any], revision: int, text: str) -> Path:
    directory = scripts_dir(node, ref)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{revision}.sql"
    path.write_text(text, encoding="utf-8")
    return path


def apply(node: Node, ref: dict[str, Any], up_to: int | None = None) -> list[int]:
    params = {**ref, **({"up_to": up_to} if up_to is not None else {})}
    return node.call("evolutions.apply", **params)["applied"]


def states(node: Node, ref: dict[str, Any]) -> list[tuple[int, str]]:
    return [(r["id"], r["state"]) for r in node.call("evolutions.status", **ref)["revisions"]]


def columns(node: Node, ref: dict[str, Any], table: str) -> list[str]:
    return [r[0] for r in node.rows(ref, f"SELECT name FROM pragma_table_info('{table}')")]


def dev_table(node: Node, origin: Node, ref: dict[str, Any] = SHOP, table: str = "T") -> str:
    return node.call("store.distributed_table_name", **ref, device=origin.id, table=table)["table"]


def peer_rows(node: Node, origin: Node, ref: dict[str, Any] = SHOP, table: str = "T") -> list[list[Any]]:
    """``origin``'s rows of ``table`` as ``node`` holds them (none: its device table is not made yet)."""
    name = dev_table(node, origin, ref, table)
    if not node.rows(ref, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]):
        return []
    return node.rows(ref, f'SELECT id, name FROM "{name}" ORDER BY id')


def result_for(results: dict[str, dict[str, Any]], node: Node) -> dict[str, Any]:
    assert list(results) == [node.id], results
    return results[node.id]


def ok(results: dict[str, dict[str, Any]], node: Node) -> dict[str, Any]:
    r = result_for(results, node)
    assert r["code"] == SUCCESS and r["failed"] == 0, r
    return r


def setup_shop(node: Node, revision: int) -> None:
    """Collaborative store ``shop`` at ``revision`` (both scripts on disk, as
    a device that got them but applies them in its own time): revision 1
    creates T, T is distributed, then the rest up to ``revision``."""
    write_script(node, SHOP, 1, T_R1)
    write_script(node, SHOP, 2, T_R2)
    node.call("store.open", **SHOP)
    assert apply(node, SHOP, up_to=1) == [1]
    node.call("store.set_distributed_tables", **SHOP, tables=["T"], config={"auto_sync": False})
    if revision >= 2:
        assert apply(node, SHOP, up_to=revision) == list(range(2, revision + 1))


def evolution_view(viewer: Node, other: Node, ref: dict[str, Any]) -> dict[str, Any] | None:
    """``viewer``'s devices.list ``evolutions`` entry for ``other`` on store ``ref``."""
    view = viewer.view(other) or {}
    bundle = ref.get("bundle", BUNDLE_OF_SHOP)
    return next((e for e in view.get("evolutions") or [] if e["store"] == ref["store"] and e["bundle"] == bundle), None)


def log_entries(node: Node, ref: dict[str, Any], peer: Node) -> list[dict[str, Any]]:
    return node.call("store.sync_log", **ref, device=peer.id)


# ---------------------------------------------------------------------------- modes for test 2


@dataclass(frozen=True)
class Mode:
    """One table type: how a device gets to a revision, writes the row, and reads the new column."""

    name: str
    ref: dict[str, Any]
    setup: Callable[[Node, int], None]
    upgrade: Callable[[Node], None]  # to revision 2 (single_version: and the schema listing the column)
    write: Callable[[Node], None]  # A's row with the new column = 'p'
    new_column_on: Callable[[Node, Node], list[list[Any]]]  # (reader, origin) -> [[value]]
    before_upgrade_on_b: Callable[[Node, Node], None]  # what B holds before its upgrade


def _shop_upgrade(node: Node) -> None:
    assert apply(node, SHOP) == [2]


def _shop_write(node: Node) -> None:
    node.call("store.insert", **SHOP, table="T", values={"id": 1, "name": "x", "qty": 3, "b": "p"})


def _shop_read(reader: Node, origin: Node) -> list[list[Any]]:
    table = "T" if reader is origin else dev_table(reader, origin)
    return reader.rows(SHOP, f'SELECT b FROM "{table}" WHERE id = 1')


def _shop_before(b: Node, a: Node) -> None:
    dev_a = dev_table(b, a)
    assert "b" not in columns(b, SHOP, dev_a), "B at revision 1: its copy of A's T has no column b yet"
    assert b.rows(SHOP, f'SELECT id, name, qty FROM "{dev_a}"') == [[1, "x", 3]], "the row applied without b"


def _sv_setup(node: Node, revision: int) -> None:
    write_script(node, SV_REF, 1, SV_R1)
    write_script(node, SV_REF, 2, SV_R2)
    node.call("store.open", **SV_REF)
    assert apply(node, SV_REF, up_to=1) == [1]
    assert node.call("store.set_distributed_tables", **SV_REF, tables=["EMPLOYEE"], config={**SV, "auto_sync": False})["schema_version"] == 0
    if revision >= 2:
        _sv_upgrade(node)


def _sv_upgrade(node: Node) -> None:
    assert apply(node, SV_REF) == [2]
    write_schema(node.proc.data_dir, SV_V1)
    result = node.call("store.set_distributed_tables", **SV_REF, tables=["EMPLOYEE"], config=SV)
    assert result["schema_version"] == 1, result


def _sv_write(node: Node) -> None:
    node.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "Gus", "AGE": 40, "DEPT": "p"})


def _sv_read(reader: Node, origin: Node) -> list[list[Any]]:
    return reader.rows(SV_REF, "SELECT DEPT FROM EMPLOYEE WHERE NAME = 'Gus'")


def _sv_before(b: Node, a: Node) -> None:
    assert "DEPT" not in columns(b, SV_REF, "EMPLOYEE"), "B at revision 1 has no DEPT yet"
    assert b.rows(SV_REF, "SELECT NAME, AGE FROM EMPLOYEE") == [["Gus", 40]], "the row applied without DEPT"


MODES = [
    Mode("collaborative", SHOP, setup_shop, _shop_upgrade, _shop_write, _shop_read, _shop_before),
    Mode("single_version", SV_REF, _sv_setup, _sv_upgrade, _sv_write, _sv_read, _sv_before),
]


# ---------------------------------------------------------------------------- 1. states, failure, code 17, resolve


def test_a_failed_revision_makes_every_sync_of_the_store_answer_17_until_resolved(linked_daemons) -> None:
    a, b = linked_daemons(2)
    for node in (a, b):
        setup_shop(node, revision=2)
    status = a.call("evolutions.status", **SHOP)
    assert status["directory"] == str(scripts_dir(a, SHOP))
    assert [(r["id"], r["state"], r["description"]) for r in status["revisions"]] == [(1, "applied", "Items"), (2, "applied", "Column b")]
    assert status["inconsistent"] is False

    # An applied script edited afterwards reads diverged (and applied again once restored).
    write_script(a, SHOP, 2, T_R2.replace("ADD COLUMN b TEXT;", "ADD COLUMN b TEXT;\nUPDATE T SET b = 'edited';"))
    diverged = a.call("evolutions.status", **SHOP)["revisions"][1]
    assert diverged["state"] == "diverged" and diverged["hash"] != diverged["stored_hash"], diverged
    write_script(a, SHOP, 2, T_R2)
    assert states(a, SHOP) == [(1, "applied"), (2, "applied")], "the original script is the applied one again"

    a.call("store.insert", **SHOP, table="T", values={"id": 1, "name": "a1", "qty": 1, "b": "x"})
    b.call("store.insert", **SHOP, table="T", values={"id": 1, "name": "b1", "qty": 1, "b": "y"})
    shape_before = a.rows(SHOP, "SELECT * FROM pragma_table_info('T')")

    # A broken revision 3: the CLI exits 1 naming the problem; the schema is as it was.
    write_script(a, SHOP, 3, "-- Broken\n-- !Ups\nALTER TABLE T ADD COLUMN c TEXT;\nINSERT INTO nowhere VALUES (1);\n")
    failed = cli(a, "evolutions", "apply", "--store", SHOP["store"])
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    assert "EVOLUTION_FAILED" in failed.stderr and "nowhere" in failed.stderr, failed.stderr
    assert a.rows(SHOP, "SELECT * FROM pragma_table_info('T')") == shape_before, "a failed revision is rolled back whole (no column c)"
    status = a.call("evolutions.status", **SHOP)
    assert status["inconsistent"] is True
    (summary,) = [s for s in a.call("status")["stores"] if s["store"] == SHOP["store"]]
    assert (summary["revision"], summary["inconsistent_revision"]) == (2, 3), summary
    assert "INCONSISTENT: evolution 3 failed" in cli(a, "status").stdout
    assert [(r["id"], r["state"]) for r in status["revisions"]] == [(1, "applied"), (2, "applied"), (3, "applying_up")]
    assert "nowhere" in status["revisions"][2]["last_problem"]

    # While inconsistent, a sync of the store answers 17 on both sides: A's push, and B's push to A.
    from_a = result_for(a.sync("push", SHOP, [b]), b)
    assert from_a["code"] == EVOLUTION_INCONSISTENT, f"a push from the inconsistent store: {from_a}"
    to_a = result_for(b.sync("push", SHOP, [a]), a)
    assert to_a["code"] == EVOLUTION_INCONSISTENT, f"a push to the inconsistent store: {to_a}"
    for r in (from_a, to_a):
        assert re.search(r"\b(evolution|revision) 3\b", r["message"]), f"code 17 names the failed revision: {r}"
    assert peer_rows(b, a) == [], "nothing of A's moved to B"
    assert peer_rows(a, b) == [], "nothing of B's moved to A"

    # Repair by hand, then resolve: consistent again, and the next pushes answer 0.
    a.call("store.execute", **SHOP, sql="ALTER TABLE T ADD COLUMN c TEXT")
    resolved = cli(a, "evolutions", "resolve", "--store", SHOP["store"], "3")
    assert resolved.returncode == 0 and "revision 3: applied" in resolved.stdout, (resolved.stdout, resolved.stderr)
    status = a.call("evolutions.status", **SHOP)
    assert status["inconsistent"] is False and states(a, SHOP)[2] == (3, "applied")
    r = ok(a.sync("push", SHOP, [b]), b)
    assert r["applied"] == 1, f"A's row arrives once A is consistent: {r}"
    r = ok(b.sync("push", SHOP, [a]), a)
    assert r["applied"] == 1, f"B's row arrives once A is consistent: {r}"
    assert b.rows(SHOP, f'SELECT id, name, b FROM "{dev_table(b, a)}"') == [[1, "a1", "x"]]
    assert a.rows(SHOP, f'SELECT id, name, b FROM "{dev_table(a, b)}"') == [[1, "b1", "y"]]


# ---------------------------------------------------------------------------- 2. different revisions keep syncing


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_values_of_a_newer_revision_are_parked_then_land_when_the_peer_upgrades(linked_daemons, mode: Mode) -> None:
    schema = schema_doc(0) if mode.ref is SV_REF else None
    a, b = linked_daemons(2, schema=schema)
    mode.setup(a, 2)
    mode.setup(b, 1)
    mode.write(a)

    r = ok(a.sync("push", mode.ref, [b]), b)
    assert r["parked"] >= 1, f"B lacks the column: its value is parked, not failed: {r}"
    assert b.call("store.sync_failures", **mode.ref) == [], "a parked cell is not a sync failure"
    mode.before_upgrade_on_b(b, a)

    mode.upgrade(b)
    assert mode.new_column_on(b, a) == [["p"]], "B's upgrade writes in the value A sent before it"
    for sender, receiver in ((b, a), (a, b)):
        for direction in ("push", "pull"):
            ok(sender.sync(direction, mode.ref, [receiver]), receiver)
    assert mode.new_column_on(a, a) == [["p"]], "A still holds its own value after syncing both ways"
    assert mode.new_column_on(b, a) == [["p"]], "B holds A's value after syncing both ways"
    for node in (a, b):
        assert node.call("store.conflicts", **mode.ref) == [], f"{node}: no conflict logged"
        assert node.call("store.sync_failures", **mode.ref) == [], f"{node}: no sync failure"


# ---------------------------------------------------------------------------- 3. devices.list


def test_devices_list_shows_a_peer_behind_then_the_same_once_it_upgrades(linked_daemons) -> None:
    """No row is written: B's store is offered to A because it became
    distributed (after revision 1, which created its table), and again when
    B applies revision 2."""
    a, b = linked_daemons(2)
    setup_shop(a, 2)
    setup_shop(b, 1)
    behind = wait_until(lambda: (e := evolution_view(a, b, SHOP)) and e["state"] == "behind" and e,
                        10, f"A lists B behind on {SHOP}")
    assert (behind["revision"], behind["peer_revision"]) == (2, 1), behind
    ahead = wait_until(lambda: (e := evolution_view(b, a, SHOP)) and e["state"] == "ahead" and e,
                       10, "B lists A ahead")
    assert (ahead["revision"], ahead["peer_revision"]) == (1, 2), ahead

    assert apply(b, SHOP) == [2]
    same = wait_until(lambda: (e := evolution_view(a, b, SHOP)) and e["state"] == "same" and e,
                      10, "A lists B the same once B applied 2 (offer re-sent)")
    assert (same["revision"], same["peer_revision"]) == (2, 2), same
    wait_until(lambda: (e := evolution_view(b, a, SHOP)) and e["state"] == "same", 10, "B lists A the same")


# ---------------------------------------------------------------------------- 4. forward-only


@pytest.mark.parametrize("ups", ["ALTER TABLE T DROP COLUMN qty;", "ALTER TABLE T RENAME COLUMN qty TO quantity;"],
                         ids=["drop", "rename"])
def test_dropping_a_synced_column_is_refused_and_changes_nothing(linked_daemons, ups: str) -> None:
    a, b = linked_daemons(2)
    setup_shop(a, 2)
    setup_shop(b, 2)
    a.call("store.insert", **SHOP, table="T", values={"id": 1, "name": "x", "qty": 3})
    shape_before = a.rows(SHOP, "SELECT * FROM pragma_table_info('T')")
    write_script(a, SHOP, 3, f"-- Lose qty\n-- !Ups\n{ups}\n")

    with pytest.raises(EvolutionDestructive) as refused:
        apply(a, SHOP)
    message = refused.value.message
    assert refused.value.name == "EVOLUTION_DESTRUCTIVE"
    assert "qty" in message and "sync" in message, f"the error says a column T syncs by, qty, would go: {message}"
    assert a.rows(SHOP, "SELECT * FROM pragma_table_info('T')") == shape_before, "the column is still there"
    assert a.rows(SHOP, "SELECT id, qty FROM T") == [[1, 3]]
    status = a.call("evolutions.status", **SHOP)
    assert states(a, SHOP)[2] == (3, "pending") and status["inconsistent"] is False, status
    text = cli(a, "evolutions", "apply", "--store", SHOP["store"])
    assert text.returncode == 1 and "EVOLUTION_DESTRUCTIVE" in text.stderr and "qty" in text.stderr, text.stderr

    # The column still syncs.
    a.call("store.update", **SHOP, values={"qty": 4}, predicates={"table": "T", "where": [["id", "=", 1]]})
    ok(a.sync("push", SHOP, [b]), b)
    assert b.rows(SHOP, f'SELECT id, qty FROM "{dev_table(b, a)}"') == [[1, 4]]


# ---------------------------------------------------------------------------- 5. versions


def test_versions_diff_names_the_column_a_revision_added(linked_daemons) -> None:
    a, b = linked_daemons(2)
    setup_shop(a, 2)
    found = a.call("versions.list", **SHOP)
    assert [(v["id"], v["kind"], v["ref"], v["description"]) for v in found] == [
        (1, "evolution", 1, "Items"), (2, "evolution", 2, "Column b")], found
    assert found[0]["hash"] != found[1]["hash"]
    assert "b TEXT" not in found[0]["schema_sql"] and "b TEXT" in found[1]["schema_sql"]

    diff = a.call("versions.diff", **SHOP, **{"from": 1, "to": 2})
    assert diff["columns_added"] == [{"table": "T", "column": "b", "type": "TEXT"}], diff
    assert diff["tables_added"] == [] and diff["tables_removed"] == [] and diff["columns_removed"] == [], diff
    assert diff["types_changed"] == [], diff

    text = cli(a, "versions", "diff", "--store", SHOP["store"], "1", "2")
    assert text.returncode == 0, text.stderr
    assert "+ column T.b TEXT" in text.stdout.splitlines(), text.stdout
    as_json = json.loads(cli(a, "versions", "diff", "--store", SHOP["store"], "1", "2", "--json").stdout)
    assert as_json["columns_added"] == diff["columns_added"]


# ---------------------------------------------------------------------------- 6. sync log


def test_one_push_leaves_one_log_entry_on_each_side_with_the_same_counts(linked_daemons) -> None:
    a, b = linked_daemons(2)
    setup_shop(a, 2)
    setup_shop(b, 1)
    for i in (1, 2):
        a.call("store.insert", **SHOP, table="T", values={"id": i, "name": f"a{i}", "qty": i, "b": f"p{i}"})
    mine_before, theirs_before = len(log_entries(a, SHOP, b)), len(log_entries(b, SHOP, a))

    r = ok(a.sync("push", SHOP, [b]), b)
    assert (r["sent"], r["applied"], r["parked"]) == (2, 2, 2), r
    mine = log_entries(a, SHOP, b)
    assert len(mine) == mine_before + 1, "the sender logs one entry per push"
    wait_until(lambda: len(log_entries(b, SHOP, a)) > theirs_before, 10, "B logged the session it served")
    theirs = log_entries(b, SHOP, a)
    assert len(theirs) == theirs_before + 1, "the receiver logs one entry per push"
    sent, received = mine[0], theirs[0]
    assert (sent["direction"], sent["kind"], sent["code"], sent["peer"]) == ("send", "manual", SUCCESS, b.id), sent
    assert (received["direction"], received["kind"], received["code"], received["peer"]) == ("receive", "served", SUCCESS, a.id), received
    counts = ("sent", "applied", "conflicts", "failed", "parked")
    assert [sent[k] for k in counts] == [received[k] for k in counts] == [r[k] for k in counts] == [2, 2, 0, 0, 2], (sent, received)

    b.stop()
    wait_until(lambda: not a.sees_online(b), 10, "A sees B offline")
    assert result_for(a.sync("push", SHOP, [b]), b)["code"] == OFFLINE
    after = log_entries(a, SHOP, b)
    assert len(after) == mine_before + 2, "a push to an offline device is logged too"
    offline = after[0]
    assert (offline["direction"], offline["kind"], offline["code"], offline["sent"]) == ("send", "manual", OFFLINE, 0), offline
