"""Upgrade in place (issue 11 item 5): store files written by earlier
releases open with this one, migrate once with a log line, read exactly as
that release read them, send the stream that release sent, and keep
syncing. tests/fixtures/make_release1_stores.py made them with each release:

- release 1 (tests/fixtures/release1): per-column clocks only, device IDs as text;
- release 2 (tests/fixtures/release2): one clock per row keyed by the row's
  conflict value, device IDs as numbers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from replicas import BUNDLE, STORE, Replica

from p2pstore.protocol.messages import pack_values, unpack
from p2pstore.store import changes
from p2pstore.store.database import Store

RELEASES = (1, 2)
FIXTURES = {r: Path(__file__).parents[1] / "fixtures" / f"release{r}" for r in RELEASES}
EXPECTED = {r: json.loads((FIXTURES[r] / "expected.json").read_text()) for r in RELEASES}
_spec = importlib.util.spec_from_file_location("make_release1_stores", FIXTURES[1].parent / "make_release1_stores.py")
assert _spec is not None and _spec.loader is not None
MAKER = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(MAKER)  # the same table definitions and sync_schema.json as the fixtures
NAMES = ["sv-a", "sv-b", "collab-a", "collab-b"]
DEVICE = {"a": "DEVA", "b": "DEVB"}


def _copy(tmp_path: Path, release: int, name: str) -> Path:
    path = tmp_path / f"{name}.db"
    shutil.copyfile(FIXTURES[release] / f"{name}.db", path)
    return path


async def _open_and_close(path: Path) -> None:
    store = await Store.open(path, bundle=BUNDLE, name=STORE)
    await store.close()


def _as_read(r: Replica) -> dict[str, Any]:
    """What make_release1_stores.py recorded, read the same way from this release's file."""
    tables = [n for (n,) in r.rows("SELECT name FROM _p2p_tables ORDER BY name")]
    as_lists = lambda rows: [list(x) for x in rows]  # noqa: E731 - JSON has no tuples
    return {
        "rows": {t: as_lists(r.rows(f'SELECT * FROM "{t}" ORDER BY 1')) for t in tables},
        "cells": as_lists(r.rows(
            "SELECT t.name, c.ck, c.col, c.hlc, c.origin, c.seq, c.prev_hlc, c.prev_origin "
            "FROM _p2p_clocks c JOIN _p2p_tables t ON t.tid = c.tid ORDER BY 1, 2, 3")),
        "tombs": as_lists(r.rows(
            "SELECT t.name, c.ck, c.hlc, o.device, c.seq, c.prev_hlc, p.device "
            "FROM _p2p_tombs c JOIN _p2p_tables t ON t.tid = c.tid LEFT JOIN _p2p_origins o ON o.id = c.origin "
            "LEFT JOIN _p2p_origins p ON p.id = c.prev_origin ORDER BY 1, 2")),
        "conflicts": as_lists(r.rows(
            "SELECT tbl, ck, col, losing_value, winner, winner_hlc, loser, loser_hlc FROM _p2p_conflicts ORDER BY 1, 2, 3, 8")),
        "watermarks": as_lists(r.rows("SELECT peer, received_seq FROM _p2p_watermarks ORDER BY 1")),
        "last_seq": r.rows("SELECT max(seq) FROM _p2p_log")[0][0],
    }


