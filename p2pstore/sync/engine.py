"""The sync engine: runs sync sessions over peer channels against stores.

A session moves one store's change stream from a *sender* to a *receiver*
(see the protocol comment above ``SyncOpen`` in protocol/messages.py):

- push: this device opens and sends; the receiver answers with its watermark.
- pull: this device opens with its own watermark and receives.

Invariants:
- The receiver owns the watermark and moves it in the transaction that
  applies the batch (store/merge.py), so a crash on either side at any moment
  loses nothing and re-sending is harmless.
- Data leaves this device only after ``DeviceDirectory.may_receive`` (trust
  and the security-level rule) said yes for that peer and store — checked by
  the sender, whoever opened the session.
- The rules of a session (order of messages, the window, acks, result
  codes) are protocol/sync_session.py's ``Sender`` and ``Receiver``; this
  module only carries out their actions (channel sends, store reads and
  applies) and feeds them what happened (``_drive``).
- Batches are bounded (``batch_rows``) and the sender has at most
  ``window`` of them unacked (the ``sync_window`` option: it reads the next
  batch while the receiver applies the previous ones), so memory stays
  bounded whatever the size of the sync. The receiver handles a session's
  messages in order.
- Nothing a peer sends can raise out of ``handle``: a malformed or
  unexpected message ends its session with a code, never the daemon.
- One user-requested sync per store at a time (``SYNC_IN_PROGRESS``);
  auto-sync pushes run one at a time per (store, peer), coalescing bursts.
- A session lives on the channel its open went out on (or came in on): its
  messages go on that channel only, and it ends the moment that channel
  closes, whether the peer went offline or the channel lost a simultaneous
  dial (net/peers.py) — never by waiting out the timeout (the table of
  sessions in flight is sync/requests.py's). A session this device started
  that had moved no batch yet runs again on the surviving channel; one that
  had ends OFFLINE.
- Auto-sync loses no change: a change made while a push to a peer runs, or
  fails, is pushed again after it (bounded retries, then on the next change
  or when the peer comes back online).
- Dissemination (docs/sync.md, "Auto-sync in a fleet"): a device pushes its
  own changes to every online trusted peer — after a local write, those
  alone (``SyncOpen.own``; a whole-stream push follows once they pause, if
  they left relayed rows out) — but passes on what it received
  to at most ``relay_fanout`` of them, never back to the sender or to the
  changes' origin; every ``anti_entropy_interval`` (jittered) it pulls each
  auto-sync store from one random online trusted peer, which brings
  anything a lost or bounded push left out. So one change costs about
  (1 + fanout) x (N - 1) sessions in a fleet of N, not (N - 1)^2, and a
  device that missed it still converges. Beyond the full mesh (the active
  set) a change goes along its writer's tree instead, N - 1 sessions, and
  only one that came off its tree is relayed. In a fleet, a push that lingers
  reads on at most once per pace (``LINGER_PACE_PER_PEER_S``), so a burst
  costs each link one batch per pace, not one per round trip.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from p2pstore.clock import wall_ms
from p2pstore.tasks import TaskSet
from p2pstore.errors import (
    DeviceOffline,
    DiskFull,
    DeviceUntrusted,
    InvalidDeviceId,
    InvalidPredicate,
    P2PStoreError,
    ReplicaMismatch,
    SyncInProgress,
    TableNotDistributed,
)
from p2pstore.net.channel import Channel
from p2pstore.net.devices import DeviceDirectory
from p2pstore.net.identity import normalize_device_id
from p2pstore.net.peers import PeerManager
from p2pstore.protocol.batch import own_push_part
from p2pstore.protocol.replica_kind import PARTNER as REPLICA_PARTNER, ReplicaKind, problem as replica_problem
from p2pstore.protocol.table_type import TableType
from p2pstore.protocol.messages import (
    Message,
    OriginMark,
    StoreOffer,
    StoresOffer,
    SyncAck,
    SyncBatch,
    SyncOpen,
    SyncReady,
    TableOffer,
)
from p2pstore.protocol.sync_session import (  # noqa: F401 - Code, code_name, SessionEnded, Stats re-exported
    DEFAULT_WINDOW,
    MAX_WINDOW,
    Acked,
    Action,
    Apply,
    Code,
    Drained,
    Finish,
    Prepare,
    Problem,
    ReadBatch,
    Ready,
    Receiver,
    RecordAck,
    Send,
    Sender,
    SessionEnded,
    Stats,
    code_name,
    end_message,
    ended,
    result_code,
)
from p2pstore.schema.predicates import compile_predicates, decode_predicates, devices_of, encode_predicates
from p2pstore.store.database import Store, sync_work
from p2pstore.store import evolutions, policies, sync_log
from p2pstore.store.changes import OutBatch
from p2pstore.store.merge import ApplyResult
from p2pstore.store.registry import StoreRegistry
from p2pstore.store.stream import forwarded_since
from p2pstore.sync.lag import LagTracker
from p2pstore.sync.traffic import Traffic
from p2pstore.sync.requests import Delivery, Ended, Overflow, Request, Requests, Why

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Rows per batch. The receiver decodes a batch on its event loop and applies it in one
#: transaction, and local API writes wait for both. Fewer, bigger commits matter with
#: random keys (each commit rewrites every index page its keys touched: 250-row batches
#: rewrote most of a random-keyed index every time); a bigger batch holds local writes
#: longer. Measured (docs/performance.md, scripts/bench): 2000 rows once gave single_version
#: +15 % push speed but a p99 of 48 ms for writes on the receiver during a 1M-row push
#: (1000 rows: 27 ms, goal 50); with round 10's receiver (a batch's apply cheaper), 2000
#: rows: push_outside +9-10 % in both modes, the 1M push 127k-139k -> 163k-167k rows/s,
#: that p99 17.7-25.0 ms (1000 rows: 18.6-19.6 ms; round 10 in docs/performance.md).
DEFAULT_BATCH_ROWS = 2000
DEFAULT_TIMEOUT = 30.0
#: Messages a session may have waiting: a sender's whole window (at most
#: MAX_WINDOW batches, whatever its ``sync_window``) and its end; a peer that
#: floods more is cut off.
INBOX_SIZE = MAX_WINDOW + 4
#: Stored bytes of the rows of one batch (store/changes.py sizes them with
#: SQLite's length()): rows with large values (photos, documents) go fewer to
#: a batch, and a sync holds at most ``window`` such batches. length() counts
#: text in characters, so on the wire a batch is at most 4 times this (4-byte
#: UTF-8) plus clocks: still within a frame.
MAX_BATCH_BYTES = 4 * 1024 * 1024
#: Times a session this device starts runs again on a new channel when its
#: channel closed before any batch moved (a duplicate channel being replaced).
CHANNEL_RETRIES = 3
#: Pauses before an auto-sync push that failed is tried again; after the last
#: it waits for the next local change or for the peer to come back online.
AUTO_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
#: Batches of a session a receiver applies in one transaction at most, when
#: they are waiting and the application is quiet (``Receiver.take_waiting``),
#: and the time such a transaction takes at most. An application's write
#: that comes meanwhile ends it after the batch being applied
#: (``Store.apply_changes_group``), so it waits for one batch and the commit;
#: another program's write waits for the whole transaction (its busy timeout).
GROUP_COMMIT_BATCHES = 16
GROUP_COMMIT_BUDGET_S = 0.25
#: A whole-stream auto push that follows own pushes (they left relayed rows
#: out) or relays a change waits until the store has been quiet this long
#: (``Engine._whole_later``), and at most ``WHOLE_MAX_WAIT_S`` (30 s was
#: tried: fewer duplicates, but slower bursts at 16 and 32 hosts,
#: docs/performance.md "Fleet, round 3").
WHOLE_QUIET_S = 1.0
WHOLE_MAX_WAIT_S = 10.0
#: In a fleet (``LINGER_PACE_FROM_PEERS`` peers online or more), a lingering
#: push — auto-sync whose batch was still in flight when more changes came —
#: reads on at most once per this many seconds times the peers online, and
#: at most ``LINGER_PACE_MAX_S`` (``SyncEngine._pace``): a busy link then
#: carries one batch per pace however fast the writes come, so the sync work
#: of a burst stays bounded as the fleet grows (each batch costs some ms
#: whatever it holds: docs/sync.md, "Paced pushes in a fleet"). The first
#: batch of a session goes at once, and a push whose batch was acked before
#: the next change ends (the next change starts a new one): only a link that
#: is slower than the writes coalesces. Up to four devices are not paced at
#: all (the auto-sync latency goals).
LINGER_PACE_FROM_PEERS = 4
LINGER_PACE_PER_PEER_S = 0.2
LINGER_PACE_MAX_S = 5.0
#: Seconds a relay waits before its whole-stream push at the earliest
#: (``Engine._whole_later``; Plumtree's lazy push, docs/sync.md).
RELAY_DELAY_S = 0.5
#: Peers a device passes a received change on to (``relay_fanout``).
DEFAULT_RELAY_FANOUT = 1
#: Seconds between anti-entropy pulls of each auto-sync store (``anti_entropy_interval_s``; 0: none).
DEFAULT_ANTI_ENTROPY_S = 30.0
#: Each wait is the interval times a random factor in this range, so a fleet
#: started at once does not pull in lockstep.
ANTI_ENTROPY_JITTER = (0.75, 1.25)
#: An anti-entropy pull that brought changes no push had brought is followed
#: by another, from a holder not yet asked, once the store has been quiet for
#: ``WHOLE_QUIET_S`` — up to this many in a row (``SyncEngine._follow_up``):
#: pushes missed something (a link timed out under load), so the device
#: keeps pulling while pulls are fruitful instead of waiting an interval each.
ANTI_ENTROPY_STREAK = 8


#: The result codes, the error -> code table and the session's rules live in
#: protocol/sync_session.py; ``Code``, ``SessionEnded``, ``Stats``,
#: ``code_name`` and ``session_code`` stay importable from here.
session_code = result_code

#: Auto-sync failures worth no retry: they last until the peer is back (it is
#: pushed to then) or a user acts (trust, labels, the peer's tables, a resync).
AUTO_NO_RETRY = frozenset({Code.OFFLINE, Code.INVALID_ARGS, Code.DISTRIBUTED_TABLE_NOT_SET,
                           Code.DISTRIBUTED_SCHEMA_MISMATCH, Code.UNTRUSTED, Code.SECURITY_LEVEL, Code.RESYNC_REQUIRED,
                           Code.EVOLUTION_INCONSISTENT, Code.REPLICA_MISMATCH, Code.IN_CONFLICT})


class _ChannelReplaced(Exception):
    """A session's channel closed before any batch moved: safe to run it again."""


