"""Applying a peer's changes: merge rules, conflict log, failure log, watermarks.

``apply_batch`` is the only way peers' rows enter a store. One call is one
transaction (its own ``BEGIN IMMEDIATE``, or a savepoint inside the caller's):

1. ``capture.stamp``: pending local writes get their clocks first, so they
   take part in the comparison (their ChangeBatch is returned to be announced
   as local changes);
2. a row in ``_p2p_apply``: capture triggers skip our writes (no echo) and
   collaborative device tables accept them;
3. the ordinary batch in bulk (a few IN queries and executemany per
   table; ``apply_bulk``); if that is not possible or SQLite refuses any
   of it, each row change under its own SAVEPOINT instead: one that can't
   be applied (constraint, type, unknown column, schema mismatch, a clock
   beyond the clock's bound ahead of local time) is rolled back alone and
   stored in ``_p2p_failures``; the rest of the batch still applies. Both
   ways write exactly the same (tests/store/test_merge_bulk*);
4. the high-water marks of tables we appended to move past our rows, our log
   rows carry the incoming hlc and origin (remote notifications, relay seqs);
5. the guard row goes, the watermark for the sender moves, the clock observes
   the newest incoming value and ``hlc_last`` is persisted.

Any other error rolls everything back: rows, conflicts, failures, watermark.

Merge rules, single_version (rows known by their conflict value ``ck``):

- Clocks are ``(hlc, origin)`` pairs compared as tuples: HLC first, device ID
  breaks ties. Local clocks are stored with origin NULL and compared as this
  device's ID.
- A row's state is its cells (per sync column, the greatest clock seen) and
  its tomb (the greatest delete clock seen, also for rows never seen: a
  late, older insert then stays deleted). Merging keeps the maximum of each,
  so it is commutative, associative and idempotent: any order and route of
  the same changes gives the same state, and a change seen twice (a cycle
  A→B→C→A, a re-sent batch) is a no-op that gets no new ``seq`` — it stops
  travelling.
- The materialized row exists iff some cell is newer than the tomb; a column
  whose cell is not newer than the tomb is NULL; the conflict column always
  holds ``ck``. Only sync columns are written, so unsynced local columns
  keep their values; a new row gets a local key (auto-increment keys never
  travel). Columns this device does not sync (a peer with another schema
  version) are skipped.
- Every change that loses a conflict is kept in ``_p2p_conflicts``: an
  incoming value older than ours, a visible local value overwritten by a
  newer one, values hidden by a newer delete, a delete that newer values
  outlive. A loss is *not* a conflict, and is not recorded, when the winner
  was written by a device that had already seen the loser: same device
  (its clock only grows), or the loser's clock is at most the winner's
  ``prev`` (what its writer knowingly superseded, see capture.py). Without
  that, every ordinary edit of another device's row would be logged as a
  conflict. ``prev`` only ever decides what is logged, never who wins.
  Also not recorded: a loser whose value equals the winner's (nothing was
  lost) and the same losing change twice (unique index). ``prev`` is one
  clock, not a version vector, so a loss that reached this device through
  a chain of later edits may still be logged.

collaborative: each sender's rows land in its device table
``dev_<DEVICE>_<T>`` as whole-row upserts and deletes; the row's clock (in
``_p2p_cells`` under column ``*``) makes stale or repeated changes no-ops.
Rows are only accepted from the device that wrote them (no relay).

Invariants: the watermark only moves forward, in the transaction of the
rows it covers, and only for a batch of the sender's whole stream that
starts at or below it (``OutBatch.full``, ``since_seq``). It is a position
in one stream of the sender (``OutBatch.stream``): a batch of another
stream counts from 0 (see ``changes.start_position``).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from p2pstore.clock import HybridClock, wall_ms
from p2pstore.errors import FailureNotFound, ProtocolError
from p2pstore.schema.predicates import quote_ident
from p2pstore.store import capture, cells, gc, origins
from p2pstore.store.blocks import apply_block, keys_stay_distinct
from p2pstore.store.capture import OP_DELETE, OP_INSERT, OP_NAMES, OP_UPDATE, CaptureState, ChangeBatch
from p2pstore.store.changes import (
    COLLABORATIVE,
    IN_CHUNK,
    ROW_CLOCK_COLUMN,
    SINGLE_VERSION,
    OutBatch,
    RowChange,
    SyncTable,
    Value,
    decode_change,
    encode_change,
    is_raw_text,
    raw_text_bytes,
    row_problem,
    sync_tables,
)

log = logging.getLogger(__name__)

Clock = tuple[int, str]


# --------------------------------------------------------------------------
# Results and records


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one ``apply_batch`` (or ``retry_failure``) did.

    ``applied``: row changes that changed this store's state; ``conflicts``:
    losing changes newly logged; ``failed``: row changes put in (or kept in)
    the failure log; ``last_seq``: the watermark for the sender afterwards.
    ``local``: local changes stamped before applying (announce them as
    ``local_details``). ``remote``: rows written, as origin device → table →
    ``{"inserted", "updated", "deleted"}`` key lists (``remote_details``);
    collaborative rows are reported under their logical table name, the rows
    themselves are in ``distributed_table_name(origin, table)``.
    """

    applied: int
    conflicts: int
    failed: int
    last_seq: int
    local: ChangeBatch
    remote: Mapping[str, Mapping[str, Mapping[str, list[Any]]]] = field(default_factory=dict)

    def remote_devices(self) -> list[str]:
        return sorted(self.remote)

    def remote_change_infos(self) -> dict[str, list[dict[str, Any]]]:
        return {
            origin: [{"table": table, "type": "data", **lists} for table, lists in sorted(tables.items())]
            for origin, tables in sorted(self.remote.items())
        }


@dataclass(frozen=True, slots=True)
class Conflict:
    """One losing change (``column`` None: a row delete that lost)."""

    id: int
    table: str
    key: Value
    column: str | None
    losing_value: Value
    winner: str
    winner_hlc: int
    loser: str
    loser_hlc: int
    at: int


@dataclass(frozen=True, slots=True)
class SyncFailure:
    """A received change that could not be applied, kept until retried or discarded."""

    id: int
    origin: str
    table: str
    reason: str
    at: int
    mode: str | None
    change: RowChange | None  # None only if the stored payload is unreadable


@dataclass(frozen=True, slots=True)
class _Stamp:
    """A clock and the clock its writer had superseded (for the conflict log)."""

    clock: Clock
    prev: Clock | None = None


