"""Rows with large values (photos, documents): a sync batch is bounded in
bytes as well as in rows, so it always fits in a frame (16 MiB) and the
memory of a sync stays bounded, whatever the rows hold.

Real daemons on loopback (``linked_daemons``); the blobs are written by an
outside process (``sqlite3`` module), as an application storing files would.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from sync_helpers import (
    SV_REF,
    Node,
    linked_daemons,  # noqa: F401  (fixture)
    setup_employee,
)

from p2pstore.errors import ResultTooLarge

COLLAB = {"store": "photos"}
BLOB_SIZE = 200 * 1024
ROWS = 300  # 300 × 200 KiB = 60 MiB: 250 such rows would be a 50 MB batch


def fill(path: str, sql: str, rows: list[tuple[object, ...]]) -> None:
    with sqlite3.connect(path, timeout=10) as conn:
        conn.executemany(sql, rows)


def distribute(a: Node, b: Node, create: str) -> str:
    """The collaborative store on both devices with the one table ``create``
    makes; the path of A's file (for the outside writer)."""
    table = create.split()[2]
    for node in (a, b):
        node.call("store.open", **COLLAB)
        node.call("store.execute", **COLLAB, sql=create)
        node.call("store.set_distributed_tables", **COLLAB, tables=[table], config={"auto_sync": False})
    return str(a.call("store.open", **COLLAB)["path"])


