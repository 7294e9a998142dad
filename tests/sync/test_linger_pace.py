"""Coalescing in a fleet (issue 15, item 2): with ``LINGER_PACE_FROM_PEERS``
peers online or more, an auto-sync push that lingers because writes came
while its batch was in flight reads on at most once per pace
(``SyncEngine._pace``), so a busy link carries one batch per pace however
fast the writes come — and still loses no write; a single write after a
quiet spell goes at once.

A real daemon pushes to four trusted peers in the test process
(tests/net/peer_agent.py), which answer its pushes and ack every batch,
noting when each batch arrived; they ack 0.3 s late (a busy peer).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from p2ps_helpers import LOOPBACK, DaemonProcess
from peer_agent import Device, eventually, make_hello
from sync_helpers import Node

from p2pstore.net.channel import Channel
from p2pstore.net.overlay import Overlay
from p2pstore.net.peers import PeerManager
from p2pstore.protocol import batch as wire_batch
from p2pstore.protocol.messages import Message, SyncAck, SyncBatch, SyncEnd, SyncOpen, SyncReady, TableOffer
from p2pstore.sync import engine
from p2pstore.sync.engine import LINGER_PACE_FROM_PEERS, LINGER_PACE_PER_PEER_S

pytestmark = pytest.mark.timeout(240)

REF = {"store": "paced"}
PEERS = LINGER_PACE_FROM_PEERS
PACE = LINGER_PACE_PER_PEER_S * PEERS
WRITES = 40
WRITE_GAP_S = 0.05
#: The receivers ack this late, as a busy peer does: writes then come while a
#: batch is in flight, and the push lingers (on an idle loopback link each
#: write's batch is acked before the next write, and each push simply ends).
ACK_DELAY_S = 0.3


class Receiver:
    """A trusted peer that takes every push: ready at once, each batch acked,
    arrival times noted per session."""

    def __init__(self, root: Path, name: str) -> None:
        self.device = Device(root, name)
        self.arrivals: dict[int, list[float]] = {}  # req -> when each batch came
        self.rows: list[int] = []
        self.ends: list[SyncEnd] = []
        self.position: tuple[int, str | None] = (0, None)  # the watermark: where the sender's stream was taken to
        d = self.device
        d.manager = PeerManager(d.identity, d.trust, hello_factory=lambda: make_hello(d.identity), on_change=lambda *a: None,
                                on_message=self.on_message, host="127.0.0.1", port=0)

    async def on_message(self, peer: str, msg: Message, channel: Channel) -> None:
        if isinstance(msg, SyncOpen) and msg.mode == "push":
            since, stream = self.position
            await self.device.manager.send(peer, SyncReady(msg.req, since, (TableOffer("T", None, (), None),), stream),
                                           channel=channel)
        elif isinstance(msg, SyncBatch):
            self.arrivals.setdefault(msg.req, []).append(time.monotonic())
            batch = wire_batch.decode(msg.payload)
            self.rows += [int(r.key) for r in batch.as_rows().rows]
            if batch.full:
                self.position = (batch.last_seq, batch.stream)
            await asyncio.sleep(ACK_DELAY_S)
            await self.device.manager.send(peer, SyncAck(msg.req, batch.last_seq, batch.count, 0, 0), channel=channel)
        elif isinstance(msg, SyncEnd):
            self.ends.append(msg)


def start_daemon(root: Path) -> Node:
    node = Node(DaemonProcess(root, "writer", ["--no-discovery", *LOOPBACK]).start())
    node.call("store.open", **REF)
    node.call("store.execute", **REF, sql="CREATE TABLE T (id INTEGER PRIMARY KEY, n INTEGER)")
    node.call("store.set_distributed_tables", **REF, tables=["T"], config={"auto_sync": True})
    return node


async def burst_then_one(node: Node, receivers: list[Receiver]) -> dict[str, Any]:
    for r in receivers:
        r.device.trust.trust(node.id)
        node.call("devices.trust", device_id=r.device.id, name=r.device.name)
        await r.device.manager.start()
        await r.device.manager.connect("127.0.0.1", node.port, node.id)
    try:
        await eventually(lambda: all(node.sees_online(r.device.id) for r in receivers), 30, "every peer online")
        for k in range(1, WRITES + 1):  # bounded: WRITES writes, WRITE_GAP_S apart
            await asyncio.to_thread(node.call, "store.insert", **REF, table="T", values={"id": k, "n": k})
            await asyncio.sleep(WRITE_GAP_S)
        await eventually(lambda: all(len(r.rows) == WRITES for r in receivers), 60, "every write at every peer")
        await eventually(lambda: all(len(r.ends) == len(r.arrivals) for r in receivers), 60, "every session ended")
        written = time.monotonic()
        await asyncio.to_thread(node.call, "store.insert", **REF, table="T", values={"id": WRITES + 1, "n": 0})
        await eventually(lambda: all(len(r.rows) == WRITES + 1 for r in receivers), 60, "the single write at every peer")
        single = max(max(max(t) for t in r.arrivals.values()) for r in receivers) - written
        return {"single_s": single}
    finally:
        for r in receivers:
            await r.device.manager.stop()


def test_a_lingering_push_in_a_fleet_reads_once_per_pace_and_loses_nothing(short_tmp: Path) -> None:
    node = start_daemon(short_tmp)
    try:
        receivers = [Receiver(short_tmp / "peers", f"p{i}") for i in range(PEERS)]
        seen = asyncio.run(burst_then_one(node, receivers))
        for r in receivers:
            assert sorted(r.rows) == list(range(1, WRITES + 2)), r.device.name  # each write once, none lost
            assert all(end.code == 0 for end in r.ends), r.ends
            for req, times in r.arrivals.items():
                gaps = [b - a for a, b in zip(times, times[1:])]
                # The pace counts from the read before (the batch left a little after it).
                assert all(g >= PACE - 0.1 for g in gaps), (r.device.name, req, gaps)
            batches = sum(len(t) for t in r.arrivals.values())
            # 40 writes over >= 2 s: a batch per pace, not one per write.
            assert batches <= WRITES // 3, (r.device.name, batches)
        assert seen["single_s"] < PACE, seen  # the first batch of a session is not held back
    finally:
        node.stop()


@pytest.mark.parametrize(("peers", "pace"), [(1, 0.0), (PEERS - 1, 0.0), (PEERS, PACE), (100, engine.LINGER_PACE_MAX_S)])
def test_the_pace_starts_at_a_fleet_and_grows_with_it_up_to_a_bound(peers: int, pace: float) -> None:
    e: Any = engine.SyncEngine.__new__(engine.SyncEngine)
    e.peers = type("Peers", (), {"channels": lambda self: [f"P{i}" for i in range(peers)], "overlay": Overlay("ME", 0)})()
    e.directory = type("Directory", (), {"trust_store": type("Trust", (), {"is_trusted": lambda self, d: True})()})()
    assert e._pace() == pytest.approx(pace)
