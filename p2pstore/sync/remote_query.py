"""Remote query: run a structured query on a peer's copy of a distributed table.

Answering side invariants:
- Only trusted peers reach this (channels exist only between mutually
  trusted devices), and the security-level rule is checked here, by the
  answerer, for every query (``DeviceDirectory.may_receive``).
- A peer sends predicates, never SQL: they are compiled here
  (schema/predicates.py) against the columns this device syncs of that table
  (single-version: the sync columns; collaborative: the table's columns).
  Anything else is an error.
- Read-only: the query runs on a separate read-only SQLite connection, so it
  can't change data and never holds a transaction on the daemon's writer.
- Results travel in pages of about PAGE_BYTES; the asker acknowledges each
  page (QueryMore) before the next is read, so memory on both sides is bound
  by a page (the asker keeps what it has received, as its caller asked for it).
- A query lives on one channel, the one its request went out on (came in
  on): when that channel closes it ends at once on both sides
  (sync/requests.py keeps the queries in flight). The asker
  sends it again on the surviving channel if no page had come yet (the
  channel lost a simultaneous dial), else it is DEVICE_OFFLINE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
from typing import Any

from p2pstore.tasks import TaskSet
from p2pstore.errors import (
    DeviceOffline,
    DeviceUntrusted,
    InvalidPredicate,
    P2PStoreError,
    ProtocolError,
    ResultTooLarge,
    SyncTimeout,
    by_name,
)
from p2pstore.net.channel import Channel
from p2pstore.net.devices import DeviceDirectory
from p2pstore.net.peers import PeerManager
from p2pstore.protocol.messages import (
    MAX_PAYLOAD,
    PAGE_BYTES,
    Message,
    QueryError,
    QueryMore,
    QueryPage,
    QueryRequest,
    pack_values,
    unpack,
)
from p2pstore.schema.predicates import compile_predicates, decode_predicates, encode_predicates, quote_ident
from p2pstore.store.changes import TEXT_FACTORY
from p2pstore.store.database import Store
from p2pstore.protocol.results import MAX_RESULT_BYTES, ResultBudget
from p2pstore.store.registry import StoreRegistry
from p2pstore.sync.requests import Delivery, Overflow, Request, Requests

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
#: Rows fetched from SQLite at a time while filling a page.
FETCH_ROWS = 512
#: Queries a peer may run here at once.
MAX_SERVING_PER_PEER = 4
#: Times a query is sent again when its channel closed before the first page.
CHANNEL_RETRIES = 3
#: Messages a query may have waiting (one is all a well-behaved peer sends at a time).
INBOX_SIZE = 4


def _value_size(value: Any) -> int:
    """About what ``value`` takes in msgpack (exact for str and bytes)."""
    if isinstance(value, bytes):
        return len(value) + 5
    if isinstance(value, str):
        return (len(value) if value.isascii() else len(value.encode("utf-8", "surrogateescape"))) + 5
    return 9


def build_query(store: Store, table: str, columns: tuple[str, ...], predicates: Any) -> tuple[str, tuple[Any, ...], list[str]]:
    """Bound SQL for a peer's query, or a P2PStoreError naming what is wrong."""
    allowed = store.synced_columns(table)
    if not isinstance(predicates, dict):
        raise InvalidPredicate("predicates must be an object", data={"path": "/"})
    chosen = list(columns) or list(allowed)
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        raise InvalidPredicate(f"column(s) {', '.join(map(repr, unknown))} of {table} are not synced by this device",
                               data={"path": "/columns"})
    compiled = compile_predicates({**predicates, "table": table}, allowed)
    tail, params = compiled.tail()
    sql = f"SELECT {', '.join(quote_ident(c) for c in chosen)} FROM {quote_ident(table)}{tail}"
    return sql, params, chosen


