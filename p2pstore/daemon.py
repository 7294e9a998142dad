"""Composition root: builds the parts from a Config, starts them, stops them.

Lifecycle:
- One daemon per socket. A lock file beside the socket (flock) decides who
  owns it; a socket file left by a crashed daemon (nobody listening) is
  removed and replaced, a live one makes the second daemon refuse to start.
- Ready when the API socket listens, which it does only once everything
  else is up (stores, peers, discovery): then READY=1 and a STATUS= line
  (peers online, last sync) go to systemd (Type=notify) if NOTIFY_SOCKET is
  set, and WATCHDOG=1 follows from the event loop if WatchdogSec= asks for
  it (p2pstore/service.py).
- SIGTERM/SIGINT: stop accepting, close stores, remove the socket file.
- SIGHUP: re-read sync_schema.json for every open single_version store
  (accepted or refused per store, and logged; never fatal).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from p2pstore.api.methods import Api, DeviceSelf
from p2pstore.api.server import ApiServer, ClientConnection
from p2pstore.api.subscriptions import ChangeFeed, Subscriptions
from p2pstore.config import Config
from p2pstore.errors import ConfigError, DaemonAlreadyRunning, P2PStoreError, ProtocolError
from p2pstore import PROTOCOL_VERSION
from p2pstore.net.channel import Channel
from p2pstore.net.devices import DeviceDirectory
from p2pstore.net.discovery import Discovery
from p2pstore.net.identity import Identity
from p2pstore.net.peers import PeerManager
from p2pstore.net.trust import TrustStore
from p2pstore.protocol.messages import Hello, Message, RevisionOffer, StoreOffer, StoresOffer
from p2pstore.service import ServiceNotifier, log_handler
from p2pstore.store.capture import ChangeBatch
from p2pstore.store.database import Lag, Store, sync_work
from p2pstore.store.merge import ApplyResult
from p2pstore.sync.engine import SyncEngine, table_offers
from p2pstore.sync.remote_query import RemoteQueries
from p2pstore.store.registry import StoreRegistry
from p2pstore.tasks import TaskSet
from p2pstore.protocol.table_type import TableType

log = logging.getLogger("p2pstore.daemon")

#: A device offers its stores again after local changes at most this often
#: (the peers' ``unreceived`` figures follow within that time).
REOFFER_INTERVAL_S = 2.0
#: Net allocations between two young-generation collections (``tune_gc``; CPython's default 700).
GC_THRESHOLD = 20_000


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a daemon that streams rows.

    A sync allocates and frees a tuple per row and a list per batch — none
    of them in cycles — and CPython's default (a collection every 700 net
    allocations) ran ~5 % of a push's CPU on each side collecting them
    (py-spy --native: ``gc_collect_main``), on a 2-core machine where the
    two daemons' CPU is the bound. Collections every 20,000 allocations,
    and the objects of start-up (modules, classes) frozen out of every
    collection, as long-running Python servers do (``gc.freeze``'s docs):
    cycles are still collected, later. docs/performance.md, round 7."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


def setup_logging(level: str) -> None:
    """Log lines on stderr; under systemd, in the journal's format (service.log_handler)."""
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[log_handler()], force=True)
    # aiosqlite logs every statement at DEBUG: too much even for debugging us.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, logging.getLogger().level))


