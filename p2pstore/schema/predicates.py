"""Structured predicates (SPEC §5) compiled to bound SQL.

A predicate never carries SQL text: column names are checked against the
columns the caller allows (the table's columns locally, the synced columns
for a peer's remote query) and every value is bound as a parameter. This is
the one place that turns predicates into SQL, for local writes, sync filters
and remote queries alike.

Shape::

    {"table": "EMPLOYEE", "devices": [...] | "all",
     "where": [["AGE", ">", 18], {"or": [["NAME", "like", "a%"], ["SALARY", "is_null"]]}],
     "order_by": [["AGE", "desc"]], "limit": 100, "offset": 0}
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import base64
import binascii
import json

from p2pstore.errors import InvalidPredicate

#: Nesting depth and item count caps keep a hostile predicate from costing
#: the daemon unbounded work.
MAX_DEPTH = 16
MAX_TERMS = 1000
MAX_IN_VALUES = 10_000

BINARY_OPS = {"=": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">=", "like": "LIKE"}
UNARY_OPS = {"is_null": "IS NULL", "is_not_null": "IS NOT NULL"}
LIST_OPS = {"in": "IN", "not_in": "NOT IN"}
ALL_OPS = sorted([*BINARY_OPS, *UNARY_OPS, *LIST_OPS, "between"])
PREDICATE_KEYS = {"table", "devices", "where", "order_by", "limit", "offset"}


def quote_ident(name: str) -> str:
    """Quote an identifier for SQLite. Callers still check names first."""
    return '"' + name.replace('"', '""') + '"'


def is_sql_value(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, bytes))


@dataclass(frozen=True, slots=True)
class CompiledQuery:
    """Bound SQL fragments: ``where`` is "" when there is no condition."""

    where: str = ""
    params: tuple[Any, ...] = ()
    order_by: str = ""
    limit: int | None = None
    offset: int | None = None
    columns_used: frozenset[str] = field(default_factory=frozenset)

    def tail(self) -> tuple[str, tuple[Any, ...]]:
        """``WHERE ... ORDER BY ... LIMIT ? OFFSET ?`` and its parameters."""
        sql = f" WHERE {self.where}" if self.where else ""
        params = list(self.params)
        if self.order_by:
            sql += f" ORDER BY {self.order_by}"
        if self.limit is not None or self.offset is not None:
            sql += " LIMIT ? OFFSET ?"
            params += [-1 if self.limit is None else self.limit, self.offset or 0]
        return sql, tuple(params)


def table_of(predicates: Any) -> str:
    """The table a predicate names; every write/sync predicate must name one."""
    if not isinstance(predicates, dict):
        raise InvalidPredicate("predicates must be an object", data={"path": "/"})
    table = predicates.get("table")
    if not isinstance(table, str) or not table:
        raise InvalidPredicate("predicates.table must name a table", data={"path": "/table"})
    return table


def devices_of(predicates: dict[str, Any]) -> list[str] | None:
    """Target device IDs, or None for 'all online trusted devices'."""
    devices = predicates.get("devices")
    if devices is None or devices == "all":
        return None
    if not isinstance(devices, list) or not all(isinstance(d, str) and d for d in devices):
        raise InvalidPredicate('predicates.devices must be a list of device IDs or "all"', data={"path": "/devices"})
    return devices


def compile_predicates(predicates: Any, columns: Collection[str]) -> CompiledQuery:
    """Check ``predicates`` against ``columns`` and compile it.

    Raises InvalidPredicate naming the JSON path of the first problem.
    """
    if predicates is None:
        return CompiledQuery()
    if not isinstance(predicates, dict):
        raise InvalidPredicate("predicates must be an object", data={"path": "/"})
    unknown = set(predicates) - PREDICATE_KEYS
    if unknown:
        raise InvalidPredicate(f"unknown predicate key(s): {', '.join(sorted(unknown))}", data={"path": "/"})
    allowed = set(columns)
    used: set[str] = set()
    params: list[Any] = []
    where_items = predicates.get("where", [])
    if not isinstance(where_items, list):
        raise InvalidPredicate("predicates.where must be a list", data={"path": "/where"})
    counter = [0]
    parts = [_term(item, f"/where/{i}", allowed, used, params, 1, counter) for i, item in enumerate(where_items)]
    where = " AND ".join(parts)
    order_by = _order_by(predicates.get("order_by"), allowed, used)
    limit = _count(predicates, "limit")
    offset = _count(predicates, "offset")
    return CompiledQuery(where, tuple(params), order_by, limit, offset, frozenset(used))


def _column(name: Any, path: str, allowed: set[str], used: set[str]) -> str:
    if not isinstance(name, str):
        raise InvalidPredicate(f"{path}: column name must be a string", data={"path": path})
    if name not in allowed:
        raise InvalidPredicate(f"{path}: unknown column {name!r}", data={"path": path, "column": name})
    used.add(name)
    return quote_ident(name)


def _value(value: Any, path: str) -> Any:
    if not is_sql_value(value):
        raise InvalidPredicate(f"{path}: value must be null, a number, a string or a blob", data={"path": path})
    return value


def _term(item: Any, path: str, allowed: set[str], used: set[str], params: list[Any], depth: int, counter: list[int]) -> str:
    counter[0] += 1
    if counter[0] > MAX_TERMS:
        raise InvalidPredicate(f"too many conditions (max {MAX_TERMS})", data={"path": path})
    if depth > MAX_DEPTH:
        raise InvalidPredicate(f"conditions nested too deeply (max {MAX_DEPTH})", data={"path": path})
    if isinstance(item, dict):
        if len(item) != 1 or next(iter(item)) not in ("and", "or"):
            raise InvalidPredicate(f'{path}: a group must be {{"and": [...]}} or {{"or": [...]}}', data={"path": path})
        (joiner, inner), = item.items()
        if not isinstance(inner, list) or not inner:
            raise InvalidPredicate(f"{path}/{joiner}: must be a non-empty list", data={"path": f"{path}/{joiner}"})
        sub = [_term(x, f"{path}/{joiner}/{i}", allowed, used, params, depth + 1, counter) for i, x in enumerate(inner)]
        return "(" + f" {joiner.upper()} ".join(sub) + ")"
    if not isinstance(item, list) or len(item) < 2:
        raise InvalidPredicate(f"{path}: a condition is [column, op, value...]", data={"path": path})
    column = _column(item[0], f"{path}/0", allowed, used)
    op = item[1]
    if not isinstance(op, str) or op not in ALL_OPS:
        raise InvalidPredicate(f"{path}/1: unknown operator {op!r}; use one of {', '.join(ALL_OPS)}", data={"path": f"{path}/1"})
    args = item[2:]
    if op in UNARY_OPS:
        _arity(args, 0, path, op)
        return f"{column} {UNARY_OPS[op]}"
    if op in BINARY_OPS:
        _arity(args, 1, path, op)
        params.append(_value(args[0], f"{path}/2"))
        return f"{column} {BINARY_OPS[op]} ?"
    if op == "between":
        _arity(args, 2, path, op)
        params.extend((_value(args[0], f"{path}/2"), _value(args[1], f"{path}/3")))
        return f"{column} BETWEEN ? AND ?"
    _arity(args, 1, path, op)
    values = args[0]
    if not isinstance(values, list) or len(values) > MAX_IN_VALUES:
        raise InvalidPredicate(f"{path}/2: {op} takes a list of at most {MAX_IN_VALUES} values", data={"path": f"{path}/2"})
    if not values:
        return "0" if op == "in" else "1"
    params.extend(_value(v, f"{path}/2/{i}") for i, v in enumerate(values))
    return f"{column} {LIST_OPS[op]} ({', '.join('?' * len(values))})"


def _arity(args: Sequence[Any], n: int, path: str, op: str) -> None:
    if len(args) != n:
        raise InvalidPredicate(f"{path}: operator {op!r} takes {n} value(s), got {len(args)}", data={"path": path})


def _order_by(order: Any, allowed: set[str], used: set[str]) -> str:
    if order is None:
        return ""
    if not isinstance(order, list):
        raise InvalidPredicate("predicates.order_by must be a list of [column, asc|desc]", data={"path": "/order_by"})
    parts = []
    for i, entry in enumerate(order):
        path = f"/order_by/{i}"
        if isinstance(entry, str):
            entry = [entry, "asc"]
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] not in ("asc", "desc"):
            raise InvalidPredicate(f"{path}: must be [column, \"asc\"|\"desc\"]", data={"path": path})
        parts.append(f"{_column(entry[0], path + '/0', allowed, used)} {entry[1].upper()}")
    return ", ".join(parts)


def _count(predicates: dict[str, Any], key: str) -> int | None:
    value = predicates.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 2**62:
        raise InvalidPredicate(f"predicates.{key} must be a non-negative integer", data={"path": f"/{key}"})
    return value


# Predicates as they travel between devices (remote query, query sync): one encoding.


def encode_predicates(predicates: dict[str, Any]) -> str:
    """Predicates as JSON text for QueryRequest; blob values as ``{"$blob": "<base64>"}`` (as in the API)."""
    def blob(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return {"$blob": base64.b64encode(bytes(value)).decode("ascii")}
        raise TypeError(f"a {type(value).__name__} can't be a predicate value")
    return json.dumps(predicates, default=blob)


def decode_predicates(text: str) -> Any:
    """The inverse of ``encode_predicates``; a malformed blob is an InvalidPredicate."""
    def hook(obj: dict[str, Any]) -> Any:
        if "$blob" not in obj:
            return obj
        data = obj["$blob"]
        if len(obj) != 1 or not isinstance(data, str):
            raise InvalidPredicate('a blob value is {"$blob": "<base64>"}')
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidPredicate("invalid base64 in a $blob value") from None
    return json.loads(text, object_hook=hook)
