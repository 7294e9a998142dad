"""Real daemons on separate network-namespace hosts (scripts/testbed), and a
daemon seen by avahi-browse.

Each daemon runs inside its host (``ip netns exec``) with ``--interface
<host address>``, so mDNS and peer channels use only the testbed's private
bridge (10.77.0.0/24, nothing routed out). Data directories and API sockets
live under a short /tmp directory (Unix socket paths must stay under 108
bytes); the API is reached from the test process directly, since a Unix
socket is a file and not part of any network namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import REPO, Host, Testbed, namespaces_with_prefix, unavailable_reason, unique_prefix

sys.path.insert(0, str(REPO))
from tests.conftest import DaemonProcess  # noqa: E402

from p2pstore import PROTOCOL_VERSION  # noqa: E402
from p2pstore.client import BlockingClient  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.multihost,
    pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or ""),
]

FIND_TIMEOUT = 5.0
ONLINE_TIMEOUT = 5.0


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> float:
    start = time.monotonic()
    for _ in range(int(timeout / interval) + 2):
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            break
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


class HostDaemon(DaemonProcess):
    """A daemon subprocess started inside a testbed host (or another netns)."""

    def __init__(self, root: Path, name: str, netns: str, address: str, extra: list[str]) -> None:
        super().__init__(root, name, ["--interface", address, *extra])
        self.netns = netns
        self.address = address

    @property
    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().argv]


@pytest.fixture
def short_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="p2pm-", dir="/tmp"))
    os.chmod(root, 0o700)
    yield root
    shutil.rmtree(root, ignore_errors=True)


class Peer:
    def __init__(self, proc: HostDaemon) -> None:
        self.proc = proc
        self.api = BlockingClient(proc.socket)
        info = self.api.call("device.info")
        self.id: str = info["device_id"]
        self.port: int = info["port"]

    def view(self, device_id: str) -> dict[str, Any] | None:
        return next((d for d in self.api.call("devices.list") if d["device_id"] == device_id), None)

    def online(self, other: Peer) -> bool:
        v = self.view(other.id)
        return bool(v and v["online"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.api.close()


def start_peers(bed: Testbed, root: Path, n: int, *extra: str) -> list[Peer]:
    peers = []
    for i in range(1, n + 1):
        host: Host = bed.host(i)
        proc = HostDaemon(root, f"h{i}", host.netns, host.address, list(extra))
        proc.start()
        peers.append(Peer(proc))
    return peers


def stop_peers(peers: list[Peer]) -> None:
    for p in peers:
        p.close()
        p.proc.stop()


def test_daemons_on_three_hosts_discover_trust_and_connect(short_root: Path) -> None:
    prefix = unique_prefix("dm")
    peers: list[Peer] = []
    try:
        with Testbed(3, prefix) as bed:
            try:
                peers = start_peers(bed, short_root, 3)
                t0 = time.monotonic()
                found = wait_until(lambda: all(p.view(q.id) for p in peers for q in peers if q is not p),
                                   FIND_TIMEOUT, "daemons on three hosts find each other")
                for i, p in enumerate(peers, 1):
                    for j, q in enumerate(peers, 1):
                        if p is q:
                            continue
                        v = p.view(q.id)
                        assert (v["trusted"], v["online"], v["pending"], v["discovered"]) == (False, False, True, True), v
                        assert v["addresses"] == [f"{bed.host(j).address}:{q.port}"], v
                        assert v["name"] == f"h{j}"
                t1 = time.monotonic()
                for p in peers:
                    for q in peers:
                        if q is not p:
                            p.api.call("devices.trust", device_id=q.id)
                online = wait_until(lambda: all(p.online(q) for p in peers for q in peers if q is not p),
                                    ONLINE_TIMEOUT, "full mesh online across hosts")
                print(f"3 hosts: found each other {found:.2f} s after start, online {online:.2f} s after trusting "
                      f"({time.monotonic() - t0:.2f} s in all)")
                assert found < FIND_TIMEOUT and time.monotonic() - t1 < ONLINE_TIMEOUT
                # channels really cross hosts: the peer address is the other host's
                log = peers[0].proc.log()
                assert f"via {bed.host(2).address}:" in log or f"via {bed.host(3).address}:" in log
            finally:
                stop_peers(peers)
    finally:
        assert namespaces_with_prefix(prefix) == []


def test_partitioned_host_goes_offline_and_comes_back(short_root: Path) -> None:
    """A host whose cable is pulled (no FIN, no goodbye) is reported offline
    by the keepalive within 15 s (defaults), and online again once the cable
    is back."""
    prefix = unique_prefix("dp")
    peers: list[Peer] = []
    try:
        with Testbed(2, prefix) as bed:
            try:
                a, b = peers = start_peers(bed, short_root, 2)
                wait_until(lambda: a.view(b.id) and b.view(a.id), FIND_TIMEOUT, "discovered")
                a.api.call("devices.trust", device_id=b.id)
                b.api.call("devices.trust", device_id=a.id)
                wait_until(lambda: a.online(b) and b.online(a), ONLINE_TIMEOUT, "online")
                switch = f"{prefix}sw"
                subprocess.run(["ip", "-n", switch, "link", "set", "h2", "down"], check=True)
                cut = time.monotonic()
                offline = wait_until(lambda: not a.online(b) and not b.online(a), 17.0, "offline after the cut")
                subprocess.run(["ip", "-n", switch, "link", "set", "h2", "up"], check=True)
                healed = time.monotonic()
                back = wait_until(lambda: a.online(b) and b.online(a), 30.0, "online after the cable is back")
                print(f"partition: offline {offline:.1f} s after the cut; online {back:.1f} s after it healed")
                assert time.monotonic() - cut < 60 and healed - cut < 17.5
                assert offline < 16.0, f"offline only after {offline:.1f} s (keepalive default: 15 s)"
            finally:
                stop_peers(peers)
    finally:
        assert namespaces_with_prefix(prefix) == []


@pytest.mark.timeout(420)
def test_trusted_hosts_reconnect_after_an_outage_longer_than_the_mdns_ttl(short_root: Path) -> None:
    """An outage long enough (> record TTL + a liveness sweep) that mDNS
    forgets the other device on both sides. zeroconf then never asks for it
    again, and neither daemon re-announces; the two trusted devices must
    still reconnect once the network is back (by dialing the last address).
    The TTL is 8 s here (120 s by default: the same code path, three minutes
    of waiting)."""
    prefix = unique_prefix("dl")
    peers: list[Peer] = []
    config = short_root / "short-ttl.toml"
    config.write_text("mdns_record_ttl_s = 8\nmdns_liveness_interval_s = 2.0\n")
    try:
        with Testbed(2, prefix) as bed:
            try:
                a, b = peers = start_peers(bed, short_root, 2, "--config", str(config))
                wait_until(lambda: a.view(b.id) and b.view(a.id), FIND_TIMEOUT, "discovered")
                a.api.call("devices.trust", device_id=b.id)
                b.api.call("devices.trust", device_id=a.id)
                wait_until(lambda: a.online(b) and b.online(a), ONLINE_TIMEOUT, "online")
                switch = f"{prefix}sw"
                subprocess.run(["ip", "-n", switch, "link", "set", "h2", "down"], check=True)
                try:
                    lost = wait_until(lambda: not a.view(b.id)["discovered"] and not b.view(a.id)["discovered"],
                                      60.0, "mDNS forgets the other side", interval=0.5)
                finally:
                    subprocess.run(["ip", "-n", switch, "link", "set", "h2", "up"], check=True)
                back = wait_until(lambda: a.online(b) and b.online(a), 20.0, "online again after the outage")
                print(f"long outage: mDNS lost the peer after {lost:.0f} s; online {back:.1f} s after the network came back")
                assert a.view(b.id)["trusted"] and b.view(a.id)["trusted"]
            finally:
                stop_peers(peers)
    finally:
        assert namespaces_with_prefix(prefix) == []


# ---------------------------------------------------------------------------- avahi-browse sees a daemon

AVAHI_NS_ADDRESS = "10.77.98.1"

BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

AVAHI_CONF = """[server]
host-name=p2pstore-avahi-daemon-test
use-ipv4=yes
use-ipv6=no
allow-interfaces=av0
enable-dbus=yes
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
"""


def _which(program: str) -> str | None:
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin:/usr/bin")


def _stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _wait_for_text(path: Path, text: str, timeout: float, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path} within {timeout} s: {path.read_text(errors='replace') if path.exists() else ''}")


@pytest.fixture
def avahi(short_root: Path) -> Iterator[dict[str, str]]:
    """avahi-daemon in a private network namespace with a private D-Bus
    (the approach of tests/net/test_discovery.py): nothing touches the host's
    network, /run or system bus."""
    missing = [p for p in ("ip", "avahi-daemon", "avahi-browse", "dbus-daemon") if not _which(p)]
    if missing:
        pytest.skip(f"avahi test needs {', '.join(missing)} (Debian: apt-get install avahi-daemon avahi-utils dbus iproute2)")
    ns = f"p2pad{os.getpid() % 100000}x{uuid.uuid4().hex[:4]}"
    bus_socket = short_root / "bus"
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={bus_socket}"}
    dbus = avahi_proc = None
    ip = _which("ip") or "ip"
    try:
        add = subprocess.run([ip, "netns", "add", ns], capture_output=True, text=True)
        if add.returncode != 0:
            pytest.skip(f"cannot create a network namespace: {add.stderr.strip()}")
        for cmd in (
            ["link", "set", "lo", "up"],
            ["link", "add", "av0", "type", "veth", "peer", "name", "av1"],
            ["link", "set", "av0", "up"],
            ["link", "set", "av1", "up"],
            ["link", "set", "av0", "multicast", "on"],
            ["addr", "add", f"{AVAHI_NS_ADDRESS}/24", "dev", "av0"],
            ["route", "add", "224.0.0.0/4", "dev", "av0"],
        ):
            subprocess.run([ip, "-n", ns, *cmd], check=True)
        (short_root / "bus.conf").write_text(BUS_CONF.format(socket=bus_socket))
        (short_root / "avahi.conf").write_text(AVAHI_CONF)
        dbus_log = short_root / "dbus.log"
        with dbus_log.open("w") as log_file:
            dbus = subprocess.Popen(
                [_which("dbus-daemon"), f"--config-file={short_root / 'bus.conf'}", "--nofork", "--nopidfile"],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        for _ in range(100):
            if bus_socket.exists() or dbus.poll() is not None:
                break
            time.sleep(0.05)
        if not bus_socket.exists():
            pytest.fail(f"dbus-daemon did not start: {dbus_log.read_text()}")
        avahi_log = short_root / "avahi.log"
        script = (
            "mount -t tmpfs p2pstore-test /run && mkdir /run/avahi-daemon && exec "
            f"{_which('avahi-daemon')} --no-drop-root --no-chroot --no-rlimits --no-proc-title -f {short_root / 'avahi.conf'}"
        )
        with avahi_log.open("w") as log_file:
            avahi_proc = subprocess.Popen(
                [ip, "netns", "exec", ns, "sh", "-c", script],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
        _wait_for_text(avahi_log, "Server startup complete", 10, avahi_proc)
        yield {"ns": ns, "bus": env["DBUS_SYSTEM_BUS_ADDRESS"], "address": AVAHI_NS_ADDRESS}
    finally:
        _stop(avahi_proc)
        _stop(dbus)
        subprocess.run([ip, "netns", "del", ns], capture_output=True)


def test_avahi_browse_lists_a_running_daemon(avahi: dict[str, str], short_root: Path) -> None:
    name = f"avd {uuid.uuid4().hex[:6]}"
    proc = HostDaemon(short_root, "d", avahi["ns"], avahi["address"], ["--name", name, "--security-level", "S2"])
    proc.start()
    api = None
    try:
        api = BlockingClient(proc.socket)
        info = api.call("device.info")
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": avahi["bus"]}
        resolved: list[str] = []
        out = None
        deadline = time.monotonic() + 10
        for _ in range(20):
            if resolved or time.monotonic() > deadline:
                break
            out = subprocess.run([_which("avahi-browse") or "avahi-browse", "-rtp", "_p2pstore._tcp"],
                                 capture_output=True, text=True, env=env, timeout=10)
            resolved = [ln for ln in out.stdout.splitlines()
                        if ln.startswith("=;") and f'"id={info["device_id"]}"' in ln]
        assert resolved, f"avahi-browse did not list the daemon: {out and out.stdout!r} {out and out.stderr!r}"
        fields = resolved[0].split(";")
        # =;iface;proto;name;type;domain;host;address;port;txt
        assert fields[3] == name.replace(" ", "\\032")
        assert fields[7] == avahi["address"] and fields[8] == str(info["port"])
        for item in (f'"id={info["device_id"]}"', '"sl=2"', f'"pv={PROTOCOL_VERSION}"', f'"name={name}"'):
            assert item in fields[9], fields[9]
    finally:
        if api is not None:
            api.close()
        assert proc.stop(signal.SIGTERM) == 0
