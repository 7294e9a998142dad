"""Certificate announcement parsing: exact, capped, and strict about extra bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pstore.errors import ProtocolError
from p2pstore.protocol.prologue import HEADER_SIZE, MAX_CERT_SIZE, PrologueParser, encode_prologue

CERT = bytes(range(256)) + b"tail"


def test_round_trip_in_pieces() -> None:
    data = encode_prologue(CERT)
    parser = PrologueParser()
    results = [parser.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[:-1] == [None] * (len(data) - 1)
    assert results[-1] == CERT


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
        b"GET / HTTP/1.1\r\n",
        b"P2PX",
        b"P2PS\x02\x00\x10",  # unknown version
        b"P2PS\x01\x00\x00",  # empty certificate
        b"P2PS\x01" + (MAX_CERT_SIZE + 1).to_bytes(2, "big"),
    ],
)
def test_bad_greetings_fail_early(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        PrologueParser().feed(data)


def test_bytes_after_announcement_are_refused() -> None:
    with pytest.raises(ProtocolError, match="before TLS"):
        PrologueParser().feed(encode_prologue(CERT) + b"\x16")
    parser = PrologueParser()
    assert parser.feed(encode_prologue(CERT)) == CERT
    with pytest.raises(ProtocolError):
        parser.feed(b"x")


def test_encode_refuses_oversize() -> None:
    with pytest.raises(ProtocolError):
        encode_prologue(b"x" * (MAX_CERT_SIZE + 1))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_parse_or_raise_protocol_error(data: bytes) -> None:
    parser = PrologueParser()
    try:
        cert = parser.feed(data)
    except ProtocolError:
        return
    assert cert is None or len(data) == HEADER_SIZE + len(cert)
