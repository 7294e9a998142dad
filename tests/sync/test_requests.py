"""sync/requests.py, the table of requests in flight that sync sessions and
remote queries share: ids, routing by (peer, req) to a bounded inbox, and
the end of every request on a channel that closed or of a peer that went
offline — not of one on a newer channel to the same peer.

The channels are real (PeerManagers over TLS on 127.0.0.1, tests/net/peer_agent.py):
device ``a`` holds the requests, ``b`` and ``c`` are its peers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from peer_agent import Device, eventually

from p2pstore.net.channel import Channel
from p2pstore.protocol.messages import QueryMore
from p2pstore.sync.requests import Delivery, Overflow, Request, Requests, Why

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def devices(tmp_path: Path) -> AsyncIterator[tuple[Device, Device, Device]]:
    made = tuple(Device(tmp_path, name, kwargs={"auto_dial": False}) for name in "abc")
    for one in made:
        for other in made:
            if one is not other:
                one.trust.trust(other.id, name=other.name)
    for device in made:
        await device.manager.start()
    yield made  # type: ignore[misc]
    for device in made:
        await device.manager.stop()


async def connect(me: Device, peer: Device) -> Channel:
    channel = await me.manager.connect("127.0.0.1", peer.port, peer.id)
    assert not channel.closed
    return channel


def table(overflow: Overflow = Overflow.END, inbox_size: int = 4) -> Requests:
    return Requests(inbox_size=inbox_size, overflow=overflow)


async def test_messages_go_to_their_request_by_peer_and_req(devices: tuple[Device, Device, Device]) -> None:
    a, b, c = devices
    to_b, to_c = await connect(a, b), await connect(a, c)
    requests = table()
    first, second = requests.start(b.id, to_b), requests.start(b.id, to_b)
    theirs = requests.accept(c.id, 7, to_c)
    assert theirs is not None and first.req != second.req
    assert requests.count(b.id) == 2 and requests.count(c.id) == 1

    assert requests.deliver(b.id, second.req, QueryMore(second.req)) is Delivery.DELIVERED
    assert requests.deliver(c.id, 7, QueryMore(7)) is Delivery.DELIVERED
    assert requests.deliver(b.id, 7, QueryMore(7)) is Delivery.UNKNOWN  # c's id, from b
    assert requests.deliver(c.id, first.req, QueryMore(first.req)) is Delivery.UNKNOWN  # b's id, from c

    assert await second.next(1.0) == QueryMore(second.req)
    assert await theirs.next(1.0) == QueryMore(7)
    with pytest.raises(asyncio.TimeoutError):
        await first.next(0.05)  # nothing for it, and it did not end
    assert first.ended is None and not first.moved


async def test_ids_are_unique_per_peer_and_finish_takes_only_its_own(devices: tuple[Device, Device, Device]) -> None:
    a, b, _ = devices
    to_b = await connect(a, b)
    requests = table()
    ours = [requests.start(b.id, to_b) for _ in range(50)]
    assert len({r.req for r in ours}) == 50 and all(r.req > 0 for r in ours)
    assert requests.accept(b.id, ours[0].req, to_b) is None  # in flight already (the engine ignores such an open)
    requests.finish(ours[0])
    again = requests.accept(b.id, ours[0].req, to_b)
    assert again is not None and requests.get(b.id, ours[0].req) is again
    requests.finish(ours[0])  # a request already finished takes nothing: the newer one stays
    assert requests.get(b.id, ours[0].req) is again
    requests.finish(again)
    assert requests.get(b.id, ours[0].req) is None and requests.count(b.id) == 49


async def flood(devices: tuple[Device, Device, Device], overflow: Overflow) -> tuple[Requests, Request]:
    """A request with an inbox of 2 that ``b`` sends 3 messages: the third overflows."""
    a, b, _ = devices
    requests = table(overflow, inbox_size=2)
    flooded = requests.start(b.id, await connect(a, b))
    req = flooded.req
    assert [requests.deliver(b.id, req, QueryMore(req)) for _ in range(3)] == [
        Delivery.DELIVERED, Delivery.DELIVERED, Delivery.OVERFLOWED]
    return requests, flooded


async def test_a_flood_ends_the_request_when_the_table_says_end(devices: tuple[Device, Device, Device]) -> None:
    """The sync engine's rule: the session ends, what it had queued is still
    read, and the peer's later messages for it find no request."""
    requests, flooded = await flood(devices, Overflow.END)
    peer, req = flooded.peer, flooded.req
    assert flooded.ended is not None and flooded.ended.why is Why.FLOODED
    assert str(flooded.ended) == "the device sent more than the request's inbox holds (more than 2 messages ahead)"
    assert requests.get(peer, req) is None
    assert requests.deliver(peer, req, QueryMore(req)) is Delivery.UNKNOWN
    assert await flooded.next(1.0) == QueryMore(req)
    assert await flooded.next(1.0) == QueryMore(req)
    assert await flooded.next(1.0) is None  # at once (no end marker fitted in the full inbox), no timeout
    assert await flooded.next(1.0) is None