class SocketLock:
    """Exclusive ownership of a socket path, with stale-socket recovery."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DaemonAlreadyRunning(
                f"another p2pstore daemon (pid {pid}) is already running on {self.path}; stop it or use --socket",
                data={"socket": str(self.path)},
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        if self.path.exists() or self.path.is_symlink():
            self._clear_stale()

    def _clear_stale(self) -> None:
        if not self.path.is_socket():
            raise ConfigError(f"{self.path} exists and is not a socket; refusing to replace it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            try:
                probe.connect(str(self.path))
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                    raise
                log.warning("removed stale socket %s left by a daemon that is gone", self.path)
                self.path.unlink(missing_ok=True)
                return
        raise DaemonAlreadyRunning(f"a process is already listening on {self.path}", data={"socket": str(self.path)})

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
            os.close(self._fd)
            self._fd = None


class PeerEvents:
    """What the peer manager calls back into, built before it.

    The one true cycle of the parts: the peer manager must be told whom to
    call when a peer comes, goes or sends a message, and those parties
    (device directory, sync engine, remote queries) are built with the peer
    manager. This dispatcher is handed to the peer manager first and wired
    once, in :class:`Daemon`, when the parties exist; before that (nothing
    is started yet) it calls nobody.
    """

    def __init__(self) -> None:
        self._listeners: tuple[Callable[[str, bool], object], ...] = ()
        self._handlers: tuple[Callable[[str, Message, Channel], Awaitable[bool | None]], ...] = ()
        self._closers: tuple[Callable[[str, Channel], object], ...] = ()

    def wire(self, *, listeners: Sequence[Callable[[str, bool], object]],
             handlers: Sequence[Callable[[str, Message, Channel], Awaitable[bool | None]]],
             closers: Sequence[Callable[[str, Channel], object]]) -> None:
        """``listeners`` hear every online/offline change, in order;
        ``handlers`` are offered each message in order until one returns True;
        ``closers`` hear of every channel that closed (sessions and queries
        live on one channel and end with it, sync/requests.py)."""
        self._listeners, self._handlers, self._closers = tuple(listeners), tuple(handlers), tuple(closers)

    def changed(self, device_id: str, online: bool) -> None:
        for listener in self._listeners:
            listener(device_id, online)

    async def message(self, device_id: str, msg: Message, channel: Channel) -> None:
        for handler in self._handlers:
            if await handler(device_id, msg, channel):
                return

    def channel_closed(self, device_id: str, channel: Channel) -> None:
        for closer in self._closers:
            closer(device_id, channel)


class Daemon:
    """The parts, each built with its real collaborators, and their lifecycle.

    Built in dependency order: identity and trust list, store registry, peer
    manager, device directory, sync engine, remote queries, API. Building
    does no network I/O (it reads or creates the identity); :meth:`start`
    takes the socket lock, opens the auto-sync stores, starts the network
    and discovery, and only then the API socket.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stopping = asyncio.Event()
        check_data_dir(config.data_dir)
        self.identity = Identity.load_or_create(config.data_dir, config.name)
        self.trust = TrustStore(config.data_dir / "trust.json")
        self.subscriptions = Subscriptions(max_per_store=config.max_subscriptions)
        self.feed = ChangeFeed(self.subscriptions)
        self.registry = StoreRegistry(
            config.data_dir,
            max_per_bundle=config.max_stores_per_bundle,
            busy_timeout_ms=config.busy_timeout_ms,
            synchronous=config.synchronous,
            sync_schema_path=config.sync_schema_path,
            max_clock_offset_ms=config.max_clock_offset_ms,
        )
        self.registry.device_id = self.identity.device_id
        self.registry.on_changes = self._store_changed
        self.registry.on_offer_changed = lambda store: self._reoffer_soon()
        self.registry.tombstone_horizon_ms = int(config.tombstone_horizon_days * 86_400_000)
        self.registry.compact_interval_s = config.compact_interval_s
        self.registry.compact_keep_recent = config.compact_keep_recent
        self.registry.auto_apply_evolutions = config.auto_apply_evolutions
        # Forgetting deletes waits for the trusted peers' acks (store/gc.py); an untrusted one no longer holds it.
        self.registry.gc_holders = self._gc_holders

        events = PeerEvents()
        self.peers = PeerManager(
            self.identity, self.trust, hello_factory=self.hello,
            on_change=events.changed, on_message=events.message, on_channel_closed=events.channel_closed,
            host=list(config.interfaces) or "0.0.0.0", port=config.port, active_set=config.active_set,
            full_mesh_peers=config.full_mesh_peers,
            idle_close=config.idle_close_s,
            **_given(keepalive_interval=config.keepalive_interval_s, dead_after=config.peer_dead_after_s,
                     backoff_max=config.redial_backoff_max_s),
        )
        self.directory = DeviceDirectory(self.identity.device_id, self.trust, self.peers, on_event=self._device_event)
        self.engine = SyncEngine(registry=self.registry, peers=self.peers, directory=self.directory,
                                 on_applied=self._applied, window=config.sync_window,
                                 relay_fanout=config.relay_fanout, anti_entropy_interval=config.anti_entropy_interval_s,
                                 sync_log_entries=config.sync_log_entries)
        self.queries = RemoteQueries(registry=self.registry, peers=self.peers, directory=self.directory,
                                     timeout=config.remote_query_timeout_s, max_result_bytes=config.max_result_bytes)
        events.wire(
            listeners=[self.directory.on_peer_change, self.engine.on_peer_change, self.queries.on_peer_change,
                       self._offer_on_connect],
            handlers=[self.queries.handle, self.engine.handle],
            closers=[self.engine.on_channel_closed, self.queries.on_channel_closed],
        )
        #: mDNS; built in start(), as it announces the port the channels are bound to. None: off (or not started).
        self.discovery: Discovery | None = None

        self.api = Api(device=self.device_self, registry=self.registry, subscriptions=self.subscriptions,
                       feed=self.feed, devices=self.directory, engine=self.engine, queries=self.queries,
                       max_result_bytes=config.max_result_bytes)
        self.server = ApiServer(
            config.socket,
            self.api.dispatch,
            max_line=config.max_request_bytes,
            allowed_uids={os.getuid(), 0, *config.allowed_uids},
            group=config.socket_group,
            queue_limit=config.notification_queue,
            on_disconnect=self._client_gone,
        )
        self._lock = SocketLock(config.socket)
        self._tasks = TaskSet(log)
        self.notifier = ServiceNotifier(self.service_status)
        self._last_sync: tuple[str, float, int] | None = None  # (peer, wall time, changes applied)
        self._reoffer: asyncio.Future[None] | None = None
        self._offered_at = 0.0

    def device_self(self) -> DeviceSelf:
        port = self.peers.port if self.peers.port is not None else self.config.port
        return DeviceSelf(self.identity.device_id, self.config.name, self.config.security_level, port, self.config.default_store)

    def hello(self) -> Hello:
        """Who this device is, for a peer it trusts. No stores: those go in a
        StoresOffer once the peer has shown it trusts us too (``_offer_on_connect``)."""
        return Hello(PROTOCOL_VERSION, self.identity.device_id, self.config.name, self.config.security_level_int, ())

    def _gc_holders(self) -> list[str]:
        return [e.device_id for e in self.trust.entries()]

    async def stores_offer(self, peer: str) -> StoresOffer:
        """Our stores for ``peer``, each with its lag figures for it (sync/lag.py)."""
        offers = []
        with sync_work():  # the daemon's own reads when a peer connects: not the application's
            for store in self.registry.stores():
                if store.distributed:
                    acked = self.engine.lag.acked_position(peer, store.bundle, store.name)
                    offers.append(store_offer(store, await store.lag(peer, acked)))
        return StoresOffer(tuple(offers))

    def service_status(self) -> str:
        """The one line ``systemctl status`` shows: peers online, last sync."""
        online = sum(1 for d in self.peers.channels() if self.trust.is_trusted(d))
        if self._last_sync is None:
            last = "no sync received yet"
        else:
            peer, when, applied = self._last_sync
            last = f"last sync {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))} from {peer[:7]} ({applied} change(s) applied)"
        return f"{online} trusted peer(s) online, {len(self.registry.stores())} store(s) open; {last}"

    def _applied(self, store: Store, peer: str, result: ApplyResult) -> None:
        self._last_sync = (peer, time.time(), result.applied)
        self.feed.on_applied(store, peer, result)

    def _store_changed(self, store: Store, batch: ChangeBatch) -> None:
        """Local changes (API or another program): notify, and auto-sync them."""
        self.feed.on_store_changes(store, batch)
        self.engine.on_local_changes(store, list(batch.by_table))
        self._reoffer_soon()

    def _reoffer_soon(self) -> None:
        """Offer our stores again to every online trusted peer (their
        ``unreceived`` figure), at most every ``REOFFER_INTERVAL_S``."""
        if self._reoffer is not None:
            return
        wait = max(0.0, self._offered_at + REOFFER_INTERVAL_S - time.monotonic())
        self._reoffer = self._tasks.spawn(self._offer_all_after(wait), "re-offer stores")

    async def _offer_all_after(self, wait: float) -> None:
        try:
            await asyncio.sleep(wait)
        finally:
            self._reoffer = None
        self._offered_at = time.monotonic()
        for device_id in self.peers.channels():
            if self.trust.is_trusted(device_id):
                await self._offer_stores(device_id)

    def _offer_on_connect(self, device_id: str, online: bool) -> None:
        if online:
            self._tasks.spawn(self._offer_stores(device_id), f"offer stores to {device_id[:7]}")

    async def _offer_stores(self, device_id: str) -> None:
        try:
            offer = await self.stores_offer(device_id)
        except ProtocolError as exc:  # our own offer failed its checks: a bug to see, not a peer that went away
            log.warning("could not offer stores to %s: the offer is not a valid message: %s", device_id, exc.message)
            return
        try:
            await self.peers.send(device_id, offer)
        except P2PStoreError as exc:
            log.debug("could not offer stores to %s: %s", device_id, exc.message)
        except Exception as exc:  # e.g. a store closed while its lag was counted: the next offer has it right
            log.warning("could not offer stores to %s: %s: %s", device_id, type(exc).__name__, exc)

    def _device_event(self, event: dict[str, Any]) -> None:
        self.subscriptions.publish(None, "devices", "deviceChange", event)

    async def _start_network(self) -> None:
        cfg = self.config
        await self.peers.start()
        for peer in cfg.peers:
            host, _, port = peer.rpartition(":")
            self.peers.add_address(None, host, int(port), source="static")
        if cfg.discovery:
            self.discovery = Discovery(
                device_id=self.identity.device_id, name=cfg.name, port=self.peers.port or cfg.port,
                security_level=cfg.security_level_int, protocol_version=PROTOCOL_VERSION,
                interfaces=list(cfg.interfaces) or None,
                on_found=self.directory.on_found, on_lost=self.directory.on_lost,
                **_given(record_ttl=cfg.mdns_record_ttl_s, liveness_interval=cfg.mdns_liveness_interval_s),
            )
            await self.discovery.start()
        log.info("peer channels on port %s (%s), discovery %s, %d static peer(s), %d trusted device(s)",
                 self.peers.port, ", ".join(cfg.interfaces) or "all interfaces",
                 "on" if cfg.discovery else "off", len(cfg.peers), len(self.trust.entries()))

    def _client_gone(self, client: ClientConnection) -> None:
        self.subscriptions.drop_outbox(client.outbox)

    async def start(self) -> None:
        data_dir = self.config.data_dir
        self._lock.acquire()
        # The API socket comes last: a client that can connect finds the
        # daemon whole (auto-sync stores open, device layer up, real port).
        try:
            auto = await self.registry.open_auto_sync_stores()
            if auto:
                log.info("opened %d store(s) with auto-sync tables: %s", len(auto), ", ".join(f"{s.bundle}/{s.name}" for s in auto))
            await self._start_network()
            await self.server.start()
        except BaseException:
            await self._stop_network()
            await self.server.stop()
            await self.registry.close_all()
            self._lock.release()
            raise
        self._tasks.spawn(self.registry.run_polling(self.config.poll_interval_ms), "poll stores")
        self.engine.start()
        log.info("p2pstore daemon %s (%s) listening on %s, data in %s",
                 self.config.name, self.identity.device_id, self.config.socket, data_dir)
        self.notifier.ready()
        self._tasks.spawn(self.notifier.run(), "sd_notify")

    async def stop(self) -> None:
        self.notifier.stopping()
        await self._tasks.close()
        await self._stop_network()
        await self.server.stop()
        await self.registry.close_all()
        self._lock.release()
        log.info("p2pstore daemon stopped")

    async def _stop_network(self) -> None:
        await self.engine.stop()
        await self.queries.stop()
        if self.discovery is not None:
            await self.discovery.stop()
            self.discovery = None
        await self.peers.stop()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        await self.start()
        try:
            await self.stopping.wait()
        finally:
            await self.stop()

    def _on_reload_signal(self) -> None:
        log.info("received SIGHUP, re-reading %s", self.config.sync_schema_path)
        self._tasks.spawn(self.registry.reload_sync_schema(), "reload sync_schema.json")

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        log.info("received %s, shutting down", sig.name)
        self.stopping.set()


def _given(**timers: Any) -> dict[str, Any]:
    """The timers the config sets; the others keep their module's default."""
    return {k: v for k, v in timers.items() if v is not None}
def check_data_dir(data_dir: Path) -> None:
    """Create the data directory if needed and prove it can be written, or
    raise CONFIG_INVALID naming it: a read-only mount or a directory of
    another user fails here, in one line, not later in the middle of
    creating the identity or opening a store. A real write is tried
    (root passes every permission check, not a read-only mount's)."""
    probe = data_dir / f".write-test-{os.getpid()}"
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"data directory {data_dir} is not writable: {exc.strerror or exc}",
                          data={"data_dir": str(data_dir)}) from exc


def store_offer(store: Store, lag: Lag | None = None) -> StoreOffer:
    """A store's distributed tables as offered to a peer (names and sync
    columns, never rows), with ``lag``'s figures for that peer."""
    figures = (lag.unsent, lag.last_seq, lag.stream) if lag is not None else (None, None, None)
    return StoreOffer(store.bundle, store.name, store.security_label, store.table_type or TableType.COLLABORATIVE.value, table_offers(store),
                      *figures, tuple(RevisionOffer(rid, digest) for rid, digest in store.revisions))
