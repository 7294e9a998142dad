"""A store file restored from a backup: telling it at open, and catching up.

A backup is an older copy of the store: its change log ends at the seq it
had then, while peers hold watermarks (and, collaborative, copies of this
device's rows) beyond it. Left alone, the restored file would send its old
rows again (rows deleted since come back: resurrection), miss the rows it
wrote after the backup (peers keep them in their device table for us, and
rows never travel back to their owner), and give new writes seqs peers
believe they have (skipped).

Invariants:

- **Incarnation.** The store's stream ID (``capture.stream_id``) is its
  incarnation. The *state file* beside the store (``<store>.db.p2pstate``,
  in the data dir, never in a backup) holds the stream ID and the highest
  seq this device may have shown a peer; it is written (atomically, then
  fsynced) before a batch of the stream leaves, and at close. At open, a
  file whose stream differs from the state file's, or whose log ends below
  the state file's seq, was restored or copied in: it takes a new stream
  (``mark_restored``), so every peer reads it again from seq 0 and no new
  write is skipped. A missing state file (first open with this release, a
  new machine) detects nothing: then the peer-side check of
  ``changes.start_position`` (a peer holds a seq the file never reached)
  fires instead, and calls ``mark_restored`` too. A new, empty file is not
  restored (the application recreated its store). A false alarm (a power
  cut lost the last commits after the state file was written) costs one
  catch-up, nothing more.
- **Catch-up** (collaborative only; single_version cells carry their own
  clocks, and peers' newer values and tombs win on both sides). Until it is
  done (``pending``), the store pushes nothing of its own and serves no pull:
  the sync engine first runs a catch-up from the peer. That peer sends back
  its copy of this device's rows (``copy_batch``: its device tables for us,
  each row with its row clock) and its watermark for us in our *old*
  stream. ``apply_copy`` then makes each local table match that copy for
  every row whose newest change (in the restored log) the peer had applied:
  rows it holds that we lack come back, rows we hold that it lacks were
  deleted after the backup and are deleted here (as local deletes: peers
  get a delete, never a new insert). Rows changed after the restore (seqs
  above ``restore_seq``), and rows whose newest change the peer never saw,
  are kept as they are and pushed normally. The rows written here get new
  local clocks: the values are the device's own last ones, and only this
  device writes its collaborative rows, so a newer clock for the same value
  changes nothing elsewhere.
- One catch-up is enough: it ends ``pending``. Caught up from a peer that
  was behind another (offline) one, the rows only the other held are not
  back; docs/sync.md says so.

See docs/sync.md, "A store restored from a backup".
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pstore.schema.predicates import quote_ident
from p2pstore.store import capture, cells, row_runs
from p2pstore.store.capture import get_meta, set_meta
from p2pstore.store.changes import COLLABORATIVE, IN_CHUNK, ROW_CLOCK_COLUMN, Cell, OutBatch, RowChange, store_mode, sync_tables
from p2pstore.store.tables import read_table_info

log = logging.getLogger(__name__)

#: Suffix of the state file beside a store file (``shop.db`` -> ``shop.db.p2pstate``).
STATE_SUFFIX = ".p2pstate"
#: ``_p2p_meta``: the stream the file had when it was found restored (set: a catch-up is pending).
RESTORED_FROM_KEY = "restored_from"
#: ``_p2p_meta``: the file's last seq when it was found restored (later seqs are new writes).
RESTORE_SEQ_KEY = "restore_seq"
#: ``_p2p_resync`` peer name under which a catch-up marks the keys delivered
#: (a resync from the same peer keeps its own marks).
MARK_PREFIX = "restore:"

_KEYS_SQL = """
CREATE TABLE IF NOT EXISTS _p2p_restore_keys(tid INTEGER NOT NULL, pk, seq INTEGER NOT NULL, PRIMARY KEY (tid, pk)) WITHOUT ROWID
"""


# --------------------------------------------------------------------------
# The state file


@dataclass(frozen=True, slots=True)
class State:
    """What the state file says: the stream and the highest seq peers may know."""

    stream: str
    seq: int


def state_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + STATE_SUFFIX)


def read_state(store_path: Path) -> State | None:
    """The state file's content; None if it is missing or unreadable (a
    damaged state file must not keep a store from opening: the peer-side
    check still catches a restore)."""
    try:
        doc = json.loads(state_path(store_path).read_text(encoding="utf-8"))
        stream, seq = doc["stream"], doc["seq"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(stream, str) or not stream or type(seq) is not int or seq < 0:
        return None
    return State(stream, seq)


def write_state(store_path: Path, state: State) -> None:
    """Replace the state file atomically and durably (written before the
    seqs it names can reach a peer)."""
    path = state_path(store_path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, json.dumps({"stream": state.stream, "seq": state.seq}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def is_new_file(conn: sqlite3.Connection) -> bool:
    """Before ``capture.ensure_schema``: the file has no stream yet (a new store)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_p2p_meta'").fetchone() is None:
        return True
    return not get_meta(conn, capture.STREAM_KEY)


