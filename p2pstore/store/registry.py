"""The daemon's open stores, keyed by (bundle, name), and the poll loop.

Files live at ``<data dir>/stores/<bundle>/<name>.db``. A store stays open
until ``store.close`` (opening an open store again returns it). At most
``max_per_bundle`` open stores of a bundle may have distributed tables, as in
HarmonyOS (16 by default).

The poll loop asks every open store's connection for ``PRAGMA data_version``
each ``poll_interval_ms``: it changes when another process commits, and then
the store stamps and announces the captured changes.

``reload_sync_schema`` (SIGHUP) reads sync_schema.json once and offers it to
every open store with single_version tables; each accepts or refuses it on
its own, and a refusal only ever affects (and is logged for) that store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Collection
from pathlib import Path

from p2pstore.clock import DEFAULT_MAX_OFFSET_MS
from p2pstore.errors import P2PStoreError, StoreNotOpen, TooManyStores
from p2pstore.store import accepted_schema, capture, evolutions
from p2pstore.store.capture import ChangeBatch
from p2pstore.store.database import Store
from p2pstore.store.tables import check_name
from p2pstore.protocol.table_type import TableType

log = logging.getLogger(__name__)

#: How often open stores drop change-log rows nothing reads any more.
COMPACT_INTERVAL_S = 60.0


class StoreRegistry:
    def __init__(
        self,
        data_dir: Path,
        *,
        max_per_bundle: int = 16,
        busy_timeout_ms: int = 5000,
        synchronous: str = "NORMAL",
        on_changes: Callable[[Store, ChangeBatch], None] | None = None,
        sync_schema_path: Path | None = None,
        max_clock_offset_ms: int = DEFAULT_MAX_OFFSET_MS,
    ) -> None:
        self.data_dir = data_dir
        #: Where single_version stores' sync_schema.json is read (Config.sync_schema_path).
        self.sync_schema_path = sync_schema_path or data_dir / "sync_schema.json"
        self.max_per_bundle = max_per_bundle
        self.busy_timeout_ms = busy_timeout_ms
        self.synchronous = synchronous
        self.max_clock_offset_ms = max_clock_offset_ms
        self.on_changes = on_changes
        #: Called (in the event loop) when what peers are offered of a store changed (tables, sync schema, evolutions).
        self.on_offer_changed: Callable[[Store], None] | None = None
        self._stores: dict[tuple[str, str], Store] = {}
        #: Apply a store's pending evolutions when it opens (config ``auto_apply_evolutions``; never Downs).
        self.auto_apply_evolutions = False
        #: This device's ID, recorded in every store it opens (set by the daemon).
        self.device_id: str | None = None
        self._lock = asyncio.Lock()
        #: Compaction (set by the daemon from its Config): the peers whose acks
        #: hold forgetting deletes back (the trusted ones; None: never forget),
        #: how long an ack holds it (ms), how often it runs, the log rows it keeps.
        self.gc_holders: Callable[[], Collection[str]] | None = None
        self.tombstone_horizon_ms = 30 * 86_400_000
        self.compact_interval_s = COMPACT_INTERVAL_S
        self.compact_keep_recent = capture.COMPACT_KEEP_RECENT

    def path_for(self, bundle: str, name: str) -> Path:
        return self.data_dir / "stores" / check_name("bundle", bundle) / f"{check_name('store', name)}.db"

    def evolutions_dir(self, bundle: str, name: str) -> Path:
        """Where a store's evolution scripts are read: ``<data dir>/evolutions/<bundle>/<store>/N.sql``."""
        return self.data_dir / "evolutions" / check_name("bundle", bundle) / check_name("store", name)

    async def open(self, bundle: str, name: str, security_label: int | None = None) -> Store:
        path = self.path_for(bundle, name)
        async with self._lock:
            store = self._stores.get((bundle, name))
            if store is not None:
                if security_label is not None and security_label != store.security_label:
                    await store.set_security_label(security_label)
                return store
            store = await Store.open(
                path, bundle=bundle, name=name, security_label=security_label,
                busy_timeout_ms=self.busy_timeout_ms, synchronous=self.synchronous, device_id=self.device_id,
                max_clock_offset_ms=self.max_clock_offset_ms,
            )
            if store.distributed:
                try:
                    self.check_distributed_limit(store)
                except P2PStoreError:
                    await store.close()
                    raise
            store.on_changes = self.on_changes
            store.on_offer_changed = self.on_offer_changed
            store.compact_keep_recent = self.compact_keep_recent
            self._stores[(bundle, name)] = store
            log.info("opened store %s/%s at %s (label S%d, %d distributed table(s))",
                     bundle, name, path, store.security_label, len(store.distributed))
            if self.auto_apply_evolutions:
                await self._apply_evolutions(store)
            return store

    async def _apply_evolutions(self, store: Store) -> None:
        """``auto_apply_evolutions``: the pending revisions, before anyone uses
        the store; a diverged one waits for ``evolutions apply`` (Downs never run
        by themselves). A failure leaves the store open and says so."""
        directory = self.evolutions_dir(store.bundle, store.name)
        try:
            scripts = await asyncio.to_thread(evolutions.load_dir, directory)
            if scripts:
                await store.apply_evolutions(scripts, downs=False)
        except P2PStoreError as exc:
            log.error("store %s/%s: evolutions not applied at open: %s: %s (see `p2pstore evolutions status`)",
                      store.bundle, store.name, exc.name, exc.message)

    async def open_existing(self, bundle: str, name: str) -> Store | None:
        """Open a store whose file exists (a peer asks for it); None if there is none."""
        try:
            path = self.path_for(bundle, name)
        except P2PStoreError:
            return None
        if not path.exists():
            return None
        return await self.open(bundle, name)

    async def for_peer(self, bundle: str, name: str) -> Store:
        """The store a peer asks for: open, or opened now if its file exists."""
        store = self._stores.get((bundle, name)) or await self.open_existing(bundle, name)
        if store is None:
            raise StoreNotOpen(f"this device has no store {bundle}/{name}", data={"store": name, "bundle": bundle})
        return store

    async def open_auto_sync_stores(self) -> list[Store]:
        """Open every store file that has auto-sync tables (at daemon start).

        Auto-sync must not wait for an application to open a store: writes made
        while the daemon was down reach peers as soon as they reconnect.
        """
        opened = []
        for path in sorted((self.data_dir / "stores").glob("*/*.db")):
            bundle, name = path.parent.name, path.stem
            if (bundle, name) in self._stores:
                continue
            try:
                store = await self.open(bundle, name)
            except P2PStoreError as exc:
                log.warning("could not open %s/%s at start: %s", bundle, name, exc.message)
                continue
            if any(store.auto_sync.values()):
                opened.append(store)
            else:
                await self.close(bundle, name)
        return opened

    def get(self, bundle: str, name: str) -> Store:
        store = self._stores.get((bundle, name))
        if store is None:
            raise StoreNotOpen(f"store {bundle}/{name} is not open; call store.open first", data={"store": name, "bundle": bundle})
        return store

    def stores(self) -> list[Store]:
        return list(self._stores.values())

    def check_distributed_limit(self, store: Store) -> None:
        """Raise if ``store`` would be one store with distributed tables too many."""
        others = [
            s for (b, _), s in self._stores.items()
            if b == store.bundle and s is not store and s.distributed
        ]
        if len(others) >= self.max_per_bundle:
            raise TooManyStores(
                f"bundle {store.bundle} already has {len(others)} open stores with distributed tables (limit {self.max_per_bundle}); close one first",
                data={"bundle": store.bundle, "limit": self.max_per_bundle},
            )

    @contextlib.asynccontextmanager
    async def distributing(self, store: Store) -> AsyncIterator[None]:
        """Hold the registry while ``store`` gets distributed tables (limit check included)."""
        async with self._lock:
            if not store.distributed:
                self.check_distributed_limit(store)
            yield

    async def close(self, bundle: str, name: str) -> None:
        async with self._lock:
            store = self.get(bundle, name)
            del self._stores[(bundle, name)]
            await store.close()
            log.info("closed store %s/%s", bundle, name)

    async def close_all(self) -> None:
        async with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            await store.close()

    async def reload_sync_schema(self) -> None:
        """Re-read sync_schema.json and apply it to every open store with
        single_version tables (SIGHUP). Never raises: every outcome, accepted
        or refused, is logged per store, and the file isn't read at all when
        no such store is open."""
        stores = [s for s in self.stores() if s.table_type == TableType.SINGLE_VERSION and s.distributed]
        if not stores:
            log.info("no open store has single_version tables; %s not read", self.sync_schema_path)
            return
        try:
            doc = await asyncio.to_thread(accepted_schema.read_schema_file, self.sync_schema_path)
        except P2PStoreError as exc:
            for store in stores:
                accepted_schema.log_refused(accepted_schema.store_label(store), exc, store.sync_schema_version)
            return
        for store in stores:
            try:
                await accepted_schema.reload(store, doc)
            except ValueError:
                pass  # closed while we reloaded
            except Exception:  # a bug must not take the daemon down with it
                log.exception("store %s/%s: reloading sync_schema.json failed", store.bundle, store.name)

    async def poll_once(self) -> None:
        for store in list(self._stores.values()):
            try:
                await store.poll()
            except P2PStoreError as exc:
                # Busy past the timeout, or the file went bad: log and try again next round.
                log.warning("store %s/%s: could not read outside changes: %s", store.bundle, store.name, exc.message)
            except ValueError:
                pass  # closed while we polled
            except sqlite3.Error as exc:
                # Another program changed the file under us (e.g. renamed a
                # distributed table): keep polling the other stores.
                log.error("store %s/%s: capture failed: %s", store.bundle, store.name, exc)

    async def run_polling(self, interval_ms: int) -> None:
        """Poll forever (cancelled by the daemon on shutdown); compact the
        stores' change logs every ``COMPACT_INTERVAL_S``."""
        loop = asyncio.get_running_loop()
        next_compaction = loop.time() + self.compact_interval_s
        while True:
            await asyncio.sleep(interval_ms / 1000)
            await self.poll_once()
            if loop.time() >= next_compaction:
                await self.compact_once()
                next_compaction = loop.time() + self.compact_interval_s

    async def compact_once(self) -> None:
        for store in list(self._stores.values()):
            try:
                holders = set(self.gc_holders()) if self.gc_holders is not None else None
                await store.compact(holders=holders, horizon_ms=self.tombstone_horizon_ms)  # keep_recent: set at open
            except ValueError:
                pass  # closed meanwhile
            except (P2PStoreError, sqlite3.Error) as exc:  # busy past the timeout: next time
                log.warning("store %s/%s: could not compact the change log: %s", store.bundle, store.name, exc)
