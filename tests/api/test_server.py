"""ApiServer in-process: a real Unix socket, a stand-in dispatch function.

(The real methods and daemon are covered in tests/integration.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from p2pstore.api.jsonrpc import Request
from p2pstore.api.server import MAX_IN_FLIGHT, ApiServer, ClientConnection
from p2pstore.errors import StoreNotOpen

MAX_LINE = 1024


class Recorder:
    """Dispatch that echoes, fails or sleeps on demand, and remembers its calls."""

    def __init__(self) -> None:
        self.calls: list[Request] = []
        self.disconnected: list[int] = []

    async def dispatch(self, client: ClientConnection, request: Request) -> Any:
        self.calls.append(request)
        if request.method == "fail":
            raise StoreNotOpen("nope", data={"store": "x"})
        if request.method == "crash":
            raise RuntimeError("bug in a handler")
        if request.method == "sleep":
            await asyncio.sleep(request.params.get("s", 0.01))
        return {"echo": request.params, "uid": client.uid}


@pytest.fixture
async def sock_dir() -> AsyncIterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="p2ps-", dir="/tmp"))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


async def start(sock_dir: Path, recorder: Recorder, allowed: set[int] | None = None) -> ApiServer:
    server = ApiServer(
        sock_dir / "api.sock", recorder.dispatch, max_line=MAX_LINE,
        allowed_uids={os.getuid()} if allowed is None else allowed,
        on_disconnect=lambda c: recorder.disconnected.append(c.number),
    )
    await server.start()
    return server


async def connect(server: ApiServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(server.path))


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, msg: Any) -> dict[str, Any]:
    writer.write(json.dumps(msg).encode() + b"\n")
    await writer.drain()
    return json.loads(await asyncio.wait_for(reader.readline(), 5))


async def test_socket_is_0600_and_removed_on_stop(sock_dir: Path) -> None:
    old = os.umask(0)  # the server must not rely on the caller's umask
    try:
        server = await start(sock_dir, Recorder())
    finally:
        os.umask(old)
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
    await server.stop()
    assert not server.path.exists()


async def test_requests_are_answered_with_results_and_errors(sock_dir: Path) -> None:
    server = await start(sock_dir, Recorder())
    reader, writer = await connect(server)
    try:
        ok = await ask(reader, writer, {"jsonrpc": "2.0", "id": 1, "method": "m", "params": {"a": 1}})
        assert ok == {"jsonrpc": "2.0", "id": 1, "result": {"echo": {"a": 1}, "uid": os.getuid()}}
        err = await ask(reader, writer, {"jsonrpc": "2.0", "id": 2, "method": "fail"})
        assert err["id"] == 2 and err["error"]["data"] == {"store": "x", "name": "STORE_NOT_OPEN"}
        crash = await ask(reader, writer, {"jsonrpc": "2.0", "id": 3, "method": "crash"})
        assert crash["error"]["data"]["name"] == "INTERNAL_ERROR" and "bug in a handler" in crash["error"]["message"]
        again = await ask(reader, writer, {"jsonrpc": "2.0", "id": 4, "method": "m"})
        assert again["result"]["echo"] == {}
    finally:
        writer.close()
        await server.stop()


async def test_notifications_are_never_answered(sock_dir: Path) -> None:
    recorder = Recorder()
    server = await start(sock_dir, recorder)
    reader, writer = await connect(server)
    try:
        for method in ("m", "fail", "crash"):
            writer.write(json.dumps({"jsonrpc": "2.0", "method": method}).encode() + b"\n")
        reply = await ask(reader, writer, {"jsonrpc": "2.0", "id": "after", "method": "m"})
        assert reply["id"] == "after"  # the first line back answers the request
        assert [r.method for r in recorder.calls][:3] == ["m", "fail", "crash"]  # they did run
    finally:
        writer.close()
        await server.stop()


async def test_a_uid_outside_the_allow_list_is_closed_before_any_read(sock_dir: Path) -> None:
    recorder = Recorder()
    server = await start(sock_dir, recorder, allowed=set())  # not even our own uid
    reader, writer = await connect(server)
    try:
        writer.write(b'{"jsonrpc": "2.0", "id": 1, "method": "m"}\n')
        try:
            data = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:  # closed with our request unread: a reset, also fine
            data = b""
        assert data == b""
        assert recorder.calls == []
    finally:
        writer.close()
        await server.stop()


@pytest.mark.parametrize(("size", "served"), [(MAX_LINE, True), (MAX_LINE + 1, False), (MAX_LINE * 4, False)])
async def test_line_limit_is_exact(sock_dir: Path, size: int, served: bool) -> None:
    server = await start(sock_dir, Recorder())
    reader, writer = await connect(server)
    try:
        head = '{"jsonrpc": "2.0", "id": 1, "method": "m", "params": {"p": "'
        line = (head + "x" * (size - len(head) - 3) + '"}}').encode()
        assert len(line) == size
        writer.write(line + b"\n")
        reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
        if served:
            assert "result" in reply
        else:
            assert reply["error"]["data"]["name"] == "REQUEST_TOO_LARGE" and reply["id"] is None
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the one error
    finally:
        writer.close()
        await server.stop()


async def test_many_requests_in_flight_are_all_answered(sock_dir: Path) -> None:
    server = await start(sock_dir, Recorder())
    reader, writer = await connect(server)
    try:
        n = MAX_IN_FLIGHT * 3
        writer.write(b"".join(
            json.dumps({"jsonrpc": "2.0", "id": i, "method": "sleep", "params": {"s": 0.01}}).encode() + b"\n" for i in range(n)
        ))
        await writer.drain()
        ids = sorted([json.loads(await asyncio.wait_for(reader.readline(), 10))["id"] for _ in range(n)])
        assert ids == list(range(n))
    finally:
        writer.close()
        await server.stop()


async def test_answers_under_way_are_sent_when_the_client_stops_sending(sock_dir: Path) -> None:
    server = await start(sock_dir, Recorder())
    reader, writer = await connect(server)
    writer.write(b'{"jsonrpc": "2.0", "id": 1, "method": "sleep", "params": {"s": 0.1}}\n')
    writer.write_eof()
    reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert reply["id"] == 1
    writer.close()
    await server.stop()


async def test_connections_do_not_pile_up_in_the_task_set(sock_dir: Path) -> None:
    recorder = Recorder()
    server = await start(sock_dir, recorder)
    try:
        for _ in range(30):
            reader, writer = await connect(server)
            await ask(reader, writer, {"jsonrpc": "2.0", "id": 1, "method": "m"})
            writer.close()
        async with asyncio.timeout(5):
            while len(recorder.disconnected) < 30:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert len(server._tasks) == 0, f"{len(server._tasks)} tasks left after 30 finished connections"
    finally:
        await server.stop()


async def test_stop_with_connected_clients_is_quiet(sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = await start(sock_dir, Recorder())
    conns = [await connect(server) for _ in range(3)]
    for reader, writer in conns:
        await ask(reader, writer, {"jsonrpc": "2.0", "id": 1, "method": "m"})
    with caplog.at_level(logging.WARNING):
        await server.stop()
        await asyncio.sleep(0.05)  # let the loop run the streams' done-callbacks
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    for reader, writer in conns:
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_lone_surrogates_anywhere_get_an_answer_every_time(sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10 item 3: 100 such requests got 0 answers ("Task exception was never retrieved")."""
    recorder = Recorder()
    server = await start(sock_dir, recorder)
    reader, writer = await connect(server)
    lone = "\\ud800"
    kinds = [
        ('{"jsonrpc":"2.0","id":"a' + lone + '","method":"m"}', None, "INVALID_REQUEST"),
        ('{"jsonrpc":"2.0","id":%d,"method":"m' + lone + '"}', "id", "INVALID_REQUEST"),
        ('{"jsonrpc":"2.0","id":%d,"method":"m","x' + lone + '":1}', "id", "INVALID_REQUEST"),
        ('{"jsonrpc":"2.0","id":%d,"method":"m","params":{"v":"' + lone + '"}}', "id", "INVALID_PARAMS"),
        ('{"jsonrpc":"2.0","id":%d,"method":"m","params":{"k' + lone + '":1}}', "id", "INVALID_PARAMS"),
    ]
    try:
        expected = []
        for i in range(100):
            text, echoed, name = kinds[i % len(kinds)]
            writer.write((text % i if echoed else text).encode() + b"\n")
            expected.append((i if echoed else None, name))
        await writer.drain()
        got = [json.loads(await asyncio.wait_for(reader.readline(), 5)) for _ in range(100)]
        key = lambda pair: (str(pair[0]), pair[1])  # noqa: E731
        assert sorted(((m["id"], m["error"]["data"]["name"]) for m in got), key=key) == sorted(expected, key=key)
        assert recorder.calls == []  # refused before dispatch
        assert (await ask(reader, writer, {"jsonrpc": "2.0", "id": "after", "method": "m"}))["id"] == "after"
    finally:
        writer.close()
        await server.stop()
    assert "never retrieved" not in caplog.text


