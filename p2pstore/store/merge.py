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

import dataclasses
import logging
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from p2pstore.clock import HybridClock, wall_ms
from p2pstore.errors import ConflictNotFound, FailureNotFound, ProtocolError
from p2pstore.protocol.batch import HLC, KEY, PREV_HLC, SINGLE_VERSION, TOMB_HLC, TOMB_PREV_HLC, VALUES, Block, Columns, has_raw_text
from p2pstore.schema.predicates import quote_ident
from p2pstore.store import capture, gc, modes, origins, policies
from p2pstore.store.blocks import top
from p2pstore.store.capture import OP_NAMES, CaptureState, ChangeBatch
from p2pstore.store.lww import Clock, RowFailed, Stamp, Target, bind
from p2pstore.store.changes import (
    OutBatch,
    RowChange,
    SyncTable,
    Value,
    decode_change,
    encode_change,
    is_raw_text,
    row_problem,
    sync_tables,
)

log = logging.getLogger(__name__)


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
    #: Row changes whose cells for columns this device lacks were kept (parked) for its upgrade.
    parked: int = 0
    #: Incoming values queued for a person to reconcile (store/policies.py), not applied.
    queued: int = 0
    #: This store's origin marks after the batch (``origin_marks``; single_version only).
    marks: tuple[tuple[str, int], ...] = ()

    def remote_devices(self) -> list[str]:
        return sorted(self.remote)

    def remote_change_infos(self) -> dict[str, list[dict[str, Any]]]:
        return {
            origin: [{"table": table, "type": "data", **lists} for table, lists in sorted(tables.items())]
            for origin, tables in sorted(self.remote.items())
        }


@dataclass(frozen=True, slots=True)
class Conflict:
    """One losing change (``column`` None: a row delete that lost), or a row
    conflict (``other_column`` set, ``detect: row``): an incoming edit of
    ``column`` (the winner) concurrent with this device's edit of
    ``other_column`` (the loser) — both values stayed."""

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
    other_column: str | None = None


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
    log_all: bool = True,
    lifted: dict[str, tuple[str, str]] | None = None,
    tables: Sequence[SyncTable] | None = None,
) -> ApplyResult:
    """Apply ``batch`` received from ``from_device`` atomically (see the module docstring).

    ``from_device`` is the authenticated peer, never a value from the batch.
    The connection must be in autocommit mode (``isolation_level=None``), as
    the store's is. ``log_all`` False: the set-based path logs only the last
    change of each block, the seq counter's (``_Applier.log_all``).
    ``lifted``: a large group's triggers lifted so far (``_Applier.lift``),
    which the caller must ``put_back`` before it commits. ``tables``: the
    store's distributed tables (``sync_tables``), if the caller read them in
    this transaction (a group reads them once: no batch changes them).
    """
    if not isinstance(from_device, str) or not from_device:
        raise ValueError("from_device must be a device ID")
    with _atomic(conn, state):
        local = capture.stamp(conn, state, clock, wall=wall)
        applier = _Applier(conn, state, clock, batch.mode, from_device, wall, tables, log_all=log_all, lifted=lifted)
        conn.execute("INSERT INTO _p2p_apply(x) VALUES (1)")
        # A batch that is one block goes set-based (store/blocks.py); any
        # other, or a block that path leaves, as row changes.
        if batch.blocks and (batch.rows or len(batch.blocks) > 1 or batch.snapshot_hlc is not None
                             or not apply_block(applier, batch.blocks[0], batch.columns_of(batch.blocks[0]))):
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
        result = applier.result(last, local)
        if batch.mode == SINGLE_VERSION:  # (only single_version streams relay: marks leave nothing else out)
            result = dataclasses.replace(result, marks=tuple(origin_marks(conn, clock.last)))
        return result


def put_back(conn: sqlite3.Connection, lifted: dict[str, tuple[str, str]]) -> None:
    """Create again the triggers a group lifted (``_Applier.lift``), but
    those a rolled-back savepoint put back already, or took away with their
    table (a device table made in it)."""
    for name, (table, sql) in lifted.items():
        if (conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?", (name,)).fetchone() is None
                and conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()):
            conn.execute(sql)
    lifted.clear()


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
    sql = "SELECT id, tbl, ck, col, losing_value, winner, winner_hlc, loser, loser_hlc, at, other_col FROM _p2p_conflicts"
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


