"""Mutually authenticated TLS 1.3 channels to trusted devices (asyncio).

Connection set-up, in order (docs/security.md explains why):

1. TCP connect / accept.
2. Certificate announcement (``protocol/prologue.py``): the dialer sends its
   certificate, the listener answers with its own. A dialer that expects a
   device ID stops here if the announced certificate is another device's.
3. TLS 1.3 only, both sides present certificates, ``CERT_REQUIRED`` on both
   sides with the peer's announced certificate as the only trust anchor, so
   the handshake proves the peer holds that key. Host names play no part.
4. The verified peer certificate must be the announced one; the device ID is
   derived from its key (``TlsConnection.peer_device_id``).
5. ``Channel.open``: the device must be in the trust list. Only then is our
   HELLO sent: an untrusted device learns nothing but our certificate, which
   the announcement already made public.
6. HELLO exchange through the sans-I/O ``Session``; the peer's HELLO must
   name the device its certificate proves.

Invariants of an open ``Channel``:

- Application data flows only after step 5 succeeded for this connection.
- Received messages are queued in order, at most ``queue_size`` of them;
  past that the reader stops reading, so TCP pushes back on the peer.
- Keepalive: a ``Ping`` every ``keepalive_interval``; a peer from which no
  byte arrived for ``dead_after`` seconds is declared dead and the
  connection aborted. Pings are answered by the session even while the
  application is slow to consume messages.
- Every I/O failure surfaces as ``ChannelError`` (or ``DeviceUntrusted`` /
  ``ProtocolError`` where that is the cause); nothing else escapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from p2pstore.errors import ChannelError, DeviceUntrusted, IdentityError, ProtocolError
from p2pstore.net.identity import Identity, device_id_from_cert_der
from p2pstore.protocol.framing import MAX_FRAME_SIZE
from p2pstore.protocol.messages import Hello, Message, Ping
from p2pstore.protocol.prologue import PrologueParser, encode_prologue
from p2pstore.protocol.session import Closed, HelloReceived, MessageReceived, PongReceived, Session

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 5.0
#: Whole set-up (announcement, TLS, HELLO) must finish within this.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_KEEPALIVE_INTERVAL = 5.0
DEFAULT_DEAD_AFTER = 15.0
#: Received messages held for a slow consumer before reading stops.
DEFAULT_QUEUE_SIZE = 64
READ_SIZE = 64 * 1024

Address = tuple[str, int]


class TrustCheck(Protocol):
    """What ``Channel.open`` needs of the trust list (``TrustStore`` fits)."""

    def is_trusted(self, device_id: str) -> bool: ...


@contextlib.contextmanager
def _channel_errors(what: str) -> Iterator[None]:
    """The one place where socket/TLS failures become ``ChannelError``."""
    try:
        yield
    except (OSError, EOFError) as exc:  # ssl.SSLError, ConnectionError, IncompleteReadError...
        detail = str(exc) or type(exc).__name__
        raise ChannelError(f"{what}: {detail}") from exc


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def cert_fingerprint(cert_der: bytes) -> str:
    """SHA-256 of a certificate, hex (what the trust list records)."""
    return hashlib.sha256(cert_der).hexdigest()


def _address(transport: asyncio.BaseTransport, key: str) -> Address:
    info = transport.get_extra_info(key)
    if not info:
        return ("?", 0)
    return (str(info[0]), int(info[1]))


# --------------------------------------------------------------------------
# Steps 1-4: TCP, announcement, TLS


class RawConnection(asyncio.Protocol):
    """A TCP connection until the peer's certificate announcement arrives.

    Reading pauses as soon as the announcement is complete, so not one byte
    of the TLS stream is consumed here (``loop.start_tls`` takes over the
    transport afterwards).
    """

    def __init__(self, on_made: Callable[[RawConnection], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer_address: Address = ("?", 0)
        self._parser = PrologueParser()
        self.announced: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        # Consume a failure nobody awaits (connection dropped by the cap).
        self.announced.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer_address = _address(transport, "peername")
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        try:
            cert = self._parser.feed(data)
        except ProtocolError as exc:
            self._fail(ChannelError(f"{format_address(self.peer_address)}: {exc.message}"))
            return
        if cert is not None and not self.announced.done():
            assert self.transport is not None
            self.transport.pause_reading()
            self.announced.set_result(cert)

    def eof_received(self) -> bool:
        self._fail(ChannelError(f"{format_address(self.peer_address)} closed the connection before TLS"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.announced.done():
            self.announced.set_exception(
                ChannelError(f"{format_address(self.peer_address)}: connection lost before TLS ({exc or 'closed'})")
            )

    def _fail(self, exc: ChannelError) -> None:
        if not self.announced.done():
            self.announced.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


@dataclass(slots=True)
class TlsConnection:
    """A TLS 1.3 connection whose peer proved the key of ``peer_device_id``.

    Not yet trusted or HELLO-exchanged: hand it to ``Channel.open``.
    """

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    local_device_id: str
    peer_device_id: str
    peer_cert_der: bytes
    is_dialer: bool
    peer_address: Address
    local_address: Address

    def close(self) -> None:
        """Close after flushing; the peer sees a TLS close, nothing else."""
        self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()


class _TlsStreamProtocol(asyncio.StreamReaderProtocol):
    """Stream protocol for a TLS transport set up by hand with ``start_tls``.

    A peer may hang up right after the handshake, before ``connection_made``
    tells the base class it runs over TLS; half-open TLS makes no sense, so
    end-of-stream always closes.
    """

    def eof_received(self) -> bool:
        super().eof_received()
        return False


def _tls_context(identity: Identity, peer_cert_der: bytes, *, server_side: bool) -> ssl.SSLContext:
    """A context that accepts exactly the announced peer certificate.

    Built per connection: its single trust anchor is what this peer
    announced. TLS then checks the peer's signature with that key; whether
    the key is *trusted* is decided by device ID afterwards.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identity is the pinned key, not a host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    ctx.load_verify_locations(cadata=peer_cert_der)
    if server_side:
        ctx.num_tickets = 0  # no resumption: every connection proves its key afresh
    return ctx


