"""The per-connection protocol state machine, sans I/O (in the manner of h11).

A ``Session`` is fed the bytes read from an authenticated connection and
returns events; it turns messages to send into bytes. The caller owns the
socket, the timers and the TLS; this module owns the rules:

- Each side sends exactly one HELLO first (``start()``), then waits for the
  peer's. The connection is OPEN when the peer's HELLO has been accepted.
- A HELLO is accepted when the peer speaks our protocol version, names the
  device its certificate proves (``expected_device_id``) and is not this
  device. Otherwise the session queues a ``HelloReject`` with the reason
  and reports ``Closed``; the peer, seeing the reject (or making the same
  check itself), reports ``Closed`` too.
- Anything but HELLO before HELLO, a second HELLO, or undecodable bytes is a
  ``ProtocolError``: the session queues a ``Close`` naming the problem,
  moves to CLOSED and raises. The caller sends ``data_to_send()`` and drops
  the connection.
- Pings are answered here (a ``Pong`` lands in ``data_to_send()``), so the
  keepalive works however slowly the application consumes messages.
- After CLOSED, received bytes are ignored and nothing more can be sent.

Every state change goes through ``_TRANSITIONS``: a pair missing from that
table is, by definition, a protocol violation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from p2pstore.errors import ProtocolError
from p2pstore.protocol.framing import MAX_FRAME_SIZE, FrameDecoder, encode_frame
from p2pstore.protocol.messages import (
    MAX_REASON_LEN,
    Close,
    Hello,
    HelloReject,
    Message,
    Ping,
    Pong,
    decode,
    encode,
    peek_protocol_version,
)


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    OPEN = "open"
    CLOSED = "closed"


class Input(enum.Enum):
    """What can happen to a session; the keys of the transition table."""

    HELLO_ACCEPTED = "hello accepted"
    HELLO_REFUSED = "hello refused"
    HELLO = "hello"
    REJECT_RECEIVED = "hello_reject"
    CLOSE_RECEIVED = "close"
    MESSAGE_RECEIVED = "message"
    SEND = "send"
    LOCAL_CLOSE = "local close"
    ERROR = "protocol error"


_TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.AWAIT_HELLO, Input.HELLO_ACCEPTED): State.OPEN,
    (State.AWAIT_HELLO, Input.HELLO_REFUSED): State.CLOSED,
    (State.AWAIT_HELLO, Input.REJECT_RECEIVED): State.CLOSED,
    (State.AWAIT_HELLO, Input.CLOSE_RECEIVED): State.CLOSED,
    (State.AWAIT_HELLO, Input.LOCAL_CLOSE): State.CLOSED,
    (State.AWAIT_HELLO, Input.ERROR): State.CLOSED,
    (State.OPEN, Input.MESSAGE_RECEIVED): State.OPEN,
    (State.OPEN, Input.SEND): State.OPEN,
    (State.OPEN, Input.CLOSE_RECEIVED): State.CLOSED,
    # We may have accepted the peer's HELLO before it refused ours.
    (State.OPEN, Input.REJECT_RECEIVED): State.CLOSED,
    (State.OPEN, Input.LOCAL_CLOSE): State.CLOSED,
    (State.OPEN, Input.ERROR): State.CLOSED,
    (State.CLOSED, Input.LOCAL_CLOSE): State.CLOSED,
    (State.CLOSED, Input.ERROR): State.CLOSED,
}


# --------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """The peer's HELLO was accepted; the session is OPEN."""

    hello: Hello


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """An application message (never HELLO, Ping, Pong or Close)."""

    message: Message


@dataclass(frozen=True, slots=True)
class PongReceived:
    """Answer to one of our pings (lets the caller measure round trips)."""

    nonce: int


@dataclass(frozen=True, slots=True)
class Closed:
    """The session ended; ``by_peer`` tells who decided."""

    reason: str
    by_peer: bool


Event = HelloReceived | MessageReceived | PongReceived | Closed


def version_mismatch(local: int, peer: int) -> str | None:
    """Why two protocol versions can't talk, or None if they can.

    The one compatibility rule: versions must be equal. HELLO's own shape is
    frozen, so any later version can still read it and say why it refuses.
    """
    if local == peer:
        return None
    return f"peer speaks protocol {peer}, this device speaks {local}"


