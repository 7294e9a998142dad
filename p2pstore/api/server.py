"""The Unix-socket server: framing, peer-credential check, one task per request.

Invariants:
- The socket file appears at its path only with its final mode and group:
  it is bound under a umask of 0o177 at a temporary name, given 0600 (0660
  and the configured group), and renamed into place, so neither a client nor
  a waiting test ever sees a half-configured socket.
- Every connection's caller uid (SO_PEERCRED) is checked against the
  allow-list before a single byte is read.
- A bad request gets an error response and the connection stays usable; a
  line over ``max_line`` bytes gets one error and the connection is closed
  (the framing is lost). Nothing a client sends can raise out of here.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from p2pstore.tasks import TaskSet
from p2pstore.api.jsonrpc import RequestError, decode_request, encode_error, encode_result, Request
from p2pstore.api.subscriptions import Outbox, drain_outbox
from p2pstore.errors import InternalError, P2PStoreError, RequestTooLarge

log = logging.getLogger(__name__)

#: Requests one connection may have in flight; more wait (backpressure).
#: Each holds its decoded params (a 1 MiB line can decode to ~10x that in
#: Python objects) and a store runs one operation at a time anyway, so more
#: would add memory, not speed. docs/api.md states this number (a test checks).
MAX_IN_FLIGHT = 16

Dispatch = Callable[["ClientConnection", Request], Awaitable[Any]]


class ClientConnection:
    """What a method handler knows about its caller."""

    def __init__(self, number: int, uid: int, pid: int, outbox: Outbox) -> None:
        self.number = number
        self.uid = uid
        self.pid = pid
        self.outbox = outbox


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


class ApiServer:
    def __init__(
        self,
        path: Path,
        dispatch: Dispatch,
        *,
        max_line: int,
        allowed_uids: set[int],
        group: str | None = None,
        queue_limit: int = 1000,
        on_disconnect: Callable[[ClientConnection], None] | None = None,
    ) -> None:
        self.path = path
        self.dispatch = dispatch
        self.max_line = max_line
        self.allowed_uids = allowed_uids
        self.group = group
        self.queue_limit = queue_limit
        self.on_disconnect = on_disconnect
        self._server: asyncio.AbstractServer | None = None
        self._count = 0
        self._tasks = TaskSet(log)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        staging.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(str(staging))
            finally:
                os.umask(old)
            if self.group:
                os.chown(staging, -1, grp.getgrnam(self.group).gr_gid)
            os.chmod(staging, 0o660 if self.group else 0o600)
            os.replace(staging, self.path)
        except BaseException:
            sock.close()
            staging.unlink(missing_ok=True)
            raise
        # readuntil() accepts a line of up to ``limit`` bytes before its newline and
        # raises LimitOverrunError past that: exactly max_line, not a byte more.
        self._server = await asyncio.start_unix_server(self._handle, sock=sock, limit=self.max_line)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._tasks.close()
            self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.adopt(task)  # one entry per live connection, not per connection ever made
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # stop() cancels live connections. End quietly: Python 3.11's
            # start_unix_server callback calls task.exception() on a cancelled
            # handler, which logs a spurious traceback at every shutdown.
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            pid, uid, _gid = peer_credentials(sock)
        except OSError:
            pid, uid = -1, -1
        if uid not in self.allowed_uids:
            log.warning("refused API connection from uid %d (pid %d): not in the allow-list", uid, pid)
            writer.close()
            return
        self._count += 1
        outbox = Outbox(self.queue_limit)
        client = ClientConnection(self._count, uid, pid, outbox)
        log.debug("API client %d connected (uid %d, pid %d)", client.number, uid, pid)
        drainer = self._spawn(drain_outbox(outbox, writer))
        inflight: set[asyncio.Task[Any]] = set()
        try:
            while True:
                await outbox.room()  # backpressure: a client must read its answers to be heard
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    line = exc.partial  # last line without a newline, or EOF
                    if line.strip():
                        await self._answer(client, line)
                    break
                except asyncio.LimitOverrunError:
                    outbox.send(encode_error(None, RequestTooLarge(
                        f"request line longer than {self.max_line} bytes; the connection is closed")))
                    break
                if line.strip():
                    if len(inflight) >= MAX_IN_FLIGHT:
                        await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    task = self._spawn(self._answer(client, line))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
        except (ConnectionError, OSError):
            pass
        finally:
            if inflight:  # answers already under way are still sent
                await asyncio.wait(inflight, timeout=5)
            outbox.close()
            try:
                await asyncio.wait_for(drainer, timeout=5)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                drainer.cancel()
            if self.on_disconnect is not None:
                self.on_disconnect(client)
            writer.close()
            log.debug("API client %d disconnected", client.number)

    async def _answer(self, client: ClientConnection, line: bytes) -> None:
        rid = None
        notification = False
        try:
            request = decode_request(line)
            rid, notification = request.id, request.is_notification
            result = await self.dispatch(client, request)
            if not notification:
                client.outbox.send(encode_result(rid, result))
        except RequestError as exc:
            client.outbox.send(encode_error(exc.id, exc.error))
        except P2PStoreError as exc:
            # JSON-RPC 2.0: a notification is never answered, not even with an error.
            if notification:
                log.debug("API client %d: notification %s failed: %s", client.number, exc.name, exc.message)
            else:
                client.outbox.send(encode_error(rid, exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the daemon must never die on input
            log.exception("internal error answering request %r", rid)
            if not notification:
                client.outbox.send(encode_error(rid, InternalError(f"internal error: {type(exc).__name__}: {exc}")))