def eager_position(conn: sqlite3.Connection, peer: str) -> tuple[int, str | None]:
    """Where in ``peer``'s stream every change the peer itself made is here
    — its watermark, or further on after pushes of its own changes only
    (``_advance_watermark``) — and the stream: where such a push starts."""
    row = conn.execute("SELECT max(received_seq, ifnull(eager_seq, 0)), stream FROM _p2p_watermarks WHERE peer = ?",
                       (peer,)).fetchone()
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
    """Move ``peer``'s watermark over ``batch`` if it continues the stream,
    and with it what this device holds of the peer's own changes
    (``origin_marks``): once a contiguous run of whole-stream batches
    reaches the end of the peer's stream (``more`` False), every change the
    peer wrote with a clock up to the newest clock in that run is here (or a
    newer state of its row) — it wrote them before it read that run, and
    what it writes later gets a newer clock than anything it had seen.
    Before the end, a row the sender changed again later is not in the
    batch (its newer state comes further on), so an older change of it,
    with a smaller clock, may not be here yet.

    A batch of the peer's own changes only (``batch.own``) moves the eager
    position instead, by the same rule, and the mark with it: each row it
    left out holds, there, a newer change that another device made, which
    comes from that device (or any other) as that device's change — an
    older change of the peer to that row, covered by the mark and left out
    by other senders, would lose to it anyway."""
    found = conn.execute("SELECT received_seq, stream, own_hlc, pending_hlc, eager_seq, eager_pending FROM _p2p_watermarks "
                         "WHERE peer = ?", (peer,)).fetchone()
    current, stream, own, pending, eager, eager_pending = found if found is not None else (0, None, None, None, None, None)
    if stream != batch.stream:
        # another stream (the sender's store is new or restored): its seqs start over
        current, own, pending, eager, eager_pending = 0, None, None, None, None
    resynced = batch.snapshot_hlc is not None and not batch.more  # a resync moves it once, at its end (store/gc.py)
    whole = batch.full and batch.snapshot_hlc is None
    if whole and batch.since_seq <= current:
        _take_grants(conn, batch, batch.last_seq)  # (all of the stream up to last_seq is here)
    elif (batch.own or whole) and batch.since_seq <= max(current, eager or 0):
        _take_grants(conn, batch, current)  # (an own push, on from where the last one ended)
    if resynced or (whole and batch.since_seq <= current < batch.last_seq):
        if not resynced:
            pending = max(pending or 0, _newest(batch)) or None
            if not batch.more and pending is not None:
                own = max(own or 0, pending)
        _save_position(conn, peer, batch.last_seq, batch.stream, own, pending, eager, eager_pending)
        return batch.last_seq
    # A batch of an own push: one that left relayed rows out, or a whole one (it holds all of the
    # sender's own changes too) that starts past the watermark, where an earlier own push ended.
    at = max(current, eager or 0)
    if (batch.own or whole) and batch.since_seq <= at < batch.last_seq:
        eager_pending = max(eager_pending or 0, _newest(batch)) or None
        if not batch.more and eager_pending is not None:
            own = max(own or 0, eager_pending)
        _save_position(conn, peer, current, batch.stream, own, pending, batch.last_seq, eager_pending)
    return int(current)


def _take_grants(conn: sqlite3.Connection, batch: OutBatch, held_to: int) -> None:
    """The origin marks the last batch of an eager push grants (protocol 5,
    ``OutBatch.grants``), where they hold: the push ran here to its end,
    contiguously (the caller checked), and this device holds the sender's
    stream whole up to ``held_to`` — so also up to each grant's ``from_seq``,
    after which the sender pushed every change of that device to it."""
    if batch.more:
        return
    me = capture.device_id(conn)
    for g in batch.grants:
        if g.from_seq <= held_to and g.device != me:
            conn.execute("INSERT INTO _p2p_granted(device, hlc) VALUES (?, ?) ON CONFLICT(device) DO UPDATE "
                         "SET hlc = max(hlc, excluded.hlc)", (g.device, g.hlc))


def _save_position(conn: sqlite3.Connection, peer: str, *values: Any) -> None:
    conn.execute(
        "INSERT INTO _p2p_watermarks(peer, received_seq, stream, own_hlc, pending_hlc, eager_seq, eager_pending) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(peer) DO UPDATE SET received_seq = excluded.received_seq, "
        "stream = excluded.stream, own_hlc = excluded.own_hlc, pending_hlc = excluded.pending_hlc, "
        "eager_seq = excluded.eager_seq, eager_pending = excluded.eager_pending",
        (peer, *values),
    )


