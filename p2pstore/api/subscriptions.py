"""Who gets which notification, and the bounded queue in front of each client.

A slow or dead subscriber never blocks the daemon: notifications go into a
per-connection outbox of at most ``queue_limit`` entries and at most
``MAX_PENDING_BYTES`` bytes (one notification may list 10k keys per list, of
any length, so a count alone does not bound memory). When it is full the
client gets an ``overflow`` notification, which tells it to re-read what it
cares about. One is queued at a time; a notification dropped after it was
handed to the socket gets a new one, so every drop is followed by an
``overflow`` the client reads after it. Responses are never dropped: they
bypass the limit — but while a client has more than ``MAX_ANSWER_BACKLOG``
bytes of answers it has not read, the server reads no further request from
it (backpressure), so a client that never reads can't make the daemon hold
an unbounded pile of answers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from p2pstore.api.jsonrpc import encode_notification
from p2pstore.api.memory import TRIM_AFTER_BYTES, give_back_memory
from p2pstore.errors import SubscriptionNotFound, TooManySubscriptions

if TYPE_CHECKING:
    from p2pstore.store.capture import ChangeBatch
    from p2pstore.store.database import Store
    from p2pstore.store.merge import ApplyResult

log = logging.getLogger(__name__)

STORE_TYPES = ("remote", "local_details", "remote_details", "conflict")
StoreKey = tuple[str, str]


#: Bytes of notifications one client may have waiting (beyond what the socket holds).
MAX_PENDING_BYTES = 8 << 20
#: Bytes of unread answers after which the server stops reading that client's requests.
MAX_ANSWER_BACKLOG = 8 << 20


class Outbox:
    """Everything the daemon sends to one client, in order."""

    def __init__(self, queue_limit: int, byte_limit: int = MAX_PENDING_BYTES) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.queue_limit = queue_limit
        self.byte_limit = byte_limit
        self.pending_notifications = 0
        self.pending_bytes = 0
        #: An ``overflow`` notification is queued and not yet taken by the writer.
        self.overflowed = False
        self.overflow_note: bytes | None = None
        self.closed = False
        self.answer_bytes = 0
        self._room = asyncio.Event()
        self._room.set()

    def send(self, data: bytes) -> None:
        """An answer: never dropped, but counted for backpressure (``room``)."""
        if not self.closed:
            self.answer_bytes += len(data)
            if self.answer_bytes > MAX_ANSWER_BACKLOG:
                self._room.clear()
            self.queue.put_nowait(_ANSWER + data)

    async def room(self) -> None:
        """Wait until the client has read enough of its answers to take more requests."""
        await self._room.wait()

    def _answer_written(self, size: int) -> None:
        self.answer_bytes -= size
        if self.answer_bytes <= MAX_ANSWER_BACKLOG:
            self._room.set()

    def notify(self, method: str, params: dict[str, Any]) -> None:
        if self.closed:
            return
        data = None if self.pending_notifications >= self.queue_limit else encode_notification(method, params)
        # Bytes count until the socket took them. One notification alone always
        # fits (else a big one could never be delivered).
        if data is None or (self.pending_bytes and self.pending_bytes + len(data) > self.byte_limit):
            if not self.overflowed:
                self.overflowed = True
                self.overflow_note = encode_notification("overflow", {
                    "message": "notifications were dropped because this client reads too slowly; re-read the data you watch",
                })
                self.queue.put_nowait(self.overflow_note)
            return
        self.pending_notifications += 1
        self.pending_bytes += len(data)
        self.queue.put_nowait(_NOTE + data)

    def close(self) -> None:
        self.closed = True
        self._room.set()
        self.queue.put_nowait(None)


#: Internal markers telling the writer loop what an entry counted against.
_NOTE = b"\x00"
_ANSWER = b"\x01"


async def drain_outbox(outbox: Outbox, writer: asyncio.StreamWriter) -> None:
    """Write the outbox to the socket until it is closed."""
    while True:
        data = await outbox.queue.get()
        if data is None:
            return
        answer = data.startswith(_ANSWER)
        note = data.startswith(_NOTE)
        if answer:
            data = data[1:]
        elif note:
            data = data[1:]
            outbox.pending_notifications -= 1
            if outbox.pending_notifications == 0:
                outbox.overflowed = False
        elif data is outbox.overflow_note:
            # Once this overflow is on its way, a later drop needs one of its
            # own: the client re-reads when it sees this one, before that drop.
            outbox.overflowed = False
            outbox.overflow_note = None
        writer.write(data)
        await writer.drain()
        size = len(data)
        del data  # the socket has it: nothing here holds the answer any more
        if note:
            outbox.pending_bytes -= size
        elif answer:
            outbox._answer_written(size)
            if size >= TRIM_AFTER_BYTES:
                give_back_memory()


@dataclass(slots=True)
class Subscription:
    id: int
    outbox: Outbox
    store: StoreKey | None  # None for device events
    type: str


@dataclass
class Subscriptions:
    """Registry of subscriptions across all connections.

    The limit is per store and counts every client of the daemon (SPEC §2):
    ``max_per_store`` subscriptions on one store, whoever holds them; the
    next is ``TOO_MANY_SUBSCRIPTIONS``. A subscription is (connection, store,
    type): subscribing again to the same type on the same connection returns
    the same id and takes no second place — even at the limit. Places free
    up on unsubscribe, ``store.close`` and when the connection closes.
    Device events (``store`` None) are not a store's and are not limited.
    """

    max_per_store: int = 8
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _subs: dict[int, Subscription] = field(default_factory=dict)

    def subscribe(self, outbox: Outbox, store: StoreKey | None, type_: str) -> int:
        on_store = [s for s in self._subs.values() if s.store == store]
        for sub in on_store:
            if sub.outbox is outbox and sub.type == type_:
                return sub.id  # a duplicate subscription is harmless, as in HarmonyOS
        if store is not None and len(on_store) >= self.max_per_store:
            raise TooManySubscriptions(
                f"store {store[0]}/{store[1]} already has {len(on_store)} subscriptions over all clients "
                f"(limit {self.max_per_store}, config max_subscriptions); unsubscribe or close a client first",
                data={"limit": self.max_per_store},
            )
        sub = Subscription(next(self._ids), outbox, store, type_)
        self._subs[sub.id] = sub
        return sub.id

    def unsubscribe(self, outbox: Outbox, store: StoreKey | None, sub_id: int) -> None:
        sub = self._subs.get(sub_id)
        if sub is None or sub.outbox is not outbox or sub.store != store:
            raise SubscriptionNotFound(f"no subscription {sub_id} on this connection for that store", data={"subscription": sub_id})
        del self._subs[sub_id]

    def drop_outbox(self, outbox: Outbox) -> None:
        for sub_id in [i for i, s in self._subs.items() if s.outbox is outbox]:
            del self._subs[sub_id]

    def drop_store(self, store: StoreKey) -> None:
        for sub_id in [i for i, s in self._subs.items() if s.store == store]:
            del self._subs[sub_id]

    def has(self, store: StoreKey | None, type_: str) -> bool:
        return any(s.store == store and s.type == type_ for s in self._subs.values())

    def publish(self, store: StoreKey | None, type_: str, method: str, params: dict[str, Any]) -> int:
        """Send to every matching subscriber; returns how many."""
        count = 0
        for sub in list(self._subs.values()):
            if sub.store == store and sub.type == type_:
                sub.outbox.notify(method, {"subscription": sub.id, **params})
                count += 1
        return count


#: Shortest gap between two dataChange notifications of one kind for one store
#: when they list keys (``local_details``, ``remote_details``).
COALESCE_WINDOW_S = 0.02
#: The same for ``remote``, which lists only devices: one per applied sync
#: batch at most, so a shorter window still bounds the count, and a device
#: waiting for a peer's rows one by one hears of each within milliseconds.
DEVICE_LIST_WINDOW_S = 0.005
#: Keys one notification may list per table and list, and their total size;
#: beyond either the notification says ``truncated`` and the subscriber re-reads.
MAX_KEYS_PER_NOTIFICATION = 10_000
MAX_KEY_BYTES_PER_NOTIFICATION = 1 << 20


class Coalescer:
    """Merges bursts of dataChange notifications, per (store, kind).

    The first change after a quiet period is published at once (so a lone
    write is announced within milliseconds); changes arriving within
    ``window`` of the last publication are merged — per table, key lists
    de-duplicated, device lists united — and published when the window ends.
    A burst of 10k row writes thus yields at most one notification per window,
    each listing the keys. Device-list notifications (``remote``) use the
    shorter ``device_window``.
    """

    def __init__(self, subscriptions: Subscriptions, window: float = COALESCE_WINDOW_S,
                 device_window: float = DEVICE_LIST_WINDOW_S) -> None:
        self.subscriptions = subscriptions
        self.window = window
        self.device_window = device_window
        self._pending: dict[tuple[StoreKey, str], dict[str, Any]] = {}
        self._budget: dict[tuple[StoreKey, str], list[int]] = {}  # key bytes left in the pending notification
        self._last: dict[tuple[StoreKey, str], float] = {}
        self._timers: dict[tuple[StoreKey, str], asyncio.TimerHandle] = {}

    def changes(self, store: StoreKey, type_: str, base: dict[str, Any], changes: list[dict[str, Any]]) -> None:
        """ChangeInfo lists (``local_details``, ``remote_details``)."""
        budget = self._budget.setdefault((store, type_), [MAX_KEY_BYTES_PER_NOTIFICATION])
        self._add(store, type_, base, lambda acc: _merge_changes(acc.setdefault("changes", []), changes, budget), self.window)

    def devices(self, store: StoreKey, type_: str, base: dict[str, Any], devices: list[str]) -> None:
        """Device lists (``remote``)."""
        self._add(store, type_, base, lambda acc: acc.__setitem__("devices", sorted({*acc.get("devices", []), *devices})),
                  self.device_window)

    def _add(self, store: StoreKey, type_: str, base: dict[str, Any], merge: Any, window: float) -> None:
        if not self.subscriptions.has(store, type_):
            return
        key = (store, type_)
        acc = self._pending.setdefault(key, dict(base))
        merge(acc)
        loop = asyncio.get_running_loop()
        wait = self._last.get(key, float("-inf")) + window - loop.time()
        if wait <= 0:
            self._flush(key)
        elif key not in self._timers:
            self._timers[key] = loop.call_later(wait, self._flush, key)

    def _flush(self, key: tuple[StoreKey, str]) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            # Flushed early (the loop was late, a change came after the window
            # ended): the window's timer must not flush again right after.
            timer.cancel()
        params = self._pending.pop(key, None)
        self._budget.pop(key, None)
        if params is None:
            return
        self._last[key] = asyncio.get_running_loop().time()
        self.subscriptions.publish(key[0], key[1], "dataChange", params)


class ChangeFeed:
    """Rows written, as subscribers see them: syncs and retried failures
    (``remote``, ``remote_details``) and local writes (``local_details``),
    coalesced per store. Its own object so the sync engine (which reports
    applied rows) and the API (whose subscribers receive them) can be built
    in either order."""

    def __init__(self, subscriptions: Subscriptions) -> None:
        self.subscriptions = subscriptions
        self.coalescer = Coalescer(subscriptions)

    def on_applied(self, store: Store, peer: str, result: ApplyResult) -> None:
        """Rows written by a sync -> ``remote`` (devices) and ``remote_details``
        (ChangeInfo) subscribers; changes queued for a person -> ``conflict``."""
        if result.queued:
            self.subscriptions.publish((store.bundle, store.name), "conflict", "conflict",
                                       {"store": store.name, "bundle": store.bundle, "device": peer, "new": result.queued,
                                        "queued": store.queued})
        if result.remote:
            key = (store.bundle, store.name)
            base = {"store": store.name, "bundle": store.bundle}
            self.coalescer.devices(key, "remote", base, result.remote_devices())
            changes = [{**info, "origin": origin} for origin, infos in result.remote_change_infos().items() for info in infos]
            self.coalescer.changes(key, "remote_details", base, changes)

    def on_store_changes(self, store: Store, batch: ChangeBatch) -> None:
        """Local changes (API or another process) -> ``local_details`` subscribers."""
        self.coalescer.changes((store.bundle, store.name), "local_details",
                               {"store": store.name, "bundle": store.bundle}, batch.change_infos())


def _merge_changes(into: list[dict[str, Any]], changes: list[dict[str, Any]], budget: list[int]) -> None:
    """Merge ``changes`` into ``into``; ``budget[0]`` is the key bytes still allowed."""
    by_table = {(c["table"], c.get("origin")): c for c in into}
    for change in changes:
        target = by_table.get((change["table"], change.get("origin")))
        if target is None:
            target = {**change, "inserted": [], "updated": [], "deleted": []}
            into.append(target)
            by_table[(change["table"], change.get("origin"))] = target
        for kind in ("inserted", "updated", "deleted"):
            keys = target[kind]
            if len(keys) >= MAX_KEYS_PER_NOTIFICATION:
                target["truncated"] = True
                continue
            seen = set(map(_hashable, keys))
            for k in change.get(kind, []):
                if _hashable(k) in seen:
                    continue
                size = len(k) + 8 if isinstance(k, (str, bytes)) else 16
                if len(keys) >= MAX_KEYS_PER_NOTIFICATION or size > budget[0]:
                    target["truncated"] = True
                    break
                keys.append(k)
                seen.add(_hashable(k))
                budget[0] -= size


def _hashable(value: Any) -> Any:
    return value if not isinstance(value, (list, dict, bytearray)) else repr(value)
