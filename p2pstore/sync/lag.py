"""Per-peer lag: what ``status`` and ``devices.list`` show per trusted peer
and store (docs/sync.md, "Lag"; Syncthing's "out of sync items").

For each (peer, store) this keeps, in memory:

- the peer's latest position in our stream, from its ``SyncReady``/``SyncOpen``
  and from every ack of a whole-stream batch: fresher than ``_p2p_acks``,
  which the engine writes only twice a session (store/gc.py). ``unsent``
  is counted from it by the store (``stream.unsent_rows``);
- the peer's last offer of the store: how many rows *it* counted as not yet
  sent to us, up to which position of its stream, and the rows of that
  stream we applied since. ``unreceived`` is derived from it;
- the last session's outcome in each direction and the last success;
- the rows each running session moved in the last ``RATE_WINDOW_S``, for
  ``rows_per_s`` (0 when no session runs).

Nothing here is persisted: after a restart ``unsent`` is counted from
``_p2p_acks`` and the rest is unknown until the next offer or session.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from p2pstore.protocol.messages import StoreOffer
from p2pstore.store.changes import OutBatch
from p2pstore.store.database import Lag, Store

#: Throughput is the rows moved over this many recent seconds.
RATE_WINDOW_S = 3.0

Key = tuple[str, str, str]  # (peer, bundle, store)


@dataclass(slots=True)
class _Offer:
    unsent: int | None
    last_seq: int | None
    stream: str | None
    received_since: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    at: float  # unix time the session ended
    direction: str  # "send" | "receive"
    code: int

    def to_dict(self, code_name: Callable[[int], str]) -> dict[str, Any]:
        return {"at": self.at, "direction": self.direction, "code": self.code, "name": code_name(self.code)}


class LagTracker:
    def __init__(self, code_name: Callable[[int], str], *, monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._code_name = code_name
        self._monotonic = monotonic
        self._wall = wall
        self._acked: dict[Key, tuple[int, str | None]] = {}
        self._offers: dict[Key, _Offer] = {}
        self._last: dict[Key, Outcome] = {}
        self._last_success: dict[Key, Outcome] = {}
        self._running: dict[Key, int] = {}
        self._moved: dict[Key, deque[tuple[float, int]]] = {}
        self._started: dict[Key, float] = {}

    # -- fed by the engine -----------------------------------------------------

    def acked(self, peer: str, bundle: str, store: str, seq: int, stream: str | None) -> None:
        """The peer reported (or acked) this position in our stream."""
        self._acked[(peer, bundle, store)] = (seq, stream)

    def offered(self, peer: str, offers: tuple[StoreOffer, ...]) -> None:
        """A peer's StoresOffer: its own count of what it has for us, per store."""
        for key in [k for k in self._offers if k[0] == peer]:
            del self._offers[key]
        for o in offers:
            self._offers[(peer, o.bundle, o.store)] = _Offer(o.unsent, o.last_seq, o.stream)

    def received(self, peer: str, bundle: str, store: str, batch: OutBatch) -> None:
        """We applied a batch of the peer's stream."""
        key = (peer, bundle, store)
        offer = self._offers.get(key)
        if offer is not None and batch.full and batch.stream == offer.stream:
            offer.received_since += batch.count
        self.moved(key, batch.count)

    def moved(self, key: Key, rows: int) -> None:
        """A batch of ``rows`` went through (acked, or applied) in a running session."""
        samples = self._moved.setdefault(key, deque())
        now = self._monotonic()
        samples.append((now, rows))
        while samples and samples[0][0] < now - RATE_WINDOW_S:
            samples.popleft()

    def begin(self, peer: str, bundle: str, store: str) -> None:
        """A session with the peer on the store starts (it counts as running)."""
        key = (peer, bundle, store)
        self._running[key] = self._running.get(key, 0) + 1
        self._started.setdefault(key, self._monotonic())

    def end(self, peer: str, bundle: str, store: str, direction: str, code: int) -> None:
        """A session ``begin`` announced ended with sync result ``code``."""
        key = (peer, bundle, store)
        left = self._running.get(key, 1) - 1
        if left > 0:
            self._running[key] = left
        else:
            self._running.pop(key, None)
            self._started.pop(key, None)
            self._moved.pop(key, None)
        outcome = Outcome(self._wall(), direction, int(code))
        self._last[key] = outcome
        if code == 0:
            self._last_success[key] = outcome

    @contextmanager
    def session(self, peer: str, bundle: str, store: str, direction: str,
                code_of: Callable[[BaseException], int]) -> Iterator[None]:
        """``begin`` and ``end`` around a block; ``code_of`` maps what it
        raised to a sync result code."""
        self.begin(peer, bundle, store)
        code = 0
        try:
            yield
        except BaseException as exc:
            code = code_of(exc)
            raise
        finally:
            self.end(peer, bundle, store, direction, code)

    # -- read by status ----------------------------------------------------------

    def acked_position(self, peer: str, bundle: str, store: str) -> tuple[int, str | None] | None:
        return self._acked.get((peer, bundle, store))

    def knows(self, peer: str, bundle: str, store: str) -> bool:
        key = (peer, bundle, store)
        return key in self._offers or key in self._last or key in self._running

    def rows_per_s(self, key: Key) -> float:
        if key not in self._running:
            return 0.0
        now = self._monotonic()
        rows = sum(n for t, n in self._moved.get(key, ()) if t >= now - RATE_WINDOW_S)
        span = min(RATE_WINDOW_S, max(now - self._started.get(key, now), 0.1))
        return round(rows / span, 1)

    def unreceived(self, key: Key, lag: Lag) -> int | None:
        """Rows the peer has for us by its last offer, less what we applied
        since; 0 once our watermark reached the position it counted to;
        None without an offer that says."""
        offer = self._offers.get(key)
        if offer is None or offer.unsent is None:
            return None
        seq, stream = lag.received
        if offer.last_seq is not None and stream == offer.stream and seq >= offer.last_seq:
            return 0
        return max(0, offer.unsent - offer.received_since)

    def entry(self, peer: str, bundle: str, store: str, lag: Lag) -> dict[str, Any]:
        """One ``stores`` item of a device in ``status`` / ``devices.list`` (docs/api.md)."""
        key = (peer, bundle, store)
        last = self._last.get(key)
        success = self._last_success.get(key)
        return {
            "bundle": bundle, "store": store,
            "unsent": lag.unsent, "unreceived": self.unreceived(key, lag),
            "last_sync": last.to_dict(self._code_name) if last is not None else None,
            "last_success_at": success.at if success is not None else None,
            "syncing": key in self._running,
            "rows_per_s": self.rows_per_s(key),
        }


async def store_lags(tracker: LagTracker, stores: Iterable[Store], peer: str,
                     offered: Collection[tuple[str, str]]) -> list[dict[str, Any]]:
    """``peer``'s lag on each of our stores with distributed tables that it
    offered or ever synced with us (``LagTracker.entry``)."""
    found = []
    for store in stores:
        if not store.distributed:
            continue
        lag = await store.lag(peer, tracker.acked_position(peer, store.bundle, store.name))
        if (store.bundle, store.name) in offered or lag.known or tracker.knows(peer, store.bundle, store.name):
            found.append(tracker.entry(peer, store.bundle, store.name, lag))
    return found