Progress = Callable[[str, int, Stats, str], None]  # (schedule, code, stats, direction)


def table_offers(store: Store) -> tuple[TableOffer, ...]:
    """The store's distributed tables as offered to peers (names and sync columns, never rows)."""
    offers = []
    for name in sorted(store.distributed):
        sync = store.sync_schema.tables.get(name) if store.sync_schema is not None else None
        policy = store.policies.get(name)
        offers.append(TableOffer(
            name, store.sync_schema_version if sync else None,
            tuple(sync.columns) if sync else (), sync.conflict if sync else None,
            policy.text() if policy is not None else None,
        ))
    return tuple(offers)


def check_tables(store: Store, table: str | None, theirs: tuple[TableOffer, ...]) -> None:
    """Raise SessionEnded unless the receiver can take what we would send.

    Single-version peers on different schema versions still sync the columns
    both sync; only a different conflict column, or no common column, stops it.
    """
    mine = {t.name: t for t in table_offers(store)}
    their = {t.name: t for t in theirs}
    needed = [table] if table else sorted(mine)
    unknown = [t for t in needed if t not in mine]
    if unknown:
        raise ended(Problem.TABLE_NOT_DISTRIBUTED,
                           f"this device has not distributed table(s) {', '.join(unknown)} of store {store.name}")
    missing = [t for t in needed if t not in their]
    if missing:
        raise ended(Problem.TABLE_NOT_DISTRIBUTED,
                           f"the peer has not distributed table(s) {', '.join(missing)} of store {store.name}")
    for name in needed:
        a, b = mine[name], their[name]
        if a.conflict_column != b.conflict_column:
            raise ended(Problem.SCHEMA_MISMATCH,
                               f"table {name}: conflict column {a.conflict_column!r} here, {b.conflict_column!r} on the peer")
        if a.conflict_column is not None and not set(a.sync_columns) & set(b.sync_columns):
            raise ended(Problem.SCHEMA_MISMATCH, f"table {name}: no sync column in common with the peer")


PeerTables = dict[tuple[str, str], dict[str, TableOffer]]


def offers_by_store(offered: tuple[StoreOffer, ...]) -> PeerTables:
    return {(o.bundle, o.store): {t.name: t for t in o.tables} for o in offered}


def revision_states(stores: list[Store], theirs: dict[tuple[str, str], tuple[tuple[int, str], ...]]) -> list[dict[str, Any]]:
    """For each store a peer offered that has evolutions here or there: the
    last revision on each side and where the peer stands (``evolutions.compare``:
    same, behind, ahead or diverged — the peer against this device)."""
    found = []
    for store in stores:
        peer_revs = theirs.get((store.bundle, store.name))
        if peer_revs is None or not (peer_revs or store.revisions):
            continue
        found.append({
            "store": store.name, "bundle": store.bundle,
            "revision": store.revisions[-1][0] if store.revisions else 0,
            "peer_revision": peer_revs[-1][0] if peer_revs else 0,
            "state": evolutions.compare(store.revisions, peer_revs),
        })
    return found


