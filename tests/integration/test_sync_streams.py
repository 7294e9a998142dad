"""A store whose change stream starts over: deleted and created again, or its
file restored from a backup. Peers hold a watermark (a seq of that store)
that the new file is below; without stream IDs they would wait for seqs
they believe they have and silently miss the new rows.

Real daemons on loopback (``linked_daemons``), real files swapped under them.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

from sync_helpers import (
    SV_REF,
    Node,
    linked_daemons,  # noqa: F401  (fixture)
    setup_employee,
    wait_until,
)


def names(node: Node) -> list[str]:
    return [r[0] for r in node.rows(SV_REF, "SELECT NAME FROM EMPLOYEE ORDER BY NAME")]


def insert(node: Node, *names_: str) -> None:
    for name in names_:
        node.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": 1})


def code_of(results: dict[str, dict[str, Any]], node: Node) -> int:
    return results[node.id]["code"]


def remove_store_file(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def test_a_store_deleted_and_created_again_still_reaches_its_peers(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    path = Path(setup_employee(a) and a.call("store.open", **SV_REF)["path"])
    setup_employee(b)
    insert(a, *(f"old{i}" for i in range(6)))
    assert code_of(a.sync("push", SV_REF, [b]), b) == 0
    assert len(names(b)) == 6

    # The application wipes its data on A and starts again with one row.
    a.call("store.close", **SV_REF)
    remove_store_file(path)
    setup_employee(a)
    insert(a, "fresh")
    result = a.sync("push", SV_REF, [b])[b.id]
    assert result["code"] == 0, result
    assert "fresh" in names(b)

    # And by pull, the other way round: B asks with its watermark of A's new stream.
    insert(a, "fresher")
    assert code_of(b.sync("pull", SV_REF, [a]), a) == 0
    assert "fresher" in names(b)


def test_a_store_restored_from_a_backup_still_reaches_its_peers(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    path = Path(setup_employee(a) and a.call("store.open", **SV_REF)["path"])
    setup_employee(b)
    insert(a, "kept")
    assert code_of(a.sync("push", SV_REF, [b]), b) == 0
    backup = path.with_name("backup.db")
    a.call("store.close", **SV_REF)  # the daemon checkpoints and lets go of the file
    with sqlite3.connect(path) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    a.call("store.open", **SV_REF)
    insert(a, *(f"later{i}" for i in range(5)))
    assert code_of(a.sync("push", SV_REF, [b]), b) == 0

    # The disk is restored: A's file is the backup again, behind what B has seen.
    a.stop()
    remove_store_file(path)
    shutil.copy(backup, path)
    a.restart()
    wait_until(lambda: a.sees_online(b) and b.sees_online(a), 10, "a and b online again")
    a.call("store.open", **SV_REF)
    insert(a, "after-restore")
    assert code_of(b.sync("pull", SV_REF, [a]), a) == 0
    assert "after-restore" in names(b)
    wait_until(lambda: "new change stream" in a.proc.log(), 5, "A logs that it starts a new stream")
    # B still has what the backup lacks; A gets it back from B.
    assert code_of(a.sync("pull", SV_REF, [b]), b) == 0
    assert names(a) == names(b) == sorted(["kept", "after-restore", *(f"later{i}" for i in range(5))])
