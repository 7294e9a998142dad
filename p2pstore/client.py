"""Python client for the local daemon (async, plus a thin blocking wrapper).

    async with Client() as c:
        await c.call("store.open", store="shop")
        await c.call("store.insert", store="shop", table="T", values={"NAME": "x"})

Errors come back as the same P2PStoreError subclasses the daemon raised
(matched by their stable name), so ``except StoreNotOpen`` works in clients.
Notifications (``dataChange``, ``deviceChange``, ``syncProgress``,
``overflow``) arrive on ``client.notifications``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from p2pstore.api.jsonrpc import MAX_RESPONSE_BYTES, encode_request, from_wire
from p2pstore.config import default_socket_path
from p2pstore.errors import DaemonNotRunning, P2PStoreError, ProtocolError, by_name

T = TypeVar("T")


class Client:
    def __init__(self, socket_path: Path | str | None = None) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self.notifications: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed_error: P2PStoreError | None = None

    async def connect(self) -> Client:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path), limit=MAX_RESPONSE_BYTES)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(
                f"no p2pstore daemon is listening on {self.socket_path}; start one with `p2pstore daemon` or pass --socket",
                data={"socket": str(self.socket_path)},
            ) from exc
        except PermissionError as exc:
            raise DaemonNotRunning(f"no permission to use the daemon socket {self.socket_path}") from exc
        self._task = asyncio.create_task(self._read_loop())
        return self

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def call(self, method: str, **params: Any) -> Any:
        """Send one request and wait for its answer."""
        if self._writer is None:
            await self.connect()
        if self._closed_error is not None:
            raise self._closed_error
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        assert self._writer is not None
        try:
            self._writer.write(encode_request(rid, method, params))
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            # The daemon went away before the read loop saw it: the same error
            # the read loop gives (or will give) every call still waiting.
            self._pending.pop(rid, None)
            if not future.done():
                future.set_exception(self._closed_error or _connection_gone(exc))
        return await future

    async def notifications_iter(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self.notifications.get()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        error: P2PStoreError = DaemonNotRunning("the daemon closed the connection")
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "id" not in msg:
                    await self.notifications.put({"method": msg.get("method"), "params": from_wire(msg.get("params", {}))})
                    continue
                future = self._pending.pop(msg["id"], None) if msg["id"] is not None else None
                if "error" in msg:
                    err = _error_from(msg["error"])
                    if future is None:  # an error about the framing: the daemon closes next
                        error = err
                        continue
                    future.set_exception(err)
                elif future is not None:
                    future.set_result(from_wire(msg.get("result")))
        except ConnectionError as exc:
            error = _connection_gone(exc)
        except (OSError, ValueError) as exc:
            error = ProtocolError(f"connection to the daemon broke: {exc}")
        finally:
            self._closed_error = error
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()


def _connection_gone(exc: BaseException) -> DaemonNotRunning:
    """The daemon closed or reset the connection (it stopped or died)."""
    return DaemonNotRunning(f"the daemon closed the connection ({exc or type(exc).__name__})")


def _error_from(payload: dict[str, Any]) -> P2PStoreError:
    data = dict(payload.get("data") or {})
    name = data.pop("name", "INTERNAL_ERROR")
    cls = by_name(name)
    err = cls(payload.get("message", name), data=data)
    if cls is P2PStoreError:
        err.name, err.code = name, payload.get("code", err.code)
    return err


class BlockingClient:
    """The same client for code without an event loop: one private loop thread."""

    def __init__(self, socket_path: Path | str | None = None, timeout: float | None = 60.0) -> None:
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="p2pstore-client", daemon=True)
        self._thread.start()
        self._client = Client(socket_path)
        try:
            self._run(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout or self.timeout)

    def call(self, method: str, **params: Any) -> Any:
        return self._run(self._client.call(method, **params))

    def next_notification(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the next notification (raises TimeoutError)."""
        return self._run(asyncio.wait_for(self._client.notifications.get(), timeout), None if timeout is None else timeout + 1)

    def close(self) -> None:
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
