"""A store restored from its backup rejoins its peers without resurrecting or
losing rows (docs/sync.md, "A store restored from a backup";
store/restore.py): it takes a new incarnation at open and, collaborative,
catches up from a peer before it sends its own rows.

Real daemons on loopback (``linked_daemons``), the backup made by
``p2pstore backup``, the store file replaced by it while the daemon is down.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sync_helpers import (
    SV_REF,
    Node,
    cli,
    linked_daemons,  # noqa: F401  (fixture)
    setup_employee,
    wait_until,
)

SHOP = {"store": "shop"}
NOTE = "CREATE TABLE NOTE (ID INTEGER PRIMARY KEY, BODY TEXT)"


def setup_shop(node: Node) -> Path:
    path = Path(node.call("store.open", **SHOP)["path"])
    node.call("store.execute", **SHOP, sql=NOTE)
    node.call("store.set_distributed_tables", **SHOP, tables=["NOTE"])
    return path


def notes(node: Node, table: str = "NOTE") -> dict[int, str]:
    return {k: v for k, v in node.rows(SHOP, f'SELECT ID, BODY FROM "{table}" ORDER BY ID')}


def copy_of(node: Node, owner: Node) -> dict[int, str]:
    """``node``'s copy of ``owner``'s NOTE rows (its device table for ``owner``)."""
    table = node.call("store.distributed_table_name", **SHOP, device=owner.id, table="NOTE")["table"]
    return notes(node, table)


def ok(results: dict[str, dict[str, Any]], *nodes: Node) -> None:
    for node in nodes:
        assert results[node.id]["code"] == 0, results[node.id]


def back_up(node: Node, ref: dict[str, Any], dest: Path) -> None:
    args = ["backup", "--store", ref["store"], *(("--bundle", ref["bundle"]) if "bundle" in ref else ()), str(dest)]
    done = cli(node, *args)
    assert done.returncode == 0, done.stderr


def restore_file(node: Node, path: Path, backup: Path) -> None:
    """Stop the daemon, put the backup in place of the store file, start it again."""
    node.stop()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, path)
    node.restart()


def test_a_restored_collaborative_store_catches_up_and_resurrects_nothing(linked_daemons, short_tmp: Path) -> None:
    a, b, c = linked_daemons(3)
    path = setup_shop(a)
    setup_shop(b)
    setup_shop(c)
    for i, body in ((1, "one"), (2, "two"), (3, "three")):
        a.call("store.insert", **SHOP, table="NOTE", values={"ID": i, "BODY": body})
    ok(a.sync("push", SHOP, [b, c]), b, c)
    backup = short_tmp / "shop-backup.db"
    back_up(a, SHOP, backup)

    # After the backup: two rows more, one updated, one deleted; B and C have it all.
    a.call("store.insert", **SHOP, table="NOTE", values={"ID": 4, "BODY": "four"})
    a.call("store.insert", **SHOP, table="NOTE", values={"ID": 5, "BODY": "five"})
    a.call("store.update", **SHOP, values={"BODY": "two, edited"}, predicates={"table": "NOTE", "where": [["ID", "=", 2]]})
    a.call("store.delete", **SHOP, predicates={"table": "NOTE", "where": [["ID", "=", 3]]})
    ok(a.sync("push", SHOP, [b, c]), b, c)
    held = {1: "one", 2: "two, edited", 4: "four", 5: "five"}
    assert copy_of(b, a) == copy_of(c, a) == held

    restore_file(a, path, backup)
    wait_until(lambda: a.sees_online(b) and a.sees_online(c) and b.sees_online(a), 15, "a online again")
    a.call("store.open", **SHOP)
    assert notes(a) == {1: "one", 2: "two", 3: "three"}  # the backup's rows
    wait_until(lambda: "starts a new change stream" in a.proc.log(), 5, "A notices the restore at open")

    # Written after the restore, before any sync: kept, and not skipped by peers.
    a.call("store.insert", **SHOP, table="NOTE", values={"ID": 6, "BODY": "six, after the restore"})
    a.call("store.update", **SHOP, values={"BODY": "one, after the restore"}, predicates={"table": "NOTE", "where": [["ID", "=", 1]]})

    # Until it has caught up, A serves no pull of its rows.
    pulled = b.sync("pull", SHOP, [a])[a.id]
    assert pulled["code"] == 16 and "restored from a backup" in pulled["message"], pulled

    # A push catches up first (from B), then sends.
    ok(a.sync("push", SHOP, [b]), b)
    wait_until(lambda: "caught up from" in a.proc.log(), 10, "A logs its catch-up")
    expected = {1: "one, after the restore", 2: "two, edited", 4: "four", 5: "five", 6: "six, after the restore"}
    assert notes(a) == expected  # the later rows back, the deleted row still deleted, the new writes kept
    assert copy_of(b, a) == expected
    ok(a.sync("push", SHOP, [c]), c)
    assert copy_of(c, a) == expected  # nothing resurrected on a third peer either
    ok(b.sync("pull", SHOP, [a]), a)
    assert copy_of(b, a) == expected

    # And from now on A is an ordinary device of its new incarnation.
    a.call("store.insert", **SHOP, table="NOTE", values={"ID": 7, "BODY": "seven"})
    ok(a.sync("push", SHOP, [b, c]), b, c)
    assert copy_of(b, a) == copy_of(c, a) == notes(a) == {**expected, 7: "seven"}
    assert "was restored" not in a.proc.log().split("caught up from", 1)[1]


def test_a_restored_collaborative_store_catches_up_when_a_peer_comes_online(linked_daemons, short_tmp: Path) -> None:
    a, b = linked_daemons(2)
    path = setup_shop(a)
    setup_shop(b)
    a.call("store.insert", **SHOP, table="NOTE", values={"ID": 1, "BODY": "one"})
    ok(a.sync("push", SHOP, [b]), b)
    backup = short_tmp / "shop-backup.db"
    back_up(a, SHOP, backup)
    a.call("store.insert", **SHOP, table="NOTE", values={"ID": 2, "BODY": "two"})
    ok(a.sync("push", SHOP, [b]), b)

    b.stop()
    restore_file(a, path, backup)
    a.call("store.open", **SHOP)
    assert notes(a) == {1: "one"}
    b.restart()
    wait_until(lambda: a.sees_online(b), 15, "b online again")
    b.call("store.open", **SHOP)
    # Nobody asks: A catches up by itself once B is there.
    wait_until(lambda: notes(a) == {1: "one", 2: "two"}, 20, "A gets row 2 back from B")


def sv_rows(node: Node) -> dict[str, Any]:
    return {n: age for n, age in node.rows(SV_REF, "SELECT NAME, AGE FROM EMPLOYEE ORDER BY NAME")}


def test_a_restored_single_version_store_lets_newer_values_and_deletes_win(linked_daemons, short_tmp: Path) -> None:
    a, b, c = linked_daemons(3, schema=True)
    path = Path(setup_employee(a) and a.call("store.open", **SV_REF)["path"])
    setup_employee(b)
    setup_employee(c)
    for name in ("kept", "edited", "deleted"):
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": 1})
    ok(a.sync("push", SV_REF, [b, c]), b, c)
    backup = short_tmp / "sv-backup.db"
    back_up(a, SV_REF, backup)

    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "later", "AGE": 2})
    a.call("store.update", **SV_REF, values={"AGE": 30}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "edited"]]})
    a.call("store.delete", **SV_REF, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "deleted"]]})
    ok(a.sync("push", SV_REF, [b, c]), b, c)
    expected = {"kept": 1, "edited": 30, "later": 2}
    assert sv_rows(b) == sv_rows(c) == expected

    restore_file(a, path, backup)
    wait_until(lambda: a.sees_online(b) and a.sees_online(c) and b.sees_online(a), 15, "a online again")
    a.call("store.open", **SV_REF)
    assert sv_rows(a) == {"kept": 1, "edited": 1, "deleted": 1}
    # Written after the restore, before any sync, and past the seqs the peers
    # hold: the same seqs as the lost history's, in the old stream.
    later = {f"after-restore-{i}": 5 for i in range(4)}
    for name, age in later.items():
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": age})

    # The first push of the new incarnation is read from seq 0 (nothing skipped);
    # the restored old cells lose to what the peers hold.
    ok(a.sync("push", SV_REF, [b, c]), b, c)
    expected.update(later)
    assert sv_rows(b) == sv_rows(c) == expected
    ok(a.sync("pull", SV_REF, [b, c]), b, c)
    assert sv_rows(a) == expected  # the update wins, the delete stays
    for node in (b, c):
        ok(node.sync("pull", SV_REF, [a]), a)
    assert sv_rows(a) == sv_rows(b) == sv_rows(c) == expected
