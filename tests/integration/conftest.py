"""Fixtures for integration tests: real daemons (subprocesses), raw sockets.

``shared_daemon`` is one daemon per test module, for tests that don't
interfere (each uses its own store names). Tests that change how a daemon
runs (config, signals, crashes) start their own with ``start_daemon``.
Every daemon here listens for peers on 127.0.0.1 only, with discovery off.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from p2ps_helpers import LOOPBACK, DaemonProcess, RawConnection

from p2pstore.client import BlockingClient


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[DaemonProcess]:
    root = Path(tempfile.mkdtemp(prefix="p2ps-", dir="/tmp"))
    os.chmod(root, 0o700)
    d = DaemonProcess(root, "shared", ["--no-discovery", *LOOPBACK])
    try:
        d.start()
        yield d
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def api(shared_daemon: DaemonProcess) -> Iterator[BlockingClient]:
    """A client of the module's shared daemon (one connection per test)."""
    c = shared_daemon.client()
    yield c
    c.close()


@pytest.fixture
def start_daemon(daemon_factory: Callable[..., DaemonProcess]) -> Callable[..., DaemonProcess]:
    """``start_daemon(name, *flags)``: a fresh daemon on loopback, stopped at teardown."""

    def start(name: str = "a", *extra: str) -> DaemonProcess:
        return daemon_factory(name, *LOOPBACK, *extra)

    return start


@pytest.fixture
def raw_factory() -> Iterator[Callable[[Path], RawConnection]]:
    conns: list[RawConnection] = []

    def make(path: Path) -> RawConnection:
        conns.append(RawConnection(path))
        return conns[-1]

    yield make
    for c in conns:
        c.close()
