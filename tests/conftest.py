"""Shared fixtures: real daemons as subprocesses in short temp dirs.

Unix socket paths are limited to 107 bytes, so daemons live under
``/tmp/p2ps-XXXX`` rather than pytest's long tmp_path.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pstore.client import BlockingClient

REPO = Path(__file__).resolve().parent.parent

#: Tests that run mDNS on 127.0.0.1 would see each other's daemons if two ran
#: at once (one loopback, one multicast group); under pytest-xdist they all
#: go to one worker (``--dist loadgroup``), one after the other.
MDNS_ON_LOOPBACK = "loopback_multicast"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: pytest-xdist reads the groups in its own hook of this name,
    # which pluggy would otherwise call before this one (it registers later).
    for item in items:
        if MDNS_ON_LOOPBACK in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("mdns-on-loopback"))


class DaemonProcess:
    """One ``p2pstore daemon`` subprocess and the paths it uses."""

    def __init__(self, root: Path, name: str, extra: list[str]) -> None:
        self.root = root
        self.name = name
        self.data_dir = root / name
        self.socket = root / f"{name}.sock"
        self.log_path = root / f"{name}.log"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "p2pstore", "daemon",
            "--data-dir", str(self.data_dir), "--socket", str(self.socket),
            "--port", "0", "--name", self.name, "--log-level", "debug", *self.extra,
        ]

    def start(self, timeout: float = 15.0) -> DaemonProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon {self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(str(self.socket))
                        return self
                    except OSError:
                        pass
            time.sleep(0.02)
        raise RuntimeError(f"daemon {self.name} did not start in {timeout}s:\n{self.log()}")

    def client(self) -> BlockingClient:
        return BlockingClient(self.socket)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="p2ps-", dir="/tmp"))
    os.chmod(root, 0o700)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Keep each phase's report on the item, so a fixture can tell its test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


#: Of a failed test's daemon logs, the discovery lines and the last lines are printed.
LOG_TAIL_LINES = 40
LOG_DISCOVERY_LINES = 120


def print_daemon_logs(daemons: list[DaemonProcess]) -> None:
    """A failed test's daemons' logs (shown under "Captured stdout teardown"):
    the temp dir goes with the test, and a flaky failure needs them to be read."""
    for d in daemons:
        lines = d.log().splitlines()
        discovery = [line for line in lines if "discovery" in line or "zeroconf" in line]
        print(f"----- daemon {d.name}: {len(lines)} log lines; discovery lines (last {LOG_DISCOVERY_LINES}):")
        print("\n".join(discovery[-LOG_DISCOVERY_LINES:]))
        print(f"----- daemon {d.name}: last {LOG_TAIL_LINES} lines:")
        print("\n".join(lines[-LOG_TAIL_LINES:]))


@pytest.fixture
def daemon_factory(short_tmp: Path, request: pytest.FixtureRequest) -> Iterator[callable]:
    """``start(name="a", *extra_flags)`` -> a running DaemonProcess (stopped at
    teardown; its log printed if the test failed). mDNS is off unless the
    flags say ``--discovery``, and then on 127.0.0.1 unless they name an interface."""
    started: list[DaemonProcess] = []

    def start(name: str = "a", *extra: str) -> DaemonProcess:
        if "--discovery" not in extra:
            flags = ["--no-discovery", *extra]
        else:  # mDNS in a test: on loopback only, never on the host's real interfaces
            flags = [e for e in extra if e != "--discovery"]
            if "--interface" not in flags:
                flags = ["--interface", "127.0.0.1", *flags]
        d = DaemonProcess(short_tmp, name, flags)
        started.append(d.start())
        return d

    yield start
    for d in started:
        d.stop()
    call = getattr(request.node, "report_call", None)
    if call is not None and call.failed:
        print_daemon_logs(started)


@pytest.fixture
def daemon(daemon_factory) -> DaemonProcess:
    return daemon_factory("a")


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[BlockingClient]:
    c = daemon.client()
    yield c
    c.close()


# ------------------------------------------------------------------- multicast on loopback (mDNS)

def _multicast_loopback_works() -> bool:
    """Send one multicast datagram on lo with TTL 0 (never leaves the host) and see it return."""
    group = "239.255.77.77"
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        receiver.bind(("", 0))
        port = receiver.getsockname()[1]
        receiver.setsockopt(
            socket.IPPROTO_IP,
            socket.IP_ADD_MEMBERSHIP,
            socket.inet_aton(group) + socket.inet_aton("127.0.0.1"),
        )
        receiver.settimeout(1.0)
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, struct.pack("b", 0))
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sender.sendto(b"p2pstore-probe", (group, port))
        data, _ = receiver.recvfrom(64)
        return data == b"p2pstore-probe"
    except OSError:
        return False
    finally:
        receiver.close()
        sender.close()


@pytest.fixture(scope="session")
def loopback_multicast() -> None:
    """Make sure mDNS can run on 127.0.0.1, or skip saying why not."""
    if _multicast_loopback_works():
        return
    if os.geteuid() == 0 and shutil.which("ip"):
        subprocess.run(["ip", "link", "set", "lo", "multicast", "on"], check=False)
        if _multicast_loopback_works():
            return
    pytest.skip("multicast on loopback does not work here (needs root for `ip link set lo multicast on`)")
