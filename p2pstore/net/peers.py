"""The peer manager: listens, dials, and keeps one channel per trusted device.

What it guarantees:

- **One channel per pair of devices.** When two live channels to the same
  device exist (both dialed at once), the one dialed by the device with the
  smaller device ID wins; both sides apply the same rule to the same two
  connections, so they keep the same one. If both were dialed by the same
  side, the newer one wins (a device only dials again once it has given up
  on its previous channel). A device never runs two dials to one device.
- **Online/offline without flapping.** ``on_change(device, True)`` fires when
  the first channel to a device opens, ``on_change(device, False)`` when the
  last one closes and no other connection to it is being set up, so a
  duplicate being replaced is not reported as offline-then-online.
- **Sessions can follow their channel.** ``on_message`` gets the channel a
  message came on and ``send(..., channel=)`` sends on one channel only;
  ``on_channel_closed(device, channel)`` fires when a channel has closed for
  any reason (offline, untrusted, or the loser of a simultaneous dial), after
  every message it delivered was handled. A layer above that binds a
  conversation to a channel therefore learns at once that it is gone, even
  when the device stays online over another one (``wait_channel``).
- **Untrust acts at once.** The manager listens to the ``TrustStore``; when a
  device is untrusted its channel is closed and it is reported offline in
  the same call, whoever called ``untrust``.
- **Untrusted devices get nothing.** A connection whose peer proves an
  untrusted ID is closed before HELLO (``Channel.open``); the device is
  recorded in ``pending()`` so the user can see who knocked.
- **Bounded.** At most ``max_handshakes`` connections may be in set-up at once
  (others are dropped on arrival); each set-up is bounded by
  ``handshake_timeout``; ``pending()`` keeps the ``MAX_PENDING`` most recent.
- **Reconnects** with exponential backoff per address: a fast first retry
  (``backoff_initial``), doubling to ``backoff_max``. A channel that lived at
  least ``backoff_max`` seconds resets the backoff.
- **A bounded active set in a large fleet** (net/overlay.py): with more
  than ``full_mesh_peers`` other trusted devices in view (those with an address,
  and those connected; one whose dials keep failing leaves the view
  ``VIEW_GRACE_S`` after it began to fail), a device dials only the ``active_set`` it chooses,
  accepts every trusted device that chose it, closes a channel it dialed
  to a device it no longer chooses once the channel has carried nothing
  for ``idle_close`` seconds, and beyond 3 × ``active_set`` channels closes
  the oldest one outside its links. ``reach()`` dials a device outside the
  set on demand (a sync or a query asked for it).

Background work (the dial loop) can be switched off with ``auto_dial=False``;
``connect()`` then drives one dial by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from p2pstore.tasks import TaskSet
from p2pstore.errors import ChannelError, ConfigError, DeviceOffline, DeviceUntrusted, ProtocolError
from p2pstore.net.channel import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DEAD_AFTER,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_QUEUE_SIZE,
    Address,
    Channel,
    RawConnection,
    TlsConnection,
    accept_tls,
    cert_fingerprint,
    dial_tls,
    format_address,
    listen,
)
from p2pstore.net.identity import Identity, normalize_device_id
from p2pstore.net.overlay import DEFAULT_ACTIVE_SET, DEFAULT_FULL_MESH_PEERS, Overlay
from p2pstore.net.trust import TrustStore
from p2pstore.protocol.framing import MAX_FRAME_SIZE
from p2pstore.protocol.messages import Hello, Message

log = logging.getLogger(__name__)

DEFAULT_PORT = 7400
DEFAULT_BACKOFF_INITIAL = 0.25
DEFAULT_BACKOFF_MAX = 10.0
DEFAULT_MAX_HANDSHAKES = 64
#: Untrusted devices remembered in ``pending()``.
MAX_PENDING = 256
#: Seconds a channel outside the active set may carry nothing before the dialer closes it.
DEFAULT_IDLE_CLOSE = 60.0
#: Seconds a trusted device whose dials keep failing stays in the active set's view (``_refresh_overlay``).
VIEW_GRACE_S = 60.0

OnChange = Callable[[str, bool], object]
OnMessage = Callable[[str, Message, Channel], Awaitable[None]]
OnChannelClosed = Callable[[str, Channel], object]


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What the manager knows of one device right now."""

    device_id: str
    online: bool
    hello: Hello | None
    """The last HELLO received from the device (name, level, stores)."""
    addresses: tuple[Address, ...]
    """Addresses known for dialing it (discovery, static peers)."""
    last_seen: float | None
    """Wall-clock time of the last byte received from it."""
    channel_address: Address | None
    is_dialer: bool | None
    """Whether this device dialed the current channel."""


