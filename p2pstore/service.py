"""Running under a service manager: sd_notify, the watchdog, journal log lines.

systemd's notification protocol (sd_notify(3)) is one datagram of
``KEY=value`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path,
or ``@name`` for the abstract namespace). It is written here rather than
taken from libsystemd's bindings: thirty lines against a C dependency.

Invariants:
- Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
- Nothing here raises into the daemon: a service manager that went away, or
  a full socket buffer, costs a notification, never the service. Sends never
  block (the socket is non-blocking).
- ``WATCHDOG=1`` is sent by a task on the daemon's event loop, at half of
  ``$WATCHDOG_USEC``: if the loop hangs, the pings stop and systemd restarts
  the service (``WatchdogSec=`` in the unit).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger("p2pstore.service")

#: How often STATUS= is refreshed when no watchdog asks for more often.
STATUS_EVERY_S = 5.0


def notify_address(env: Mapping[str, str] | None = None) -> str | None:
    """The socket address from ``$NOTIFY_SOCKET``: a path, or '\\0name' for '@name'."""
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET")
    if not address:
        return None
    return "\0" + address[1:] if address.startswith("@") else address


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one notification (e.g. ``"READY=1\\nSTATUS=..."``); False if not sent."""
    address = notify_address(env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode("utf-8", errors="replace"), address)
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", address.replace("\0", "@"), exc)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between the pings systemd expects, or None if no watchdog is set
    for this process (``$WATCHDOG_PID``, when given, must be ours)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        owner = int(env["WATCHDOG_PID"]) if env.get("WATCHDOG_PID") else None
    except ValueError:
        return None
    if usec <= 0 or (owner is not None and owner != (os.getpid() if pid is None else pid)):
        return None
    return usec / 1_000_000


class ServiceNotifier:
    """READY=1 / STATUS= / WATCHDOG=1 / STOPPING=1 for one daemon.

    ``status()`` returns the one-line state shown by ``systemctl status``; it
    is sent with READY=1 and again whenever it changes.
    """

    def __init__(self, status: Callable[[], str], env: Mapping[str, str] | None = None) -> None:
        self._status = status
        self._env = dict(os.environ if env is None else env)
        self._last_status: str | None = None
        self.watchdog_s = watchdog_interval(self._env)

    @property
    def active(self) -> bool:
        return notify_address(self._env) is not None

    def _send(self, *lines: str) -> bool:
        return notify("\n".join(lines), self._env)

    def ready(self) -> None:
        self._last_status = self._status()
        self._send("READY=1", f"STATUS={self._last_status}")

    def stopping(self) -> None:
        self._send("STOPPING=1", "STATUS=stopping")

    async def run(self) -> None:
        """Ping the watchdog and refresh STATUS= until cancelled."""
        if not self.active:
            return
        tick = min(STATUS_EVERY_S, self.watchdog_s / 2) if self.watchdog_s else STATUS_EVERY_S
        while True:
            await asyncio.sleep(tick)
            lines = ["WATCHDOG=1"] if self.watchdog_s else []
            try:
                status = self._status()
            except Exception:  # a status line is not worth a dead watchdog
                log.exception("building the service status failed")
                status = self._last_status
            if status != self._last_status and status is not None:
                lines.append(f"STATUS={status}")
                self._last_status = status
            if lines:
                self._send(*lines)


# -- logging ------------------------------------------------------------------

#: syslog priorities for the ``<N>`` prefix journald reads from a stream.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def stderr_is_journal(env: Mapping[str, str] | None = None) -> bool:
    """True when stderr is systemd's journal stream (``$JOURNAL_STREAM`` names its device:inode)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(2)
        return bool(value) and (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    """One journal entry per event: ``<prio>LEVEL name: message``, no timestamp
    (the journal has its own), and a traceback folded onto the same line
    (journald starts a new entry at every newline)."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return prefix + " | ".join(line.strip() for line in text.splitlines() if line.strip())


def log_handler(env: Mapping[str, str] | None = None) -> logging.Handler:
    """A stderr handler: journal format under systemd, timestamped otherwise."""
    handler = logging.StreamHandler()
    if stderr_is_journal(env):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    return handler