def _announced_device_id(cert_der: bytes, where: str) -> str:
    try:
        return device_id_from_cert_der(cert_der)
    except IdentityError as exc:
        raise ChannelError(f"{where} announced an unusable certificate: {exc.message}") from exc


async def _start_tls(
    raw: RawConnection, identity: Identity, peer_cert_der: bytes, *, server_side: bool, timeout: float
) -> TlsConnection:
    loop = asyncio.get_running_loop()
    transport = raw.transport
    assert transport is not None
    where = format_address(raw.peer_address)
    reader = asyncio.StreamReader(limit=READ_SIZE)
    protocol = _TlsStreamProtocol(reader)
    with _channel_errors(f"TLS handshake with {where} failed"):
        ctx = _tls_context(identity, peer_cert_der, server_side=server_side)
        tls_transport = await loop.start_tls(
            transport,
            protocol,
            ctx,
            server_side=server_side,
            server_hostname=None,
            ssl_handshake_timeout=timeout,
        )
    if tls_transport is None:
        raise ChannelError(f"TLS handshake with {where} failed: connection closed")
    protocol.connection_made(tls_transport)
    writer = asyncio.StreamWriter(tls_transport, protocol, reader, loop)
    try:
        ssl_object = tls_transport.get_extra_info("ssl_object")
        leaf = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if leaf != peer_cert_der:
            raise ChannelError(f"{where} presented a different certificate in TLS than it announced")
        if ssl_object.version() != "TLSv1.3":
            raise ChannelError(f"{where} negotiated {ssl_object.version()}, not TLSv1.3")
        peer_device_id = device_id_from_cert_der(leaf)
    except BaseException:
        tls_transport.abort()
        raise
    return TlsConnection(
        reader=reader,
        writer=writer,
        local_device_id=identity.device_id,
        peer_device_id=peer_device_id,
        peer_cert_der=leaf,
        is_dialer=not server_side,
        peer_address=raw.peer_address,
        local_address=_address(tls_transport, "sockname"),
    )


