"""Messages: round trips, self-validation, and one failure mode for bad bytes."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pstore.errors import ProtocolError
from p2pstore.protocol.messages import (
    Close,
    Hello,
    HelloReject,
    Message,
    Ping,
    Pong,
    StoreOffer,
    TableOffer,
    decode,
    encode,
    message_types,
    peek_protocol_version,
)

DEVICE = "MFZWI3D-BONSGYC-YLTMRWG-C43ENR5-QXGZDMM-FZWI3DB-ONSGYC2-YLTMRWG"


def sample_hello(**overrides: object) -> Hello:
    fields = dict(
        protocol_version=1,
        device_id=DEVICE,
        name="laptop",
        security_level=3,
        stores=(
            StoreOffer(
                bundle="default",
                store="hr",
                security_label=2,
                table_type="single_version",
                tables=(
                    TableOffer("EMPLOYEE", 3, ("UUID", "NAME", "AGE"), "UUID"),
                    TableOffer("DEPT", None, (), None),
                ),
            ),
        ),
    )
    fields.update(overrides)
    return Hello(**fields)  # type: ignore[arg-type]


ALL_MESSAGES: list[Message] = [
    sample_hello(),
    sample_hello(stores=(), name=""),
    HelloReject("peer speaks protocol 2, this device speaks 1"),
    Ping(0),
    Ping(2**64 - 1),
    Pong(12345),
    Close("bye"),
]


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    assert decode(encode(msg)) == msg


def test_registry_lists_every_message_type() -> None:
    assert {"hello", "hello_reject", "ping", "pong", "close"} <= set(message_types())


def test_messages_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Ping(1).nonce = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "bad",
    [
        dict(protocol_version=0),
        dict(protocol_version=True),
        dict(protocol_version="1"),
        dict(security_level=5),
        dict(security_level=0),
        dict(device_id=""),
        dict(device_id="x" * 65),
        dict(device_id="dev\x00ice"),
        dict(name="n" * 256),
        dict(stores=[]),
        dict(stores=(StoreOffer("b", "s", 1, "collaborative", ()),) * 2),
    ],
)
def test_hello_validates_itself(bad: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        sample_hello(**bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda: StoreOffer("b", "s", 5, "collaborative", ()),
        lambda: StoreOffer("b", "s", 1, "device", ()),
        lambda: StoreOffer("", "s", 1, "collaborative", ()),
        lambda: StoreOffer("b", "s", 1, "collaborative", (TableOffer("t", 1, (), None),) * 2),
        lambda: TableOffer("t", -1, (), None),
        lambda: TableOffer("t", 1, ("a", "a"), None),
        lambda: TableOffer("t", 1, ["a"], None),  # list, not tuple
        lambda: TableOffer("", None, (), None),
        lambda: Ping(-1),
        lambda: Ping(2**64),
        lambda: Pong(1.0),
        lambda: Close(b"bytes"),
        lambda: HelloReject("r" * 2000),
    ],
)
def test_structs_validate_themselves(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolError):
        make()


def wire(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def hello_body() -> dict[str, object]:
    return msgpack.unpackb(encode(sample_hello()), raw=False)[1]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        wire(["hello"]),
        wire(["hello", {}, 1]),
        wire({"hello": {}}),
        wire(["nope", {}]),
        wire([1, {"nonce": 1}]),
        wire(["ping", {"nonce": 1, "extra": 2}]),
        wire(["ping", {}]),
        wire(["ping", {"nonce": "1"}]),
        wire(["ping", {"nonce": True}]),
        wire(["ping", {"nonce": -5}]),
        wire(["ping", {1: 1}]),
        wire(["close", {"reason": b"binary"}]),
        wire(["ping", {"nonce": 1}]) + b"\x00",  # trailing bytes
        wire(["hello", {**hello_body(), "stores": [{"bundle": "b"}]}]),
        wire(["hello", {**hello_body(), "stores": "x"}]),
        wire(["hello", {**hello_body(), "security_level": 9}]),
        b"\x92\xa5close\x81\xa6reason\xa2\xff\xfe",  # invalid UTF-8 in a str
        msgpack.packb(["ping", {"nonce": msgpack.ExtType(1, b"x")}]),
        msgpack.packb(["ping", {"nonce": msgpack.Timestamp(1, 0)}], datetime=False),
        b"\x91" * 5000,  # deep nesting
    ],
)
def test_bad_payloads_raise_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(payload)


def test_bytes_and_str_and_big_ints_keep_their_types() -> None:
    # Future sync messages carry SQLite values; the msgpack settings must keep
    # bytes apart from str and carry the full 64-bit integer range.
    values = [b"\x00\xff", "\u00e9t\u00e9", -(2**63), 2**63 - 1, 2**64 - 1, 1.5, None, 0]
    packed = msgpack.packb(values, use_bin_type=True)
    assert msgpack.unpackb(packed, raw=False, strict_map_key=True) == values
    assert [type(v) for v in msgpack.unpackb(packed, raw=False)] == [type(v) for v in values]
    assert decode(encode(Ping(2**64 - 1))) == Ping(2**64 - 1)


def test_peek_protocol_version_reads_future_hellos() -> None:
    future = wire(["hello", {"protocol_version": 7, "new_field": [1, 2]}])
    with pytest.raises(ProtocolError):
        decode(future)
    assert peek_protocol_version(future) == 7
    assert peek_protocol_version(b"\xc1") is None
    assert peek_protocol_version(wire(["ping", {"nonce": 1}])) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    try:
        msg = decode(data)
    except ProtocolError:
        return
    assert isinstance(msg, Message)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(tag=st.sampled_from(["hello", "hello_reject", "ping", "pong", "close", "x"]), body=msgpack_values)
def test_structured_garbage_decodes_or_raises_protocol_error(tag: str, body: object) -> None:
    try:
        msg = decode(wire([tag, body]))
    except ProtocolError:
        return
    assert isinstance(msg, Message)
    assert decode(encode(msg)) == msg
