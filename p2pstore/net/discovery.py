"""mDNS / DNS-SD discovery of p2pstore devices (python-zeroconf, asyncio API).

Each daemon advertises one service of type ``_p2pstore._tcp.local.`` whose
instance name is the device name, and browses for the same type. What a
peer says about itself travels in the TXT record:

    id=<device id>  pv=<protocol version>  sl=<security level 1..4>  name=<device name>

Invariants:

* Discovery only *reports*; it never decides trust. A TXT record can be
  forged by anyone on the LAN, so a reported device ID is a hint to dial,
  and the TLS channel with pinned certificates proves who answered.
* Every record a peer sends is hostile input: :func:`parse_service` either
  returns a :class:`DiscoveredPeer` or raises :class:`~p2pstore.errors.ProtocolError`,
  which the browser logs at debug level and drops. Nothing a peer sends can
  stop the browser.
* Zeroconf may invoke browser handlers from its own thread (when it was not
  created inside a running loop); every handler hops to our event loop with
  ``call_soon_threadsafe`` before touching state, so all state below is only
  ever touched from the one loop thread.
* The instance name must be unique on the link. If the device name is
  taken when we probe, this device moves to ``"<name> (<first 8 chars of
  its ID>)"``, unique because device IDs are. If two devices end up with the
  same name anyway (they probed at the same moment, or a network partition
  healed), the one with the greater device ID moves and the other keeps the
  name and re-announces it: a rule both sides compute alike, so exactly one
  renames and nothing flaps. The TXT ``name`` always carries the real name.
* We browse and resolve with QM (multicast-answer) questions. QU answers
  are unicast, and several daemons on one host share UDP port 5353 with
  SO_REUSEPORT, so a unicast answer reaches only one of them, not always
  the one that asked; multicast reaches all, which also lets zeroconf's
  probe see a name that is already taken.
* ``on_found`` is called when a device appears *or when anything it
  advertises changes* (address, port, level): callers treat it as an upsert.
  ``on_lost`` is called once when the last instance of a device disappears:
  it sent a goodbye, or it stopped answering. The second matters for a
  daemon killed without a goodbye, because zeroconf keeps PTR records at
  least 1125 s whatever TTL the sender chose: so every ``liveness_interval``
  we re-resolve each known instance, which costs nothing while its SRV/TXT
  (TTL ``record_ttl``) are fresh in the cache and asks the network once they
  have expired; an instance that no longer answers is lost.
* A lost instance whose PTR record is still cached stays *dormant*: the
  sweep keeps resolving it for ``DORMANT_SECONDS``, because when that device
  comes back (restarted after a crash) its announcement repeats a record the
  browser already has and raises no event of its own. A goodbye removes the
  record, so a return after one is announced as usual. A *new* instance
  whose first resolve got no reply (its answer lost on a loaded host) is
  kept dormant the same way: the browser holds its PTR and would raise no
  second event, so it would stay unknown. It is also asked once more
  ``NEW_RETRY_S`` after that first try, not only at the next sweep: one lost
  answer then costs a new device a few seconds, not ``liveness_interval``.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from zeroconf import DNSOutgoing, DNSQuestionType, IPVersion, NonUniqueNameException, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from p2pstore.tasks import TaskSet
from p2pstore.errors import ConfigError, ProtocolError

log = logging.getLogger(__name__)

SERVICE_TYPE = "_p2pstore._tcp.local."

# DNS labels (and so DNS-SD instance names) are at most 63 octets.
MAX_INSTANCE_BYTES = 63
# One TXT string is at most 255 octets including "key="; keep the free-text
# name well inside that.
MAX_TXT_NAME_BYTES = 200
# Device IDs are made by net/identity; here we only insist they are short,
# printable and unambiguous so a hostile TXT can't smuggle anything odd.
MAX_DEVICE_ID_LEN = 128
_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=-]*")
_HOST_UNSAFE_RE = re.compile(r"[^A-Za-z0-9-]")
# TTL of every record we publish. RFC 6762 suggests 75 min for PTR/TXT; we
# use 2 min for all so a daemon that died without a goodbye vanishes from
# other devices' lists within about two minutes.
DEFAULT_RECORD_TTL = 120
DEFAULT_RESOLVE_TIMEOUT = 3.0
DEFAULT_LIVENESS_INTERVAL = 30.0
#: How long an instance that stopped answering is still looked for (zeroconf
#: keeps its PTR record this long, so its return would go unannounced), and
#: how many such instances at most.
DORMANT_SECONDS = 1125.0
MAX_DORMANT = 256
#: Seconds after a new instance's first resolve got no reply until it is
#: resolved once more (later tries: the sweep, every ``liveness_interval``).
NEW_RETRY_S = 1.0
# A device that keeps its name in a conflict re-announces at most this often,
# so an impostor that never renames can't make us flood the link.
CONFLICT_DEFEND_INTERVAL = 10.0
# DNS header flags of an authoritative response (RFC 1035 4.1.1).
_FLAGS_RESPONSE_AA = 0x8000 | 0x0400
SECURITY_LEVELS = range(1, 5)

FoundCallback = Callable[["DiscoveredPeer"], Awaitable[None] | None]
LostCallback = Callable[[str], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class DiscoveredPeer:
    """What a device advertises about itself over mDNS (unauthenticated)."""

    device_id: str
    name: str
    addresses: tuple[str, ...]
    port: int
    protocol_version: int
    security_level: int


# ---------------------------------------------------------------- pure parts


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is a syntactically sane ID, else raise ProtocolError."""
    if not isinstance(device_id, str) or not 0 < len(device_id) <= MAX_DEVICE_ID_LEN:
        raise ProtocolError("device id missing or longer than %d characters" % MAX_DEVICE_ID_LEN)
    if not _DEVICE_ID_RE.fullmatch(device_id):
        raise ProtocolError(f"device id {device_id!r} has characters outside [A-Za-z0-9._:+=-]")
    return device_id


