"""In-flight requests to and from peers, each bound to the channel it lives on.

Why one module: a sync session (sync/engine.py) and a remote query
(sync/remote_query.py) are both a conversation with one peer under a request
id (``req``), and both must get the same things right: ids that don't
collide for a peer; a bounded inbox per request, so a peer that floods costs
bounded memory; replies routed by (peer, req); and every request ending the
moment its channel closes or its peer goes offline (never by waiting out a
timeout), while a request on a newer channel to the same peer (the one that
replaced a duplicate, net/peers.py) goes on. Kept twice, those rules drift;
here they are written once.

What a request says, how long it waits, whether it runs again on a new
channel and what it answers when it ends stay with its owner; this module
keeps the table and says *why* a request ended (``Ended``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
from dataclasses import dataclass

from p2pstore.net.channel import Channel
from p2pstore.protocol.messages import Message


class Why(enum.Enum):
    """Why a request was ended from outside its owner."""

    CHANNEL_CLOSED = "its connection closed"
    PEER_OFFLINE = "the device went offline"
    FLOODED = "the device sent more than the request's inbox holds"


@dataclass(frozen=True)
class Ended:
    """Why, and the detail: the channel's close reason, or the inbox size."""

    why: Why
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.why.value} ({self.detail})" if self.detail else self.why.value


class Overflow(enum.Enum):
    """What a message that finds its request's inbox full does."""

    #: The request ends (``Why.FLOODED``) and leaves the table: the peer's
    #: later messages for it are unknown. Messages already queued are still read.
    END = "end"
    #: The message is dropped and the request goes on (its owner's timeout bounds the wait).
    DROP = "drop"


class Delivery(enum.Enum):
    """What ``Requests.deliver`` did with a message."""

    DELIVERED = "delivered"
    UNKNOWN = "no such request"
    OVERFLOWED = "inbox full"


class Request:
    """One request in flight: who, which id, the channel it lives on, its inbox."""

    def __init__(self, peer: str, req: int, channel: Channel, inbox_size: int) -> None:
        self.peer = peer
        self.req = req
        self.channel = channel
        self.inbox: asyncio.Queue[Message | None] = asyncio.Queue(inbox_size)
        #: Why it can't go on (set once); ``next`` returns None when the inbox is drained.
        self.ended: Ended | None = None
        #: Data moved (a batch, a page): running it again on another channel would not be transparent.
        self.moved = False

    def end(self, ended: Ended) -> None:
        """End it from outside: messages already queued are still read first."""
        if self.ended is not None:
            return
        self.ended = ended
        with contextlib.suppress(asyncio.QueueFull):
            self.inbox.put_nowait(None)  # wakes a waiting next(); a full inbox is drained first

    async def next(self, timeout: float) -> Message | None:
        """The next message; None once it ended and its inbox is drained.

        Raises ``asyncio.TimeoutError`` if nothing came within ``timeout`` seconds."""
        if self.ended is not None and self.inbox.empty():
            return None
        return await asyncio.wait_for(self.inbox.get(), timeout)

    def arrived(self) -> list[Message]:
        """The messages already in the inbox, taken without waiting (not the
        end marker: ``next`` still reports the end)."""
        taken: list[Message] = []
        while not self.inbox.empty():
            msg = self.inbox.get_nowait()
            if msg is None:
                self.inbox.put_nowait(None)  # room: it was just taken
                break
            taken.append(msg)
        return taken

    def __repr__(self) -> str:
        state = f"ended: {self.ended}" if self.ended else "live"
        return f"<Request {self.req} with {self.peer[:7]} {state}>"


class Requests:
    """The requests in flight of one owner, by (peer, req).

    A request's owner takes it out with ``finish`` when it is done, whatever
    the outcome; until then a message for it is routed to its inbox."""

    def __init__(self, *, inbox_size: int, overflow: Overflow) -> None:
        self.inbox_size = inbox_size
        self.overflow = overflow
        self._live: dict[tuple[str, int], Request] = {}

    def start(self, peer: str, channel: Channel) -> Request:
        """A request this device starts, under a fresh id (unused for ``peer``)."""
        while True:
            req = secrets.randbits(62) + 1
            if (peer, req) not in self._live:
                return self._add(peer, req, channel)

    def accept(self, peer: str, req: int, channel: Channel) -> Request | None:
        """A request the peer started, under its id; None if that id is in flight already."""
        if (peer, req) in self._live:
            return None
        return self._add(peer, req, channel)

    def _add(self, peer: str, req: int, channel: Channel) -> Request:
        request = Request(peer, req, channel, self.inbox_size)
        self._live[(peer, req)] = request
        if channel.closed:  # read from (or chosen) before it closed: its close event may have passed
            request.end(Ended(Why.CHANNEL_CLOSED, channel.close_reason or ""))
        return request

    def finish(self, request: Request) -> None:
        """Its owner is done with it: it leaves the table (if it is still there)."""
        if self._live.get((request.peer, request.req)) is request:
            del self._live[(request.peer, request.req)]

    def get(self, peer: str, req: int) -> Request | None:
        return self._live.get((peer, req))

    def count(self, peer: str) -> int:
        """The peer's requests in flight."""
        return sum(1 for p, _ in self._live if p == peer)

    def deliver(self, peer: str, req: int, msg: Message) -> Delivery:
        """Route ``msg`` to request ``req`` of ``peer``; never blocks."""
        request = self._live.get((peer, req))
        if request is None:
            return Delivery.UNKNOWN
        try:
            request.inbox.put_nowait(msg)
        except asyncio.QueueFull:
            if self.overflow is Overflow.END:
                del self._live[(peer, req)]
                request.end(Ended(Why.FLOODED, f"more than {self.inbox_size} messages ahead"))
            return Delivery.OVERFLOWED
        return Delivery.DELIVERED

    def channel_closed(self, channel: Channel) -> None:
        """``channel`` closed: exactly the requests that live on it end."""
        for request in [r for r in self._live.values() if r.channel is channel]:
            request.end(Ended(Why.CHANNEL_CLOSED, channel.close_reason or ""))

    def peer_offline(self, peer: str) -> None:
        """``peer`` went offline: all its requests end, whatever channel they live on."""
        for request in [r for r in self._live.values() if r.peer == peer]:
            request.end(Ended(Why.PEER_OFFLINE))