def _visible(cell: _Stamp | None, tomb: _Stamp | None) -> bool:
    return cell is not None and (tomb is None or cell.clock > tomb.clock)


class _RowFailed(Exception):
    """A row change that can't be applied here; ``reason`` starts with a stable kind."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------
# Public API


def apply_batch(
    conn: sqlite3.Connection,
    state: CaptureState,
    clock: HybridClock,
    batch: OutBatch,
    from_device: str,
    *,
    wall: int | None = None,
) -> ApplyResult:
    """Apply ``batch`` received from ``from_device`` atomically (see the module docstring).

    ``from_device`` is the authenticated peer, never a value from the batch.
    The connection must be in autocommit mode (``isolation_level=None``), as
    the store's is.
    """
    if not isinstance(from_device, str) or not from_device:
        raise ValueError("from_device must be a device ID")
    with _atomic(conn, state):
        local = capture.stamp(conn, state, clock, wall=wall)
        applier = _Applier(conn, state, clock, batch.mode, from_device, wall)
        conn.execute("INSERT INTO _p2p_apply(x) VALUES (1)")
        # A batch that is one block goes set-based (store/blocks.py); any
        # other, or a block that path leaves, as row changes.
        if batch.blocks and (batch.rows or len(batch.blocks) > 1 or batch.snapshot_hlc is not None
                             or not apply_block(applier, batch.blocks[0])):
            batch = batch.as_rows()
        if batch.rows and not applier.apply_bulk(batch.rows, checked=batch.checked):
            for row in batch.rows:
                applier.apply(row, failure_id=None)
        applier.finish()
        if batch.snapshot_hlc is not None:  # a resync (store/gc.py)
            gc.mark(conn, from_device, batch)
            if not batch.more:
                applier.applied += gc.sweep(conn, from_device, batch)
        conn.execute("DELETE FROM _p2p_apply")
        last = _advance_watermark(conn, from_device, batch)
        _observe(conn, clock, applier.max_hlc, wall)
        return applier.result(last, local)


def retry_failure(
    conn: sqlite3.Connection, state: CaptureState, clock: HybridClock, failure_id: int, *, wall: int | None = None
) -> ApplyResult:
    """Apply a stored failed change again; on success it leaves the failure log.

    On a new failure the entry stays, with the new reason (``failed`` == 1).
    Merge rules apply as for a fresh change, so a retried change that newer
    ones have overtaken loses (and is logged as a conflict) rather than
    overwriting them.
    """
    with _atomic(conn, state):
        found = conn.execute("SELECT origin, change FROM _p2p_failures WHERE id = ?", (failure_id,)).fetchone()
        if found is None:
            raise FailureNotFound(f"no sync failure with id {failure_id}", data={"id": failure_id})
        origin, blob = found
        try:
            mode, row = decode_change(blob)
        except ProtocolError as exc:
            raise FailureNotFound(f"sync failure {failure_id} holds no readable change: {exc.message}", data={"id": failure_id}) from exc
        local = capture.stamp(conn, state, clock, wall=wall)
        applier = _Applier(conn, state, clock, mode, origin, wall)
        conn.execute("INSERT INTO _p2p_apply(x) VALUES (1)")
        applier.apply(row, failure_id=failure_id)
        applier.finish()
        conn.execute("DELETE FROM _p2p_apply")
        _observe(conn, clock, applier.max_hlc, wall)
        return applier.result(watermark(conn, origin), local)


def discard_failure(conn: sqlite3.Connection, failure_id: int) -> None:
    """Drop a stored failed change for good."""
    if conn.execute("DELETE FROM _p2p_failures WHERE id = ?", (failure_id,)).rowcount == 0:
        raise FailureNotFound(f"no sync failure with id {failure_id}", data={"id": failure_id})


def sync_failures(conn: sqlite3.Connection, limit: int = 100) -> list[SyncFailure]:
    """The sync-failure log, oldest first."""
    result = []
    for fid, origin, table, blob, reason, at in conn.execute(
        "SELECT id, origin, tbl, change, reason, at FROM _p2p_failures ORDER BY id LIMIT ?", (limit,)
    ):
        try:
            mode, row = decode_change(blob)
        except ProtocolError:
            mode, row = None, None
        result.append(SyncFailure(fid, origin, table, reason, at, mode, row))
    return result


def conflicts(conn: sqlite3.Connection, table: str | None = None, limit: int = 100) -> list[Conflict]:
    """The conflict log, newest first (optionally of one table)."""
    sql = "SELECT id, tbl, ck, col, losing_value, winner, winner_hlc, loser, loser_hlc, at FROM _p2p_conflicts"
    params: tuple[Any, ...] = (limit,)
    if table is not None:
        sql += " WHERE tbl = ?"
        params = (table, limit)
    return [Conflict(*r) for r in conn.execute(sql + " ORDER BY id DESC LIMIT ?", params)]


def clear_conflicts(conn: sqlite3.Connection, up_to: int | None = None, table: str | None = None) -> int:
    """Forget logged conflicts (all, or those with ``id <= up_to``, of one
    table or all): a user has looked at them. The number forgotten."""
    sql, params = "DELETE FROM _p2p_conflicts WHERE 1", []
    if up_to is not None:
        sql, params = sql + " AND id <= ?", [*params, up_to]
    if table is not None:
        sql, params = sql + " AND tbl = ?", [*params, table]
    return conn.execute(sql, params).rowcount


def position(conn: sqlite3.Connection, peer: str) -> tuple[int, str | None]:
    """The highest ``seq`` of ``peer``'s stream applied here, and the ID of
    that stream: (0, None) before anything was applied."""
    row = conn.execute("SELECT received_seq, stream FROM _p2p_watermarks WHERE peer = ?", (peer,)).fetchone()
    return (int(row[0]), row[1]) if row is not None else (0, None)


def watermark(conn: sqlite3.Connection, peer: str) -> int:
    """The highest ``seq`` of ``peer``'s stream applied here (0: nothing yet)."""
    return position(conn, peer)[0]


# --------------------------------------------------------------------------
# Transactions


