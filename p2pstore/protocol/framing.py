"""Length-prefixed frames: the only way bytes become messages on a channel.

Wire format: a 4-byte unsigned big-endian length ``N`` followed by ``N``
bytes of payload (one encoded message). Nothing else travels between the
end of one frame and the start of the next.

Invariants:

- The decoder never holds more than ``4 + max_frame_size`` bytes of an
  incomplete frame plus what one ``feed`` call handed it: an oversized
  length is refused as soon as its 4-byte header is seen, before a single
  byte of its payload is buffered.
- A zero-length frame is a protocol error (no message encodes to nothing),
  so a stream of zero bytes cannot spin the decoder.
- Pure: bytes in, payloads out; no I/O, no clocks.
"""

from __future__ import annotations

import struct

from p2pstore.errors import ProtocolError

#: Largest payload one frame may carry (16 MiB). Sync batches are sized far
#: below this; the cap only bounds what a hostile peer can make us buffer.
MAX_FRAME_SIZE = 16 * 1024 * 1024

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size


def encode_frame(payload: bytes, *, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """Prefix ``payload`` with its length.

    Refusing oversize frames on the way out too means a bug here shows up as
    a clear local error rather than as the peer hanging up on us.
    """
    size = len(payload)
    if size == 0:
        raise ProtocolError("cannot send an empty frame")
    if size > max_frame_size:
        raise ProtocolError(f"frame of {size} bytes exceeds the {max_frame_size}-byte limit")
    return HEADER.pack(size) + payload


class FrameDecoder:
    """Turns a byte stream, cut anywhere, back into whole payloads."""

    __slots__ = ("_buffer", "_max_frame_size")

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if not 0 < max_frame_size <= 0xFFFFFFFF:
            raise ValueError("max_frame_size must be between 1 and 2**32-1")
        self._max_frame_size = max_frame_size
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every payload they completed, in order.

        Raises ``ProtocolError`` on a zero or oversized length. After that the
        stream has no trustworthy frame boundary left, so the caller must drop
        the connection; the decoder keeps refusing.
        """
        self._buffer += data
        frames: list[bytes] = []
        while len(self._buffer) >= HEADER_SIZE:
            (size,) = HEADER.unpack_from(self._buffer)
            if size == 0:
                raise ProtocolError("peer sent an empty frame")
            if size > self._max_frame_size:
                raise ProtocolError(
                    f"peer announced a frame of {size} bytes; the limit is {self._max_frame_size}"
                )
            end = HEADER_SIZE + size
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[HEADER_SIZE:end]))
            del self._buffer[:end]
        return frames
