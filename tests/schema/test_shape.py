"""Reading a live table's shape from real SQLite (p2pstore.schema.shape)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from schema_helpers import DEFAULT_EMPLOYEE, EMPLOYEE2

from p2pstore.schema.shape import has_autoincrement, is_without_rowid, read_table_shape, sql_tokens
from p2pstore.schema.sync_schema import TableShape


def test_seed_employee(shape_of: Callable[..., TableShape]) -> None:
    shape = shape_of(DEFAULT_EMPLOYEE)
    assert shape.name == "EMPLOYEE"
    assert [c.name for c in shape.columns] == ["ID", "NAME", "AGE", "SALARY", "CODES"]
    assert shape.primary_key == ("ID",)
    assert shape.rowid_alias == "ID"
    by = {c.name: c for c in shape.columns}
    assert by["ID"].autoincrement and by["ID"].unique and by["ID"].pk_index == 1
    assert by["NAME"].unique and by["NAME"].not_null and not by["NAME"].autoincrement
    assert not by["AGE"].unique and not by["AGE"].not_null
    assert [c.affinity for c in shape.columns] == ["INTEGER", "TEXT", "INTEGER", "REAL", "BLOB"]


def test_seed_employee2_table_constraint_primary_key(shape_of: Callable[..., TableShape]) -> None:
    shape = shape_of(EMPLOYEE2, table="EMPLOYEE2")
    assert shape.primary_key == ("NAME",)
    assert shape.rowid_alias is None
    assert not any(c.autoincrement for c in shape.columns)


def test_missing_table_is_none(db: sqlite3.Connection) -> None:
    assert read_table_shape(db, "EMPLOYEE") is None
    db.execute(DEFAULT_EMPLOYEE)
    assert read_table_shape(db, "employee") is None  # exact names, as everywhere in sync_schema.json
    db.execute("CREATE VIEW V AS SELECT * FROM EMPLOYEE")
    assert read_table_shape(db, "V") is None


def test_caller_row_factory_is_left_alone(db: sqlite3.Connection) -> None:
    db.row_factory = sqlite3.Row
    db.execute(DEFAULT_EMPLOYEE)
    assert read_table_shape(db, "EMPLOYEE") is not None
    assert db.row_factory is sqlite3.Row


def test_quoted_and_odd_names(shape_of: Callable[..., TableShape]) -> None:
    shape = shape_of('CREATE TABLE "we""ird t" ("a b" TEXT PRIMARY KEY, [c] INT UNIQUE, `d` TEXT DEFAULT \'x\')', table='we"ird t')
    assert shape.primary_key == ("a b",)
    by = {c.name: c for c in shape.columns}
    assert by["c"].unique and by["d"].default == "'x'"


def test_autoincrement_word_inside_strings_names_or_comments_does_not_count(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE T (ID INTEGER PRIMARY KEY /* AUTOINCREMENT */, "
        "\"AUTOINCREMENT\" TEXT DEFAULT 'PRIMARY KEY AUTOINCREMENT') -- AUTOINCREMENT"
    )
    shape = read_table_shape(db, "T")
    assert shape is not None and not any(c.autoincrement for c in shape.columns)
    assert shape.rowid_alias == "ID"


def test_autoincrement_with_conflict_clause_and_order(db: sqlite3.Connection) -> None:
    db.execute("create table t (id integer primary key asc on conflict replace autoincrement, v)")
    shape = read_table_shape(db, "t")
    assert shape is not None and shape.column("id").autoincrement  # type: ignore[union-attr]


def test_without_rowid(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE W (ID INTEGER PRIMARY KEY, without TEXT, rowid_ TEXT) WITHOUT ROWID")
    db.execute("CREATE TABLE R (ID INTEGER PRIMARY KEY, \"WITHOUT\" TEXT, ROWID2 TEXT)")
    w, r = read_table_shape(db, "W"), read_table_shape(db, "R")
    assert w is not None and w.without_rowid and w.rowid_alias is None
    assert r is not None and not r.without_rowid and r.rowid_alias == "ID"


def test_unique_sources(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE U (K TEXT PRIMARY KEY, A TEXT UNIQUE, B TEXT, C TEXT, D TEXT, E TEXT, UNIQUE (B), UNIQUE (C, D))")
    db.execute("CREATE UNIQUE INDEX ue ON U(E)")
    db.execute("CREATE UNIQUE INDEX ulower ON U(lower(A))")
    shape = read_table_shape(db, "U")
    assert shape is not None
    assert {c.name for c in shape.columns if c.unique} == {"K", "A", "B", "E"}


def test_composite_key_columns_are_not_individually_unique(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE C (A TEXT, B TEXT, PRIMARY KEY (B, A))")
    shape = read_table_shape(db, "C")
    assert shape is not None and shape.primary_key == ("B", "A")
    assert not any(c.unique for c in shape.columns)


def test_defaults(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE D (K TEXT PRIMARY KEY, A INT NOT NULL DEFAULT 0, B INT NOT NULL DEFAULT NULL, C INT NOT NULL)")
    shape = read_table_shape(db, "D")
    assert shape is not None
    assert [(c.name, c.has_default) for c in shape.columns] == [("K", False), ("A", True), ("B", False), ("C", False)]


def test_tokenizer() -> None:
    tokens = sql_tokens("create table t(a 'x''y' \"q\"\"q\" [b] -- c\n /* d */ e)")
    assert tokens == [
        ("word", "CREATE"), ("word", "TABLE"), ("word", "T"), ("punct", "("), ("word", "A"),
        ("string", "'x''y'"), ("ident", '"q""q"'), ("ident", "[b]"), ("word", "E"), ("punct", ")"),
    ]
    assert not has_autoincrement(sql_tokens("CREATE TABLE t (AUTOINCREMENT_x INTEGER PRIMARY KEY)"))
    assert has_autoincrement(sql_tokens("CREATE TABLE t (x INTEGER PRIMARY KEY DESC AUTOINCREMENT)"))
    assert not is_without_rowid(sql_tokens("CREATE TABLE t (without rowid)"))
    assert is_without_rowid(sql_tokens("CREATE TABLE t (a PRIMARY KEY) STRICT, WITHOUT ROWID"))
