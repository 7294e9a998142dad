"""Bounded sync state: per-peer acks, forgetting deletes, and the resync.

Without this, a single_version store keeps a tomb for every row ever
deleted, and a collaborative store its own change log for ever (the stream
reads each key's newest change from it). Both are needed only until every
peer has applied them:

- **Acks.** A sender learns each peer's position in its stream: the
  watermark the peer reports when a session opens (``SyncReady`` /
  ``SyncOpen``) and the one it acks after the last batch. ``record_ack``
  keeps it in ``_p2p_acks`` with the time it was reported. Under-reporting
  is safe (it only holds compaction back), so it is recorded once at the
  start and once at the end of a session, not per batch.
- **Forgetting** (``collect``): below the lowest ack of the *holding* peers
  (trusted ones that acked within the horizon; the daemon names them), a
  collaborative store drops its own log rows and a single_version store the
  tombs of rows that are gone, with their cells. ``_p2p_meta`` keeps
  ``gc_seq`` (the highest seq forgotten) and ``gc_hlc`` (the newest clock
  forgotten). The highest seq and the newest ``keep_recent`` log rows stay.
- **Resync.** A peer whose position is below ``gc_seq`` may lack deletes
  this store no longer has (it was away past the horizon, untrusted, or
  new). The sender then sends a *snapshot* of its whole state instead of the
  stream (``resync_hlc``, ``snapshot_batch``), and the receiver, at its last
  batch, removes what the snapshot did not hold (``sweep``): the rows of the
  sender's device table that are not in it (collaborative), the rows
  whose every value is older than ``gc_hlc`` and that the sender does not
  hold (single_version; the receiver's own values the sender never acked
  are kept). Only then does the watermark move. A single_version store also
  refuses to *receive* from such a peer until it was resynced
  (``must_resync_first``): its stream may carry values of rows deleted here
  whose tombs are gone.

See docs/sync.md, "Bounded tombstones and the resync".
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

from p2pstore.schema.predicates import quote_ident
from p2pstore.store import capture, cells, row_runs
from p2pstore.store.capture import CaptureState, get_meta, set_meta
from p2pstore.store.changes import (
    COLLABORATIVE,
    IN_CHUNK,
    ROW_CLOCK_COLUMN,
    SINGLE_VERSION,
    Cell,
    OutBatch,
    RowChange,
    read_snapshot,
    stable_bound,
    store_mode,
    sync_tables,
)
from p2pstore.store.stream import changes_since
from p2pstore.store.tables import device_table_name

#: ``_p2p_meta``: acked records up to here were looked at by ``collect``.
GC_MARK_KEY = "gc_mark"
#: ``_p2p_meta``: the highest seq of a forgotten record (0: nothing forgotten).
GC_SEQ_KEY = "gc_seq"
#: ``_p2p_meta``: the newest clock (hlc) of a forgotten record.
GC_HLC_KEY = "gc_hlc"
#: Records one ``collect`` looks at (one transaction).
GC_CHUNK = 20_000


def gc_seq(conn: sqlite3.Connection) -> int:
    return int(get_meta(conn, GC_SEQ_KEY, 0))


def gc_hlc(conn: sqlite3.Connection) -> int:
    return int(get_meta(conn, GC_HLC_KEY, 0))


# --------------------------------------------------------------------------
# Acks


def record_ack(conn: sqlite3.Connection, peer: str, seq: int, stream: str | None, at: int) -> None:
    """``peer`` reported (at unix ms ``at``) having applied this store's
    stream ``stream`` up to ``seq``. In the same stream an ack never goes
    back (a late report of an older position changes only the time)."""
    conn.execute(
        "INSERT INTO _p2p_acks(peer, seq, stream, at) VALUES (?, ?, ?, ?) ON CONFLICT(peer) DO UPDATE SET "
        "seq = CASE WHEN _p2p_acks.stream IS excluded.stream THEN max(_p2p_acks.seq, excluded.seq) ELSE excluded.seq END, "
        "stream = excluded.stream, at = max(_p2p_acks.at, excluded.at)",
        (peer, seq, stream, at),
    )


def acked(conn: sqlite3.Connection, peer: str) -> int:
    """How far ``peer`` confirmed this store's current stream (0: not at all)."""
    row = conn.execute("SELECT seq, stream FROM _p2p_acks WHERE peer = ?", (peer,)).fetchone()
    return int(row[0]) if row is not None and row[1] == capture.stream_id(conn) else 0