async def dial_tls(
    host: str,
    port: int,
    identity: Identity,
    *,
    expected_device_id: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    tls_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> TlsConnection:
    """Connect to ``host:port`` and authenticate it (steps 1-4).

    With ``expected_device_id`` the connection stops before TLS if the peer
    announces another device. Without it (a static ``--peer``), the peer's
    ID is learned from its verified certificate.
    """
    loop = asyncio.get_running_loop()
    where = format_address((host, port))
    with _channel_errors(f"cannot connect to {where}"):
        async with asyncio.timeout(connect_timeout):
            _transport, raw = await loop.create_connection(RawConnection, host, port)
    ok = False
    try:
        assert raw.transport is not None
        raw.transport.write(encode_prologue(identity.cert_der))
        async with asyncio.timeout(tls_timeout):
            peer_cert = await raw.announced
            announced = _announced_device_id(peer_cert, where)
            if expected_device_id is not None and announced != expected_device_id:
                raise ChannelError(f"{where} is device {announced}, not the expected {expected_device_id}")
            conn = await _start_tls(raw, identity, peer_cert, server_side=False, timeout=tls_timeout)
            ok = True
            return conn
    except TimeoutError as exc:
        raise ChannelError(f"{where} did not complete the handshake in {tls_timeout:g} s") from exc
    finally:
        if not ok:
            raw.abort()


async def accept_tls(raw: RawConnection, identity: Identity, *, tls_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> TlsConnection:
    """Authenticate an inbound connection (steps 2-4, listener side)."""
    where = format_address(raw.peer_address)
    ok = False
    try:
        async with asyncio.timeout(tls_timeout):
            peer_cert = await raw.announced
            _announced_device_id(peer_cert, where)
            assert raw.transport is not None
            raw.transport.write(encode_prologue(identity.cert_der))
            # No await between the write and start_tls pausing the transport:
            # the dialer only sends its ClientHello after reading our answer.
            conn = await _start_tls(raw, identity, peer_cert, server_side=True, timeout=tls_timeout)
            ok = True
            return conn
    except TimeoutError as exc:
        raise ChannelError(f"{where} did not complete the handshake in {tls_timeout:g} s") from exc
    finally:
        if not ok:
            raw.abort()


async def listen(host: str, port: int, on_connection: Callable[[RawConnection], None]) -> asyncio.Server:
    """Accept TCP on ``host:port``; ``on_connection`` gets each new ``RawConnection``.

    The callback must start ``accept_tls`` (or abort) promptly; the caller
    bounds how many handshakes run at once.
    """
    loop = asyncio.get_running_loop()
    with _channel_errors(f"cannot listen on {format_address((host, port))}"):
        return await loop.create_server(lambda: RawConnection(on_connection), host, port)


# --------------------------------------------------------------------------
# Steps 5-6 and the open channel


class _ClosedMarker:
    pass


_CLOSED = _ClosedMarker()


class Channel:
    """An authenticated, trusted, HELLO-exchanged connection to one device.

    Create with ``Channel.open``. ``send``/``receive`` (or ``async for``)
    move messages; keepalives are internal and never surface.
    """

    def __init__(
        self,
        conn: TlsConnection,
        session: Session,
        *,
        keepalive_interval: float,
        dead_after: float,
        queue_size: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._conn = conn
        self._session = session
        self._writer = conn.writer
        self._interval = keepalive_interval
        self._dead_after = dead_after
        self._queue: asyncio.Queue[Message | _ClosedMarker] = asyncio.Queue()
        self._slots = asyncio.Semaphore(queue_size)
        self._opened: asyncio.Future[Hello] = loop.create_future()
        self._opened.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._closed_event = asyncio.Event()
        self._closed = False
        self._last_received = loop.time()
        self._keepalive_task: asyncio.Task[None] | None = None
        self.close_reason: str | None = None
        self.opened_at = time.time()
        self.last_seen = time.time()
        #: When a message (not a keepalive) last went either way (loop time): how idle the channel is.
        self.last_used = loop.time()
        self.rtt: float | None = None
        self._pings: dict[int, float] = {}
        self._reader_task = loop.create_task(self._read_loop(), name=f"p2pstore-channel-read-{conn.peer_device_id[:7]}")

    # -- opening -------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        conn: TlsConnection,
        trust: TrustCheck,
        hello_factory: Callable[[], Hello],
        *,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        dead_after: float = DEFAULT_DEAD_AFTER,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_frame_size: int = MAX_FRAME_SIZE,
    ) -> Channel:
        """Check trust, exchange HELLOs, start the keepalive (steps 5-6).

        ``hello_factory`` is called only once the peer is known to be
        trusted, so nothing about our stores is even built for a stranger.

        Raises ``DeviceUntrusted`` (connection closed, nothing sent),
        ``ChannelError`` (HELLO refused by either side, connection lost) or
        ``ProtocolError``. The caller bounds the time this takes.
        """
        peer = conn.peer_device_id
        where = format_address(conn.peer_address)
        if peer == conn.local_device_id:
            conn.close()
            raise ChannelError(f"{where} is this device itself")
        if not trust.is_trusted(peer):
            conn.close()
            raise DeviceUntrusted(
                f"device {peer} at {where} is not trusted",
                data={"device_id": peer, "address": where},
            )
        session = Session(hello_factory(), is_dialer=conn.is_dialer, expected_device_id=peer, max_frame_size=max_frame_size)
        channel = cls(conn, session, keepalive_interval=keepalive_interval, dead_after=dead_after, queue_size=queue_size)
        channel._write(session.start())
        try:
            await asyncio.shield(channel._opened)
        except BaseException:
            channel.abort("HELLO exchange did not complete")
            raise
        channel._keepalive_task = asyncio.get_running_loop().create_task(
            channel._keepalive_loop(), name=f"p2pstore-channel-keepalive-{peer[:7]}"
        )
        return channel

    # -- properties ------------------------------------------------------------

    @property
    def peer_device_id(self) -> str:
        return self._conn.peer_device_id

    @property
    def peer_hello(self) -> Hello:
        """The HELLO the peer sent (always set on an opened channel)."""
        assert self._session.peer_hello is not None
        return self._session.peer_hello

    @property
    def peer_cert_der(self) -> bytes:
        return self._conn.peer_cert_der

    @property
    def is_dialer(self) -> bool:
        """True if this device opened the TCP connection."""
        return self._conn.is_dialer

    @property
    def peer_address(self) -> Address:
        return self._conn.peer_address

    @property
    def local_address(self) -> Address:
        return self._conn.local_address

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = f"closed: {self.close_reason}" if self._closed else "open"
        return f"<Channel {self.peer_device_id[:7]} {format_address(self.peer_address)} {state}>"

    # -- application API -------------------------------------------------------

    async def send(self, msg: Message) -> None:
        """Send one message; waits while the peer is slow to read."""
        if self._closed:
            raise ChannelError(f"channel to {self.peer_device_id} is closed: {self.close_reason}")
        self._write(self._session.send(msg))
        self.last_used = asyncio.get_running_loop().time()
        try:
            await self._writer.drain()
        except (OSError, EOFError) as exc:
            self._finish(f"connection lost: {exc or type(exc).__name__}", abort=True)
            raise ChannelError(f"channel to {self.peer_device_id} is closed: {self.close_reason}") from exc

    async def receive(self) -> Message:
        """The next message; ``ChannelError`` once the channel is closed and drained."""
        item = await self._queue.get()
        if isinstance(item, _ClosedMarker):
            self._queue.put_nowait(item)  # wake any other receiver too
            raise ChannelError(f"channel to {self.peer_device_id} is closed: {self.close_reason}")
        self._slots.release()
        return item

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.receive()
            except ChannelError:
                return

    def close(self, reason: str) -> None:
        """Say goodbye (a ``Close`` with ``reason``) and close; returns at once."""
        if self._closed:
            return
        self._write(self._session.close(reason))
        self._finish(reason)

    def abort(self, reason: str) -> None:
        """Drop the connection without a goodbye (dead or misbehaving peer)."""
        self._finish(reason, abort=True)

    async def wait_closed(self, timeout: float = 5.0) -> None:
        """Wait until closed and the transport is gone (bounded by ``timeout``)."""
        await self._closed_event.wait()
        with contextlib.suppress(OSError, EOFError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(timeout):
                await self._writer.wait_closed()

    # -- internals -------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if data and not self._writer.transport.is_closing():
            self._writer.write(data)

    def _finish(self, reason: str, *, abort: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        if abort:
            self._writer.transport.abort()
        else:
            self._writer.close()
        self._queue.put_nowait(_CLOSED)
        if not self._opened.done():
            self._opened.set_exception(ChannelError(reason))
        current = asyncio.current_task()
        for task in (self._reader_task, self._keepalive_task):
            if task is not None and task is not current:
                task.cancel()
        self._closed_event.set()
        log.info("channel to %s (%s) closed: %s", self.peer_device_id, format_address(self.peer_address), reason)

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await self._conn.reader.read(READ_SIZE)
                if not data:
                    if self._opened.done():
                        self._finish("peer closed the connection without a goodbye")
                    else:
                        self._finish(
                            "peer closed the connection before its HELLO; it probably does not trust "
                            f"this device ({self._conn.local_device_id})"
                        )
                    return
                self._last_received = loop.time()
                self.last_seen = time.time()
                try:
                    events = self._session.receive_data(data)
                except ProtocolError as exc:
                    self._write(self._session.data_to_send())
                    log.warning("closing channel to %s: %s", self.peer_device_id, exc.message)
                    self._finish(f"protocol error: {exc.message}")
                    return
                self._write(self._session.data_to_send())
                for event in events:
                    if isinstance(event, HelloReceived):
                        if not self._opened.done():
                            self._opened.set_result(event.hello)
                    elif isinstance(event, MessageReceived):
                        self.last_used = loop.time()
                        await self._slots.acquire()
                        self._queue.put_nowait(event.message)
                    elif isinstance(event, PongReceived):
                        sent = self._pings.pop(event.nonce, None)
                        if sent is not None:
                            self.rtt = loop.time() - sent
                    elif isinstance(event, Closed):
                        if not event.by_peer:
                            log.warning("refused HELLO of %s: %s", self.peer_device_id, event.reason)
                        self._finish(event.reason)
                        return
        except (OSError, EOFError) as exc:
            self._finish(f"connection lost: {exc or type(exc).__name__}", abort=True)

    async def _keepalive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        nonce = 0
        last_ping = loop.time()
        while not self._closed:
            now = loop.time()
            silent = now - self._last_received
            if silent >= self._dead_after:
                log.warning(
                    "device %s sent nothing for %.1f s; declaring it dead", self.peer_device_id, silent
                )
                self._finish(f"peer sent nothing for {silent:.1f} s", abort=True)
                return
            if now - last_ping >= self._interval:
                nonce += 1
                self._pings = {nonce: now}  # only the latest ping is timed
                self._write(self._session.send(Ping(nonce)))
                last_ping = now
            wake = min(last_ping + self._interval, self._last_received + self._dead_after)
            await asyncio.sleep(max(0.0, wake - loop.time()) + 0.001)
