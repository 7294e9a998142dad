"""Fixtures for the sync_schema tests (helpers live in schema_helpers.py,
a unique module name so it can't collide with other test folders)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator

import pytest

from p2pstore.schema.shape import read_table_shape
from p2pstore.schema.sync_schema import TableShape


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:")
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def shape_of(db: sqlite3.Connection) -> Callable[..., TableShape]:
    """Run CREATE statements in the test's database and read one table back."""

    def make(*creates: str, table: str = "EMPLOYEE") -> TableShape:
        for sql in creates:
            db.execute(sql)
        shape = read_table_shape(db, table)
        assert shape is not None
        return shape

    return make
