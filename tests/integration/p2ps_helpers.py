"""Helpers shared by the integration tests (a unique module name, so it
can't collide with helpers of other test folders)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.conftest import DaemonProcess  # noqa: E402,F401  (the one definition of a daemon subprocess)

LOOPBACK = ("--interface", "127.0.0.1")
_names = itertools.count(1)


def unique(prefix: str = "s") -> str:
    """A store name no other test of the session uses."""
    return f"{prefix}{os.getpid()}_{next(_names)}"


def write_config(root: Path, text: str, name: str = "p2pstore.toml") -> Path:
    path = root / name
    path.write_text(text)
    return path


class RawConnection:
    """A plain Unix-socket connection speaking newline-delimited JSON by hand."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buf = b""
        self.skipped: list[dict[str, Any]] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, msg: Any) -> None:
        self.send_raw(json.dumps(msg).encode() + b"\n")

    def read_line(self) -> bytes:
        """One line, or b"" when the daemon closed the connection."""
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                rest, self._buf = self._buf, b""
                return rest
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def read(self) -> dict[str, Any]:
        line = self.read_line()
        assert line, "the daemon closed the connection"
        return json.loads(line)

    def read_response(self, rid: Any) -> dict[str, Any]:
        """The response with ``rid``; notifications and other responses before it are skipped
        (into ``self.skipped``, so a test can check there were none)."""
        for _ in range(10_000):
            msg = self.read()
            if "id" in msg and msg["id"] == rid:
                return msg
            self.skipped.append(msg)
        raise AssertionError("no response")

    def call(self, method: str, rid: Any = 1, **params: Any) -> dict[str, Any]:
        self.send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        return self.read_response(rid)

    def is_closed_by_peer(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def error_name(response: dict[str, Any]) -> str:
    assert "error" in response, f"expected an error, got {response}"
    return response["error"]["data"]["name"]


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
