"""The change stream: what this store sends a peer, read from its own sync state.

A store's changes form one stream ordered by the local log ``seq``. A peer
that has applied everything up to ``seq`` W (its watermark for this device,
``_p2p_watermarks`` on the peer's side) needs exactly the records with
``seq`` > W:

- **collaborative** tables: local log rows (``origin`` NULL) with ``seq`` > W.
  Each changed key is sent once, as its *current* full row (or as a delete
  if the row is gone), with the clock of its last change. Rows received from
  peers live in device tables and are never sent on (no relay).
- **single_version** tables: cells and tombs (``_p2p_cells``, ``_p2p_tombs``)
  with ``seq`` > W, grouped per conflict value ``ck``; values are read from
  the table by ``ck`` and only sync columns travel. Relayed cells carry a new
  local ``seq`` but their original hlc and origin, so A's changes reach C
  through B as A's.

Invariants:

- A batch covers a ``seq`` interval (``since_seq``, ``last_seq``]: every
  row with a record in it is in the batch — as its current state, at its
  newest seq — or has a newer record beyond ``last_seq`` and so comes, as
  its current state, in a later batch; nothing else is in it. A stream
  therefore resumes exactly at ``last_seq`` and loses nothing. (A batch
  the byte bound ends early is where the second case shows: a row written
  at seq 1 and again at seq 3 is not in the batch (0, 2], but in the
  next.) ``limit`` bounds the number of distinct ``seq`` values, and one
  ``seq`` belongs to one row, so a batch has at most ``limit`` rows.
- ``last_seq`` never passes a local log row that is not stamped yet: its
  cells would be created later with a ``seq`` below a watermark a peer
  already holds, and never be sent. Callers stamp first, in the same
  transaction (``capture.stamp``), so that row values read here match their
  clocks; the bound is a safety net.
- Only a batch of the whole stream (every table, no row filter) may move a
  peer's watermark: ``OutBatch.full`` says so. A table or query sync
  (``where``) skips records, so its ``last_seq`` proves nothing.
- A single_version row always carries its tomb (if any), whatever its
  ``seq``: a row change is then self-contained, and a cell older than the
  tomb (sent with value NULL) can't resurrect anything on a receiver that
  never got the delete.

Each table type reads its own records (``read_block`` / ``read_rows`` of
collaborative.py and single_version.py, through ``modes.of``); this module
picks the interval and puts the batch together.
"""

from __future__ import annotations

import bisect
import itertools
import sqlite3
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

from p2pstore.errors import InvalidParams, StoreInvalid
from p2pstore.schema.predicates import CompiledQuery, quote_ident
from p2pstore.store import capture, modes
from p2pstore.protocol.batch import HLC, ORIGIN, SINGLE_VERSION, TOMB_HLC, TOMB_ORIGIN, Grant, Rows, field_of
from p2pstore.store.changes import (
    DEFAULT_BATCH_ROWS, MAX_BATCH_ROWS, ROW_OVERHEAD, SEQ, Block, OutBatch, Read, RowChange, SyncTable, filter_sql, origin_list,
    read_snapshot, stable_bound, store_mode, sync_tables,
)


