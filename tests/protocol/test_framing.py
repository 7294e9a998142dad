"""Framing: frames survive any split or merge; oversize lengths fail early."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pstore.errors import ProtocolError
from p2pstore.protocol.framing import MAX_FRAME_SIZE, FrameDecoder, encode_frame


def test_round_trip_single_frame() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(b"hello")) == [b"hello"]
    assert decoder.buffered == 0


def test_frame_split_byte_by_byte() -> None:
    data = encode_frame(b"abc") + encode_frame(b"defg")
    decoder = FrameDecoder()
    out: list[bytes] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert out == [b"abc", b"defg"]


def test_merged_frames_in_one_feed() -> None:
    data = b"".join(encode_frame(bytes([i]) * (i + 1)) for i in range(10))
    assert FrameDecoder().feed(data) == [bytes([i]) * (i + 1) for i in range(10)]


def test_partial_frame_is_kept_until_complete() -> None:
    decoder = FrameDecoder()
    frame = encode_frame(b"x" * 100)
    assert decoder.feed(frame[:50]) == []
    assert decoder.buffered == 50
    assert decoder.feed(frame[50:] + frame[:3]) == [b"x" * 100]
    assert decoder.buffered == 3


def test_oversize_length_refused_before_buffering_payload() -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    with pytest.raises(ProtocolError, match="1025 bytes"):
        decoder.feed(struct.pack(">I", 1025))
    # The default cap is the named constant.
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME_SIZE + 1))


def test_max_size_frame_accepted() -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    assert decoder.feed(encode_frame(b"y" * 1024, max_frame_size=1024)) == [b"y" * 1024]


def test_empty_frame_is_an_error() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError):
        encode_frame(b"")


def test_encode_refuses_oversize() -> None:
    with pytest.raises(ProtocolError):
        encode_frame(b"z" * 11, max_frame_size=10)


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=10),
)
def test_any_split_yields_the_same_frames(payloads: list[bytes], cuts: list[int]) -> None:
    data = b"".join(encode_frame(p) for p in payloads)
    points = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    decoder = FrameDecoder()
    out: list[bytes] = []
    for a, b in zip(points, points[1:]):
        out += decoder.feed(data[a:b])
    assert out == payloads
    assert decoder.buffered == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_either_decode_or_raise_protocol_error(data: bytes) -> None:
    decoder = FrameDecoder(max_frame_size=4096)
    try:
        frames = decoder.feed(data)
    except ProtocolError:
        return
    assert all(0 < len(f) <= 4096 for f in frames)
    assert decoder.buffered <= 4 + 4096