async def test_a_result_that_cannot_be_encoded_still_gets_an_answer(sock_dir: Path) -> None:
    class Odd(Recorder):
        async def dispatch(self, client: ClientConnection, request: Request) -> Any:
            return {"text": "x\ud800", "thing": object()} if request.method == "odd" else {"text": "\udfff"}

    server = await start(sock_dir, Odd())
    reader, writer = await connect(server)
    try:
        odd = await ask(reader, writer, {"jsonrpc": "2.0", "id": 1, "method": "odd"})
        assert odd["id"] == 1 and odd["error"]["data"]["name"] == "INTERNAL_ERROR"  # a handler bug, answered
        text = await ask(reader, writer, {"jsonrpc": "2.0", "id": 2, "method": "m"})
        # A lone surrogate (what invalid UTF-8 TEXT reads as) leaves as U+FFFD (docs/api.md).
        assert text == {"jsonrpc": "2.0", "id": 2, "result": {"text": "\ufffd"}}
    finally:
        writer.close()
        await server.stop()


def test_docs_state_the_in_flight_limit() -> None:
    """Issue 10 item 10: docs/api.md said 64 while the server took 16."""
    docs = Path(__file__).resolve().parents[2] / "docs"
    assert f"Up to {MAX_IN_FLIGHT} requests per connection are processed concurrently" in (docs / "api.md").read_text()
    assert f"(at most {MAX_IN_FLIGHT} per connection" in (docs / "architecture.md").read_text()
