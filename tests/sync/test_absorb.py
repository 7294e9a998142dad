"""The receiver's engine hands the machine what arrives while the store
applies (sync/engine.py ``_absorb_while``), so a batch is decoded during
the apply before it, not after: every message that came meanwhile, in
order, none after the apply ended, none lost, and the session's end left
for the next wait."""

from __future__ import annotations

import asyncio
from typing import Any

from p2pstore.protocol.messages import SyncEnd
from p2pstore.sync.engine import _absorb_while
from p2pstore.sync.requests import Ended, Request, Why

REQ = 7


class _Machine:
    """Records what it is told; answers ``answer_to`` with a finish."""

    def __init__(self, answer_to: Any = None) -> None:
        self.told: list[Any] = []
        self.answer_to = answer_to

    def receive(self, msg: Any) -> list[Any]:
        self.told.append(msg)
        return ["finish"] if msg == self.answer_to else []


def _end(code: int) -> SyncEnd:
    return SyncEnd(REQ, code, f"m{code}")


def _session() -> Request:
    return Request("PEER", REQ, None, 8)  # type: ignore[arg-type]  # (no channel: nothing is sent)


async def test_messages_that_arrive_during_the_apply_are_handed_over_meanwhile() -> None:
    session, machine = _session(), _Machine()
    busy: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    session.inbox.put_nowait(_end(1))  # (arrived before: handed over first)
    absorbing = asyncio.ensure_future(_absorb_while(session, machine, busy))
    for code in (2, 3):
        await asyncio.sleep(0)
        session.inbox.put_nowait(_end(code))
        for _ in range(5):  # bounded: a few turns of the loop
            await asyncio.sleep(0)
        assert machine.told[-1] == _end(code)  # handed over while the apply still runs
    busy.set_result(None)
    assert await absorbing == []
    assert machine.told == [_end(1), _end(2), _end(3)]
    session.inbox.put_nowait(_end(4))  # after the apply: left for the next wait (no get of it lingers)
    for _ in range(5):
        await asyncio.sleep(0)
    assert session.arrived() == [_end(4)]


async def test_it_stops_at_the_first_message_the_machine_answers() -> None:
    session, machine = _session(), _Machine(answer_to=_end(2))
    busy: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    for code in (1, 2, 3):
        session.inbox.put_nowait(_end(code))
    assert await _absorb_while(session, machine, busy) == ["finish"]
    assert machine.told == [_end(1), _end(2)] and not busy.done()


async def test_the_sessions_end_is_left_for_the_next_wait() -> None:
    session, machine = _session(), _Machine()
    busy: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    absorbing = asyncio.ensure_future(_absorb_while(session, machine, busy))
    await asyncio.sleep(0)
    session.inbox.put_nowait(_end(1))
    session.end(Ended(Why.CHANNEL_CLOSED, "gone"))
    assert await asyncio.wait_for(absorbing, 2.0) == []  # (returns at the end, the apply still running)
    assert machine.told == [_end(1)] and not busy.done()
    assert await session.next(0.1) is None  # the end marker is still there for the next wait


async def test_an_end_while_waiting_is_left_for_the_next_wait() -> None:
    session, machine = _session(), _Machine()
    busy: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    absorbing = asyncio.ensure_future(_absorb_while(session, machine, busy))
    await asyncio.sleep(0)
    session.end(Ended(Why.PEER_OFFLINE))  # (the inbox empty: the waiting get takes the end marker)
    assert await asyncio.wait_for(absorbing, 2.0) == [] and machine.told == []
    assert await session.next(0.1) is None


async def test_a_message_is_never_lost_when_the_apply_ends_first() -> None:
    session, machine = _session(), _Machine()
    busy: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    absorbing = asyncio.ensure_future(_absorb_while(session, machine, busy))
    await asyncio.sleep(0)
    busy.set_result(None)
    session.inbox.put_nowait(_end(1))  # (the same turn: the waiting get may or may not take it)
    assert await absorbing == []
    assert machine.told + session.arrived() == [_end(1)]
