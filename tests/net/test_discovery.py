"""Discovery over real mDNS on 127.0.0.1 (and avahi in a private namespace).

Every name and device ID carries a per-test random tag, because other tests
(daemons of the integration suite) may advertise on loopback at the same
time; assertions only look at this test's devices.

Loopback multicast: on this kernel it works without any setup once the
sending socket picks 127.0.0.1 with IP_MULTICAST_IF (zeroconf does when
bound to that address). The ``loopback_multicast`` fixture checks that with a
TTL-0 probe and, as root, turns on ``ip link set lo multicast`` if needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import DNSIncoming, DNSOutgoing, DNSPointer, DNSQuestion, IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from discovery_agent import AgentProcess, agent_command
from p2pstore.errors import ConfigError, ProtocolError
from p2pstore.net.discovery import (
    MAX_INSTANCE_BYTES,
    SERVICE_TYPE,
    DiscoveredPeer,
    Discovery,
    build_txt,
    instance_name_for,
    parse_service,
)

LOOPBACK = "127.0.0.1"
FIND_TIMEOUT = 5.0
LOST_TIMEOUT = 3.0


# ---------------------------------------------------------------- helpers


def _tag() -> str:
    return uuid.uuid4().hex[:10]


class Recorder:
    """Collects discovery callbacks; waits are bounded polls."""

    def __init__(self, *, raise_in_callbacks: bool = False) -> None:
        self.found: list[DiscoveredPeer] = []
        self.lost: list[str] = []
        self.raise_in_callbacks = raise_in_callbacks

    def on_found(self, peer: DiscoveredPeer) -> None:
        self.found.append(peer)
        if self.raise_in_callbacks:
            raise RuntimeError("callback bug: must be logged, not kill discovery")

    def on_lost(self, device_id: str) -> None:
        self.lost.append(device_id)
        if self.raise_in_callbacks:
            raise RuntimeError("callback bug: must be logged, not kill discovery")

    async def async_on_found(self, peer: DiscoveredPeer) -> None:
        await asyncio.sleep(0)
        self.found.append(peer)

    async def async_on_lost(self, device_id: str) -> None:
        await asyncio.sleep(0)
        self.lost.append(device_id)

    def last(self, device_id: str) -> DiscoveredPeer | None:
        for peer in reversed(self.found):
            if peer.device_id == device_id:
                return peer
        return None

    async def wait_until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; found={self.found} lost={self.lost}")
            await asyncio.sleep(0.02)


def _discovery(
    device_id: str, name: str, recorder: Recorder, *, port: int = 7400, level: int = 2, use_async: bool = False, **extra
) -> Discovery:
    return Discovery(
        device_id=device_id,
        name=name,
        port=port,
        security_level=level,
        protocol_version=1,
        interfaces=[LOOPBACK],
        on_found=recorder.async_on_found if use_async else recorder.on_found,
        on_lost=recorder.async_on_lost if use_async else recorder.on_lost,
        **extra,
    )


@contextlib.asynccontextmanager
async def _raw_zeroconf():
    """A plain zeroconf instance on loopback, for services Discovery would never publish."""
    zc = AsyncZeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    try:
        yield zc
    finally:
        await zc.async_close()


async def _register_raw(zc: AsyncZeroconf, instance: str, properties: dict, tag: str, port: int = 7999) -> None:
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"{instance}.{SERVICE_TYPE}",
        port=port,
        properties=properties,
        server=f"raw-{tag}-{abs(hash(instance)) % 10**6}.local.",
        addresses=[socket.inet_aton(LOOPBACK)],
    )
    # No probing: these are deliberate impostors and must appear at once.
    await zc.async_register_service(info, cooperating_responders=True)


# ---------------------------------------------------------------- pure parts


def _props(**kw: str) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in kw.items()}


def test_parse_valid_service() -> None:
    peer = parse_service("laptop", _props(id="abc123", pv="1", sl="3", name="Laptop Ü"), 7400, ["fe80::1", LOOPBACK])
    assert peer == DiscoveredPeer("abc123", "Laptop Ü", (LOOPBACK, "fe80::1"), 7400, 1, 3)


def test_parse_falls_back_to_instance_name() -> None:
    assert parse_service("kitchen", _props(id="x1", pv="2", sl="1"), 1, [LOOPBACK]).name == "kitchen"


@pytest.mark.parametrize(
    "properties, port, addresses, reason",
    [
        ({}, 7400, [LOOPBACK], "no TXT"),
        (_props(pv="1", sl="1"), 7400, [LOOPBACK], "no id"),
        (_props(id="a b", pv="1", sl="1"), 7400, [LOOPBACK], "characters outside"),
        (_props(id="x" * 129, pv="1", sl="1"), 7400, [LOOPBACK], "longer than"),
        (_props(id="a", sl="1"), 7400, [LOOPBACK], "no pv"),
        (_props(id="a", pv="one", sl="1"), 7400, [LOOPBACK], "decimal"),
        (_props(id="a", pv="1", sl="0"), 7400, [LOOPBACK], "outside 1..4"),
        (_props(id="a", pv="1", sl="5"), 7400, [LOOPBACK], "outside 1..4"),
        (_props(id="a", pv="1", sl="٣"), 7400, [LOOPBACK], "decimal"),
        ({b"id": b"\xff\xfe", b"pv": b"1", b"sl": b"1"}, 7400, [LOOPBACK], "UTF-8"),
        ({b"id": None, b"pv": b"1", b"sl": b"1"}, 7400, [LOOPBACK], "no id"),
        (_props(id="a", pv="1", sl="1"), 0, [LOOPBACK], "port"),
        (_props(id="a", pv="1", sl="1"), None, [LOOPBACK], "port"),
        (_props(id="a", pv="1", sl="1"), 7400, [], "no usable address"),
        (_props(id="a", pv="1", sl="1"), 7400, ["0.0.0.0"], "no usable address"),
        (_props(id="a", pv="1", sl="1"), 7400, ["not-an-ip"], "not an IP"),
    ],
)
def test_parse_rejects_malformed(properties, port, addresses, reason) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse_service("x", properties, port, addresses)


@settings(max_examples=300, deadline=None)
@given(
    properties=st.dictionaries(
        st.sampled_from([b"id", b"pv", b"sl", b"name", b"x"]) | st.binary(max_size=6),
        st.none() | st.binary(max_size=20) | st.sampled_from([b"1", b"4", b"abc", b"007"]),
        max_size=6,
    ),
    port=st.none() | st.integers(-5, 70000),
    addresses=st.lists(st.sampled_from([LOOPBACK, "::1", "0.0.0.0", "junk", "224.0.0.251"]), max_size=3),
)
def test_parse_has_one_failure_mode(properties, port, addresses) -> None:
    """Whatever a peer sends, parsing returns a peer or raises ProtocolError, nothing else."""
    try:
        peer = parse_service("fuzz", properties, port, addresses)
    except ProtocolError:
        return
    assert 1 <= peer.security_level <= 4 and 0 < peer.port < 65536 and peer.addresses


def test_instance_names_fit_a_dns_label() -> None:
    assert instance_name_for("kitchen") == "kitchen"
    assert instance_name_for("kit\x00chen\n") == "kitchen"
    assert instance_name_for("kitchen", "0123456789abcdef") == "kitchen (01234567)"
    long = instance_name_for("ü" * 100, "0123456789abcdef")
    assert len(long.encode()) <= MAX_INSTANCE_BYTES and long.endswith("(01234567)")
    assert len(instance_name_for("ü" * 100).encode()) <= MAX_INSTANCE_BYTES


def test_txt_round_trips_through_the_parser() -> None:
    txt = build_txt(device_id="dev1", name="n" * 500, protocol_version=7, security_level=4)
    peer = parse_service("i", _props(**txt), 1234, [LOOPBACK])
    assert (peer.device_id, peer.protocol_version, peer.security_level, len(peer.name)) == ("dev1", 7, 4, 200)


@pytest.mark.parametrize(
    "override",
    [
        {"security_level": 5},
        {"port": 0},
        {"device_id": "has space"},
        {"name": "\x00"},
        {"interfaces": ["::1"]},
        {"interfaces": ["0.0.0.0"]},
        {"interfaces": []},
        {"record_ttl": 1},
        {"liveness_interval": 0},
    ],
)
def test_constructor_rejects_bad_config(override) -> None:
    kwargs = dict(
        device_id="dev1", name="n", port=7400, security_level=1, protocol_version=1,
        interfaces=[LOOPBACK], on_found=print, on_lost=print,
    )
    kwargs.update(override)
    with pytest.raises(ConfigError):
        Discovery(**kwargs)


def test_advertised_addresses() -> None:
    """Configured interfaces are advertised as given; "all" means this host's
    non-loopback IPv4 addresses (computed only: starting on all interfaces
    would multicast beyond loopback, which tests never do)."""
    common = dict(device_id="deva", name="a", port=7400, security_level=1, protocol_version=1, on_found=print, on_lost=print)
    assert Discovery(interfaces=["127.0.0.1", "127.0.0.1"], **common).advertised_addresses == ("127.0.0.1",)
    everywhere = Discovery(interfaces=None, **common).advertised_addresses
    assert everywhere and (everywhere == ("127.0.0.1",) or "127.0.0.1" not in everywhere)


async def test_zeroconf_thread_callbacks_hop_to_the_event_loop() -> None:
    """Handlers called on zeroconf's own thread must only ever touch state on our loop."""
    seen: list[int] = []

    class Probe(Discovery):
        def _handle_change(self, name, state_change) -> None:
            seen.append(threading.get_ident())

    d = Probe(
        device_id="devt", name="t", port=7400, security_level=1, protocol_version=1,
        interfaces=[LOOPBACK], on_found=print, on_lost=print,
    )
    d._loop = asyncio.get_running_loop()
    worker = threading.Thread(
        target=d._on_state_change,
        kwargs=dict(zeroconf=None, service_type=SERVICE_TYPE, name=f"x.{SERVICE_TYPE}", state_change=ServiceStateChange.Added),
    )
    worker.start()
    worker.join(5)
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.01)
    assert seen == [threading.get_ident()]


