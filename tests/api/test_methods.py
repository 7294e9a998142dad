"""The method table and the API JSON Schema describe the same methods."""

from __future__ import annotations

import jsonschema
import pytest

from p2pstore.api.methods import METHODS, check_params
from p2pstore.schemas import load_json_schema
from p2pstore.errors import InvalidParams

SCHEMA = load_json_schema("api.schema.json")


def test_every_method_has_a_params_schema_and_back() -> None:
    assert set(METHODS) == set(SCHEMA["methods"])


@pytest.mark.parametrize("method", sorted(SCHEMA["methods"]))
def test_each_params_schema_is_a_closed_object(method: str) -> None:
    schema = {**SCHEMA["methods"][method], "$defs": SCHEMA["$defs"]}
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False, f"{method} must refuse unknown params"
    with pytest.raises(InvalidParams):
        check_params(method, {"surely_not_a_param": 1})


def test_check_params_names_the_param() -> None:
    with pytest.raises(InvalidParams) as info:
        check_params("store.insert", {"store": "s", "table": 5, "values": {}})
    assert info.value.data["param"] == "table"
    check_params("store.insert", {"store": "s", "table": "T", "values": {"b": {"$blob": "AA=="}, "n": None}})