def changes_since(
    conn: sqlite3.Connection,
    table: str | None,
    since_seq: int,
    *,
    limit: int = DEFAULT_BATCH_ROWS,
    where: CompiledQuery | None = None,
    max_bytes: int | None = None,
    columnar: bool = True,
    covered: Mapping[str, int] | None = None,
    own_only: bool = False,
    forwarding: frozenset[str] = frozenset(),
    grants: Mapping[str, int] | None = None,
) -> OutBatch:
    """The changes a peer whose watermark is ``since_seq`` has not applied.

    ``columnar``: the common rows come as ``Block``s, one per table, read
    with one statement straight into wire rows (the table type's
    ``read_block``); the rest (single_version rows whose columns
    have clocks of their own, deletes of rows without a row clock, any row
    filter) as ``RowChange``s. ``OutBatch.as_rows`` gives the same batch in
    row form only, which is what ``columnar`` False reads.

    At most ``limit`` seqs, and with ``max_bytes`` only as many as the rows
    they carry fit in (by the stored size of their values, always at least
    one): the batch then ends early, still covering every record up to its
    ``last_seq``, and memory stays bounded when rows are large.

    ``table`` None reads the whole stream (every distributed table) and gives
    a batch that may move the peer's watermark (``full``). A named table, and
    above all a ``where`` filter (a compiled predicate on that table, for a
    query sync), give a batch that must NOT move it: they skip records that
    the peer still needs. A filtered batch has the rows that exist and match
    now, and the deletes of rows that no longer exist (``filter_sql``);
    ``where``'s order, limit and offset are ignored.

    ``covered``: the peer's origin marks (device → hlc, protocol
    ``OriginMark``): single_version rows whose every clock they cover are
    left out (``_uncovered``); the interval, and what the peer's watermark
    may do, stay the same.

    ``own_only`` (a push of this device's own changes, protocol 4
    ``SyncOpen.own``): single_version rows none of whose clocks is this
    device's are left out too; a batch that so left out a row ``covered``
    did not is not ``full`` (the receiver's watermark stays: another
    device's change may still reach it only through a whole stream).
    ``forwarding``: with ``own_only``, rows with a clock of these devices go
    too — in a large fleet this device passes their changes on along their
    trees (net/overlay.py); the eager push is then this device's own and
    theirs. ``grants`` (device → from_seq: this device has pushed every
    change of that device past from_seq to the peer): the batch that ends
    the stream grants the peer this device's marks for them
    (``OutBatch.grants``) — the end of an eager push, or of a whole one:
    the lazy whole push that moves the peer's watermark past ``from_seq``
    may be the last push of a quiet fleet, and without its grants the
    peer's marks would wait for the next write.

    Call it after ``capture.stamp`` in the same transaction, so pending
    outside writes have their clocks (see the module invariants).
    """
    if type(since_seq) is not int or since_seq < 0:
        raise InvalidParams("since_seq must be an integer >= 0", data={"param": "since_seq"})
    if type(limit) is not int or not 1 <= limit <= MAX_BATCH_ROWS:
        raise InvalidParams(f"limit must be 1..{MAX_BATCH_ROWS}", data={"param": "limit"})
    if where is not None and table is None:
        raise InvalidParams("a row filter needs a table", data={"param": "where"})
    with read_snapshot(conn):
        me = capture.device_id(conn)
        mode = store_mode(conn)
        tables = sync_tables(conn, table)
        for t in tables:
            if t.mode != mode:
                raise StoreInvalid(f"table {t.info.name} is captured as {t.mode} in a {mode} store; register it again")
        bound = stable_bound(conn)
        filt = where if where is not None and where.where else None
        # Own (per-column) clocks of a single_version table: its rows that have
        # them go as row changes; without any, every row of the interval is a
        # block row, and the blocks size themselves while they are read.
        irregular = {t.tid: modes.of(t.mode).has_irregular_rows(conn, t) for t in tables}
        blockwise = columnar and filt is None
        self_sized = blockwise and not any(irregular.values())
        # Where every seq of the interval is a row of the blocks (the usual), they count
        # the batch as they are read (``_limited``): no query counts it first.
        counted = self_sized and bound > since_seq and all(
            modes.of(t.mode).counts_interval(conn, t, since_seq, bound, irregular[t.tid]) for t in tables)
        read: list[Read] | None = None
        shortened = False
        if counted:
            devices: tuple[str, ...] | None = origin_list(conn, me)
            budget = max_bytes
            read = [modes.of(t.mode).read_block(conn, t, since_seq, bound, devices, budget, False, limit) for t in tables]
            last, more = _limited(read, limit, since_seq, bound)
            # A block read grouped by key (a key repeats) over more than the batch holds
            # is read again over the batch: a key's newest change up to ``last``, not past it.
            read = [modes.of(t.mode).read_block(conn, t, since_seq, last, devices, budget, False)
                    if r.seqs is not None and max(field_of(r.block.rows, -2), default=last) > last else r
                    for t, r in zip(tables, read)]
            count = sum(len(r.block.rows) for r in read)
            shortened = more  # (rows past the last seq may have been read)
        else:
            # The seqs themselves are needed only to size them here; else their number and the last.
            sized_here = max_bytes is not None and not self_sized
            count, top, seqs = _next_seqs(conn, tables, since_seq, bound, limit, filt, listed=sized_here)
            more = count == limit
            devices = origin_list(conn, me) if blockwise and count else None
            if seqs is not None and max_bytes is not None and count > 1:  # (seqs: only when sized here)
                fitting = _seqs_within(conn, tables, seqs, max_bytes)
                more = more or len(fitting) < count
                count, top = len(fitting), fitting[-1]
            last = top if more else max(since_seq, bound)
        rows: list[RowChange] = []
        blocks: list[Block] = []
        if count and devices is not None:
            if read is None:
                budget = max_bytes if self_sized and count > 1 else None
                read = [modes.of(t.mode).read_block(conn, t, since_seq, last, devices, budget, irregular[t.tid]) for t in tables]
            cut = _cut(read, budget)
            if cut is not None and cut < last:
                last, more, shortened = cut, True, True
            for t, block in zip(tables, (r.block for r in read)):
                # Whole fields at a time: a block is ~1,000 rows, kept field by field (Rows) as read.
                kept = block._replace(rows=_wire_part(block.rows, last if shortened else None))
                seqs = field_of(kept.rows, SEQ)
                if seqs != sorted(seqs):
                    kept = kept._replace(rows=sorted(kept.rows, key=_SEQ))  # a later tomb raised a row's seq: as as_rows() orders
                if kept.rows:
                    blocks.append(kept)
                rows.extend(modes.of(t.mode).read_irregular(conn, t, since_seq, last, me, kept))
        elif count:
            for t in tables:
                rows.extend(modes.of(t.mode).read_rows(conn, t, since_seq, last, me, filt))
        rows.sort(key=lambda r: r.seq)
        if covered and mode == SINGLE_VERSION:
            rows, blocks = _uncovered(rows, blocks, covered)
        full = table is None and where is None
        granted: tuple[Grant, ...] = ()
        if own_only and mode == SINGLE_VERSION:
            rows, blocks, left_out = _own_only(rows, blocks, {me} | forwarding)
            full = full and not left_out
        if grants and not more and mode == SINGLE_VERSION and (own_only or full):
            held = capture.held_marks(conn)
            granted = tuple(Grant(d, held[d], f) for d, f in sorted(grants.items()) if d in held)
        return OutBatch(mode, since_seq, last, tuple(rows), more, full, capture.stream_id(conn), blocks=tuple(blocks),
                        grants=granted)


