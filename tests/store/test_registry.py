"""StoreRegistry: file layout, names, open/get/close, the per-bundle limit."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2pstore.errors import InvalidParams, StoreNotOpen, TooManyStores
from p2pstore.store.evolutions import load_dir
from p2pstore.store.registry import StoreRegistry


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[StoreRegistry]:
    r = StoreRegistry(tmp_path / "data", max_per_bundle=2)
    yield r
    await r.close_all()


async def distributed(registry: StoreRegistry, bundle: str, name: str) -> None:
    store = await registry.open(bundle, name)
    await store.execute("CREATE TABLE IF NOT EXISTS T (id INTEGER PRIMARY KEY)")
    registry.check_distributed_limit(store)
    await store.set_distributed_tables(["T"])


async def test_files_live_under_stores_bundle_name(registry: StoreRegistry, tmp_path: Path) -> None:
    store = await registry.open("shop", "orders")
    assert store.path == tmp_path / "data" / "stores" / "shop" / "orders.db"
    assert store.path.exists()
    assert registry.path_for("b", "n.v-1_x") == tmp_path / "data" / "stores" / "b" / "n.v-1_x.db"


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "-dash", "a/b", "a\\b", "x" * 65, "sp ace", "ü", "a\x00b"])
async def test_unsafe_names_are_refused(registry: StoreRegistry, name: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidParams):
        await registry.open("default", name)
    with pytest.raises(InvalidParams):
        await registry.open(name, "store")
    assert not any((tmp_path / "data").rglob("*.db"))


async def test_open_twice_is_the_same_store_and_close_forgets_it(registry: StoreRegistry) -> None:
    a = await registry.open("default", "s")
    assert await registry.open("default", "s") is a
    assert registry.get("default", "s") is a
    assert registry.stores() == [a]
    await registry.close("default", "s")
    with pytest.raises(StoreNotOpen) as info:
        registry.get("default", "s")
    assert info.value.data == {"store": "s", "bundle": "default"}
    with pytest.raises(StoreNotOpen):
        await registry.close("default", "s")


async def test_limit_counts_stores_with_distributed_tables_per_bundle(registry: StoreRegistry) -> None:
    await distributed(registry, "b", "one")
    await distributed(registry, "b", "two")
    plain = await registry.open("b", "three")  # no distributed tables: not counted
    with pytest.raises(TooManyStores) as info:
        registry.check_distributed_limit(plain)
    assert info.value.data == {"bundle": "b", "limit": 2}
    await distributed(registry, "other", "one")  # another bundle
    registry.check_distributed_limit(registry.get("b", "one"))  # a store already counted is not one too many


async def test_reopening_a_store_with_distributed_tables_is_limited_too(registry: StoreRegistry) -> None:
    await distributed(registry, "b", "one")
    await distributed(registry, "b", "two")
    await registry.close("b", "two")
    await distributed(registry, "b", "three")
    with pytest.raises(TooManyStores):
        await registry.open("b", "two")
    with pytest.raises(StoreNotOpen):
        registry.get("b", "two")  # not left half-open


async def test_security_label_on_an_open_store_is_raised(registry: StoreRegistry) -> None:
    store = await registry.open("default", "s", security_label=2)
    assert (await registry.open("default", "s", security_label=3)).security_label == 3
    assert store.security_label == 3


async def test_poll_once_announces_outside_writes(registry: StoreRegistry) -> None:
    seen = []
    registry.on_changes = lambda store, batch: seen.append((store.name, batch.change_infos()))
    await distributed(registry, "default", "s")
    path = registry.get("default", "s").path
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO T VALUES (7)")
    conn.commit()
    conn.close()
    await registry.poll_once()
    assert seen == [("s", [{"table": "T", "type": "data", "inserted": [7], "updated": [], "deleted": []}])]
    await registry.poll_once()
    assert len(seen) == 1


async def test_auto_apply_evolutions_applies_pending_revisions_at_open_but_never_downs(tmp_path: Path) -> None:
    reg = StoreRegistry(tmp_path)
    reg.auto_apply_evolutions = True
    scripts = reg.evolutions_dir("default", "shop")
    scripts.mkdir(parents=True)
    (scripts / "1.sql").write_text("-- Items\n-- !Ups\nCREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT);\n-- !Downs\nDROP TABLE items;\n")
    try:
        store = await reg.open("default", "shop")
        assert [r.state for r in await store.evolutions_status(load_dir(scripts))] == ["applied"]
        await reg.close("default", "shop")
        # Edited after it was applied (diverged) and a new one after it: nothing runs by itself.
        (scripts / "1.sql").write_text("-- Items\n-- !Ups\nCREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, n);\n-- !Downs\nDROP TABLE items;\n")
        (scripts / "2.sql").write_text("-- !Ups\nCREATE TABLE more (a);\n")
        store = await reg.open("default", "shop")
        assert [r.state for r in await store.evolutions_status(load_dir(scripts))] == ["diverged", "pending"]
        # A broken script leaves the store open (and inconsistent).
        (scripts / "1.sql").write_text("-- Items\n-- !Ups\nCREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT);\n-- !Downs\nDROP TABLE items;\n")
        (scripts / "2.sql").write_text("-- !Ups\nCREATE TABLE nope (;\n")
        await reg.close("default", "shop")
        store = await reg.open("default", "shop")
        assert [r.state for r in await store.evolutions_status(load_dir(scripts))] == ["applied", "applying_up"]
    finally:
        await reg.close_all()