async def test_start_on_an_address_this_host_lacks_is_a_config_error(loopback_multicast) -> None:
    # 203.0.113.77 (TEST-NET-3, documentation only) is on no interface here:
    # joining the group on it fails before any packet is sent.
    recorder = Recorder()
    d = Discovery(
        device_id="devx", name="x", port=7400, security_level=1, protocol_version=1,
        interfaces=["203.0.113.77"], on_found=recorder.on_found, on_lost=recorder.on_lost,
    )
    with pytest.raises(ConfigError, match="cannot open mDNS sockets"):
        await d.start()
    await d.stop()


# ---------------------------------------------------------------- real mDNS on loopback


async def test_two_instances_find_each_other_update_and_goodbye(loopback_multicast) -> None:
    tag = _tag()
    a_id, b_id = f"a{tag}", f"b{tag}"
    ra, rb = Recorder(), Recorder(raise_in_callbacks=True)
    a = _discovery(a_id, f"alpha-{tag}", ra, port=7401, use_async=True)
    b = _discovery(b_id, f"beta-{tag}", rb, port=7402)
    try:
        started = time.monotonic()
        await asyncio.gather(a.start(), b.start())
        await ra.wait_until(lambda: b_id in a.peers(), FIND_TIMEOUT, "a to find b")
        await rb.wait_until(lambda: a_id in b.peers(), FIND_TIMEOUT, "b to find a")
        assert time.monotonic() - started < FIND_TIMEOUT
        assert a.peers()[b_id] == DiscoveredPeer(b_id, f"beta-{tag}", (LOOPBACK,), 7402, 1, 2)
        assert a_id not in a.peers() and b_id not in b.peers(), "own device must be ignored"
        assert all(p.device_id != a_id for p in ra.found)

        # A changed security level reaches the other side as a new on_found.
        await b.update(security_level=4)
        await ra.wait_until(lambda: (p := ra.last(b_id)) is not None and p.security_level == 4, FIND_TIMEOUT, "updated level")

        # Goodbye: stopping b makes a report it lost, promptly.
        await b.stop()
        await ra.wait_until(lambda: b_id in ra.lost, LOST_TIMEOUT, "a to see b's goodbye")
        assert b_id not in a.peers()
        assert ra.lost.count(b_id) == 1
    finally:
        await a.stop()
        await b.stop()
        await b.stop()  # idempotent


