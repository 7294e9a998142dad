"""The store reads a live table's shape through schema.shape, so it and
sync_schema.json validation agree on the key, the rowid alias and affinity."""

from __future__ import annotations

import sqlite3

import pytest

from p2pstore.errors import CompositeKeyNotSupported, TableNotFound
from p2pstore.schema.shape import read_table_shape
from p2pstore.store.blocks import keys_stay_distinct
from p2pstore.store.tables import read_table_info

TABLES = {
    "plain_rowid": ("CREATE TABLE t(a TEXT, b INT)", None, False),
    "int_pk": ("CREATE TABLE t(id INTEGER PRIMARY KEY, a TEXT)", "id", True),
    "int_pk_lower": ("CREATE TABLE t(id integer primary key, a TEXT)", "id", True),
    "int_pk_autoinc": ("CREATE TABLE t(id INTEGER PRIMARY KEY AUTOINCREMENT, a TEXT)", "id", True),
    "bigint_pk": ("CREATE TABLE t(id BIGINT PRIMARY KEY, a TEXT)", "id", False),
    "text_pk": ("CREATE TABLE t(k TEXT PRIMARY KEY, a TEXT)", "k", False),
    # A WITHOUT ROWID table has no rowid: its INTEGER PRIMARY KEY is an ordinary key.
    "without_rowid": ("CREATE TABLE t(id INTEGER PRIMARY KEY, a TEXT) WITHOUT ROWID", "id", False),
    "table_constraint_pk": ("CREATE TABLE t(id INTEGER, a TEXT, PRIMARY KEY(id))", "id", True),
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_key_and_rowid_alias_agree_with_the_schema_reader(name: str) -> None:
    ddl, key, alias = TABLES[name]
    conn = sqlite3.connect(":memory:")
    conn.execute(ddl)
    info = read_table_info(conn, "t")
    shape = read_table_shape(conn, "t")
    assert shape is not None
    assert info.key == key
    assert info.key_is_rowid_alias is alias
    assert info.key_is_rowid_alias == (shape.rowid_alias is not None)
    assert info.columns == tuple(c.name for c in shape.columns)


def test_missing_internal_and_composite_tables_are_refused() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE _p2p_meta(k)")
    conn.execute("CREATE TABLE c(a, b, PRIMARY KEY(a, b))")
    conn.execute("CREATE VIEW v AS SELECT 1")
    for table in ("nope", "_p2p_meta", "v"):
        with pytest.raises(TableNotFound):
            read_table_info(conn, table)
    with pytest.raises(CompositeKeyNotSupported, match="a, b"):
        read_table_info(conn, "c")


@pytest.mark.parametrize(
    ("decl", "int_ok", "str_ok"),
    [
        ("INTEGER", True, False),
        ("BIGINT", True, False),
        ("TEXT", False, True),
        ("VARCHAR(32)", False, True),
        ("CHARINT", True, False),  # "INT" wins, as in SQLite's affinity rules
        ("BLOB", False, False),
        ("", False, False),
        ("REAL", False, False),
        ("NUMERIC", False, False),
    ],
)
def test_keys_stay_distinct_follows_sqlite_affinity(decl: str, int_ok: bool, str_ok: bool) -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE TABLE t(k {decl} UNIQUE, a)")
    assert keys_stay_distinct(conn, "t", "k", int) is int_ok
    assert keys_stay_distinct(conn, "t", "k", str) is str_ok
    assert keys_stay_distinct(conn, "t", "nope", str) is False