async def test_a_flood_drops_the_message_when_the_table_says_drop(devices: tuple[Device, Device, Device]) -> None:
    """Remote query's rule: the extra message is dropped, the query goes on."""
    requests, query = await flood(devices, Overflow.DROP)
    peer, req = query.peer, query.req
    assert query.ended is None and requests.get(peer, req) is query
    assert [await query.next(1.0), await query.next(1.0)] == [QueryMore(req)] * 2
    with pytest.raises(asyncio.TimeoutError):
        await query.next(0.05)  # the third was dropped
    assert requests.deliver(peer, req, QueryMore(req)) is Delivery.DELIVERED  # room again


async def test_a_closed_channel_ends_its_requests_not_those_on_the_newer_channel(
        devices: tuple[Device, Device, Device]) -> None:
    """A channel replaced by a newer one to the same peer (a simultaneous dial,
    a reconnection): its close event may come after requests started on the
    new one; only the old channel's requests end, each waking at once after
    reading what was queued for it."""
    a, b, c = devices
    old, to_c = await connect(a, b), await connect(a, c)
    requests = table()
    on_old, served_on_old = requests.start(b.id, old), requests.accept(b.id, 5, old)
    assert served_on_old is not None
    requests.deliver(b.id, on_old.req, QueryMore(on_old.req))
    waiting = asyncio.ensure_future(served_on_old.next(30.0))
    await asyncio.sleep(0)

    old.close("replaced by a newer connection")
    await eventually(lambda: a.manager.channel(b.id) is None and b.manager.channel(a.id) is None, 3.0, "old gone")
    new = await connect(a, b)
    assert new is not old
    on_new, on_c = requests.start(b.id, new), requests.start(c.id, to_c)
    await eventually(lambda: (b.id, old) in a.closed_channels, 3.0, "the old channel's close reported")
    for _, channel in a.closed_channels:  # as the daemon wires it (PeerEvents.channel_closed)
        requests.channel_closed(channel)

    assert await asyncio.wait_for(waiting, 1.0) is None
    assert await on_old.next(1.0) == QueryMore(on_old.req)  # what came before the close is read first
    assert await on_old.next(1.0) is None
    for ended in (on_old, served_on_old):
        assert ended.ended is not None and ended.ended.why is Why.CHANNEL_CLOSED
        assert ended.ended.detail == "replaced by a newer connection"
    assert on_new.ended is None and on_c.ended is None
    assert requests.deliver(b.id, on_new.req, QueryMore(on_new.req)) is Delivery.DELIVERED
    assert await on_new.next(1.0) == QueryMore(on_new.req)
    # The ended requests stay until their owners finish them (a late message still finds them).
    assert requests.get(b.id, on_old.req) is on_old and requests.count(b.id) == 3


async def test_a_request_on_an_already_closed_channel_is_ended_at_once(devices: tuple[Device, Device, Device]) -> None:
    """A message read from a channel just before it closed: its close event may have passed."""
    a, b, _ = devices
    channel = await connect(a, b)
    channel.close("gone")
    requests = table()
    for request in (requests.start(b.id, channel), requests.accept(b.id, 9, channel)):
        assert request is not None and request.ended is not None
        assert request.ended.why is Why.CHANNEL_CLOSED and request.ended.detail == "gone"
        assert await request.next(1.0) is None


async def test_offline_ends_every_request_of_the_peer_and_no_other(devices: tuple[Device, Device, Device]) -> None:
    a, b, c = devices
    to_b, to_c = await connect(a, b), await connect(a, c)
    requests = table()
    of_b = [requests.start(b.id, to_b), requests.accept(b.id, 3, to_b)]
    of_c = requests.accept(c.id, 3, to_c)
    assert of_c is not None
    requests.peer_offline(b.id)
    for request in of_b:
        assert request is not None and request.ended is not None
        assert request.ended.why is Why.PEER_OFFLINE and str(request.ended) == "the device went offline"
        assert await request.next(1.0) is None
    assert of_c.ended is None
    requests.peer_offline(b.id)  # ending twice keeps the first reason and queues no second wake-up
    assert of_b[0].inbox.empty()