def restored(conn: sqlite3.Connection, state: State | None) -> bool:
    """Whether the file went back in time against the state file."""
    if state is None:
        return False
    return state.stream != capture.stream_id(conn) or capture.last_seq(conn) < state.seq


# --------------------------------------------------------------------------
# Marking a restored file (at open, or when a peer shows it)


def mark_restored(conn: sqlite3.Connection, old_stream: str) -> None:
    """The file was restored: start a new stream (its new incarnation) and,
    collaborative, note what the catch-up needs: the old stream, the log's
    last seq now, and each key's newest local seq in the restored log. Call
    in a write transaction."""
    if capture.stream_id(conn) == old_stream:
        capture.new_stream(conn)
    set_meta(conn, capture.OWN_ROWS_LOST_KEY, 1)  # what it wrote after the backup must come back from peers
    if store_mode(conn) != COLLABORATIVE or get_meta(conn, RESTORED_FROM_KEY) is not None:
        return  # single_version needs no catch-up; a pending one keeps its own marks
    set_meta(conn, RESTORED_FROM_KEY, old_stream)
    set_meta(conn, RESTORE_SEQ_KEY, capture.last_seq(conn))
    conn.execute(_KEYS_SQL)
    conn.execute("DELETE FROM _p2p_restore_keys")
    conn.execute("INSERT INTO _p2p_restore_keys(tid, pk, seq) SELECT tid, pk, max(seq) FROM _p2p_log WHERE origin IS NULL "
                 "AND tid IN (SELECT tid FROM _p2p_tables WHERE kind = 'local') GROUP BY tid, pk")


def pending(conn: sqlite3.Connection) -> bool:
    """Whether a catch-up is due before this store sends anything of its own."""
    return get_meta(conn, RESTORED_FROM_KEY) is not None


# --------------------------------------------------------------------------
# The catch-up, the peer's side: its copy of the asking device's rows


#: Where a copy read goes on: (index of the device table, last key sent).
CopyCursor = tuple[int, Any]


