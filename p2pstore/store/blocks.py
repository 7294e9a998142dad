"""Applying a received block set-based: the receiver's fast path.

A ``Block`` (protocol/batch.py) is one table's row changes in columnar
form, read by the sender with one statement. Here it goes into a staging
table with one ``executemany`` and is merged with a few set-based
statements — no statement, and no Python object, per row:

- collaborative: stale rows (the device table's row clock is newer) are
  marked; the fresh ones are deleted from / upserted into the device table,
  logged and given their row clock, each one statement;
- single_version: a block of rows never seen here (no row, row clock,
  column clock or tomb for any key; no tomb in the block) is inserted
  whole: the table, its log rows, its row clocks, one statement each.
  Every other single_version block is merged by the planner of merge.py,
  which decides each column of each row.

Invariants (tests/store/test_blocks.py checks them against row by row):

- ``apply_block`` writes exactly what applying the block's row changes one
  at a time writes — rows, local keys, log seqs in batch order, clocks,
  announcements — or nothing: it returns False, having changed nothing
  (a savepoint), and the caller applies the rows by the row path, which
  isolates a row that fails. It says False whenever a row needs a decision
  this path does not make: a clock too far ahead, text that is not valid
  UTF-8, keys of mixed or ambiguous types, a column unknown here, a known
  row (single_version), or any SQLite error (a constraint of the table).
- Only a batch that is this one block takes this path (merge.apply_batch),
  so the seqs it gives are the seqs row by row would give.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from p2pstore.protocol.batch import (
    HLC, KEY, ORIGIN, PREV_HLC, PREV_ORIGIN, TOMB_HLC, TOMB_ORIGIN, TOMB_PREV_HLC, TOMB_PREV_ORIGIN, VALUES,
    COLLABORATIVE, Block, has_raw_text,
)
from p2pstore.schema.predicates import quote_ident
from p2pstore.schema.table_shape import column_affinity
from p2pstore.store import capture, origins
from p2pstore.store.capture import OP_DELETE, OP_INSERT, OP_UPDATE

if TYPE_CHECKING:  # merge.py imports this module
    from p2pstore.store.merge import _Applier

_FIXED = "k, seq, hlc, o, ph, po, th, tor, tph, tpo"


def _stage(conn: sqlite3.Connection, width: int) -> str:
    """An empty staging table for rows of ``width`` values (one per width,
    kept per connection in the temp schema); its ``n`` counts from 1 in
    insertion order."""
    name = f"_p2p_stage_{width}"
    values = ", ".join(f"v{i}" for i in range(width))
    conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {name}(n INTEGER PRIMARY KEY, {_FIXED}, {values}, fresh, existed)")
    conn.execute(f"DELETE FROM temp.{name}")
    return name


def _load(conn: sqlite3.Connection, block: Block) -> str:
    stage = _stage(conn, len(block.columns))
    marks = ", ".join("?" * (VALUES + len(block.columns)))
    values = ", ".join(f"v{i}" for i in range(len(block.columns)))
    conn.executemany(f"INSERT INTO temp.{stage}({_FIXED}, {values}) VALUES ({marks})", block.rows)
    return stage


def keys_stay_distinct(conn: sqlite3.Connection, table: str, column: str, key_type: type) -> bool:
    """Whether keys of ``key_type`` keep their type (and so their identity)
    in ``column``: ints in a column of INTEGER affinity, strs in one of TEXT
    affinity. Only then can a bulk apply match rows to keys with IN lists,
    joins and dicts; otherwise it leaves the batch to row by row."""
    # Called per batch: one pragma, not the whole shape (schema.shape); the
    # affinity rule is the schema's own.
    decl = next((r[2] for r in conn.execute(f"PRAGMA table_info({quote_ident(table)})") if r[1] == column), None)
    if decl is None:
        return False
    return column_affinity(decl) == ("INTEGER" if key_type is int else "TEXT")


def _not_none(values: Any) -> list[Any]:
    return [v for v in values if v is not None]


def apply_block(ap: _Applier, block: Block) -> bool:
    """Apply ``block`` set-based, or return False having changed nothing."""
    table = ap.tables.get(block.table)
    if table is None or table.mode != ap.mode or block.key_column != table.key_column:
        return False
    fields = list(zip(*block.rows))
    keys = fields[KEY]
    kinds = set(map(type, keys))
    if len(kinds) != 1 or not kinds <= {int, str} or len(set(keys)) != len(keys):
        return False
    hlcs = [*_not_none(fields[HLC]), *_not_none(fields[TOMB_HLC])]
    if max([*hlcs, *_not_none(fields[PREV_HLC]), *_not_none(fields[TOMB_PREV_HLC])], default=0) > ap.clock_limit:
        return False  # the row path logs it as clock_ahead
    if any(map(has_raw_text, fields[VALUES:])):
        return False  # the row path binds it as the bytes it is
    conn = ap.conn
    conn.execute("SAVEPOINT p2p_block")
    try:
        done = _collaborative(ap, block, fields, kinds.pop()) if ap.mode == COLLABORATIVE else _new_rows(ap, block, fields, kinds.pop())
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
    ap.max_hlc = max(ap.max_hlc, max(hlcs, default=0))
    for origin, table_name, op, key in remote:
        ap._announce(origin, table_name, op, key)
    if appended is not None:
        ap.appended.add(appended)
    return True


_Done = tuple[int, list[tuple[str, str, int, Any]], "int | None"]


def _collaborative(ap: _Applier, block: Block, fields: list[Any], kind: type) -> _Done | None:
    """Upserts and deletes into the sender's device table; a change not
    newer than the row's clock there is stale (a repeat) and skipped."""
    used = {*_not_none(fields[ORIGIN]), *_not_none(fields[TOMB_ORIGIN])}
    if any(block.origins[i] != ap.sender for i in used) or _not_none(fields[PREV_HLC]) or _not_none(fields[TOMB_PREV_HLC]):
        return None  # rows are only taken from their own device (the row path says why)
    conn = ap.conn
    target = ap._target(block.table)
    key_col = target.table.info.key or capture.DEVICE_ROWID_COLUMN
    if any(c not in target.dest_columns for c in block.columns):
        return None  # the row path reports unknown_column
    if not keys_stay_distinct(conn, target.dest, key_col, kind):
        return None
    top = capture.last_seq(conn)
    if top + len(block.rows) >= 1 << 63:
        return None
    stage = _load(conn, block)
    dest, key = quote_ident(target.dest), quote_ident(key_col)
    newer = f"(c.hlc > coalesce({stage}.hlc, {stage}.th) OR (c.hlc = coalesce({stage}.hlc, {stage}.th) AND " \
            f"{origins.device_sql('c.origin', '?3')} >= ?2))"
    conn.execute(
        f"UPDATE temp.{stage} SET existed = EXISTS (SELECT 1 FROM {dest} d WHERE d.{key} = {stage}.k), "
        f"fresh = NOT EXISTS (SELECT 1 FROM _p2p_cells c WHERE c.tid = ?1 AND c.ck = {stage}.k AND c.col = '*' AND {newer})",
        (target.dest_tid, ap.sender, ap.me),
    )
    conn.execute(f"DELETE FROM {dest} WHERE {key} IN (SELECT k FROM temp.{stage} WHERE fresh AND hlc IS NULL)")
    names = [(c, f"v{i}") for i, c in enumerate(block.columns) if c != key_col]
    sets = ", ".join(f"{quote_ident(c)} = excluded.{quote_ident(c)}" for c, _ in names)
    conn.execute(
        f"INSERT INTO {dest} ({key}{''.join(', ' + quote_ident(c) for c, _ in names)}) "
        f"SELECT k{''.join(', ' + v for _, v in names)} FROM temp.{stage} WHERE fresh AND hlc IS NOT NULL ORDER BY n "
        f"ON CONFLICT({key}) DO " + (f"UPDATE SET {sets}" if sets else "NOTHING")
    )
    seq = f"?1 + row_number() OVER (ORDER BY n)"
    conn.execute(
        "INSERT INTO _p2p_log(seq, tid, pk, op, hlc, origin, ck) "
        f"SELECT {seq}, ?2, k, CASE WHEN hlc IS NULL THEN {OP_DELETE} WHEN existed THEN {OP_UPDATE} ELSE {OP_INSERT} END, "
        f"coalesce(hlc, th), ?3, NULL FROM temp.{stage} WHERE fresh ORDER BY n",
        (top, target.dest_tid, ap._logged(ap.sender)),
    )
    conn.execute(
        "INSERT INTO _p2p_cells(tid, ck, col, hlc, origin, seq) "
        f"SELECT ?2, k, '*', coalesce(hlc, th), ?3, {seq} FROM temp.{stage} WHERE fresh ORDER BY n "
        "ON CONFLICT(tid, ck, col) DO UPDATE SET hlc = excluded.hlc, origin = excluded.origin, seq = excluded.seq",
        (top, target.dest_tid, ap._stored(ap.sender)),
    )
    applied = conn.execute(f"SELECT count(*) FROM temp.{stage} WHERE fresh").fetchone()[0]
    name = target.table.info.name
    remote = [
        (ap.sender, name, OP_DELETE if deleted else OP_UPDATE if existed else OP_INSERT, k)
        for k, existed, deleted in conn.execute(
            f"SELECT k, existed, hlc IS NULL FROM temp.{stage} WHERE fresh AND (existed OR hlc IS NOT NULL) ORDER BY n"
        )
    ]
    return applied, remote, None


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _number_origins(ap: _Applier, block: Block, stage: str, used: set[int]) -> None:
    """Give the fresh rows' devices their numbers (store/origins.py) in the
    order the row path gives them, as it writes each row — its origin
    (logged: always a number, this device too), then its prev's (stored:
    none for this device) — and fill in the staging map. The walk ends once
    no device is left without a number: at once, in the usual case."""
    devices = block.origins
    logged = {devices[i] for (i,) in ap.conn.execute(f"SELECT DISTINCT o FROM temp.{stage} WHERE fresh")}
    stored = {devices[i] for (i,) in ap.conn.execute(f"SELECT DISTINCT po FROM temp.{stage} WHERE fresh AND ph IS NOT NULL")}
    todo = {d for d in logged | (stored - {ap.me}) if ap.origins.known(d) is None}
    if todo:
        for o, po, ph in ap.conn.execute(f"SELECT o, po, ph FROM temp.{stage} WHERE fresh ORDER BY n").fetchall():
            ap._logged(devices[o])
            if ph is not None:
                ap._stored(devices[po])
            if all(ap.origins.known(d) is not None for d in todo):
                break
    ap.conn.executemany("UPDATE temp._p2p_stage_origins SET stored = ?, logged = ? WHERE idx = ?",
                        [(None if devices[i] == ap.me else ap.origins.known(devices[i]), ap.origins.known(devices[i]), i)
                         for i in used])