def test_three_processes_find_each_other_goodbye_and_kill(loopback_multicast) -> None:
    """Real daemons are processes: three agents find each other; SIGTERM sends
    a goodbye (lost at once); kill -9 sends nothing, and the liveness sweep
    reports the device lost once its short-TTL records expire unanswered."""
    tag = _tag()
    ids = [f"p{i}{tag}" for i in range(3)]
    agents = [
        AgentProcess.spawn(
            device_id=ids[i], name=f"proc{i}-{tag}", port=7410 + i, interfaces=[LOOPBACK], max_seconds=30,
            record_ttl=2, liveness_interval=0.5, resolve_timeout=1.0,
        )
        for i in range(3)
    ]
    try:
        for i, agent in enumerate(agents):
            for other in ids:
                if other != ids[i]:
                    agent.wait_for(lambda e, o=other: e["event"] == "found" and e["peer"]["device_id"] == o, FIND_TIMEOUT)
        all_found = time.monotonic()
        for i, agent in enumerate(agents):
            assert agent.found_ids() & set(ids) == set(ids) - {ids[i]}, "each sees the others and never itself"

        assert agents[2].stop() == 0
        for agent in agents[:2]:
            agent.wait_for(lambda e: e["event"] == "lost" and e["device_id"] == ids[2], LOST_TIMEOUT)

        # Live devices survive their records expiring (TTL 2 s): they are re-resolved, not lost.
        time.sleep(max(0.0, all_found + 2.5 - time.monotonic()))
        assert agents[0].found_ids() & set(ids) == {ids[1]}

        agents[1].popen.kill()
        agents[1].popen.wait(5)
        # TTL 2 s + sweep 0.5 s + resolve 1 s, plus slack.
        agents[0].wait_for(lambda e: e["event"] == "lost" and e["device_id"] == ids[1], 2 + 0.5 + 1 + LOST_TIMEOUT)
    finally:
        for agent in agents:
            agent.stop()