def _engine_work(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """A session's store operations are the engine's (``store.database.sync_work``):
    they never make the engine's own heavy steps wait, only the application's do."""
    @functools.wraps(method)
    async def run(*args: Any, **kwargs: Any) -> T:
        with sync_work():
            return await method(*args, **kwargs)
    return run


def _origin_marks(marks: list[tuple[str, int]]) -> tuple[OriginMark, ...]:
    return tuple(OriginMark(device, hlc) for device, hlc in marks)


def _covered(marks: tuple[OriginMark, ...]) -> dict[str, int] | None:
    return {m.device: m.hlc for m in marks} or None


def policy_mismatches(stores: list[Store], theirs: PeerTables) -> list[dict[str, Any]]:
    """Where a peer's conflict policy of a table differs from ours: reported
    (``devices.list``), since every device must set the same (store/policies.py)."""
    found = []
    for store in stores:
        peer_tables = theirs.get((store.bundle, store.name)) or {}
        for mine in table_offers(store):
            other = peer_tables.get(mine.name)
            if other is not None and other.conflict_column is not None and mine.policy != other.policy:
                found.append({"store": store.name, "bundle": store.bundle, "table": mine.name,
                              "policy": _policy_dict(mine.policy), "peer_policy": _policy_dict(other.policy)})
    return found


def schema_mismatches(stores: list[Store], theirs: PeerTables) -> list[dict[str, Any]]:
    """Where a peer's tables show a different single-version schema for a store we share.

    Peers on different schema versions still sync the columns both sync; this
    is what ``devices.list`` and ``status`` report so users know to upgrade.
    """
    found = []
    for store in stores:
        peer_tables = theirs.get((store.bundle, store.name))
        if peer_tables is None:
            continue
        for mine in table_offers(store):
            other = peer_tables.get(mine.name)
            if other is None or (mine.schema_version is None and other.schema_version is None):
                continue
            if (mine.schema_version, mine.sync_columns, mine.conflict_column) != (
                    other.schema_version, other.sync_columns, other.conflict_column):
                common = sorted(set(mine.sync_columns) & set(other.sync_columns))
                syncable = mine.conflict_column == other.conflict_column and bool(common)
                found.append({
                    "store": store.name, "bundle": store.bundle, "table": mine.name,
                    "version": mine.schema_version, "peer_version": other.schema_version,
                    "synced_columns": common if syncable else [],
                    "code": int(Code.SUCCESS if syncable else Code.DISTRIBUTED_SCHEMA_MISMATCH),
                })
    return found


def compile_where(store: Store, table: str | None, where: Any) -> Any:
    """A query-sync row filter, checked against what this device syncs of ``table``."""
    if where in (None, []):
        return None
    if table is None:
        raise InvalidPredicate("a row filter (where) needs a table", data={"path": "/where"})
    return compile_predicates({"table": table, "where": where}, store.synced_columns(table))


def _session_end(why: Ended | None) -> SessionEnded:
    """How a session ended from outside (sync/requests.py) ends, as a result."""
    if why is not None and why.why is Why.FLOODED:
        return ended(Problem.PEER_TOO_FAR_AHEAD, f"the peer sent more than {INBOX_SIZE} messages ahead in the session")
    if why is not None and why.why is Why.CHANNEL_CLOSED:
        return ended(Problem.CHANNEL_CLOSED, f"the connection to the device closed during the sync ({why.detail})")
    return ended(Problem.CHANNEL_CLOSED, "the peer went offline during the sync")


async def _wait(session: Request, machine: Sender | Receiver, timeout: float) -> list[Action]:
    """Wait for what happens next to ``session``, tell ``machine``, and return its answer."""
    try:
        msg = await session.next(timeout)
    except asyncio.TimeoutError:
        return machine.timed_out(timeout)
    if msg is not None:
        return machine.receive(msg)
    lost = _session_end(session.ended)
    return machine.channel_closed(lost.message) if lost.channel_lost else machine.abort(lost)


def _absorb(session: Request, machine: Receiver) -> list[Action]:
    """Tell ``machine`` (applying a batch) of the messages that already
    arrived, so the batches among them can join the transaction
    (``take_waiting``): each wait hands it one message, and it asks to
    apply the first batch at once. Stops at the first message it answers
    (an end, a protocol error): its actions come back."""
    for msg in session.arrived():
        actions = machine.receive(msg)
        if actions:
            return actions
    return []


async def _absorb_while(session: Request, machine: Receiver, busy: asyncio.Future[Any]) -> list[Action]:
    """``_absorb`` for as long as ``busy`` (the store applying batches)
    runs: each message that arrives meanwhile goes to ``machine`` at once,
    which decodes a batch as it arrives — while the store applies the ones
    before in its own thread (SQLite runs without the GIL), not after them.
    Stops at the first message the machine answers, as ``_absorb`` does,
    and at the session's end, which the next wait reports."""
    while not busy.done():
        actions = _absorb(session, machine)
        if actions:
            return actions
        if session.ended is not None:
            return []
        getting = asyncio.ensure_future(session.inbox.get())
        await asyncio.wait({busy, getting}, return_when=asyncio.FIRST_COMPLETED)
        if not getting.done():
            getting.cancel()  # (a cancelled get leaves its message in the inbox)
            return []
        msg = getting.result()
        if msg is None:
            session.inbox.put_nowait(None)  # the end marker, for the next wait (room: it was just taken)
            return []
        actions = machine.receive(msg)
        if actions:
            return actions
    return []


class SyncEngine:
    def __init__(
        self,
        *,
        registry: StoreRegistry,
        peers: PeerManager,
        directory: DeviceDirectory,
        on_applied: Callable[[Store, str, ApplyResult], None],
        batch_rows: int = DEFAULT_BATCH_ROWS,
        timeout: float = DEFAULT_TIMEOUT,
        auto_sync: bool = True,
        window: int = DEFAULT_WINDOW,
        relay_fanout: int = DEFAULT_RELAY_FANOUT,
        anti_entropy_interval: float = DEFAULT_ANTI_ENTROPY_S,
        rng: random.Random | None = None,
        sync_log_entries: int = sync_log.DEFAULT_KEEP,
    ) -> None:
        self.registry = registry
        self.peers = peers
        self.directory = directory
        self.on_applied = on_applied
        self.batch_rows = batch_rows
        self.timeout = timeout
        #: Batches a sender may have unacked (``sync_window``; protocol/sync_session.py).
        self.window = window
        self.auto_sync_enabled = auto_sync
        #: Peers a received change is passed on to (``relay_fanout``), and how
        #: often each auto-sync store is pulled from a random peer (0: never).
        self.relay_fanout = relay_fanout
        self.anti_entropy_interval = anti_entropy_interval
        #: Sync log entries kept per store (``sync_log_entries``; store/sync_log.py).
        self.sync_log_entries = sync_log_entries
        self._rng = rng or random.Random()
        self._anti_entropy_running: set[tuple[str, str]] = set()
        #: Sessions in flight, both ways, each on its channel; a peer that floods one ends it.
        self._sessions = Requests(inbox_size=INBOX_SIZE, overflow=Overflow.END)
        self._running_syncs: set[tuple[str, str]] = set()
        self._auto: dict[tuple[tuple[str, str], str], bool] = {}  # (store, peer) -> dirty again while running
        self._auto_whole: set[tuple[tuple[str, str], str]] = set()  # the next auto push sends the whole stream
        self._whole_timers: dict[tuple[tuple[str, str], str], asyncio.TimerHandle] = {}  # (``_whole_later``)
        self._follow_timers: dict[tuple[str, str], asyncio.TimerHandle] = {}  # store -> (``_follow_up``)
        self._active: dict[tuple[str, str], float] = {}  # store -> when it last wrote or applied a change (monotonic)
        #: (store, peer) -> (this store's stream, {device: since which seq every eager read for the peer forwarded it})
        self._forwarded: dict[tuple[str, str, str], tuple[str | None, dict[str, int]]] = {}
        #: (store, peer) -> the peer's watermark in our stream as it last acked a whole-stream batch
        self._whole_acked: dict[tuple[str, str, str], int] = {}
        self._tasks = TaskSet(log)
        self._stopped = False
        #: One catch-up of a restored store at a time (store -> lock).
        self._catch_ups: dict[tuple[str, str], asyncio.Lock] = {}
        #: Each peer's tables per store as last seen in a sync session (fresher than its HELLO).
        self.peer_tables: dict[str, PeerTables] = {}
        #: Each peer's applied evolutions per store, from its last offer (``revision_states``).
        self.peer_revisions: dict[str, dict[tuple[str, str], tuple[tuple[int, str], ...]]] = {}
        #: Per-peer lag figures for status and devices.list (sync/lag.py).
        self.lag = LagTracker(code_name)
        #: Per-peer sessions, batches, bytes and duplicates (sync/traffic.py).
        self.traffic = Traffic()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the background work that needs no event: anti-entropy."""
        if self.auto_sync_enabled and self.anti_entropy_interval > 0:
            self._spawn(self._anti_entropy_loop(), "anti-entropy")

    async def stop(self) -> None:
        self._stopped = True  # a session a peer opens from now on is not served: the stores close next
        for timers in (self._whole_timers, self._follow_timers):
            for timer in timers.values():
                timer.cancel()
            timers.clear()
        await self._tasks.close()

    def _spawn(self, coro: Any, name: str) -> None:
        if self._stopped:
            coro.close()
            return
        self._tasks.spawn(coro, name)

    # -- messages from peers ---------------------------------------------------

    async def handle(self, peer: str, msg: Message, channel: Channel) -> None:
        """Route one message from a peer (called in order per channel; never blocks long).

        A session the peer opens lives on ``channel``, the one its open came on."""
        if isinstance(msg, StoresOffer):
            self.peer_tables[peer] = offers_by_store(msg.stores)
            self.peer_revisions[peer] = {(o.bundle, o.store): tuple((r.id, r.hash) for r in o.revisions) for o in msg.stores}
            self.lag.offered(peer, msg.stores)
            return
        if isinstance(msg, SyncOpen):
            if self._stopped:
                log.debug("session %d from %s not served: this daemon is stopping", msg.req, peer)
                return
            session = self._sessions.accept(peer, msg.req, channel)
            if session is None:
                log.warning("peer %s reused session id %d; ignored", peer, msg.req)
                return
            self.traffic.session(peer, served=True)
            self._spawn(self._serve(session, msg), f"serve {msg.mode} {msg.store} for {peer}")
            return
        req = getattr(msg, "req", None)
        delivery = self._sessions.deliver(peer, req, msg) if isinstance(req, int) else Delivery.UNKNOWN
        if delivery is Delivery.UNKNOWN and isinstance(msg, (SyncBatch, SyncAck, SyncReady)):
            log.debug("message %s for unknown session %s from %s; ignored", type(msg).__name__, req, peer)
        elif delivery is Delivery.OVERFLOWED:
            log.warning("peer %s floods session %d; ending it", peer, req)

    def on_channel_closed(self, peer: str, channel: Channel) -> None:
        """A channel closed (PeerManager): its sessions end now, not at their timeout."""
        self._sessions.channel_closed(channel)

    def on_peer_change(self, peer: str, online: bool) -> None:
        if not online:
            self._sessions.peer_offline(peer)
        else:
            for store in self.registry.stores():
                if store.restore_pending:  # a restored store catches up as soon as a peer is there
                    self._spawn(self._catch_up_quietly(store, peer), f"catch-up {store.name} from {peer}")
                elif self.auto_sync_enabled and any(store.auto_sync.values()) and peer in self._auto_peers():
                    # (Re)connected: push what the peer missed; it does the same towards us.
                    self._schedule_auto(store, peer)

    def _learn(self, peer: str, store: Store, tables: tuple[TableOffer, ...]) -> None:
        if tables:
            self.peer_tables.setdefault(peer, {})[(store.bundle, store.name)] = {t.name: t for t in tables}

    def peer_view(self, peer: str, hello_stores: tuple[StoreOffer, ...]) -> PeerTables:
        """What we know of a peer's tables: its HELLO, updated by later sessions."""
        return {**offers_by_store(hello_stores), **self.peer_tables.get(peer, {})}

    async def _send(self, session: Request, msg: Message) -> None:
        """Send on the session's own channel: a channel that closed under it ends it."""
        try:
            await self.peers.send(session.peer, msg, channel=session.channel)
        except (DeviceOffline, DeviceUntrusted) as exc:
            raise SessionEnded(result_code(exc), exc.message, channel_lost=isinstance(exc, DeviceOffline)) from None

    # -- the two roles ---------------------------------------------------------

    async def _begin_send(self, store: Store, peer: str, since: int, stream: str | None, table: str | None,
                          where: Any) -> tuple[int, int | None]:
        """Where to start sending to ``peer`` (and the resync clock if it must
        be resynced); a table or query sync can't resync it: RESYNC_REQUIRED."""
        start, snapshot = await store.begin_send(peer, since, stream)
        self.lag.acked(peer, store.bundle, store.name, since, stream)
        if store.restore_pending:  # the peer just showed that the file went back in time
            self._spawn(self._catch_up_quietly(store, peer), f"catch-up {store.name} from {peer}")
            raise ended(Problem.RESTORE_PENDING, restore_pending_message(store))
        if snapshot is not None and (table is not None or where is not None):
            raise ended(Problem.BEHIND_FORGOTTEN_DELETES, f"the device is behind deletes this device has forgotten (store {store.name}); "
                                                     "a full sync (no table, no where) resyncs it")
        return start, snapshot

    async def _refuse_if_behind(self, store: Store, peer: str) -> None:
        """A receiver's check: changes from a peer behind what we forgot may bring deleted rows back."""
        if await store.must_resync_first(peer):
            raise ended(Problem.BEHIND_FORGOTTEN_DELETES, f"the device is behind deletes the other side has forgotten (store "
                                                     f"{store.name}); it must first get a full sync from there (a resync)")

    async def _drive(self, session: Request, machine: Sender | Receiver, actions: list[Action],
                     do: Callable[[Action], Awaitable[list[Action]]]) -> Stats:
        """Run one side of a session: carry out ``machine``'s actions — sends
        here, the store's part in ``do`` — and feed it what happens, until it
        finishes. Success returns its stats; any other ending is raised."""
        pending = deque(actions)
        while True:
            while pending:
                action = pending.popleft()
                if isinstance(action, Send):
                    if isinstance(action.message, SyncBatch):
                        session.moved = True  # from here the peer may apply it
                        self.traffic.sent(session.peer, len(action.message.payload))
                    await self._send(session, action.message)
                elif isinstance(action, Finish):
                    if action.code == Code.SUCCESS:
                        return machine.stats
                    raise action.end
                else:
                    pending.extend(await do(action))
            pending.extend(await _wait(session, machine, self.timeout))

    async def _send_stream(self, session: Request, store: Store, table: str | None, where: Any,
                           progress: Progress | None, *, opening: SyncOpen | None = None, since: int = 0,
                           snapshot: int | None = None, copy_of: str | None = None, refresh: bool = False,
                           marks: bool = False, have: tuple[OriginMark, ...] = (),
                           linger: Callable[[], bool] | None = None, own: bool = False,
                           left_out: Callable[[], None] | None = None) -> Stats:
        """Sender: batches until the stream is drained, each acked, then SyncEnd
        — or, with ``linger`` (an auto push), on in the same session while
        ``linger()`` says changes came meanwhile (protocol/sync_session.py).

        ``marks``: leave out rows the receiver's origin marks cover (protocol
        3: ``have``, from its pull's open, else its ready, then each ack) —
        not for a ``refresh``, whose point is to send them.

        ``opening`` (a push): our SyncOpen; the receiver's ready says where to
        start (after the table checks). Otherwise start after ``since``.
        ``snapshot`` (a clock): send a resync instead (store/gc.py);
        ``copy_of`` (the peer): our copy of its rows, for its catch-up
        (store/restore.py). The peer's last ack of a whole-stream batch is
        recorded for compaction.

        ``own`` (an auto push after local changes): only rows with a change of
        this device; ``left_out`` is called when a batch had to leave out a
        relayed one the receiver's marks did not cover (it then still needs a
        whole-stream push).
        """
        machine = Sender(session.req, window=self.window, linger=linger is not None)
        cursor: Any = None
        covered = _covered(have) if marks else None
        read_at = time.monotonic()  # when the last batch was read (``_pace``)

        async def do(action: Action) -> list[Action]:
            nonlocal cursor, snapshot, covered, read_at
            if isinstance(action, Prepare):
                ready = action.ready
                self._learn(session.peer, store, ready.tables)
                check_tables(store, table, ready.tables)
                start, snapshot = await self._begin_send(store, session.peer, ready.since, ready.stream, table, where)
                if refresh and snapshot is None:
                    start = 0  # a push --refresh: the whole stream again (what the peer has is a no-op there)
                if marks and not refresh:
                    covered = _covered(ready.have)
                return machine.begin(start, always_send=snapshot is not None)
            if isinstance(action, ReadBatch):
                read_at = time.monotonic()
                if copy_of is not None:
                    batch, cursor = await store.read_copy(copy_of, cursor, limit=self.batch_rows, max_bytes=MAX_BATCH_BYTES)
                elif snapshot is not None:
                    batch, cursor = await store.read_resync(cursor, snapshot, limit=self.batch_rows, max_bytes=MAX_BATCH_BYTES)
                else:
                    forwarding, grants = (self._forwarding(store, session.peer, action.since) if own
                                          else (frozenset(), self._granting(store, session.peer)))
                    batch = await store.read_changes(table, action.since, where=where, limit=self.batch_rows,
                                                     max_bytes=MAX_BATCH_BYTES, covered=covered, own_only=own,
                                                     forwarding=forwarding, grants=grants)
                    if own:
                        batch = self._check_forwarding_stream(store, session.peer, action.since, forwarding, batch)
                    else:
                        batch = self._check_granting_stream(store, session.peer, batch)
                    if own and not batch.full and left_out is not None and not self.peers.overlay.sparse:
                        # (In a large fleet what an eager push leaves out comes along its own writer's
                        # tree; relays and anti-entropy repair the rest, as for any lost push.)
                        left_out()
                return machine.batch_read(batch)
            if isinstance(action, Acked):
                if marks and not refresh and action.ack.have:
                    covered = _covered(action.ack.have)  # what the receiver got meanwhile, from us or elsewhere
                key = (session.peer, store.bundle, store.name)
                if action.watermark is not None:
                    self.lag.acked(*key, *action.watermark)
                self.lag.moved(key, action.batch.count)
                self.traffic.acked(session.peer, action.batch.count)
                if progress is not None:
                    progress("in_progress", Code.SUCCESS, machine.stats, "upload")
                return []
            if isinstance(action, RecordAck):
                await store.record_ack(session.peer, action.seq, action.stream)
                self._whole_acked[(store.bundle, store.name, session.peer)] = action.seq
                return []
            if isinstance(action, Drained):
                assert linger is not None
                if not linger():
                    return machine.stop()
                await asyncio.sleep(max(0.0, read_at + self._pace() - time.monotonic()))
                return machine.resume()
            raise TypeError(f"a sender has no {type(action).__name__}")

        if opening is not None:
            actions = machine.start(opening)
        else:
            actions = machine.begin(since, always_send=snapshot is not None or copy_of is not None)
        return await self._drive(session, machine, actions, do)

    async def _receive_stream(self, session: Request, store: Store, progress: Progress | None, opening: Message, *,
                              marks: bool = True, own: bool = False) -> Stats:
        """Receiver: send ``opening`` (a push's SyncReady, a pull's SyncOpen),
        then apply each batch (with the watermark) and ack it, until SyncEnd;
        ``marks``: each ack says what the store now holds (none for a ``refresh`` pull);
        ``own``: a push of the sender's own changes only (its partial batches move the eager position)."""
        machine = Receiver(session.req)
        per_batch_s: list[float] = []  # how long applying one batch took, last time

        async def do(action: Action) -> list[Action]:
            if not isinstance(action, Apply):
                raise TypeError(f"a receiver has no {type(action).__name__}")
            session.moved = True
            early = _absorb(session, machine)
            group = [(action.batch, action.size)]
            if not early and store.application_quiet() and per_batch_s:
                # Batches that came meanwhile share the transaction (one commit), as many as fit the
                # budget at the pace measured so far; not while the application writes.
                fit = int(GROUP_COMMIT_BUDGET_S / per_batch_s[-1])
                group += machine.take_waiting(min(GROUP_COMMIT_BATCHES, fit) - 1)
            if own:
                group = [(own_push_part(batch), size) for batch, size in group]
            done: list[tuple[tuple[OutBatch, int], ApplyResult]] = []
            while len(done) < len(group):  # more than once when the application wrote meanwhile
                rest = group[len(done):]
                started = time.monotonic()
                applying = asyncio.ensure_future(store.apply_changes_group([batch for batch, _ in rest], session.peer,
                                                                           budget_s=GROUP_COMMIT_BUDGET_S))
                try:
                    if not early:
                        early = await _absorb_while(session, machine, applying)
                    results = await applying
                except BaseException:
                    applying.cancel()
                    raise
                per_batch_s[:] = [max((time.monotonic() - started) / len(results), 1e-4)]
                self.traffic.committed(session.peer)
                done += zip(rest, results)
            actions: list[Action] = list(early)
            for (batch, size), result in done:
                self.on_applied(store, session.peer, result)
                self.lag.received(session.peer, store.bundle, store.name, batch)
                self.traffic.received(session.peer, size, batch.count, result.applied, result.conflicts, result.failed)
                have = _origin_marks(list(result.marks)) if marks else ()
                actions += machine.applied(result.last_seq, result.applied, result.conflicts, result.failed, result.parked, have)
                if progress is not None:
                    progress("in_progress", Code.SUCCESS, machine.stats, "download")
                if (result.applied and self.auto_sync_enabled and any(store.auto_sync.values())
                        and store.table_type == TableType.SINGLE_VERSION):
                    # Relay: what we received goes on to a few of our other peers (they dedupe).
                    # (A collaborative stream holds only a device's own rows: nothing to pass on.)
                    self._active[(store.bundle, store.name)] = time.monotonic()
                    for child in self.tree_children(session.peer, result.remote_devices()):
                        self._schedule_auto(store, child, own=True)  # eager, along the writer's tree
                    for other in self.relay_targets(session.peer, result.remote_devices(), store):
                        self._whole_later(store, other, RELAY_DELAY_S)
            return actions

        return await self._drive(session, machine, machine.start(opening), do)

    # -- serving a peer's request ----------------------------------------------

    @_engine_work
    async def _serve(self, session: Request, msg: SyncOpen) -> None:
        peer = session.peer
        code: int | None = None  # set once the session is tracked (the store exists)
        at, t0, stats, problem = wall_ms(), time.monotonic(), Stats(), ""
        store: Store | None = None
        try:
            store = await self.registry.for_peer(msg.bundle, msg.store)
            self.lag.begin(peer, msg.bundle, msg.store)
            code = int(Code.FAIL)
            self._learn(peer, store, msg.tables)
            store.require_consistent()
            _check_replicas(store, peer, msg.mode, ReplicaKind(msg.replica))
            if msg.mode == "push":  # the peer sends, we receive
                await self._refuse_if_behind(store, peer)
                since, stream, marks = await store.receiving(peer, own=msg.own)
                ready = SyncReady(msg.req, since, table_offers(store), stream, have=_origin_marks(marks))
                stats = await self._receive_stream(session, store, None, ready, own=msg.own)
                log.info("received %d change(s) of %s/%s from %s (%s%s)", stats.sent, msg.bundle, msg.store, peer,
                         "its own changes, " if msg.own else "", stats.outcome())
            elif msg.mode == "catchup":  # the peer was restored from a backup: our copy of its rows goes back to it
                self.directory.check_may_receive(peer, store)
                since, stream = await store.position(peer)
                await self._send(session, SyncReady(msg.req, since, table_offers(store), stream))
                stats = await self._send_stream(session, store, None, None, None, copy_of=peer)
                log.info("sent %d row(s) of %s/%s back to their device %s (its catch-up after a restore)",
                         stats.sent, msg.bundle, msg.store, peer)
            else:  # the peer pulls: we send
                if store.restore_pending:
                    self._spawn(self._catch_up_quietly(store, peer), f"catch-up {store.name} from {peer}")
                    raise ended(Problem.RESTORE_PENDING, restore_pending_message(store))
                store.require_not_in_conflict()
                self.directory.check_may_receive(peer, store)
                check_tables(store, msg.table, msg.tables)
                where = compile_where(store, msg.table, _parse_where(msg.where))
                start, snapshot = await self._begin_send(store, peer, msg.since or 0, msg.stream, msg.table, where)
                stats = await self._send_stream(session, store, msg.table, where, None, since=start, snapshot=snapshot,
                                                marks=True, have=msg.have)
                log.info("sent %d change(s) of %s/%s to %s (pulled)", stats.sent, msg.bundle, msg.store, peer)
            code = int(Code.SUCCESS)
        except SessionEnded as end:
            if code is not None:
                code, problem = end.code, end.message
            log.info("sync session %d with %s on %s/%s ended: code %d %s", msg.req, peer, msg.bundle, msg.store, end.code, end.message)
            await self._end_quietly(session, end)
        except P2PStoreError as exc:
            if code is not None:
                code, problem = session_code(exc), exc.message
            log.warning("sync session %d with %s on %s/%s failed: %s", msg.req, peer, msg.bundle, msg.store, exc.message)
            await self._end_quietly(session, SessionEnded(session_code(exc), exc.message))
        except Exception as exc:  # a bug here must end the session, not leave the peer waiting
            log.exception("sync session %d with %s on %s/%s crashed", msg.req, peer, msg.bundle, msg.store)
            await self._end_quietly(session, ended(Problem.INTERNAL, f"internal error on the peer: {type(exc).__name__}"))
        finally:
            self._sessions.finish(session)
            if code is not None:
                self.lag.end(peer, msg.bundle, msg.store, "receive" if msg.mode == "push" else "send", code)
        if code is not None and store is not None:
            await self._log_sync(store, peer, "receive" if msg.mode == "push" else "send", "served", msg.table,
                                 msg.where, code, stats, at, t0, problem)

    async def _end_quietly(self, session: Request, end: SessionEnded) -> None:
        """Tell the peer how the session ended, if it must be told (``end_message``)."""
        msg = end_message(session.req, end)
        if msg is None:
            return
        try:
            await self.peers.send(session.peer, msg, channel=session.channel)
        except P2PStoreError:
            pass

    # -- syncs this device starts -----------------------------------------------

    async def sync(self, store: Store, mode: str, predicates: dict[str, Any] | None,
                   progress: Progress | None = None, *, refresh: bool = False) -> list[dict[str, Any]]:
        """``store.sync``: one result per target device (SPEC §2). ``mode``
        ``both``: a push then a pull of the same selection with each device,
        in this one sync slot, counted per direction. ``refresh``: from the
        start of the stream, whatever the watermarks say."""
        predicates = predicates or {}
        table = predicates.get("table")
        if table is not None:
            store.require_distributed(table)
        elif not store.distributed:
            raise TableNotDistributed(f"store {store.name} has no distributed tables; call store.set_distributed_tables first",
                                      data={"store": store.name})
        selection = Selection(table, predicates.get("where"), compile_where(store, table, predicates.get("where")), refresh)
        targets, invalid = _normalized_targets(devices_of(predicates))
        if targets is None:
            targets = self._online_trusted()
        key = (store.bundle, store.name)
        if key in self._running_syncs:
            raise SyncInProgress("a sync is already in progress; retry when it has finished", data={"store": store.name})
        self._running_syncs.add(key)
        try:
            if progress is not None:
                progress("begin", Code.SUCCESS, Stats(), "download" if mode == "pull" else "upload")
            one = self._sync_both if mode == "both" else self._sync_one
            results = invalid + await asyncio.gather(*(one(store, mode, peer, selection, progress) for peer in targets))
            if progress is not None:
                worst = max((r["code"] for r in results), default=0)
                progress("finish", worst, Stats(), "download" if mode == "pull" else "upload")
            return list(results)
        finally:
            self._running_syncs.discard(key)

    async def _sync_one(self, store: Store, mode: str, peer: str, selection: Selection,
                        progress: Progress | None) -> dict[str, Any]:
        """One direction with one device, as a result entry (code and name, message, counts)."""
        try:
            with self.lag.session(peer, store.bundle, store.name, "send" if mode == "push" else "receive", session_code):
                stats = await self._logged_session(store, mode, peer, selection, progress, "manual")
        except SessionEnded as end:
            if end.code == Code.DISK_FULL:  # the peer's disk: say so here too, once
                log.warning("sync of %s with %s: the peer's disk is full (code %d): %s", store.name, peer, end.code, end.message)
            return _result(peer, end.code, end.message)
        except P2PStoreError as exc:
            if isinstance(exc, DiskFull):  # a pull onto a full disk here
                log.warning("sync of %s with %s failed: %s", store.name, peer, exc.message)
            return _result(peer, session_code(exc), exc.message)
        verb = "pushed" if mode == "push" else "pulled"
        message = f"{verb} {stats.sent} change(s): {stats.outcome()}"
        return {**_result(peer, int(Code.SUCCESS), message),
                "sent": stats.sent, "applied": stats.applied, "conflicts": stats.conflicts, "failed": stats.failed,
                "parked": stats.parked}

    async def _sync_both(self, store: Store, mode: str, peer: str, selection: Selection,
                         progress: Progress | None) -> dict[str, Any]:
        """A push, then (whatever its outcome) a pull with ``peer``: the
        result's code is the first that is not 0, each direction's entry under
        ``push`` and ``pull``."""
        pushed = await self._sync_one(store, "push", peer, selection, progress)
        pulled = await self._sync_one(store, "pull", peer, selection, progress)
        first = pushed if pushed["code"] else pulled
        strip = ("device",)
        return {**_result(peer, first["code"], f"push: {pushed['message']}; pull: {pulled['message']}"),
                "push": {k: v for k, v in pushed.items() if k not in strip},
                "pull": {k: v for k, v in pulled.items() if k not in strip}}

    async def _logged_session(self, store: Store, mode: str, peer: str, selection: Selection,
                              progress: Progress | None, kind: str) -> Stats:
        """``_run_session``, leaving one entry in the store's sync log however
        it ends (``_log_sync``; ``_serve`` logs the sessions peers start)."""
        at, t0 = wall_ms(), time.monotonic()
        direction = "send" if mode == "push" else "receive"
        table, where_text = selection.table, selection.where_text()
        try:
            stats = await self._run_session(store, mode, peer, selection, progress)
        except (SessionEnded, P2PStoreError) as exc:
            await self._log_sync(store, peer, direction, kind, table, where_text, session_code(exc), Stats(), at, t0, exc.message)
            raise
        await self._log_sync(store, peer, direction, kind, table, where_text, int(Code.SUCCESS), stats, at, t0)
        return stats

    async def _log_sync(self, store: Store, peer: str, direction: str, kind: str, table: str | None, where: str | None,
                        code: int, stats: Stats, at: int, t0: float, message: str = "") -> None:
        """One sync log entry (store/sync_log.py): the one place every sync —
        manual, auto, anti-entropy, or served to a peer — is logged. Never
        fails the sync (a full disk, a store closed meanwhile: a warning)."""
        if not message:
            message = f"{stats.sent} sent, {stats.outcome()}"
        entry = sync_log.Entry(at, peer, direction, kind, table, where, code,
                               stats.sent, stats.applied, stats.conflicts, stats.failed, stats.parked,
                               round((time.monotonic() - t0) * 1000), message)
        try:
            await store.record_sync(entry, self.sync_log_entries)
        except Exception as exc:
            log.warning("sync of %s/%s with %s: its sync log entry was not written: %s", store.bundle, store.name, peer, exc)

    @_engine_work
    async def _run_session(self, store: Store, mode: str, peer: str, selection: Selection,
                           progress: Progress | None) -> Stats:
        if not self.directory.trust_store.is_trusted(peer):
            raise ended(Problem.NOT_TRUSTED, "the device is not trusted")
        if not await self.peers.reach(peer):  # (a device outside the active set: a channel on demand)
            raise ended(Problem.CHANNEL_CLOSED, "the device is offline")
        store.require_consistent()
        _check_replicas(store, peer, mode, None)
        if mode == "push":
            store.require_not_in_conflict()
            self.directory.check_may_receive(peer, store)
        if mode == "push" and store.restore_pending:
            await self._catch_up(store, peer)
        lost: _ChannelReplaced | None = None
        for _ in range(1 + CHANNEL_RETRIES):
            channel = await self.peers.wait_channel(peer)
            if channel is None:
                raise ended(Problem.CHANNEL_CLOSED, str(lost) if lost else "the device is offline")
            if lost is not None:
                log.info("sync of %s/%s with %s (%s): %s before any change moved; going on over the new connection",
                         store.bundle, store.name, peer, mode, lost)
            try:
                return await self._run_on(channel, store, mode, peer, selection, progress)
            except _ChannelReplaced as exc:
                lost = exc
        raise ended(Problem.CHANNEL_CLOSED, f"the connection to the device closed {1 + CHANNEL_RETRIES} times before the "
                                            "sync could start")

    async def _run_on(self, channel: Channel, store: Store, mode: str, peer: str, selection: Selection,
                      progress: Progress | None) -> Stats:
        """One attempt of ``_run_session`` on ``channel``; ``_ChannelReplaced``
        if the channel closed before any batch moved (nothing to undo)."""
        session = self._sessions.start(peer, channel)
        self.traffic.session(peer, served=False)
        req = session.req
        table, where, where_text = selection.table, selection.where, selection.where_text()
        try:
            if mode == "push":
                own = selection.own and store.table_type == TableType.SINGLE_VERSION  # (a collaborative stream is all own)
                opening = SyncOpen(req, store.bundle, store.name, "push", table, where_text, None, table_offers(store),
                                   replica=store.replica(peer).kind.value, own=own)
                return await self._send_stream(session, store, table, where, progress, opening=opening, refresh=selection.refresh,
                                               marks=True, linger=selection.linger, own=own, left_out=selection.left_out)
            await self._refuse_if_behind(store, peer)
            since, stream, marks = await store.receiving(peer)
            if selection.refresh:
                since, marks = 0, []  # the sender's whole stream again (its forgotten deletes: a resync); our watermark only moves up
            opening = SyncOpen(req, store.bundle, store.name, "pull", table, where_text, since, table_offers(store), stream,
                               replica=store.replica(peer).kind.value, have=_origin_marks(marks))
            return await self._receive_stream(session, store, progress, opening, marks=not selection.refresh)
        except SessionEnded as end:
            if end.channel_lost and not session.moved:
                raise _ChannelReplaced(end.message) from None
            await self._end_quietly(session, end)  # let the peer stop too
            raise
        except P2PStoreError as exc:
            await self._end_quietly(session, SessionEnded(session_code(exc), exc.message))
            raise
        except Exception as exc:
            # The one boundary for syncs this device starts (store.sync and
            # auto-sync): a bug or an unexpected error ends the session as
            # FAIL with a message, never as INTERNAL_ERROR or a silent stall.
            log.exception("sync of %s/%s with %s (%s) failed unexpectedly", store.bundle, store.name, peer, mode)
            message = f"internal error: {type(exc).__name__}: {exc}"[:1000].encode("utf-8", "replace").decode()
            end = ended(Problem.INTERNAL, message)
            await self._end_quietly(session, end)
            raise end from exc
        finally:
            self._sessions.finish(session)

    # -- the catch-up of a store restored from a backup (store/restore.py) -------

    @_engine_work
    async def _catch_up(self, store: Store, peer: str) -> None:
        """Fetch ``peer``'s copy of our rows of ``store`` and make ours match it
        (``Store.apply_catch_up``); RESTORE_PENDING if that could not be done.
        One at a time per store: whoever waited finds it done."""
        async with self._catch_ups.setdefault((store.bundle, store.name), asyncio.Lock()):
            if not store.restore_pending:
                return
            channel = await self.peers.wait_channel(peer)
            if channel is None:
                raise ended(Problem.BACKUP_CATCH_UP_FAILED, f"{restore_pending_message(store)}; the device is offline")
            session = self._sessions.start(peer, channel)
            self.traffic.session(peer, served=False)
            req = session.req
            back = deleted = 0
            machine = Receiver(req, await_ready=True)
            ready: SyncReady | None = None

            async def do(action: Action) -> list[Action]:
                nonlocal ready, back, deleted
                if isinstance(action, Ready):
                    ready = action.ready
                    return []
                if not isinstance(action, Apply) or ready is None:
                    raise TypeError(f"a catch-up has no {type(action).__name__} here")
                outcome = await store.apply_catch_up(action.batch, peer, ready.since, ready.stream)
                back, deleted = back + outcome.back, deleted + outcome.deleted
                self.traffic.received(peer, action.size, action.batch.count, outcome.back + outcome.deleted, 0, 0)
                return machine.applied(0, outcome.back + outcome.deleted, 0, 0)

            try:
                await store.begin_catch_up(peer)
                opening = SyncOpen(req, store.bundle, store.name, "catchup", None, None, None, table_offers(store))
                await self._drive(session, machine, machine.start(opening), do)
            except (SessionEnded, P2PStoreError) as exc:
                code = session_code(exc)
                await self._end_quietly(session, exc if isinstance(exc, SessionEnded) else SessionEnded(code, str(exc)))
                raise ended(Problem.BACKUP_CATCH_UP_FAILED, f"{restore_pending_message(store)}; the catch-up from this device "
                                                         f"failed: code {code} {exc}") from None
            finally:
                self._sessions.finish(session)
            if store.restore_pending:
                raise ended(Problem.BACKUP_CATCH_UP_FAILED, f"{restore_pending_message(store)}; the device ended the catch-up early")
            log.warning("store %s/%s caught up from %s after its restore: %d row(s) back or brought up to date, %d deleted",
                        store.bundle, store.name, peer, back, deleted)
        if self.auto_sync_enabled and any(store.auto_sync.values()):
            for other in self._auto_peers():
                self._schedule_auto(store, other)

    async def _catch_up_quietly(self, store: Store, peer: str) -> None:
        """A catch-up nobody waits for (a peer came online, or showed the restore)."""
        try:
            await self._catch_up(store, peer)
        except SessionEnded as end:
            log.warning("store %s/%s: %s", store.bundle, store.name, end.message)

    # -- auto-sync ------------------------------------------------------------

    def _pace(self) -> float:
        """Seconds between a lingering push's reads (``LINGER_PACE_PER_PEER_S``)."""
        peers = len(self._auto_peers())
        return 0.0 if peers < LINGER_PACE_FROM_PEERS else min(LINGER_PACE_PER_PEER_S * peers, LINGER_PACE_MAX_S)

    def _online_trusted(self) -> list[str]:
        return sorted(d for d in self.peers.channels() if self.directory.trust_store.is_trusted(d))

    def _auto_peers(self) -> list[str]:
        """The online trusted peers auto-sync, relays and anti-entropy talk
        to: all of them, or in a large fleet those on this device's links
        (net/overlay.py) — a channel opened on demand for a sync or a query
        carries no auto-sync, so it goes idle and closes."""
        online = self._online_trusted()
        if not self.peers.overlay.sparse:
            return online
        links = self.peers.overlay.links()
        return [p for p in online if p in links]

    def _forwarding(self, store: Store, peer: str, since: int) -> tuple[frozenset[str], dict[str, int]]:
        """What an eager push to ``peer`` that reads on from ``since`` passes
        on besides this device's own changes (the devices under whose trees
        ``peer`` is this device's child, net/overlay.py), and for each of them
        since which seq of this store's stream every read for ``peer`` has
        carried its changes: what a grant of its mark needs (protocol 5,
        ``OutBatch.grants``). Kept in memory: after a restart grants wait for
        the peer's watermark to pass the first read again."""
        forwarding = self.peers.overlay.forwarding(peer)
        key = (store.bundle, store.name, peer)
        stream, before = self._forwarded.get(key, (None, {}))
        book = forwarded_since(before, forwarding, since)
        self._forwarded[key] = (stream, book)
        acked = self._whole_acked.get(key)
        if book and (acked is None or acked < max(book.values())):
            # A grant needs the peer's watermark past where forwarding began: a lazy whole push moves
            # it — once per link (and forwarding set) since this daemon started, as along the trees
            # no relay does it (without it no grant formed in a 64-host fleet: docs/performance.md).
            self._whole_later(store, peer, WHOLE_QUIET_S)
        return forwarding, (book if stream is not None else {})

    def _granting(self, store: Store, peer: str) -> dict[str, int]:
        """What a whole push to ``peer`` grants at its end: the book of the
        eager pushes (``_forwarding``), unchanged — a whole push carries every
        change, so what the book says still holds after it. It is often the
        lazy whole push that moves the peer's watermark past the book's
        seqs, and the last push of a quiet fleet: with no grant on it, the
        peer's marks would lag until the next write."""
        stream, book = self._forwarded.get((store.bundle, store.name, peer), (None, {}))
        return dict(book) if stream is not None else {}

    def _check_granting_stream(self, store: Store, peer: str, batch: OutBatch) -> OutBatch:
        """A whole push's batch without its grants if the book they came from
        is another stream's (the store was restored since): it proves nothing
        about this one."""
        stream, _ = self._forwarded.get((store.bundle, store.name, peer), (None, {}))
        return dataclasses.replace(batch, grants=()) if batch.grants and stream != batch.stream else batch

    def _check_forwarding_stream(self, store: Store, peer: str, since: int, forwarding: frozenset[str],
                                 batch: OutBatch) -> OutBatch:
        """``_forwarding``'s positions belong to one stream of this store: on
        the first read, or when the stream changed (a restore), they start
        again from this read and the batch grants nothing."""
        key = (store.bundle, store.name, peer)
        stream, book = self._forwarded[key]
        if stream == batch.stream:
            return batch
        self._forwarded[key] = (batch.stream, forwarded_since({}, forwarding, since))
        return dataclasses.replace(batch, grants=()) if batch.grants else batch

    def tree_children(self, sender: str, origins: list[str]) -> list[str]:
        """The online peers a change received from ``sender`` goes on to at
        once: this device's children in the trees of the changes' writers
        (net/overlay.py; none in a full mesh, where each writer reaches
        everyone itself)."""
        online = set(self._auto_peers())
        found = {c for o in origins for c in self.peers.overlay.children(o)}
        return sorted(found & online - {sender, *origins})

    def relay_targets(self, sender: str, origins: list[str], store: Store | None = None) -> list[str]:
        """The peers a change received from ``sender`` goes on to: at most
        ``relay_fanout`` online trusted ones, chosen at random, never the
        sender or a device the changes came from (it pushed them itself to
        the peers it reaches; anti-entropy covers what nobody passed on),
        nor one ``store``'s replica links do not auto-send to.

        In a large fleet (the active set), a change that came along its
        writers' trees — ``sender`` is this device's parent in each of them
        — goes on along those trees only (``tree_children``): they reach
        every device in view, and a relay by each receiver was a second
        session per device and change (docs/sync.md, "The active set"). A
        change that came another way (a relay, a whole push, anti-entropy:
        some tree missed a device) is relayed as before."""
        overlay = self.peers.overlay
        if overlay.sparse and all(overlay.parent(o) == sender for o in origins):
            return []
        skip = {sender, *origins}
        others = [p for p in self._auto_peers() if p not in skip and (store is None or _auto_sends(store, p))]
        if len(others) <= self.relay_fanout:
            return others
        return sorted(self._rng.sample(others, self.relay_fanout))

    async def _anti_entropy_loop(self) -> None:
        """Every interval (jittered), each store with auto-sync tables is
        pulled from one random online trusted peer that offered it."""
        while True:
            await asyncio.sleep(self.anti_entropy_interval * self._rng.uniform(*ANTI_ENTROPY_JITTER))
            for store in self.registry.stores():
                holders = self._anti_entropy_holders(store)
                if holders:
                    self.anti_entropy(store, self._rng.choice(holders))

    def _anti_entropy_holders(self, store: Store) -> list[str]:
        """The online peers ``store`` may be pulled from in the background: it
        has auto-sync tables, and they offered it and send to this device."""
        if not any(store.auto_sync.values()) or store.restore_pending or store.inconsistent is not None:
            return []
        return [p for p in self._auto_peers() if (store.bundle, store.name) in self.peer_tables.get(p, {})
                and store.replica(p).kind in (ReplicaKind.TWO_WAY, ReplicaKind.RECEIVE)]

    def anti_entropy(self, store: Store, peer: str, streak: frozenset[str] = frozenset()) -> bool:
        """Pull ``store`` from ``peer`` in the background, unless such a pull
        of the store is already running (False then); ``streak``: the peers
        the fruitful pulls just before this one asked (``_follow_up``)."""
        key = (store.bundle, store.name)
        if key in self._anti_entropy_running:
            return False
        self._anti_entropy_running.add(key)
        self._spawn(self._anti_entropy_pull(store, peer, key, streak), f"anti-entropy {store.name} <- {peer}")
        return True

    def _quiet_in(self, key: tuple[str, str]) -> float:
        """Seconds until store ``key`` has been quiet (no change applied from
        a peer) for ``WHOLE_QUIET_S``; 0 or less: it has."""
        return self._active.get(key, -math.inf) + WHOLE_QUIET_S - time.monotonic()

    def _follow_up(self, store: Store, streak: frozenset[str], since: float) -> None:
        """The pull after a fruitful one (``ANTI_ENTROPY_STREAK``), from a
        holder this streak has not asked yet if there is one, once the store
        has been quiet for ``WHOLE_QUIET_S`` (while changes still flow the
        pushes are on their way); dropped if that takes an interval from
        ``since``, when the fruitful pull ended."""
        key = (store.bundle, store.name)
        self._follow_timers.pop(key, None)
        if self._stopped:
            return
        wait = self._quiet_in(key)
        if wait > 0:
            if time.monotonic() - since < self.anti_entropy_interval:
                self._follow_timers[key] = asyncio.get_running_loop().call_later(
                    wait, self._follow_up, store, streak, since)
            return
        holders = self._anti_entropy_holders(store)
        others = [p for p in holders if p not in streak] or holders
        if others:
            self.anti_entropy(store, self._rng.choice(others), streak)

    async def _anti_entropy_pull(self, store: Store, peer: str, key: tuple[str, str],
                                 streak: frozenset[str] = frozenset()) -> None:
        try:
            with self.lag.session(peer, store.bundle, store.name, "receive", session_code):
                stats = await self._logged_session(store, "pull", peer, Selection(), None, "anti-entropy")
            if stats.applied:
                log.info("anti-entropy: %d change(s) of %s/%s from %s that no push had brought",
                         stats.applied, store.bundle, store.name, peer)
                if len(streak) < ANTI_ENTROPY_STREAK and key not in self._follow_timers:
                    self._follow_timers[key] = asyncio.get_running_loop().call_later(
                        WHOLE_QUIET_S, self._follow_up, store, streak | {peer}, time.monotonic())
        except (SessionEnded, P2PStoreError) as exc:
            log.debug("anti-entropy pull of %s/%s from %s: code %d %s", store.bundle, store.name, peer,
                      session_code(exc), getattr(exc, "message", exc))
        finally:
            self._anti_entropy_running.discard(key)

    def on_local_changes(self, store: Store, tables: list[str]) -> None:
        """Local writes to auto-sync tables go to every online trusted peer,
        in pushes of this device's own changes (``_auto_push``)."""
        if not self.auto_sync_enabled or not any(store.auto_sync.get(t) for t in tables):
            return
        self._active[(store.bundle, store.name)] = time.monotonic()
        for peer in self._auto_peers():
            self._schedule_auto(store, peer, own=True)

    def _schedule_auto(self, store: Store, peer: str, own: bool = False) -> None:
        """Push ``store`` to ``peer`` soon: its own changes only (``own``, after
        a local write), or the whole stream (a relay, a reconnect)."""
        if not _auto_sends(store, peer):
            return  # a receive or checkout end, or a closed link: auto-sync follows the kind
        key = ((store.bundle, store.name), peer)
        if not own:
            self._auto_whole.add(key)
            timer = self._whole_timers.pop(key, None)
            if timer is not None:
                timer.cancel()
        if key in self._auto:
            self._auto[key] = True  # running: go again when it finishes
            return
        self._auto[key] = False
        self._spawn(self._auto_push(store, peer, key), f"auto-sync {store.name} -> {peer}")

    def _take_dirty(self, key: tuple[tuple[str, str], str], whole: bool) -> bool:
        """Whether changes came for ``key``'s running auto push since it last
        read (then the push goes on with them in the same session: coalescing)
        — unless a push of own changes only (``whole`` False) is asked for the
        whole stream: that one ends, and the next session sends it."""
        if not whole and key in self._auto_whole:
            return False
        if self._auto.get(key):
            self._auto[key] = False
            return True
        return False

    def _whole_later(self, store: Store, peer: str, delay: float) -> None:
        """A whole-stream auto push to ``peer`` (after a relay, or an own push
        that left relayed rows out: it also moves the peer's watermark) in
        ``delay`` seconds at the earliest, once the store has been quiet — no local write, nothing
        applied from a peer — for ``WHOLE_QUIET_S`` (at most
        ``WHOLE_MAX_WAIT_S`` after it was asked for). Lazy: while changes
        still flow, the writers' own pushes are on their way and the peer's
        origin marks lag behind them, so a whole stream would carry what the
        peer is about to get anyway; once they stop, the marks say what it
        got, and the push leaves that out. One waits per peer."""
        key = ((store.bundle, store.name), peer)
        if key not in self._whole_timers:
            self._whole_timers[key] = asyncio.get_running_loop().call_later(
                delay, self._whole_due, store, peer, key, time.monotonic())

    def _whole_due(self, store: Store, peer: str, key: tuple[tuple[str, str], str], asked: float) -> None:
        self._whole_timers.pop(key, None)
        if not (self.auto_sync_enabled and self.peers.is_online(peer)):
            return
        wait = min(self._quiet_in(key[0]), asked + WHOLE_MAX_WAIT_S - time.monotonic())
        if wait > 0:
            self._whole_timers[key] = asyncio.get_running_loop().call_later(wait, self._whole_due, store, peer, key, asked)
            return
        self._schedule_auto(store, peer)

    async def _auto_push(self, store: Store, peer: str, key: tuple[tuple[str, str], str]) -> None:
        """Push until nothing new is left: ``self._auto[key]`` (dirty) is set by
        every change while a push runs; a failed push is tried again after
        ``AUTO_RETRY_DELAYS`` (it may have left changes behind, old or new).

        Dissemination (docs/sync.md, "Auto-sync in a fleet"): a push after
        local writes carries only this device's own changes — every peer
        gets them from here, the writer — unless a relay, a reconnect or a
        failed try asked for the whole stream (``_auto_whole``)."""
        failures = 0
        try:
            while True:
                self._auto[key] = False
                whole = key in self._auto_whole or failures > 0
                self._auto_whole.discard(key)
                selection = Selection(linger=lambda: self._take_dirty(key, whole), own=not whole,
                                      left_out=lambda: self._whole_later(store, peer, WHOLE_QUIET_S))
                try:
                    with self.lag.session(peer, store.bundle, store.name, "send", session_code):
                        stats = await self._logged_session(store, "push", peer, selection, None, "auto")
                    failures = 0
                    if stats.sent:
                        log.debug("auto-sync pushed %d change(s) of %s to %s", stats.sent, store.name, peer)
                except (SessionEnded, P2PStoreError) as exc:
                    code = session_code(exc)
                    if code == Code.OFFLINE and self.peers.is_online(peer):
                        code = int(Code.FAIL)  # its channel was replaced mid-push: go again on the new one
                    if code in AUTO_NO_RETRY:
                        # Offline: on_peer_change pushes again when it is back; the rest wait for a user.
                        if code not in (Code.OFFLINE, Code.UNTRUSTED, Code.SECURITY_LEVEL):
                            log.warning("auto-sync of %s to %s: code %d %s", store.name, peer, code, exc.message)
                        return
                    failures += 1
                    if failures > len(AUTO_RETRY_DELAYS):
                        log.warning("auto-sync of %s to %s: code %d %s; gave up after %d tries (the next change or "
                                    "reconnect tries again)", store.name, peer, code, exc.message, failures)
                        return
                    delay = AUTO_RETRY_DELAYS[failures - 1]
                    log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                            "auto-sync of %s to %s: code %d %s; trying again in %g s",
                            store.name, peer, code, exc.message, delay)
                    await asyncio.sleep(delay)
                    continue
                if not self._auto.get(key) and key not in self._auto_whole:
                    return
        finally:
            self._auto.pop(key, None)


