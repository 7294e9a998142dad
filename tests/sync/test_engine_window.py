"""The engine drives protocol/sync_session.py over a real channel: a daemon
configured with ``sync_window = N`` has exactly N batches in flight to a
receiver that does not ack, sends the next only per ack, and finishes the
stream with SyncEnd once every batch is acked; a receiver that runs a batch
that does not decode ends the session as CORRUPTED and the daemon goes on.

The receiver is a trusted peer in the test process (tests/net/peer_agent.py)
that pulls from a real daemon over TLS on 127.0.0.1 and acks by hand.

The other way round, a daemon receiving a whole window at once applies the
batches waiting for it in one transaction (group commit) and still acks
each batch, in order.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from p2ps_helpers import LOOPBACK, DaemonProcess, write_config
from peer_agent import Device, eventually
from sync_helpers import Node

from replicas import Replica

from p2pstore.protocol import batch as wire_batch
from p2pstore.store.database import BACKGROUND_QUIET_S
from p2pstore.store.tables import device_table_name
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


async def open_push(peer: Device, node: Node) -> None:
    """Connect and open a push of table T to the daemon; its ready came."""
    await peer.manager.connect("127.0.0.1", node.port, node.id)
    await peer.manager.send(node.id, SyncOpen(REQ, "default", REF["store"], "push", None, None, None,
                                              (TableOffer("T", None, (), None),)))
    await eventually(lambda: any(m.req == REQ for _, m in peer.messages if hasattr(m, "req")), 30, "sync_ready")


async def push_garbage(peer: Device, node: Node) -> SyncEnd | None:
    await peer.manager.start()
    try:
        await open_push(peer, node)
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


async def push_window(peer: Device, node: Node, payloads: list[bytes]) -> tuple[list[SyncAck], SyncEnd | None]:
    """Push ``payloads`` all at once, before any ack; then end the session."""
    await peer.manager.start()
    try:
        await open_push(peer, node)
        for payload in payloads:
            await peer.manager.send(node.id, SyncBatch(REQ, payload))

        def acks() -> list[SyncAck]:
            return [m for _, m in peer.messages if isinstance(m, SyncAck) and m.req == REQ]

        await eventually(lambda: len(acks()) == len(payloads) or ending(peer) is not None, 60, "every batch acked")
        await peer.manager.send(node.id, SyncEnd(REQ, 0, ""))
        return acks(), ending(peer)
    finally:
        await peer.manager.stop()


def test_a_receiver_applies_the_batches_waiting_for_it_in_one_transaction(short_tmp: Path) -> None:
    """8 batches in flight at once: the daemon applies them in a few
    transactions (``commits_received``), not 8, and acks each in order with
    its own watermark. Fails if the batches that arrived stay in the
    session's inbox while one is applied (the engine must hand them to the
    receiver machine), or if the daemon's own poll for outside writes counts
    as the application being busy (no group would ever form)."""
    node = start_daemon(short_tmp, "")
    try:
        peer = Device(short_tmp / "peer", "peer")
        peer.trust.trust(node.id)
        node.call("devices.trust", device_id=peer.id, name="peer")
        mine = Replica(short_tmp / "peer.db", peer.id)  # the peer's own store: real batches of its stream
        mine.write("CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)")
        mine.make_distributed("T")
        mine.write(f"INSERT INTO T (id, name, n) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                   f"WHERE x < {ROWS}) SELECT x, 'peer ' || x, x FROM c")
        payloads, since = [], 0
        for _ in range(ROWS):  # bounded
            out = mine.read(since, limit=DEFAULT_BATCH_ROWS)
            if out.count:
                payloads.append(wire_batch.encode(out))
            since = out.last_seq
            if not out.more:
                break
        mine.close()
        assert len(payloads) == 8
        # The node's own setup above (creating and distributing T) is the application writing:
        # no group forms for BACKGROUND_QUIET_S after it (the rule under test), so let that pass.
        time.sleep(BACKGROUND_QUIET_S)
        acks, end = asyncio.run(push_window(peer, node, payloads))
        assert end is None or end.code == 0, end
        assert [a.last_seq for a in acks] == [wire_batch.decode(p).last_seq for p in payloads]  # each, in order
        assert node.count(REF, device_table_name(peer.id, "T")) == ROWS
        traffic = next(d for d in node.call("devices.list") if d["device_id"] == peer.id)["traffic"]
        assert traffic["batches_received"] == 8 and traffic["rows_applied"] == ROWS
        assert traffic["commits_received"] <= 3, traffic  # the first alone, then the rest together (one or two)
    finally:
        node.stop()
