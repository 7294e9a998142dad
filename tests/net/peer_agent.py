"""Test helpers for the peer layer, and a PeerManager in its own process.

Imported by the tests for ``Device`` and ``eventually``. Run as a script
(``python peer_agent.py --data-dir D --trust ID...``) it starts a
PeerManager on 127.0.0.1, prints one JSON line ``{"device_id", "port"}``
and serves until its stdin closes or it gets SIGTERM; tests freeze it with
SIGSTOP to play a peer that stops responding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pstore import PROTOCOL_VERSION
from p2pstore.net.channel import Channel
from p2pstore.net.identity import Identity
from p2pstore.net.peers import PeerManager
from p2pstore.net.trust import TrustStore
from p2pstore.protocol.messages import Hello, Message, StoreOffer, TableOffer

SCRIPT = Path(__file__).resolve()


def make_hello(identity: Identity, *, version: int = PROTOCOL_VERSION, level: int = 2, device_id: str | None = None) -> Hello:
    return Hello(
        protocol_version=version,
        device_id=device_id or identity.device_id,
        name=identity.name,
        security_level=level,
        stores=(StoreOffer("default", "notes", 1, "collaborative", (TableOffer("NOTE", None, ("ID", "TEXT"), None),)),),
    )


@dataclass
class Device:
    """One device for tests: identity, trust list, manager, and what it saw."""

    root: Path
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    hello_factory: Callable[[], Hello] | None = None

    def __post_init__(self) -> None:
        self.identity = Identity.load_or_create(self.root / self.name, self.name)
        self.trust = TrustStore(self.root / self.name / "trust.json")
        self.changes: list[tuple[str, bool]] = []
        self.messages: list[tuple[str, Message]] = []
        self.message_channels: list[Channel] = []
        self.closed_channels: list[tuple[str, Channel]] = []
        self.manager = self.new_manager()

    @property
    def id(self) -> str:
        return self.identity.device_id

    def new_manager(self, **overrides: Any) -> PeerManager:
        async def on_message(device_id: str, msg: Message, channel: Channel) -> None:
            self.messages.append((device_id, msg))
            self.message_channels.append(channel)

        options: dict[str, Any] = dict(host="127.0.0.1", port=0, keepalive_interval=0.5, dead_after=1.5)
        options.update(self.kwargs)
        options.update(overrides)
        return PeerManager(
            self.identity,
            self.trust,
            hello_factory=self.hello_factory or (lambda: make_hello(self.identity)),
            on_change=lambda d, online: self.changes.append((d, online)),
            on_message=on_message,
            on_channel_closed=lambda d, channel: self.closed_channels.append((d, channel)),
            **options,
        )

    @property
    def port(self) -> int:
        assert self.manager.port is not None
        return self.manager.port


async def eventually(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> float:
    """Poll until ``condition()``; returns the seconds it took, fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(int(timeout / 0.01) + 1):
        if condition():
            return loop.time() - start
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} not reached within {timeout} s")


def agent_command(data_dir: Path, trust: list[str], *, keepalive: float, dead_after: float) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--data-dir",
        str(data_dir),
        "--keepalive",
        str(keepalive),
        "--dead-after",
        str(dead_after),
        *[a for d in trust for a in ("--trust", d)],
    ]


async def _main(args: argparse.Namespace) -> None:
    identity = Identity.load_or_create(Path(args.data_dir), "agent")
    trust = TrustStore(Path(args.data_dir) / "trust.json")
    for device_id in args.trust:
        trust.trust(device_id)
    manager = PeerManager(
        identity,
        trust,
        hello_factory=lambda: make_hello(identity),
        host="127.0.0.1",
        port=0,
        keepalive_interval=args.keepalive,
        dead_after=args.dead_after,
    )
    await manager.start()
    print(json.dumps({"device_id": identity.device_id, "port": manager.port}), flush=True)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_reader(sys.stdin.fileno(), lambda: sys.stdin.buffer.read1(4096) or done.set())  # type: ignore[attr-defined]
    deadline = time.monotonic() + args.max_seconds
    while not done.is_set() and time.monotonic() < deadline:
        try:
            await asyncio.wait_for(done.wait(), 1.0)
        except TimeoutError:
            pass
    await manager.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--trust", action="append", default=[])
    parser.add_argument("--keepalive", type=float, default=5.0)
    parser.add_argument("--dead-after", type=float, default=15.0)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    asyncio.run(_main(parser.parse_args()))
