"""TEXT that is not valid UTF-8 (another program wrote ``CAST(X'FF' AS
TEXT)``): read faithfully, carried byte-exact through the wire form, stored
on the receiver with the same bytes and type; a row keyed by such text stays
on the sender (logged) and every other row syncs.

Real SQLite files (``replicas.Replica``); the bad values are written by
another connection, as another program would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from replicas import Replica, field, replica_maker, schema_doc

from p2pstore.store import changes, merge

ITEMS = "CREATE TABLE items(id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL UNIQUE, a INTEGER, b TEXT)"
ITEMS_DOC = schema_doc({"items": ([
    field("id", "Integer", autoinc=True), field("uid", "Text", pk=True, not_null=True), field("a", "Integer"), field("b", "Text"),
], ["uid", "a", "b"])})
NOTES = "CREATE TABLE notes(id TEXT PRIMARY KEY, body TEXT, n INTEGER)"
BAD = "CAST(X'41FF42' AS TEXT)"  # 'A', an invalid byte, 'B'


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    with replica_maker(tmp_path, ITEMS, ITEMS_DOC, NOTES) as make:
        yield make


def outside(r: Replica, sql: str) -> None:
    with r.outside() as other:
        other.execute(sql)


def table_of(r: Replica, kind: str, sender: str) -> str:
    return "items" if kind == "single_version" else f'"dev_{sender}_notes"'


def raw(r: Replica, table: str, key_col: str, key: str, col: str) -> tuple[str, str]:
    """typeof and hex of one stored value (SQL only: no decoding in Python)."""
    (found,) = r.rows(f"SELECT typeof({col}), hex({col}) FROM {table} WHERE {key_col} = ?", (key,))
    return found


@pytest.mark.parametrize("kind", ["single_version", "collaborative"])
def test_invalid_utf8_text_syncs_byte_identical_and_every_other_row_too(device, kind: str) -> None:
    a, b = device("DEVA", kind), device("DEVB", kind)
    if kind == "single_version":
        outside(a, f"INSERT INTO items(uid, a, b) VALUES ('bad', 1, {BAD}), ('good', 2, 'fine'), ('é', 3, 'ü')")
        key_col, col, other = "uid", "b", "SELECT uid, a, b FROM {t} WHERE uid != 'bad' ORDER BY uid"
    else:
        outside(a, f"INSERT INTO notes(id, body, n) VALUES ('bad', {BAD}, 1), ('good', 'fine', 2), ('é', 'ü', 3)")
        key_col, col, other = "id", "body", "SELECT id, body, n FROM {t} WHERE id != 'bad' ORDER BY id"
    results = a.push(b)
    assert sum(r.failed for r in results) == 0 and sum(r.applied for r in results) == 3
    t = table_of(b, kind, "DEVA")
    assert raw(b, t, key_col, "bad", col) == ("text", "41FF42")
    assert b.rows(other.format(t=t)) == a.rows(other.format(t="items" if kind == "single_version" else "notes"))
    # A later change of the bad value travels too, and is no conflict.
    outside(a, f"UPDATE {'items SET b' if kind == 'single_version' else 'notes SET body'} = CAST(X'FE00FF' AS TEXT) "
               f"WHERE {key_col} = 'bad'")
    assert sum(r.failed for r in a.push(b)) == 0
    assert raw(b, t, key_col, "bad", col) == ("text", "FE00FF")
    assert merge.conflicts(b.conn) == []
    if kind == "single_version":  # relayed back: a no-op, nothing fails
        assert sum(r.failed for r in b.push(a)) == 0
        assert raw(a, "items", "uid", "bad", "b") == ("text", "FE00FF")


@pytest.mark.parametrize("kind", ["single_version", "collaborative"])
def test_a_row_keyed_by_invalid_utf8_stays_behind_alone_and_is_logged(device, kind: str, caplog) -> None:
    a, b = device("DEVA", kind), device("DEVB", kind)
    if kind == "single_version":
        outside(a, f"INSERT INTO items(uid, a) VALUES ({BAD}, 1), ('good', 2)")
        count = "SELECT count(*) FROM items"
    else:
        outside(a, f"INSERT INTO notes(id, body) VALUES ({BAD}, 'x'), ('good', 'y')")
        count = 'SELECT count(*) FROM "dev_DEVA_notes"'
    with caplog.at_level(logging.WARNING, logger="p2pstore.store.changes"):
        results = a.push(b)
    assert sum(r.failed for r in results) == 0
    assert b.rows(count) == [(1,)]  # the good row
    assert any("not valid UTF-8" in r.getMessage() and "A\\udcffB" not in r.getMessage() for r in caplog.records)
    # The sender's data is untouched, and a later fix of the key syncs the row.
    key = "uid" if kind == "single_version" else "id"
    outside(a, f"UPDATE {'items' if kind == 'single_version' else 'notes'} SET {key} = 'fixed' WHERE {key} = {BAD}")
    a.push(b)
    assert b.rows(count) == [(2,)]


def test_a_local_invalid_value_on_the_receiver_does_not_stop_its_merges(device) -> None:
    """B holds bad text another program wrote; A's newer edit of that row
    overwrites it, and the lost value is kept byte-exact in the conflict log."""
    a, b = device("DEVA", "single_version"), device("DEVB", "single_version")
    a.write("INSERT INTO items(uid, a, b) VALUES ('x', 1, 'p')")
    a.push(b)
    outside(b, f"UPDATE items SET b = {BAD} WHERE uid = 'x'")
    b.read(0)  # B stamps its outside write
    a.write("UPDATE items SET b = 'q' WHERE uid = 'x'")  # concurrent, newer
    assert sum(r.failed for r in a.push(b)) == 0
    assert b.rows("SELECT b FROM items") == [("q",)]
    assert b.rows("SELECT typeof(losing_value), hex(losing_value) FROM _p2p_conflicts") == [("text", "41FF42")]
    assert sum(r.failed for r in b.push(a)) == 0
    assert a.rows("SELECT b FROM items") == [("q",)]


def test_raw_text_values_survive_the_failure_log(device) -> None:
    a, b = device("DEVA", "single_version"), device("DEVB", "single_version")
    b.write("CREATE UNIQUE INDEX b_once ON items(b)")
    b.write(f"INSERT INTO items(uid, b) VALUES ('mine', {BAD})")
    outside(a, f"INSERT INTO items(uid, b) VALUES ('theirs', {BAD})")
    (result,) = a.push(b)
    assert result.failed == 1
    (failure,) = merge.sync_failures(b.conn)
    assert failure.reason.startswith("constraint:") and failure.change is not None
    (cell,) = [c for c in failure.change.cells if c.column == "b"]
    assert changes.raw_text_bytes(cell.value) == b"A\xffB"  # type: ignore[arg-type]
    b.write("DROP INDEX b_once")
    assert merge.retry_failure(b.conn, b.state, b.clock, failure.id).applied == 1
    assert b.rows("SELECT typeof(b), hex(b) FROM items WHERE uid = 'theirs'") == [("text", "41FF42")]
