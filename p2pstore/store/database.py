"""A store: one SQLite file, one writer connection owned by the daemon.

The connection lives on aiosqlite's worker thread. Every operation is one
plain function ``fn(conn, ...)`` run on that thread (``Store.run``), so a
whole transaction — the user's statement plus the stamping of what it
captured — costs one hop and no other coroutine can slip a statement into it.

Invariants:
- WAL mode and a busy timeout, so other processes can read and write the file
  while the daemon has it open; their changes are captured by the triggers.
- Statements from the API run under an authorizer: no transaction control,
  no ATTACH, no writes to ``_p2p_*`` internals, no pragma that would change
  how the daemon relies on the file. They carry ``API_SQL_TAG``, so the
  statement cache never hands them one the daemon prepared unchecked.
- ``stamp`` runs in the same transaction as an API write, and after every
  commit by another process (noticed through ``PRAGMA data_version``).
- Single-version stores sync by the sync_schema.json entry accepted into
  the store (``store/accepted_schema.py``); accepting one happens inside the
  same transaction as the tables it concerns.
- Storage faults leave ``Store.run`` as domain errors naming the store and
  its file: ``DISK_FULL`` (SQLite rolled the transaction back: nothing of it
  is written), ``STORE_READ_ONLY``. No write is acknowledged unless, just
  before its COMMIT, the path is still the file the connection opened
  (same inode, SQLite header); once it is not, the store refuses everything
  (``STORE_FILE_CHANGED``) until it is closed and opened again.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from p2pstore.clock import DEFAULT_MAX_OFFSET_MS, HybridClock, wall_ms
from p2pstore.errors import (
    BackupFailed,
    ColumnNotFound,
    ConstraintViolation,
    DiskFull,
    EvolutionDestructive,
    EvolutionInconsistent,
    InConflict,
    InvalidParams,
    P2PStoreError,
    PermissionDenied,
    ReadOnlyTable,
    RebuildRefused,
    SecurityLabelMismatch,
    SqlError,
    StoreFileChanged,
    StoreInvalid,
    StoreReadOnly,
    TableNotDistributed,
    TableTypeLocked,
)
from p2pstore.schema.predicates import compile_predicates, is_sql_value, quote_ident, table_of
from p2pstore.schema.sync_schema import SchemaIssue, ValidationReport
from p2pstore.store import (
    accepted_schema, capture, cells, changes, evolutions, gc, merge, modes, policies, rebuild, replicas, restore, sync_log, versions,
)
from p2pstore.store.stream import changes_since, unsent_rows
from p2pstore.store.capture import CaptureState, ChangeBatch, get_meta, set_meta
from p2pstore.protocol.results import MAX_RESULT_BYTES, MAX_RESULT_ROWS, ResultBudget
from p2pstore.store.tables import INTERNAL_PREFIX, TableInfo, read_table_info
from p2pstore.protocol.replica_kind import ReplicaKind
from p2pstore.protocol.table_type import TableType

log = logging.getLogger(__name__)
T = TypeVar("T")

TABLE_TYPES = tuple(TableType)
DEFAULT_BUSY_TIMEOUT_MS = 5000
#: Rows a single store.query may return (protects the daemon and the socket);
#: its bytes are capped too (protocol/results.py, config ``max_result_bytes``).
MAX_QUERY_ROWS = MAX_RESULT_ROWS
#: Prepared statements kept per store connection: the daemon's own statements
#: (sync apply, capture, reads) and the API's are re-used instead of re-prepared.
STATEMENT_CACHE = 256
#: Appended to every statement from the API. The statement cache is keyed by
#: the SQL text and the authorizer only runs when a statement is prepared, so
#: without this an API statement equal to one of the daemon's own (``COMMIT``,
#: an upsert into ``_p2p_meta``) would run the daemon's unchecked copy. No
#: statement of the daemon's ends with it; as a trailing comment it changes
#: nothing in what the API statement means.
API_SQL_TAG = "\n/* p2pstore api */"

#: Page cache of a store's connection, in KiB (SQLite's default is 2 MB).
#: Only pages read are held: a small store costs its size.
CACHE_KIB = 32 * 1024
#: WAL pages after which a commit copies the WAL back into the file (SQLite's
#: default: 1000). Synced rows keyed by random values touch pages all over the
#: file; a page rewritten by several commits between two checkpoints is copied
#: back once, so checkpointing less often saves most of a receiver's commit time
#: (push_outside, single_version: 22k rows/s at 1000, 27k at 10000). Each
#: checkpoint is bigger, which a local write waiting behind it feels: the p99
#: of writes_under_push stayed at 30 ms, its max went from 59 to 127 ms.
WAL_CHECKPOINT_PAGES = 10_000
#: The WAL file is cut back to this after a checkpoint (it otherwise keeps its
#: largest size): what a store costs on disk besides its file when idle.
WAL_KEEP_BYTES = 4 * 1024 * 1024
#: Free pages (4 KiB each) a store file gives back to the disk per step after
#: compaction (``PRAGMA incremental_vacuum``: files made with auto_vacuum
#: INCREMENTAL, every store created since row clocks by local key), and the
#: fewest worth a step. A step moves pages from the end of the file into
#: the free ones and truncates it; 500 pages (2 MiB) take a few ms to some tens.
VACUUM_STEP_PAGES = 500
VACUUM_MIN_PAGES = 256
#: How long sync work on a store waits at most for the application's
#: operations in flight to finish before it queues anyway (``Store.run_background``).
BACKGROUND_YIELD_S = 0.05
#: Sync operations a store's connection queue holds at most: an application's
#: operation waits behind that many at most. Two, not one: the connection's
#: thread then starts the next as soon as one ends, instead of idling for an
#: event-loop round trip (with one, a row reached 16 hosts in p50 98 ms, not 50).
BACKGROUND_QUEUED = 2
#: Rows another program appended that one step of stamping logs (``poll``,
#: ``read_changes``): ~20 ms of work, so a push starts on a bulk insert's
#: first rows while the rest are stamped (docs/performance.md, round 6).
STAMP_CHUNK_ROWS = 10_000
#: Rows a group of received batches writes, or a step of stamping logs, from
#: which it compacts the log too (``apply_changes_group``, ``_stamp_step``): a
#: large sync or bulk insert, not a single auto-synced change.
COMPACT_WHILE_APPLYING_ROWS = 1_000
#: Rows a group of received batches holds from which it lifts the store's own
#: insert triggers on the tables it writes (``merge._Applier.lift``): each lift
#: is schema changes (a drop, a create) that make every cached statement be
#: prepared again; worth it from a few blocks' rows on.
LIFT_TRIGGERS_ROWS = 8_000
#: Steps one poll takes at most (10M rows); the next poll goes on.
MAX_STAMP_STEPS = 1_000
#: A poll leaves the steps to a push that read this recently.
READER_STAMPS_S = 0.5
#: The application counts as quiet (sync work queues freely) once none of its
#: operations ran for this long.
BACKGROUND_QUIET_S = 0.1
_SYNC_WORK: ContextVar[bool] = ContextVar("p2pstore_sync_work", default=False)


@contextmanager
def sync_work() -> Iterator[None]:
    """Store operations made inside (in this task) are the sync engine's, not
    the application's: they do not make sync work wait (``Store.run_background``
    lets only the application's operations go first)."""
    token = _SYNC_WORK.set(True)
    try:
        yield
    finally:
        _SYNC_WORK.reset(token)

# Authorizer action codes (sqlite3 exposes them as constants).
_DENY_PRAGMAS = {"journal_mode", "locking_mode", "writable_schema", "query_only", "read_uncommitted", "recursive_triggers"}
_WRITE_ACTIONS = {sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE}
_DROP_ACTIONS = {sqlite3.SQLITE_DROP_TABLE, sqlite3.SQLITE_DROP_TRIGGER, sqlite3.SQLITE_DROP_INDEX, sqlite3.SQLITE_DROP_VIEW,
                 sqlite3.SQLITE_DROP_TEMP_TABLE, sqlite3.SQLITE_DROP_TEMP_TRIGGER, sqlite3.SQLITE_DROP_TEMP_INDEX,
                 sqlite3.SQLITE_DROP_TEMP_VIEW}
_CREATE_ACTIONS = {sqlite3.SQLITE_CREATE_TABLE, sqlite3.SQLITE_CREATE_INDEX, sqlite3.SQLITE_CREATE_TRIGGER,
                   sqlite3.SQLITE_CREATE_VIEW, sqlite3.SQLITE_CREATE_TEMP_TABLE, sqlite3.SQLITE_CREATE_TEMP_INDEX,
                   sqlite3.SQLITE_CREATE_TEMP_TRIGGER, sqlite3.SQLITE_CREATE_TEMP_VIEW}


#: What makes a user statement a schema change (``_after_ddl``): the authorizer sees
#: it, however the statement is written (comments first, odd case, a CTE).
_SCHEMA_ACTIONS = _DROP_ACTIONS | _CREATE_ACTIONS | {sqlite3.SQLITE_ALTER_TABLE}


def _internal(name: str | None) -> bool:
    return bool(name) and name.lower().startswith(INTERNAL_PREFIX)  # type: ignore[union-attr]


#: The first 16 bytes of every SQLite database file (https://sqlite.org/fileformat.html).
SQLITE_MAGIC = b"SQLite format 3\x00"