def ack_of(conn: sqlite3.Connection, peer: str) -> tuple[int, str | None]:
    """``peer``'s recorded position in this store's stream: (seq, stream), (0, None) if none."""
    row = conn.execute("SELECT seq, stream FROM _p2p_acks WHERE peer = ?", (peer,)).fetchone()
    return (int(row[0]), row[1]) if row is not None else (0, None)


def ack_floor(conn: sqlite3.Connection, holders: Iterable[str], not_before: int) -> int:
    """The seq every holding peer has applied: the lowest ack of the peers in
    ``holders`` that acked at or after ``not_before`` (unix ms). A peer that
    acked another stream of ours (we renewed it) counts as 0. With no
    holding peer, the whole stream."""
    stream = capture.stream_id(conn)
    floor = capture.last_seq(conn)
    wanted = set(holders)
    for peer, seq, peer_stream, at in conn.execute("SELECT peer, seq, stream, at FROM _p2p_acks"):
        if peer in wanted and at >= not_before:
            floor = min(floor, seq if peer_stream == stream else 0)
    return floor


# --------------------------------------------------------------------------
# Forgetting


def collect(conn: sqlite3.Connection, state: CaptureState, acked_seq: int, *, keep_recent: int = 0,
            chunk: int = GC_CHUNK) -> int:
    """Forget what every holding peer has applied (``acked_seq``): the number
    of records dropped. Call in a write transaction, after ``capture.stamp``.

    collaborative: this device's own log rows up to ``acked_seq`` (but never
    the highest seq, nor the newest ``keep_recent`` rows). single_version:
    the tombs up to ``acked_seq`` of rows that are gone, with all their
    cells, unless a cell changed after ``acked_seq``. Repeated calls walk on
    from where the last stopped (``GC_MARK_KEY``).
    """
    top = capture.last_seq(conn)
    low = int(get_meta(conn, GC_MARK_KEY, 0))
    bound = min(acked_seq, state.stamped_seq)
    if store_mode(conn) == COLLABORATIVE:
        return _collect_log(conn, low, min(bound, top - 1, top - keep_recent), chunk)
    return _collect_tombs(conn, state, low, bound, chunk)


def _forgot(conn: sqlite3.Connection, seq: int | None, hlc: int | None) -> None:
    if seq is not None:
        set_meta(conn, GC_SEQ_KEY, max(gc_seq(conn), int(seq)))
    if hlc is not None:
        set_meta(conn, GC_HLC_KEY, max(gc_hlc(conn), int(hlc)))


def _collect_log(conn: sqlite3.Connection, low: int, bound: int, chunk: int) -> int:
    if bound <= low:
        return 0
    end = conn.execute(
        "SELECT max(seq) FROM (SELECT seq FROM _p2p_log WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?)", (low, bound, chunk)
    ).fetchone()[0]
    if end is None:
        set_meta(conn, GC_MARK_KEY, bound)
        return 0
    newest = conn.execute("SELECT max(seq) FROM _p2p_log WHERE seq > ? AND seq <= ? AND origin IS NULL", (low, end)).fetchone()[0]
    hlc = None
    if newest is not None:
        hlc = conn.execute(f"SELECT {capture.hlc_sql('?1')}", (newest,)).fetchone()[0]
    dropped = conn.execute("DELETE FROM _p2p_log WHERE seq > ? AND seq <= ? AND origin IS NULL", (low, end)).rowcount
    capture.drop_unused_stamps(conn, low, end)
    if dropped:
        _forgot(conn, newest, hlc)
    set_meta(conn, GC_MARK_KEY, end)
    return dropped


def _collect_tombs(conn: sqlite3.Connection, state: CaptureState, low: int, bound: int, chunk: int) -> int:
    if bound <= low:
        return 0
    seqs = [r[0] for r in conn.execute(
        "SELECT seq FROM _p2p_tombs INDEXED BY _p2p_tombs_seq WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?", (low, bound, chunk))]
    end = seqs[-1] if len(seqs) == chunk else bound
    dropped = 0
    for table in state.tables.values():
        if table.conflict_column is None:
            continue
        name, ck = quote_ident(table.info.name), quote_ident(table.conflict_column)
        gone = conn.execute(
            "SELECT t.ck, t.hlc, t.seq FROM _p2p_tombs t INDEXED BY _p2p_tombs_seq WHERE t.seq > ?1 AND t.seq <= ?2 AND t.tid = ?3 "
            f"AND NOT EXISTS (SELECT 1 FROM {name} WHERE {ck} = t.ck) "
            "AND NOT EXISTS (SELECT 1 FROM _p2p_cells c WHERE c.tid = t.tid AND c.ck = t.ck AND c.seq > ?4)",
            (low, end, table.tid, bound),
        ).fetchall()
        if not gone:
            continue
        keys = [(table.tid, g[0]) for g in gone]
        conn.executemany("DELETE FROM _p2p_tombs WHERE tid = ? AND ck = ?", keys)
        conn.executemany("DELETE FROM _p2p_cells WHERE tid = ? AND ck = ?", keys)  # (a row not in the table has no row clock)
        _forgot(conn, max(g[2] for g in gone), max(g[1] for g in gone))
        dropped += len(gone)
    set_meta(conn, GC_MARK_KEY, end)
    return dropped


