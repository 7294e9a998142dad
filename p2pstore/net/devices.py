"""The device directory: one view of every device this daemon knows of.

Three sources feed it, none of which decides trust on its own:
- the trust list (``TrustStore``): devices the user accepted;
- the peer manager: who is connected right now, their HELLO, and untrusted
  devices that proved their ID over TLS (*pending*);
- discovery (mDNS): devices announcing themselves on the LAN (also *pending*
  until trusted — a TXT record is only a hint, the channel proves identity).

It also holds the **security-level rule** in one place: data of a store
labelled Sx goes only to devices whose level is >= Sx (``may_receive``, and
``check_may_receive`` for the places that refuse with an error). A
device's level is the one it declared in its HELLO on the current channel,
or, when it is offline, the last level seen (kept in the trust list).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p2pstore import PROTOCOL_VERSION
from p2pstore.errors import DeviceUnknown, InvalidDeviceId, SecurityLevelDenied
from p2pstore.net.discovery import DiscoveredPeer
from p2pstore.net.identity import normalize_device_id
from p2pstore.net.peers import PeerManager, PendingPeer
from p2pstore.net.trust import TrustStore

if TYPE_CHECKING:
    from p2pstore.store.database import Store

log = logging.getLogger(__name__)


def security_allows(device_level: int | None, store_label: int) -> bool:
    """The security-level rule: may data labelled ``store_label`` go to a device of ``device_level``?"""
    return device_level is not None and device_level >= store_label


def level_name(level: int | None) -> str | None:
    return None if level is None else f"S{level}"


@dataclass(frozen=True, slots=True)
class DeviceView:
    device_id: str
    name: str | None
    online: bool
    trusted: bool
    pending: bool
    addresses: tuple[str, ...]
    security_level: int | None
    last_seen: float | None
    discovered: bool
    #: The protocol the device announced (mDNS ``pv``, or its HELLO); None: unknown.
    protocol_version: int | None = None
    #: A channel to it is open. ``online`` and not connected: in view, but outside this
    #: device's active set in a large fleet (net/overlay.py); a sync or query reaches it on demand.
    connected: bool = False

    @property
    def protocol_problem(self) -> str | None:
        """Why this device and we can't talk, in words (None: we can, or it is unknown)."""
        if self.protocol_version is None or self.protocol_version == PROTOCOL_VERSION:
            return None
        return (f"it speaks protocol {self.protocol_version}, this device speaks {PROTOCOL_VERSION}: "
                "no channel and no sync until both run a release of the same protocol")

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "name": self.name,
            "online": self.online,
            "connected": self.connected,
            "trusted": self.trusted,
            "pending": self.pending,
            "addresses": list(self.addresses),
            "security_level": level_name(self.security_level),
            "last_seen": self.last_seen,
            "discovered": self.discovered,
            "protocol_version": self.protocol_version,
            "protocol_problem": self.protocol_problem,
        }


