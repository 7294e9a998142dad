"""Subscriptions registry and the bounded per-connection outbox."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

from p2pstore.api.jsonrpc import encode_result
from p2pstore.api.subscriptions import Outbox, Subscriptions, drain_outbox
from p2pstore.errors import SubscriptionNotFound, TooManySubscriptions

SHOP = ("default", "shop")
OTHER = ("default", "other")


def queued(outbox: Outbox) -> list[Any]:
    """Everything in the outbox, decoded, without the internal marker byte."""
    items = []
    while not outbox.queue.empty():
        data = outbox.queue.get_nowait()
        items.append(None if data is None else json.loads(data.lstrip(b"\x00\x01")))
    return items


# -- Subscriptions ------------------------------------------------------------------

def test_subscribe_returns_distinct_ids_per_type() -> None:
    subs = Subscriptions()
    box = Outbox(100)
    ids = [subs.subscribe(box, SHOP, t) for t in ("remote", "local_details", "remote_details")]
    assert len(set(ids)) == 3


def test_subscribing_the_same_type_twice_returns_the_same_subscription() -> None:
    subs = Subscriptions()
    box = Outbox(100)
    first = subs.subscribe(box, SHOP, "local_details")
    assert subs.subscribe(box, SHOP, "local_details") == first
    # ...and it is one subscription: one notification per publish.
    assert subs.publish(SHOP, "local_details", "dataChange", {}) == 1


def test_limit_per_store_per_connection() -> None:
    subs = Subscriptions(max_per_store=2)
    box = Outbox(100)
    subs.subscribe(box, SHOP, "remote")
    subs.subscribe(box, SHOP, "local_details")
    with pytest.raises(TooManySubscriptions) as info:
        subs.subscribe(box, SHOP, "remote_details")
    assert info.value.name == "TOO_MANY_SUBSCRIPTIONS"
    assert info.value.data["limit"] == 2
    assert "limit 2" in info.value.message


def test_duplicate_at_the_limit_is_not_an_error() -> None:
    subs = Subscriptions(max_per_store=2)
    box = Outbox(100)
    a = subs.subscribe(box, SHOP, "remote")
    subs.subscribe(box, SHOP, "local_details")
    assert subs.subscribe(box, SHOP, "remote") == a


def test_limit_counts_per_store_over_all_connections() -> None:
    """Issue 10 item 8: the limit was per connection, so nine clients held nine."""
    subs = Subscriptions(max_per_store=2)
    box, box2, box3 = Outbox(100), Outbox(100), Outbox(100)
    subs.subscribe(box, SHOP, "remote")
    subs.subscribe(box, OTHER, "remote")       # another store: its own budget
    subs.subscribe(box2, SHOP, "remote")       # another connection: the same budget
    with pytest.raises(TooManySubscriptions) as info:
        subs.subscribe(box3, SHOP, "remote")
    assert "over all clients" in info.value.message
    assert subs.subscribe(box2, SHOP, "remote")  # a duplicate at the limit is still no error
    subs.drop_outbox(box2)                     # a client's connection closed: its place is free
    subs.subscribe(box3, SHOP, "local_details")


def test_device_event_subscriptions_are_not_limited_per_store() -> None:
    subs = Subscriptions(max_per_store=1)
    box = Outbox(100)
    subs.subscribe(box, None, "devices")
    subs.subscribe(box, None, "other-devices")


def test_unsubscribe_frees_a_slot() -> None:
    subs = Subscriptions(max_per_store=1)
    box = Outbox(100)
    sub = subs.subscribe(box, SHOP, "remote")
    subs.unsubscribe(box, SHOP, sub)
    subs.subscribe(box, SHOP, "local_details")
    assert subs.publish(SHOP, "remote", "dataChange", {}) == 0


def test_unsubscribe_unknown_or_foreign_subscription() -> None:
    subs = Subscriptions()
    box, intruder = Outbox(100), Outbox(100)
    sub = subs.subscribe(box, SHOP, "remote")
    for outbox, store, sub_id in [(box, SHOP, sub + 100), (intruder, SHOP, sub), (box, OTHER, sub)]:
        with pytest.raises(SubscriptionNotFound) as info:
            subs.unsubscribe(outbox, store, sub_id)
        assert info.value.name == "SUBSCRIPTION_NOT_FOUND"
    # The failed attempts removed nothing.
    assert subs.publish(SHOP, "remote", "dataChange", {}) == 1
    subs.unsubscribe(box, SHOP, sub)
    with pytest.raises(SubscriptionNotFound):
        subs.unsubscribe(box, SHOP, sub)


def test_publish_reaches_only_matching_store_and_type() -> None:
    subs = Subscriptions()
    a, b, c = Outbox(100), Outbox(100), Outbox(100)
    sa = subs.subscribe(a, SHOP, "local_details")
    sb = subs.subscribe(b, SHOP, "local_details")
    subs.subscribe(b, SHOP, "remote")
    subs.subscribe(c, OTHER, "local_details")
    assert subs.publish(SHOP, "local_details", "dataChange", {"store": "shop", "changes": [1]}) == 2
    assert queued(a) == [{"jsonrpc": "2.0", "method": "dataChange", "params": {"subscription": sa, "store": "shop", "changes": [1]}}]
    assert [n["params"]["subscription"] for n in queued(b)] == [sb]
    assert queued(c) == []


def test_drop_outbox_and_drop_store() -> None:
    subs = Subscriptions()
    a, b = Outbox(100), Outbox(100)
    subs.subscribe(a, SHOP, "remote")
    subs.subscribe(a, OTHER, "remote")
    subs.subscribe(b, SHOP, "remote")
    subs.drop_outbox(a)
    assert subs.publish(SHOP, "remote", "m", {}) == 1
    assert subs.publish(OTHER, "remote", "m", {}) == 0
    subs.drop_store(SHOP)
    assert subs.publish(SHOP, "remote", "m", {}) == 0


# -- Outbox ----------------------------------------------------------------------------

def test_overflow_sends_one_overflow_notification_then_drops() -> None:
    box = Outbox(queue_limit=3)
    for i in range(10):
        box.notify("dataChange", {"n": i})
    items = queued(box)
    assert [i["params"].get("n") for i in items[:3]] == [0, 1, 2]
    assert len(items) == 4
    assert items[3]["method"] == "overflow"
    assert "re-read" in items[3]["params"]["message"]


def test_responses_bypass_the_notification_limit() -> None:
    box = Outbox(queue_limit=1)
    box.notify("dataChange", {})
    box.notify("dataChange", {})  # overflow
    for i in range(5):
        box.send(encode_result(i, {}))
    items = queued(box)
    assert [i.get("id") for i in items if "result" in i] == [0, 1, 2, 3, 4]


def test_closed_outbox_ignores_everything_after_the_end_marker() -> None:
    box = Outbox(10)
    box.notify("a", {})
    box.close()
    box.notify("b", {})
    box.send(b"x\n")
    items = queued(box)
    assert [i if i is None else i["method"] for i in items] == ["a", None]


async def _pair() -> tuple[asyncio.StreamWriter, socket.socket]:
    mine, theirs = socket.socketpair()
    _, writer = await asyncio.open_unix_connection(sock=mine)
    theirs.setblocking(False)
    return writer, theirs


async def _read_lines(sock: socket.socket, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    buf = b""
    async with asyncio.timeout(timeout):
        while buf.count(b"\n") < n:
            buf += await loop.sock_recv(sock, 65536)
    return [json.loads(line) for line in buf.splitlines()]


async def test_overflow_recovers_after_the_client_has_drained() -> None:
    box = Outbox(queue_limit=2)
    writer, peer = await _pair()
    try:
        for i in range(5):
            box.notify("dataChange", {"n": i})
        drainer = asyncio.create_task(drain_outbox(box, writer))
        first = await _read_lines(peer, 3)
        assert [m["method"] for m in first] == ["dataChange", "dataChange", "overflow"]
        assert [m["params"]["n"] for m in first[:2]] == [0, 1]
        # Drained: the counters are back to zero and new notifications flow again.
        async with asyncio.timeout(5):
            while box.pending_notifications or not box.queue.empty():
                await asyncio.sleep(0.01)
        assert box.overflowed is False
        for i in range(2):
            box.notify("dataChange", {"n": 10 + i})
        again = await _read_lines(peer, 2)
        assert [m["params"]["n"] for m in again] == [10, 11]
        # A second overflow is announced again (one per episode).
        for i in range(4):
            box.notify("dataChange", {"n": 20 + i})
        box.close()
        await asyncio.wait_for(drainer, 5)
        tail = await _read_lines(peer, 3)
        assert [m["method"] for m in tail] == ["dataChange", "dataChange", "overflow"]
    finally:
        writer.close()
        peer.close()


async def test_drain_writes_responses_and_notifications_in_order() -> None:
    box = Outbox(queue_limit=10)
    writer, peer = await _pair()
    try:
        box.send(encode_result(1, "a"))
        box.notify("dataChange", {"n": 1})
        box.send(encode_result(2, "b"))
        box.close()
        await asyncio.wait_for(drain_outbox(box, writer), 5)
        lines = await _read_lines(peer, 3)
        assert [m.get("id", m.get("method")) for m in lines] == [1, "dataChange", 2]
        assert box.pending_notifications == 0
    finally:
        writer.close()
        peer.close()


async def test_coalescer_publishes_first_change_at_once_and_merges_a_burst() -> None:
    import asyncio

    from p2pstore.api.subscriptions import Coalescer, Outbox, Subscriptions

    subs = Subscriptions()
    box = Outbox(1000)
    subs.subscribe(box, ("default", "s"), "local_details")
    co = Coalescer(subs, window=0.05)
    base = {"store": "s", "bundle": "default"}
    co.changes(("default", "s"), "local_details", base, [{"table": "T", "type": "data", "inserted": [1], "updated": [], "deleted": []}])
    assert box.pending_notifications == 1  # the first one is not delayed
    for k in (2, 3, 2):
        co.changes(("default", "s"), "local_details", base, [{"table": "T", "type": "data", "inserted": [k], "updated": [], "deleted": []}])
    assert box.pending_notifications == 1  # the burst waits for the window
    await asyncio.sleep(0.1)
    assert box.pending_notifications == 2
    lines = [box.queue.get_nowait() for _ in range(2)]
    assert b'"inserted":[2,3]' in lines[1]  # merged, without the duplicate


async def test_coalescer_does_nothing_without_subscribers() -> None:
    from p2pstore.api.subscriptions import Coalescer, Subscriptions

    co = Coalescer(Subscriptions(), window=0.05)
    co.changes(("default", "s"), "local_details", {}, [{"table": "T", "inserted": [1], "updated": [], "deleted": []}])
    assert not co._pending


async def test_coalesced_keys_are_capped_in_bytes_too() -> None:
    from p2pstore.api.subscriptions import MAX_KEY_BYTES_PER_NOTIFICATION, Coalescer, Outbox, Subscriptions

    subs = Subscriptions()
    box = Outbox(1000)
    subs.subscribe(box, ("default", "s"), "local_details")
    co = Coalescer(subs, window=60)
    keys = [f"{i:01000d}" for i in range(3000)]  # 3 MB of 1 KB keys
    co.changes(("default", "s"), "local_details", {}, [{"table": "T", "inserted": [], "updated": [], "deleted": []}])
    co.changes(("default", "s"), "local_details", {}, [{"table": "T", "inserted": keys, "updated": [], "deleted": []}])
    pending = co._pending[(("default", "s"), "local_details")]["changes"][0]
    assert pending["truncated"] is True
    assert sum(len(k) for k in pending["inserted"]) <= MAX_KEY_BYTES_PER_NOTIFICATION
    for handle in co._timers.values():
        handle.cancel()


async def test_device_list_notifications_use_their_own_shorter_window() -> None:
    """``remote`` lists devices, no keys: its window is shorter than the key lists' one."""
    import asyncio

    from p2pstore.api.subscriptions import Coalescer, Outbox, Subscriptions

    subs = Subscriptions()
    box = Outbox(1000)
    store = ("default", "s")
    subs.subscribe(box, store, "remote")
    subs.subscribe(box, store, "local_details")
    co = Coalescer(subs, window=0.5, device_window=0.02)
    base = {"store": "s", "bundle": "default"}
    change = [{"table": "T", "type": "data", "inserted": [1], "updated": [], "deleted": []}]
    co.devices(store, "remote", base, ["A"])
    co.changes(store, "local_details", base, change)
    assert box.pending_notifications == 2  # each the first of its kind: at once
    co.devices(store, "remote", base, ["B"])
    co.devices(store, "remote", base, ["A"])
    co.changes(store, "local_details", base, change)
    await asyncio.sleep(0.1)  # past the device window, well within the key window
    assert box.pending_notifications == 3
    lines = [box.queue.get_nowait() for _ in range(3)]
    assert b'"devices":["A","B"]' in lines[2]  # merged, once each
