"""Certificate announcement: the few bytes each side sends before TLS starts.

Why it exists: a TLS server can only obtain a client certificate by
verifying it against trust anchors it already holds, and Python's ``ssl``
module offers no hook to accept an arbitrary certificate and judge it after
the handshake. Our certificates are self-signed and a peer is trusted by
device ID (a key hash), often before we have ever seen its certificate. So
each side first announces its certificate in the clear; each side then runs
TLS 1.3 with the announced certificate as the only trust anchor, which makes
TLS prove that the peer holds the announced key. The announcement itself is
public information and proves nothing; everything rests on the TLS
handshake and on the device ID derived from the verified certificate.

Wire format, one per direction (dialer first, listener answers, then the
dialer starts TLS):

    b"P2PS" | version (1 byte, = 1) | length (2 bytes, big-endian) | cert DER

Invariants: at most ``HEADER_SIZE + MAX_CERT_SIZE`` bytes are buffered; wrong
magic, version or size fail at once; bytes after the announcement (before
TLS) are a protocol error, since they could only be plaintext injected
in front of the encrypted stream.
"""

from __future__ import annotations

import struct

from p2pstore.errors import ProtocolError

MAGIC = b"P2PS"
VERSION = 1
HEADER = struct.Struct(">4sBH")
HEADER_SIZE = HEADER.size
#: Our certificates are ~300 bytes; 8 KiB leaves room for any sane key type.
MAX_CERT_SIZE = 8192


def encode_prologue(cert_der: bytes) -> bytes:
    """The announcement of ``cert_der``."""
    if not 0 < len(cert_der) <= MAX_CERT_SIZE:
        raise ProtocolError(f"certificate of {len(cert_der)} bytes can't be announced")
    return HEADER.pack(MAGIC, VERSION, len(cert_der)) + cert_der


class PrologueParser:
    """Collects one announcement from a byte stream cut anywhere."""

    __slots__ = ("_buffer", "_done")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._done = False

    def feed(self, data: bytes) -> bytes | None:
        """The announced certificate DER once complete, else None."""
        if self._done:
            raise ProtocolError("data arrived after the certificate announcement, before TLS")
        self._buffer += data
        if not MAGIC.startswith(bytes(self._buffer[: len(MAGIC)])):
            raise ProtocolError("not a p2pstore peer (wrong greeting)")
        if len(self._buffer) < HEADER_SIZE:
            return None
        _magic, version, size = HEADER.unpack_from(self._buffer)
        if version != VERSION:
            raise ProtocolError(f"peer uses connection greeting version {version}, this device uses {VERSION}")
        if not 0 < size <= MAX_CERT_SIZE:
            raise ProtocolError(f"peer announced a certificate of {size} bytes; the limit is {MAX_CERT_SIZE}")
        end = HEADER_SIZE + size
        if len(self._buffer) < end:
            return None
        if len(self._buffer) > end:
            raise ProtocolError("data arrived after the certificate announcement, before TLS")
        self._done = True
        cert = bytes(self._buffer[HEADER_SIZE:])
        self._buffer.clear()
        return cert