class DeviceDirectory:
    def __init__(self, local_id: str, trust: TrustStore, peers: PeerManager,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.local_id = local_id
        self.trust_store = trust
        self.peers = peers
        self.on_event = on_event
        self._discovered: dict[str, DiscoveredPeer] = {}
        self._discovered_at: dict[str, float] = {}
        # Trusted devices mDNS lost, whose last addresses are still dialed (see on_lost).
        self._lost: dict[str, DiscoveredPeer] = {}
        self._malformed: set[str] = set()  # announced IDs that are not device IDs (logged once each)

    # -- discovery callbacks ---------------------------------------------------

    def on_found(self, peer: DiscoveredPeer) -> None:
        try:
            problem = None if normalize_device_id(peer.device_id) == peer.device_id else "not in canonical form"
        except InvalidDeviceId as exc:
            problem = exc.message
        if problem is not None:
            # mDNS is unauthenticated: anything on the LAN can announce anything. A daemon
            # announces its ID as it prints it; anything else could never connect, and
            # must not break devices.list.
            if peer.device_id not in self._malformed:
                self._malformed.add(peer.device_id)
                log.info("mDNS: ignoring %r at %s: its id= is not a device ID (%s)", peer.name, ", ".join(peer.addresses), problem)
            return
        old = self._discovered.get(peer.device_id)
        new = old is None
        previous = old or self._lost.pop(peer.device_id, None)
        if previous is not None:
            # An update (e.g. restarted on another port): stop dialing what it no longer advertises.
            current = {(host, peer.port) for host in peer.addresses}
            for host in previous.addresses:
                if (host, previous.port) not in current:
                    self.peers.remove_address(host, previous.port)
        self._discovered[peer.device_id] = peer
        self._discovered_at[peer.device_id] = time.time()
        for host in peer.addresses:
            self.peers.add_address(peer.device_id, host, peer.port, name=peer.name, source="mdns")
        if new:
            trusted = self.trust_store.is_trusted(peer.device_id)
            log.info("discovered device %s (%r, S%d)%s", peer.device_id, peer.name, peer.security_level,
                     "" if trusted else ": not trusted, listed as pending")
            self._emit(peer.device_id, self.peers.is_online(peer.device_id))

    def on_lost(self, device_id: str) -> None:
        peer = self._discovered.pop(device_id, None)
        if peer is None:
            return
        if self.trust_store.is_trusted(device_id):
            # Keep dialing a trusted device's last address (with the usual backoff): after a
            # network outage longer than the record TTL, mDNS forgets the device and never asks
            # for it again, so forgetting the address too would leave the two apart for good.
            self._lost[device_id] = peer
            log.info("device %s (%r) left the network (mDNS); still dialing its last address", device_id, peer.name)
            return
        for host in peer.addresses:
            self.peers.remove_address(host, peer.port)
        log.info("device %s (%r) left the network (mDNS)", device_id, peer.name)

    # -- peer manager callback -------------------------------------------------

    def on_peer_change(self, device_id: str, online: bool) -> None:
        info = self.peers.peer_info(device_id)
        if online and info is not None and info.hello is not None:
            self.trust_store.note_seen(device_id, info.hello.name, info.hello.security_level)
        log.info("device %s is %s", device_id, "online" if online else "offline")
        self._emit(device_id, online)

    def _emit(self, device_id: str, online: bool) -> None:
        if self.on_event is not None:
            view = self.get(device_id)
            self.on_event({"device_id": device_id, "online": online, "trusted": view.trusted,
                           "name": view.name, "security_level": level_name(view.security_level)})

    # -- queries ---------------------------------------------------------------

    def level_of(self, device_id: str) -> int | None:
        info = self.peers.peer_info(device_id)
        if info is not None and info.online and info.hello is not None:
            return info.hello.security_level
        entry = self.trust_store.get(device_id)
        return entry.security_level if entry is not None else None

    def may_receive(self, device_id: str, store_label: int) -> bool:
        """The one check sync and remote query make before data leaves for ``device_id``."""
        return self.trust_store.is_trusted(device_id) and security_allows(self.level_of(device_id), store_label)

    def check_may_receive(self, device_id: str, store: Store) -> None:
        """:meth:`may_receive` as a guard, for sync (both directions) and
        remote query: raise ``SecurityLevelDenied`` with one wording, naming
        the store's label and the device's level, whoever refuses."""
        label = store.security_label
        if self.may_receive(device_id, label):
            return
        if not self.trust_store.is_trusted(device_id):
            why = "is not trusted"
        else:
            level = level_name(self.level_of(device_id))
            why = f"is at level {level or 'unknown'}, below S{label}"
        raise SecurityLevelDenied(f"store {store.name} is labelled S{label}; device {device_id} {why}",
                                  data={"device_id": device_id, "store": store.name, "security_level": f"S{label}"})

    def get(self, device_id: str) -> DeviceView:
        """One device's view, built alone (a bulk trust emits one per device)."""
        pending = {p.device_id: p for p in self.peers.pending()}
        known = device_id in self._discovered or self.trust_store.is_trusted(device_id) or device_id in pending \
            or self.peers.peer_info(device_id) is not None
        if known and device_id != self.local_id:
            return self._view(device_id, pending)
        raise DeviceUnknown(f"no device {device_id} is known (not trusted, not discovered, never connected)",
                            data={"device_id": device_id})

    def list(self) -> list[DeviceView]:
        ids: set[str] = set(self._discovered)
        ids.update(e.device_id for e in self.trust_store.entries())
        ids.update(p.device_id for p in self.peers.pending())
        ids.update(p.device_id for p in self.peers.peers())
        ids.discard(self.local_id)
        pending = {p.device_id: p for p in self.peers.pending()}
        return [self._view(device_id, pending) for device_id in sorted(ids)]

    def _view(self, device_id: str, pending: dict[str, PendingPeer]) -> DeviceView:
        entry = self.trust_store.get(device_id)
        info = self.peers.peer_info(device_id)
        disc = self._discovered.get(device_id)
        knock = pending.get(device_id)
        trusted = entry is not None
        # The trust list's name first: the one the user gave at trust time
        # (the announced name only fills it in when none was given).
        name = (entry.name if entry else None) or (info.hello.name if info and info.hello else None) \
            or (disc.name if disc else None) or (knock.name if knock else None)
        addresses: list[str] = []
        if info is not None:
            addresses += [f"{h}:{p}" for h, p in info.addresses]
        if disc is not None:
            addresses += [f"{a}:{disc.port}" for a in disc.addresses]
        if knock is not None:
            addresses.append(f"{knock.address[0]}:{knock.address[1]}")
        level = self.level_of(device_id)
        if level is None and disc is not None:
            level = disc.security_level
        seen = [t for t in (info.last_seen if info else None, knock.last_seen if knock else None,
                            self._discovered_at.get(device_id), entry.last_seen if entry else None) if t]
        connected = bool(info and info.online)
        return DeviceView(
            device_id=device_id, name=name, trusted=trusted, connected=connected,
            online=connected or (trusted and disc is not None and self.peers.outside_active_set(device_id)),
            pending=not trusted, addresses=tuple(dict.fromkeys(addresses)), security_level=level,
            last_seen=max(seen) if seen else None, discovered=disc is not None,
            protocol_version=info.hello.protocol_version if info and info.hello else disc.protocol_version if disc else None,
        )

    # -- trust -----------------------------------------------------------------

    def trust(self, device_id: str, name: str | None = None) -> str:
        return self.trust_many([(device_id, name)])[0]

    def trust_many(self, devices: Sequence[tuple[str, str | None]]) -> list[str]:
        """Trust every ``(device_id, name)`` in one trust-file write, all or
        none; a bad ID raises ``InvalidDeviceId`` naming it (and, for more
        than one, its ``index``) before anything is trusted. A name left out
        is the one the device announced, if known."""
        checked: list[tuple[str, str | None]] = []
        known: dict[str, str | None] | None = None
        for index, (text, name) in enumerate(devices):
            try:
                device_id = normalize_device_id(text)
                if device_id == self.local_id:
                    raise InvalidDeviceId("that is this device's own ID", data={"device_id": device_id})
            except InvalidDeviceId as exc:
                if len(devices) == 1:
                    raise
                raise InvalidDeviceId(f"devices[{index}]: {exc.message}", data={**exc.data, "index": index}) from None
            if name is None:
                known = known if known is not None else {v.device_id: v.name for v in self.list()}
                name = known.get(device_id)
            checked.append((device_id, name))
        self.trust_store.trust_many(checked)
        for device_id, name in checked:
            log.info("trusted device %s (%r)", device_id, name)
            self._emit(device_id, self.peers.is_online(device_id))
        return [device_id for device_id, _ in checked]

    def untrust(self, device_id: str) -> str:
        device_id = normalize_device_id(device_id)
        was_online = self.peers.is_online(device_id)
        if not self.trust_store.untrust(device_id):
            raise DeviceUnknown(f"device {device_id} is not trusted", data={"device_id": device_id})
        log.info("untrusted device %s; its channel is closed", device_id)
        lost = self._lost.pop(device_id, None)
        if lost is not None:
            for host in lost.addresses:
                self.peers.remove_address(host, lost.port)
        if not was_online:  # else the peer manager already reported it offline (and untrusted)
            self._emit(device_id, False)
        return device_id
