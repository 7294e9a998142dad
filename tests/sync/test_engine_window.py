"""The engine drives protocol/sync_session.py over a real channel: a daemon
configured with ``sync_window = N`` has exactly N batches in flight to a
receiver that does not ack, sends the next only per ack, and finishes the
stream with SyncEnd once every batch is acked; a receiver that runs a batch
that does not decode ends the session as CORRUPTED and the daemon goes on.

The receiver is a trusted peer in the test process (tests/net/peer_agent.py)
that pulls from a real daemon over TLS on 127.0.0.1 and acks by hand.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from p2ps_helpers import LOOPBACK, DaemonProcess, write_config
from peer_agent import Device, eventually
from sync_helpers import Node

from p2pstore.protocol import batch as wire_batch
from p2pstore.sync.engine import DEFAULT_BATCH_ROWS
from p2pstore.protocol.messages import SyncAck, SyncBatch, SyncEnd, SyncOpen, TableOffer

pytestmark = pytest.mark.timeout(240)

REF = {"store": "w"}
ROWS = 8 * DEFAULT_BATCH_ROWS  # 8 batches
REQ = 11


def start_daemon(root: Path, config: str) -> Node:
    path = write_config(root, config)
    node = Node(DaemonProcess(root, "a", ["--no-discovery", *LOOPBACK, "--config", str(path)]).start())
    node.call("store.open", **REF)
    node.call("store.execute", **REF, sql="CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)")
    node.call("store.set_distributed_tables", **REF, tables=["T"], config={"auto_sync": False})
    node.call("store.execute", **REF, sql=(
        f"INSERT INTO T (id, name, n) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {ROWS}) "
        "SELECT x, 'name ' || x, x FROM c"))
    return node


def batches(peer: Device) -> list[SyncBatch]:
    return [m for _, m in peer.messages if isinstance(m, SyncBatch) and m.req == REQ]


def rows_sent(peer: Device) -> int:
    return sum(wire_batch.decode(b.payload).count for b in batches(peer))


def ending(peer: Device) -> SyncEnd | None:
    return next((m for _, m in peer.messages if isinstance(m, SyncEnd) and m.req == REQ), None)


async def pull_acking_by_hand(peer: Device, node: Node, window: int) -> dict[str, Any]:
    """Pull the whole stream, acking only when the daemon has a full window out."""
    await peer.manager.start()
    try:
        await peer.manager.connect("127.0.0.1", node.port, node.id)
        await peer.manager.send(node.id, SyncOpen(REQ, "default", REF["store"], "pull", None, None, 0,
                                                  (TableOffer("T", None, (), None),)))
        acked, peak, seqs = 0, 0, []
        for _ in range(ROWS):  # bounded: one round per ack
            # Wait until the daemon has a full window out, or has nothing more to send.
            await eventually(lambda: len(batches(peer)) - acked >= window or ending(peer) is not None
                             or rows_sent(peer) == ROWS, 60, f"a window of {window} batches")
            out = len(batches(peer)) - acked
            peak = max(peak, out)
            assert out <= window, f"{out} batches unacked with sync_window = {window}"
            if ending(peer) is not None or out == 0:
                break
            batch = wire_batch.decode(batches(peer)[acked].payload)
            seqs += [r.seq for r in batch.as_rows().rows]
            acked += 1
            await peer.manager.send(node.id, SyncAck(REQ, batch.last_seq, batch.count, 0, 0))
        await eventually(lambda: ending(peer) is not None, 60, "sync_end")
        return {"peak": peak, "acked": acked, "seqs": seqs, "end": ending(peer)}
    finally:
        await peer.manager.stop()


@pytest.mark.parametrize("window", [1, 3, 6])
def test_a_sender_keeps_exactly_its_window_in_flight(short_tmp: Path, window: int) -> None:
    node = start_daemon(short_tmp, f"sync_window = {window}\n")
    try:
        peer = Device(short_tmp / "peer", "peer")
        peer.trust.trust(node.id)
        node.call("devices.trust", device_id=peer.id, name="peer")
        seen = asyncio.run(pull_acking_by_hand(peer, node, window))
        assert seen["peak"] == window  # a receiver that does not ack sees the whole window, and no more
        assert seen["end"].code == 0, seen["end"]
        assert sorted(seen["seqs"]) == seen["seqs"] and len(seen["seqs"]) == len(set(seen["seqs"])) == ROWS
        assert seen["acked"] == len(batches(peer)) == ROWS // DEFAULT_BATCH_ROWS
    finally:
        node.stop()


async def push_garbage(peer: Device, node: Node) -> SyncEnd | None:
    await peer.manager.start()
    try:
        await peer.manager.connect("127.0.0.1", node.port, node.id)
        await peer.manager.send(node.id, SyncOpen(REQ, "default", REF["store"], "push", None, None, None,
                                                  (TableOffer("T", None, (), None),)))
        await eventually(lambda: any(m.req == REQ for _, m in peer.messages if hasattr(m, "req")), 30, "sync_ready")
        await peer.manager.send(node.id, SyncBatch(REQ, b"\xc1 not a batch"))
        await eventually(lambda: ending(peer) is not None, 30, "sync_end")
        return ending(peer)
    finally:
        await peer.manager.stop()


def test_a_batch_that_does_not_decode_ends_the_session_as_corrupted(short_tmp: Path) -> None:
    node = start_daemon(short_tmp, "sync_window = 2\n")
    try:
        peer = Device(short_tmp / "peer", "peer")
        peer.trust.trust(node.id)
        node.call("devices.trust", device_id=peer.id, name="peer")
        end = asyncio.run(push_garbage(peer, node))
        assert end is not None and end.code == 8 and "batch" in end.message, end  # CORRUPTED
        assert node.count(REF, "T") == ROWS and node.call("device.info")["device_id"] == node.id
    finally:
        node.stop()