def copy_batch(conn: sqlite3.Connection, origin: str, cursor: CopyCursor | None, *, limit: int,
               max_bytes: int | None = None) -> tuple[OutBatch, CopyCursor]:
    """The next batch of this store's copy of ``origin``'s rows (its device
    tables for ``origin``), in table and key order, each row with the clock
    it was applied with. Not a batch of our stream (``full`` False): the
    receiver moves no watermark with it."""
    tables = conn.execute("SELECT tid, name, source FROM _p2p_tables WHERE kind = 'device' AND origin = ? ORDER BY tid",
                          (origin,)).fetchall()
    index, last_key = cursor if cursor is not None else (0, None)
    rows: list[RowChange] = []
    size = 0
    cap = max_bytes if max_bytes is not None else float("inf")
    while index < len(tables) and len(rows) < limit and size < cap:
        tid, name, source = tables[index]
        info = read_table_info(conn, name)
        key = quote_ident(info.key or capture.DEVICE_ROWID_COLUMN)
        columns = [c for c in info.columns if c != capture.DEVICE_ROWID_COLUMN]
        key_column = info.key or ""
        want = min(limit - len(rows), IN_CHUNK)
        sql = (f"SELECT x.{key}, coalesce(c.hlc, {row_runs.hlc_sql('x.' + key)}){''.join(', x.' + quote_ident(c) for c in columns)} "
               f"FROM {quote_ident(name)} x LEFT JOIN _p2p_cells c ON c.tid = ?1 AND c.ck = x.{key} AND c.col = ?2 "
               f"LEFT JOIN _p2p_row_runs r ON {row_runs.holds('?1', 'x.' + key)}"
               + (f" WHERE x.{key} > ?4" if last_key is not None else "") + f" ORDER BY x.{key} LIMIT ?3")
        page = conn.execute(sql, (tid, ROW_CLOCK_COLUMN, want, *((last_key,) if last_key is not None else ()))).fetchall()
        taken = 0
        for pk, hlc, *values in page:
            rows.append(RowChange(source, key_column, pk, 0,
                                  tuple(Cell(c, v, int(hlc or 0), origin) for c, v in zip(columns, values))))
            size += sum(len(v) for v in values if isinstance(v, (str, bytes)))
            last_key, taken = pk, taken + 1
            if size >= cap:
                break
        if taken == len(page) and len(page) < want:  # the table is done
            index, last_key = index + 1, None
    batch = OutBatch(COLLABORATIVE, 0, 0, tuple(rows), index < len(tables), False, capture.stream_id(conn))
    return batch, (index, last_key)


# --------------------------------------------------------------------------
# The catch-up, the restored store's side


@dataclass(slots=True)
class CatchUp:
    """What one batch of a catch-up did here."""

    back: int = 0      # rows written from the peer's copy (back, or to its newer values)
    deleted: int = 0   # rows the peer had applied the delete of
    done: bool = False  # the last batch: the catch-up is complete


def begin(conn: sqlite3.Connection, peer: str) -> None:
    """Forget the marks of an unfinished catch-up from ``peer``."""
    conn.execute("DELETE FROM _p2p_resync WHERE peer = ?", (MARK_PREFIX + peer,))


def apply_copy(conn: sqlite3.Connection, batch: OutBatch, peer: str, since: int,
               stream: str | None) -> CatchUp:
    """Apply one batch of ``peer``'s copy of our rows; ``since`` in
    ``stream`` is the peer's watermark for us. Writes go through the tables
    (captured as local changes); the caller stamps them in the same
    transaction. The last batch (``more`` False) deletes what the peer had
    seen deleted, and ends the pending state."""
    outcome = CatchUp()
    if not pending(conn):
        return outcome
    batch = batch.as_rows()
    conn.execute(_KEYS_SQL)
    restore_seq = int(get_meta(conn, RESTORE_SEQ_KEY, 0))
    # The peer's watermark counts only in the stream the restored file had.
    seen_up_to = since if stream == get_meta(conn, RESTORED_FROM_KEY) else 0
    tables = {t.info.name: t for t in sync_tables(conn) if t.mode == COLLABORATIVE}
    mark = MARK_PREFIX + peer
    for name, rows in _by_table(batch.rows).items():
        t = tables.get(name)
        if t is None:
            continue  # no longer distributed here
        later = _changed_after(conn, t.tid, restore_seq)
        newest = _newest_before(conn, t.tid, [r.key for r in rows])
        conn.executemany("INSERT OR IGNORE INTO _p2p_resync(peer, tid, ck) VALUES (?, ?, ?)", [(mark, t.tid, r.key) for r in rows])
        for row in rows:
            if row.key in later:
                continue  # written here after the restore: ours stands
            seq = newest.get(row.key, 0)
            if (seq and seq <= seen_up_to) or seq == 0:
                outcome.back += _write_row(conn, t.info, row)
    if batch.more:
        return outcome
    if seen_up_to:
        for t in tables.values():
            outcome.deleted += _delete_unheld(conn, t.tid, t.info, mark, restore_seq, seen_up_to)
    conn.execute("DELETE FROM _p2p_resync WHERE peer = ?", (mark,))
    conn.execute("DELETE FROM _p2p_restore_keys")
    conn.execute("DELETE FROM _p2p_meta WHERE key IN (?, ?)", (RESTORED_FROM_KEY, RESTORE_SEQ_KEY))
    outcome.done = True
    return outcome