def _truncate_utf8(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` UTF-8 bytes without splitting a character."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", errors="ignore")


def _clean_label(text: str) -> str:
    """Drop control characters, which RFC 6763 forbids in instance names."""
    return "".join(ch for ch in text if ch.isprintable()).strip()


def instance_name_for(name: str, device_id: str | None = None) -> str:
    """The DNS-SD instance name for a device: its name, or name + ID suffix.

    The suffix form is used after a collision; it is built so the suffix
    always survives truncation to 63 bytes (otherwise two long names with the
    same prefix would collide again).
    """
    base = _clean_label(name) or "p2pstore"
    if device_id is None:
        return _truncate_utf8(base, MAX_INSTANCE_BYTES)
    suffix = f" ({device_id[:8]})"
    room = MAX_INSTANCE_BYTES - len(suffix.encode("utf-8"))
    return _truncate_utf8(base, room).rstrip() + suffix


def build_txt(*, device_id: str, name: str, protocol_version: int, security_level: int) -> dict[str, str]:
    """TXT properties for our own service (see module docstring)."""
    return {
        "id": device_id,
        "pv": str(protocol_version),
        "sl": str(security_level),
        "name": _truncate_utf8(name, MAX_TXT_NAME_BYTES),
    }


def _txt_text(properties: Mapping[Any, Any], key: str) -> str | None:
    """One TXT value as text, or None when absent; raises ProtocolError on bad bytes."""
    raw = properties.get(key.encode("ascii"), properties.get(key))
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes | bytearray):
        raise ProtocolError(f"TXT {key} has unexpected type {type(raw).__name__}")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"TXT {key} is not UTF-8") from exc


def _txt_int(properties: Mapping[Any, Any], key: str, allowed: range) -> int:
    text = _txt_text(properties, key)
    if text is None:
        raise ProtocolError(f"TXT record has no {key}=")
    # isdecimal() alone accepts non-ASCII digits; int() would then accept them too.
    if not (text.isascii() and text.isdecimal() and len(text) <= 9):
        raise ProtocolError(f"TXT {key}={text!r} is not a small decimal integer")
    value = int(text)
    if value not in allowed:
        raise ProtocolError(f"TXT {key}={value} outside {allowed.start}..{allowed.stop - 1}")
    return value


def parse_service(
    instance: str,
    properties: Mapping[Any, Any] | None,
    port: int | None,
    addresses: list[str] | tuple[str, ...],
) -> DiscoveredPeer:
    """Turn a resolved DNS-SD service into a DiscoveredPeer, or raise ProtocolError.

    Pure: takes exactly what zeroconf resolved so it can be tested (and
    fuzzed) without a network. ``instance`` is only a fallback for a missing
    ``name=``.
    """
    if not properties:
        raise ProtocolError("service has no TXT record")
    device_id = _txt_text(properties, "id")
    if device_id is None:
        raise ProtocolError("TXT record has no id=")
    validate_device_id(device_id)
    protocol_version = _txt_int(properties, "pv", range(0, 1_000_000))
    security_level = _txt_int(properties, "sl", SECURITY_LEVELS)
    name = _txt_text(properties, "name")
    name = _clean_label(name if name is not None else instance)[:MAX_TXT_NAME_BYTES]
    if not name:
        raise ProtocolError("device name is empty")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ProtocolError(f"SRV port {port!r} is not a TCP port")
    clean: list[str] = []
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError as exc:
            raise ProtocolError(f"address {address!r} is not an IP address") from exc
        if ip.is_unspecified or ip.is_multicast:
            continue
        if str(ip) not in clean:
            clean.append(str(ip))
    if not clean:
        raise ProtocolError("service has no usable address")
    # IPv4 first: channels and --interface are IPv4.
    clean.sort(key=lambda a: ipaddress.ip_address(a).version)
    return DiscoveredPeer(
        device_id=device_id,
        name=name,
        addresses=tuple(clean),
        port=port,
        protocol_version=protocol_version,
        security_level=security_level,
    )


def _local_ipv4_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this host, for advertising on all interfaces.

    Uses ifaddr (a dependency of zeroconf itself). Falls back to 127.0.0.1 on
    a host with no other address, so the record is still well formed.
    """
    import ifaddr  # local import: only needed when no interfaces are configured

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback and ip.ip not in found:
                found.append(ip.ip)
    return found or ["127.0.0.1"]


def _validate_interfaces(interfaces: list[str] | None) -> list[str] | None:
    if interfaces is None:
        return None
    if not interfaces:
        raise ConfigError("interfaces must be None (all) or a non-empty list of IPv4 addresses")
    result: list[str] = []
    for address in interfaces:
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError as exc:
            raise ConfigError(f"interface {address!r} is not an IPv4 address") from exc
        if ip.is_unspecified or ip.is_multicast:
            raise ConfigError(f"interface {address!r} is not a unicast interface address")
        if str(ip) not in result:
            result.append(str(ip))
    return result


# ---------------------------------------------------------------- the service


class Discovery:
    """Advertise this device and report other p2pstore devices on the link.

    Construct, ``await start()``, later ``await stop()``. Callbacks run on the
    event loop that called ``start()``; they may be plain functions or
    coroutine functions. An exception in a callback is logged, never raised
    into zeroconf.
    """

    def __init__(
        self,
        *,
        device_id: str,
        name: str,
        port: int,
        security_level: int,
        protocol_version: int,
        interfaces: list[str] | None,
        on_found: FoundCallback,
        on_lost: LostCallback,
        record_ttl: int = DEFAULT_RECORD_TTL,
        resolve_timeout: float = DEFAULT_RESOLVE_TIMEOUT,
        liveness_interval: float = DEFAULT_LIVENESS_INTERVAL,
    ) -> None:
        try:
            validate_device_id(device_id)
        except ProtocolError as exc:
            raise ConfigError(f"invalid device id for discovery: {exc.message}") from exc
        if not _clean_label(name):
            raise ConfigError("device name must contain a printable character")
        if not 0 < port < 65536:
            raise ConfigError(f"discovery needs the channel's bound TCP port, got {port}")
        if security_level not in SECURITY_LEVELS:
            raise ConfigError(f"security level must be 1..4, got {security_level}")
        if protocol_version < 0:
            raise ConfigError(f"protocol version must be >= 0, got {protocol_version}")
        if record_ttl < 2 or resolve_timeout <= 0 or liveness_interval <= 0:
            # TTL 1 means "goodbye" to some responders (RFC 6762 10.1).
            raise ConfigError("record_ttl must be >= 2 s; resolve_timeout and liveness_interval > 0")
        self._device_id = device_id
        self._name = name
        self._port = port
        self._security_level = security_level
        self._protocol_version = protocol_version
        self._interfaces = _validate_interfaces(interfaces)
        self._on_found = on_found
        self._on_lost = on_lost
        self._record_ttl = record_ttl
        self._resolve_timeout_ms = int(resolve_timeout * 1000)
        self._liveness_interval = liveness_interval

        self._loop: asyncio.AbstractEventLoop | None = None
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._running = False
        self._last_defended: float | None = None
        # lower-cased full service name -> device id it last resolved to
        self._instances: dict[str, str] = {}
        # lower-cased full service name -> the name as received
        self._names: dict[str, str] = {}
        self._sweeper: asyncio.Task[None] | None = None
        # lower-cased full service name -> (name as received, when it stopped answering)
        self._dormant: dict[str, tuple[str, float]] = {}
        self._peers: dict[str, DiscoveredPeer] = {}
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._tasks = TaskSet(log)

    # -- public surface

    @property
    def instance_name(self) -> str | None:
        """The instance name actually registered (may carry an ID suffix), or None."""
        if self._info is None:
            return None
        return self._info.name[: -len(SERVICE_TYPE) - 1]

    @property
    def advertised_addresses(self) -> tuple[str, ...]:
        """The IPv4 addresses put in our A records."""
        return tuple(self._addresses())

    def peers(self) -> dict[str, DiscoveredPeer]:
        """Currently visible devices by device ID (a copy; safe to keep)."""
        return dict(self._peers)

    async def start(self) -> None:
        """Open the mDNS sockets, register our service and start browsing.

        Raises ConfigError when the sockets can't be opened on the configured
        interfaces (typically an ``--interface`` address this host doesn't have).
        """
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        interfaces: Any = list(self._interfaces) if self._interfaces is not None else None
        try:
            if interfaces is None:
                self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
            else:
                self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        except OSError as exc:
            raise ConfigError(
                f"cannot open mDNS sockets on interfaces {self._interfaces or 'all'}: {exc}"
            ) from exc
        self._running = True
        try:
            # Browse first: answers to our queries land in the cache while we
            # probe, so a name already in use is seen before we claim it.
            self._browser = AsyncServiceBrowser(
                self._zc.zeroconf,
                SERVICE_TYPE,
                handlers=[self._on_state_change],
                question_type=DNSQuestionType.QM,
            )
            await self._register()
            self._sweeper = self._loop.create_task(self._sweep_liveness())
        except BaseException:
            await self.stop()
            raise
        log.info(
            "discovery started: advertising %r (id %s, port %d, level S%d) on %s",
            self.instance_name,
            self._device_id,
            self._port,
            self._security_level,
            ", ".join(self._interfaces) if self._interfaces else "all interfaces",
        )

    async def stop(self) -> None:
        """Stop browsing and withdraw our service with goodbye packets.

        Safe to call twice or after a failed start. Does not call ``on_lost``
        for the peers we knew: this device is going away, not they.
        """
        self._running = False
        zc, self._zc = self._zc, None
        browser, self._browser = self._browser, None
        tasks = list(self._resolving.values())
        if self._sweeper is not None:
            tasks.append(self._sweeper)
            self._sweeper = None
        self._resolving.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._tasks.close()
        if browser is not None:
            await browser.async_cancel()
        if zc is not None:
            instance = self.instance_name
            # async_close unregisters all services (goodbye packets, TTL 0)
            # before closing the sockets.
            await zc.async_close()
            log.info("discovery stopped: %s", f"{instance!r} withdrawn with goodbyes" if instance else "nothing registered")
        self._info = None
        self._instances.clear()
        self._names.clear()
        self._peers.clear()

    async def update(self, *, security_level: int | None = None) -> None:
        """Re-announce our TXT record after the device security level changed."""
        if security_level is not None:
            if security_level not in SECURITY_LEVELS:
                raise ConfigError(f"security level must be 1..4, got {security_level}")
            self._security_level = security_level
        if self._zc is None or self._info is None:
            return
        self._info = self._make_info(self._info.name)
        await (await self._zc.async_update_service(self._info))
        log.info("discovery: re-announced %r with level S%d", self.instance_name, self._security_level)

    # -- registration

    def _addresses(self) -> list[str]:
        return list(self._interfaces) if self._interfaces is not None else _local_ipv4_addresses()

    def _make_info(self, full_name: str) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            full_name,
            port=self._port,
            properties=build_txt(
                device_id=self._device_id,
                name=self._name,
                protocol_version=self._protocol_version,
                security_level=self._security_level,
            ),
            # One host name per device ID: never collides with the machine's
            # own hostname (avahi) nor with another daemon on the same machine.
            server=f"p2pstore-{_HOST_UNSAFE_RE.sub('-', self._device_id[:32])}.local.",
            addresses=[socket.inet_aton(a) for a in self._addresses()],
            host_ttl=self._record_ttl,
            other_ttl=self._record_ttl,
        )

    async def _register(self, *, after_conflict: bool = False) -> None:
        """Probe and register; fall back to the ID-suffixed name if ours is taken."""
        assert self._zc is not None
        candidates = [instance_name_for(self._name), instance_name_for(self._name, self._device_id)]
        if after_conflict:
            candidates = candidates[1:]
        for index, instance in enumerate(candidates):
            info = self._make_info(f"{instance}.{SERVICE_TYPE}")
            last = index == len(candidates) - 1
            try:
                announced = await self._zc.async_register_service(info, allow_name_change=last)
            except NonUniqueNameException:
                log.info("instance name %r is taken on the network; trying %r", instance, candidates[index + 1])
                continue
            self._info = info
            # Wait for the announcements so a quick stop() can't race them
            # (an announcement after our goodbye would resurrect us).
            await announced
            if info.name != f"{instance}.{SERVICE_TYPE}":
                log.warning("instance name %r taken too; zeroconf renamed us to %r", instance, self.instance_name)
            return

    def _resolve_conflict(self, other_id: str) -> None:
        """Another device advertises our instance name: keep it or move (see module doc)."""
        zc, info = self._zc, self._info
        if zc is None or info is None or self._loop is None:
            return
        taken = self.instance_name
        already_suffixed = taken == instance_name_for(self._name, self._device_id)
        if self._device_id < other_id or already_suffixed:
            now = self._loop.time()
            if self._last_defended is not None and now - self._last_defended < CONFLICT_DEFEND_INTERVAL:
                return
            self._last_defended = now
            log.warning(
                "device %s also advertises instance name %r; keeping it (%s) and re-announcing",
                other_id,
                taken,
                "it already carries our ID" if already_suffixed else "our ID sorts first",
            )

            async def reannounce() -> None:
                await (await zc.async_update_service(info))

            self._spawn(reannounce())
            return
        log.warning("device %s also advertises instance name %r; moving to our ID-suffixed name", other_id, taken)
        self._info = None
        zc.zeroconf.registry.async_remove(info)
        # Goodbye for our SRV and TXT only: the PTR is identical to the other
        # device's, and a goodbye for it would make everyone drop *them*.
        goodbye = DNSOutgoing(_FLAGS_RESPONSE_AA)
        goodbye.add_answer_at_time(info.dns_service(override_ttl=0), 0)
        goodbye.add_answer_at_time(info.dns_text(override_ttl=0), 0)
        zc.zeroconf.async_send(goodbye)

        async def reregister() -> None:
            await self._register(after_conflict=True)
            log.info("re-registered as %r after a name conflict", self.instance_name)

        self._spawn(reregister())

    # -- browsing

    def _on_state_change(
        self,
        zeroconf: Any,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """Zeroconf handler: may run on zeroconf's thread, so only hop to our loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._handle_change, name, state_change)
        except RuntimeError:
            # The loop closed between the check and the call: we are shutting down.
            return

    def _handle_change(self, name: str, state_change: ServiceStateChange) -> None:
        if not self._running:
            return
        key = name.lower()
        previous = self._resolving.pop(key, None)
        if previous is not None:
            previous.cancel()
        if state_change is ServiceStateChange.Removed:
            log.debug("service %r removed", name)
            self._dormant.pop(key, None)
            self._forget_instance(key)
            return
        self._start_resolve(name)

    def _start_resolve(self, name: str) -> None:
        key = name.lower()
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._resolving[key] = task

        def finished(done: asyncio.Task[None]) -> None:
            if self._resolving.get(key) is done:
                del self._resolving[key]

        task.add_done_callback(finished)

    async def _resolve(self, name: str) -> None:
        zc = self._zc
        if zc is None:
            return
        key = name.lower()
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        try:
            # QM: zeroconf asks its first question QU, and a unicast answer goes to
            # just one of the sockets sharing port 5353 on the asking host.
            answered = await info.async_request(zc.zeroconf, self._resolve_timeout_ms, question_type=DNSQuestionType.QM)
        except Exception as exc:  # zeroconf closing under us, or a socket error
            log.debug("resolving %r failed: %s", name, exc)
            return
        if not answered:
            if key in self._instances:
                log.info("service %r stopped answering (no reply within %d ms)", name, self._resolve_timeout_ms)
                self._forget_instance(key)
                self._keep_dormant(key, name)
            elif key not in self._dormant:
                # A new service whose answer was lost (a loaded host, a lossy link): the browser
                # raises no second event for a record it holds, so without this it stayed unknown.
                log.info("service %r did not answer within %d ms; trying again in %g s, then every %g s",
                         name, self._resolve_timeout_ms, NEW_RETRY_S, self._liveness_interval)
                self._keep_dormant(key, name)
                asyncio.get_running_loop().call_later(NEW_RETRY_S, self._retry_dormant, key, name)
            return
        instance = name[: -len(SERVICE_TYPE) - 1] if name.lower().endswith(SERVICE_TYPE.lower()) else name
        try:
            peer = parse_service(instance, info.properties, info.port, info.parsed_addresses())
        except ProtocolError as exc:
            log.debug("ignoring service %r: malformed record: %s", name, exc.message)
            self._forget_instance(key)
            return
        if peer.device_id == self._device_id:
            return
        if self._info is not None and key == self._info.name.lower():
            self._resolve_conflict(peer.device_id)
        if self._dormant.pop(key, None) is not None:
            log.info("service %r answers (after a resolve that got no reply)", name)
        old_id = self._instances.get(key)
        self._instances[key] = peer.device_id
        self._names[key] = name
        if old_id is not None and old_id != peer.device_id:
            self._drop_device_if_unreferenced(old_id)
        if self._peers.get(peer.device_id) == peer:
            return
        known = peer.device_id in self._peers
        self._peers[peer.device_id] = peer
        log.info(
            "%s device %s %r at %s port %d (pv %d, S%d)",
            "updated" if known else "found",
            peer.device_id,
            peer.name,
            ",".join(peer.addresses),
            peer.port,
            peer.protocol_version,
            peer.security_level,
        )
        self._notify(self._on_found, peer)

    async def _sweep_liveness(self) -> None:
        """Re-resolve known instances periodically so silent deaths become
        on_lost, and dormant ones so their return becomes on_found."""
        while self._running:
            await asyncio.sleep(self._liveness_interval)
            for key, name in list(self._names.items()):
                # An instance already being resolved is being checked anyway.
                if key in self._instances and key not in self._resolving:
                    self._start_resolve(name)
            now = asyncio.get_running_loop().time()
            for key, (name, since) in list(self._dormant.items()):
                if now - since > DORMANT_SECONDS:
                    del self._dormant[key]
                elif key not in self._resolving:
                    self._start_resolve(name)

    def _retry_dormant(self, key: str, name: str) -> None:
        """Resolve a dormant instance once more, unless it was found, gone or
        is being resolved meanwhile (or discovery stopped)."""
        if self._running and key in self._dormant and key not in self._resolving:
            self._start_resolve(name)

    def _keep_dormant(self, key: str, name: str) -> None:
        if len(self._dormant) >= MAX_DORMANT:
            del self._dormant[next(iter(self._dormant))]  # the oldest
        self._dormant[key] = (name, asyncio.get_running_loop().time())

    def _forget_instance(self, key: str) -> None:
        self._names.pop(key, None)
        device_id = self._instances.pop(key, None)
        if device_id is not None:
            self._drop_device_if_unreferenced(device_id)

    def _drop_device_if_unreferenced(self, device_id: str) -> None:
        if device_id in self._instances.values() or device_id not in self._peers:
            return
        del self._peers[device_id]
        log.info("lost device %s", device_id)
        self._notify(self._on_lost, device_id)

    # -- callbacks and tasks

    def _notify(self, callback: Callable[[Any], Any], argument: Any) -> None:
        try:
            result = callback(argument)
        except Exception:
            log.exception("discovery callback %r failed for %r", callback, argument)
            return
        if inspect.isawaitable(result):
            self._spawn(result)

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        self._tasks.spawn(awaitable)
