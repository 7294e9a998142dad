"""TaskSet: background tasks are kept until they end, failures are logged, close() leaves nothing."""

from __future__ import annotations

import asyncio
import logging

import pytest

from p2pstore.tasks import TaskSet


async def test_a_failed_task_is_logged_once_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet(logging.getLogger("p2pstore.test"))

    async def broken() -> None:
        raise RuntimeError("a bug in a background task")

    task = tasks.spawn(broken(), "broken-one")
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)  # done callbacks run on the next loop turn
    failures = [r for r in caplog.records if "broken-one" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR
    assert failures[0].exc_info is not None and "a bug in a background task" in str(failures[0].exc_info[1])
    assert len(tasks) == 0  # forgotten once done


async def test_close_cancels_and_awaits_every_running_task() -> None:
    tasks = TaskSet(logging.getLogger("p2pstore.test"))
    started = asyncio.Event()
    cancelled: list[str] = []

    async def forever(name: str) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    tasks.spawn(forever("a"))
    outside = asyncio.ensure_future(forever("b"))
    tasks.adopt(outside)
    await started.wait()
    assert len(tasks) == 2
    await tasks.close()
    assert sorted(cancelled) == ["a", "b"] and len(tasks) == 0 and outside.cancelled()


async def test_a_cancelled_task_is_not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet(logging.getLogger("p2pstore.test"))
    task = tasks.spawn(asyncio.sleep(10))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