def test_a_device_killed_and_restarted_is_found_again(loopback_multicast) -> None:
    """kill -9 leaves its PTR record in every cache (zeroconf keeps it 1125 s), so
    when the device comes back its announcement is no news to the browser. The
    observer must still report it found again — it may be an untrusted device a
    user is about to accept, which nothing else would ever dial."""
    tag = _tag()
    watcher_id, comer_id = f"w{tag}", f"k{tag}"
    timing = {"record_ttl": 2, "liveness_interval": 0.5, "resolve_timeout": 1.0}
    watcher = AgentProcess.spawn(device_id=watcher_id, name=f"watch-{tag}", port=7420, interfaces=[LOOPBACK],
                                 max_seconds=40, **timing)
    comer = AgentProcess.spawn(device_id=comer_id, name=f"comer-{tag}", port=7421, interfaces=[LOOPBACK],
                               max_seconds=40, **timing)
    try:
        watcher.wait_for(lambda e: e["event"] == "found" and e["peer"]["device_id"] == comer_id, FIND_TIMEOUT)
        comer.popen.kill()
        comer.popen.wait(5)
        watcher.wait_for(lambda e: e["event"] == "lost" and e["device_id"] == comer_id, 2 + 0.5 + 1 + LOST_TIMEOUT)
        before = {id(e) for e in watcher.events}
        comer = AgentProcess.spawn(device_id=comer_id, name=f"comer-{tag}", port=7421, interfaces=[LOOPBACK],
                                   max_seconds=40, **timing)
        # Sweep 0.5 s + resolve, plus slack.
        watcher.wait_for(lambda e: e["event"] == "found" and e["peer"]["device_id"] == comer_id and id(e) not in before,
                         FIND_TIMEOUT + 2)
    finally:
        watcher.stop()
        comer.stop()