def _newest(batch: OutBatch) -> int:
    """The newest clock among ``batch``'s cells and tombs (0: none)."""
    hlcs = [c.hlc for r in batch.rows for c in r.cells]
    hlcs += [r.tomb_hlc for r in batch.rows if r.tomb_hlc is not None]
    for block in batch.blocks:
        columns = batch.columns_of(block)
        if columns is not None:  # (as decoded: no pass over the rows)
            hlcs += (top(columns.fields[HLC]), top(columns.fields[TOMB_HLC]))
        else:
            hlcs += (top(list(map(_ROW_HLC, block.rows))), top(list(map(_TOMB_HLC, block.rows))))
    return max(hlcs, default=0)


_ROW_HLC, _TOMB_HLC = itemgetter(HLC), itemgetter(TOMB_HLC)


def origin_marks(conn: sqlite3.Connection, newest_own: int) -> list[tuple[str, int]]:
    """What this device holds per origin (protocol ``OriginMark``): of each
    peer whose stream it took whole up to its end, every change that peer
    wrote up to the newest clock in it (``_advance_watermark``); and of itself, everything
    up to ``newest_own`` (the clock's last value), unless it ever dropped
    rows of its own (``capture.OWN_ROWS_LOST_KEY``). A sender leaves out rows whose
    every clock is covered (store/stream.py): in a fleet, most of a
    device's stream was relayed, and its peers had it from the writer."""
    me = capture.device_id(conn)
    marks = [(peer, hlc) for peer, hlc in sorted(capture.held_marks(conn).items()) if peer != me]
    if newest_own > 0 and not capture.get_meta(conn, capture.OWN_ROWS_LOST_KEY):
        marks.append((me, newest_own))
    return marks


def _observe(conn: sqlite3.Connection, clock: HybridClock, newest: int, wall: int | None) -> None:
    if newest > 0:
        clock.observe(newest, wall)
        capture.set_meta(conn, "hlc_last", clock.last)


# --------------------------------------------------------------------------
# The merge


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


def settle(conn: sqlite3.Connection, state: CaptureState, clock: HybridClock, entry_id: int, take: str, value: Value = None, *,
           wall: int | None = None) -> dict[str, Any]:
    """Settle queued entry ``entry_id`` of a manual policy's reconciler
    (store/policies.py) inside the caller's transaction: resolved as the
    person chose (``policies.resolve``) — or, if its row was deleted since,
    *released*: its change merged under its own clock, as every lww device
    merged it (there is no value here left to choose). The entry, with the
    value written (``released``: True instead) and the number still queued."""
    e = policies.entry(conn, entry_id)
    if e is None:
        raise ConflictNotFound(f"no queued conflict {entry_id}", data={"id": entry_id})
    (table,) = sync_tables(conn, e["table"])
    assert table.conflict_column is not None
    row = policies.held(conn, table, e)
    if row is None:
        batch = OutBatch(table.mode.value, 0, 0, (policies.released(e, table.conflict_column),), False, False)
        apply_batch(conn, state, clock, batch, e["remote_origin"], wall=wall)
        done = {**e, "value": None, "released": True}
    else:
        done = {**e, "value": policies.resolve(conn, clock, table, e, row, take, value, wall=wall)}
    conn.execute("DELETE FROM _p2p_queue WHERE id = ?", (entry_id,))
    return {**done, "queued": policies.queued(conn)}


def apply_block(ap: _Applier, block: Block, columns: Columns | None = None) -> bool:
    """Apply ``block`` set-based (store/blocks.py; the table type writes it),
    or return False having changed nothing. ``columns``: its rows column by
    column, if ``decode`` kept them (``OutBatch.columns_of``)."""
    table = ap.tables.get(block.table)
    if table is None or table.mode != ap.mode or block.key_column != table.key_column or block.table in ap.decides:
        return False  # (a table whose conflicts this device decides: row by row, where they are queued or decided)
    if columns is None:
        columns = Columns.of(block)
    fields = columns.fields
    keys = fields[KEY]
    kinds = set(map(type, keys))
    if len(kinds) != 1 or not kinds <= {int, str} or len(set(keys)) != len(keys):
        return False
    newest = max(top(fields[HLC]), top(fields[TOMB_HLC]))
    if max(newest, top(fields[PREV_HLC]), top(fields[TOMB_PREV_HLC])) > ap.clock_limit:
        return False  # the row path logs it as clock_ahead
    if columns.raw_text and any(map(has_raw_text, fields[VALUES:], columns.kinds)):
        return False  # the row path binds it as the bytes it is
    conn = ap.conn
    conn.execute("SAVEPOINT p2p_block")
    try:
        done = modes.of(ap.mode).write_block(ap, block, columns, kinds.pop())
    except sqlite3.Error:
        if not conn.in_transaction:  # SQLite rolled it all back (disk full, I/O error)
            raise
        done = None
    if done is None:
        if conn.in_transaction:
            conn.execute("ROLLBACK TO p2p_block")
            conn.execute("RELEASE p2p_block")
        ap.origins.reload(conn)
        ap.targets.clear()  # a device table created in the savepoint is gone
        return False
    conn.execute("RELEASE p2p_block")
    applied, remote, appended = done
    ap.applied += applied
    ap.max_hlc = max(ap.max_hlc, newest)
    for origin, table_name, op, keys in remote:
        ap.announce(origin, table_name, op, *keys)
    if appended is not None:
        ap.appended.add(appended)
    return True


