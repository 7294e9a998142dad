"""Evolutions (store/evolutions.py): numbered schema scripts applied to a real
store, one transaction each, forward-only for distributed tables (issue 12
item 1: the engine and its Store methods)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from p2pstore.errors import EvolutionDestructive, EvolutionFailed, EvolutionInconsistent, EvolutionInvalid, PermissionDenied
from p2pstore.store.database import Store
from p2pstore.store.evolutions import load_dir, parse, revision_hash, statements

ONE = """-- Create the shop's tables
-- !Ups
CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT);
-- !Downs
DROP TABLE T;
"""
TWO = """-- Add a price
-- !Ups
ALTER TABLE T ADD COLUMN price REAL;
UPDATE T SET price = 1.5;
-- !Downs
ALTER TABLE T DROP COLUMN price;
"""


def write(directory: Path, **scripts: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (directory / f"{name.lstrip('_')}.sql").write_text(text)
    return directory


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "shop.db", bundle="default", name="shop")
    yield s
    await s.close()


async def rows(store: Store, sql: str) -> list[list[Any]]:
    return (await store.query(sql))["rows"]


# -- scripts -----------------------------------------------------------------------


def test_a_script_has_a_description_ups_and_downs() -> None:
    ev = parse(2, TWO)
    assert (ev.id, ev.description) == (2, "Add a price")
    assert statements(ev.ups) == ["ALTER TABLE T ADD COLUMN price REAL;", "UPDATE T SET price = 1.5;"]
    assert statements(ev.downs) == ["ALTER TABLE T DROP COLUMN price;"]


def test_the_hash_is_stable_and_ignores_only_layout() -> None:
    # Pinned: stored hashes must keep matching unchanged scripts in every release.
    assert revision_hash("CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT);", "DROP TABLE T;") == \
        "6bccfe12baccf915b5cd95c48fc71ccf361250d2"
    h = parse(1, ONE).hash
    assert h == revision_hash("CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT);", "DROP TABLE T;")
    assert parse(1, ONE.replace("\n", "\r\n").replace(";", ";   ")).hash == h, "line ends and trailing blanks are layout"
    assert parse(1, ONE.replace("name TEXT", "name  TEXT")).hash != h, "a change inside a line is a change"
    assert parse(1, ONE.replace("DROP TABLE T;", "")).hash != h, "the Downs count"


@pytest.mark.parametrize("text, problem", [
    ("CREATE TABLE x(a);\n-- !Ups\n", "SQL before '-- !Ups'"),
    ("-- just a comment\n", "no '-- !Ups' section"),
    ("-- !Ups\nSELECT 1;\n-- !Ups\n", "a second '-- !Ups'"),
    ("-- !Downs\n-- !Ups\n", "'-- !Ups' must come before '-- !Downs'"),
])
def test_a_malformed_script_names_file_and_line(text: str, problem: str) -> None:
    with pytest.raises(EvolutionInvalid) as caught:
        parse(3, text, "/x/3.sql")
    assert problem in caught.value.message and "/x/3.sql" in caught.value.message


def test_scripts_are_numbered_from_one_without_gaps(tmp_path: Path) -> None:
    assert load_dir(tmp_path / "none") == []
    d = write(tmp_path / "ev", _1=ONE, _3=TWO)
    with pytest.raises(EvolutionInvalid, match="2.sql is missing"):
        load_dir(d)
    (d / "2.sql").write_text("-- !Ups\n")
    (d / "notes.txt").write_text("ignored")
    assert [ev.id for ev in load_dir(d)] == [1, 2, 3]


# -- applying ------------------------------------------------------------------------


async def test_revisions_apply_in_order_each_recorded(store: Store, tmp_path: Path) -> None:
    scripts = load_dir(write(tmp_path / "ev", _1=ONE, _2=TWO))
    assert [r.state for r in await store.evolutions_status(scripts)] == ["pending", "pending"]
    assert await store.apply_evolutions(scripts, up_to=1) == [1]
    assert [r.state for r in await store.evolutions_status(scripts)] == ["applied", "pending"]
    assert await store.apply_evolutions(scripts) == [2]
    assert await store.apply_evolutions(scripts) == []
    status = await store.evolutions_status(scripts)
    assert [(r.id, r.state, r.description, r.hash == r.stored_hash) for r in status] == [
        (1, "applied", "Create the shop's tables", True), (2, "applied", "Add a price", True)]
    assert await rows(store, "SELECT name FROM pragma_table_info('T')") == [["id"], ["name"], ["price"]]


async def test_a_failing_revision_rolls_back_and_leaves_the_store_inconsistent(store: Store, tmp_path: Path) -> None:
    d = write(tmp_path / "ev", _1=ONE, _2=TWO.replace("UPDATE T SET price = 1.5;", "UPDATE nowhere SET x = 1;"))
    with pytest.raises(EvolutionFailed) as caught:
        await store.apply_evolutions(load_dir(d))
    assert caught.value.data["revision"] == 2 and "no such table: nowhere" in caught.value.data["problem"]
    # Revision 1 stays applied; 2 is rolled back whole (its ALTER too) and recorded half-applied.
    assert await rows(store, "SELECT name FROM pragma_table_info('T')") == [["id"], ["name"]]
    [_, two] = await store.evolutions_status(load_dir(d))
    assert (two.state, "nowhere" in two.last_problem) == ("applying_up", True)
    with pytest.raises(EvolutionInconsistent):
        await store.apply_evolutions(load_dir(d))  # the same script again: nothing runs
    # A fixed script is tried again.
    write(d, _2=TWO)
    assert await store.apply_evolutions(load_dir(d)) == [2]
    assert await rows(store, "SELECT name FROM pragma_table_info('T')") == [["id"], ["name"], ["price"]]


async def test_resolve_settles_an_inconsistent_revision_by_hand(store: Store, tmp_path: Path) -> None:
    d = write(tmp_path / "ev", _1=ONE.replace("CREATE TABLE T", "CREATE TABLE T (oops"))
    with pytest.raises(EvolutionFailed):
        await store.apply_evolutions(load_dir(d))
    await store.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT)")  # done by hand
    assert await store.resolve_evolution(1) == "applied"
    assert [r.state for r in await store.evolutions_status(load_dir(d))] == ["applied"]
    assert await store.apply_evolutions(load_dir(d)) == [], "resolved: the broken Ups never runs again"
    with pytest.raises(EvolutionInvalid):
        await store.resolve_evolution(1)


async def test_mark_applied_records_without_running(store: Store, tmp_path: Path) -> None:
    scripts = load_dir(write(tmp_path / "ev", _1=ONE))
    await store.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT)")
    await store.mark_evolution_applied(scripts, 1)
    assert [r.state for r in await store.evolutions_status(scripts)] == ["applied"]
    assert await store.apply_evolutions(scripts) == []


async def test_a_diverged_revision_runs_its_downs_then_the_new_ups(store: Store, tmp_path: Path) -> None:
    d = write(tmp_path / "ev", _1=ONE, _2=TWO)
    await store.apply_evolutions(load_dir(d))
    write(d, _2=TWO.replace("price REAL", "price INTEGER").replace("1.5", "2"))
    assert [r.state for r in await store.evolutions_status(load_dir(d))] == ["applied", "diverged"]
    assert await store.apply_evolutions(load_dir(d)) == [2]
    assert await rows(store, "SELECT type FROM pragma_table_info('T') WHERE name = 'price'") == [["INTEGER"]]
    assert [r.state for r in await store.evolutions_status(load_dir(d))] == ["applied", "applied"]


async def test_an_evolution_can_not_touch_the_stores_own_tables(store: Store, tmp_path: Path) -> None:
    d = write(tmp_path / "ev", _1="-- !Ups\nDELETE FROM _p2p_evolutions;\n")
    with pytest.raises(EvolutionFailed, match="not authorized"):
        await store.apply_evolutions(load_dir(d))


# -- distributed tables only move forward ----------------------------------------------


@pytest.mark.parametrize("ups", [
    "DROP TABLE T;",
    "ALTER TABLE T RENAME TO U;",
    "ALTER TABLE T DROP COLUMN name;",
    "ALTER TABLE T RENAME COLUMN name TO title;",
    # a new key: the usual copy-and-swap, which drops the distributed table on the way
    "CREATE TABLE T2 (id INTEGER, name TEXT PRIMARY KEY); INSERT INTO T2 SELECT id, name FROM T; DROP TABLE T; ALTER TABLE T2 RENAME TO T;",
])
async def test_a_destructive_change_of_a_distributed_table_is_refused_and_changes_nothing(store: Store, tmp_path: Path, ups: str) -> None:
    await store.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT)")
    await store.set_distributed_tables(["T"])
    await store.insert("T", {"id": 1, "name": "kept"})
    d = write(tmp_path / "ev", _1=f"-- !Ups\nCREATE TABLE side(a);\n{ups}\n")
    with pytest.raises(EvolutionDestructive) as caught:
        await store.apply_evolutions(load_dir(d))
    assert "T" in caught.value.message
    assert await rows(store, "SELECT id, name FROM T") == [[1, "kept"]]
    assert await rows(store, "SELECT count(*) FROM sqlite_master WHERE name = 'side'") == [[0]]
    assert [r.state for r in await store.evolutions_status(load_dir(d))] == ["pending"], "a refusal records nothing"


async def test_adding_a_column_to_a_distributed_table_captures_it_in_the_same_revision(store: Store, tmp_path: Path) -> None:
    await store.execute("CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT)")
    await store.set_distributed_tables(["T"])
    announced: list[Any] = []
    store.on_changes = lambda _s, batch: announced.append(batch.change_infos())
    d = write(tmp_path / "ev", _1="-- Price\n-- !Ups\nALTER TABLE T ADD COLUMN price REAL;\nINSERT INTO T VALUES (7, 'x', 2.5);\n")
    assert await store.apply_evolutions(load_dir(d)) == [1]
    assert announced == [[{"table": "T", "type": "data", "inserted": [7], "updated": [], "deleted": []}]]
    await store.update({"price": 3.0}, {"table": "T", "where": [["id", "=", 7]]})
    columns = [c[0] for c in await rows(store, "SELECT name FROM pragma_table_info('T')")]
    mask = (await rows(store, "SELECT cols FROM _p2p_log ORDER BY seq DESC LIMIT 1"))[0][0]
    assert mask == 1 << columns.index("price"), "the capture triggers were rebuilt with the revision"
    with pytest.raises(PermissionDenied):
        await store.execute("UPDATE _p2p_evolutions SET state = 'applied'")
