"""``validate`` never raises: random JSON values and random mutations of the
seed's valid example give a report (valid or not), never an exception."""

from __future__ import annotations

import copy
import json
import sqlite3
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schema_helpers import BUNDLE, DB_NAME, DEFAULT_EMPLOYEE, EMPLOYEE2, load_seed

from p2pstore.schema.shape import read_table_shape
from p2pstore.schema.sync_schema import ValidationReport, check_shape, validate

KEYS = ["dbSchema", "version", "bundleName", "dbName", "tables", "tableName", "deviceSyncFields", "fields",
        "columnName", "type", "primaryKey", "autoIncrement", "notNull", "ID", "NAME", "AGE", "x"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(KEYS + ["Text", "Integer", "RdbTest.db", ""]),
    st.text(max_size=8),
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children, max_size=5),
    max_leaves=30,
)

_conn = sqlite3.connect(":memory:")
_conn.execute(DEFAULT_EMPLOYEE)
_conn.execute(EMPLOYEE2)
SHAPES = {name: read_table_shape(_conn, name) for name in ("EMPLOYEE", "EMPLOYEE2")} | {"GONE": None}
_conn.close()
VALID = load_seed("valid_employee")


def run_all_ways(doc: Any) -> None:
    for kwargs in (
        {},
        {"shapes": SHAPES, "bundle": BUNDLE, "db_name": DB_NAME},
        {"shapes": SHAPES, "tables": ["EMPLOYEE", "GONE", "X"], "document_rules": True},
        {"shapes": SHAPES, "previous": VALID["dbSchema"][0], "document_rules": True},
    ):
        report = validate(doc, **kwargs)
        assert isinstance(report, ValidationReport)
        assert report.valid == (not report.errors)
        json.dumps(report.to_dict())  # always serialisable for the API
        for issue in report.errors + report.warnings:
            assert issue.path == "" or issue.path.startswith("/")
            assert issue.rule and issue.message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON)
def test_random_json_values_never_crash(doc: Any) -> None:
    run_all_ways(doc)
    run_all_ways({"dbSchema": doc})
    run_all_ways({"dbSchema": [doc]})


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


ALL_PATHS = _paths(VALID)[1:]


@st.composite
def mutated_valid(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        path = draw(st.sampled_from(ALL_PATHS))
        parent: Any = doc
        try:
            for part in path[:-1]:
                parent = parent[part]
            action = draw(st.sampled_from(["replace", "delete", "add_key", "copy_sibling"]))
            last = path[-1]
            if action == "replace":
                parent[last] = draw(JSON)
            elif action == "delete":
                del parent[last]
            elif action == "add_key" and isinstance(parent, dict):
                parent[draw(st.sampled_from(KEYS))] = draw(JSON)
            elif action == "copy_sibling" and isinstance(parent, list):
                parent.append(copy.deepcopy(parent[last]))
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed this path
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_valid())
def test_mutations_of_the_valid_example_never_crash(doc: Any) -> None:
    run_all_ways(doc)
    if check_shape(doc) == []:
        # Shape-valid mutations also survive being the previous version.
        assert isinstance(validate(VALID, previous=doc["dbSchema"][0]), ValidationReport)
