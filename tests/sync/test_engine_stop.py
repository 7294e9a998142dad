"""A stopping daemon serves no new session (sync/engine.py ``stop``): the
daemon closes its stores right after the engine stops, and a session a peer
opened in between used to run into the closed store and log a traceback
(seen at the end of a 64-host bench: "Cannot operate on a closed database")."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

from p2pstore.protocol.messages import SyncOpen, TableOffer
from p2pstore.sync.engine import SyncEngine


def engine() -> SyncEngine:
    peers: Any = SimpleNamespace(channels=lambda: ["P1"])
    directory: Any = SimpleNamespace(trust_store=SimpleNamespace(is_trusted=lambda d: True))
    registry: Any = SimpleNamespace(stores=lambda: [])
    return SyncEngine(registry=registry, peers=peers, directory=directory, on_applied=lambda *a: None,
                      rng=random.Random(1))


def test_a_session_opened_while_the_engine_stops_is_not_served() -> None:
    async def run() -> tuple[int, int, int]:
        e = engine()
        opening = SyncOpen(7, "default", "s", "push", None, None, None, (TableOffer("T", None, (), None),))
        await e.stop()
        channel: Any = object()
        await e.handle("P1", opening, channel)
        e._spawn(asyncio.sleep(0), "auto-sync s -> P1")  # nor does anything else start
        return len(e._tasks), e.traffic.of("P1").to_dict().get("sessions_served", 0), e._sessions.count("P1")
    assert asyncio.run(run()) == (0, 0, 0)