class _Pager:
    """A read-only cursor on its own connection, read a page at a time (in a thread)."""

    def __init__(self, path: str, sql: str, params: tuple[Any, ...]) -> None:
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self.conn.text_factory = TEXT_FACTORY  # TEXT that is not valid UTF-8 is answered, not an error
        self.conn.execute("PRAGMA busy_timeout = 5000")
        self.conn.execute("BEGIN")  # one snapshot for every page
        self.cursor = self.conn.execute(sql, params)
        self._fetched: list[tuple[Any, ...]] = []  # fetched, not yet paged (last row first)

    def page(self) -> tuple[bytes, bool]:
        """The next page: rows up to PAGE_BYTES (at least one), and whether it is the last."""
        rows: list[list[Any]] = []
        size = 0
        while True:
            if not self._fetched:
                self._fetched = self.cursor.fetchmany(FETCH_ROWS)[::-1]
                if not self._fetched:
                    return pack_values(rows), True
            row = self._fetched[-1]
            row_size = sum(_value_size(v) for v in row) + 2
            if rows and size + row_size > PAGE_BYTES:
                return pack_values(rows), False
            if row_size > MAX_PAYLOAD:
                raise ResultTooLarge(f"a row of the result is {row_size} bytes; a page carries at most {MAX_PAYLOAD}")
            self._fetched.pop()
            rows.append(list(row))
            size += row_size

    def close(self) -> None:
        self.conn.close()