async def test_malformed_services_are_ignored(loopback_multicast, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="p2pstore.net.discovery")
    tag = _tag()
    recorder = Recorder()
    observer = _discovery(f"o{tag}", f"observer-{tag}", recorder)
    bad = {
        f"bad-noid-{tag}": {"pv": "1", "sl": "2", "name": f"noid-{tag}"},
        f"bad-sl-{tag}": {"id": f"badsl{tag}", "pv": "1", "sl": "9"},
        f"bad-pv-{tag}": {"id": f"badpv{tag}", "pv": "one", "sl": "1"},
        f"bad-id-{tag}": {"id": "has space", "pv": "1", "sl": "1", "name": f"badid-{tag}"},
        f"bad-utf8-{tag}": {b"id": b"\xff\xfe", b"pv": b"1", b"sl": b"1", b"name": f"utf8-{tag}".encode()},
        f"bad-empty-{tag}": {},
    }
    try:
        await observer.start()
        async with _raw_zeroconf() as zc:
            for instance, props in bad.items():
                await _register_raw(zc, instance, props, tag)
            # A valid service registered last: once it is found, the bad ones
            # have been seen too.
            await _register_raw(zc, f"good-{tag}", {"id": f"good{tag}", "pv": "1", "sl": "1"}, tag)
            await recorder.wait_until(lambda: f"good{tag}" in observer.peers(), FIND_TIMEOUT, "the valid service")

            def all_ignored() -> bool:
                text = caplog.text
                return all(f"ignoring service '{instance}" in text for instance in bad)

            await recorder.wait_until(all_ignored, FIND_TIMEOUT, "every malformed service to be logged and dropped")
            found_ids = {p.device_id for p in recorder.found}
            found_names = {p.name for p in recorder.found}
            assert not found_ids & {f"badsl{tag}", f"badpv{tag}", "has space"}
            assert not found_names & {f"noid-{tag}", f"badid-{tag}", f"utf8-{tag}"}
        # The raw services said goodbye; only the valid one was ever a peer.
        await recorder.wait_until(lambda: f"good{tag}" in recorder.lost, LOST_TIMEOUT, "the valid service's goodbye")
    finally:
        await observer.stop()


async def test_instance_name_collisions_get_an_id_suffix(loopback_multicast) -> None:
    tag = _tag()
    # The impostor's ID sorts before c's, so c is the one that must move.
    a_id, b_id, c_id, x_id = (f"{c}{tag}" for c in "abc0")
    ra, rb, rc = Recorder(), Recorder(), Recorder()
    a = _discovery(a_id, f"dup-{tag}", ra, port=7421)
    b = _discovery(b_id, f"dup-{tag}", rb, port=7422)
    c = _discovery(c_id, f"solo-{tag}", rc, port=7423)
    try:
        await asyncio.gather(a.start(), c.start())
        assert a.instance_name == f"dup-{tag}"
        assert c.instance_name == f"solo-{tag}"
        async with _raw_zeroconf() as zc:
            # b finds "dup-…" taken while probing; an impostor that skips
            # probing claims c's name after c registered (a conflict found
            # later), so c moves to its suffixed name.
            await asyncio.gather(
                b.start(),
                _register_raw(zc, f"solo-{tag}", {"id": x_id, "pv": "1", "sl": "1"}, tag),
            )
            await rb.wait_until(lambda: b.instance_name == f"dup-{tag} ({b_id[:8]})", FIND_TIMEOUT, "b to take the suffix")
            await rc.wait_until(lambda: c.instance_name == f"solo-{tag} ({c_id[:8]})", FIND_TIMEOUT, "c to rename")
            await ra.wait_until(
                lambda: {b_id, c_id} <= a.peers().keys(), FIND_TIMEOUT, "a to see b and c under their new names"
            )
        assert a.instance_name == f"dup-{tag}", "the first owner keeps the plain name"
        assert a.peers()[b_id].name == f"dup-{tag}", "TXT carries the real device name"
    finally:
        for d in (a, b, c):
            await d.stop()


# ---------------------------------------------------------------- avahi interoperability

AVAHI_NS_ADDRESS = "10.77.99.1"

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
host-name=p2pstore-avahi-test
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


