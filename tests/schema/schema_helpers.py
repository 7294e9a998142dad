"""Helpers for the sync_schema tests: the seed's examples and real SQLite.

Every table shape in these tests comes from a real CREATE TABLE run in a real
(in-memory) SQLite database and read back with ``read_table_shape``, so the
rules are tested against what SQLite reports, not against hand-made shapes.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pstore.schema.shape import read_table_shape
from p2pstore.schema.sync_schema import ValidationReport, validate

SEED_DIR = Path(__file__).resolve().parent / "seed_examples"

#: The seed's own CREATE statement for the valid example and for the wrong
#: examples that give none (noted at each use).
DEFAULT_EMPLOYEE = (
    "CREATE TABLE IF NOT EXISTS EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, "
    "NAME TEXT NOT NULL UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB)"
)
EMPLOYEE2 = (
    "CREATE TABLE IF NOT EXISTS EMPLOYEE2 (NAME TEXT NOT NULL UNIQUE, AGE INTEGER, "
    "SALARY REAL, CODES BLOB, PRIMARY KEY (NAME))"
)
BUNDLE = "com.example.rdbDataSync"
DB_NAME = "RdbTest"


def load_seed(name: str) -> Any:
    """A seed example as JSON values (a fresh copy each time)."""
    return json.loads((SEED_DIR / f"{name}.json").read_text(encoding="utf-8"))


def check(doc: Any, *creates: str, tables: tuple[str, ...] = ("EMPLOYEE",)) -> ValidationReport:
    """Validate ``doc`` for the seed's store against tables made by ``creates``
    (layers 1 and 2, the way ``set_distributed_tables`` will)."""
    conn = sqlite3.connect(":memory:")
    try:
        for sql in creates:
            conn.execute(sql)
        shapes = {name: read_table_shape(conn, name) for name in tables}
    finally:
        conn.close()
    return validate(doc, shapes=shapes, bundle=BUNDLE, db_name=DB_NAME, tables=tables)


def issues(report_part: Any) -> set[tuple[str, str]]:
    """``{(rule, path)}`` of a list of issues."""
    return {(i.rule, i.path) for i in report_part}


def mutate(doc: Any, fn: Callable[[Any], Any]) -> Any:
    """A changed deep copy of ``doc``."""
    new = copy.deepcopy(doc)
    fn(new)
    return new
