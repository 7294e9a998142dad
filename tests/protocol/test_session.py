"""Session: bytes in, events out; no sockets, no event loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import msgpack
import pytest

from p2pstore.errors import ProtocolError
from p2pstore.protocol.framing import FrameDecoder, encode_frame
from p2pstore.protocol.messages import (
    Close,
    Hello,
    HelloReject,
    Message,
    Ping,
    Pong,
    StoreOffer,
    decode,
    encode,
    register,
)
from p2pstore.protocol.session import (
    _TRANSITIONS,
    Closed,
    HelloReceived,
    MessageReceived,
    PongReceived,
    Session,
    State,
)

A = "AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA"
B = "BBBBBBB-BBBBBBB-BBBBBBB-BBBBBBB-BBBBBBB-BBBBBBB-BBBBBBB-BBBBBBB"


def hello(device: str, version: int = 1, name: str = "dev") -> Hello:
    return Hello(version, device, name, 2, (StoreOffer("default", "s", 1, "collaborative", ()),))


def frames(data: bytes) -> list[object]:
    return [decode(p) for p in FrameDecoder().feed(data)]


def pair(va: int = 1, vb: int = 1) -> tuple[Session, Session, bytes, bytes]:
    a = Session(hello(A, va), is_dialer=True, expected_device_id=B)
    b = Session(hello(B, vb), is_dialer=False, expected_device_id=A)
    return a, b, a.start(), b.start()


def test_hello_exchange_opens_both_sides() -> None:
    a, b, ha, hb = pair()
    assert a.state is State.AWAIT_HELLO
    assert a.receive_data(hb) == [HelloReceived(hello(B))]
    assert b.receive_data(ha) == [HelloReceived(hello(A))]
    assert a.state is b.state is State.OPEN
    assert a.peer_hello == hello(B) and b.peer_hello == hello(A)
    assert a.data_to_send() == b"" and b.data_to_send() == b""


def test_messages_flow_after_open_and_ping_is_answered() -> None:
    a, b, ha, hb = pair()
    a.receive_data(hb)
    b.receive_data(ha)
    assert b.receive_data(a.send(Ping(7))) == []
    pong = b.data_to_send()
    assert frames(pong) == [Pong(7)]
    assert a.receive_data(pong) == [PongReceived(7)]


@register
@dataclass(frozen=True, slots=True)
class Note(Message):
    """A message type defined only here: adding one takes this much."""

    TYPE: ClassVar[str] = "test.note"
    text: str
    value: int | float | str | bytes | None


def test_application_messages_surface_as_message_received() -> None:
    a, b, ha, hb = pair()
    a.receive_data(hb)
    b.receive_data(ha)
    data = a.send(Note("x", b"\x00")) + a.send(Note("y", None))
    assert b.receive_data(data) == [MessageReceived(Note("x", b"\x00")), MessageReceived(Note("y", None))]


def test_version_mismatch_rejected_on_both_sides() -> None:
    a, b, ha, hb = pair(va=1, vb=2)
    ev_a = a.receive_data(hb)
    ev_b = b.receive_data(ha)
    assert ev_a == [Closed("peer speaks protocol 2, this device speaks 1", by_peer=False)]
    assert ev_b == [Closed("peer speaks protocol 1, this device speaks 2", by_peer=False)]
    assert a.state is b.state is State.CLOSED
    assert frames(a.data_to_send()) == [HelloReject("peer speaks protocol 2, this device speaks 1")]
    assert frames(b.data_to_send()) == [HelloReject("peer speaks protocol 1, this device speaks 2")]


def test_reject_received_closes_the_session() -> None:
    a, b, ha, hb = pair(va=1, vb=2)
    b.receive_data(ha)
    reject = b.data_to_send()
    events = a.receive_data(reject)
    assert events == [Closed("peer rejected our HELLO: peer speaks protocol 1, this device speaks 2", by_peer=True)]
    assert a.state is State.CLOSED


def test_reject_after_we_accepted_their_hello_closes_the_session() -> None:
    a, b, ha, hb = pair()
    a.receive_data(hb)
    assert a.state is State.OPEN
    events = a.receive_data(encode_frame(encode(HelloReject("not you"))))
    assert events == [Closed("peer rejected our HELLO: not you", by_peer=True)]


def test_future_hello_shape_still_gets_the_version_answer() -> None:
    a = Session(hello(A), is_dialer=True)
    a.start()
    future = msgpack.packb(["hello", {"protocol_version": 3, "capabilities": ["x"]}], use_bin_type=True)
    events = a.receive_data(encode_frame(future))
    assert events == [Closed("peer speaks protocol 3, this device speaks 1", by_peer=False)]


def test_hello_with_wrong_device_id_is_rejected() -> None:
    a = Session(hello(A), is_dialer=True, expected_device_id=B)
    a.start()
    events = a.receive_data(encode_frame(encode(hello("CCCCCCC-imposter"))))
    assert len(events) == 1 and isinstance(events[0], Closed)
    assert "certificate proves " + B in events[0].reason
    assert isinstance(frames(a.data_to_send())[0], HelloReject)


def test_hello_claiming_to_be_us_is_rejected() -> None:
    a = Session(hello(A), is_dialer=True)
    a.start()
    (event,) = a.receive_data(encode_frame(encode(hello(A))))
    assert isinstance(event, Closed) and "this device" in event.reason


def test_message_before_hello_is_a_protocol_error() -> None:
    a = Session(hello(A), is_dialer=True)
    a.start()
    with pytest.raises(ProtocolError, match="ping before HELLO"):
        a.receive_data(encode_frame(encode(Ping(1))))
    assert a.state is State.CLOSED
    (close,) = frames(a.data_to_send())
    assert isinstance(close, Close) and "before HELLO" in close.reason
    # Nothing more is processed or sent after the failure.
    assert a.receive_data(encode_frame(encode(hello(B)))) == []
    with pytest.raises(ProtocolError):
        a.send(Ping(2))


def test_second_hello_is_a_protocol_error() -> None:
    a, b, ha, hb = pair()
    a.receive_data(hb)
    with pytest.raises(ProtocolError):
        a.receive_data(hb)


def test_garbage_is_a_protocol_error() -> None:
    a = Session(hello(A), is_dialer=True)
    a.start()
    with pytest.raises(ProtocolError):
        a.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    assert a.state is State.CLOSED


def test_cannot_send_before_open_or_send_session_messages() -> None:
    a = Session(hello(A), is_dialer=True)
    a.start()
    with pytest.raises(ProtocolError, match="await_hello"):
        a.send(Ping(1))
    with pytest.raises(ProtocolError):
        a.send(Close("x"))  # use close()
    with pytest.raises(ProtocolError):
        a.start()


def test_receive_before_start_is_refused() -> None:
    with pytest.raises(ProtocolError):
        Session(hello(A), is_dialer=True).receive_data(b"")


def test_close_both_ways() -> None:
    a, b, ha, hb = pair()
    a.receive_data(hb)
    b.receive_data(ha)
    data = a.close("device untrusted")
    assert a.state is State.CLOSED and a.close("again") == b""
    assert b.receive_data(data) == [Closed("peer closed the connection: device untrusted", by_peer=True)]
    assert b.state is State.CLOSED


def test_close_during_hello_wait() -> None:
    a, b, ha, hb = pair()
    assert b.receive_data(a.close("shutting down")) == [
        Closed("peer closed the connection: shutting down", by_peer=True)
    ]


def test_events_split_across_reads() -> None:
    a, b, ha, hb = pair()
    data = hb
    events = []
    for i in range(len(data)):
        events += a.receive_data(data[i : i + 1])
    assert events == [HelloReceived(hello(B))]


def test_oversized_frame_closes_session() -> None:
    a = Session(hello(A), is_dialer=True, max_frame_size=1024)
    a.start()
    with pytest.raises(ProtocolError):
        a.receive_data(b"\x00\x10\x00\x00")
    assert a.state is State.CLOSED


def test_transition_table_is_the_only_way_out_of_closed() -> None:
    outs = {new for (old, _), new in _TRANSITIONS.items() if old is State.CLOSED}
    assert outs == {State.CLOSED}