@contextmanager
def _atomic(conn: sqlite3.Connection, state: CaptureState) -> Iterator[None]:
    """All or nothing: our own IMMEDIATE transaction, or a savepoint in the
    caller's. On failure the cached capture state is put back as it was, since
    the rows it describes are rolled back too."""
    nested = conn.in_transaction
    conn.execute("SAVEPOINT p2p_batch" if nested else "BEGIN IMMEDIATE")
    saved = (state.stamped_seq, {tid: t.hw for tid, t in state.tables.items()})
    try:
        yield
        conn.execute("RELEASE p2p_batch" if nested else "COMMIT")
    except BaseException:
        if nested:
            _rollback_to(conn, "p2p_batch")
        elif conn.in_transaction:
            conn.execute("ROLLBACK")
        state.stamped_seq = saved[0]
        for tid, hw in saved[1].items():
            if tid in state.tables:
                state.tables[tid].hw = hw
        raise


def _rollback_to(conn: sqlite3.Connection, savepoint: str) -> None:
    """Undo up to ``savepoint`` and drop it. On SQLITE_FULL or an I/O error
    SQLite may have rolled the whole transaction back already: then there is
    nothing to undo, and the error that did it is the one to raise."""
    if conn.in_transaction:
        conn.execute(f"ROLLBACK TO {savepoint}")
        conn.execute(f"RELEASE {savepoint}")


def _advance_watermark(conn: sqlite3.Connection, peer: str, batch: OutBatch) -> int:
    current, stream = position(conn, peer)
    if stream != batch.stream:
        current = 0  # another stream (the sender's store is new or restored): its seqs start over
    resynced = batch.snapshot_hlc is not None and not batch.more  # a resync moves it once, at its end (store/gc.py)
    if resynced or (batch.full and batch.snapshot_hlc is None and batch.since_seq <= current < batch.last_seq):
        conn.execute(
            "INSERT INTO _p2p_watermarks(peer, received_seq, stream) VALUES (?, ?, ?) "
            "ON CONFLICT(peer) DO UPDATE SET received_seq = excluded.received_seq, stream = excluded.stream",
            (peer, batch.last_seq, batch.stream),
        )
        return batch.last_seq
    return current


def _observe(conn: sqlite3.Connection, clock: HybridClock, newest: int, wall: int | None) -> None:
    if newest > 0:
        clock.observe(newest, wall)
        capture.set_meta(conn, "hlc_last", clock.last)


# --------------------------------------------------------------------------
# The merge


def _bind(values: Sequence[Value]) -> tuple[list[str], tuple[Value, ...]]:
    """Placeholders and parameters for ``values``. Raw text (TEXT that is not
    valid UTF-8, see ``changes.TEXT_FACTORY``) is bound as its bytes and cast
    back, so the receiver stores the same bytes as TEXT."""
    marks, params = [], []
    for value in values:
        if is_raw_text(value):
            assert isinstance(value, str)
            marks.append("CAST(? AS TEXT)")
            params.append(raw_text_bytes(value))
        else:
            marks.append("?")
            params.append(value)
    return marks, tuple(params)


def _same(a: Value, b: Value) -> bool:
    """Equal as SQLite stores them (1 and 1.0 and True are not the same value)."""
    return type(a) is type(b) and a == b


def _sqlite_reason(exc: sqlite3.Error) -> str | None:
    """The failure-log reason for an error that concerns one row, or None
    for errors that concern the whole store (locked, I/O, corrupt...)."""
    text = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        kind = "type" if "cannot store" in text else "constraint"
        return f"{kind}: {text.removeprefix('CONSTRAINT_VIOLATION: ')}"
    if isinstance(exc, (sqlite3.DataError, sqlite3.InterfaceError, sqlite3.ProgrammingError)):
        return f"type: {text}"
    if isinstance(exc, sqlite3.OperationalError) and ("no such column" in text or "has no column named" in text):
        return f"unknown_column: {text}"
    return None


@dataclass(slots=True)
class _Target:
    table: SyncTable
    dest: str  # the SQLite table written: T itself, or the device table
    dest_tid: int
    dest_columns: frozenset[str]  # single_version: the sync columns; collaborative: the device table's columns


@dataclass(frozen=True, slots=True)
class _SingleVersionSql:
    """The statements that merge rows into one single_version table, built
    once per batch instead of once per row."""

    columns: tuple[str, ...]
    select: str  # key expression and the sync columns of the row with a given ck
    select_many: str  # the same and the ck, for the cks of an IN list that follows
    insert_head: str  # "INSERT INTO t (sync columns) VALUES " (the placeholders follow)
    insert: str
    delete: str
    key: str  # key expression of the row with a given ck
    keys_many: str  # ck and key expression of the rows with the cks of an IN list that follows
    update_head: str  # "UPDATE t SET " (the changed columns follow)
    update_tail: str  # " WHERE ck = ?"

    @classmethod
    def of(cls, table: SyncTable) -> _SingleVersionSql:
        assert table.conflict_column is not None
        name, ck = quote_ident(table.info.name), quote_ident(table.conflict_column)
        columns = tuple(table.sync_columns)
        listed = ", ".join(quote_ident(c) for c in columns)
        return cls(
            columns=columns,
            select=f"SELECT {table.info.key_expr}, {listed} FROM {name} WHERE {ck} = ?",
            select_many=f"SELECT {table.info.key_expr}, {listed}, {ck} FROM {name} WHERE {ck} IN",
            insert_head=f"INSERT INTO {name} ({listed}) VALUES ",
            insert=f"INSERT INTO {name} ({listed}) VALUES ({', '.join('?' * len(columns))})",
            delete=f"DELETE FROM {name} WHERE {ck} = ?",
            key=f"SELECT {table.info.key_expr} FROM {name} WHERE {ck} = ?",
            keys_many=f"SELECT {ck}, {table.info.key_expr} FROM {name} WHERE {ck} IN",
            update_head=f"UPDATE {name} SET ",
            update_tail=f" WHERE {ck} = ?",
        )


@dataclass(slots=True)
class _SvState:
    """A single_version row as it is here before a merge."""

    current: tuple[Value, ...] | None  # (key, *sync column values); None: no such row
    cells: dict[str, _Stamp]
    tomb: _Stamp | None
    stored: dict[str, cells.Stored] = field(default_factory=dict)  # the logical cells as stored (with their seq)
    had_row: bool = False  # a _p2p_rows entry (store/cells.py)
    had_cols: bool = False  # _p2p_cells entries of its own