def forwarded_since(book: Mapping[str, int], forwarding: frozenset[str], since: int) -> dict[str, int]:
    """The bookkeeping a grant needs (``changes_since`` ``grants``), for one
    peer: ``book`` (device → seq) after one more eager read from ``since``
    that forwards ``forwarding`` — a device no longer forwarded drops out,
    one newly forwarded starts at this read."""
    kept = {d: at for d, at in book.items() if d in forwarding}
    for d in forwarding:
        kept.setdefault(d, since)
    return kept


def _own_only(rows: list[RowChange], blocks: list[Block], eager: set[str]) -> tuple[list[RowChange], list[Block], int]:
    """``rows`` and ``blocks`` without the rows that hold no clock of a
    device in ``eager``, and how many were left out."""
    kept_rows = [r for r in rows if r.tomb_origin in eager or any(c.origin in eager for c in r.cells)]
    left = len(rows) - len(kept_rows)
    kept_blocks = []
    for b in blocks:
        mine = [origin in eager for origin in b.origins]
        used = set(field_of(b.rows, ORIGIN))
        if used and None not in used and all(mine[i] for i in used):  # (every row's clock is eager: no pass row by row)
            kept_blocks.append(b)
            continue
        kept = [r for r in b.rows if (r[HLC] is not None and mine[r[ORIGIN]]) or (r[TOMB_HLC] is not None and mine[r[TOMB_ORIGIN]])]
        left += len(b.rows) - len(kept)
        if kept:
            kept_blocks.append(b._replace(rows=kept))
    return kept_rows, kept_blocks, left


