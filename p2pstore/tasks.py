"""Background tasks of one owner (the peer manager, the sync engine, ...).

Every long-lived part of the daemon starts small tasks it does not await at
once: a channel's serve loop, a sync session a peer opened, a discovery
re-announce. Each part used to keep its own set with its own done-callback;
some dropped a failed task's exception without a word. A ``TaskSet`` is the
one way to do it:

- a task is kept (a strong reference: the loop only keeps weak ones) until
  it ends, then forgotten;
- a task that fails is logged once, with its traceback, under the owner's
  logger: a bug is never silent, and "Task exception was never retrieved"
  never appears;
- ``close()`` cancels what is still running and waits for it, so an owner's
  ``stop()`` leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class TaskSet:
    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Awaitable[T], name: str | None = None) -> asyncio.Task[T]:
        """Run ``work`` in the background; a failure is logged, not lost."""
        task = asyncio.ensure_future(work)
        if name is not None:
            task.set_name(name)
        self.adopt(task)
        return task

    def adopt(self, task: asyncio.Task[Any]) -> None:
        """Keep a task made elsewhere (e.g. the one serving a connection)."""
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    async def wait(self, timeout: float | None = None) -> None:
        """Wait (bounded) for the running tasks to end by themselves."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def close(self) -> None:
        """Cancel every running task and wait until all have ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
