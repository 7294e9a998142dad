"""One error tree: stable, unique names and codes, all documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from p2pstore import errors
from p2pstore.errors import InternalError, P2PStoreError, StoreNotOpen, all_error_classes, by_name

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
#: Every concrete error (the base class only exists to be caught).
CONCRETE = [cls for cls in all_error_classes() if cls is not P2PStoreError]


def test_every_error_class_of_the_module_is_in_the_tree() -> None:
    defined = {
        obj for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, P2PStoreError) and obj is not P2PStoreError
    }
    assert defined == set(CONCRETE)


def test_names_are_unique() -> None:
    names = [cls.name for cls in CONCRETE]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes, f"error names used twice: {dupes}"


def test_codes_are_unique() -> None:
    codes = [cls.code for cls in CONCRETE]
    dupes = {c: [cls.__name__ for cls in CONCRETE if cls.code == c] for c in codes if codes.count(c) > 1}
    assert not dupes, f"error codes used twice: {dupes}"


@pytest.mark.parametrize("cls", CONCRETE, ids=lambda c: c.__name__)
def test_name_and_code_shape(cls: type[P2PStoreError]) -> None:
    assert re.fullmatch(r"[A-Z][A-Z0-9_]*", cls.name)
    assert isinstance(cls.code, int)
    # JSON-RPC's own codes, or ours in -31999..-31000 (SPEC: grouped by layer).
    assert -32768 <= cls.code <= -32000 or -31999 <= cls.code <= -31000
    assert "name" not in vars(cls) or "code" in vars(cls), f"{cls.__name__} sets a name but inherits a code"


def test_standard_json_rpc_codes() -> None:
    assert (errors.ParseError.code, errors.InvalidRequest.code, errors.MethodNotFound.code,
            errors.InvalidParams.code, errors.InternalError.code) == (-32700, -32600, -32601, -32602, -32603)


def test_to_dict_carries_code_message_name_and_detail() -> None:
    err = StoreNotOpen("store s is not open", data={"store": "s"})
    assert err.to_dict() == {"code": -31100, "message": "store s is not open", "data": {"name": "STORE_NOT_OPEN", "store": "s"}}
    assert str(err) == "store s is not open"


def test_a_detail_called_name_does_not_mask_the_error_name() -> None:
    err = errors.DeviceUnknown("no device kitchen", data={"name": "kitchen"})
    assert err.to_dict()["data"]["name"] == "DEVICE_UNKNOWN"


def test_data_is_copied() -> None:
    detail = {"a": 1}
    err = StoreNotOpen("x", data=detail)
    detail["a"] = 2
    assert err.data == {"a": 1}


@pytest.mark.parametrize("cls", CONCRETE, ids=lambda c: c.__name__)
def test_by_name_finds_each_class(cls: type[P2PStoreError]) -> None:
    assert by_name(cls.name) is cls


def test_internal_error_name_maps_to_internal_error() -> None:
    assert by_name("INTERNAL_ERROR") is InternalError


def test_unknown_name_falls_back_to_the_base() -> None:
    assert by_name("NO_SUCH_ERROR") is P2PStoreError


def test_every_error_is_documented_in_api_md() -> None:
    if not DOC.exists():
        pytest.skip("docs/api.md not written yet")
    text = DOC.read_text()
    missing = [cls.name for cls in CONCRETE if f"`{cls.name}`" not in text]
    assert not missing, f"docs/api.md does not list: {missing}"
    wrong_code = [
        cls.name for cls in CONCRETE
        if not re.search(rf"\|\s*{cls.code}\s*\|\s*`{cls.name}`", text)
    ]
    assert not wrong_code, f"docs/api.md lists another code for: {wrong_code}"