def _uncovered(rows: list[RowChange], blocks: list[Block], covered: Mapping[str, int]) -> tuple[list[RowChange], list[Block]]:
    """``rows`` and ``blocks`` without the rows whose every clock the peer
    holds already (``covered``: its origin marks, store/merge.py
    ``origin_marks``): a no-op there, so leaving them out changes nothing
    but the work. The batch still covers its whole interval, so the peer's
    watermark moves over them. Only single_version streams relay, so only
    they hold rows the peer had from their writer."""
    def has(hlc: int | None, origin: str | None) -> bool:
        return hlc is None or (origin is not None and hlc <= covered.get(origin, -1))

    kept_rows = [r for r in rows if not (all(has(c.hlc, c.origin) for c in r.cells) and has(r.tomb_hlc, r.tomb_origin))]
    kept_blocks = []
    for b in blocks:
        marks = [covered.get(origin, -1) for origin in b.origins]
        hlcs, used = field_of(b.rows, HLC), set(field_of(b.rows, ORIGIN))
        if hlcs and None not in used and min(hlcs) > max(marks[i] for i in used):
            kept_blocks.append(b)  # (the usual fresh rows: every row clock past its origin's mark; found in C)
            continue
        kept = [r for r in b.rows if not ((r[HLC] is None or r[HLC] <= marks[r[ORIGIN]])
                                          and (r[TOMB_HLC] is None or r[TOMB_HLC] <= marks[r[TOMB_ORIGIN]]))]
        if kept:
            kept_blocks.append(b._replace(rows=kept))
    return kept_rows, kept_blocks


def unsent_rows(conn: sqlite3.Connection, since_seq: int, stream: str | None) -> int:
    """How many rows a full sync would send a peer that has applied this
    store's ``stream`` up to ``since_seq`` (docs/sync.md, "Lag").

    A row counts once however often it changed since: collaborative, the
    distinct keys of this device's own log rows above the position (the
    stream sends each as its current row or delete); single_version, the
    distinct rows with a cell or tomb above it (changes made here and
    relayed ones). A position in another stream, or beyond this file's
    last seq, counts from 0, as ``start_position`` would send. One index
    range per source, deduplicated: about 20 ms (collaborative) to 80 ms
    (single_version) per 100k rows pending, nothing when none is.
    """
    with read_snapshot(conn):
        if stream != capture.stream_id(conn) or since_seq > capture.last_seq(conn):
            since_seq = 0
        return modes.of(store_mode(conn)).unsent(conn, since_seq)


def _next_seqs(
    conn: sqlite3.Connection, tables: Sequence[SyncTable], since: int, bound: int, limit: int, where: CompiledQuery | None,
    *, listed: bool,
) -> tuple[int, int, list[int] | None]:
    """The first ``limit`` distinct seqs after ``since`` (up to ``bound``) that
    carry records of ``tables``: how many, the last (0 if none), and — when
    ``listed`` — the seqs themselves (else None). Each source is read in
    ``seq`` index order and stops after ``limit`` seqs, so a batch costs the
    same at the start of a large backlog as at its end.

    Most intervals have one source (a table's rows, no cells, no tombs):
    SQLite counts its seqs and gives the last, and no seq becomes a Python
    object (a list of them was 8-10 % of a sender's CPU in a large push).
    Seqs of several sources are merged here, in C (SQL's UNION sorted them
    all again)."""
    if bound <= since:
        return 0, 0, [] if listed else None
    queries = []
    for t in tables:
        for source, extra, key in modes.of(t.mode).SEQ_SOURCES:
            filt, fparams = filter_sql(t, key, where, local_key=key == "pk")
            extra = extra.format(table=quote_ident(t.info.name), key=t.info.key_expr)
            queries.append((f"SELECT DISTINCT seq FROM {source} WHERE seq > ? AND seq <= ? AND tid = ?{extra}{filt} "
                            "ORDER BY seq LIMIT ?", (since, bound, t.tid, *fparams, limit)))
    if not listed:
        spans = [conn.execute(f"SELECT count(*), max(seq) FROM ({sql})", params).fetchone() for sql, params in queries]
        with_seqs = [i for i, (count, _) in enumerate(spans) if count]
        if len(with_seqs) <= 1:
            count, top = spans[with_seqs[0]] if with_seqs else (0, 0)
            return count, top, None
        queries = [queries[i] for i in with_seqs]
    seqs = sorted(set().union(*([r[0] for r in conn.execute(sql, params)] for sql, params in queries)))[:limit]
    return len(seqs), seqs[-1] if seqs else 0, seqs if listed else None


