"""Versions (store/versions.py), the revision comparison peers are shown
(evolutions.compare), and the store's evolution state that sync checks
(issue 12 items 2 and 3), on real stores."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2pstore.errors import EvolutionFailed, EvolutionInconsistent, InvalidParams
from p2pstore.protocol.table_type import TableType
from p2pstore.store import versions
from p2pstore.store.database import Store
from p2pstore.store.evolutions import compare, parse

ONE = "-- Items\n-- !Ups\nCREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT);\nCREATE INDEX t_name ON T(name);\n"
TWO = "-- Price\n-- !Ups\nALTER TABLE T ADD COLUMN price REAL;\n"
THREE = "-- Notes\n-- !Ups\nCREATE TABLE notes (n TEXT);\nUPDATE T SET price = 0;\n"
BROKEN = "-- Broken\n-- !Ups\nINSERT INTO nowhere VALUES (1);\n"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "shop.db", bundle="default", name="shop")
    yield s
    await s.close()


async def test_each_applied_evolution_is_a_version_and_diff_names_what_changed(store: Store) -> None:
    scripts = [parse(1, ONE), parse(2, TWO)]
    assert await store.apply_evolutions(scripts) == [1, 2]
    found = await store.versions()
    assert [(v["id"], v["kind"], v["ref"], v["description"]) for v in found] == [(1, "evolution", 1, "Items"), (2, "evolution", 2, "Price")]
    assert "CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT)" in found[0]["schema_sql"]
    assert "CREATE INDEX t_name ON T(name)" in found[0]["schema_sql"]
    assert "_p2p_" not in found[1]["schema_sql"], "the store's own tables are not the application's schema"
    assert found[0]["hash"] != found[1]["hash"] and len(found[1]["hash"]) == 40

    d = await store.versions_diff(1, 2)
    assert d["columns_added"] == [{"table": "T", "column": "price", "type": "REAL"}]
    assert d["tables_added"] == d["tables_removed"] == d["columns_removed"] == d["types_changed"] == []
    back = await store.versions_diff(2, 1)
    assert back["columns_removed"] == [{"table": "T", "column": "price", "type": "REAL"}]
    assert (await store.versions_diff(2, None))["columns_added"] == [], "version 2 is the schema now"
    with pytest.raises(InvalidParams, match="no version 9"):
        await store.versions_diff(9, None)


async def test_a_step_that_leaves_the_schema_as_it_was_records_no_version(store: Store) -> None:
    await store.apply_evolutions([parse(1, ONE)])
    data_only = parse(2, "-- Data\n-- !Ups\nINSERT INTO T(name) VALUES ('x');\n")
    await store.apply_evolutions([parse(1, ONE), data_only])
    assert [v["ref"] for v in await store.versions()] == [1]


async def test_distributing_then_evolving_shows_sync_columns_in_the_diff(store: Store) -> None:
    await store.apply_evolutions([parse(1, ONE)])
    await store.set_distributed_tables(["T"], table_type=TableType.COLLABORATIVE)
    await store.apply_evolutions([parse(1, ONE), parse(2, TWO), parse(3, THREE)])
    v = await store.versions()
    assert v[-1]["sync"] == {"T": {"sync_columns": ["id", "name", "price"], "conflict_column": None}}
    d = await store.versions_diff(1, v[-1]["id"])
    assert d["distributed_added"] == ["T"] and d["tables_added"] == ["notes"]


def test_diff_sync_compares_sync_columns_and_conflict_columns() -> None:
    mine = {"E": {"sync_columns": ["NAME", "AGE"], "conflict_column": "NAME"}, "gone": {"sync_columns": ["a"], "conflict_column": None}}
    theirs = {"E": {"sync_columns": ["NAME", "AGE", "DEPT"], "conflict_column": "CODE"}, "new": {"sync_columns": ["b"], "conflict_column": None}}
    d = versions.diff_sync(mine, theirs)
    assert d == {
        "distributed_added": ["new"], "distributed_removed": ["gone"],
        "sync_columns_added": [{"table": "E", "column": "DEPT"}], "sync_columns_removed": [],
        "conflict_column_changed": [{"table": "E", "from": "NAME", "to": "CODE"}],
    }


def test_the_hash_does_not_depend_on_the_order_things_were_made_in() -> None:
    a = versions.digest({"T": [["id", "INTEGER"]], "U": [["x", ""]]}, {"T": {"sync_columns": ["id"], "conflict_column": None}})
    b = versions.digest({"U": [["x", ""]], "T": [["id", "INTEGER"]]}, {"T": {"conflict_column": None, "sync_columns": ["id"]}})
    assert a == b


@pytest.mark.parametrize(("mine", "theirs", "state"), [
    ([], [], "same"),
    ([(1, "a" * 40), (2, "b" * 40)], [(1, "a" * 40), (2, "b" * 40)], "same"),
    ([(1, "a" * 40), (2, "b" * 40)], [(1, "a" * 40)], "behind"),
    ([(1, "a" * 40)], [(1, "a" * 40), (2, "b" * 40)], "ahead"),
    ([], [(1, "a" * 40)], "ahead"),
    ([(1, "a" * 40), (2, "b" * 40)], [(1, "a" * 40), (2, "c" * 40)], "diverged"),
    ([(1, "a" * 40), (2, "b" * 40)], [(1, "a" * 40), (3, "c" * 40)], "diverged"),  # neither is a prefix of the other
])
def test_where_a_peer_stands(mine: list[tuple[int, str]], theirs: list[tuple[int, str]], state: str) -> None:
    assert compare(mine, theirs) == state


async def test_the_store_keeps_its_applied_revisions_and_whether_it_is_inconsistent(store: Store) -> None:
    seen: list[tuple[tuple[int, str], ...]] = []
    store.on_offer_changed = lambda s: seen.append(s.revisions)
    await store.apply_evolutions([parse(1, ONE)])
    assert [r for r, _ in store.revisions] == [1] and seen == [store.revisions]
    store.require_consistent()  # nothing half-applied

    with pytest.raises(EvolutionFailed):
        await store.apply_evolutions([parse(1, ONE), parse(2, BROKEN)])
    assert store.inconsistent is not None and store.inconsistent[0] == 2
    with pytest.raises(EvolutionInconsistent, match="evolution revision 2 is applying_up") as info:
        store.require_consistent()
    assert info.value.data["revision"] == 2
    assert len(seen) == 1, "a failed revision does not change what peers are shown"

    assert await store.resolve_evolution(2) == "applied"
    store.require_consistent()
    assert [r for r, _ in store.revisions] == [1, 2] and len(seen) == 2


async def test_a_reopened_store_knows_its_revisions(tmp_path: Path) -> None:
    s = await Store.open(tmp_path / "x.db", bundle="default", name="x")
    await s.apply_evolutions([parse(1, ONE)])
    await s.close()
    s = await Store.open(tmp_path / "x.db", bundle="default", name="x")
    try:
        assert [r for r, _ in s.revisions] == [1] and s.inconsistent is None
    finally:
        await s.close()