class Session:
    """One connection's protocol state. Not thread-safe; one owner."""

    def __init__(
        self,
        local_hello: Hello,
        *,
        is_dialer: bool,
        expected_device_id: str | None = None,
        max_frame_size: int = MAX_FRAME_SIZE,
    ) -> None:
        self.local_hello = local_hello
        self.is_dialer = is_dialer
        self.expected_device_id = expected_device_id
        self.peer_hello: Hello | None = None
        self.close_reason: str | None = None
        self._state = State.AWAIT_HELLO
        self._started = False
        self._decoder = FrameDecoder(max_frame_size)
        self._max_frame_size = max_frame_size
        self._outbox = bytearray()

    @property
    def state(self) -> State:
        return self._state

    def _advance(self, what: Input) -> None:
        new = _TRANSITIONS.get((self._state, what))
        if new is None:
            raise ProtocolError(f"{what.value} is not allowed in state {self._state.value}")
        self._state = new

    def _frame(self, msg: Message) -> bytes:
        return encode_frame(encode(msg), max_frame_size=self._max_frame_size)

    # -- sending -----------------------------------------------------------

    def start(self) -> bytes:
        """Our HELLO frame; call once, before ``receive_data``."""
        if self._started:
            raise ProtocolError("HELLO was already sent")
        self._started = True
        return self._frame(self.local_hello)

    def send(self, msg: Message) -> bytes:
        """Bytes for one application message; only once the session is OPEN."""
        if isinstance(msg, (Hello, HelloReject, Close)):
            raise ProtocolError(f"{msg.TYPE} is sent by the session itself, not with send()")
        if (self._state, Input.SEND) not in _TRANSITIONS:
            raise ProtocolError(f"cannot send {msg.TYPE} in state {self._state.value}")
        data = self._frame(msg)
        self._advance(Input.SEND)
        return data

    def close(self, reason: str) -> bytes:
        """End the session; returns the ``Close`` frame (empty if already closed)."""
        if self._state is State.CLOSED:
            return b""
        self._advance(Input.LOCAL_CLOSE)
        self.close_reason = reason
        return self._frame(Close(reason[:MAX_REASON_LEN]))

    def data_to_send(self) -> bytes:
        """Bytes the session produced by itself (pongs, rejects); drains them."""
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns the events they complete.

        Raises ``ProtocolError`` when the peer breaks the protocol; by then
        the session is CLOSED and a ``Close`` frame waits in ``data_to_send``.
        """
        if not self._started:
            raise ProtocolError("start() must be called before receiving data")
        if self._state is State.CLOSED:
            return []
        events: list[Event] = []
        try:
            for payload in self._decoder.feed(data):
                events.extend(self._receive_frame(payload))
                if self._state is State.CLOSED:
                    break
        except ProtocolError as exc:
            self._fail(str(exc))
            raise
        return events

    def _fail(self, reason: str) -> None:
        if self._state is not State.CLOSED:
            self._outbox += self._frame(Close(f"protocol error: {reason}"[:MAX_REASON_LEN]))
        self._advance(Input.ERROR)
        self.close_reason = f"protocol error: {reason}"

    def _receive_frame(self, payload: bytes) -> list[Event]:
        if self._state is State.AWAIT_HELLO:
            try:
                msg = decode(payload)
            except ProtocolError:
                # A HELLO from another protocol version may not decode here;
                # answer it with the version, not a generic parse error.
                version = peek_protocol_version(payload)
                problem = None if version is None else version_mismatch(self.local_hello.protocol_version, version)
                if problem is None:
                    raise
                return self._refuse_hello(problem)
        else:
            msg = decode(payload)

        if isinstance(msg, Hello):
            if self._state is not State.AWAIT_HELLO:
                self._advance(Input.HELLO)  # raises: a second HELLO
            return self._receive_hello(msg)
        if isinstance(msg, HelloReject):
            self._advance(Input.REJECT_RECEIVED)
            return self._closed_by_peer(f"peer rejected our HELLO: {msg.reason}")
        if isinstance(msg, Close):
            self._advance(Input.CLOSE_RECEIVED)
            return self._closed_by_peer(f"peer closed the connection: {msg.reason}")
        if self._state is not State.OPEN:
            raise ProtocolError(f"peer sent {msg.TYPE} before HELLO")
        self._advance(Input.MESSAGE_RECEIVED)
        if isinstance(msg, Ping):
            self._outbox += self._frame(Pong(msg.nonce))
            return []
        if isinstance(msg, Pong):
            return [PongReceived(msg.nonce)]
        return [MessageReceived(msg)]

    def _receive_hello(self, hello: Hello) -> list[Event]:
        problem = version_mismatch(self.local_hello.protocol_version, hello.protocol_version)
        if problem is None and self.expected_device_id is not None and hello.device_id != self.expected_device_id:
            problem = f"HELLO names device {hello.device_id} but the certificate proves {self.expected_device_id}"
        if problem is None and hello.device_id == self.local_hello.device_id:
            problem = "peer claims to be this device"
        if problem is not None:
            return self._refuse_hello(problem)
        self._advance(Input.HELLO_ACCEPTED)
        self.peer_hello = hello
        return [HelloReceived(hello)]

    def _refuse_hello(self, reason: str) -> list[Event]:
        self._outbox += self._frame(HelloReject(reason[:MAX_REASON_LEN]))
        self._advance(Input.HELLO_REFUSED)
        self.close_reason = reason
        return [Closed(reason, by_peer=False)]

    def _closed_by_peer(self, reason: str) -> list[Event]:
        self.close_reason = reason
        return [Closed(reason, by_peer=True)]