def _new_rows(ap: _Applier, block: Block, fields: list[Any], kind: type) -> _Done | None:
    """A single_version block whose rows are all either never seen here
    (inserted whole) or already here exactly as they come (an echo: a row
    relayed back, a batch sent twice — skipped, as the planner would skip
    it); any other block is the planner's (None)."""
    table = ap.tables[block.table]
    ck_col = table.conflict_column
    assert ck_col is not None
    if set(block.columns) != set(table.sync_columns) or None in fields[HLC]:
        return None
    conn = ap.conn
    if not keys_stay_distinct(conn, table.info.name, ck_col, kind):
        return None
    top = capture.last_seq(conn)
    if top + len(block.rows) >= 1 << 63:
        return None
    stage = _load(conn, block)
    name, ck, tid = quote_ident(table.info.name), quote_ident(ck_col), table.tid
    # The block's origin indexes -> this store's numbers (NULL: this device;
    # -1: a device with no number yet, so no stored clock can be its). The
    # fresh rows' devices get theirs below (``_number_origins``).
    used = {*fields[ORIGIN], *_not_none(fields[PREV_ORIGIN]), *_not_none(fields[TOMB_ORIGIN])}
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS _p2p_stage_origins(idx INTEGER PRIMARY KEY, stored, logged)")
    conn.execute("DELETE FROM temp._p2p_stage_origins")
    conn.executemany("INSERT INTO temp._p2p_stage_origins(idx, stored) VALUES (?, ?)",
                     [(i, None if block.origins[i] == ap.me else _or(ap.origins.known(block.origins[i]), -1)) for i in used])
    # fresh: 1 never seen here, 0 here already with the same row clock (and
    # no column clock of its own) and the same tomb or none, NULL otherwise.
    # A table with no column clocks (or no tombs) at all is not probed for them.
    st = stage  # (UPDATE ... AS alias needs SQLite 3.35: columns are qualified by the table's name)
    mapped = "(SELECT m.stored FROM temp._p2p_stage_origins m WHERE m.idx = {0})"
    has = {t: conn.execute(f"SELECT 1 FROM {t} WHERE tid = ? LIMIT 1", (tid,)).fetchone() is not None
           for t in ("_p2p_cells", "_p2p_tombs")}
    no_cells = f"NOT EXISTS (SELECT 1 FROM _p2p_cells c WHERE c.tid = ?1 AND c.ck = {st}.k)" if has["_p2p_cells"] else "1"
    no_tomb = f"NOT EXISTS (SELECT 1 FROM _p2p_tombs t WHERE t.tid = ?1 AND t.ck = {st}.k)" if has["_p2p_tombs"] else "1"
    same_tomb = (f"EXISTS (SELECT 1 FROM _p2p_tombs t WHERE t.tid = ?1 AND t.ck = {st}.k AND t.hlc = {st}.th "
                 f"AND t.origin IS {mapped.format(st + '.tor')})") if has["_p2p_tombs"] else "0"
    conn.execute(
        f"UPDATE temp.{st} SET fresh = CASE "
        f"WHEN NOT EXISTS (SELECT 1 FROM {name} x WHERE x.{ck} = {st}.k) "
        f"AND NOT EXISTS (SELECT 1 FROM _p2p_rows r WHERE r.tid = ?1 AND r.ck = {st}.k) "
        f"AND {no_cells} AND {no_tomb} THEN (CASE WHEN {st}.th IS NULL THEN 1 END) "
        f"WHEN EXISTS (SELECT 1 FROM _p2p_rows r WHERE r.tid = ?1 AND r.ck = {st}.k AND r.hlc = {st}.hlc "
        f"             AND r.origin IS {mapped.format(st + '.o')}) "
        f"AND {no_cells} AND ({st}.th IS NULL OR {same_tomb}) THEN 0 END",
        (tid,),
    )
    origin = "(SELECT m.{0} FROM temp._p2p_stage_origins m WHERE m.idx = s.{1})"
    if conn.execute(f"SELECT 1 FROM temp.{stage} WHERE fresh IS NULL LIMIT 1").fetchone() is not None:
        return None
    if conn.execute(f"SELECT 1 FROM temp.{stage} WHERE fresh LIMIT 1").fetchone() is None:
        return 0, [], None  # all echoes: nothing to write (an empty INSERT would still touch sqlite_sequence)
    _number_origins(ap, block, stage, used)
    position = {c: f"v{i}" for i, c in enumerate(block.columns)}
    listed = ", ".join(quote_ident(c) for c in table.sync_columns)
    values = ", ".join("k" if c == ck_col else position[c] for c in table.sync_columns)
    conn.execute(f"INSERT INTO {name} ({listed}) SELECT {values} FROM temp.{stage} WHERE fresh ORDER BY n")
    seq = "?1 + row_number() OVER (ORDER BY s.n)"
    conn.execute(
        "INSERT INTO _p2p_log(seq, tid, pk, op, hlc, origin, ck) "
        f"SELECT {seq}, ?2, x.{table.info.key_expr}, {OP_INSERT}, s.hlc, {origin.format('logged', 'o')}, NULL "
        f"FROM temp.{stage} s JOIN {name} x ON x.{ck} = s.k WHERE s.fresh ORDER BY s.n",
        (top, tid),
    )
    conn.execute(
        "INSERT INTO _p2p_rows(tid, ck, hlc, origin, seq, prev_hlc, prev_origin) "
        f"SELECT ?2, s.k, s.hlc, {origin.format('stored', 'o')}, {seq}, s.ph, "
        f"CASE WHEN s.ph IS NOT NULL THEN {origin.format('stored', 'po')} END FROM temp.{stage} s WHERE s.fresh ORDER BY s.n",
        (top, tid),
    )
    devices: dict[int, str] = {}
    remote = []
    for number, pk in conn.execute("SELECT origin, pk FROM _p2p_log WHERE seq > ? ORDER BY seq", (top,)):
        device = devices.get(number)
        if device is None:
            device = devices[number] = ap.origins.device(number)
        remote.append((device, table.info.name, OP_INSERT, pk))
    return len(remote), remote, tid if remote else None