def storage_error(exc: sqlite3.Error) -> P2PStoreError | None:
    """The domain error for an sqlite3 error about the storage rather than
    the statement (disk full, read-only file), or None.

    SQLite rolls a transaction back on its own when the disk fills
    (``conn.in_transaction`` is False afterwards), so such an error means
    nothing of it was written. ``Store.run`` adds the store and its path.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return None
    text = str(exc)
    data = {"sqlite": text, "sqlite_code": getattr(exc, "sqlite_errorname", str(code))}
    if code & 0xFF == sqlite3.SQLITE_FULL:
        return DiskFull(f"disk full ({text})", data=data)
    if code & 0xFF == sqlite3.SQLITE_READONLY:
        return StoreReadOnly(f"the file can't be written ({text})", data=data)
    return None


def os_storage_error(exc: OSError, path: Path, what: str) -> P2PStoreError:
    """The domain error for an OSError while creating or checking ``path``."""
    reason = exc.strerror or str(exc)
    data = {"path": str(path), "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))}
    if exc.errno == errno.ENOSPC:
        return DiskFull(f"{what} {path}: disk full ({reason})", data=data)
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreReadOnly(f"{what} {path} is not writable: {reason}", data=data)
    return StoreInvalid(f"{what} {path} can't be used: {reason}", data=data)


def require_writable(path: Path) -> None:
    """Raise STORE_READ_ONLY unless ``path``'s directory (for the -wal and
    -shm files) and ``path`` itself, if it exists, can be written.

    ``os.access`` sees read-only mounts and immutable files even for root;
    without this SQLite quietly opens such a file read-only and the first
    write fails with a misleading error.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_storage_error(exc, path.parent, "store directory") from exc
    for target, what in ((path.parent, "store directory"), (path, "store file")):
        if target.exists() and not os.access(target, os.W_OK):
            problem = "a read-only file system" if _on_read_only_mount(target) else "no write permission"
            raise StoreReadOnly(f"{what} {target} is not writable: {problem}", data={"path": str(target)})


def _on_read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def map_sqlite_error(exc: sqlite3.Error | OverflowError, sql: str | None = None) -> P2PStoreError:
    """The one place sqlite3 errors become p2pstore errors."""
    text = str(exc)
    if isinstance(exc, OverflowError):  # sqlite3 binds ints of at most 64 bits
        return InvalidParams(f"a number is outside SQLite's 64-bit integer range: {text}", data={"sqlite": text})
    storage = storage_error(exc)
    if storage is not None:
        return storage
    data = {"sqlite": text}
    if "READ_ONLY_TABLE" in text:
        return ReadOnlyTable(text.split("READ_ONLY_TABLE: ", 1)[-1], data=data)
    if "CONSTRAINT_VIOLATION" in text:
        return ConstraintViolation(text.split("CONSTRAINT_VIOLATION: ", 1)[-1], data=data)
    if isinstance(exc, sqlite3.IntegrityError):
        return ConstraintViolation(text, data=data)
    if "not authorized" in text:
        return PermissionDenied(f"statement not allowed through the API: {text}", data=data)
    return SqlError(text, data=data)