def blob(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (BLOB_SIZE // 32)


def test_collaborative_rows_of_200_kib_each_sync_in_byte_bounded_batches(linked_daemons) -> None:
    a, b = linked_daemons(2)
    path = distribute(a, b, "CREATE TABLE P (id INTEGER PRIMARY KEY, data BLOB)")
    fill(path, "INSERT INTO P(id, data) VALUES (?, ?)", [(i, blob(i)) for i in range(ROWS)])
    result = a.sync("push", COLLAB, [b])[b.id]
    assert result["code"] == 0, result
    assert result["applied"] == ROWS, result
    dev = b.call("store.distributed_table_name", **COLLAB, device=a.id, table="P")["table"]
    got = b.rows(COLLAB, f'SELECT count(*), sum(length(data)) FROM "{dev}"')
    assert got == [[ROWS, ROWS * BLOB_SIZE]]
    assert b.rows(COLLAB, f'SELECT data FROM "{dev}" WHERE id = 123') == [[blob(123)]]


def test_single_version_rows_of_200_kib_each_sync_by_pull(linked_daemons) -> None:
    a, b = linked_daemons(2, schema=True)
    path = Path(setup_employee(a) and a.call("store.open", **SV_REF)["path"])
    setup_employee(b)
    fill(str(path), "INSERT INTO EMPLOYEE(NAME, AGE, CODES) VALUES (?, ?, ?)", [(f"e{i}", i, blob(i)) for i in range(ROWS)])
    result = b.sync("pull", SV_REF, [a])[a.id]
    assert result["code"] == 0, result
    assert b.rows(SV_REF, "SELECT count(*), sum(length(CODES)) FROM EMPLOYEE") == [[ROWS, ROWS * BLOB_SIZE]]


def test_a_row_too_large_for_any_message_fails_the_sync_clearly_after_the_rows_before_it(linked_daemons) -> None:
    a, b = linked_daemons(2)
    path = distribute(a, b, "CREATE TABLE P (id INTEGER PRIMARY KEY, data BLOB)")
    fill(path, "INSERT INTO P(id, data) VALUES (?, ?)", [(i, blob(i)) for i in range(3)])
    fill(path, "INSERT INTO P(id, data) VALUES (?, ?)", [(99, b"\x01" * (17 * 1024 * 1024))])
    result = a.sync("push", COLLAB, [b])[b.id]
    assert result["code"] == 1, result
    assert "table P (key 99)" in result["message"] and "a sync message carries at most" in result["message"], result
    dev = b.call("store.distributed_table_name", **COLLAB, device=a.id, table="P")["table"]
    assert b.rows(COLLAB, f'SELECT id FROM "{dev}" ORDER BY id') == [[0], [1], [2]]
    # Made smaller, it goes through.
    a.call("store.execute", **COLLAB, sql="UPDATE P SET data = zeroblob(1024) WHERE id = 99")
    assert a.sync("push", COLLAB, [b])[b.id]["code"] == 0
    assert b.rows(COLLAB, f'SELECT id, length(data) FROM "{dev}" WHERE id = 99') == [[99, 1024]]


def test_a_remote_query_of_large_rows_arrives_whole_and_a_huge_row_is_a_clear_error(linked_daemons) -> None:
    a, b = linked_daemons(2)
    path = distribute(a, b, "CREATE TABLE P (id INTEGER PRIMARY KEY, data BLOB)")
    fill(path, "INSERT INTO P(id, data) VALUES (?, ?)", [(i, blob(i)) for i in range(120)])  # 24 MiB
    got = b.call("store.remote_query", **COLLAB, device=a.id, table="P", predicates={"order_by": [["id", "asc"]]})
    assert [r[0] for r in got["rows"]] == list(range(120))
    assert all(r[1] == blob(r[0]) for r in got["rows"])
    fill(path, "INSERT INTO P(id, data) VALUES (?, ?)", [(999, b"\x01" * (17 * 1024 * 1024))])
    with pytest.raises(ResultTooLarge) as info:
        b.call("store.remote_query", **COLLAB, device=a.id, table="P", predicates={"where": [["id", ">", 100]]})
    assert "a page carries at most" in info.value.message
    # The answering daemon is fine, and so is a query that leaves the big row out.
    got = b.call("store.remote_query", **COLLAB, device=a.id, table="P", predicates={"where": [["id", "<", 3]]})
    assert len(got["rows"]) == 3


def test_rows_of_multi_byte_text_larger_than_their_stored_length_says_still_sync(linked_daemons) -> None:
    """Batches are sized by SQLite's length(), which counts text in characters:
    100k emoji are 400 KB on the wire, 4 times what length() says — the worst
    case. Such a batch must still fit in a frame (MAX_BATCH_BYTES is chosen so
    that it does)."""
    a, b = linked_daemons(2)
    path = distribute(a, b, "CREATE TABLE D (id INTEGER PRIMARY KEY, body TEXT)")
    text = "📷" * 100_000  # 100k characters, 400 KB of UTF-8
    fill(path, "INSERT INTO D(id, body) VALUES (?, ?)", [(i, f"{i}:{text}") for i in range(100)])  # 40 MB
    result = a.sync("push", COLLAB, [b])[b.id]
    assert result["code"] == 0 and result["applied"] == 100, result
    dev = b.call("store.distributed_table_name", **COLLAB, device=a.id, table="D")["table"]
    assert b.rows(COLLAB, f'SELECT count(*), sum(length(body)) FROM "{dev}"') == [[100, sum(len(f"{i}:{text}") for i in range(100))]]


def test_a_remote_query_over_200k_rows_is_result_too_large_and_a_limit_gets_it(linked_daemons) -> None:
    a, b = linked_daemons(2)
    path = distribute(a, b, "CREATE TABLE N (id INTEGER PRIMARY KEY, v INTEGER)")
    fill(path, "INSERT INTO N(id, v) VALUES (?, ?)", [(i, i) for i in range(200_001)])
    with pytest.raises(ResultTooLarge) as info:
        b.call("store.remote_query", **COLLAB, device=a.id, table="N")
    assert "add a limit and page with offset" in info.value.message
    page = b.call("store.remote_query", **COLLAB, device=a.id, table="N",
                  predicates={"order_by": [["id", "asc"]], "limit": 200_000, "offset": 1})
    assert len(page["rows"]) == 200_000 and page["rows"][0] == [1, 1] and page["rows"][-1] == [200_000, 200_000]