@dataclass(frozen=True, slots=True)
class PendingPeer:
    """An untrusted device that proved its ID to us over TLS."""

    device_id: str
    name: str | None
    address: Address
    inbound: bool
    first_seen: float
    last_seen: float


@dataclass(slots=True)
class _Address:
    host: str
    port: int
    claimed_id: str | None
    """The ID the source (discovery) says lives here; a dial must find it."""
    learned_id: str | None = None
    """The ID last found here (static peers learn it from the certificate)."""
    name: str | None = None
    source: str = "static"
    failures: int = 0
    next_attempt: float = 0.0
    task: asyncio.Task[None] | None = None

    @property
    def device_id(self) -> str | None:
        return self.claimed_id or self.learned_id

    @property
    def key(self) -> Address:
        return (self.host, self.port)


@dataclass(slots=True)
class _Seen:
    hello: Hello | None = None
    last_seen: float | None = None


class PeerManager:
    """Listener, dialer and registry of channels for one device.

    Collaborators are injected: the ``Identity`` to present, the
    ``TrustStore`` that decides who may connect, ``hello_factory`` building
    our current HELLO (the daemon lists its stores there) for each new
    channel, ``on_change(device_id, online)`` (plain function, or one
    returning an awaitable that is run as a task), the async
    ``on_message(device_id, message, channel)``, awaited in order per
    channel: it should hand long work to a task, since the channel stops
    reading while ``queue_size`` messages wait; and
    ``on_channel_closed(device_id, channel)`` (plain function), called once
    per registered channel after its last message was handled.

    Trust is changed on the ``TrustStore`` (``trust.trust(id)`` /
    ``trust.untrust(id)``); the manager follows it: untrusting closes the
    channel and reports the device offline before ``untrust`` returns,
    trusting dials the device's known addresses at once.

    Typical wiring (daemon)::

        manager = PeerManager(identity, trust, hello_factory=build_hello,
                              on_change=notify_device_change, on_message=sync.handle,
                              host=interfaces, port=config.port)
        await manager.start()
        for host, port in config.static_peers:
            manager.add_address(None, host, port)
        # discovery: manager.add_address(peer.device_id, peer.host, peer.port,
        #                                name=peer.name, source="mdns") / remove_address(...)
        ...
        await manager.stop()
    """

    def __init__(
        self,
        identity: Identity,
        trust: TrustStore,
        *,
        hello_factory: Callable[[], Hello],
        on_change: OnChange | None = None,
        on_message: OnMessage | None = None,
        on_channel_closed: OnChannelClosed | None = None,
        host: str | Sequence[str] = "0.0.0.0",
        port: int = DEFAULT_PORT,
        auto_dial: bool = True,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        dead_after: float = DEFAULT_DEAD_AFTER,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        max_frame_size: int = MAX_FRAME_SIZE,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        active_set: int = DEFAULT_ACTIVE_SET,
        full_mesh_peers: int = DEFAULT_FULL_MESH_PEERS,
        idle_close: float = DEFAULT_IDLE_CLOSE,
        rng: random.Random | None = None,
    ) -> None:
        self._identity = identity
        self._trust = trust
        self._hello_factory = hello_factory
        self._on_change = on_change
        self._on_message = on_message
        self._on_channel_closed = on_channel_closed
        self._hosts = [host] if isinstance(host, str) else list(host)
        self._requested_port = port
        self._auto_dial = auto_dial
        self._keepalive_interval = keepalive_interval
        self._dead_after = dead_after
        self._handshake_timeout = handshake_timeout
        self._connect_timeout = connect_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._max_handshakes = max_handshakes
        self._max_frame_size = max_frame_size
        self._queue_size = queue_size
        self._rng = rng or random.Random()
        if active_set < 0:
            raise ConfigError(f"active set size must be >= 0 (0: no bound), not {active_set}")
        #: Who this device keeps channels to, and the trees changes travel on (net/overlay.py).
        self.overlay = Overlay(identity.device_id, active_set, full_mesh_peers)
        #: Trusted devices whose every address has failed three dials running: since when (``_refresh_overlay``).
        self._failing_since: dict[str, float] = {}
        self._idle_close = idle_close
        if not 0 < keepalive_interval < dead_after:
            # A channel must hear a keepalive before it gives the peer up.
            raise ConfigError(f"peer dead-after time ({dead_after} s) must exceed the keepalive interval ({keepalive_interval} s)")
        if not 0 < backoff_initial <= backoff_max:
            raise ConfigError(f"redial backoff maximum ({backoff_max} s) must be at least its first step ({backoff_initial} s)")

        self._servers: list[asyncio.Server] = []
        self._port: int | None = None
        self._channels: dict[str, Channel] = {}
        self._connecting: dict[str, int] = {}
        self._outgoing: set[str] = set()
        self._announced: set[str] = set()
        self._seen: dict[str, _Seen] = {}
        self._addresses: dict[Address, _Address] = {}
        self._pending: OrderedDict[str, PendingPeer] = OrderedDict()
        self._tasks = TaskSet(log)
        self._handshakes: set[asyncio.Task[object]] = set()
        self._wake = asyncio.Event()
        #: Set (and replaced) whenever a channel registers or a set-up ends: wakes ``wait_channel``.
        self._settled = asyncio.Event()
        self._dial_task: asyncio.Task[None] | None = None
        self._remove_listener: Callable[[], None] | None = None
        self._running = False

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Listen, follow trust changes, and (with ``auto_dial``) start dialing."""
        if self._running:
            return
        self._running = True
        self._remove_listener = self._trust.add_listener(self._on_trust_change)
        port = self._requested_port
        for host in self._hosts:
            server = await listen(host, port, self._on_raw_connection)
            self._servers.append(server)
            # Port 0 picks a free port once; every other host shares it.
            port = server.sockets[0].getsockname()[1]
        self._port = port if self._servers else None
        log.info(
            "device %s listening on %s",
            self._identity.device_id,
            ", ".join(format_address((h, port)) for h in self._hosts) or "nothing",
        )
        if self._auto_dial:
            self._dial_task = asyncio.get_running_loop().create_task(self._dial_loop(), name="p2pstore-dial-loop")

    async def stop(self) -> None:
        """Stop listening and dialing, say goodbye on every channel, wait for it."""
        if not self._running:
            return
        self._running = False
        if self._remove_listener is not None:
            self._remove_listener()
        for server in self._servers:
            server.close()
        background = [t for t in (self._dial_task, *self._handshakes, *(a.task for a in self._addresses.values())) if t]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        channels = list(self._channels.values())
        for channel in channels:
            channel.close("device shutting down")
        await asyncio.gather(*(c.wait_closed(timeout=2.0) for c in channels), return_exceptions=True)
        await self._tasks.wait(timeout=2.0)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        self._servers.clear()

    @property
    def port(self) -> int | None:
        """The bound TCP port (useful with port 0), once started."""
        return self._port

    @property
    def device_id(self) -> str:
        return self._identity.device_id

    # -- addresses -------------------------------------------------------------

    def add_address(
        self, device_id: str | None, host: str, port: int, *, name: str | None = None, source: str = "static"
    ) -> None:
        """Make ``host:port`` dialable; ``device_id`` None for a static peer.

        Discovery passes the ID (and name) it saw advertised; the dial then
        only accepts that device. A static peer's ID is learned from its
        certificate on the first connection. Raises ``InvalidDeviceId`` for
        a malformed ``device_id``.
        """
        claimed = normalize_device_id(device_id) if device_id is not None else None
        key = (host, int(port))
        entry = self._addresses.get(key)
        if entry is None:
            entry = self._addresses[key] = _Address(host, int(port), claimed, name=name, source=source)
        else:
            if claimed != entry.claimed_id:
                entry.claimed_id = claimed
                entry.failures = 0
                entry.next_attempt = 0.0
            entry.name = name or entry.name
            entry.source = source
        self._wake.set()

    def remove_address(self, host: str, port: int) -> bool:
        """Forget an address (e.g. discovery saw the device leave)."""
        entry = self._addresses.pop((host, int(port)), None)
        self._wake.set()
        return entry is not None

    # -- queries ---------------------------------------------------------------

    def channels(self) -> dict[str, Channel]:
        """Open channels by device ID (a copy)."""
        return dict(self._channels)

    def channel(self, device_id: str) -> Channel | None:
        return self._channels.get(device_id)

    async def wait_channel(self, device_id: str, timeout: float | None = None) -> Channel | None:
        """The device's open channel; while a connection to it is being set up
        (say the survivor of a simultaneous dial), wait for that, at most
        ``timeout`` (default the handshake timeout). None: it is offline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._handshake_timeout if timeout is None else timeout)
        while True:
            channel = self._channels.get(device_id)
            if channel is not None and not channel.closed:
                return channel
            left = deadline - loop.time()
            if left <= 0 or not (self._connecting.get(device_id) or device_id in self._outgoing):
                return None
            settled = self._settled
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await settled.wait()

    def _settle(self) -> None:
        self._settled.set()
        self._settled = asyncio.Event()

    def is_online(self, device_id: str) -> bool:
        return device_id in self._channels

    def outside_active_set(self, device_id: str) -> bool:
        """Whether the device is in view but, in a large fleet, not one this
        device keeps a channel to (``devices.list``: online, not connected)."""
        self._refresh_overlay()
        return self.overlay.sparse and device_id in self.overlay.view() and device_id not in self.overlay.links()

    async def reach(self, device_id: str) -> bool:
        """Whether a channel to the device is open — dialing it now if it is
        a trusted device outside the active set (a sync or a remote query
        asked for it; the channel closes once idle, ``idle_close``)."""
        if device_id in self._channels:
            return True
        if not (self._trust.is_trusted(device_id) and self.outside_active_set(device_id)):
            return False
        for entry in [a for a in self._addresses.values() if a.device_id == device_id]:
            try:
                await self.connect(entry.host, entry.port, entry.claimed_id)
            except (ChannelError, ProtocolError, DeviceUntrusted) as exc:
                log.info("could not reach %s outside the active set at %s: %s", device_id,
                         format_address(entry.key), getattr(exc, "message", exc))
                continue
            log.info("channel to %s opened on demand (outside the active set)", device_id)
            return True
        return device_id in self._channels

    def peer_info(self, device_id: str) -> PeerInfo | None:
        """What is known of ``device_id`` (None if nothing at all)."""
        channel = self._channels.get(device_id)
        seen = self._seen.get(device_id)
        addresses = tuple(a.key for a in self._addresses.values() if a.device_id == device_id)
        if channel is None and seen is None and not addresses:
            return None
        return PeerInfo(
            device_id=device_id,
            online=channel is not None,
            hello=channel.peer_hello if channel is not None else (seen.hello if seen else None),
            addresses=addresses,
            last_seen=channel.last_seen if channel is not None else (seen.last_seen if seen else None),
            channel_address=channel.peer_address if channel is not None else None,
            is_dialer=channel.is_dialer if channel is not None else None,
        )

    def peers(self) -> list[PeerInfo]:
        """``peer_info`` of every device seen, connected or addressed."""
        ids = set(self._channels) | set(self._seen) | {a.device_id for a in self._addresses.values() if a.device_id}
        return [info for d in sorted(ids) if (info := self.peer_info(d)) is not None]

    def pending(self) -> list[PendingPeer]:
        """Untrusted devices that connected or were reached, most recent last."""
        return list(self._pending.values())

    # -- actions ---------------------------------------------------------------

    async def send(self, device_id: str, msg: Message, *, channel: Channel | None = None) -> None:
        """Send on the device's channel, or on ``channel`` only (one that a
        conversation is bound to); ``DeviceOffline`` if there is none, if it
        is closed, or if it closes under the send (the peer died or left)."""
        if channel is not None:
            if channel.closed:
                raise DeviceOffline(f"the channel to device {device_id} closed: {channel.close_reason}",
                                    data={"device_id": device_id})
        else:
            channel = self._channels.get(device_id)
        if channel is None:
            if not self._trust.is_trusted(device_id):
                raise DeviceUntrusted(f"device {device_id} is not trusted", data={"device_id": device_id})
            raise DeviceOffline(f"device {device_id} is offline", data={"device_id": device_id})
        try:
            await channel.send(msg)
        except ChannelError as exc:
            if not channel.closed:
                raise
            raise DeviceOffline(f"device {device_id} went offline: {exc.message}", data={"device_id": device_id}) from None

    def disconnect(self, device_id: str, reason: str = "closed by this device") -> bool:
        """Close the device's channel (it will be redialed later if trusted)."""
        channel = self._channels.get(device_id)
        if channel is None:
            return False
        channel.close(reason)
        return True

    async def connect(self, host: str, port: int, device_id: str | None = None) -> Channel:
        """Dial ``host:port`` once, now, ignoring backoff; returns the device's channel.

        If a channel to that device already exists the new connection is
        dropped before HELLO and the existing channel returned. Raises
        ``ChannelError`` (unreachable, handshake failed, wrong device),
        ``DeviceUntrusted`` (recorded in ``pending()``) or ``ProtocolError``.
        """
        expected = normalize_device_id(device_id) if device_id is not None else None
        where = format_address((host, port))
        claimed: str | None = None
        if expected is not None:
            if expected in self._outgoing:
                raise ChannelError(f"a connection to {expected} is already being set up")
            claimed = expected
            self._outgoing.add(claimed)
        try:
            async with asyncio.timeout(self._handshake_timeout):
                conn = await dial_tls(
                    host,
                    port,
                    self._identity,
                    expected_device_id=expected,
                    connect_timeout=self._connect_timeout,
                    tls_timeout=self._handshake_timeout,
                )
                peer = conn.peer_device_id
                entry = self._addresses.get((host, port))
                if entry is not None:
                    entry.learned_id = peer
                if claimed is None:
                    existing = self._channels.get(peer)
                    if existing is not None or peer in self._outgoing:
                        conn.close()
                        if existing is not None:
                            return existing
                        raise ChannelError(f"a connection to {peer} is already being set up")
                    claimed = peer
                    self._outgoing.add(claimed)
                return await self._open(conn)
        except TimeoutError as exc:
            raise ChannelError(f"{where}: set-up took longer than {self._handshake_timeout:g} s") from exc
        finally:
            if claimed is not None:
                self._outgoing.discard(claimed)
                self._settle()

    # -- set-up --------------------------------------------------------------------

    def _on_raw_connection(self, raw: RawConnection) -> None:
        where = format_address(raw.peer_address)
        if not self._running:
            raw.abort()
            return
        if len(self._handshakes) >= self._max_handshakes:
            log.warning("dropped connection from %s: %d handshakes already in progress", where, len(self._handshakes))
            raw.abort()
            return
        task = asyncio.get_running_loop().create_task(self._accept(raw), name=f"p2pstore-accept-{where}")
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)
        self._tasks.adopt(task)

    async def _accept(self, raw: RawConnection) -> None:
        where = format_address(raw.peer_address)
        try:
            async with asyncio.timeout(self._handshake_timeout):
                conn = await accept_tls(raw, self._identity, tls_timeout=self._handshake_timeout)
                await self._open(conn)
        except DeviceUntrusted:
            pass  # logged and recorded by _open
        except (ChannelError, ProtocolError) as exc:
            log.info("dropped connection from %s: %s", where, exc.message)
        except TimeoutError:
            raw.abort()
            log.info("dropped connection from %s: set-up took longer than %g s", where, self._handshake_timeout)

    async def _open(self, conn: TlsConnection) -> Channel:
        """Steps 5-6 for a connection in either direction, then registration."""
        peer = conn.peer_device_id
        self._connecting[peer] = self._connecting.get(peer, 0) + 1
        try:
            try:
                channel = await Channel.open(
                    conn,
                    self._trust,
                    self._hello_factory,
                    keepalive_interval=self._keepalive_interval,
                    dead_after=self._dead_after,
                    queue_size=self._queue_size,
                    max_frame_size=self._max_frame_size,
                )
            except DeviceUntrusted:
                self._note_pending(conn)
                raise
            return self._register(channel)
        finally:
            left = self._connecting[peer] - 1
            if left:
                self._connecting[peer] = left
            else:
                del self._connecting[peer]
            self._update_presence(peer)
            self._settle()
            self._wake.set()

    def _dialer_of(self, channel: Channel) -> str:
        return self._identity.device_id if channel.is_dialer else channel.peer_device_id

    def _preferred(self, existing: Channel, new: Channel) -> Channel:
        """The one-channel rule (module docstring); both sides compute the same."""
        winner = min(self._identity.device_id, existing.peer_device_id)
        existing_wins = self._dialer_of(existing) == winner
        new_wins = self._dialer_of(new) == winner
        if existing_wins != new_wins:
            return existing if existing_wins else new
        return new

    def _register(self, channel: Channel) -> Channel:
        peer = channel.peer_device_id
        if not self._trust.is_trusted(peer):  # untrusted during the HELLO exchange
            channel.close("device untrusted")
            raise DeviceUntrusted(f"device {peer} is not trusted", data={"device_id": peer})
        existing = self._channels.get(peer)
        if existing is not None and not existing.closed:
            keep = self._preferred(existing, channel)
            drop = channel if keep is existing else existing
            log.info(
                "two channels to %s; keeping %s (dialed by %s), closing %s",
                peer,
                format_address(keep.peer_address),
                self._dialer_of(keep)[:7],
                format_address(drop.peer_address),
            )
            drop.close(f"duplicate connection; keeping the one dialed by {self._dialer_of(keep)}")
            if keep is existing:
                return existing
        self._channels[peer] = channel
        hello = channel.peer_hello
        seen = self._seen.setdefault(peer, _Seen())
        seen.hello = hello
        seen.last_seen = channel.last_seen
        self._pending.pop(peer, None)
        try:
            self._trust.note_seen(
                peer, hello.name, hello.security_level, cert_sha256=cert_fingerprint(channel.peer_cert_der)
            )
        except Exception:  # noqa: BLE001 - a full disk must not stop the channel
            log.exception("could not record what device %s announced", peer)
        log.info(
            "channel to %s (%r, S%d) open via %s, dialed by %s",
            peer,
            hello.name,
            hello.security_level,
            format_address(channel.peer_address),
            "us" if channel.is_dialer else "the peer",
        )
        self._spawn(self._serve(channel), f"p2pstore-serve-{peer[:7]}")
        return channel

    def _note_pending(self, conn: TlsConnection) -> None:
        peer = conn.peer_device_id
        now = time.time()
        name = next((a.name for a in self._addresses.values() if a.device_id == peer and a.name), None)
        old = self._pending.pop(peer, None)
        if old is None:
            log.info(
                "refused connection %s %s: device %s is not trusted; closed before HELLO, nothing sent "
                "(to allow it: p2pstore trust %s)",
                "to" if conn.is_dialer else "from",
                format_address(conn.peer_address),
                peer,
                peer,
            )
        self._pending[peer] = PendingPeer(
            device_id=peer,
            name=name,
            address=conn.peer_address,
            inbound=not conn.is_dialer,
            first_seen=old.first_seen if old else now,
            last_seen=now,
        )
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    # -- running channels ------------------------------------------------------------

    async def _serve(self, channel: Channel) -> None:
        peer = channel.peer_device_id
        try:
            async for msg in channel:
                if self._on_message is None:
                    continue
                try:
                    await self._on_message(peer, msg, channel)
                except Exception:  # noqa: BLE001 - a handler bug must not kill the channel
                    log.exception("handling a %s message from %s failed", msg.TYPE, peer)
        finally:
            seen = self._seen.setdefault(peer, _Seen())
            seen.last_seen = channel.last_seen
            if self._channels.get(peer) is channel:
                del self._channels[peer]
                self._schedule_redial(peer, channel)
            self._update_presence(peer)
            if self._on_channel_closed is not None:
                try:
                    self._on_channel_closed(peer, channel)
                except Exception:  # noqa: BLE001 - a callback bug must not break the manager
                    log.exception("on_channel_closed(%s) failed", peer)

    def _update_presence(self, peer: str) -> None:
        online = peer in self._channels
        if online and peer not in self._announced:
            self._announced.add(peer)
            self._emit(peer, True)
        elif not online and peer in self._announced and not self._connecting.get(peer):
            self._announced.discard(peer)
            self._emit(peer, False)

    def _emit(self, peer: str, online: bool) -> None:
        log.info("device %s is %s", peer, "online" if online else "offline")
        if self._on_change is None:
            return
        try:
            result = self._on_change(peer, online)
        except Exception:  # noqa: BLE001 - a callback bug must not break the manager
            log.exception("on_change(%s, %s) failed", peer, online)
            return
        if inspect.isawaitable(result):
            self._spawn(result, f"p2pstore-on-change-{peer[:7]}")

    def _spawn(self, coro: Awaitable[object], name: str) -> None:
        self._tasks.spawn(coro, name)

    def _on_trust_change(self, device_id: str, trusted: bool) -> None:
        if trusted:
            self._pending.pop(device_id, None)
            for entry in self._addresses.values():
                if entry.device_id in (device_id, None):
                    entry.failures = 0
                    entry.next_attempt = 0.0
            self._wake.set()
            return
        channel = self._channels.pop(device_id, None)
        if channel is not None:
            channel.close("device untrusted")
        if device_id in self._announced:
            self._announced.discard(device_id)
            self._emit(device_id, False)

    # -- dialing --------------------------------------------------------------------

    def _backoff(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        delay = min(self._backoff_max, self._backoff_initial * 2 ** (failures - 1))
        return delay * self._rng.uniform(0.9, 1.1)

    def _schedule_redial(self, peer: str, channel: Channel) -> None:
        now = asyncio.get_running_loop().time()
        lived = time.time() - channel.opened_at
        for entry in self._addresses.values():
            if entry.device_id != peer:
                continue
            entry.failures = 1 if lived >= self._backoff_max else entry.failures + 1
            entry.next_attempt = now + self._backoff(entry.failures)
        self._wake.set()

    def _refresh_overlay(self) -> None:
        """The view the active set is chosen from: trusted devices connected,
        or with an address whose dials have not failed three times in a row —
        or began failing less than ``VIEW_GRACE_S`` ago. Every device must
        compute the same graph from its view (net/overlay.py); a loaded
        fleet's dials time out now and then, and a view that dropped a device
        at its third failure changed, and the graph and trees with it, every
        few seconds somewhere (64 hosts: docs/performance.md, round 5)."""
        now = time.monotonic()
        reachable: dict[str, bool] = {}
        for a in self._addresses.values():
            peer = a.device_id
            if peer and self._trust.is_trusted(peer):
                reachable[peer] = reachable.get(peer, False) or a.failures < 3 or peer in self._channels
        view = set(self._channels)
        for peer, fine in reachable.items():
            if fine:
                self._failing_since.pop(peer, None)
                view.add(peer)
            elif now - self._failing_since.setdefault(peer, now) < VIEW_GRACE_S:
                view.add(peer)
        for peer in [p for p in self._failing_since if p not in reachable]:
            del self._failing_since[peer]
        self.overlay.update(view)

    def _prune(self, now: float) -> float:
        """Close what the active set no longer wants (module docstring);
        returns when to look again (``now`` and both on the loop's clock)."""
        if not self.overlay.sparse:
            return math.inf
        links, next_due = self.overlay.links(), math.inf
        for peer, channel in list(self._channels.items()):
            if peer in links or not channel.is_dialer or channel.closed:
                continue
            if now - channel.last_used >= self._idle_close:
                channel.close("outside the active set and idle")
            else:
                next_due = min(next_due, channel.last_used + self._idle_close)
        cap = 3 * self.overlay.k
        live = [(p, c) for p, c in self._channels.items() if not c.closed]
        if len(live) > cap:
            outside = sorted((c for p, c in live if p not in links), key=lambda c: c.opened_at)
            for channel in outside[:len(live) - cap]:
                channel.close(f"more than {cap} channels; this one is outside the active set")
        return next_due

    def _should_dial(self, entry: _Address) -> bool:
        if entry.task is not None:
            return False
        peer = entry.device_id
        if peer is None:
            return True  # a static peer not reached yet
        if peer == self._identity.device_id:
            return False
        if peer in self._channels or peer in self._outgoing or self._connecting.get(peer):
            return False
        if self.overlay.sparse and peer in self.overlay.view() and peer not in self.overlay.chosen():
            return False  # a large fleet: the devices that chose this one dial it (net/overlay.py)
        # A discovered device is dialed only once trusted; a static address is
        # retried anyway (slowly, see _dial) in case another device moves in.
        return entry.claimed_id is None or self._trust.is_trusted(peer)

    async def _dial_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            self._refresh_overlay()
            now = loop.time()
            next_due = self._prune(now)
            for entry in list(self._addresses.values()):
                if not self._should_dial(entry):
                    continue
                if entry.next_attempt <= now:
                    entry.task = loop.create_task(self._dial(entry), name=f"p2pstore-dial-{entry.host}:{entry.port}")
                else:
                    next_due = min(next_due, entry.next_attempt)
            timeout = None if next_due == math.inf else max(0.0, next_due - now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _dial(self, entry: _Address) -> None:
        loop = asyncio.get_running_loop()
        where = format_address(entry.key)
        try:
            await self.connect(entry.host, entry.port, entry.claimed_id)
            # failures are reset when the channel closes after a long life
            # (_schedule_redial), so a peer that accepts and hangs up at once
            # still backs off.
        except DeviceUntrusted:
            entry.next_attempt = loop.time() + self._backoff_max
        except (ChannelError, ProtocolError) as exc:
            entry.failures += 1
            delay = self._backoff(entry.failures)
            entry.next_attempt = loop.time() + delay
            level = logging.INFO if entry.failures == 1 else logging.DEBUG
            log.log(level, "dial %s failed (%s); retrying in %.1f s", where, exc.message, delay)
        finally:
            entry.task = None
            self._wake.set()