def _seqs_within(conn: sqlite3.Connection, tables: Sequence[SyncTable], seqs: list[int], max_bytes: int) -> list[int]:
    """The longest prefix of ``seqs`` whose rows' values fit in ``max_bytes``
    (at least one seq). A row is sized by its current values (``length()``,
    which SQLite answers without reading a large value); counted once per
    seq that carries it, so the estimate errs on the small-batch side."""
    sizes: dict[int, int] = {}
    for t in tables:
        for seq, size in modes.of(t.mode).seq_sizes(conn, t, seqs):
            sizes[seq] = sizes.get(seq, 0) + (size or 0)
    used = 0
    for i, seq in enumerate(seqs):
        used += sizes.get(seq, 0) + ROW_OVERHEAD
        if used > max_bytes and i > 0:
            return seqs[:i]
    return seqs


# A block row as read: its wire fields, then its interval seq and its size (``read_block``).
_INTERVAL_SEQ, _WIRE_ROW = itemgetter(-2), itemgetter(slice(None, -2))


def _wire_part(rows: Sequence[Any], last: int | None) -> Sequence[Any]:
    """A block's rows as read without their interval seq and size; ``last``:
    only those of the interval up to it (the batch was cut short). Rows as
    read are in interval-seq order, so those are a prefix."""
    if isinstance(rows, Rows):
        n = len(rows) if last is None else bisect.bisect_right(rows.fields[-2], last)
        return Rows(rows.fields[:-2] if n == len(rows) else [f[:n] for f in rows.fields[:-2]], n)
    return [_WIRE_ROW(r) for r in rows if last is None or _INTERVAL_SEQ(r) <= last]


_SEQ = itemgetter(SEQ)


def _limited(read: Sequence[Read], limit: int, since: int, bound: int) -> tuple[int, bool]:
    """The last seq of a batch of at most ``limit`` seqs from blocks read
    over (``since``, ``bound``] with that ``limit`` each, and whether more
    follow: what ``_next_seqs`` would have counted. A block that reached its
    limit holds its interval only up to its end (``Read.end``), so the batch
    ends there at the latest — or at the ``limit``-th seq of them all."""
    ends = [r.end for r in read if r.end is not None]
    cap = min(ends) if ends else None
    seqs = sorted(itertools.chain.from_iterable(field_of(r.block.rows, -2) if r.seqs is None else r.seqs for r in read))
    if (bisect.bisect_right(seqs, cap) if cap is not None else len(seqs)) >= limit:
        cap = seqs[limit - 1]
    return (cap, True) if cap is not None else (max(since, bound), False)


def _cut(read: Sequence[Read], budget: int | None) -> int | None:
    """The last seq of the longest prefix of the blocks' rows (in seq order,
    over every table) whose sizes fit ``budget`` — at least one row — or
    None when everything read fits. The same estimate as ``_seqs_within``."""
    if budget is None:
        return None
    complete = all(r.complete for r in read)
    if complete and sum(sum(field_of(r.block.rows, -1)) + ROW_OVERHEAD * len(r.block.rows) for r in read) <= budget:
        return None  # (the usual batch: all of it fits, and no row needs sorting)
    sizes = sorted(itertools.chain.from_iterable(zip(field_of(r.block.rows, -2), field_of(r.block.rows, -1)) for r in read))
    used = list(itertools.accumulate(map(ROW_OVERHEAD.__add__, map(itemgetter(1), sizes))))
    over = max(bisect.bisect_right(used, budget), 1)  # the first row past the budget (never the first row)
    if over < len(sizes):
        return sizes[over - 1][0]
    return None if complete else (sizes[-1][0] if sizes else None)
