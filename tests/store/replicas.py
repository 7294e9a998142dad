"""Devices for sync tests: real SQLite files, the store's own capture and
merge code, no daemon and no sockets.

A ``Replica`` is what one daemon holds for one store: the writer connection,
the cached capture state and the clock. ``push`` drives the exchange exactly
as the sync engine will: ask the receiver for its watermark, read a batch
(after stamping, in one transaction), apply it on the receiver, repeat while
there is more.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from p2pstore.clock import HybridClock
from p2pstore.protocol.batch import decode, own_push_part
from p2pstore.protocol.messages import pack_values
from p2pstore.schema.predicates import CompiledQuery
from p2pstore.store import accepted_schema, capture, cells, changes, merge, policies, stream
from p2pstore.store.capture import ChangeBatch
from p2pstore.store.tables import read_table_info

BUNDLE, STORE = "com.example.sync", "SyncTest"


def field(name: str, type_: str, *, pk: bool = False, not_null: bool = False, autoinc: bool = False) -> dict[str, Any]:
    return {"columnName": name, "type": type_, "primaryKey": pk, "notNull": not_null, "autoIncrement": autoinc}


def schema_doc(tables: dict[str, tuple[list[dict[str, Any]], list[str]]], version: int = 0) -> dict[str, Any]:
    """A sync_schema.json document: table → (fields, deviceSyncFields)."""
    return {"dbSchema": [{
        "version": version, "bundleName": BUNDLE, "dbName": STORE,
        "tables": [{"tableName": t, "deviceSyncFields": sync, "fields": fields} for t, (fields, sync) in tables.items()],
    }]}


class Replica:
    """One device's copy of one store."""

    def __init__(self, path: Path, device_id: str, *, wall: int | None = None) -> None:
        self.path = path
        self.id = device_id
        self.wall = wall
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.text_factory = changes.TEXT_FACTORY  # as the daemon's store connection
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA busy_timeout = 5000")
        self.conn.execute("PRAGMA synchronous = OFF")  # tests: speed over durability
        self.conn.execute("PRAGMA temp_store = MEMORY")  # as the daemon's stores (staging tables of store/blocks.py)
        capture.ensure_schema(self.conn)
        self.conn.executescript(accepted_schema.SCHEMA_SQL)
        self.conn.executescript(policies.SCHEMA_SQL)  # as Store.open makes it
        capture.set_device_id(self.conn, device_id)
        self.clock = HybridClock()
        self.state = capture.load_state(self.conn, self.clock)

    def close(self) -> None:
        self.conn.close()

    # -- set-up -------------------------------------------------------------

    def make_distributed(self, *tables: str, doc: dict[str, Any] | None = None) -> None:
        """Register ``tables``: single_version with ``doc`` (accepted as the
        daemon does), collaborative without."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            capture.stamp(conn, self.state, self.clock, collect=False, wall=self.wall)
            if doc is not None:
                accepted_schema.accept(conn, doc, bundle=BUNDLE, name=STORE, tables=list(tables))
            accepted = accepted_schema.load_accepted(conn)
            for table in tables:
                sync = accepted.tables.get(table) if accepted is not None and doc is not None else None
                capture.register_table(
                    conn, self.state, read_table_info(conn, table), False, conflict_column=sync.conflict if sync else None
                )
            capture.set_meta(conn, "table_type", "single_version" if doc is not None else "collaborative")
            capture.stamp(conn, self.state, self.clock, collect=False, wall=self.wall)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def accept_schema(self, doc: dict[str, Any]) -> accepted_schema.SchemaOutcome:
        """A new sync_schema.json version, accepted as the daemon does (SIGHUP)."""
        tables = [t.info.name for t in self.state.tables.values()]
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            capture.stamp(self.conn, self.state, self.clock, wall=self.wall)
            outcome = accepted_schema.accept(self.conn, doc, bundle=BUNDLE, name=STORE, tables=tables)
            capture.stamp(self.conn, self.state, self.clock, collect=False, wall=self.wall)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return outcome

    # -- local writes ---------------------------------------------------------

    def write(self, sql: str, params: Sequence[Any] = ()) -> ChangeBatch:
        """One local write through the daemon: the statement and its stamp commit together."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute(sql, tuple(params))
            batch = capture.stamp(self.conn, self.state, self.clock, wall=self.wall)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            self.state = capture.load_state(self.conn, self.clock)
            raise
        return batch

    def outside(self) -> sqlite3.Connection:
        """Another program's connection to the same file."""
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if "_p2p_clocks" in sql:
            cells.clocks_view(self.conn)  # every logical cell: a TEMP view, made for the asking
        return [tuple(r) for r in self.conn.execute(sql, tuple(params))]

    # -- sync -----------------------------------------------------------------

    def read(self, since: int, *, table: str | None = None, limit: int = changes.DEFAULT_BATCH_ROWS,
             where: CompiledQuery | None = None, max_bytes: int | None = None,
             covered: dict[str, int] | None = None, own_only: bool = False,
             forwarding: frozenset[str] = frozenset(), grants: dict[str, int] | None = None) -> changes.OutBatch:
        """What the sender does: stamp, then read, in one transaction."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            capture.stamp(self.conn, self.state, self.clock, wall=self.wall)
            batch = stream.changes_since(self.conn, table, since, limit=limit, where=where, max_bytes=max_bytes,
                                         covered=covered, own_only=own_only, forwarding=forwarding, grants=grants)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return batch

    def read_rows(self, since: int, **kw: Any) -> changes.OutBatch:
        """``read`` in row form only (``OutBatch.as_rows``: what a protocol-1 peer gets)."""
        return self.read(since, **kw).as_rows()

    def compact(self) -> int:
        """What the daemon does every minute: drop log rows nothing reads, all chunks."""
        total = 0
        while True:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                capture.stamp(self.conn, self.state, self.clock, wall=self.wall)
                mark = capture.get_meta(self.conn, capture.COMPACTED_KEY, 0)
                total += capture.compact(self.conn, self.state, chunk=7)  # small chunks: the walk is exercised
                moved = capture.get_meta(self.conn, capture.COMPACTED_KEY, 0) != mark
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            if not moved:
                return total

    def start_position(self, since: int, stream: str | None) -> int:
        """What the sender does with a peer's watermark (it may renew the stream)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            start = changes.start_position(self.conn, since, stream)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return start

    def apply(self, batch: changes.OutBatch, sender: str) -> merge.ApplyResult:
        try:
            return merge.apply_batch(self.conn, self.state, self.clock, batch, sender, wall=self.wall)
        except BaseException:
            self.state = capture.load_state(self.conn, self.clock)
            raise

    def push(self, other: Replica, *, table: str | None = None, limit: int = changes.DEFAULT_BATCH_ROWS,
             plain: bool = True, max_bytes: int | None = None, marks: bool = False,
             own: bool = False, forwarding: frozenset[str] = frozenset(),
             book: dict[str, int] | None = None) -> list[merge.ApplyResult]:
        """Send ``other`` everything it has not applied from us, in batches.

        ``plain`` sends each batch through its msgpack-ready form and back,
        as the wire will. ``marks``: leave out what ``other``'s origin marks
        say it holds, as the daemons do (protocol 3). ``own``: an auto push
        after local writes (protocol 4): our own changes only, from where
        ``other`` holds all of them, with marks; with ``forwarding``, those
        devices' changes too, and with ``book`` (the engine's bookkeeping
        for ``other``, kept by the caller across pushes: ``stream.forwarded_since``)
        the marks it grants for them (protocol 5).
        """
        results = []
        position = merge.eager_position if own else merge.position
        since = self.start_position(*position(other.conn, self.id))
        covered = dict(merge.origin_marks(other.conn, other.clock.last)) if marks or own else None
        while True:
            grants = None
            if book is not None:
                kept = stream.forwarded_since(book, forwarding, since)
                book.clear()
                book.update(kept)
                grants = dict(book)
            batch = self.read(since, table=table, limit=limit, max_bytes=max_bytes, covered=covered, own_only=own,
                              forwarding=forwarding, grants=grants)
            if plain:
                batch = decode(pack_values(changes.batch_to_plain(batch)))  # (as a daemon receives it)
            if own:
                batch = own_push_part(batch)
            results.append(other.apply(batch, self.id))
            since = batch.last_seq
            if not batch.more:
                return results


def applied(results: list[merge.ApplyResult]) -> int:
    return sum(r.applied for r in results)


@contextmanager
def replica_maker(root: Path, items: str, items_doc: dict[str, Any], notes: str) -> Iterator[Callable[..., Replica]]:
    """``make(device_id, kind="single_version", *, wall=None)``: a Replica with
    table ``items`` (single_version, ``items_doc``) or ``notes`` (collaborative);
    all closed at the end."""
    made: list[Replica] = []

    def make(device_id: str, kind: str = "single_version", *, wall: int | None = None) -> Replica:
        r = Replica(root / f"{device_id}.db", device_id, wall=wall)
        if kind == "single_version":
            r.write(items)
            r.make_distributed("items", doc=items_doc)
        else:
            r.write(notes)
            r.make_distributed("notes")
        made.append(r)
        return r

    try:
        yield make
    finally:
        for r in made:
            r.close()
