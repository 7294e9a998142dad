"""Rebuild a distributed table: drop this device's copy and pull it back from peers.

Seed 000 names two ways to bring a table to a new schema: *update* (change
it in place: an evolution that adds columns, store/evolutions.py) and
*rebuild* (throw the local copy away and fetch it again). Rebuild is for a
copy that went wrong here — a bad manual fix, a table an evolution could not
bring forward — while the peers hold good data.

What is dropped, inside one transaction:

- single_version: the table's rows and every clock, tomb and parked cell of
  it, and its entries in this store's change log. Nothing is logged as a
  delete, so nothing is sent: peers keep their rows. (The log keeps its last
  row whatever table it is of: seqs never go back, as with compaction.)
- collaborative: the other devices' copies (``dev_<ID>_<T>``) and their
  clocks. This device's own rows of the table stay: no peer is the
  authority for them (they would come back only from copies).

Then every watermark of the store is reset, so the next pull from each peer
sends its whole stream again (rows this device already holds are no-ops,
and a peer that forgot deletes sends a resync). The API method pulls from
every online trusted peer at once.

Refused (``RebuildRefused``) while a local change of the table is unsent:
no peer has acknowledged it, so dropping it would lose it for good.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from p2pstore.schema.predicates import quote_ident
from p2pstore.store import capture
from p2pstore.store.changes import SyncTable

#: The store's tables that hold metadata keyed by a table's tid (and the change log, below).
_BY_TID = ("_p2p_rows", "_p2p_cells", "_p2p_row_runs", "_p2p_tombs", "_p2p_parked", "_p2p_resync")


@dataclass(frozen=True, slots=True)
class Dropped:
    """What ``drop_copy`` removed: the tables emptied and their rows."""

    tables: tuple[str, ...]
    rows: int


def unsent_local(conn: sqlite3.Connection, table: SyncTable) -> int:
    """Local changes of ``table`` no peer has acknowledged (outside writes must be stamped first)."""
    stream = capture.stream_id(conn)
    acked = conn.execute("SELECT max(seq) FROM _p2p_acks WHERE stream = ?", (stream,)).fetchone()[0] or 0
    return int(conn.execute("SELECT count(*) FROM _p2p_log WHERE tid = ? AND origin IS NULL AND seq > ?",
                            (table.tid, acked)).fetchone()[0])


def drop_copy(conn: sqlite3.Connection, table: SyncTable) -> Dropped:
    """Empty what a rebuild of ``table`` fetches again and reset every
    watermark (inside the caller's write transaction; nothing is logged)."""
    if table.conflict_column is not None:
        targets = [(table.tid, table.info.name)]
    else:
        targets = [(int(tid), name) for tid, name in conn.execute(
            "SELECT tid, name FROM _p2p_tables WHERE kind = 'device' AND source = ?", (table.info.name,))]
    rows = 0
    top = capture.last_seq(conn)  # the log's last row stays, as compaction keeps it: seqs never go back
    conn.execute("INSERT INTO _p2p_apply(x) VALUES (1)")  # capture triggers stay quiet; device tables let sync write
    try:
        for tid, name in targets:
            rows += conn.execute(f"DELETE FROM {quote_ident(name)}").rowcount
            for meta in _BY_TID:
                conn.execute(f"DELETE FROM {meta} WHERE tid = ?", (tid,))
            conn.execute("DELETE FROM _p2p_log WHERE tid = ? AND seq < ?", (tid, top))
            # Rowids start again from 1: every row above 0 is new (capture's high-water mark; reload the capture state).
            conn.execute("UPDATE _p2p_hw SET hw = 0 WHERE tid = ?", (tid,))
    finally:
        conn.execute("DELETE FROM _p2p_apply")
    conn.execute("DELETE FROM _p2p_watermarks")
    conn.execute("DELETE FROM _p2p_granted")
    capture.set_meta(conn, capture.OWN_ROWS_LOST_KEY, 1)  # its own rows come back from peers: none may leave them out
    return Dropped(tuple(name for _, name in targets), rows)