def _by_table(rows: tuple[RowChange, ...]) -> dict[str, list[RowChange]]:
    grouped: dict[str, list[RowChange]] = {}
    for row in rows:
        grouped.setdefault(row.table, []).append(row)
    return grouped


def _changed_after(conn: sqlite3.Connection, tid: int, restore_seq: int) -> set[Any]:
    """Keys of ``tid`` written here after the restore (a range of the log's own key)."""
    return {r[0] for r in conn.execute("SELECT DISTINCT pk FROM _p2p_log WHERE seq > ? AND tid = ? AND origin IS NULL",
                                       (restore_seq, tid))}


def _newest_before(conn: sqlite3.Connection, tid: int, keys: list[Any]) -> dict[Any, int]:
    """Each key's newest local seq in the restored log (absent: none)."""
    found: dict[Any, int] = {}
    for i in range(0, len(keys), IN_CHUNK):
        chunk = keys[i:i + IN_CHUNK]
        found.update(conn.execute(f"SELECT pk, seq FROM _p2p_restore_keys WHERE tid = ? AND pk IN ({', '.join('?' * len(chunk))})",
                                  (tid, *chunk)).fetchall())
    return found


def _write_row(conn: sqlite3.Connection, info: Any, row: RowChange) -> int:
    """Make the local row ``row.key`` hold the peer's values: 1 if it changed."""
    cells = [c for c in row.cells if c.column in info.columns and c.column != info.key]
    key = info.key_expr
    current = conn.execute(f"SELECT {', '.join(quote_ident(c.column) for c in cells) or 1} FROM {quote_ident(info.name)} "
                           f"WHERE {key} = ?", (row.key,)).fetchone()
    if current is not None:
        if not cells or all(_same(a, c.value) for a, c in zip(current, cells)):
            return 0
        conn.execute(f"UPDATE {quote_ident(info.name)} SET {', '.join(quote_ident(c.column) + ' = ?' for c in cells)} "
                     f"WHERE {key} = ?", (*(c.value for c in cells), row.key))
        return 1
    names = [key, *(quote_ident(c.column) for c in cells)]
    conn.execute(f"INSERT INTO {quote_ident(info.name)} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                 (row.key, *(c.value for c in cells)))
    return 1


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _delete_unheld(conn: sqlite3.Connection, tid: int, info: Any, mark: str, restore_seq: int, seen_up_to: int) -> int:
    """Delete the rows the peer's copy lacks although it had applied their
    newest change here (so it had applied their delete since), unless
    written after the restore."""
    key = info.key_expr
    gone = [r[0] for r in conn.execute(
        f"SELECT {key} FROM {quote_ident(info.name)} x WHERE {key} NOT IN (SELECT ck FROM _p2p_resync WHERE peer = ? AND tid = ?) "
        f"AND ifnull((SELECT seq FROM _p2p_restore_keys k WHERE k.tid = ? AND {cells.same_key('k.pk', 'x.' + key)}), 0) <= ?",
        (mark, tid, tid, seen_up_to),
    )]
    later = _changed_after(conn, tid, restore_seq)
    gone = [k for k in gone if k not in later]
    conn.executemany(f"DELETE FROM {quote_ident(info.name)} WHERE {key} = ?", [(k,) for k in gone])
    return len(gone)
