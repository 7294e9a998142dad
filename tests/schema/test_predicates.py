"""Predicates (SPEC §5) -> bound SQL: every operator, every error path.

Each compiled fragment is also executed against a real in-memory table, so a
test shows both the SQL shape and that it selects the right rows. User values
never appear in the SQL text; only ``?`` placeholders do.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from p2pstore.errors import InvalidPredicate
from p2pstore.schema.predicates import (
    ALL_OPS,
    MAX_DEPTH,
    MAX_IN_VALUES,
    MAX_TERMS,
    CompiledQuery,
    compile_predicates,
    devices_of,
    quote_ident,
    table_of,
)

COLUMNS = ("ID", "NAME", "AGE", "SALARY", "PHOTO")
ROWS = [
    (1, "alice", 30, 100.0, b"\x01"),
    (2, "bob", 17, None, None),
    (3, "anna", 45, 250.5, b"\x02"),
    (4, "carl", 18, 80.0, None),
    (5, "o'brien", 60, None, b"\x03"),
]
#: Marker strings used as values: none of them may show up in compiled SQL.
EVIL = "x' OR 1=1; DROP TABLE EMPLOYEE; --"


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY, NAME TEXT, AGE INTEGER, SALARY REAL, PHOTO BLOB)")
    conn.executemany("INSERT INTO EMPLOYEE VALUES (?, ?, ?, ?, ?)", ROWS)
    yield conn
    conn.close()


def ids(db: sqlite3.Connection, compiled: CompiledQuery) -> list[int]:
    tail, params = compiled.tail()
    return [r[0] for r in db.execute(f"SELECT ID FROM EMPLOYEE{tail}", params)]


def where_of(*items: Any, **extra: Any) -> dict[str, Any]:
    return {"table": "EMPLOYEE", "where": list(items), **extra}


def assert_no_values_in_sql(compiled: CompiledQuery, values: list[Any]) -> None:
    sql, params = compiled.tail()
    for v in values:
        if isinstance(v, str):
            assert v not in sql, f"value {v!r} spliced into SQL: {sql}"
        assert v in params, f"value {v!r} not bound as a parameter: {params}"


# -- operators ----------------------------------------------------------------

@pytest.mark.parametrize(
    ("op", "value", "expected_sql", "expected_ids"),
    [
        ("=", 30, '"AGE" = ?', [1]),
        ("!=", 30, '"AGE" != ?', [2, 3, 4, 5]),
        ("<", 18, '"AGE" < ?', [2]),
        ("<=", 18, '"AGE" <= ?', [2, 4]),
        (">", 45, '"AGE" > ?', [5]),
        (">=", 45, '"AGE" >= ?', [3, 5]),
    ],
)
def test_comparison_operators(db: sqlite3.Connection, op: str, value: int, expected_sql: str, expected_ids: list[int]) -> None:
    compiled = compile_predicates(where_of(["AGE", op, value]), COLUMNS)
    assert compiled.where == expected_sql
    assert compiled.params == (value,)
    assert ids(db, compiled) == expected_ids


def test_like(db: sqlite3.Connection) -> None:
    compiled = compile_predicates(where_of(["NAME", "like", "a%"]), COLUMNS)
    assert compiled.where == '"NAME" LIKE ?'
    assert compiled.params == ("a%",)
    assert ids(db, compiled) == [1, 3]


def test_is_null_and_is_not_null(db: sqlite3.Connection) -> None:
    null = compile_predicates(where_of(["SALARY", "is_null"]), COLUMNS)
    assert null.where == '"SALARY" IS NULL' and null.params == ()
    assert ids(db, null) == [2, 5]
    not_null = compile_predicates(where_of(["SALARY", "is_not_null"]), COLUMNS)
    assert not_null.where == '"SALARY" IS NOT NULL'
    assert ids(db, not_null) == [1, 3, 4]


def test_in_and_not_in(db: sqlite3.Connection) -> None:
    inn = compile_predicates(where_of(["NAME", "in", ["bob", "carl", EVIL]]), COLUMNS)
    assert inn.where == '"NAME" IN (?, ?, ?)'
    assert ids(db, inn) == [2, 4]
    assert_no_values_in_sql(inn, ["bob", "carl", EVIL])
    not_in = compile_predicates(where_of(["ID", "not_in", [1, 2]]), COLUMNS)
    assert not_in.where == '"ID" NOT IN (?, ?)'
    assert ids(db, not_in) == [3, 4, 5]


def test_empty_in_matches_nothing_and_empty_not_in_matches_everything(db: sqlite3.Connection) -> None:
    assert ids(db, compile_predicates(where_of(["ID", "in", []]), COLUMNS)) == []
    assert ids(db, compile_predicates(where_of(["ID", "not_in", []]), COLUMNS)) == [1, 2, 3, 4, 5]


def test_between(db: sqlite3.Connection) -> None:
    compiled = compile_predicates(where_of(["AGE", "between", 18, 45]), COLUMNS)
    assert compiled.where == '"AGE" BETWEEN ? AND ?'
    assert compiled.params == (18, 45)
    assert ids(db, compiled) == [1, 3, 4]


def test_blob_and_null_values_are_bound(db: sqlite3.Connection) -> None:
    compiled = compile_predicates(where_of(["PHOTO", "=", b"\x02"]), COLUMNS)
    assert compiled.params == (b"\x02",)
    assert ids(db, compiled) == [3]
    # "= null" is legal SQL (matches nothing); is_null is the way to find NULLs.
    assert ids(db, compile_predicates(where_of(["SALARY", "=", None]), COLUMNS)) == []


def test_every_documented_operator_is_supported() -> None:
    assert set(ALL_OPS) == {"=", "!=", "<", "<=", ">", ">=", "like", "in", "not_in", "between", "is_null", "is_not_null"}


# -- combinations ---------------------------------------------------------------

def test_where_items_are_anded(db: sqlite3.Connection) -> None:
    compiled = compile_predicates(where_of(["AGE", ">", 17], ["NAME", "like", "a%"]), COLUMNS)
    assert compiled.where == '"AGE" > ? AND "NAME" LIKE ?'
    assert ids(db, compiled) == [1, 3]


def test_or_group(db: sqlite3.Connection) -> None:
    compiled = compile_predicates(where_of({"or": [["NAME", "like", "a%"], ["SALARY", "is_null"]]}), COLUMNS)
    assert compiled.where == '("NAME" LIKE ? OR "SALARY" IS NULL)'
    assert ids(db, compiled) == [1, 2, 3, 5]


def test_spec_example(db: sqlite3.Connection) -> None:
    pred = {
        "table": "EMPLOYEE", "devices": ["dev-1"],
        "where": [["AGE", ">", 18], {"or": [["NAME", "like", "a%"], ["SALARY", "is_null"]]}],
        "order_by": [["AGE", "desc"]], "limit": 100, "offset": 0,
    }
    compiled = compile_predicates(pred, COLUMNS)
    assert ids(db, compiled) == [5, 3, 1]
    assert compiled.columns_used == {"AGE", "NAME", "SALARY"}


def test_nested_and_inside_or(db: sqlite3.Connection) -> None:
    compiled = compile_predicates(
        where_of({"or": [{"and": [["AGE", ">=", 18], ["AGE", "<", 40]]}, ["NAME", "=", "o'brien"]]}), COLUMNS
    )
    assert compiled.where == '(("AGE" >= ? AND "AGE" < ?) OR "NAME" = ?)'
    assert ids(db, compiled) == [1, 4, 5]
    assert_no_values_in_sql(compiled, ["o'brien"])


def test_nesting_up_to_max_depth_is_accepted(db: sqlite3.Connection) -> None:
    item: Any = ["ID", "=", 1]
    for _ in range(MAX_DEPTH - 1):
        item = {"and": [item]}
    assert ids(db, compile_predicates(where_of(item), COLUMNS)) == [1]


def test_no_where_means_no_condition(db: sqlite3.Connection) -> None:
    compiled = compile_predicates({"table": "EMPLOYEE"}, COLUMNS)
    assert compiled.where == "" and compiled.params == ()
    assert compiled.tail() == ("", ())
    assert compile_predicates(None, COLUMNS) == CompiledQuery()
    assert ids(db, compiled) == [1, 2, 3, 4, 5]


# -- order_by / limit / offset --------------------------------------------------

def test_order_by_limit_offset(db: sqlite3.Connection) -> None:
    compiled = compile_predicates({"table": "EMPLOYEE", "order_by": [["AGE", "desc"], "NAME"], "limit": 2, "offset": 1}, COLUMNS)
    assert compiled.order_by == '"AGE" DESC, "NAME" ASC'
    sql, params = compiled.tail()
    assert sql == ' ORDER BY "AGE" DESC, "NAME" ASC LIMIT ? OFFSET ?'
    assert params == (2, 1)
    assert ids(db, compiled) == [3, 1]


def test_offset_without_limit_means_no_limit(db: sqlite3.Connection) -> None:
    compiled = compile_predicates({"table": "EMPLOYEE", "order_by": [["ID", "asc"]], "offset": 3}, COLUMNS)
    assert compiled.tail()[1] == (-1, 3)
    assert ids(db, compiled) == [4, 5]


def test_limit_zero(db: sqlite3.Connection) -> None:
    assert ids(db, compile_predicates({"table": "EMPLOYEE", "limit": 0}, COLUMNS)) == []


# -- values are always bound ------------------------------------------------------

@pytest.mark.parametrize("value", [EVIL, "'; DELETE FROM EMPLOYEE; --", '" OR ""="', "a%' --", "\x00"])
def test_hostile_values_are_bound_not_spliced(db: sqlite3.Connection, value: str) -> None:
    compiled = compile_predicates(
        where_of(["NAME", "=", value], ["NAME", "like", value], ["NAME", "between", value, value],
                 {"or": [["NAME", "in", [value]], ["NAME", "not_in", [value]]]}),
        COLUMNS,
    )
    sql, params = compiled.tail()
    assert value not in sql
    assert params.count(value) == 6
    ids(db, compiled)  # runs, and changes nothing
    assert db.execute("SELECT count(*) FROM EMPLOYEE").fetchone()[0] == len(ROWS)


def test_numbers_are_bound_too() -> None:
    compiled = compile_predicates(where_of(["AGE", "=", 123456789], ["SALARY", "between", 1.25, 9.75]), COLUMNS)
    sql, params = compiled.tail()
    assert "123456789" not in sql and "1.25" not in sql and "9.75" not in sql
    assert params == (123456789, 1.25, 9.75)


def test_quote_ident_doubles_quotes() -> None:
    assert quote_ident('a"b') == '"a""b"'


# -- errors: every path raises InvalidPredicate with the JSON path -------------------

def invalid(pred: Any, columns: tuple[str, ...] = COLUMNS) -> InvalidPredicate:
    with pytest.raises(InvalidPredicate) as info:
        compile_predicates(pred, columns)
    assert info.value.name == "INVALID_PREDICATE"
    return info.value


@pytest.mark.parametrize("pred", [[], "x", 1, True])
def test_predicates_must_be_an_object(pred: Any) -> None:
    assert invalid(pred).data["path"] == "/"


def test_unknown_top_level_key() -> None:
    err = invalid({"table": "EMPLOYEE", "select": "*"})
    assert "select" in err.message


@pytest.mark.parametrize("where", [{"ID": 1}, "ID = 1", 5])
def test_where_must_be_a_list(where: Any) -> None:
    assert invalid({"where": where}).data["path"] == "/where"


@pytest.mark.parametrize(
    ("item", "path"),
    [
        (["ID"], "/where/0"),                   # too short
        ("ID = 1", "/where/0"),                 # text
        (42, "/where/0"),
        (None, "/where/0"),
        ({"xor": [["ID", "=", 1]]}, "/where/0"),   # unknown group
        ({"and": [["ID", "=", 1]], "or": [["ID", "=", 2]]}, "/where/0"),  # two keys
        ({"and": []}, "/where/0/and"),          # empty group
        ({"or": ["ID", "=", 1]}, "/where/0/or/0"),  # group of non-conditions
        ({"or": "x"}, "/where/0/or"),
    ],
)
def test_malformed_conditions(item: Any, path: str) -> None:
    assert invalid(where_of(item)).data["path"] == path


@pytest.mark.parametrize(
    "column",
    [
        "MISSING",
        "id",                                   # names are case-sensitive
        'ID" = 1 OR "1',
        "ID; DROP TABLE EMPLOYEE; --",
        "1=1) OR (1",
        "*",
        "",
        "rowid",
    ],
)
def test_unknown_or_hostile_column_names_are_refused(column: str) -> None:
    err = invalid(where_of([column, "=", 1]))
    assert err.data["path"] == "/where/0/0"
    assert err.data["column"] == column


@pytest.mark.parametrize("column", [1, None, ["ID"], {"c": "ID"}])
def test_column_name_must_be_a_string(column: Any) -> None:
    assert invalid(where_of([column, "=", 1])).data["path"] == "/where/0/0"


@pytest.mark.parametrize(
    "op", ["==", "<>", "LIKE", "glob", "regexp", "is", "= 1 OR 1 =", "; DROP TABLE EMPLOYEE", "", None, 1, ["="]]
)
def test_unknown_or_hostile_operators_are_refused(op: Any) -> None:
    err = invalid(where_of(["ID", op, 1]))
    assert err.data["path"] == "/where/0/1"


@pytest.mark.parametrize(
    "item",
    [
        ["ID", "=", 1, 2],
        ["ID", "="],
        ["ID", "is_null", 1],
        ["ID", "is_not_null", None],
        ["ID", "between", 1],
        ["ID", "between", 1, 2, 3],
        ["ID", "in"],
        ["ID", "in", [1], [2]],
    ],
)
def test_wrong_number_of_values(item: list[Any]) -> None:
    assert invalid(where_of(item)).data["path"] == "/where/0"


@pytest.mark.parametrize("value", [[1], {"a": 1}, {"$blob": "AA=="}, object()])
def test_values_must_be_scalars(value: Any) -> None:
    assert invalid(where_of(["ID", "=", value])).data["path"] == "/where/0/2"


def test_between_checks_both_values() -> None:
    assert invalid(where_of(["ID", "between", 1, [2]])).data["path"] == "/where/0/3"


@pytest.mark.parametrize("values", [1, "abc", None, {"a": 1}])
def test_in_takes_a_list(values: Any) -> None:
    assert invalid(where_of(["ID", "in", values])).data["path"] == "/where/0/2"


def test_in_list_items_must_be_scalars() -> None:
    assert invalid(where_of(["ID", "not_in", [1, [2]]])).data["path"] == "/where/0/2/1"


def test_in_list_is_capped() -> None:
    compile_predicates(where_of(["ID", "in", list(range(MAX_IN_VALUES))]), COLUMNS)
    assert invalid(where_of(["ID", "in", list(range(MAX_IN_VALUES + 1))])).data["path"] == "/where/0/2"


def test_nesting_is_capped() -> None:
    item: Any = ["ID", "=", 1]
    for _ in range(MAX_DEPTH):
        item = {"or": [item]}
    assert "nested" in invalid(where_of(item)).message


def test_number_of_conditions_is_capped() -> None:
    compile_predicates({"where": [["ID", "=", i] for i in range(MAX_TERMS)]}, COLUMNS)
    assert "too many" in invalid({"where": [["ID", "=", i] for i in range(MAX_TERMS + 1)]}).message


def test_error_path_inside_nested_groups() -> None:
    err = invalid(where_of(["ID", "=", 1], {"or": [["ID", "=", 1], {"and": [["NOPE", "=", 1]]}]}))
    assert err.data["path"] == "/where/1/or/1/and/0/0"


@pytest.mark.parametrize(
    ("order", "path"),
    [
        ("AGE", "/order_by"),
        ({"AGE": "desc"}, "/order_by"),
        ([["AGE", "down"]], "/order_by/0"),
        ([["AGE", "DESC"]], "/order_by/0"),
        ([["AGE"]], "/order_by/0"),
        ([["AGE", "asc", "x"]], "/order_by/0"),
        ([["NOPE", "asc"]], "/order_by/0/0"),
        (["AGE; DROP TABLE EMPLOYEE"], "/order_by/0/0"),
        ([5], "/order_by/0"),
    ],
)
def test_bad_order_by(order: Any, path: str) -> None:
    assert invalid({"order_by": order}).data["path"] == path


@pytest.mark.parametrize("key", ["limit", "offset"])
@pytest.mark.parametrize("value", [-1, 1.5, "10", True, [1], 2**63])
def test_bad_limit_and_offset(key: str, value: Any) -> None:
    assert invalid({key: value}).data["path"] == f"/{key}"


def test_allowed_columns_restrict_what_a_predicate_may_read() -> None:
    # A remote query passes only the synced columns: others are unknown.
    compile_predicates(where_of(["NAME", "=", "x"]), ("ID", "NAME"))
    assert invalid(where_of(["SALARY", "=", 1]), ("ID", "NAME")).data["column"] == "SALARY"
    assert invalid({"order_by": [["SALARY", "asc"]]}, ("ID", "NAME")).data["path"] == "/order_by/0/0"


# -- table_of / devices_of ---------------------------------------------------------------

def test_table_of() -> None:
    assert table_of({"table": "EMPLOYEE"}) == "EMPLOYEE"
    for bad in ({}, {"table": ""}, {"table": 3}, [], None):
        with pytest.raises(InvalidPredicate):
            table_of(bad)


def test_devices_of() -> None:
    assert devices_of({}) is None
    assert devices_of({"devices": "all"}) is None
    assert devices_of({"devices": ["a", "b"]}) == ["a", "b"]
    for bad in ("some", ["a", ""], ["a", 1], {"a": 1}, 5):
        with pytest.raises(InvalidPredicate) as info:
            devices_of({"devices": bad})
        assert info.value.data["path"] == "/devices"


def test_devices_key_is_accepted_by_the_compiler() -> None:
    assert compile_predicates({"table": "EMPLOYEE", "devices": "all"}, COLUMNS).where == ""