class Store:
    """One open store. Create with ``await Store.open(...)``."""

    def __init__(self, bundle: str, name: str, path: Path, db: aiosqlite.Connection) -> None:
        self.bundle = bundle
        self.name = name
        self.path = path
        self._db = db
        self.clock = HybridClock()
        self.security_label = 1
        self.table_type: str | None = None
        self.distributed: dict[str, TableInfo] = {}
        self.auto_sync: dict[str, bool] = {}
        self.capture = CaptureState()
        #: The sync_schema.json entry this store syncs by (single_version only).
        self.sync_schema: accepted_schema.AcceptedSchema | None = None
        #: Where the live tables no longer match ``sync_schema`` (found at open).
        self.schema_problems: tuple[SchemaIssue, ...] = ()
        self._user_sql = False
        self._schema_changed = False  # the authorizer saw a user statement change the schema
        self._dropping: str | None = None  # ... or drop a distributed table (evolutions)
        self._data_version = -1
        #: Log rows compaction leaves alone (the daemon's ``compact_keep_recent``).
        self.compact_keep_recent = capture.COMPACT_KEEP_RECENT
        #: A stamp in steps (``poll``, ``read_changes``) left appended rows for the next poll.
        self._appended_left = False
        self._reading_at = -1e9  # time.monotonic() of the last ``read_changes``
        #: (st_dev, st_ino) of the file the connection opened, and an fd on it
        #: for reading its header (never closed while SQLite has the file open:
        #: closing any fd of a file drops the process's POSIX locks on it).
        self._file_id: tuple[int, int] | None = None
        self._header_fd: int | None = None
        #: Set once the file at ``path`` is found not to be ours any more.
        self._broken: StoreFileChanged | None = None
        #: A restored file that has not caught up from a peer yet (store/restore.py):
        #: it sends nothing of its own until it has.
        self.restore_pending = False
        #: The store's applied evolutions as (revision, hash), oldest first, as
        #: peers are shown them (the handshake), and the half-applied revision
        #: that makes it inconsistent, if any (store/evolutions.py).
        self.revisions: tuple[tuple[int, str], ...] = ()
        self.inconsistent: tuple[int, str, str] | None = None
        #: This device's end of each replica link that is not two-way (store/replicas.py).
        self.replicas: dict[str, replicas.Link] = {}
        #: single_version tables' conflict policies that are not lww, and the
        #: entries queued here for a person to reconcile (store/policies.py).
        self.policies: dict[str, policies.Policy] = {}
        self.queued = 0
        #: What the state file beside the store says (store/restore.py), as last written.
        self._state: restore.State | None = None
        #: Local work first (``run_background``): operations of the
        #: application in flight, set when there are none, and the sync
        #: operations allowed in the connection's queue at a time.
        self._foreground = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._background = asyncio.Semaphore(BACKGROUND_QUEUED)
        self._foreground_ended = -1e9  # time.monotonic() when the last one ended
        #: Called (in the event loop) with every non-empty batch of captured changes.
        self.on_changes: Callable[[Store, ChangeBatch], None] | None = None
        #: Called (in the event loop) when what peers are offered of this store
        #: changed: its distributed tables, their sync schema, its ``revisions``.
        self.on_offer_changed: Callable[[Store], None] | None = None

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        bundle: str,
        name: str,
        security_label: int | None = None,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        synchronous: str = "NORMAL",
        device_id: str | None = None,
        max_clock_offset_ms: int = DEFAULT_MAX_OFFSET_MS,
    ) -> Store:
        require_writable(path)
        # Statements are cached (keyed by their text): SQLite consults the
        # authorizer only when it prepares one, so API SQL carries API_SQL_TAG
        # and can never reuse a statement the daemon prepared (e.g. "COMMIT").
        db = await aiosqlite.connect(str(path), isolation_level=None, check_same_thread=False, cached_statements=STATEMENT_CACHE)
        store = cls(bundle, name, path, db)
        store.clock.max_offset_ms = max_clock_offset_ms
        try:
            await store.run(store._setup, busy_timeout_ms, synchronous, security_label, device_id)
        except BaseException:
            await store.close()
            raise
        return store

    @property
    def label(self) -> str:
        """How errors and logs name this store: bundle/name and its file."""
        return f"store {self.bundle}/{self.name} ({self.path})"

    def _setup(self, conn: sqlite3.Connection, busy_timeout_ms: int, synchronous: str, label: int | None,
               device_id: str | None = None) -> None:
        # TEXT another program wrote that is not valid UTF-8 is read (faithfully,
        # see changes.TEXT_FACTORY) instead of failing every read and sync of the row.
        conn.text_factory = changes.TEXT_FACTORY
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                # A new file: pages compaction frees can be given back (``give_back_space``).
                # Only possible before its first table (and before WAL mode writes its header).
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreInvalid(f"{self.path}: could not switch to WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            fresh = restore.is_new_file(conn)
            # Sync metadata is keyed by conflict values (often random: uuids), so a
            # batch touches pages all over the file; SQLite's 2 MB default cache
            # then rereads them for every batch (docs/performance.md).
            conn.execute(f"PRAGMA cache_size = {-CACHE_KIB}")
            conn.execute("PRAGMA temp_store = MEMORY")  # the staging tables of a received block (store/blocks.py)
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_KEEP_BYTES}")
            capture.ensure_schema(conn)
            conn.executescript(accepted_schema.SCHEMA_SQL)
            conn.executescript(evolutions.SCHEMA_SQL)
            conn.executescript(sync_log.SCHEMA_SQL)
            conn.executescript(versions.SCHEMA_SQL)
            conn.executescript(replicas.SCHEMA_SQL)
            conn.executescript(policies.SCHEMA_SQL)
            sync_log.migrate(conn)
        except sqlite3.DatabaseError as exc:
            if storage_error(exc) is not None:
                raise  # disk full, read-only: Store.run says so (not "not a database")
            raise StoreInvalid(f"{self.path} is not a usable SQLite database: {exc}") from exc
        self._watch_file()
        conn.set_authorizer(self._authorize)
        with self._transaction(conn):
            if device_id is not None and capture.get_meta(conn, capture.DEVICE_ID_KEY) != device_id:
                capture.set_device_id(conn, device_id)
            self._apply_label(conn, label)
            self.table_type = get_meta(conn, "table_type")
            self._load_tables(conn)
            if self.table_type == TableType.SINGLE_VERSION:
                self.schema_problems = accepted_schema.recheck(
                    conn, label=f"{self.bundle}/{self.name}", bundle=self.bundle, name=self.name, tables=list(self.distributed)
                )
            if not fresh and restore.restored(conn, restore.read_state(self.path)):
                restore.mark_restored(conn, capture.stream_id(conn))
                log.warning("store %s/%s: the file is older than this device's last sync of it (restored from a backup or "
                            "copied in): it starts a new change stream%s", self.bundle, self.name,
                            ", and catches up from a peer before it sends its own rows" if restore.pending(conn) else "")
            self.restore_pending = restore.pending(conn)
            self._load_evolutions(conn)
            cells.migrate(conn, capture.get_meta, capture.set_meta)  # a file of the release before: once
            # Changes written while the daemon was down are stamped now; no
            # one is subscribed yet, so they are not announced.
            capture.stamp(conn, self.capture, self.clock, collect=False)
        self._note_sent(conn)
        self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]

    def _note_sent(self, conn: sqlite3.Connection) -> None:
        """Before seqs of this store can reach a peer: the state file covers
        them (store/restore.py). Written only when the stream or its last seq
        moved past what it says."""
        now = restore.State(capture.stream_id(conn), capture.last_seq(conn))
        if self._state is not None and now.stream == self._state.stream and now.seq <= self._state.seq:
            return
        try:
            restore.write_state(self.path, now)
        except OSError as exc:
            log.warning("store %s/%s: cannot write %s (%s): a restore of this file from a backup may go unnoticed",
                        self.bundle, self.name, restore.state_path(self.path), exc.strerror or exc)
            return
        self._state = now

    async def set_security_label(self, label: int) -> None:
        """Raise the store's label; lowering it is refused (data may already be restricted)."""

        def op(conn: sqlite3.Connection) -> None:
            with self._transaction(conn):
                self._apply_label(conn, label)

        await self.run(op)

    def _apply_label(self, conn: sqlite3.Connection, label: int | None) -> None:
        stored = get_meta(conn, "security_label")
        if stored is None:
            set_meta(conn, "security_label", label or 1)
        elif label is not None and label < stored:
            raise SecurityLabelMismatch(
                f"store {self.bundle}/{self.name} is labelled S{stored}; it can't be reopened with the lower label S{label}",
                data={"stored": f"S{stored}", "requested": f"S{label}"},
            )
        elif label is not None and label > stored:
            set_meta(conn, "security_label", label)
        self.security_label = int(get_meta(conn, "security_label"))

    def _load_evolutions(self, conn: sqlite3.Connection) -> None:
        self.revisions = evolutions.applied(conn)
        self.inconsistent = evolutions.inconsistent(conn)

    def require_consistent(self) -> None:
        """Refuse to sync a store an evolution left half-applied
        (``EvolutionInconsistent``, sync code 17): its schema is neither the
        old revision nor the new one, so neither its rows nor a peer's fit."""
        if self.inconsistent is not None:
            rid, state, problem = self.inconsistent
            raise EvolutionInconsistent(
                f"store {self.bundle}/{self.name} is inconsistent: evolution revision {rid} is {state} ({problem}); fix its script "
                f"and apply it, or `p2pstore evolutions resolve {rid}`",
                data={"store": self.name, "revision": rid, "state": state})

    def _load_tables(self, conn: sqlite3.Connection) -> None:
        """Re-read what the file says; the cached capture state follows it."""
        self.replicas = replicas.load(conn)
        self.policies = policies.load(conn)
        self.queued = policies.queued(conn)
        self.capture = capture.load_state(conn, self.clock)
        self.distributed = {t.info.name: t.info for t in self.capture.tables.values()}
        self.auto_sync = {
            name: bool(auto) for name, auto in conn.execute("SELECT name, auto_sync FROM _p2p_tables WHERE kind = 'local'")
        }
        self.sync_schema = accepted_schema.load_accepted(conn)

    def _transaction(self, conn: sqlite3.Connection) -> _transaction:
        return _transaction(conn, on_rollback=lambda: self._load_tables(conn), before_commit=self._check_file)

    async def close(self) -> None:
        await self._db.close()
        if self._header_fd is not None:
            os.close(self._header_fd)  # after SQLite let go of the file (see _header_fd)
            self._header_fd = None

    async def backup(self, dest: Path) -> dict[str, Any]:
        """A consistent copy of the store while it is in use (``store.backup``).

        Runs on a thread and a connection of its own, so the store's writer
        is not held up: in WAL mode the copy reads one snapshot while writers
        (the daemon's and other processes') go on."""
        return await asyncio.to_thread(backup_file, self.path, dest)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on the connection's own thread.

        aiosqlite routes all of its own calls through ``_execute``; we use the
        same door so a multi-statement transaction is one hop. Every call
        first checks that the file is still ours (``_check_file``), and
        storage errors (disk full, read-only) leave here as domain errors
        naming the store: the one place for both, whatever ``fn`` does.
        """
        if _SYNC_WORK.get():  # the engine's own small steps: not the application's (``sync_work``)
            return await self._execute(fn, *args)
        self._foreground += 1
        self._idle.clear()
        try:
            return await self._execute(fn, *args)
        finally:
            self._foreground -= 1
            if not self._foreground:
                self._idle.set()
                self._foreground_ended = time.monotonic()

    async def run_background(self, fn: Callable[..., T], *args: Any) -> T:
        """``run`` for sync work (reading a batch for a peer, applying one,
        logging a session): it lets the application's operations go first.

        The connection has one thread and a first-come queue, so in a busy
        fleet an application's write used to wait behind every batch queued
        for its peers (a burst of writes took 18 × as long as with no peers,
        issue 15). Here at most ``BACKGROUND_QUEUED`` sync operations wait in
        that queue, and each is put there only once no operation of the
        application is in flight — or after ``BACKGROUND_YIELD_S`` at the
        latest, so sync never starves under a steady write load. What waits
        meanwhile is read in one batch later: sync is coalesced, not lost.
        While the application is quiet (nothing of it in flight, none in the
        last ``BACKGROUND_QUIET_S``) sync work queues freely: a single change
        fanned out to many peers is not held back by the turn-taking."""
        if self.application_quiet():
            return await self._execute(fn, *args)
        async with self._background:
            if self._foreground:
                try:
                    await asyncio.wait_for(self._idle.wait(), BACKGROUND_YIELD_S)
                except TimeoutError:
                    pass
            return await self._execute(fn, *args)

    async def _execute(self, fn: Callable[..., T], *args: Any) -> T:
        """The one door to the connection's thread (``run`` says what it checks)."""
        if self._broken is not None:
            raise StoreFileChanged(self._broken.message, data=self._broken.data)
        return await self._db._execute(self._guarded, fn, *args)

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._db._conn
        try:
            if self._file_id is not None:
                self._check_file()
            return fn(conn, *args)
        except StoreFileChanged:
            self._secure(conn)
            raise
        except (DiskFull, StoreReadOnly) as exc:  # mapped by map_sqlite_error, without the store's name
            raise type(exc)(f"{self.label}: {exc.message}", data={**exc.data, "path": str(self.path)}) from exc
        except sqlite3.Error as exc:
            mapped = storage_error(exc)
            if mapped is None:
                raise
            raise type(mapped)(f"{self.label}: {mapped.message}", data={**mapped.data, "path": str(self.path)}) from exc

    # -- the file under the store ---------------------------------------------

    def _watch_file(self) -> None:
        """Remember which file the connection opened (called once it is set up).

        Known limit: closing this fd (``close``) drops every POSIX lock the
        process holds on the file, so it is closed only after the store's
        connection; a remote-query reader still open on the file then loses
        its shared lock (it keeps its WAL snapshot, read through -shm locks).
        """
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        self._header_fd, self._file_id = fd, (st.st_dev, st.st_ino)

    def _check_file(self) -> None:
        """Raise STORE_FILE_CHANGED unless ``path`` is still the file the
        connection has open, with an SQLite header.

        A file deleted, renamed over or overwritten while open goes unnoticed
        by SQLite: the connection keeps reading its cache and writing its
        WAL, and a write acknowledged now would be gone (or land in someone
        else's file) after a restart. Checked before every operation and
        before every COMMIT: one stat and one 16-byte pread.
        """
        if self._file_id is None or self._header_fd is None:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            change, how = "deleted", "deleted"
        except OSError as exc:
            change, how = "unreadable", f"made unreadable ({exc.strerror})"
        else:
            if (st.st_dev, st.st_ino) != self._file_id:
                change, how = "replaced", "replaced by another file"
            elif os.pread(self._header_fd, len(SQLITE_MAGIC), 0) != SQLITE_MAGIC:
                change, how = "overwritten", "overwritten (it no longer starts with an SQLite header)"
            else:
                return
        raise StoreFileChanged(
            f"{self.label}: the file was {how} while the daemon had it open; this store serves nothing more "
            f"until it is closed and opened again (store.close, store.open)",
            data={"path": str(self.path), "change": change},
        )

    def _secure(self, conn: sqlite3.Connection) -> None:
        """First sight of a changed file: stop serving, log it once, keep what we had.

        What the connection still sees (its file, through the open fd, plus
        its WAL) is copied to ``<path>.rescued-<time>``. If the path now holds
        another file, the WAL is checkpointed into ours and emptied, so it is
        never replayed into the newcomer when the store is opened again.
        """
        if self._broken is not None:
            return
        try:
            self._check_file()
        except StoreFileChanged as exc:
            self._broken = exc
        if self._broken is None:
            return
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        stamp = f"{time.strftime('%Y%m%dT%H%M%S')}.{time.time_ns() % 1_000_000_000:09d}"  # two in a second don't collide
        rescued = self.path.with_name(f"{self.path.name}.rescued-{stamp}")
        try:
            conn.execute("VACUUM INTO ?", (str(rescued),))
            kept = f"what it held is saved in {rescued}"
        except sqlite3.Error as exc:
            kept = f"its content could not be saved ({exc})"
        if self._broken.data.get("change") != "overwritten":
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("%s: could not empty its WAL: %s", self.label, exc)
        self._broken.data["rescued"] = str(rescued) if kept.startswith("what") else None
        log.error("%s: the file was %s while open; the store stops serving (close and open it again); %s",
                  self.label, self._broken.data["change"], kept)

    # -- authorizer --------------------------------------------------------

    def _authorize(self, action: int, arg1: str | None, arg2: str | None, dbname: str | None, source: str | None) -> int:
        if not self._user_sql:
            return sqlite3.SQLITE_OK  # the daemon's own statements
        if action in _SCHEMA_ACTIONS:
            self._schema_changed = True
        if action == sqlite3.SQLITE_DROP_TABLE and arg1 in self.distributed:
            self._dropping = arg1  # an evolution reports it as destructive (_evolution_statement)
        if source is not None and _internal(source):
            return sqlite3.SQLITE_OK  # bodies of our own triggers and views (user-named ones are checked)
        if action in (sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT, sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
            return sqlite3.SQLITE_DENY
        if action in _WRITE_ACTIONS | _DROP_ACTIONS and _internal(arg1):
            return sqlite3.SQLITE_DENY
        if action in _CREATE_ACTIONS and (_internal(arg1) or _internal(arg2)):
            return sqlite3.SQLITE_DENY  # no objects named like ours, none on our tables
        if action == sqlite3.SQLITE_ALTER_TABLE and _internal(arg2):
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_PRAGMA and arg1 and arg1.lower() in _DENY_PRAGMAS and arg2 is not None:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    # -- reads and writes from the API --------------------------------------

    def _write(self, conn: sqlite3.Connection, sql: str, params: Iterable[Any]) -> tuple[sqlite3.Cursor, ChangeBatch]:
        """Run one user statement and stamp what it captured, atomically."""
        with self._transaction(conn):
            self._user_sql, self._schema_changed = True, False
            try:
                cursor = conn.execute(sql + API_SQL_TAG, params if isinstance(params, dict) else tuple(params))
                if cursor.description is not None:
                    # Rows of a SELECT or RETURNING: SQLite made every change on the
                    # first step; drain before COMMIT, which refuses running statements
                    # (a row at a time: a chunk of big rows would itself be big).
                    for _ in itertools.islice(cursor, MAX_QUERY_ROWS):
                        pass
                    rowcount = cursor.rowcount
                    cursor.close()
                    cursor = _Done(rowcount, cursor.lastrowid)
            except (sqlite3.Error, OverflowError) as exc:
                raise map_sqlite_error(exc, sql) from exc
            finally:
                self._user_sql = False
            if self._schema_changed:
                self._after_ddl(conn)
            batch = capture.stamp(conn, self.capture, self.clock)
        return cursor, batch

    def _after_ddl(self, conn: sqlite3.Connection) -> None:
        """Keep capture whole after a schema change made through the API.

        A distributed table may gain columns (its capture triggers are rebuilt
        so the changed-column mask covers them; a collaborative table's device
        tables gain them too) but may not be renamed or dropped: the change is
        refused and rolled back. The authorizer says whether a statement
        changed the schema (``_SCHEMA_ACTIONS``), not its first word.
        """
        for table in list(self.capture.tables.values()):
            name = table.info.name
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone():
                raise PermissionDenied(
                    f"{name} is a distributed table; it can't be renamed or dropped through the API",
                    data={"table": name},
                )
            info = read_table_info(conn, name)
            if info.columns != table.info.columns:
                for trigger in capture.trigger_names(name):
                    conn.execute(f"DROP TRIGGER IF EXISTS {quote_ident(trigger)}")
                for sql in capture.capture_triggers_sql(table.tid, info, table.hw is not None, conflict_column=table.conflict_column):
                    conn.execute(sql)
                log.info("store %s/%s: table %s changed columns; capture triggers rebuilt", self.bundle, self.name, name)
                modes.of(TableType.keyed_by(table.conflict_column)).columns_changed(conn, info, f"store {self.bundle}/{self.name}")
        self._load_tables(conn)

    async def execute(self, sql: str, params: list[Any] | dict[str, Any] | None = None) -> dict[str, int]:
        def op(conn: sqlite3.Connection) -> tuple[dict[str, int], ChangeBatch]:
            cursor, batch = self._write(conn, sql, params or ())
            return {"rows_affected": max(cursor.rowcount, 0), "last_insert_rowid": cursor.lastrowid or 0}, batch

        return await self._announced(op)

    async def query(self, sql: str, params: list[Any] | dict[str, Any] | None = None, *,
                    max_bytes: int = MAX_RESULT_BYTES) -> dict[str, Any]:
        """Rows of one read, or ResultTooLarge as soon as they pass MAX_QUERY_ROWS
        or ``max_bytes`` of JSON: counted as SQLite hands them over, one at a
        time, so a too-large result is never built."""
        def op(conn: sqlite3.Connection) -> dict[str, Any]:
            # A query runs in a transaction that is always rolled back, so a
            # write smuggled into it (INSERT ... RETURNING) changes nothing.
            budget = ResultBudget(max_bytes=max_bytes, max_rows=MAX_QUERY_ROWS, source="the query")
            rows: list[list[Any]] = []
            cursor: sqlite3.Cursor | None = None
            conn.execute("BEGIN")
            self._user_sql = True
            try:
                cursor = conn.execute(sql + API_SQL_TAG, params or ())
                columns = [d[0] for d in cursor.description or ()]
                budget.add_columns(columns)
                for row in cursor:  # one row at a time: a chunk of big rows is itself big
                    budget.add(row)
                    rows.append(list(row))
            except (sqlite3.Error, OverflowError) as exc:
                rows.clear()
                raise map_sqlite_error(exc, sql) from exc
            except BaseException:
                rows.clear()  # the traceback keeps this frame alive: free what was read now
                raise
            finally:
                self._user_sql = False
                if cursor is not None:
                    cursor.close()  # a statement stopped early must not outlive the ROLLBACK
                conn.execute("ROLLBACK")
            return {"columns": columns, "rows": rows}

        return await self.run(op)

    async def insert(self, table: str, values: dict[str, Any]) -> int:
        def op(conn: sqlite3.Connection) -> tuple[int, ChangeBatch]:
            info = read_table_info(conn, table)
            cols = _checked_values(values, info)
            sql = (
                f"INSERT INTO {quote_ident(table)} ({', '.join(quote_ident(c) for c in cols)}) "
                f"VALUES ({', '.join('?' * len(cols))})"
                if cols
                else f"INSERT INTO {quote_ident(table)} DEFAULT VALUES"
            )
            cursor, batch = self._write(conn, sql, cols.values())
            return cursor.lastrowid or 0, batch

        return await self._announced(op)

    async def update(self, values: dict[str, Any], predicates: dict[str, Any]) -> int:
        def op(conn: sqlite3.Connection) -> tuple[int, ChangeBatch]:
            table = table_of(predicates)
            info = read_table_info(conn, table)
            cols = _checked_values(values, info)
            if not cols:
                raise InvalidParams("values must name at least one column", data={"param": "values"})
            compiled = compile_predicates(predicates, info.columns)
            _no_paging(compiled)
            where = f" WHERE {compiled.where}" if compiled.where else ""
            sets = ", ".join(f"{quote_ident(c)} = ?" for c in cols)
            cursor, batch = self._write(conn, f"UPDATE {quote_ident(table)} SET {sets}{where}", (*cols.values(), *compiled.params))
            return cursor.rowcount, batch

        return await self._announced(op)

    async def delete(self, predicates: dict[str, Any]) -> int:
        def op(conn: sqlite3.Connection) -> tuple[int, ChangeBatch]:
            table = table_of(predicates)
            info = read_table_info(conn, table)
            compiled = compile_predicates(predicates, info.columns)
            _no_paging(compiled)
            where = f" WHERE {compiled.where}" if compiled.where else ""
            cursor, batch = self._write(conn, f"DELETE FROM {quote_ident(table)}{where}", compiled.params)
            return cursor.rowcount, batch

        return await self._announced(op)

    # -- distributed tables -------------------------------------------------

    async def set_distributed_tables(
        self,
        tables: list[str],
        *,
        table_type: str = TableType.COLLABORATIVE,
        auto_sync: bool = False,
        validate: Callable[[sqlite3.Connection, list[TableInfo]], T] | None = None,
    ) -> T | None:
        """Make ``tables`` distributed (adding to those already distributed).

        Existing rows are logged as inserts so the first sync sends them, but
        they are not announced as local changes: nothing changed locally.
        ``validate`` (the single-version schema check,
        ``accepted_schema.SchemaFileCheck``) runs inside the same transaction,
        after outside writes were stamped and announced, so a refused schema
        leaves the store untouched and what it logs itself (rows to send
        again) is stamped with the rest, unannounced. Returns what
        ``validate`` returned.
        """
        if table_type not in TABLE_TYPES:
            raise InvalidParams(f"table_type must be one of {', '.join(TABLE_TYPES)}", data={"param": "config.table_type"})
        table_type = TableType(table_type).value  # a plain str from here on: it goes into messages and the file

        def op(conn: sqlite3.Connection) -> tuple[T | None, ChangeBatch]:
            with self._transaction(conn):
                current = get_meta(conn, "table_type")
                if current is not None and current != table_type:
                    raise TableTypeLocked(
                        f"store {self.bundle}/{self.name} already uses {current} distributed tables; a store's table type can't be switched",
                        data={"current": current, "requested": table_type},
                    )
                infos = [read_table_info(conn, t) for t in tables]
                for info in infos:
                    kind = conn.execute("SELECT kind FROM _p2p_tables WHERE name = ?", (info.name,)).fetchone()
                    if kind is not None and kind[0] == "device":
                        raise ReadOnlyTable(f"{info.name} holds another device's rows and can't be distributed again")
                batch = capture.stamp(conn, self.capture, self.clock)  # announce outside writes made before this point
                try:
                    outcome = validate(conn, infos) if validate is not None else None
                except sqlite3.Error as exc:
                    raise map_sqlite_error(exc) from exc
                for info in infos:
                    row = conn.execute("SELECT tid FROM _p2p_tables WHERE name = ?", (info.name,)).fetchone()
                    if row is None:
                        modes.of(table_type).register(conn, self.capture, info, auto_sync)
                    else:
                        conn.execute("UPDATE _p2p_tables SET auto_sync = ? WHERE tid = ?", (int(auto_sync), row[0]))
                set_meta(conn, "table_type", table_type)
                capture.stamp(conn, self.capture, self.clock, collect=False)
                self.table_type = table_type
                self._load_tables(conn)
                if isinstance(outcome, accepted_schema.SchemaOutcome) and outcome.changed:
                    self._note_sync_schema(conn, outcome)
                replicas.guard(conn)  # a receive replica's new tables are read-only too
            return outcome, batch

        try:
            return await self._announced(op)
        finally:
            self._offer_changed()

    # -- the sync log (store/sync_log.py) -------------------------------------

    async def record_sync(self, entry: sync_log.Entry, keep: int = sync_log.DEFAULT_KEEP) -> None:
        """Append one sync log entry, keeping the newest ``keep``."""
        def op(conn: sqlite3.Connection) -> None:
            with self._transaction(conn):
                sync_log.record(conn, entry, keep)

        await self.run_background(op)

    async def sync_log(self, limit: int = 100, peer: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` sync log entries, newest first."""
        return await self.run(lambda conn: sync_log.entries(conn, limit, peer))

    # -- evolutions (store/evolutions.py) -----------------------------------

    async def evolutions_status(self, scripts: Sequence[evolutions.Evolution]) -> list[evolutions.Revision]:
        """Every revision of ``scripts`` and of the store's record, with its state here."""
        return await self.run(lambda conn: evolutions.status(conn, scripts))

    async def apply_evolutions(self, scripts: Sequence[evolutions.Evolution], up_to: int | None = None, *,
                               downs: bool = True) -> list[int]:
        """Apply the pending (and diverged) revisions up to ``up_to``, each in
        a transaction of its own with the capture changes it needs, its
        captured rows stamped and announced as local changes. The revisions
        applied; stops at the first that fails (``EvolutionFailed``: recorded,
        the store inconsistent) or is refused (``EvolutionDestructive``:
        nothing of it changed)."""
        try:
            return await self._apply_evolutions(scripts, up_to, downs)
        finally:
            await self._reload_evolutions()

    async def _reload_evolutions(self) -> None:
        """Read the evolution state again; if the applied revisions moved, tell ``on_offer_changed``."""
        before = self.revisions
        await self.run(self._load_evolutions)
        if self.revisions != before:
            self._offer_changed()

    def _offer_changed(self) -> None:
        if self.on_offer_changed is not None:
            self.on_offer_changed(self)

    async def _apply_evolutions(self, scripts: Sequence[evolutions.Evolution], up_to: int | None, downs: bool) -> list[int]:
        steps = await self.run(lambda conn: evolutions.plan(conn, scripts, up_to, downs=downs))
        applied: list[int] = []
        for step in steps:
            def apply(conn: sqlite3.Connection, step: evolutions.Step = step) -> None:
                self._schema_changed = False
                guarded = [evolutions.Guarded(t.info.name, t.sync_columns, t.info.key) for t in changes.sync_tables(conn)]
                evolutions.apply_revision(conn, step, guarded, lambda sql: self._evolution_statement(conn, sql), wall_ms())
                if self._schema_changed:
                    self._after_ddl(conn)
                versions.note(conn, "evolution", step.revision, step.evolution.description or f"revision {step.revision}", wall_ms())

            try:
                await self._stamped(apply, stamp_after=True)
            except _ScriptFailed as exc:
                problem = exc.problem

                def record(conn: sqlite3.Connection, step: evolutions.Step = step) -> P2PStoreError:
                    with self._transaction(conn):
                        return evolutions.record_failure(conn, step, problem, wall_ms())

                failure = await self.run(record)
                log.error("store %s/%s: evolution %d failed and was rolled back: %s", self.bundle, self.name, step.revision, problem)
                raise failure from exc
            log.info("store %s/%s: evolution %d applied (%s)", self.bundle, self.name, step.revision, step.evolution.description or "no description")
            applied.append(step.revision)
        return applied

    def _evolution_statement(self, conn: sqlite3.Connection, sql: str) -> None:
        """One statement of an evolution script, checked as API SQL is (the
        authorizer keeps the store's own tables out of reach). A statement
        SQLite refuses because it would drop a distributed table, or break
        the capture triggers on one (a synced column dropped), is destructive,
        not a failure: refused, nothing recorded."""
        self._user_sql, self._dropping = True, None
        try:
            conn.execute(sql + API_SQL_TAG)
        except sqlite3.Error as exc:
            if self._dropping is not None or "error in trigger _p2p_" in str(exc):
                table = self._dropping or "a distributed table"
                raise EvolutionDestructive(f"{sql.splitlines()[0][:80]!r} would drop {table} or a column it syncs by; "
                                           "distributed tables only move forward", data={"statement": sql[:200]}) from exc
            raise _ScriptFailed(f"{sql.splitlines()[0][:80]!r}: {exc}") from exc
        finally:
            self._user_sql = False

    async def mark_evolution_applied(self, scripts: Sequence[evolutions.Evolution], revision: int) -> None:
        """Record revision ``revision`` as applied without running it (it was applied by hand)."""
        ev = next((e for e in scripts if e.id == revision), None)
        if ev is None:
            raise InvalidParams(f"no script for revision {revision}", data={"param": "revision"})

        def mark(conn: sqlite3.Connection) -> None:
            evolutions.mark_applied(conn, ev, wall_ms())
            versions.note(conn, "evolution", ev.id, ev.description or f"revision {ev.id}", wall_ms())

        await self._stamped(mark)
        await self._reload_evolutions()

    async def evolutions_log(self) -> list[dict[str, Any]]:
        """The store's record of its evolutions (``evolutions.history``)."""
        return await self.run(evolutions.history)

    async def resolve_evolution(self, revision: int) -> str:
        """Declare an inconsistent revision settled by hand (``evolutions.resolve``)."""
        try:
            return await self._stamped(lambda conn: evolutions.resolve(conn, revision))
        finally:
            await self._reload_evolutions()

    # -- replica links (store/replicas.py) ----------------------------------------

    def replica(self, peer: str) -> replicas.Link:
        """This device's end of the link with ``peer`` (two-way unless set)."""
        return self.replicas.get(peer) or replicas.Link(peer, ReplicaKind.TWO_WAY)

    async def set_replica(self, link: replicas.Link) -> None:
        """Record this device's end of a link (and the read-only guards a receive end needs)."""
        def op(conn: sqlite3.Connection) -> None:
            with self._transaction(conn):
                replicas.put(conn, replace(link, at=link.at or wall_ms()))
                self.replicas = replicas.load(conn)

        await self.run(op)
        log.info("store %s/%s: replica link with %s is now %s", self.bundle, self.name, link.peer, link.kind)

    # -- conflict policies and the reconciler's queue (store/policies.py) --------

    async def set_policy(self, table: str, policy: policies.Policy) -> None:
        """Set ``table``'s conflict policy here (every device must set the same)."""
        def op(conn: sqlite3.Connection) -> None:
            with self._transaction(conn):
                (info,) = changes.sync_tables(conn, table)  # InvalidParams if not distributed
                if info.conflict_column is None:
                    raise InvalidParams(f"table {table} is collaborative: it has no conflicts, so no conflict policy",
                                        data={"param": "table"})
                policies.put(conn, table, policy)
                self.policies = policies.load(conn)

        await self.run(op)
        log.info("store %s/%s: conflict policy of %s is now %s", self.bundle, self.name, table, policy.text())
        self._offer_changed()

    def require_not_in_conflict(self) -> None:
        """A store with queued conflicts sends nothing (``InConflict``, sync code 19)."""
        if self.queued:
            raise InConflict(f"store {self.bundle}/{self.name} is in conflict: {self.queued} change(s) wait for a person to "
                             "reconcile them (`p2pstore conflicts queue`); it receives, but sends nothing until then",
                             data={"store": self.name, "queued": self.queued})

    async def conflict_queue(self, limit: int = 100) -> list[dict[str, Any]]:
        return await self.run(lambda conn: policies.entries(conn, limit))

    async def resolve_queued(self, entry_id: int, take: str, value: changes.Value = None) -> dict[str, Any]:
        """Settle queued entry ``entry_id`` (``merge.settle``), outside writes stamped first."""
        done = await self._stamped(lambda conn: merge.settle(conn, self.capture, self.clock, entry_id, take, value))
        self.queued = done["queued"]
        return done

    # -- rebuild (store/rebuild.py) --------------------------------------------

    async def rebuild_table(self, table: str) -> rebuild.Dropped:
        """Drop this device's copy of distributed ``table`` and every
        watermark, so the next pulls bring it back whole; nothing is sent as
        a delete. ``RebuildRefused`` while a local change of it is unsent."""
        def op(conn: sqlite3.Connection) -> rebuild.Dropped:
            (info,) = changes.sync_tables(conn, table)  # InvalidParams if not distributed
            if info.conflict_column is not None:
                unsent = rebuild.unsent_local(conn, info)
                if unsent:
                    raise RebuildRefused(f"table {table} has {unsent} local change(s) no peer has acknowledged; push them first "
                                         "(a rebuild would lose them)", data={"table": table, "unsent": unsent})
            dropped = rebuild.drop_copy(conn, info)
            self._load_tables(conn)  # the capture state's high-water marks moved
            return dropped

        dropped = await self._stamped(op)
        log.warning("store %s/%s: table %s rebuilt: %d row(s) of %s dropped here, to be pulled again from peers",
                    self.bundle, self.name, table, dropped.rows, ", ".join(dropped.tables) or "no device table")
        return dropped

    # -- versions (store/versions.py) ----------------------------------------

    @staticmethod
    def _note_sync_schema(conn: sqlite3.Connection, outcome: accepted_schema.SchemaOutcome) -> None:
        versions.note(conn, "sync_schema", outcome.version, f"sync_schema.json version {outcome.version} accepted", wall_ms())

    async def versions(self) -> list[dict[str, Any]]:
        """Every recorded version, oldest first (``versions.listing``)."""
        return await self.run(versions.listing)

    async def versions_diff(self, old: int, new: int | None) -> dict[str, Any]:
        """What changed from version ``old`` to ``new`` (None: the schema now)."""
        def op(conn: sqlite3.Connection) -> dict[str, Any]:
            try:
                before, after = versions.load(conn, old), versions.load(conn, new)
            except KeyError as exc:
                raise InvalidParams(f"store {self.bundle}/{self.name} has no version {exc.args[0]} "
                                    "(`p2pstore versions list` shows them)", data={"param": "version"}) from None
            return versions.diff(*before, *after)

        return await self.run(op)

    async def sync_view(self) -> dict[str, dict[str, Any]]:
        """The distributed tables now, as a version's ``sync`` holds them."""
        return await self.run(lambda conn: versions.current(conn)[2])

    # -- single-version schema ----------------------------------------------

    @property
    def sync_schema_version(self) -> int | None:
        """The accepted sync_schema.json version, or None (none accepted)."""
        return self.sync_schema.version if self.sync_schema is not None else None

    async def reload_sync_schema(self, doc: object) -> accepted_schema.SchemaOutcome:
        """Accept a newly read sync_schema.json (SIGHUP) for this store's
        single_version tables, or raise SchemaInvalid and change nothing."""
        if self.table_type != TableType.SINGLE_VERSION:
            raise InvalidParams(f"store {self.bundle}/{self.name} has no single_version tables")

        def accept(conn: sqlite3.Connection) -> accepted_schema.SchemaOutcome:
            try:  # (outside writes were stamped first, by _stamped, and are announced)
                outcome = accepted_schema.accept(conn, doc, bundle=self.bundle, name=self.name, tables=list(self.distributed))
            except sqlite3.Error as exc:
                raise map_sqlite_error(exc) from exc
            capture.stamp(conn, self.capture, self.clock, collect=False)  # rows to send again: not local changes
            self._load_tables(conn)
            if outcome.changed:
                self._note_sync_schema(conn, outcome)
            return outcome

        outcome = await self._stamped(accept)
        self._offer_changed()
        return outcome

    async def check_sync_schema(self, document: object) -> ValidationReport:
        """``schema.validate`` against this store: read only, never raises
        for a bad document (see ``accepted_schema.check_document``)."""
        tables = list(self.distributed) if self.table_type == TableType.SINGLE_VERSION else []

        def op(conn: sqlite3.Connection) -> ValidationReport:
            conn.execute("BEGIN")  # one consistent snapshot of tables and accepted entry
            try:
                return accepted_schema.check_document(
                    conn, document, bundle=self.bundle, name=self.name, single_version_tables=tables
                )
            except sqlite3.Error as exc:
                raise map_sqlite_error(exc) from exc
            finally:
                conn.execute("ROLLBACK")

        return await self.run(op)

    def require_distributed(self, table: str) -> TableInfo:
        info = self.distributed.get(table)
        if info is None:
            raise TableNotDistributed(f"table {table} of store {self.name} is not distributed", data={"table": table})
        return info

    def synced_columns(self, table: str) -> tuple[str, ...]:
        """What this device syncs of ``table`` — all that peers may filter on or read:
        the sync columns of a single_version table, every column of a collaborative one."""
        info = self.require_distributed(table)
        sync = self.sync_schema.tables.get(table) if self.sync_schema is not None else None
        return tuple(sync.columns) if sync is not None else info.columns

    async def create_device_table(self, device_id: str, table: str) -> str:
        """Create the read-only local copy of ``device_id``'s rows of ``table``."""
        self.require_distributed(table)

        def op(conn: sqlite3.Connection) -> str:
            with self._transaction(conn):
                return capture.create_device_table(conn, device_id, table)

        return await self.run(op)

    # -- sync (called by the sync engine) -------------------------------------

    async def read_changes(self, table: str | None, since: int, *, where: Any = None, limit: int = 500,
                           max_bytes: int | None = None, covered: Mapping[str, int] | None = None,
                           own_only: bool = False, forwarding: frozenset[str] = frozenset(),
                           grants: Mapping[str, int] | None = None) -> changes.OutBatch:
        """The next slice of this store's change stream after ``since``
        (``covered``: the peer's origin marks; ``own_only``: this device's own
        changes only, and those of the ``forwarding`` devices, granting marks
        for ``grants``; see ``changes_since``).

        Pending outside writes are stamped (and announced) first, in the same
        transaction, so every change read has its clock. Rows another
        program appended wait until the read finds nothing stamped left
        to send: then ``STAMP_CHUNK_ROWS`` of them are stamped and read in
        the same transaction (so a push of a bulk insert alternates ten
        batches and one step of stamping, and its receiver starts at once),
        and the batch says ``more`` until every row is stamped and read.
        """

        def op(conn: sqlite3.Connection) -> tuple[changes.OutBatch, ChangeBatch]:
            self._reading_at = time.monotonic()
            with self._transaction(conn):
                local = capture.stamp(conn, self.capture, self.clock, append_limit=0)
                batch = read(conn)
                left = capture.appended_left(conn, self.capture)
                if not batch.more and left:
                    local.add(self._stamp_step(conn))
                    batch = read(conn)
                    left = capture.appended_left(conn, self.capture)
                self._appended_left = left
                if not batch.more and left:
                    batch = replace(batch, more=True)  # the next read stamps the next step
            self._note_sent(conn)
            return batch, local

        def read(conn: sqlite3.Connection) -> changes.OutBatch:
            return changes_since(conn, table, since, limit=limit, where=where, max_bytes=max_bytes, covered=covered,
                                 own_only=own_only, forwarding=forwarding, grants=grants)

        return await self._announced(op, background=True)

    async def apply_changes(self, batch: changes.OutBatch, from_device: str) -> merge.ApplyResult:
        """Apply a peer's batch and move its watermark, in one transaction."""
        return (await self.apply_changes_group([batch], from_device))[0]

    def application_quiet(self) -> bool:
        """Whether no operation of the application is in flight, nor was in
        the last ``BACKGROUND_QUIET_S`` (``run_background``)."""
        return not self._foreground and time.monotonic() - self._foreground_ended > BACKGROUND_QUIET_S

    async def apply_changes_group(self, batches: Sequence[changes.OutBatch], from_device: str, *,
                                  budget_s: float | None = None) -> list[merge.ApplyResult]:
        """Apply a peer's consecutive batches, each moving its watermark, in
        one transaction: one commit for all (a commit rewrites every page
        the batch touched, which a random-keyed index spreads over the
        file: most of a large sync's time, docs/performance.md).

        ``budget_s``: the transaction takes no further batch once it has run
        that long or an operation of the application waits for the
        connection — so an application's write waits for one batch and the
        commit, never for the whole group — and the results are those of the
        batches applied, in order (at least the first); the caller applies
        the rest in a later transaction. None: all of them.

        A group that wrote ``COMPACT_WHILE_APPLYING_ROWS`` rows or more also
        drops as many log rows as compaction would (``capture.compact``, up
        to twice the rows written): the log rows of received rows are
        history nothing reads, and dropped here their pages hold the next
        group's rows, so a large sync does not first grow the file by a log
        that the minutely compaction takes minutes to drop. Most of them are
        not even written: a batch followed in the group by
        ``compact_keep_recent`` rows or more logs only the last change of
        each block it applies set-based (``merge._Applier.log_all``; 8-12 %
        of a large sync's apply). Should later batches of the group not
        apply (stale rows, or a session that ends before the rest of the
        group comes round again), ``_p2p_changes`` shows fewer than
        ``compact_keep_recent`` received changes: it is history, and the
        rows, their clocks and the seq counter are written all the same.

        The transaction is ours (each batch is a savepoint in it), so its
        COMMIT checks the file first like every other write. On a full disk
        nothing is applied and the watermark stays: the sender sends it
        again on a later sync.
        """

        def op(conn: sqlite3.Connection) -> list[merge.ApplyResult]:
            started = time.monotonic()
            results: list[merge.ApplyResult] = []
            with self._transaction(conn):  # a rollback reloads the cached capture state
                later = total = sum(b.count for b in batches)
                lifted: dict[str, tuple[str, str]] | None = {} if total >= LIFT_TRIGGERS_ROWS else None
                tables = changes.sync_tables(conn)  # (once a group: no batch changes them)
                for batch in batches:
                    if results and budget_s is not None and (self._foreground or time.monotonic() - started > budget_s):
                        break  # (``_foreground`` is the event loop's counter: read here, a snapshot is enough)
                    later -= batch.count
                    # What the compaction below would drop is not logged at all (``_Applier.log_all``).
                    log_all = total < COMPACT_WHILE_APPLYING_ROWS or later < self.compact_keep_recent
                    results.append(merge.apply_batch(conn, self.capture, self.clock, batch, from_device, log_all=log_all,
                                                     lifted=lifted, tables=tables))
                if lifted:
                    merge.put_back(conn, lifted)
                applied = sum(r.applied for r in results)
                if applied >= COMPACT_WHILE_APPLYING_ROWS:
                    capture.compact(conn, self.capture, chunk=2 * applied, keep_recent=self.compact_keep_recent, sweep=False)
            return results

        try:
            results = await self.run_background(op)
        except DiskFull as exc:
            raise DiskFull(f"store {self.bundle}/{self.name}: disk full while applying batch from {from_device}: "
                           f"{exc.data.get('sqlite', exc.message)} ({self.path}); nothing applied, watermark unchanged",
                           data={**exc.data, "store": self.name, "bundle": self.bundle, "peer": from_device}) from exc
        for result in results:
            self._announce(result.local)
            self.queued += result.queued
        return results

    async def position(self, peer: str) -> tuple[int, str | None]:
        """Our watermark for ``peer``'s copy of this store: (seq, its stream ID)."""
        return await self.run(merge.position, peer)

    async def receiving(self, peer: str, own: bool = False) -> tuple[int, str | None, list[tuple[str, int]]]:
        """What a session receiving from ``peer`` opens with, in one read: our
        watermark for it (``position``; for a push of its own changes only,
        ``own``, the eager position) and what we hold per origin
        (``merge.origin_marks``; none for a collaborative store: only
        single_version streams relay, so marks leave nothing else out)."""

        def op(conn: sqlite3.Connection) -> tuple[int, str | None, list[tuple[str, int]]]:
            since, stream = merge.eager_position(conn, peer) if own else merge.position(conn, peer)
            marks = merge.origin_marks(conn, self.clock.last) if self.table_type == TableType.SINGLE_VERSION else []
            return since, stream, marks

        return await self.run(op)

    async def start_position(self, since: int, stream: str | None) -> int:
        """Where to start sending to a peer at (``since``, ``stream``); see
        ``changes.start_position`` (it may renew this store's stream)."""

        def op(conn: sqlite3.Connection) -> int:
            with self._transaction(conn):
                before = capture.stream_id(conn)
                start = changes.start_position(conn, since, stream)
                if capture.stream_id(conn) != before:
                    restore.mark_restored(conn, before)
                    self.restore_pending = restore.pending(conn)
                    log.warning("store %s/%s: a peer has applied seq %d of this store, which this file never reached: the "
                                "file went back in time (restored from a backup?); it starts a new change stream and every "
                                "peer reads it again from the start%s", self.bundle, self.name, since,
                                " once it has caught up from a peer" if self.restore_pending else "")
            self._note_sent(conn)
            return start

        return await self.run(op)

    async def begin_send(self, peer: str, since: int, stream: str | None) -> tuple[int, int | None]:
        """Where to start sending to ``peer``, which reports it has applied
        this store's ``stream`` up to ``since``: (start, None) for the stream
        from ``start`` (``start_position``), or (0, hlc) when it must be
        resynced (``gc.resync_hlc``). Its report is recorded as its ack."""
        start = await self.start_position(since, stream)

        def op(conn: sqlite3.Connection) -> int | None:
            with self._transaction(conn):
                gc.record_ack(conn, peer, since, stream, wall_ms())
                return gc.resync_hlc(conn, start, since, stream)

        snapshot = await self.run(op)
        if snapshot is not None:
            log.warning("store %s/%s: device %s is at seq %d, below deletes this store has forgotten: it gets a resync",
                        self.bundle, self.name, peer, since)
        return (0, snapshot) if snapshot is not None else (start, None)

    async def record_ack(self, peer: str, seq: int, stream: str) -> None:
        """``peer`` acked this store's ``stream`` up to ``seq`` (``gc.record_ack``)."""

        def op(conn: sqlite3.Connection) -> None:
            with self._transaction(conn):
                gc.record_ack(conn, peer, seq, stream, wall_ms())

        await self.run_background(op)

    async def lag(self, peer: str, acked: tuple[int, str | None] | None = None) -> Lag:
        """How far ``peer`` is behind this store, and this store behind it
        (docs/sync.md, "Lag"). ``acked``: the peer's position in our stream
        if the caller knows a fresher one than ``_p2p_acks``."""

        def op(conn: sqlite3.Connection) -> Lag:
            with changes.read_snapshot(conn):
                since, stream = acked if acked is not None else gc.ack_of(conn, peer)
                known = acked is not None or conn.execute(
                    "SELECT 1 FROM _p2p_acks WHERE peer = ?1 UNION ALL SELECT 1 FROM _p2p_watermarks WHERE peer = ?1",
                    (peer,)).fetchone() is not None
                return Lag(unsent_rows(conn, since, stream), changes.stable_bound(conn), capture.stream_id(conn),
                           merge.position(conn, peer), known)

        return await self.run(op)

    async def must_resync_first(self, peer: str) -> bool:
        """Whether to refuse changes from ``peer`` until it was resynced (``gc.must_resync_first``)."""
        return await self.run(gc.must_resync_first, peer)

    async def read_resync(self, cursor: gc.Cursor | None, snapshot_hlc: int, *, limit: int = 500,
                          max_bytes: int | None = None) -> tuple[changes.OutBatch, gc.Cursor]:
        """The next batch of a resync (``gc.snapshot_batch``), pending outside writes stamped first."""

        return await self._stamped(
            lambda conn: gc.snapshot_batch(conn, cursor, snapshot_hlc, limit=limit, max_bytes=max_bytes), after=self._note_sent)

    async def read_copy(self, origin: str, cursor: restore.CopyCursor | None, *, limit: int = 500,
                        max_bytes: int | None = None) -> tuple[changes.OutBatch, restore.CopyCursor]:
        """The next batch of our copy of ``origin``'s rows, for its catch-up (``restore.copy_batch``)."""

        def op(conn: sqlite3.Connection) -> tuple[changes.OutBatch, restore.CopyCursor]:
            with changes.read_snapshot(conn):
                return restore.copy_batch(conn, origin, cursor, limit=limit, max_bytes=max_bytes)

        return await self.run(op)

    async def begin_catch_up(self, peer: str) -> None:
        """A catch-up from ``peer`` starts (``restore.begin``)."""

        def op(conn: sqlite3.Connection) -> None:
            with self._transaction(conn):
                restore.begin(conn, peer)

        await self.run(op)

    async def apply_catch_up(self, batch: changes.OutBatch, peer: str, since: int, stream: str | None) -> restore.CatchUp:
        """Apply a batch of ``peer``'s copy of our rows (``restore.apply_copy``),
        stamped as local changes in the same transaction."""

        outcome = await self._stamped(lambda conn: restore.apply_copy(conn, batch, peer, since, stream), stamp_after=True)
        if outcome.done:
            self.restore_pending = False
        return outcome

    async def sync_failures(self, limit: int = 100) -> list[merge.SyncFailure]:
        return await self.run(merge.sync_failures, limit)

    async def conflicts(self, table: str | None = None, limit: int = 100) -> list[merge.Conflict]:
        return await self.run(merge.conflicts, table, limit)

    async def clear_conflicts(self, up_to: int | None = None, table: str | None = None) -> int:
        def op(conn: sqlite3.Connection) -> int:
            with self._transaction(conn):
                return merge.clear_conflicts(conn, up_to, table)

        return await self.run(op)

    async def retry_failure(self, failure_id: int) -> merge.ApplyResult:
        """Apply a stored failed change again (it leaves the log if it applies now)."""

        def op(conn: sqlite3.Connection) -> merge.ApplyResult:
            with self._transaction(conn):
                return merge.retry_failure(conn, self.capture, self.clock, failure_id)

        result = await self.run(op)
        self._announce(result.local)
        return result

    async def discard_failure(self, failure_id: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            with self._transaction(conn):
                merge.discard_failure(conn, failure_id)

        await self.run(op)

    async def compact(self, max_chunks: int = 10, *, holders: Collection[str] | None = None, horizon_ms: int = 0,
                      keep_recent: int | None = None) -> int:
        """Drop log rows nothing reads any more (``capture.compact``), a chunk
        per transaction so API writes go between them; the number dropped.

        With ``holders`` (the trusted peers), also forget deletes and this
        device's own log rows that every holder that acked within
        ``horizon_ms`` has applied (``gc.collect``). ``keep_recent``: the
        newest log rows left alone (default: ``compact_keep_recent``, as
        the compaction of a large received group)."""
        if keep_recent is None:
            keep_recent = self.compact_keep_recent

        def chunk(conn: sqlite3.Connection) -> tuple[int, bool]:
            # Stamped first (_stamped): rows applied from peers since the last stamp count as stamped then.
            before = (capture.get_meta(conn, capture.COMPACTED_KEY, 0), capture.get_meta(conn, gc.GC_MARK_KEY, 0))
            dropped = capture.compact(conn, self.capture, keep_recent=keep_recent)
            if holders is not None:
                floor = gc.ack_floor(conn, holders, wall_ms() - horizon_ms)
                dropped += gc.collect(conn, self.capture, floor, keep_recent=keep_recent)
            after = (capture.get_meta(conn, capture.COMPACTED_KEY, 0), capture.get_meta(conn, gc.GC_MARK_KEY, 0))
            return dropped, after != before

        total = 0
        for _ in range(max_chunks):
            dropped, moved = await self._stamped(chunk)
            total += dropped
            if not moved:
                break
        if total:
            log.debug("store %s/%s: compacted %d change-log row(s)", self.bundle, self.name, total)
        await self.give_back_space(max_chunks)
        return total

    async def give_back_space(self, max_steps: int = 10) -> int:
        """Shrink the file by the pages compaction freed, ``VACUUM_STEP_PAGES``
        a step (each its own transaction, so API writes go between); the
        number of pages given back. Files made before the store set
        auto_vacuum keep their free pages for later writes (a ``VACUUM``
        with the daemon stopped converts them)."""

        def step(conn: sqlite3.Connection) -> int:
            if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # INCREMENTAL
                return 0
            free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            if free < VACUUM_MIN_PAGES:
                return 0
            # executescript steps the pragma to its end (execute would free one page); no transaction is open here.
            conn.executescript(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES});")
            return free - int(conn.execute("PRAGMA freelist_count").fetchone()[0])

        given = 0
        for _ in range(max_steps):
            pages = await self.run_background(step)
            given += pages
            if pages == 0:
                break
        if given:
            log.debug("store %s/%s: gave %d free page(s) back to the disk", self.bundle, self.name, given)
        return given

    # -- capture of other processes' writes ----------------------------------

    async def poll(self) -> ChangeBatch:
        """Stamp and announce changes committed by other connections, if any.

        Another program's bulk insert is stamped ``STAMP_CHUNK_ROWS`` rows at
        a time, each step its own transaction, so the connection's other work
        goes between the steps — and while a push reads (``read_changes``
        in the last ``READER_STAMPS_S``), the push stamps the rest as it
        needs them. What the steps found, together."""

        if self._broken is not None:
            return ChangeBatch()  # said once when found; a poll is no request to refuse

        def op(conn: sqlite3.Connection) -> ChangeBatch:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version and not self._appended_left:
                return ChangeBatch()
            self._data_version = version
            with self._transaction(conn):
                batch = self._stamp_step(conn)
                self._appended_left = capture.appended_left(conn, self.capture)
            return batch

        found = ChangeBatch()
        with sync_work():  # the daemon's own check, every poll_interval_ms: not an operation of the application
            for _ in range(MAX_STAMP_STEPS):  # bounded; each step logs rows or ends the loop
                batch = await self.run(op)
                self._announce(batch)
                found.add(batch)
                if not self._appended_left or time.monotonic() - self._reading_at < READER_STAMPS_S:
                    break  # (a push reading now stamps the rest as it needs them: ``read_changes``)
        return found

    def _stamp_step(self, conn: sqlite3.Connection) -> ChangeBatch:
        """One step of stamping another program's bulk insert
        (``STAMP_CHUNK_ROWS`` of its rows; ``poll`` and ``read_changes``),
        in the caller's transaction. A step that logged
        ``COMPACT_WHILE_APPLYING_ROWS`` rows or more also compacts as many
        (``capture.compact``): the log rows of a single_version table's rows
        are history once stamped (their clocks are the row clocks), so
        dropped here their pages hold the next step's rows, and a bulk
        insert of 1M rows does not first grow the file by an 18 MB log that
        the minutely compaction takes minutes to drop — as
        ``apply_changes_group`` does for the rows a sync receives.
        (Collaborative log rows are the stream's: compaction keeps them.)"""
        step = capture.stamp(conn, self.capture, self.clock, append_limit=STAMP_CHUNK_ROWS)
        stamped = step.last_seq - step.first_seq + 1 if step else 0
        if stamped >= COMPACT_WHILE_APPLYING_ROWS:
            capture.compact(conn, self.capture, chunk=2 * stamped, keep_recent=self.compact_keep_recent, sweep=False)
        return step

    async def _announced(self, fn: Callable[[sqlite3.Connection], tuple[T, ChangeBatch]], *, background: bool = False) -> T:
        """Run ``fn`` — a write that returns its result and what its stamp
        found — and announce those local changes once it committed: the one
        place a write's changes are announced (never before the commit, so
        no subscriber hears of a change that was rolled back). ``background``:
        sync work (``run_background``)."""
        result, batch = await (self.run_background(fn) if background else self.run(fn))
        self._announce(batch)
        return result

    async def _stamped(self, fn: Callable[[sqlite3.Connection], T], *, stamp_after: bool = False,
                       after: Callable[[sqlite3.Connection], None] | None = None, background: bool = False) -> T:
        """``fn`` in one write transaction with pending outside writes stamped
        in it — first, so that what ``fn`` reads or merges has its clocks, or
        after ``fn`` (``stamp_after``: ``fn``'s own writes are local changes
        to capture) — announced once committed; ``after`` runs on the
        connection's thread once the transaction is over."""

        def op(conn: sqlite3.Connection) -> tuple[T, ChangeBatch]:
            with self._transaction(conn):
                local = ChangeBatch() if stamp_after else capture.stamp(conn, self.capture, self.clock)
                result = fn(conn)
                if stamp_after:
                    local = capture.stamp(conn, self.capture, self.clock)
            if after is not None:
                after(conn)
            return result, local

        return await self._announced(op, background=background)

    def _announce(self, batch: ChangeBatch) -> None:
        if batch and batch.by_table and self.on_changes is not None:
            self.on_changes(self, batch)


@dataclass(frozen=True, slots=True)
class Lag:
    """One peer's lag on one store, as this device sees it (``Store.lag``)."""

    #: Rows of our stream the peer has not been sent (``stream.unsent_rows``).
    unsent: int
    #: Where our stream is complete (``changes.stable_bound``), in ``stream``.
    last_seq: int
    stream: str
    #: Our watermark for the peer's stream: (seq, its stream ID).
    received: tuple[int, str | None]
    #: Whether this store ever synced with the peer (an ack or a watermark).
    known: bool


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception.

    IMMEDIATE takes the write lock up front, so a conflict with another
    process waits on the busy timeout instead of failing half-way.
    """

    def __init__(self, conn: sqlite3.Connection, on_rollback: Callable[[], None] | None = None,
                 before_commit: Callable[[], None] | None = None) -> None:
        self.conn = conn
        self.on_rollback = on_rollback
        #: Last check before COMMIT (the file is still ours): raising rolls back.
        self.before_commit = before_commit

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc) from exc
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                if self.before_commit is not None:
                    self.before_commit()
                self.conn.execute("COMMIT")
                return
            except P2PStoreError:
                self._rollback()
                raise
            except sqlite3.Error as err:
                self._rollback()
                raise map_sqlite_error(err) from err
        self._rollback()

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        if self.on_rollback is not None:
            self.on_rollback()


def _checked_values(values: Any, info: TableInfo) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise InvalidParams("values must be an object of column: value", data={"param": "values"})
    unknown = [c for c in values if c not in info.columns]
    if unknown:
        raise ColumnNotFound(f"table {info.name} has no column(s) {', '.join(map(repr, unknown))}",
                             data={"param": "values", "table": info.name, "columns": unknown})
    bad = [c for c, v in values.items() if not is_sql_value(v)]
    if bad:
        raise InvalidParams(f"value of {bad[0]!r} must be null, a number, a string or a blob", data={"param": f"values.{bad[0]}"})
    return dict(values)


def _no_paging(compiled: Any) -> None:
    if compiled.order_by or compiled.limit is not None or compiled.offset is not None:
        raise InvalidParams("order_by, limit and offset apply to queries, not to updates or deletes", data={"param": "predicates"})


class _ScriptFailed(Exception):
    """A statement of an evolution script that SQLite refused (rolled back, then recorded)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class _Done:
    """What a drained cursor leaves for the result (its counts)."""

    def __init__(self, rowcount: int, lastrowid: int | None) -> None:
        self.rowcount = rowcount
        self.lastrowid = lastrowid


def backup_file(source: Path, dest: Path) -> dict[str, Any]:
    """Copy the SQLite database ``source`` into the new file ``dest`` with
    SQLite's online backup API.

    The copy is one self-contained file (rollback journal, not WAL), 0600
    like the store, passes ``quick_check`` and is fsynced before it gets its
    name; an existing ``dest`` is never overwritten, and a failed backup
    leaves nothing behind."""
    if not dest.is_absolute():
        raise InvalidParams(f"backup path {dest} must be absolute (the daemon does not share your working directory)",
                            data={"param": "path"})
    if dest.exists() or dest.is_symlink():
        raise BackupFailed(f"{dest} already exists; a backup never overwrites a file", data={"path": str(dest)})
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise BackupFailed(f"cannot create {dest}: {exc.strerror}", data={"path": str(dest)}) from exc
    try:
        src = sqlite3.connect(str(source), isolation_level=None)
        try:
            src.execute(f"PRAGMA busy_timeout = {DEFAULT_BUSY_TIMEOUT_MS}")
            copy = sqlite3.connect(str(partial), isolation_level=None)
            try:
                src.backup(copy)  # all pages in one step: one read snapshot of the source
                copy.execute("PRAGMA journal_mode = DELETE")
                check = copy.execute("PRAGMA quick_check").fetchone()[0]
                pages = copy.execute("PRAGMA page_count").fetchone()[0]
            finally:
                copy.close()
        finally:
            src.close()
        if check != "ok":
            raise BackupFailed(f"the copy of {source} failed its check ({check}); {dest} not written", data={"path": str(dest)})
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(partial, dest)  # gives it its name; fails rather than overwrite a file that appeared meanwhile
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except sqlite3.Error as exc:
        raise BackupFailed(f"backing up {source} to {dest} failed: {exc}", data={"path": str(dest)}) from exc
    except OSError as exc:
        raise BackupFailed(f"cannot write {dest}: {exc.strerror or exc}", data={"path": str(dest)}) from exc
    finally:
        for leftover in (partial, partial.with_name(partial.name + "-journal")):
            leftover.unlink(missing_ok=True)
    return {"path": str(dest), "bytes": dest.stat().st_size, "pages": pages}