class _Applier:
    """Applies the row changes of one batch (or one retried failure)."""

    def __init__(self, conn: sqlite3.Connection, state: CaptureState, clock: HybridClock, mode: str, sender: str,
                 wall: int | None, tables: Sequence[SyncTable] | None = None, *, log_all: bool = True,
                 lifted: dict[str, tuple[str, str]] | None = None) -> None:
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
        self.tables = {t.info.name: t for t in (sync_tables(conn) if tables is None else tables)}
        self.targets: dict[str, Target] = {}
        self.sql: dict[str, Any] = {}  # statements a table type builds once per batch (single_version.statements)
        self.appended: set[int] = set()
        self.applied = self.conflicts = self.failed = 0
        #: Row changes with cells kept for columns this device lacks (``park``): not failures.
        self.parked = 0
        #: Every table's policy that is not plain lww (store/policies.py); those whose conflicts this
        #: device decides (the manual reconciler, the priority arbiter), and the entries queued.
        self.policies = policies.load(conn)
        self.decides = {t: p for t, p in self.policies.items() if p.decider == self.me}
        self.queued = 0
        self.max_hlc = 0
        self.remote: dict[str, dict[str, dict[str, list[Any]]]] = {}
        #: Whether a block written set-based logs every change it applies. A
        #: received change's log row is history only (the stream sends a
        #: received row from its table and row clock, never from the log), and
        #: a large group's compaction drops all but the newest
        #: ``compact_keep_recent`` in the same transaction; so a batch of such
        #: a group with that many rows after it logs only its blocks' last
        #: change, which keeps the seq counter (``capture.last_seq``)
        #: (store/database.py ``apply_changes_group``).
        self.log_all = log_all
        #: A large group's triggers lifted (``lift``): name -> (table, SQL); None: none are.
        self.lifted = lifted

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
            target = self.target(row.table)
            changed = modes.of(self.mode).merge_row(self, target, row)
        except (RowFailed, sqlite3.Error) as exc:
            reason = exc.reason if isinstance(exc, RowFailed) else _sqlite_reason(exc)
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

    def lift(self, table: str) -> None:
        """In a large group (``lifted`` not None), drop the store's own
        INSERT triggers on ``table`` — its capture trigger and its read-only
        guard: both do nothing while a batch applies (they test
        ``_p2p_apply``), yet SQLite runs a trigger program for every row
        written, which costs more than the row's own insert (a 2,000-row
        block: 0.9 ms of 1.5). Their SQL is kept to ``put_back`` before the
        group commits: no other connection can write meanwhile (the group
        holds the write lock), nor ever sees them gone (DDL is
        transactional: a rollback puts them back too)."""
        if self.lifted is None:
            return
        for name in (capture.trigger_names(table)[0], capture.read_only_trigger_names(table)[0]):
            if name in self.lifted:
                continue
            found = self.conn.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?", (name,)).fetchone()
            if found is not None:
                self.conn.execute(f"DROP TRIGGER {quote_ident(name)}")
                self.lifted[name] = (table, found[0])

    def target(self, name: str) -> Target:
        target = self.targets.get(name)
        if target is not None:
            return target
        table = self.tables.get(name)
        if table is None:
            raise RowFailed(f"not_distributed: table {name} is not a distributed table here")
        if table.mode != self.mode:
            raise RowFailed(f"schema_mismatch: {name} is {table.mode} here, {self.mode} on {self.sender}")
        target = modes.of(self.mode).target(self, table)
        self.targets[name] = target
        return target

    def log_change(self, tid: int, pk: Value, op: int, clock: Clock, ck: Value) -> int:
        cursor = self.conn.execute(
            "INSERT INTO _p2p_log(tid, pk, op, hlc, origin, ck) VALUES (?, ?, ?, ?, ?, ?)",
            (tid, pk, op, clock[0], self.logged(clock[1]), ck),
        )
        return int(cursor.lastrowid or 0)

    def announce(self, origin: str, table: str, op: int, *keys: Value) -> None:
        lists = self.remote.setdefault(origin, {}).setdefault(table, {"inserted": [], "updated": [], "deleted": []})
        lists[OP_NAMES[op]].extend(keys)

    def conflict(self, table: str, ck: Value, col: str | None, value: Value, winner: Stamp, loser: Stamp,
                 other_col: str | None = None) -> None:
        """Log ``loser`` unless its loss was no conflict: a device superseding
        its own change, or a winner written by a device that had already
        seen the loser (or something newer). ``other_col``: a row conflict
        (``detect: row``): ``loser`` is the cell of that column here, which
        stays, as does ``winner``, the incoming cell of ``col``."""
        if winner.clock[1] == loser.clock[1] or (winner.prev is not None and loser.clock <= winner.prev):
            return
        (mark,), (param,) = bind([value])
        cursor = self.conn.execute(
            "INSERT OR IGNORE INTO _p2p_conflicts(tbl, ck, col, losing_value, winner, winner_hlc, loser, loser_hlc, at, "
            f"other_col) VALUES (?, ?, ?, {mark}, ?, ?, ?, ?, ?, ?)",
            (table, ck, col, param, winner.clock[1], winner.clock[0], loser.clock[1], loser.clock[0], self.now(), other_col),
        )
        self.conflicts += cursor.rowcount

    def decision(self, *clocks: Clock) -> Stamp:
        """The stamp of a value this device writes to settle concurrent
        ``clocks`` (a priority arbiter's decision): newer than all of them —
        this device has seen them all — with the newest as the ``prev`` it
        supersedes, so every other device takes it as an ordinary later
        edit and logs no conflict for it (store/policies.py)."""
        newest = max(clocks)
        self.clock.observe(newest[0], self.wall)
        hlc = self.clock.now(self.wall)
        self.max_hlc = max(self.max_hlc, hlc)
        return Stamp((hlc, self.me), newest)

    def local(self, origin: int | None) -> str:
        """A stored origin as a device ID (store/origins.py)."""
        return self.me if origin is None else self.origins.device(origin)

    def prev(self, hlc: int | None, origin: int | None) -> Clock | None:
        return None if hlc is None else (hlc, self.local(origin))

    def stored_clock(self, clock: Clock | None) -> tuple[int | None, int | None]:
        """A clock as stored: (hlc, origin number), origin NULL for this device."""
        return (None, None) if clock is None else (clock[0], self.stored(clock[1]))

    def stored(self, origin: str) -> int | None:
        return None if origin == self.me else self.origins.number(self.conn, origin)

    def logged(self, origin: str) -> int:
        """A received change's origin in ``_p2p_log``: always a number, even
        ours relayed back (NULL there means a change captured here)."""
        return self.origins.number(self.conn, origin)


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
            if row.table in self.decides:
                return False  # row by row queues or decides its conflicts (store/policies.py)
            if self._clock_ahead(row) is not None:
                return False  # row by row logs it as a failure
            if any(is_raw_text(c.value) for c in row.cells):
                return False  # row by row binds it (_bind)
            if row.key_column != table.key_column:
                return False
            if type(row.key) not in (int, str) or types.setdefault(row.table, type(row.key)) is not type(row.key):
                return False
            keys.setdefault(row.table, []).append(row.key)
        if any(len(set(k)) != len(k) for k in keys.values()):
            return False
        conn = self.conn
        conn.execute("SAVEPOINT p2p_bulk")
        try:
            done = modes.of(self.mode).merge_bulk(self, rows, keys, types)
        except sqlite3.Error:
            if not conn.in_transaction:  # SQLite rolled it all back (disk full, I/O error)
                raise
            done = False
        if not done:
            _rollback_to(conn, "p2p_bulk")
            self.origins.reload(conn)
            self.targets.clear()  # device tables created in the savepoint are gone
            self.applied = self.conflicts = self.parked = self.queued = 0
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


    def stamp(self, hlc: int, origin: int | None, prev_hlc: int | None, prev_origin: int | None) -> Stamp:
        return Stamp((hlc, self.local(origin)), self.prev(prev_hlc, prev_origin))


    # -- end of batch ------------------------------------------------------

    def finish(self) -> None:
        """Keep the rows we appended from being logged as local inserts later."""
        for tid in self.appended:
            table = self.state.tables.get(tid)
            if table is not None:
                capture.skip_appended_rows(self.conn, table)

    def result(self, last_seq: int, local: ChangeBatch) -> ApplyResult:
        return ApplyResult(self.applied, self.conflicts, self.failed, last_seq, local, self.remote, self.parked, self.queued)