class RemoteQueries:
    """Both sides of remote query: asking (``query``) and answering (``handle``)."""

    def __init__(self, *, registry: StoreRegistry, peers: PeerManager, directory: DeviceDirectory,
                 timeout: float = DEFAULT_TIMEOUT, max_result_bytes: int = MAX_RESULT_BYTES) -> None:
        #: Most a caller gets from one remote query, as for ``store.query``
        #: (protocol/results.py): the result is held whole to answer the API call.
        self.max_result_bytes = max_result_bytes
        self.registry = registry
        self.peers = peers
        self.directory = directory
        self.timeout = timeout
        #: Queries in flight, each on its channel: asked here (our ids) and answered here
        #: (the peer's ids). A peer that floods one has its extra messages dropped.
        self._asking = Requests(inbox_size=INBOX_SIZE, overflow=Overflow.DROP)
        self._answering = Requests(inbox_size=INBOX_SIZE, overflow=Overflow.DROP)
        self._tasks = TaskSet(log)

    async def stop(self) -> None:
        await self._tasks.close()

    def on_peer_change(self, peer: str, online: bool) -> None:
        if not online:
            self._asking.peer_offline(peer)
            self._answering.peer_offline(peer)

    def on_channel_closed(self, peer: str, channel: Channel) -> None:
        """A channel closed (PeerManager): the queries on it end now, not at their timeout."""
        self._asking.channel_closed(channel)
        self._answering.channel_closed(channel)

    # -- messages from peers ---------------------------------------------------

    async def handle(self, peer: str, msg: Message, channel: Channel) -> bool:
        """Take a remote-query message (from ``channel``); False if it is not one."""
        if isinstance(msg, QueryRequest):
            if self._answering.count(peer) >= MAX_SERVING_PER_PEER:
                await self._send_quietly(peer, QueryError(msg.req, "BUSY", "too many queries from this device at once"), channel)
                return True
            query = self._answering.accept(peer, msg.req, channel)
            if query is None:
                log.warning("peer %s reused remote query id %d; ignored", peer, msg.req)
                return True
            self._tasks.spawn(self._answer(query, msg), f"answer query {msg.req} from {peer[:7]}")
            return True
        if isinstance(msg, QueryMore):
            delivery = self._answering.deliver(peer, msg.req, msg)
        elif isinstance(msg, (QueryPage, QueryError)):
            delivery = self._asking.deliver(peer, msg.req, msg)
        else:
            return False
        if delivery is Delivery.OVERFLOWED:
            log.warning("peer %s floods remote query %d; dropping its messages", peer, msg.req)
        return True

    async def _answer(self, query: Request, msg: QueryRequest) -> None:
        peer, channel = query.peer, query.channel
        pager: _Pager | None = None
        try:
            store = await self.registry.for_peer(msg.bundle, msg.store)
            self.directory.check_may_receive(peer, store)
            try:
                predicates = decode_predicates(msg.predicates)
            except ValueError as exc:
                raise InvalidPredicate(f"predicates are not valid JSON: {exc}") from None
            sql, params, columns = build_query(store, msg.table, msg.columns, predicates)
            pager = await asyncio.to_thread(_Pager, str(store.path), sql, params)
            pages = 0
            while True:
                rows, last = await asyncio.to_thread(pager.page)
                await self.peers.send(peer, QueryPage(msg.req, tuple(columns), rows, last), channel=channel)
                pages += 1
                if last:
                    break
                more = await query.next(self.timeout)
                if not isinstance(more, QueryMore):
                    return  # the asker went away or gave up
            log.info("answered remote query from %s on %s/%s.%s (%d page(s))", peer, msg.bundle, msg.store, msg.table, pages)
        except P2PStoreError as exc:
            log.info("refused remote query from %s on %s/%s.%s: %s", peer, msg.bundle, msg.store, msg.table, exc.message)
            await self._send_quietly(peer, QueryError(msg.req, exc.name, exc.message[:1000]), channel)
        except sqlite3.Error as exc:
            await self._send_quietly(peer, QueryError(msg.req, "SQL_ERROR", str(exc)[:1000]), channel)
        except asyncio.TimeoutError:
            log.info("remote query %d from %s abandoned (no request for the next page)", msg.req, peer)
        finally:
            self._answering.finish(query)
            if pager is not None:
                await asyncio.to_thread(pager.close)

    async def _send_quietly(self, peer: str, msg: Message, channel: Channel) -> None:
        try:
            await self.peers.send(peer, msg, channel=channel)
        except P2PStoreError:
            pass

    # -- asking ---------------------------------------------------------------

    async def query(self, store: Store, device: str, table: str, predicates: dict[str, Any] | None,
                    columns: list[str] | None) -> dict[str, Any]:
        """``store.remote_query``: all rows, or a clear error."""
        if not self.directory.trust_store.is_trusted(device):
            raise DeviceUntrusted(f"device {device} is not trusted", data={"device_id": device})
        if not await self.peers.reach(device):  # (a device outside the active set: a channel on demand)
            raise DeviceOffline(f"device {device} is offline", data={"device_id": device})
        predicates = {k: v for k, v in (predicates or {}).items() if k not in ("table", "devices")}
        try:
            # A template: each attempt sends it under a fresh req.
            request = QueryRequest(1, store.bundle, store.name, table, tuple(columns or ()), encode_predicates(predicates))
        except ProtocolError as exc:  # e.g. predicates over the message limit: the caller's input, not the peer's
            raise InvalidPredicate(f"predicates can't be sent: {exc.message}", data={"path": "/"}) from None
        for attempt in range(1 + CHANNEL_RETRIES):
            channel = await self.peers.wait_channel(device)
            if channel is None:
                break
            if attempt:
                log.info("remote query to %s: its connection closed before any answer; asking again on the new one", device)
            answer = await self._ask(device, channel, request)
            if answer is not None:
                return answer
        raise DeviceOffline(f"device {device} went offline during the query", data={"device_id": device})

    async def _ask(self, device: str, channel: Channel, request: QueryRequest) -> dict[str, Any] | None:
        """The query on ``channel``: the result, or None if the channel closed before any page came."""
        query = self._asking.start(device, channel)
        req = query.req
        result_columns: list[str] = []
        rows: list[list[Any]] = []
        budget = ResultBudget(max_bytes=self.max_result_bytes, source=f"the query on {device}",
                              hint="add a limit and page with offset", data={"device_id": device})
        try:
            try:
                await self.peers.send(device, dataclasses.replace(request, req=req), channel=channel)
            except DeviceOffline:
                return None
            while True:
                try:
                    msg = await query.next(self.timeout)
                except asyncio.TimeoutError:
                    raise SyncTimeout(f"device {device} did not answer the query within {self.timeout:g} s") from None
                if msg is None:
                    if not query.moved:
                        return None
                    raise DeviceOffline(f"device {device} went offline during the query", data={"device_id": device})
                if isinstance(msg, QueryError):
                    cls = by_name(msg.name)
                    raise cls(f"device {device}: {msg.message}", data={"device_id": device})
                assert isinstance(msg, QueryPage)
                query.moved = True
                if not result_columns:
                    result_columns = list(msg.columns)
                    budget.add_columns(result_columns)
                for row in decode_rows(msg.rows):
                    # Past a cap: the answering device stops by itself when no QueryMore comes.
                    budget.add(row)
                    rows.append(row)
                if msg.last:
                    return {"columns": result_columns, "rows": rows}
                await self.peers.send(device, QueryMore(req), channel=channel)
        finally:
            self._asking.finish(query)


def decode_rows(payload: bytes) -> list[list[Any]]:
    """A page's rows; anything but a list of lists of SQLite values is a ProtocolError."""
    rows = unpack(payload, "query page", raw_text=True)
    if not isinstance(rows, list) or not all(
        isinstance(r, list) and all(v is None or isinstance(v, (int, float, str, bytes)) for v in r) for r in rows
    ):
        raise ProtocolError("a query page must be a list of rows of SQLite values")
    return rows