# --------------------------------------------------------------------------
# The resync, sender side


def resync_hlc(conn: sqlite3.Connection, start: int, since: int, stream: str | None) -> int | None:
    """None if a peer at ``since`` in ``stream`` (``start``: where
    ``changes.start_position`` put it) can be sent the stream; otherwise it
    must be resynced, and this is the newest clock forgotten (``gc_hlc``).

    A single_version peer that never received anything from us (0, no
    stream) holds no row of ours that we deleted (relayed copies are
    guarded by the relaying peers' own tombs): the stream from 0 is enough.
    A collaborative one needs the snapshot: rows whose log rows are
    forgotten are only in the table.
    """
    if start >= gc_seq(conn):
        return None
    if store_mode(conn) == SINGLE_VERSION and since == 0 and stream is None:
        return None
    return gc_hlc(conn)


def must_resync_first(conn: sqlite3.Connection, peer: str) -> bool:
    """single_version: ``peer`` last reported a position in our stream below
    what we forgot, so its own stream may carry values of rows we deleted
    (and no longer have the tombs of): receive nothing from it until it was
    resynced from us."""
    if store_mode(conn) != SINGLE_VERSION or gc_seq(conn) == 0:
        return False
    row = conn.execute("SELECT seq, stream FROM _p2p_acks WHERE peer = ?", (peer,)).fetchone()
    return row is not None and row[1] == capture.stream_id(conn) and int(row[0]) < gc_seq(conn)


#: Where a snapshot read goes on: (stream bound at its start, table index, last key sent) for
#: collaborative stores, (seq, None, None) for single_version ones.
Cursor = tuple[int, int, Any]


def snapshot_batch(conn: sqlite3.Connection, cursor: Cursor | None, snapshot_hlc: int, *, limit: int,
                   max_bytes: int | None = None) -> tuple[OutBatch, Cursor]:
    """The next batch of a resync (``cursor`` None: the first) and where the next starts.

    single_version: the stream from seq 0 (all cells and the tombs still
    kept are the whole state). collaborative: the tables' current rows in
    key order, each with the clock of its newest change still in the log,
    or ``snapshot_hlc`` (at least its true clock, below any later change's).
    The batch's ``last_seq`` is the stream bound when the resync started,
    where the receiver's watermark goes at its end.
    """
    first = cursor is None
    with read_snapshot(conn):
        if store_mode(conn) == SINGLE_VERSION:
            since = 0 if cursor is None else cursor[0]
            batch = changes_since(conn, None, since, limit=limit, max_bytes=max_bytes, columnar=False)
            return (OutBatch(batch.mode, batch.since_seq, batch.last_seq, batch.rows, batch.more, True, batch.stream,
                             snapshot_hlc, first), (batch.last_seq, 0, None))
        bound, index, last_key = cursor if cursor is not None else (stable_bound(conn), 0, None)
        me = capture.device_id(conn)
        tables = sync_tables(conn)
        rows: list[RowChange] = []
        while index < len(tables) and len(rows) < limit:
            t = tables[index]
            key = t.info.key_expr
            cols = ", ".join(quote_ident(c) for c in t.info.columns)
            sql = f"SELECT {key}, {cols} FROM {quote_ident(t.info.name)}"
            page = conn.execute(sql + (f" WHERE {key} > ?" if last_key is not None else "") + f" ORDER BY {key} LIMIT ?",
                                ((last_key,) if last_key is not None else ()) + (limit - len(rows),)).fetchall()
            clocks = _newest_clocks(conn, t.tid, [p[0] for p in page])
            for pk, *values in page:
                hlc = clocks.get(pk, snapshot_hlc)
                rows.append(RowChange(t.info.name, t.key_column, pk, 0, tuple(Cell(c, v, hlc, me) for c, v in zip(t.info.columns, values))))
            if len(rows) < limit:
                index, last_key = index + 1, None
            else:
                last_key = page[-1][0]
        more = index < len(tables)
        batch = OutBatch(COLLABORATIVE, 0, bound, tuple(rows), more, True, capture.stream_id(conn), snapshot_hlc, first)
        return batch, (bound, index, last_key)


