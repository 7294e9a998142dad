"""A Discovery instance in its own process, speaking JSON lines on stdout.

Tests run it as a script (``python discovery_agent.py --id X ...``), directly
on loopback or through ``ip netns exec`` in a testbed host, and read events
with :class:`AgentProcess`. Separate processes are what real daemons are, so
this checks that mDNS works across processes and not only inside one.

The agent exits on SIGTERM/SIGINT (sending goodbye packets), when its stdin
closes (so it never outlives a crashed test), or after ``--max-seconds``.

Events: {"event": "started", "instance", "device_id"}, {"event": "found",
"peer": {...}}, {"event": "lost", "device_id"}, {"event": "stopped"}.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()


def agent_command(
    *,
    device_id: str,
    name: str,
    port: int,
    interfaces: list[str],
    security_level: int = 1,
    protocol_version: int = 1,
    max_seconds: float = 60.0,
    record_ttl: int | None = None,
    liveness_interval: float | None = None,
    resolve_timeout: float | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The argv that runs one agent (for Popen or a testbed host)."""
    argv = [
        python,
        str(SCRIPT),
        "--id", device_id,
        "--name", name,
        "--port", str(port),
        "--sl", str(security_level),
        "--pv", str(protocol_version),
        "--max-seconds", str(max_seconds),
    ]
    for address in interfaces:
        argv += ["--interface", address]
    if record_ttl is not None:
        argv += ["--ttl", str(record_ttl)]
    if liveness_interval is not None:
        argv += ["--liveness", str(liveness_interval)]
    if resolve_timeout is not None:
        argv += ["--resolve-timeout", str(resolve_timeout)]
    return argv


class AgentProcess:
    """Reads an agent's JSON lines on a thread so tests can wait with a timeout."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def spawn(cls, **kwargs: Any) -> AgentProcess:
        """Start an agent on this host (see :func:`agent_command` for kwargs)."""
        popen = subprocess.Popen(
            agent_command(**kwargs),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        return cls(popen)

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self._queue.put(event)
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first event (seen before or arriving within ``timeout`` s) matching ``predicate``."""
        for event in self.events:
            if predicate(event):
                return event
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if event is None:
                raise AssertionError(f"agent exited ({self.popen.poll()}) before the event; saw {self.events}")
            self.events.append(event)
            if predicate(event):
                return event
        raise AssertionError(f"no matching event within {timeout} s; saw {self.events}")

    def found_ids(self) -> set[str]:
        """Device IDs currently reported present (found and not lost since)."""
        present: set[str] = set()
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            if event is not None:
                self.events.append(event)
        for event in self.events:
            if event["event"] == "found":
                present.add(event["peer"]["device_id"])
            elif event["event"] == "lost":
                present.discard(event["device_id"])
        return present

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM (graceful: goodbye packets), then SIGKILL if it hangs."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        if self.popen.stdin is not None:
            self.popen.stdin.close()
        self._reader.join(timeout)
        return self.popen.returncode

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _run(args: argparse.Namespace) -> None:
    from p2pstore.net.discovery import Discovery

    extra: dict[str, Any] = {"record_ttl": args.ttl} if args.ttl else {}
    if args.liveness:
        extra["liveness_interval"] = args.liveness
    if args.resolve_timeout:
        extra["resolve_timeout"] = args.resolve_timeout
    discovery = Discovery(
        device_id=args.id,
        name=args.name,
        port=args.port,
        security_level=args.sl,
        protocol_version=args.pv,
        interfaces=args.interface or None,
        on_found=lambda peer: _emit({"event": "found", "peer": dataclasses.asdict(peer)}),
        on_lost=lambda device_id: _emit({"event": "lost", "device_id": device_id}),
        **extra,
    )
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    # stdin EOF means the test that started us is gone.
    loop.add_reader(sys.stdin.fileno(), lambda: sys.stdin.readline() or done.set())
    await discovery.start()
    _emit({"event": "started", "instance": discovery.instance_name, "device_id": args.id})
    try:
        await asyncio.wait_for(done.wait(), args.max_seconds)
    except TimeoutError:
        pass
    await discovery.stop()
    _emit({"event": "stopped"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--id", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sl", type=int, default=1)
    parser.add_argument("--pv", type=int, default=1)
    parser.add_argument("--interface", action="append", default=[])
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--ttl", type=int, default=0, help="record TTL in seconds (0: the default)")
    parser.add_argument("--liveness", type=float, default=0.0, help="liveness sweep interval (0: the default)")
    parser.add_argument("--resolve-timeout", type=float, default=0.0, help="seconds (0: the default)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr)
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