def _replica(path: Path, name: str) -> Replica:
    return Replica(path, DEVICE[name[-1]])


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("name", NAMES)
async def test_an_earlier_release_file_opens_migrates_once_and_reads_as_that_release_did(
    tmp_path: Path, release: int, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = _copy(tmp_path, release, name)
    with caplog.at_level(logging.INFO, logger="p2pstore.store"):
        await _open_and_close(path)
    said = {"one clock per row": [m for m in caplog.messages if "one clock per row" in m],
            "local key": [m for m in caplog.messages if "to the row's local key" in m],
            "numbers": [m for m in caplog.messages if "device IDs as numbers" in m]}
    if name.startswith("sv"):
        assert said["one clock per row" if release == 1 else "local key"], caplog.messages
        assert "table items: moving" in (said["one clock per row"] + said["local key"])[0]
    # collaborative stores keep one clock per row already; release 2 had row clocks, and numbers
    assert not said["local key" if release == 1 else "one clock per row"]
    assert not (said["one clock per row"] and name.startswith("collab"))
    if release == 1:
        (numbered,) = said["numbers"]
        assert "clock and log rows (once, after an upgrade)" in numbered, caplog.messages
    else:
        assert not said["numbers"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="p2pstore.store"):
        await _open_and_close(path)
    assert not [m for m in caplog.messages if "one clock per row" in m or "as numbers" in m or "local key" in m]  # once

    r = _replica(path, name)
    try:
        assert _as_read(r) == EXPECTED[release][name]
        # Origins are numbers now (store/origins.py), each device's ID stored once.
        for table in ("_p2p_log", "_p2p_cells", "_p2p_rows", "_p2p_tombs"):
            assert r.rows(f"SELECT type FROM pragma_table_info('{table}') WHERE name = 'origin'") == [("INTEGER",)]
            assert r.rows(f"SELECT count(*) FROM {table} WHERE typeof(origin) NOT IN ('integer', 'null')") == [(0,)]
        devices = {d for (d,) in r.rows("SELECT device FROM _p2p_origins")}
        assert devices <= {"DEVA", "DEVB"}
        assert r.rows("SELECT count(*) FROM _p2p_changes WHERE origin IS NOT NULL AND origin NOT IN ('DEVA', 'DEVB')") == [(0,)]
        if name.startswith("sv"):
            per_column = r.rows("SELECT count(*) FROM _p2p_cells")[0][0]
            logical = len(EXPECTED[release][name]["cells"])
            # 42 rows x 3 sync columns; only the columns edited on their own keep a clock of their own
            assert r.rows("SELECT count(*) FROM _p2p_rows")[0][0] >= 40
            assert per_column < logical / 3, (per_column, logical)
    finally:
        r.close()


def _normalized(plain: dict[str, Any]) -> dict[str, Any]:
    out = dict(plain)
    out["rows"] = sorted((repr(row) for row in plain["rows"]))
    return out


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("name", NAMES)
async def test_the_migrated_store_sends_the_stream_that_release_sent(tmp_path: Path, release: int, name: str) -> None:
    path = _copy(tmp_path, release, name)
    await _open_and_close(path)
    r = _replica(path, name)
    try:
        batch = r.read_rows(0, limit=changes.MAX_BATCH_ROWS)
    finally:
        r.close()
    ours = unpack(pack_values(changes.batch_to_plain(batch)), "batch", raw_text=True)
    theirs = unpack((FIXTURES[release] / f"{name}.batch").read_bytes(), "batch", raw_text=True)
    assert _normalized(ours) == _normalized(theirs)


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("name", ["sv-a", "collab-a"])
async def test_a_batch_an_earlier_release_sent_applies_here(tmp_path: Path, release: int, name: str) -> None:
    """A peer still on an earlier release sends its stream; a fresh store of
    this release takes it whole: the same rows and the same clocks (as
    that peer's file, migrated, holds them)."""
    source = _copy(tmp_path, release, name)
    await _open_and_close(source)
    r = _replica(source, name)
    c = Replica(tmp_path / "c.db", "DEVC")
    try:
        if name.startswith("sv"):
            c.write(MAKER.ITEMS)
            c.make_distributed("items", doc=MAKER.DOC)
        else:
            c.write(MAKER.NOTES)
            c.make_distributed("notes")
        batch = changes.batch_from_plain(unpack((FIXTURES[release] / f"{name}.batch").read_bytes(), "batch", raw_text=True))
        result = c.apply(batch, "DEVA")
        assert result.failed == 0
        if name.startswith("sv"):
            synced = "SELECT uid, a, b FROM items ORDER BY uid"
            assert c.rows(synced) == r.rows(synced)
            clocks = "SELECT ck, col, hlc, coalesce(origin, 'DEVA') FROM _p2p_clocks ORDER BY 1, 2"
            assert c.rows(clocks) == r.rows(clocks)
            assert c.rows("SELECT count(*) FROM _p2p_cells")[0][0] < len(c.rows(clocks)) / 3
        else:
            assert c.rows("SELECT * FROM dev_DEVA_notes ORDER BY id") == r.rows("SELECT * FROM notes ORDER BY id")
    finally:
        r.close()
        c.close()


@pytest.mark.parametrize("release", RELEASES)
async def test_migrated_peers_keep_syncing(tmp_path: Path, release: int) -> None:
    pa, pb = _copy(tmp_path, release, "sv-a"), _copy(tmp_path, release, "sv-b")
    for p in (pa, pb):
        await _open_and_close(p)
    a, b = Replica(pa, "DEVA"), Replica(pb, "DEVB")
    try:
        a.push(b)
        b.push(a)
        synced = "SELECT uid, a, b FROM items ORDER BY uid"
        assert a.rows(synced) == b.rows(synced)
        assert ("ua-unsent", 5, "z") in b.rows(synced)
        b.write("UPDATE items SET b = 'after upgrade' WHERE uid = 'u003'")
        a.write("UPDATE items SET a = 7 WHERE uid = 'u003'")  # concurrent, another column: both survive
        a.write("DELETE FROM items WHERE uid = 'u004'")
        a.push(b)
        b.push(a)
        assert a.rows(synced) == b.rows(synced)
        assert a.rows("SELECT a, b FROM items WHERE uid = 'u003'") == [(7, "after upgrade")]
        assert b.rows("SELECT count(*) FROM items WHERE uid = 'u004'") == [(0,)]
        clocks = "SELECT ck, col, hlc FROM _p2p_clocks ORDER BY 1, 2"
        assert a.rows(clocks) == b.rows(clocks)
    finally:
        a.close()
        b.close()
