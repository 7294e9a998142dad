"""PeerManager over real TLS on 127.0.0.1: two (or three) devices in one event loop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from p2pstore import PROTOCOL_VERSION
from peer_agent import Device, agent_command, eventually, make_hello

from p2pstore.errors import ChannelError, DeviceOffline, DeviceUntrusted
from p2pstore.net import peers as peers_module
from p2pstore.protocol.messages import Message, register

pytestmark = pytest.mark.timeout(60)


@register
@dataclass(frozen=True, slots=True)
class Note(Message):
    """An application message for these tests only."""

    TYPE: ClassVar[str] = "test.peers.note"
    text: str
    blob: bytes


@pytest.fixture
async def devices(tmp_path: Path) -> AsyncIterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(name: str, **kwargs: object) -> Device:
        device = Device(tmp_path, name, kwargs=dict(kwargs))
        made.append(device)
        return device

    yield make
    for device in made:
        await device.manager.stop()


def trust_each_other(*devices: Device) -> None:
    for a in devices:
        for b in devices:
            if a is not b:
                a.trust.trust(b.id, name=b.name)


async def test_trusted_pair_connects_and_exchanges_hello(devices: Callable[..., Device]) -> None:
    a, b = devices("a"), devices("b")
    trust_each_other(a, b)
    await a.manager.start()
    await b.manager.start()
    a.manager.add_address(b.id, "127.0.0.1", b.port, name="b", source="mdns")
    took = await eventually(lambda: a.manager.is_online(b.id) and b.manager.is_online(a.id), 5.0, "online")
    assert took < 5.0
    assert a.manager.channel(b.id).peer_hello == make_hello(b.identity)  # type: ignore[union-attr]
    assert b.manager.channel(a.id).peer_hello == make_hello(a.identity)  # type: ignore[union-attr]
    assert a.changes == [(b.id, True)] and b.changes == [(a.id, True)]
    info = a.manager.peer_info(b.id)
    assert info is not None and info.online and info.is_dialer and info.addresses == (("127.0.0.1", b.port),)
    # What the peer announced is recorded in the trust list.
    entry = a.trust.get(b.id)
    assert entry is not None and entry.security_level == 2 and entry.cert_sha256 is not None

    await a.manager.send(b.id, Note("hi", b"\x00\xff"))
    await eventually(lambda: b.messages == [(a.id, Note("hi", b"\x00\xff"))], 2.0, "message delivered")
    # Keepalives flow (0.5 s interval) but never reach on_message.
    await asyncio.sleep(1.2)
    assert b.messages == [(a.id, Note("hi", b"\x00\xff"))] and a.messages == []
    assert a.manager.channel(b.id).rtt is not None  # type: ignore[union-attr]


async def test_static_peer_id_is_learned_from_its_certificate(devices: Callable[..., Device]) -> None:
    a, b = devices("a"), devices("b")
    trust_each_other(a, b)
    await b.manager.start()
    await a.manager.start()
    a.manager.add_address(None, "127.0.0.1", b.port)
    await eventually(lambda: a.manager.is_online(b.id), 5.0, "static peer online")
    assert a.manager.peer_info(b.id).addresses == (("127.0.0.1", b.port),)  # type: ignore[union-attr]


async def test_untrusted_device_gets_no_channel_and_is_pending(devices: Callable[..., Device]) -> None:
    a, b = devices("a"), devices("b")
    b.trust.trust(a.id)  # b trusts a, a does not trust b
    await a.manager.start()
    await b.manager.start()
    b.manager.add_address(a.id, "127.0.0.1", a.port)
    await eventually(lambda: bool(a.manager.pending()), 5.0, "pending recorded")
    (pending,) = a.manager.pending()
    assert pending.device_id == b.id and pending.inbound
    await asyncio.sleep(0.3)
    assert a.manager.channels() == {} and b.manager.channels() == {}
    assert a.changes == [] and b.changes == []
    assert a.messages == [] and b.messages == []
    with pytest.raises(DeviceUntrusted):
        await a.manager.send(b.id, Note("x", b""))
    with pytest.raises(DeviceOffline):
        await b.manager.send(a.id, Note("x", b""))

    # Dialing an untrusted device records it too (outbound), and sends nothing.
    with pytest.raises(DeviceUntrusted):
        await a.manager.connect("127.0.0.1", b.port)
    assert any(p.device_id == b.id for p in a.manager.pending())

    # Trusting it lets the waiting dialer in at once (backoff reset).
    a.trust.trust(b.id)
    await eventually(lambda: a.manager.is_online(b.id) and b.manager.is_online(a.id), 5.0, "online after trust")
    assert a.manager.pending() == []


async def test_new_key_claiming_a_trusted_id_is_refused(devices: Callable[..., Device]) -> None:
    a, b = devices("a"), devices("b")
    trust_each_other(a, b)
    # c has its own key but announces b's ID in its HELLO.
    c = devices("c")
    c.hello_factory = lambda: make_hello(c.identity, device_id=b.id)
    c.manager = c.new_manager()
    c.trust.trust(a.id)
    await a.manager.start()
    await c.manager.start()
    # c dials a: a sees c's key, whose ID is not trusted; nothing is sent.
    with pytest.raises(ChannelError):
        await c.manager.connect("127.0.0.1", a.port, a.id)
    assert [p.device_id for p in a.manager.pending()] == [c.id]
    # a dials "b" at c's address: refused before TLS, c's key is not b's.
    with pytest.raises(ChannelError, match=f"is device {c.id}, not the expected {b.id}"):
        await a.manager.connect("127.0.0.1", c.port, b.id)
    # Even if a trusted c, a HELLO naming b over c's certificate is refused.
    a.trust.trust(c.id)
    with pytest.raises(ChannelError, match=f"HELLO names device {b.id} but the certificate proves {c.id}"):
        await a.manager.connect("127.0.0.1", c.port)
    assert a.manager.channels() == {}
    # c accepted a's HELLO before reading a's refusal; the refusal closes it.
    await eventually(lambda: c.manager.channels() == {}, 2.0, "liar's channel closed")


async def test_protocol_version_mismatch_is_reported_on_both_sides(devices: Callable[..., Device]) -> None:
    a, b = devices("a"), devices("b")
    newer = PROTOCOL_VERSION + 1
    b.hello_factory = lambda: make_hello(b.identity, version=newer)
    b.manager = b.new_manager()
    trust_each_other(a, b)
    await a.manager.start()
    await b.manager.start()
    with pytest.raises(ChannelError, match=f"peer speaks protocol {newer}, this device speaks {PROTOCOL_VERSION}"):
        await a.manager.connect("127.0.0.1", b.port)
    with pytest.raises(ChannelError, match=f"peer speaks protocol {PROTOCOL_VERSION}, this device speaks {newer}"):
        await b.manager.connect("127.0.0.1", a.port)
    assert a.manager.channels() == {} and b.manager.channels() == {}


async def test_simultaneous_dial_leaves_exactly_one_channel(devices: Callable[..., Device]) -> None:
    a, b = devices("a", auto_dial=False), devices("b", auto_dial=False)
    trust_each_other(a, b)
    await a.manager.start()
    await b.manager.start()
    winner = min(a.id, b.id)
    for round_ in range(5):
        results = await asyncio.gather(
            a.manager.connect("127.0.0.1", b.port, b.id),
            b.manager.connect("127.0.0.1", a.port, a.id),
            return_exceptions=True,
        )
        assert not any(isinstance(r, BaseException) and not isinstance(r, ChannelError) for r in results), results
        await asyncio.sleep(0.2)
        ca, cb = a.manager.channel(b.id), b.manager.channel(a.id)
        assert ca is not None and cb is not None, f"round {round_}: {results}"
        assert len(a.manager.channels()) == 1 and len(b.manager.channels()) == 1
        # Same TCP connection on both sides, dialed by the smaller ID.
        assert ca.local_address == cb.peer_address and ca.peer_address == cb.local_address
        assert (a.id if ca.is_dialer else b.id) == winner
        # No offline/online flapping while the duplicate was dropped.
        assert a.changes == [(b.id, True)] and b.changes == [(a.id, True)]
        a.manager.disconnect(b.id, "next round")
        await eventually(lambda: not a.manager.channels() and not b.manager.channels(), 3.0, "closed")
        a.changes.clear()
        b.changes.clear()


async def test_duplicate_channel_close_is_reported_per_channel(devices: Callable[..., Device]) -> None:
    """The loser of a simultaneous dial closes without an offline event, but
    ``on_channel_closed`` names it, a send bound to it fails at once, and
    ``wait_channel`` gives the survivor (what sync sessions rely on)."""
    a, b = devices("a", auto_dial=False), devices("b", auto_dial=False)
    trust_each_other(a, b)
    await a.manager.start()
    await b.manager.start()
    losers = 0
    for round_ in range(5):
        a.closed_channels.clear()
        b.closed_channels.clear()
        await asyncio.gather(
            a.manager.connect("127.0.0.1", b.port, b.id),
            b.manager.connect("127.0.0.1", a.port, a.id),
            return_exceptions=True,
        )
        await eventually(lambda: a.manager.channel(b.id) and b.manager.channel(a.id), 3.0, "a channel each way")
        survivors = {}
        for me, other in ((a, b), (b, a)):
            survivor = await me.manager.wait_channel(other.id, timeout=3.0)
            assert survivor is not None and not survivor.closed
            survivors[me.id] = survivor
            note = Note(f"round {round_} from {me.name}", b"")
            await me.manager.send(other.id, note, channel=survivor)
            await eventually(lambda: any(m == note for _, m in other.messages), 3.0, "sent on the survivor")
            assert other.message_channels[-1] is other.manager.channel(me.id)
            assert me.changes == [(other.id, True)]  # the duplicate's close was no offline event
        a.manager.disconnect(b.id, "next round")
        for me, other in ((a, b), (b, a)):
            survivor = survivors[me.id]
            await eventually(lambda: (other.id, survivor) in me.closed_channels, 3.0, "the survivor's close reported")
            assert await me.manager.wait_channel(other.id, timeout=0.5) is None
            # Every channel registered this round was reported once, after it
            # closed: the survivor last, any duplicate it replaced before it.
            reported = [c for _, c in me.closed_channels]
            assert reported[-1] is survivor and len(set(map(id, reported))) == len(reported), reported
            for loser in reported[:-1]:
                losers += 1
                assert loser.closed
                with pytest.raises(DeviceOffline):
                    await me.manager.send(other.id, Note("late", b""), channel=loser)
        await eventually(lambda: not a.manager.channels() and not b.manager.channels(), 3.0, "closed")
        a.changes.clear()
        b.changes.clear()
    print(f"{losers} duplicate channel(s) registered, replaced and reported in 5 rounds")
    assert losers, "no round made a duplicate channel on either side: the race was not exercised"


async def test_untrust_closes_the_channel_at_once(devices: Callable[..., Device]) -> None:
    a, b = devices("a"), devices("b")
    trust_each_other(a, b)
    await a.manager.start()
    await b.manager.start()
    a.manager.add_address(b.id, "127.0.0.1", b.port)
    b.manager.add_address(a.id, "127.0.0.1", a.port)
    await eventually(lambda: a.manager.is_online(b.id) and b.manager.is_online(a.id), 5.0, "online")
    channel = a.manager.channel(b.id)
    assert channel is not None

    a.trust.untrust(b.id)
    # Synchronously: channel closed, device reported offline.
    assert channel.closed and not a.manager.is_online(b.id)
    assert a.changes[-1] == (b.id, False)
    took = await eventually(lambda: not b.manager.is_online(a.id), 2.0, "peer sees the close")
    assert took < 1.0
    assert b.changes[-1] == (a.id, False)
    # b keeps redialing; a refuses (pending) and never opens a channel again.
    await eventually(lambda: any(p.device_id == b.id for p in a.manager.pending()), 3.0, "pending")
    assert not a.manager.is_online(b.id)


async def test_reconnects_after_peer_restart(devices: Callable[..., Device]) -> None:
    a, b = devices("a"), devices("b")
    trust_each_other(a, b)
    await a.manager.start()
    await b.manager.start()
    port = b.port
    a.manager.add_address(b.id, "127.0.0.1", port)
    await eventually(lambda: a.manager.is_online(b.id), 5.0, "online")
    await b.manager.stop()
    await eventually(lambda: not a.manager.is_online(b.id), 2.0, "offline after stop")
    b.manager = b.new_manager(port=port)
    await asyncio.sleep(0.5)  # a few failed dials: backoff grows
    await b.manager.start()
    took = await eventually(lambda: a.manager.is_online(b.id), 5.0, "back online")
    assert took < 2.0
    assert a.changes == [(b.id, True), (b.id, False), (b.id, True)]


async def test_plain_tcp_and_garbage_are_dropped_and_server_still_works(devices: Callable[..., Device]) -> None:
    a = devices("a", handshake_timeout=1.0, max_handshakes=4)
    b = devices("b")
    trust_each_other(a, b)
    await a.manager.start()
    await b.manager.start()

    # Garbage: dropped at once.
    r, w = await asyncio.open_connection("127.0.0.1", a.port)
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(2000))
    assert await asyncio.wait_for(r.read(), 2.0) == b""
    w.close()
    # Silent TCP: dropped after the handshake timeout.
    r2, w2 = await asyncio.open_connection("127.0.0.1", a.port)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await asyncio.wait_for(r2.read(), 3.0) == b""
    assert 0.8 < loop.time() - start < 2.5
    w2.close()
    # Too many handshakes at once: the extra ones are dropped on arrival.
    silent = [await asyncio.open_connection("127.0.0.1", a.port) for _ in range(4)]
    await asyncio.sleep(0.1)
    r3, w3 = await asyncio.open_connection("127.0.0.1", a.port)
    assert await asyncio.wait_for(r3.read(), 1.0) == b""
    for _, w in silent:
        w.close()
    w3.close()

    # The server still accepts a good peer.
    await asyncio.sleep(0.2)
    channel = await b.manager.connect("127.0.0.1", a.port, a.id)
    assert channel.peer_hello.device_id == a.id
    await eventually(lambda: a.manager.is_online(b.id), 2.0, "online")


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Callable[..., asyncio.Future[tuple[asyncio.subprocess.Process, dict]]]]:
    procs: list[asyncio.subprocess.Process] = []

    async def start(trust: list[str], keepalive: float, dead_after: float) -> tuple[asyncio.subprocess.Process, dict]:
        proc = await asyncio.create_subprocess_exec(
            *agent_command(tmp_path / f"agent{len(procs)}", trust, keepalive=keepalive, dead_after=dead_after),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20.0)
        return proc, json.loads(line)

    yield start  # type: ignore[misc]
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            await proc.wait()


#: What a loaded 2-core CI machine may add to a timer before the event loop
#: runs it and the test's poll sees the result.
SCHEDULING_SLACK = 0.5


async def _offline_after_freeze(a: Device, agent_start, keepalive: float, dead_after: float) -> float:  # type: ignore[no-untyped-def]
    await a.manager.start()
    proc, info = await agent_start([a.id], keepalive, dead_after)
    a.trust.trust(info["device_id"])
    a.manager.add_address(info["device_id"], "127.0.0.1", info["port"])
    await eventually(lambda: a.manager.is_online(info["device_id"]), 5.0, "agent online")
    await asyncio.sleep(min(keepalive * 1.5, 3.0))  # keepalives flowing
    proc.send_signal(signal.SIGSTOP)  # the peer stops responding; its socket stays open
    took = await eventually(lambda: not a.manager.is_online(info["device_id"]), dead_after + 3.0, "declared offline")
    assert a.changes[-1] == (info["device_id"], False)
    return took


async def test_silent_peer_declared_offline(devices: Callable[..., Device], agent) -> None:  # type: ignore[no-untyped-def]
    a = devices("a")  # keepalive 0.5 s, dead after 1.5 s
    took = await _offline_after_freeze(a, agent, 0.5, 1.5)
    assert 0.5 < took <= 1.5 + SCHEDULING_SLACK


@pytest.mark.slow
async def test_silent_peer_declared_offline_with_default_timers(devices: Callable[..., Device], agent) -> None:  # type: ignore[no-untyped-def]
    a = devices("a", keepalive_interval=5.0, dead_after=15.0)
    took = await _offline_after_freeze(a, agent, 5.0, 15.0)
    assert 8.0 < took <= 15.0 + SCHEDULING_SLACK


async def test_listens_on_several_addresses_with_one_port(devices: Callable[..., Device]) -> None:
    a = devices("a", host=["127.0.0.1", "127.0.0.2"])
    b = devices("b", auto_dial=False)
    trust_each_other(a, b)
    await a.manager.start()
    await b.manager.start()
    channel = await b.manager.connect("127.0.0.2", a.port, a.id)
    assert channel.peer_address == ("127.0.0.2", a.port)


# ------------------------------------------------------------------ the bounded active set (net/overlay.py)

async def test_a_large_view_dials_only_the_chosen_peers(devices: Callable[..., Device]) -> None:
    a = devices("a", active_set=2, full_mesh_peers=2, idle_close=1.0)
    # 8 others: with 5, all 3 not chosen also chose a (each 2 of 5) in ~6 % of runs, leaving none outside the links.
    others = [devices(f"o{i}") for i in range(8)]
    trust_each_other(a, *others)
    for d in (a, *others):
        await d.manager.start()
    for o in others:  # only a knows addresses: the others never dial
        a.manager.add_address(o.id, "127.0.0.1", o.port, name=o.name, source="mdns")
    await eventually(lambda: a.manager.overlay.sparse and set(a.manager.channels()) == set(a.manager.overlay.chosen()),
                     5.0, "a connects to the two it chose")
    chosen = a.manager.overlay.chosen()
    assert len(chosen) == 2 and chosen < {o.id for o in others}
    outside = next(o for o in others if o.id not in a.manager.overlay.links())
    assert a.manager.outside_active_set(outside.id) and not a.manager.is_online(outside.id)
    await asyncio.sleep(0.5)  # the dial loop had every chance to dial more
    assert set(a.manager.channels()) == set(chosen)
    # on demand: a channel outside the set, closed again once idle
    assert await a.manager.reach(outside.id)
    assert a.manager.is_online(outside.id)
    await eventually(lambda: not a.manager.is_online(outside.id), 5.0, "the idle on-demand channel closes")
    assert set(a.manager.channels()) == set(chosen)


async def test_inbound_channels_beyond_three_times_the_set_are_closed_oldest_first(devices: Callable[..., Device]) -> None:
    hub = devices("hub", active_set=1, full_mesh_peers=1)
    others = [devices(f"o{i}") for i in range(6)]
    trust_each_other(hub, *others)
    # What each prune saw and did: the links it kept are those of that moment (the active
    # set changes as devices arrive), so which channels went is judged against them.
    pruned: list[tuple[frozenset[str], list[str], list[str]]] = []
    real_prune = hub.manager._prune

    def prune(now: float) -> float:
        links = frozenset(hub.manager.overlay.links())
        live = sorted((c.opened_at, p) for p, c in hub.manager._channels.items() if not c.closed)
        due = real_prune(now)
        pruned.append((links, [p for _, p in live], [p for p, c in hub.manager._channels.items() if c.closed]))
        return due

    hub.manager._prune = prune  # type: ignore[method-assign]
    for d in (hub, *others):
        await d.manager.start()
    for o in others:  # each dials the hub by hand; the hub dials nobody (it knows no address)
        await o.manager.connect("127.0.0.1", hub.port, hub.id)
        # The dialer is through before the hub has taken the channel: wait for that, so the
        # hub's order of arrival is this order (on a loaded host two could swap).
        await eventually(lambda: (o.id, True) in hub.changes, 5.0, "the hub has the channel")
    links = hub.manager.overlay.links() & {o.id for o in others}  # (those that chose the hub may be more than 3)
    bound = max(3, len(links))
    await eventually(lambda: len(hub.manager.channels()) <= bound, 5.0, "the hub keeps at most 3 × active_set channels")
    kept = set(hub.manager.channels())
    assert kept >= links  # its links stay
    # Each prune closed the oldest channels outside the links of its moment, only as many as went past the cap.
    closing = [(links_then, live, [p for p in live if p in closed]) for links_then, live, closed in pruned]
    assert any(gone for _, _, gone in closing)
    for links_then, live, gone in closing:
        if gone:
            assert not set(gone) & links_then
            assert gone == [p for p in live if p not in links_then][:len(live) - 3]
    await asyncio.sleep(0.3)
    assert set(hub.manager.channels()) == kept


async def test_a_chosen_device_that_stops_answering_stays_in_the_view_for_the_grace(
        devices: Callable[..., Device], monkeypatch: pytest.MonkeyPatch) -> None:
    """The active set's view keeps a trusted device whose dials keep failing
    for ``VIEW_GRACE_S`` after they began to fail, not only until its third
    failure: every device computes the graph from its view, and in a loaded
    fleet dials time out now and then (net/peers.py ``_refresh_overlay``)."""
    monkeypatch.setattr(peers_module, "VIEW_GRACE_S", 3.0)
    a = devices("a", active_set=2, full_mesh_peers=2)
    others = [devices(f"o{i}") for i in range(4)]
    trust_each_other(a, *others)
    for d in (a, *others):
        await d.manager.start()
    for o in others:
        a.manager.add_address(o.id, "127.0.0.1", o.port, name=o.name, source="mdns")
    await eventually(lambda: a.manager.overlay.sparse and set(a.manager.channels()) == set(a.manager.overlay.chosen()),
                     5.0, "a connects to the two it chose")
    gone = next(o for o in others if o.id in a.manager.overlay.chosen())
    await gone.manager.stop()  # its port refuses from now on: a's redials fail

    def failures() -> int:  # (the dial loop's own count: three used to drop it from the view)
        return max(e.failures for e in a.manager._addresses.values() if e.device_id == gone.id)

    await eventually(lambda: failures() >= 3 and gone.id in a.manager._failing_since, 10.0, "three failed redials, seen")
    started = a.manager._failing_since[gone.id]
    assert gone.id in a.manager.overlay.view(), "dropped at the third failure"
    await eventually(lambda: gone.id not in a.manager.overlay.view(), 15.0, "dropped once the grace is over")
    assert time.monotonic() - started >= 3.0