@dataclass(frozen=True, slots=True)
class Selection:
    """What a session syncs: every distributed table, or ``table`` with its
    row filter (``where_json`` as given, ``where`` compiled), and whether
    from the start of the stream (``refresh``) rather than the watermark."""

    table: str | None = None
    where_json: Any = None
    where: Any = None
    refresh: bool = False
    #: (An auto push.) Whether changes came while its batches were in flight:
    #: then the session reads on instead of ending (``Sender`` ``linger``).
    linger: Callable[[], bool] | None = field(default=None, compare=False)
    #: (An auto push after local changes.) Only this device's own changes
    #: (``SyncOpen.own``); ``left_out`` is told when it left out relayed ones.
    own: bool = False
    left_out: Callable[[], None] | None = field(default=None, compare=False)

    def where_text(self) -> str | None:
        """The filter as it travels and is logged (BLOBs as ``$blob``)."""
        return encode_predicates(self.where_json) if self.where is not None else None


def _result(peer: str, code: int, message: str) -> dict[str, Any]:
    """One ``store.sync`` result entry: the code's name beside its number (what users read and search for)."""
    return {"device": peer, "code": code, "name": code_name(code), "message": message}


def _policy_dict(text: str | None) -> dict[str, Any]:
    """A policy as offered, for people (a peer's text is untrusted: unreadable is shown as such)."""
    try:
        return (policies.Policy.parse(text) if text is not None else policies.DEFAULT).to_dict()
    except (ValueError, KeyError, TypeError, AttributeError):
        return {"unreadable": str(text)[:80]}


