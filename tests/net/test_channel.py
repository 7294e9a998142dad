"""What a foreign client sees at the TLS port: nothing, unless it is trusted.

These tests talk to a PeerManager's listener with clients that are not ours
(a hand-written blocking ``ssl`` client, ``openssl s_client``), to check the
rule "an untrusted peer receives no application data" at the byte level.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from peer_agent import Device, eventually

from p2pstore.net.identity import Identity
from p2pstore.protocol.framing import FrameDecoder
from p2pstore.protocol.messages import Close, Hello, decode
from p2pstore.protocol.prologue import PrologueParser, encode_prologue

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Device]:
    device = Device(tmp_path, "server", kwargs={"handshake_timeout": 2.0})
    await device.manager.start()
    yield device
    await device.manager.stop()


def raw_tls_session(
    port: int, identity: Identity, send_after_handshake: bytes = b"", *, stop_after_frame: bool = False
) -> tuple[bytes, str]:
    """Announce, run TLS 1.3 with ``identity``, send bytes, read until the end.

    Returns everything received after the handshake, and how it ended
    (``stop_after_frame``: as soon as one whole frame arrived).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(encode_prologue(identity.cert_der))
        parser = PrologueParser()
        server_cert = None
        while server_cert is None:
            byte = sock.recv(1)  # one at a time: never swallow a TLS byte
            assert byte, "server closed before announcing its certificate"
            server_cert = parser.feed(byte)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=server_cert)
        ctx.load_cert_chain(identity.cert_path, identity.key_path)
        received = b""
        with ctx.wrap_socket(sock) as tls:
            if send_after_handshake:
                tls.sendall(send_after_handshake)
            while True:
                try:
                    data = tls.recv(65536)
                except (ssl.SSLError, OSError) as exc:
                    return received, f"error: {exc}"
                if not data:
                    return received, "eof"
                received += data
                if stop_after_frame and FrameDecoder().feed(received):
                    return received, "frame"
                if len(received) > 1_000_000:
                    return received, "too much"


async def test_untrusted_tls_client_receives_nothing(server: Device, tmp_path: Path) -> None:
    stranger = Identity.load_or_create(tmp_path / "stranger", "stranger")
    received, end = await asyncio.to_thread(raw_tls_session, server.port, stranger)
    assert received == b""
    assert end == "eof"  # an orderly TLS close, nothing before it
    await eventually(lambda: bool(server.manager.pending()), 2.0, "pending")
    assert server.manager.pending()[0].device_id == stranger.device_id
    assert server.manager.channels() == {}


async def test_trusted_tls_client_receives_the_hello(server: Device, tmp_path: Path) -> None:
    # The positive control for the test above: same client, but trusted.
    friend = Identity.load_or_create(tmp_path / "friend", "friend")
    server.trust.trust(friend.device_id)
    received, _end = await asyncio.to_thread(raw_tls_session, server.port, friend, stop_after_frame=True)
    frames = FrameDecoder().feed(received)
    assert isinstance(decode(frames[0]), Hello)
    assert decode(frames[0]).device_id == server.id  # type: ignore[attr-defined]


async def test_oversized_frame_from_a_trusted_peer_closes_the_channel(server: Device, tmp_path: Path) -> None:
    friend = Identity.load_or_create(tmp_path / "friend", "friend")
    server.trust.trust(friend.device_id)
    received, end = await asyncio.to_thread(raw_tls_session, server.port, friend, b"\xff\xff\xff\xff")
    messages = [decode(f) for f in FrameDecoder().feed(received)]
    assert isinstance(messages[0], Hello)
    assert isinstance(messages[-1], Close) and "protocol error" in messages[-1].reason  # type: ignore[attr-defined]
    assert server.manager.channels() == {}


async def test_plain_tls_client_without_announcement_gets_nothing(server: Device, tmp_path: Path) -> None:
    def plain_tls() -> str:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            try:
                with ctx.wrap_socket(sock) as tls:
                    return f"handshake succeeded, got {tls.recv(100)!r}"
            except (ssl.SSLError, OSError) as exc:
                return f"refused: {exc}"

    result = await asyncio.to_thread(plain_tls)
    assert result.startswith("refused"), result


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")
async def test_openssl_s_client_gets_no_application_data(server: Device) -> None:
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{server.port}",
        "-tls1_3",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 15.0)
    text = out.decode(errors="replace")
    assert proc.returncode != 0, text
    assert "SSL handshake has read 0 bytes" in text, text
    assert "BEGIN CERTIFICATE" not in text and server.id not in text
    # The server is unharmed.
    assert server.manager.channels() == {}


async def test_connection_closing_mid_announcement_is_harmless(server: Device, tmp_path: Path) -> None:
    ident = Identity.load_or_create(tmp_path / "x", "x")
    announcement = encode_prologue(ident.cert_der)
    for cut in (1, 5, 7, len(announcement) - 1):
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        w.write(announcement[:cut])
        await w.drain()
        w.close()
        await w.wait_closed()
    r, w = await asyncio.open_connection("127.0.0.1", server.port)
    w.write(announcement + b"\x16\x03\x01")  # plaintext glued to the announcement
    assert await asyncio.wait_for(r.read(), 2.0) == b""
    w.close()
    await asyncio.sleep(0.1)
    assert server.manager.channels() == {} and server.manager.pending() == []