@dataclass(slots=True)
class _SvPlan:
    """What merging one row change writes."""

    table: SyncTable
    ck: Value
    write: str  # "insert", "update", "delete" or "none" (a delete of a row never seen here)
    diff: tuple[str, ...]  # update: the columns whose value changes
    after: dict[str, Value]  # the row's sync columns after the merge
    pk: Value  # the row's key here (set after an insert)
    op: int  # what the log row says
    announce: bool
    newest: Clock  # the log row's clock: the newest of the changed cells and tomb
    changed: tuple[tuple[str, _Stamp], ...]  # cells to store
    tomb: _Stamp | None  # tomb to store
    state: _SvState  # the row before (its stored cells are rewritten with the changed ones)


def _row_clock(row: RowChange) -> Clock:
    """A collaborative row change's one clock: its delete's, or its cells' (all equal)."""
    return row.tomb if row.tomb is not None else (row.cells[0].hlc, row.cells[0].origin)


class _Applier:
    """Applies the row changes of one batch (or one retried failure)."""

    def __init__(self, conn: sqlite3.Connection, state: CaptureState, clock: HybridClock, mode: str, sender: str,
                 wall: int | None) -> None:
        self.conn = conn
        self.state = state
        self.clock = clock
        self.mode = mode
        self.sender = sender
        self.wall = wall
        #: The newest clock value a change may carry (see clock.py): one bound for the whole batch.
        self.checked_at = self.now()
        self.clock_limit = clock.limit(self.checked_at)
        self.me = capture.device_id(conn)
        self.origins = origins.Origins(conn)
        self.tables = {t.info.name: t for t in sync_tables(conn)}
        self.targets: dict[str, _Target] = {}
        self.sv_sql: dict[str, _SingleVersionSql] = {}
        self.appended: set[int] = set()
        self.applied = self.conflicts = self.failed = 0
        self.max_hlc = 0
        self.remote: dict[str, dict[str, dict[str, list[Any]]]] = {}

    def now(self) -> int:
        return self.wall if self.wall is not None else wall_ms()

    # -- per row ---------------------------------------------------------

    def _clock_ahead(self, row: RowChange) -> str | None:
        """The failure reason if a clock of ``row`` is beyond the clock's bound
        ahead of local time (None: none is). The one check of remote clocks:
        such a change never reaches the tables or the clock."""
        newest = max([h for c in row.cells for h in (c.hlc, c.prev_hlc) if h is not None]
                     + [h for h in (row.tomb_hlc, row.tomb_prev_hlc) if h is not None], default=0)
        if newest <= self.clock_limit:
            return None
        return f"clock_ahead: {row.table}: {self.clock.too_far_ahead(newest, self.checked_at)}"

    def apply(self, row: RowChange, *, failure_id: int | None) -> None:
        problem = row_problem(self.mode, row)
        if problem is not None:
            self._failed(row, f"invalid: {problem}", failure_id)
            return
        ahead = self._clock_ahead(row)
        if ahead is not None:
            self._failed(row, ahead, failure_id)
            return
        for c in row.cells:
            self.max_hlc = max(self.max_hlc, c.hlc)
        if row.tomb_hlc is not None:
            self.max_hlc = max(self.max_hlc, row.tomb_hlc)
        self.conn.execute("SAVEPOINT p2p_row")
        fresh = row.table not in self.targets
        try:
            target = self._target(row.table)
            changed = self._merge_single_version(target, row) if self.mode == SINGLE_VERSION else self._merge_collaborative(target, row)
        except (_RowFailed, sqlite3.Error) as exc:
            reason = exc.reason if isinstance(exc, _RowFailed) else _sqlite_reason(exc)
            _rollback_to(self.conn, "p2p_row")
            self.origins.reload(self.conn)  # numbers given in the savepoint are gone
            if fresh:  # a device table created for this row was rolled back with it
                self.targets.pop(row.table, None)
            if reason is None or not self.conn.in_transaction:
                raise
            self._failed(row, reason, failure_id)
            return
        self.conn.execute("RELEASE p2p_row")
        self.applied += int(changed)
        if failure_id is not None:
            self.conn.execute("DELETE FROM _p2p_failures WHERE id = ?", (failure_id,))

    def _failed(self, row: RowChange, reason: str, failure_id: int | None) -> None:
        self.failed += 1
        log.info("change to %s from %s not applied: %s", row.table, self.sender, reason)
        if failure_id is None:
            self.conn.execute(
                "INSERT INTO _p2p_failures(origin, tbl, change, reason, at) VALUES (?, ?, ?, ?, ?)",
                (self.sender, row.table, encode_change(self.mode, row), reason, self.now()),
            )
        else:
            self.conn.execute("UPDATE _p2p_failures SET reason = ?, at = ? WHERE id = ?", (reason, self.now(), failure_id))

    def _target(self, name: str) -> _Target:
        target = self.targets.get(name)
        if target is not None:
            return target
        table = self.tables.get(name)
        if table is None:
            raise _RowFailed(f"not_distributed: table {name} is not a distributed table here")
        if table.mode != self.mode:
            raise _RowFailed(f"schema_mismatch: {name} is {table.mode} here, {self.mode} on {self.sender}")
        if self.mode == SINGLE_VERSION:
            dest, tid, columns = table.info.name, table.tid, frozenset(table.sync_columns)
        else:
            dest = capture.create_device_table(self.conn, self.sender, table.info.name)
            tid = self.conn.execute("SELECT tid FROM _p2p_tables WHERE name = ?", (dest,)).fetchone()[0]
            columns = frozenset(r[1] for r in self.conn.execute(f"PRAGMA table_info({quote_ident(dest)})"))
        target = _Target(table, dest, tid, columns)
        self.targets[name] = target
        return target

    def _log(self, tid: int, pk: Value, op: int, clock: Clock, ck: Value) -> int:
        cursor = self.conn.execute(
            "INSERT INTO _p2p_log(tid, pk, op, hlc, origin, ck) VALUES (?, ?, ?, ?, ?, ?)",
            (tid, pk, op, clock[0], self._logged(clock[1]), ck),
        )
        return int(cursor.lastrowid or 0)

    def _announce(self, origin: str, table: str, op: int, key: Value) -> None:
        lists = self.remote.setdefault(origin, {}).setdefault(table, {"inserted": [], "updated": [], "deleted": []})
        lists[OP_NAMES[op]].append(key)

    def _conflict(self, table: str, ck: Value, col: str | None, value: Value, winner: _Stamp, loser: _Stamp) -> None:
        """Log ``loser`` unless its loss was no conflict: a device superseding
        its own change, or a winner written by a device that had already
        seen the loser (or something newer)."""
        if winner.clock[1] == loser.clock[1] or (winner.prev is not None and loser.clock <= winner.prev):
            return
        (mark,), (param,) = _bind([value])
        cursor = self.conn.execute(
            "INSERT OR IGNORE INTO _p2p_conflicts(tbl, ck, col, losing_value, winner, winner_hlc, loser, loser_hlc, at) "
            f"VALUES (?, ?, ?, {mark}, ?, ?, ?, ?, ?)",
            (table, ck, col, param, winner.clock[1], winner.clock[0], loser.clock[1], loser.clock[0], self.now()),
        )
        self.conflicts += cursor.rowcount

    def _local(self, origin: int | None) -> str:
        """A stored origin as a device ID (store/origins.py)."""
        return self.me if origin is None else self.origins.device(origin)

    def _prev(self, hlc: int | None, origin: int | None) -> Clock | None:
        return None if hlc is None else (hlc, self._local(origin))

    def _row(self, clock: Clock | None) -> tuple[int | None, int | None]:
        """A clock as stored: (hlc, origin number), origin NULL for this device."""
        return (None, None) if clock is None else (clock[0], self._stored(clock[1]))

    def _stored(self, origin: str) -> int | None:
        return None if origin == self.me else self.origins.number(self.conn, origin)

    def _logged(self, origin: str) -> int:
        """A received change's origin in ``_p2p_log``: always a number, even
        ours relayed back (NULL there means a change captured here)."""
        return self.origins.number(self.conn, origin)

    # -- collaborative -----------------------------------------------------

    def _merge_collaborative(self, target: _Target, row: RowChange) -> bool:
        clock = _row_clock(row)
        if clock[1] != self.sender:
            raise _RowFailed(f"invalid: collaborative rows are only accepted from their own device, not relayed ({clock[1]} via {self.sender})")
        table = target.table
        if row.key_column != table.key_column:
            raise _RowFailed(f"schema_mismatch: {table.info.name} is keyed by {table.key_column or 'rowid'} here, by {row.key_column or 'rowid'} on {self.sender}")
        stored = self.conn.execute(
            "SELECT hlc, origin FROM _p2p_cells WHERE tid = ? AND ck = ? AND col = ?", (target.dest_tid, row.key, ROW_CLOCK_COLUMN)
        ).fetchone()
        if stored is not None and clock <= (stored[0], self._local(stored[1])):
            return False  # stale or repeated
        dest = quote_ident(target.dest)
        key_col = table.info.key or capture.DEVICE_ROWID_COLUMN
        existed = self.conn.execute(f"SELECT 1 FROM {dest} WHERE {quote_ident(key_col)} = ?", (row.key,)).fetchone() is not None
        if row.tomb is not None:
            self.conn.execute(f"DELETE FROM {dest} WHERE {quote_ident(key_col)} = ?", (row.key,))
            op = OP_DELETE
        else:
            unknown = sorted(c.column for c in row.cells if c.column not in target.dest_columns)
            if unknown:
                raise _RowFailed(f"unknown_column: {table.info.name} has no column(s) {', '.join(unknown)} here")
            cells = [c for c in row.cells if c.column != key_col]
            names = [key_col, *(c.column for c in cells)]
            sets = ", ".join(f"{quote_ident(c.column)} = excluded.{quote_ident(c.column)}" for c in cells)
            marks, params = _bind([row.key, *(c.value for c in cells)])
            self.conn.execute(
                f"INSERT INTO {dest} ({', '.join(quote_ident(n) for n in names)}) VALUES ({', '.join(marks)}) "
                f"ON CONFLICT({quote_ident(key_col)}) DO " + (f"UPDATE SET {sets}" if sets else "NOTHING"),
                params,
            )
            op = OP_UPDATE if existed else OP_INSERT
        seq = self._log(target.dest_tid, row.key, op, clock, None)
        self.conn.execute(
            "INSERT INTO _p2p_cells(tid, ck, col, hlc, origin, seq) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(tid, ck, col) DO UPDATE SET hlc = excluded.hlc, origin = excluded.origin, seq = excluded.seq",
            (target.dest_tid, row.key, ROW_CLOCK_COLUMN, clock[0], self._stored(clock[1]), seq),
        )
        if existed or op != OP_DELETE:
            self._announce(clock[1], table.info.name, op, row.key)
        return True

    def apply_bulk(self, rows: Sequence[RowChange], *, checked: bool = False) -> bool:
        """Apply a whole batch with a few statements per table (IN queries,
        executemany) instead of seven or eight per row: same writes, same log
        seqs in the same order, same conflicts and announcements as ``apply``
        row by row (tests/store/test_merge_bulk*.py prove it on random
        batches).

        Only for the ordinary batch: every row valid (``checked``: the
        decoder said so already), of a distributed table
        here in this mode and with the same key column, collaborative rows
        written by the sender, each key once per table, all keys of one type
        that the key column keeps distinct (``_keys_stay_distinct``).
        Otherwise, and on any SQLite error (rolled back to a savepoint), it
        returns False having changed nothing, and the caller applies row by
        row, which isolates the row that fails.
        """
        if not rows:
            return False
        keys: dict[str, list[Value]] = {}
        types: dict[str, type] = {}
        for row in rows:
            table = self.tables.get(row.table)
            if (not checked and row_problem(self.mode, row) is not None) or table is None or table.mode != self.mode:
                return False
            if self._clock_ahead(row) is not None:
                return False  # row by row logs it as a failure
            if any(is_raw_text(c.value) for c in row.cells):
                return False  # row by row binds it (_bind)
            if row.key_column != table.key_column:
                return False
            if self.mode == COLLABORATIVE and _row_clock(row)[1] != self.sender:
                return False
            if type(row.key) not in (int, str) or types.setdefault(row.table, type(row.key)) is not type(row.key):
                return False
            keys.setdefault(row.table, []).append(row.key)
        if any(len(set(k)) != len(k) for k in keys.values()):
            return False
        conn = self.conn
        conn.execute("SAVEPOINT p2p_bulk")
        try:
            if self.mode == COLLABORATIVE:
                done = self._collaborative_bulk(rows, keys, types)
            else:
                done = self._single_version_bulk(rows, keys, types)
        except sqlite3.Error:
            if not conn.in_transaction:  # SQLite rolled it all back (disk full, I/O error)
                raise
            done = False
        if not done:
            _rollback_to(conn, "p2p_bulk")
            self.origins.reload(conn)
            self.targets.clear()  # device tables created in the savepoint are gone
            self.applied = self.conflicts = 0
            self.appended.clear()
            self.remote = {}
            return False
        conn.execute("RELEASE p2p_bulk")
        for row in rows:
            for c in row.cells:
                self.max_hlc = max(self.max_hlc, c.hlc)
            if row.tomb_hlc is not None:
                self.max_hlc = max(self.max_hlc, row.tomb_hlc)
        return True

    def _collaborative_bulk(self, rows: Sequence[RowChange], keys: dict[str, list[Value]], types: dict[str, type]) -> bool:
        conn = self.conn
        plan = [(row, _row_clock(row)) for row in rows]
        stored: dict[str, dict[Value, Clock]] = {}
        existing: dict[str, set[Value]] = {}
        for name, table_keys in keys.items():
            target = self._target(name)
            key_col = target.table.info.key or capture.DEVICE_ROWID_COLUMN
            if not keys_stay_distinct(conn, target.dest, key_col, types[name]):
                return False
            stored[name], existing[name] = {}, set()
            for i in range(0, len(table_keys), IN_CHUNK):
                chunk = table_keys[i:i + IN_CHUNK]
                marks = ", ".join("?" * len(chunk))
                for ck, hlc, origin in conn.execute(
                    f"SELECT ck, hlc, origin FROM _p2p_cells WHERE tid = ? AND col = ? AND ck IN ({marks})",
                    (target.dest_tid, ROW_CLOCK_COLUMN, *chunk),
                ):
                    stored[name][ck] = (hlc, self._local(origin))
                existing[name].update(
                    r[0] for r in conn.execute(
                        f"SELECT {quote_ident(key_col)} FROM {quote_ident(target.dest)} WHERE {quote_ident(key_col)} IN ({marks})", chunk
                    )
                )
        top = capture.last_seq(conn)
        if top + len(plan) >= 1 << 63:
            return False
        seq = top
        upserts: dict[str, list[tuple[Value, ...]]] = {}
        deletes: dict[str, list[tuple[Value]]] = {}
        log_rows: list[tuple[Any, ...]] = []
        cell_rows: list[tuple[Any, ...]] = []
        for row, clock in plan:
            target = self.targets[row.table]
            table = target.table
            old = stored[row.table].get(row.key)
            if old is not None and clock <= old:
                continue  # stale or repeated
            dest = quote_ident(target.dest)
            key_col = table.info.key or capture.DEVICE_ROWID_COLUMN
            existed = row.key in existing[row.table]
            if row.tomb is not None:
                deletes.setdefault(f"DELETE FROM {dest} WHERE {quote_ident(key_col)} = ?", []).append((row.key,))
                op = OP_DELETE
            else:
                if any(c.column not in target.dest_columns for c in row.cells):
                    return False  # row by row reports it as unknown_column
                cells = [c for c in row.cells if c.column != key_col]
                names = [key_col, *(c.column for c in cells)]
                sets = ", ".join(f"{quote_ident(c.column)} = excluded.{quote_ident(c.column)}" for c in cells)
                sql = (f"INSERT INTO {dest} ({', '.join(quote_ident(n) for n in names)}) VALUES ({', '.join('?' * len(names))}) "
                       f"ON CONFLICT({quote_ident(key_col)}) DO " + (f"UPDATE SET {sets}" if sets else "NOTHING"))
                upserts.setdefault(sql, []).append((row.key, *(c.value for c in cells)))
                op = OP_UPDATE if existed else OP_INSERT
            seq += 1  # what _log's INSERT would get: the log's rowid is max(seq) + 1
            log_rows.append((seq, target.dest_tid, row.key, op, clock[0], self._logged(clock[1]), None))
            cell_rows.append((target.dest_tid, row.key, ROW_CLOCK_COLUMN, clock[0], self._stored(clock[1]), seq))
            if existed or op != OP_DELETE:
                self._announce(clock[1], table.info.name, op, row.key)
            self.applied += 1
        for sql, params in (*upserts.items(), *deletes.items()):
            conn.executemany(sql, params)
        conn.executemany("INSERT INTO _p2p_log(seq, tid, pk, op, hlc, origin, ck) VALUES (?, ?, ?, ?, ?, ?, ?)", log_rows)
        conn.executemany(
            "INSERT INTO _p2p_cells(tid, ck, col, hlc, origin, seq) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(tid, ck, col) DO UPDATE SET hlc = excluded.hlc, origin = excluded.origin, seq = excluded.seq",
            cell_rows,
        )
        return True

    # -- single_version ----------------------------------------------------
    #
    # One row change is merged in three steps: the row's state here (values,
    # cells, tomb), a plan (pure: who wins, what is lost, what to write) and
    # the writes. Row by row loads and writes one plan at a time; the bulk
    # path loads the state of a whole batch with a few IN queries and writes
    # all plans with executemany. Both use the same planner and writer.

    def _sv_sql(self, table: SyncTable) -> _SingleVersionSql:
        sql = self.sv_sql.get(table.info.name)
        if sql is None:
            sql = self.sv_sql[table.info.name] = _SingleVersionSql.of(table)
        return sql

    def _stamp(self, hlc: int, origin: int | None, prev_hlc: int | None, prev_origin: int | None) -> _Stamp:
        return _Stamp((hlc, self._local(origin)), self._prev(prev_hlc, prev_origin))

    def _merge_single_version(self, target: _Target, row: RowChange) -> bool:
        table = target.table
        if row.key_column != table.conflict_column:
            raise _RowFailed(
                f"schema_mismatch: the conflict column of {table.info.name} is {table.conflict_column} here, {row.key_column} on {self.sender}"
            )
        conn, ck, tid = self.conn, row.key, table.tid
        state = _SvState(conn.execute(self._sv_sql(table).select, (ck,)).fetchone(), {}, None)
        shared, own = cells.load(conn, tid, [ck])
        self._fill(state, table, shared.get(ck), own.get(ck))
        found = conn.execute("SELECT hlc, origin, prev_hlc, prev_origin FROM _p2p_tombs WHERE tid = ? AND ck = ?", (tid, ck)).fetchone()
        if found is not None:
            state.tomb = self._stamp(*found)
        plan = self._sv_plan(target, row, state)
        if plan is None:
            return False
        self._sv_write([plan], raw_text=True)
        return True

    def _fill(self, state: _SvState, table: SyncTable, shared: cells.Stored | None, own: dict[str, cells.Stored] | None) -> None:
        """Give ``state`` the row's clocks as stored (store/cells.py)."""
        state.had_row, state.had_cols = shared is not None, bool(own)
        state.stored = cells.expand(shared, own, table.sync_columns)
        state.cells = {col: self._stamp(hlc, origin, prev_hlc, prev_origin)
                       for col, (hlc, origin, _seq, prev_hlc, prev_origin) in state.stored.items()}

    def _single_version_bulk(self, rows: Sequence[RowChange], keys: dict[str, list[Value]], types: dict[str, type]) -> bool:
        conn = self.conn
        states: dict[str, dict[Value, _SvState]] = {}
        for name, table_keys in keys.items():
            table = self.tables[name]
            assert table.conflict_column is not None
            if not keys_stay_distinct(conn, name, table.conflict_column, types[name]):
                return False
            sql = self._sv_sql(table)
            found: dict[Value, _SvState] = {k: _SvState(None, {}, None) for k in table_keys}
            for i in range(0, len(table_keys), IN_CHUNK):
                chunk = table_keys[i:i + IN_CHUNK]
                marks = ", ".join("?" * len(chunk))
                for current in conn.execute(f"{sql.select_many} ({marks})", chunk):
                    state = found.get(current[-1])
                    if state is None or type(current[-1]) is not types[name]:
                        return False  # a stored key that compares equal but is not: row by row decides
                    state.current = current[:-1]
                shared, own = cells.load(conn, table.tid, chunk)
                for ck in {*shared, *own}:
                    self._fill(found[ck], table, shared.get(ck), own.get(ck))
                for ck, *clock in conn.execute(
                    f"SELECT ck, hlc, origin, prev_hlc, prev_origin FROM _p2p_tombs WHERE tid = ? AND ck IN ({marks})",
                    (table.tid, *chunk),
                ):
                    found[ck].tomb = self._stamp(*clock)
            states[name] = found
        plans = []
        for row in rows:
            plan = self._sv_plan(self._target(row.table), row, states[row.table][row.key])
            if plan is not None:
                plans.append(plan)
        self._sv_write(plans)
        self.applied += len(plans)
        return True

    def _sv_plan(self, target: _Target, row: RowChange, state: _SvState) -> _SvPlan | None:
        """Merge ``row`` into the row's ``state`` here: None if nothing changes."""
        if state.current is None and not state.cells and state.tomb is None and row.tomb_hlc is None:
            return self._sv_plan_new(target, row, state)
        return self._sv_plan_merge(target, row, state)

    def _sv_plan_new(self, target: _Target, row: RowChange, state: _SvState) -> _SvPlan | None:
        """``_sv_plan`` for the commonest case, a row never seen here arriving
        without a delete: its cells all win, nothing loses, the row is
        inserted. The same plan as ``_sv_plan_merge`` gives (tests/store/test_merge.py
        checks), without its comparisons."""
        table = target.table
        conflict = table.conflict_column
        dest = target.dest_columns
        changed = tuple((c.column, _Stamp((c.hlc, c.origin), c.prev)) for c in row.cells if c.column in dest)
        if not changed:
            return None
        incoming = {c.column: c.value for c in row.cells if c.column in dest}
        after = {col: row.key if col == conflict else incoming.get(col) for col in self._sv_sql(table).columns}
        newest = max(st.clock for _, st in changed)
        return _SvPlan(table, row.key, "insert", (), after, None, OP_INSERT, True, newest, changed, None, state)

    def _sv_plan_merge(self, target: _Target, row: RowChange, state: _SvState) -> _SvPlan | None:
        table = target.table
        conflict = table.conflict_column
        assert conflict is not None
        ck, name = row.key, table.info.name
        columns = self._sv_sql(table).columns
        current, cells, old_tomb = state.current, state.cells, state.tomb
        existed = current is not None
        before: dict[str, Value] = dict(zip(columns, current[1:])) if current is not None else {}
        losses: list[tuple[str | None, Value, _Stamp, _Stamp]] = []  # (column, losing value, winner, loser)

        # Merge: the greatest clock of each cell and of the tomb.
        in_tomb = _Stamp(row.tomb, row.tomb_prev) if row.tomb is not None else None
        tomb_changed = in_tomb is not None and (old_tomb is None or in_tomb.clock > old_tomb.clock)
        new_tomb = in_tomb if tomb_changed else old_tomb
        new_cells = dict(cells)
        incoming: dict[str, Value] = {}
        for c in row.cells:
            if c.column not in target.dest_columns:
                continue  # not synced here (another schema version): both sync only what both sync
            theirs, mine = _Stamp(c.clock, c.prev), cells.get(c.column)
            if mine is not None and theirs.clock == mine.clock:
                continue  # seen before
            if mine is None or theirs.clock > mine.clock:
                new_cells[c.column], incoming[c.column] = theirs, c.value
            elif c.column != conflict:
                # Older than ours: the incoming value loses (to our value, or to the delete hiding it).
                winner = mine if _visible(mine, new_tomb) else new_tomb
                assert winner is not None
                if not (winner is mine and existed and _same(before.get(c.column), c.value)):
                    losses.append((c.column, c.value, winner, theirs))
        if not incoming and not tomb_changed:
            self._record_losses(name, ck, losses)
            return None

        exists = any(_visible(cell, new_tomb) for cell in new_cells.values())
        after: dict[str, Value] = {}
        for col in columns:
            if col == conflict:
                after[col] = ck
            elif _visible(new_cells.get(col), new_tomb):
                after[col] = incoming[col] if col in incoming else before.get(col)
            else:
                after[col] = None

        # Losers among the values visible here before.
        for col in columns:
            mine = cells.get(col)
            if col == conflict or not existed or not _visible(mine, old_tomb):
                continue
            assert mine is not None
            newest = new_cells[col]
            if newest is not mine and _visible(newest, new_tomb):
                if not _same(before.get(col), after[col]):
                    losses.append((col, before.get(col), newest, mine))  # overwritten by a newer value
            elif new_tomb is not None and not _visible(newest, new_tomb):
                losses.append((col, before.get(col), new_tomb, mine))  # hidden by a newer delete
        # Incoming values that arrive already hidden by the delete lose to it.
        for col, value in incoming.items():
            if col != conflict and new_tomb is not None and not _visible(new_cells[col], new_tomb):
                losses.append((col, value, new_tomb, new_cells[col]))
        # A delete that newer values outlive.
        if tomb_changed and exists:
            assert in_tomb is not None
            newest_cell = max((cell for cell in new_cells.values() if _visible(cell, new_tomb)), key=lambda s: s.clock)
            losses.append((None, None, newest_cell, in_tomb))
        self._record_losses(name, ck, losses)

        # What to write to the table.
        pk: Value = current[0] if current is not None else None
        diff: tuple[str, ...] = ()
        if existed and exists:
            diff = tuple(c for c in columns if c != conflict and not _same(before.get(c), after[c]))
            write, op, announce = "update", OP_UPDATE, bool(diff)
        elif existed:
            write, op, announce = "delete", OP_DELETE, True
        elif exists:
            write, op, announce = "insert", OP_INSERT, True
        else:
            write, op, announce = "none", OP_DELETE, False  # a delete of a row never seen here: remembered, nothing to show

        # The new clocks go under one new local seq, so they travel on (relay).
        changed = tuple((col, new_cells[col]) for col in incoming)
        newest_clock = max([st.clock for _, st in changed] + ([in_tomb.clock] if tomb_changed and in_tomb is not None else []))
        return _SvPlan(table, ck, write, diff, after, pk, op, announce, newest_clock, changed,
                       in_tomb if tomb_changed else None, state)

    def _record_losses(self, table: str, ck: Value, losses: list[tuple[str | None, Value, _Stamp, _Stamp]]) -> None:
        for col, value, winner, loser in losses:
            self._conflict(table, ck, col, value, winner, loser)

    def _sv_write(self, plans: Sequence[_SvPlan], *, raw_text: bool = False) -> None:
        """Write ``plans`` (in order): the table rows, then one log seq per
        plan, its cells and tomb. Deletes go first, then updates, then
        inserts, so a unique value a batch moves between rows is free when
        its new row takes it. ``raw_text``: values may be TEXT that is not
        valid UTF-8 (row by row; the bulk path leaves such rows to it)."""
        bind = _bind if raw_text else lambda values: (["?"] * len(values), tuple(values))
        conn = self.conn
        deletes: dict[str, list[tuple[Value, ...]]] = {}
        updates: dict[str, list[tuple[Value, ...]]] = {}
        inserts: dict[str, list[tuple[Value, ...]]] = {}
        for plan in plans:
            sql = self._sv_sql(plan.table)
            if plan.write == "delete":
                deletes.setdefault(sql.delete, []).append((plan.ck,))
            elif plan.write == "update" and plan.diff:
                marks, params = bind([plan.after[c] for c in plan.diff])
                statement = sql.update_head + ", ".join(f"{quote_ident(c)} = {m}" for c, m in zip(plan.diff, marks)) + sql.update_tail
                updates.setdefault(statement, []).append((*params, plan.ck))
            elif plan.write == "insert":
                marks, params = bind([plan.after[c] for c in sql.columns])
                statement = sql.insert if all(m == "?" for m in marks) else f"{sql.insert_head}({', '.join(marks)})"
                inserts.setdefault(statement, []).append(params)
        for group in (deletes, updates, inserts):
            for statement, params in group.items():
                conn.executemany(statement, params)
        keys = {} if raw_text else self._inserted_keys(plans)
        top = capture.last_seq(conn)
        log_rows, tomb_rows = [], []
        writer = cells.Writer()
        for seq, plan in enumerate(plans, start=top + 1):
            tid, ck = plan.table.tid, plan.ck
            if plan.write == "insert":
                found = keys.get((tid, ck))
                plan.pk = found[0] if found is not None else conn.execute(self._sv_sql(plan.table).key, (ck,)).fetchone()[0]
                self.appended.add(tid)
            # No ck: only stamping reads it, of local rows; this row's clocks are in _p2p_rows/_p2p_cells.
            log_rows.append((seq, tid, plan.pk, plan.op, plan.newest[0], self._logged(plan.newest[1]), None))
            if plan.changed:
                stored = dict(plan.state.stored)
                for col, st in plan.changed:
                    stored[col] = (*self._row(st.clock), seq, *self._row(st.prev))
                writer.put(tid, ck, stored, plan.table.sync_columns, had_row=plan.state.had_row, had_cols=plan.state.had_cols)
            if plan.tomb is not None:
                tomb_rows.append((tid, ck, *self._row(plan.tomb.clock), seq, *self._row(plan.tomb.prev)))
            if plan.announce:
                self._announce(plan.newest[1], plan.table.info.name, plan.op, plan.pk)
        conn.executemany("INSERT INTO _p2p_log(seq, tid, pk, op, hlc, origin, ck) VALUES (?, ?, ?, ?, ?, ?, ?)", log_rows)
        writer.write(conn)
        conn.executemany(
            "INSERT INTO _p2p_tombs(tid, ck, hlc, origin, seq, prev_hlc, prev_origin) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(tid, ck) DO UPDATE SET hlc = excluded.hlc, origin = excluded.origin, seq = excluded.seq, "
            "prev_hlc = excluded.prev_hlc, prev_origin = excluded.prev_origin",
            tomb_rows,
        )

    def _inserted_keys(self, plans: Sequence[_SvPlan]) -> dict[tuple[int, Value], tuple[Value]]:
        """The local keys of the rows ``plans`` inserted, by (tid, ck): one IN
        query per table and chunk instead of a SELECT per row. Only for the
        bulk path, whose keys are of one type that the conflict column keeps
        distinct (``_keys_stay_distinct``), so a ck read back is the ck sent;
        a row it misses is looked up on its own by the caller."""
        by_table: dict[int, tuple[SyncTable, list[Value]]] = {}
        for plan in plans:
            if plan.write == "insert":
                by_table.setdefault(plan.table.tid, (plan.table, []))[1].append(plan.ck)
        found: dict[tuple[int, Value], tuple[Value]] = {}
        for tid, (table, cks) in by_table.items():
            sql = self._sv_sql(table).keys_many
            for i in range(0, len(cks), IN_CHUNK):
                chunk = cks[i:i + IN_CHUNK]
                for ck, pk in self.conn.execute(f"{sql} ({', '.join('?' * len(chunk))})", chunk):
                    found[(tid, ck)] = (pk,)
        return found

    # -- end of batch ------------------------------------------------------

    def finish(self) -> None:
        """Keep the rows we appended from being logged as local inserts later."""
        for tid in self.appended:
            table = self.state.tables.get(tid)
            if table is not None:
                capture.skip_appended_rows(self.conn, table)

    def result(self, last_seq: int, local: ChangeBatch) -> ApplyResult:
        return ApplyResult(self.applied, self.conflicts, self.failed, last_seq, local, self.remote)