def _wait_for_text(path: Path, text: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path} within {timeout} s: {path.read_text(errors='replace') if path.exists() else ''}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def avahi(tmp_path: Path) -> Iterator[dict[str, str]]:
    """avahi-daemon in a private network namespace, with a private D-Bus.

    avahi needs a multicast interface (it ignores lo), D-Bus for
    avahi-browse, and its pid file in /run/avahi-daemon. So: a namespace
    with a veth pair (av0 = 10.77.99.1/24), a dbus-daemon of our own on a
    socket in tmp_path (DBUS_SYSTEM_BUS_ADDRESS points both avahi-daemon and
    avahi-browse at it), and a tmpfs over /run inside the namespace's mount
    namespace so nothing touches the host's /run or network.
    """
    missing = [p for p in ("ip", "avahi-daemon", "avahi-browse", "dbus-daemon") if not _which(p)]
    if missing:
        pytest.skip(f"avahi test needs {', '.join(missing)} (Debian: apt-get install avahi-daemon avahi-utils dbus iproute2)")
    if os.geteuid() != 0:
        pytest.skip("avahi test needs root (network namespace, avahi-daemon --no-drop-root)")
    ns = f"p2pav{os.getpid()}x{_tag()[:4]}"
    bus_socket = tmp_path / "bus"
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={bus_socket}"}
    dbus = avahi_proc = None
    ip = _which("ip")
    try:
        add = subprocess.run([ip, "netns", "add", ns], capture_output=True, text=True)
        if add.returncode != 0:
            pytest.skip(f"cannot create a network namespace: {add.stderr.strip()}")
        for cmd in (
            ["link", "set", "lo", "up"],
            ["link", "add", "av0", "type", "veth", "peer", "name", "av1"],
            ["link", "set", "av0", "up"],
            ["link", "set", "av1", "up"],
            ["addr", "add", f"{AVAHI_NS_ADDRESS}/24", "dev", "av0"],
        ):
            subprocess.run([ip, "-n", ns, *cmd], check=True)
        (tmp_path / "bus.conf").write_text(BUS_CONF.format(socket=bus_socket))
        (tmp_path / "avahi.conf").write_text(AVAHI_CONF)
        dbus_log = tmp_path / "dbus.log"
        with dbus_log.open("w") as log_file:
            dbus = subprocess.Popen(
                [_which("dbus-daemon"), f"--config-file={tmp_path / 'bus.conf'}", "--nofork", "--nopidfile"],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 5
        while not bus_socket.exists():
            if time.monotonic() > deadline or dbus.poll() is not None:
                pytest.fail(f"dbus-daemon did not start: {dbus_log.read_text()}")
            time.sleep(0.05)
        avahi_log = tmp_path / "avahi.log"
        script = (
            "mount -t tmpfs p2pstore-test /run && mkdir /run/avahi-daemon && exec "
            f"{_which('avahi-daemon')} --no-drop-root --no-chroot --no-rlimits --no-proc-title -f {tmp_path / 'avahi.conf'}"
        )
        with avahi_log.open("w") as log_file:
            avahi_proc = subprocess.Popen(
                [ip, "netns", "exec", ns, "sh", "-c", script],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
        _wait_for_text(avahi_log, "Server startup complete", 10, avahi_proc)
        yield {"ns": ns, "env_bus": env["DBUS_SYSTEM_BUS_ADDRESS"], "address": AVAHI_NS_ADDRESS}
    finally:
        _stop(avahi_proc)
        _stop(dbus)
        subprocess.run([ip or "ip", "netns", "del", ns], capture_output=True)


def test_avahi_browse_sees_our_service(avahi: dict[str, str]) -> None:
    tag = _tag()
    device_id = f"av{tag}"
    argv = ["ip", "netns", "exec", avahi["ns"], *agent_command(
        device_id=device_id, name=f"avahi-peer {tag}", port=7431, interfaces=[avahi["address"]],
        security_level=3, max_seconds=30,
    )]
    agent = AgentProcess(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": avahi["env_bus"]}
    try:
        agent.wait_for(lambda e: e["event"] == "started", FIND_TIMEOUT)
        resolved: list[str] = []
        deadline = time.monotonic() + FIND_TIMEOUT
        while not resolved and time.monotonic() < deadline:
            out = subprocess.run(
                [_which("avahi-browse"), "-rtp", "_p2pstore._tcp"],
                capture_output=True, text=True, env=env, timeout=10,
            )
            resolved = [line for line in out.stdout.splitlines() if line.startswith("=;") and f'"id={device_id}"' in line]
        assert resolved, f"avahi-browse did not list {device_id}: {out.stdout!r} {out.stderr!r}"
        fields = resolved[0].split(";")
        # =;iface;proto;name;type;domain;host;address;port;txt
        assert fields[3] == f"avahi-peer\\032{tag}"
        assert fields[7] == avahi["address"] and fields[8] == "7431"
        for item in (f'"id={device_id}"', '"pv=1"', '"sl=3"', f'"name=avahi-peer {tag}"'):
            assert item in fields[9]
    finally:
        agent.stop()


@pytest.mark.parametrize("unanswered, liveness", [(1, 60.0), (2, 0.5)])
async def test_a_new_service_whose_first_resolve_got_no_reply_is_found_again(loopback_multicast, monkeypatch,
                                                                             unanswered: int, liveness: float) -> None:
    """The browser raises one Added event per instance; if resolving it then
    times out (an answer lost on a loaded host), it is resolved once more
    ``NEW_RETRY_S`` later (found within the 5 s of discovery although the
    sweep is a minute away), and then by the sweep every ``liveness_interval``
    until it answers — before, the device stayed unknown for as long as its
    PTR record was cached, and later for a whole ``liveness_interval``."""
    tag = _tag()
    b_id = f"b{tag}"
    refused: list[str] = []

    class FirstTimesUnanswered(AsyncServiceInfo):
        async def async_request(self, zc, timeout, *args, **kwargs):  # type: ignore[override]
            if f"beta-{tag}" in self.name and len(refused) < unanswered:
                refused.append(self.name)
                return False  # as if no reply came within the timeout
            return await super().async_request(zc, timeout, *args, **kwargs)

    monkeypatch.setattr("p2pstore.net.discovery.AsyncServiceInfo", FirstTimesUnanswered)
    ra, rb = Recorder(), Recorder()
    a = _discovery(f"a{tag}", f"alpha-{tag}", ra, port=7401, liveness_interval=liveness)
    b = _discovery(b_id, f"beta-{tag}", rb, port=7402)
    try:
        await asyncio.gather(a.start(), b.start())
        await ra.wait_until(lambda: b_id in a.peers(), FIND_TIMEOUT, "a to find b after a resolve without reply")
        assert len(refused) == unanswered, "the first resolves of b were not the refused ones"
    finally:
        await a.stop()
        await b.stop()


def _mdns_listener() -> socket.socket:
    """A socket that hears every mDNS packet multicast on 127.0.0.1 (shares port 5353)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", 5353))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton("224.0.0.251") + socket.inet_aton(LOOPBACK))
    sock.setblocking(False)
    return sock


async def test_resolves_ask_for_multicast_answers(loopback_multicast) -> None:
    """Several daemons on one host share UDP port 5353, so a unicast (QU) answer
    reaches only one of them, maybe not the one that asked: the questions that
    resolve a newly seen instance must all ask for multicast answers (QM).
    The instance here is a bare PTR with no SRV/TXT behind it, so every
    question of the resolve goes to the network and is heard."""
    tag = _tag()
    ghost = f"ghost-{tag}.{SERVICE_TYPE}"
    observer = _discovery(f"o{tag}", f"observer-{tag}", Recorder(), resolve_timeout=1.5)
    listener = _mdns_listener()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LOOPBACK))
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
    try:
        await observer.start()
        announce = DNSOutgoing(0x8400)
        announce.add_answer_at_time(DNSPointer(SERVICE_TYPE, 12, 1, 120, ghost), 0)
        for packet in announce.packets():
            sender.sendto(packet, ("224.0.0.251", 5353))
        questions: list[DNSQuestion] = []
        queries = 0
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and queries < 2:  # the first query and a repeat
            try:
                data = await asyncio.wait_for(loop.sock_recv(listener, 9000), 0.2)
            except TimeoutError:
                continue
            about = [q for q in DNSIncoming(data).questions if q.name.lower() == ghost.lower()]
            queries += bool(about)
            questions += about
        assert queries >= 2, f"the observer did not try (twice) to resolve {ghost}: {questions}"
        assert not [q for q in questions if q.unicast], f"a resolve asked for a unicast answer: {questions}"
    finally:
        await observer.stop()
        listener.close()
        sender.close()