def _newest_clocks(conn: sqlite3.Connection, tid: int, keys: list[Any]) -> dict[Any, int]:
    """The clock of each key's newest local change still in the log."""
    found: dict[Any, int] = {}
    for i in range(0, len(keys), IN_CHUNK):
        chunk = keys[i:i + IN_CHUNK]
        for pk, hlc in conn.execute(
            f"SELECT l.pk, {capture.hlc_sql('l.seq')} FROM _p2p_log l WHERE l.seq IN (SELECT max(seq) FROM _p2p_log "
            f"WHERE tid = ? AND origin IS NULL AND pk IN ({', '.join('?' * len(chunk))}) GROUP BY pk)",
            (tid, *chunk),
        ):
            if hlc is not None:
                found[pk] = int(hlc)
    return found


# --------------------------------------------------------------------------
# The resync, receiver side (called by merge.apply_batch in its transaction)


def mark(conn: sqlite3.Connection, peer: str, batch: OutBatch) -> None:
    """Remember the keys a resync batch delivered (the first forgets an unfinished resync)."""
    if batch.snapshot_first:
        conn.execute("DELETE FROM _p2p_resync WHERE peer = ?", (peer,))
    tids = {name: tid for tid, name in conn.execute("SELECT tid, name FROM _p2p_tables WHERE kind = 'local'")}
    conn.executemany("INSERT OR IGNORE INTO _p2p_resync(peer, tid, ck) VALUES (?, ?, ?)",
                     [(peer, tids[r.table], r.key) for r in batch.rows if r.table in tids])


def sweep(conn: sqlite3.Connection, peer: str, batch: OutBatch) -> int:
    """At the end of a resync from ``peer``: remove what its snapshot did not
    hold (see the module docstring); the number of rows removed."""
    assert batch.snapshot_hlc is not None
    removed = 0
    marks = "SELECT ck FROM _p2p_resync WHERE peer = ? AND tid = ?"
    for t in sync_tables(conn):
        if t.mode == COLLABORATIVE:
            found = conn.execute("SELECT tid FROM _p2p_tables WHERE name = ? AND kind = 'device'",
                                 (device_table_name(peer, t.info.name),)).fetchone()
            if found is None:
                continue
            dest = quote_ident(device_table_name(peer, t.info.name))
            key = quote_ident(t.info.key or capture.DEVICE_ROWID_COLUMN)
            row_runs.spell_out(conn, found[0])  # (its rows' clocks one by one: some go)
            removed += conn.execute(f"DELETE FROM {dest} WHERE {key} NOT IN ({marks})", (peer, t.tid)).rowcount
            conn.execute(f"DELETE FROM _p2p_cells WHERE tid = ? AND col = ? AND ck NOT IN ({marks})",
                         (found[0], ROW_CLOCK_COLUMN, peer, t.tid))
        else:
            assert t.conflict_column is not None
            name, ck = quote_ident(t.info.name), quote_ident(t.conflict_column)
            # Kept: a row with a clock newer than the snapshot, or one of this device's own not yet acked.
            newer = "(c.hlc > ?4 OR (c.origin IS NULL AND c.seq > ?5))"
            found = conn.execute(
                f"SELECT x.{ck}, x.{t.info.key_expr} FROM {name} x WHERE x.{ck} NOT IN (SELECT ck FROM _p2p_resync WHERE peer = ?1 AND tid = ?2) "
                f"AND NOT EXISTS (SELECT 1 FROM _p2p_cells c WHERE c.tid = ?3 AND c.ck = x.{ck} AND {newer}) "
                f"AND NOT EXISTS (SELECT 1 FROM _p2p_rows c WHERE c.tid = ?3 AND {cells.same_key('c.pk', 'x.' + t.info.key_expr)} AND {newer})",
                (peer, t.tid, t.tid, batch.snapshot_hlc, acked(conn, peer)),
            ).fetchall()
            gone = [k for k, _ in found]
            conn.executemany(f"DELETE FROM {name} WHERE {ck} = ?", [(k,) for k in gone])
            conn.executemany("DELETE FROM _p2p_cells WHERE tid = ? AND ck = ?", [(t.tid, k) for k in gone])
            conn.executemany("DELETE FROM _p2p_rows WHERE tid = ? AND pk = ?", [(t.tid, pk) for _, pk in found])
            conn.executemany("DELETE FROM _p2p_tombs WHERE tid = ? AND ck = ?", [(t.tid, k) for k in gone])
            removed += len(gone)
    conn.execute("DELETE FROM _p2p_resync WHERE peer = ?", (peer,))
    return removed