def _auto_sends(store: Store, peer: str) -> bool:
    """Whether auto-sync pushes ``store`` to ``peer``: only from a two-way or
    send end (a checkout's edits go back once, by ``checkin``)."""
    return store.replica(peer).kind in (ReplicaKind.TWO_WAY, ReplicaKind.SEND)


def _check_replicas(store: Store, peer: str, mode: str, opener: ReplicaKind | None) -> None:
    """``ReplicaMismatch`` unless the replica link with ``peer`` lets rows of
    ``store`` move as ``mode`` says: checked by the opener for its own end
    (``opener`` None) and by the other side for both ends (protocol/replica_kind.py).
    A restore's catch-up only needs the ends to agree."""
    mine = store.replica(peer)
    if mine.closed:
        raise ReplicaMismatch(f"store {store.name}: the checkout from {peer} was checked in and the link is closed "
                              "(`p2pstore replica set` opens another)", data={"store": store.name, "device_id": peer})
    if opener is None:  # our own end: does it go this way at all?
        ok = mine.kind.sends if mode == "push" else mine.kind.receives
        why = None if ok else f"this device is a {mine.kind} replica for {peer}: it does not {'send' if mode == 'push' else 'receive'}"
    elif mode == "push":  # the opener sends to us
        why = replica_problem(opener, mine.kind)
    elif mode == "pull":
        why = replica_problem(mine.kind, opener)
    else:
        why = None if opener in REPLICA_PARTNER[mine.kind] else f"the replica kinds do not agree: {opener} there, {mine.kind} here"
    if why is not None:
        raise ReplicaMismatch(f"store {store.name}: {why}", data={"store": store.name, "device_id": peer, "kind": mine.kind.value})


def restore_pending_message(store: Store) -> str:
    return (f"store {store.name} was restored from a backup and must catch up from a peer before it sends its own rows "
            "(it does so by itself from the next online trusted device; docs/sync.md)")


def _normalized_targets(devices: list[str] | None) -> tuple[list[str] | None, list[dict[str, Any]]]:
    """Target IDs in canonical form, each once; malformed ones become INVALID_ARGS results."""
    if devices is None:
        return None, []
    targets: list[str] = []
    invalid: list[dict[str, Any]] = []
    for text in devices:
        try:
            device = normalize_device_id(text)
        except InvalidDeviceId as exc:
            invalid.append(_result(text, int(Code.INVALID_ARGS), exc.message))
            continue
        if device not in targets:
            targets.append(device)
    return targets, invalid


def _parse_where(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return decode_predicates(text)
    except (ValueError, InvalidPredicate) as exc:
        raise ended(Problem.BAD_ROW_FILTER, f"row filter is not valid: {exc}") from None
