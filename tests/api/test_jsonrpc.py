"""The pure JSON-RPC codec: decoding requests, blobs both ways, encoding lines."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pstore.api.jsonrpc import (
    Request,
    RequestError,
    decode_request,
    encode_error,
    encode_notification,
    encode_request,
    encode_result,
    from_wire,
    to_wire,
    MAX_PARAMS_DEPTH,
)
from p2pstore.errors import InvalidParams, InvalidRequest, ParseError, StoreNotOpen


def req(**msg: Any) -> bytes:
    return json.dumps(msg).encode()


def decode_error(line: bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        decode_request(line)
    return info.value


# -- decode_request: valid -------------------------------------------------------

@pytest.mark.parametrize("rid", [1, 0, -5, "abc", "", 2**70])
def test_valid_request_with_any_legal_id(rid: Any) -> None:
    request = decode_request(req(jsonrpc="2.0", id=rid, method="device.info", params={"a": 1}))
    assert request == Request(rid, "device.info", {"a": 1})
    assert not request.is_notification


def test_request_without_id_is_a_notification() -> None:
    request = decode_request(req(jsonrpc="2.0", method="status"))
    assert request.id is None and request.is_notification
    assert request.params == {}


def test_null_params_mean_no_params() -> None:
    assert decode_request(req(jsonrpc="2.0", id=1, method="m", params=None)).params == {}


def test_trailing_newline_and_whitespace_are_fine() -> None:
    assert decode_request(b'  {"jsonrpc":"2.0","id":1,"method":"m"}\r\n').method == "m"


def test_non_ascii_text_is_fine() -> None:
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "m", "params": {"name": "Zoë 東京"}}, ensure_ascii=False).encode()
    assert decode_request(line).params == {"name": "Zoë 東京"}


# -- decode_request: every error ---------------------------------------------------

@pytest.mark.parametrize("line", [b"", b"{", b"not json", b'{"jsonrpc": "2.0",}', b"\xff\xfe{}", b"NaN-ish", b"{'a': 1}"])
def test_malformed_json_is_a_parse_error_without_id(line: bytes) -> None:
    err = decode_error(line)
    assert isinstance(err.error, ParseError)
    assert err.error.code == -32700 and err.error.name == "PARSE_ERROR"
    assert err.id is None


@pytest.mark.parametrize("line", [b"[" * 100_000, b'{"a":' * 100_000])
def test_json_nested_too_deep_is_a_parse_error_not_a_crash(line: bytes) -> None:
    # json.loads raises RecursionError here, which is not a ValueError.
    err = decode_error(line)
    assert isinstance(err.error, ParseError)


@pytest.mark.parametrize("line", [b"[]", b'[{"jsonrpc":"2.0","id":1,"method":"m"}]', b"1", b'"x"', b"null", b"true"])
def test_non_object_request_is_invalid(line: bytes) -> None:
    err = decode_error(line)
    assert isinstance(err.error, InvalidRequest)
    assert err.error.code == -32600 and err.id is None


@pytest.mark.parametrize("rid", [True, False, 1.5, [1], {"a": 1}])
def test_bad_id_types_are_invalid_and_not_echoed(rid: Any) -> None:
    err = decode_error(req(jsonrpc="2.0", id=rid, method="m"))
    assert isinstance(err.error, InvalidRequest)
    assert err.id is None


@pytest.mark.parametrize("version", [None, "1.0", 2.0, "2", 2])
def test_bad_jsonrpc_version_is_invalid_but_keeps_the_id(version: Any) -> None:
    msg: dict[str, Any] = {"id": 7, "method": "m"}
    if version is not None:
        msg["jsonrpc"] = version
    err = decode_error(req(**msg))
    assert isinstance(err.error, InvalidRequest)
    assert err.id == 7


@pytest.mark.parametrize("method", [None, "", 5, ["m"], {"m": 1}])
def test_bad_method_is_invalid(method: Any) -> None:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": "x"}
    if method is not None:
        msg["method"] = method
    err = decode_error(req(**msg))
    assert isinstance(err.error, InvalidRequest)
    assert err.id == "x"


@pytest.mark.parametrize("params", [[1, 2], "p", 5, True])
def test_positional_or_scalar_params_are_invalid_params(params: Any) -> None:
    err = decode_error(req(jsonrpc="2.0", id=3, method="m", params=params))
    assert isinstance(err.error, InvalidParams)
    assert err.error.code == -32602 and err.id == 3


def test_unknown_members_are_invalid() -> None:
    err = decode_error(req(jsonrpc="2.0", id=3, method="m", result=1))
    assert isinstance(err.error, InvalidRequest)
    assert "result" in err.error.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_either_decode_or_raise_request_error(data: bytes) -> None:
    try:
        request = decode_request(data)
    except RequestError as exc:
        assert exc.error.name in {"PARSE_ERROR", "INVALID_REQUEST", "INVALID_PARAMS"}
    else:
        assert isinstance(request.method, str) and isinstance(request.params, dict)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["jsonrpc", "id", "method", "params", "x"]), json_values))
def test_any_json_object_either_decodes_or_raises_request_error(msg: dict[str, Any]) -> None:
    try:
        decode_request(json.dumps(msg).encode())
    except RequestError as exc:
        assert exc.error.name in {"INVALID_REQUEST", "INVALID_PARAMS"}


# -- blobs ----------------------------------------------------------------------------

def blob(data: bytes) -> dict[str, str]:
    return {"$blob": base64.b64encode(data).decode()}


def test_from_wire_turns_blobs_into_bytes_anywhere() -> None:
    wire = {"values": {"PHOTO": blob(b"\x00\xff"), "NAME": "x"}, "params": [blob(b""), 1, None, [blob(b"a")]]}
    assert from_wire(wire) == {"values": {"PHOTO": b"\x00\xff", "NAME": "x"}, "params": [b"", 1, None, [b"a"]]}


@pytest.mark.parametrize("bad", ["not base64!", "AAA", "A===", "=AAA", "AA==AA==\n"])
def test_invalid_base64_is_invalid_params_naming_the_path(bad: str) -> None:
    with pytest.raises(InvalidParams) as info:
        from_wire({"values": {"PHOTO": {"$blob": bad}}})
    assert info.value.data["param"] == "params.values.PHOTO"


@pytest.mark.parametrize("bad", [{"$blob": 5}, {"$blob": None}, {"$blob": "AA==", "x": 1}, {"$blob": ["AA=="]}])
def test_malformed_blob_object_is_invalid_params(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidParams) as info:
        from_wire({"params": [bad]})
    assert info.value.data["param"] == "params.params[0]"


def test_to_wire_encodes_bytes_like_values_as_blobs() -> None:
    assert to_wire(b"\x01\x02") == {"$blob": "AQI="}
    assert to_wire(bytearray(b"\x01\x02")) == {"$blob": "AQI="}
    assert to_wire(memoryview(b"\x01\x02")) == {"$blob": "AQI="}
    assert to_wire({"rows": [(1, b"")]}) == {"rows": [[1, {"$blob": ""}]]}


def test_to_wire_turns_non_finite_floats_into_strings() -> None:
    assert to_wire([math.inf, -math.inf, 1.5]) == ["inf", "-inf", 1.5]
    assert to_wire(math.nan) == "nan"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_blob_round_trip(data: bytes) -> None:
    assert from_wire(to_wire({"v": [data]})) == {"v": [data]}
    assert from_wire(json.loads(json.dumps(to_wire(data)))) == data


# -- encoding ---------------------------------------------------------------------------

def one_line(data: bytes) -> dict[str, Any]:
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    return json.loads(data)


def test_encode_result() -> None:
    msg = one_line(encode_result(5, {"rows": [[b"\x00", "a\nb"]]}))
    assert msg == {"jsonrpc": "2.0", "id": 5, "result": {"rows": [[{"$blob": "AA=="}, "a\nb"]]}}


def test_encode_result_with_non_finite_float_is_still_valid_json() -> None:
    assert one_line(encode_result(1, [math.nan]))["result"] == ["nan"]


def test_encode_error_carries_code_message_and_name() -> None:
    err = StoreNotOpen("store x is not open", data={"store": "x"})
    msg = one_line(encode_error("r1", err))
    assert msg == {
        "jsonrpc": "2.0", "id": "r1",
        "error": {"code": err.code, "message": "store x is not open", "data": {"name": "STORE_NOT_OPEN", "store": "x"}},
    }


def test_encode_error_without_id_has_null_id() -> None:
    assert one_line(encode_error(None, ParseError("bad")))["id"] is None


def test_encode_notification_has_no_id() -> None:
    msg = one_line(encode_notification("dataChange", {"changes": [{"inserted": [b"k"]}]}))
    assert "id" not in msg
    assert msg == {"jsonrpc": "2.0", "method": "dataChange", "params": {"changes": [{"inserted": [{"$blob": "aw=="}]}]}}


def test_encode_request_round_trips_through_decode_and_from_wire() -> None:
    params = {"store": "s", "values": {"PHOTO": b"\x00\x01", "NAME": "Zoë\n"}, "params": [None, 1.5, b""]}
    request = decode_request(encode_request(9, "store.insert", params))
    assert request.id == 9 and request.method == "store.insert"
    assert from_wire(request.params) == params


def test_non_ascii_is_sent_as_utf8_not_escaped() -> None:
    assert "東京".encode() in encode_result(1, "東京")


# -- hostile text, numbers and nesting (issue 10, item 3) ---------------------------

#: A JSON ``\ud800`` escape: valid JSON syntax, but a lone UTF-16 surrogate that no UTF-8 can carry.
LONE = "\\ud800"


def test_a_lone_surrogate_in_the_id_is_invalid_request_answered_with_id_null() -> None:
    exc = decode_error(('{"jsonrpc":"2.0","id":"a' + LONE + '","method":"status"}').encode())
    assert isinstance(exc.error, InvalidRequest) and exc.id is None
    assert "surrogate" in exc.error.message
    encode_error(exc.id, exc.error).decode("utf-8")  # the answer itself encodes


@pytest.mark.parametrize("line", [
    '{"jsonrpc":"2.0","id":3,"method":"st' + LONE + 'atus"}',
    '{"jsonrpc":"2.0","id":3,"method":"status","x' + LONE + '":1}',
], ids=["method", "member name"])
def test_a_lone_surrogate_in_the_envelope_is_invalid_request(line: str) -> None:
    exc = decode_error(line.encode())
    assert isinstance(exc.error, InvalidRequest) and exc.id == 3
    encode_error(exc.id, exc.error).decode("utf-8")


@pytest.mark.parametrize(("params", "where"), [
    ('{"sql":"SELECT \'' + LONE + '\'"}', "params.sql"),
    ('{"values":{"n' + LONE + '":1}}', "params.values"),
    ('{"params":[1,["' + LONE + '"]]}', "params.params[1][0]"),
], ids=["value", "key", "nested"])
def test_a_lone_surrogate_in_params_is_invalid_params_naming_where(params: str, where: str) -> None:
    exc = decode_error(('{"jsonrpc":"2.0","id":4,"method":"store.query","params":' + params + "}").encode())
    assert isinstance(exc.error, InvalidParams) and exc.id == 4
    assert exc.error.data["param"] == where and where in exc.error.message


def test_paired_surrogates_are_just_text() -> None:
    request = decode_request(b'{"jsonrpc":"2.0","id":1,"method":"status","params":{"s":"\\ud83d\\ude00"}}')
    assert request.params == {"s": "\U0001f600"}


def test_deeply_nested_params_are_invalid_params_not_a_recursion_error() -> None:
    line = b'{"jsonrpc":"2.0","id":5,"method":"store.query","params":{"p":' + b"[" * 900 + b"]" * 900 + b"}}"
    exc = decode_error(line)
    assert isinstance(exc.error, InvalidParams) and exc.id == 5
    assert str(MAX_PARAMS_DEPTH) in exc.error.message


def test_nesting_up_to_the_limit_is_accepted() -> None:
    depth = MAX_PARAMS_DEPTH - 1  # params itself is the first level
    line = b'{"jsonrpc":"2.0","id":5,"method":"m","params":{"p":' + b"[" * depth + b"]" * depth + b"}}"
    value = decode_request(line).params["p"]
    for _ in range(depth - 1):
        value = value[0]
    assert value == []
    from_wire(decode_request(line).params)


@pytest.mark.parametrize("number", [str(2**63), str(-(2**63) - 1), "1" + "0" * 4000, "9" * 5000],
                         ids=["2**63", "-2**63-1", "4001 digits", "5000 digits"])
def test_an_integer_outside_64_bits_in_params_is_invalid_params(number: str) -> None:
    exc = decode_error(b'{"jsonrpc":"2.0","id":6,"method":"store.query","params":{"params":[' + number.encode() + b"]}}")
    assert isinstance(exc.error, InvalidParams) and exc.error.data["param"] == "params.params[0]"
    assert "64-bit" in exc.error.message
    encode_error(exc.id, exc.error)


def test_the_edges_of_the_64_bit_range_are_accepted() -> None:
    line = req(jsonrpc="2.0", id=1, method="m", params={"a": [2**63 - 1, -(2**63)]})
    assert decode_request(line).params == {"a": [2**63 - 1, -(2**63)]}


def test_an_id_with_more_digits_than_python_converts_is_invalid_request() -> None:
    exc = decode_error(b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"status"}')
    assert isinstance(exc.error, InvalidRequest) and exc.id is None


def test_the_error_path_can_not_fail() -> None:
    # Whatever ends up in an error (a lone surrogate echoed in a message, an id
    # that can't be encoded), the line is valid UTF-8 JSON.
    line = encode_error("x\ud800", InvalidParams("bad \udfff here", data={"param": "a\ud800"}))
    msg = json.loads(line.decode("utf-8"))
    assert msg["error"]["data"]["name"] == "INVALID_PARAMS"
    line = encode_error(1, InvalidParams("nan in data", data={"v": float("nan"), "o": object()}))
    msg = json.loads(line.decode("utf-8"))
    assert msg["id"] == 1 and msg["error"]["code"] == InvalidParams.code
