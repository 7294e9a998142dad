"""The result-size rule shared by store.query and remote query."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pstore.api.jsonrpc import encode_result, to_wire
from p2pstore.errors import ResultTooLarge
from p2pstore.protocol.results import ResultBudget, json_size

SQL_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False), st.text(), st.binary(),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.lists(SQL_VALUES, max_size=6), max_size=6), st.lists(st.text(max_size=20), max_size=6))
def test_the_budget_is_never_below_the_json_line(rows: list[list[Any]], columns: list[str]) -> None:
    budget = ResultBudget()
    budget.add_columns(columns)
    for row in rows:
        budget.add(row)
    line = encode_result(1, {"columns": columns, "rows": rows})
    envelope = len(encode_result(1, {"columns": [], "rows": []}))
    assert len(line) - envelope <= budget.bytes


@pytest.mark.parametrize("value", [b"\x00" * 3000, "x" * 1000, 'a"\\\n\x01' * 100, "é" * 100, 2**63 - 1, -1.5e-300, None])
def test_json_size_is_close_for_common_values(value: Any) -> None:
    actual = len(json.dumps(to_wire(value), ensure_ascii=False, separators=(",", ":")).encode())
    assert actual <= json_size(value) <= actual * 3 + 24


def test_the_budget_stops_at_either_cap() -> None:
    rows = ResultBudget(max_rows=2)
    rows.add([1])
    rows.add([2])
    with pytest.raises(ResultTooLarge):
        rows.add([3])
    size = ResultBudget(max_bytes=100)
    with pytest.raises(ResultTooLarge) as info:
        size.add([b"\x00" * 100])
    assert "100 bytes" in info.value.message
