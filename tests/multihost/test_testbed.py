"""The network-namespace testbed itself, and mDNS discovery across its hosts.

Traffic stays inside the namespaces these tests create (10.77.0.0/24 on a
private bridge); nothing is routed anywhere else.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time

import pytest

from testbed import REPO, SCRIPT, Testbed, namespaces_with_prefix, unavailable_reason, unique_prefix

pytestmark = [
    pytest.mark.slow,
    pytest.mark.multihost,
    pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or ""),
]

FIND_TIMEOUT = 5.0


def _load_agent_module():
    """tests/net/discovery_agent.py, loaded by path (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("p2pstore_test_discovery_agent", REPO / "tests" / "net" / "discovery_agent.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


agent_module = _load_agent_module()


def _reachable(bed: Testbed, src: int, dst: int) -> None:
    """ICMP ping when ping is installed, else a TCP connect to a listener in dst."""
    target = bed.host(dst).address
    if shutil.which("ping"):
        result = bed.host(src).run(["ping", "-c", "1", "-W", "2", target], capture_output=True, text=True)
        assert result.returncode == 0, f"{bed.host(src)} cannot ping {target}: {result.stdout}{result.stderr}"
        return
    listener = bed.host(dst).popen(
        [sys.executable, "-c",
         "import socket,sys; s=socket.create_server((sys.argv[1], 7499)); s.settimeout(10); "
         "print('ready', flush=True); s.accept()", target],
        stdout=subprocess.PIPE, text=True,
    )
    assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
    result = bed.host(src).run(
        [sys.executable, "-c", "import socket,sys; socket.create_connection((sys.argv[1], 7499), timeout=2)", target],
        capture_output=True, text=True,
    )
    listener.wait(5)
    assert result.returncode == 0, f"{bed.host(src)} cannot reach {target}: {result.stderr}"


def test_hosts_reach_each_other_and_nothing_is_left_behind() -> None:
    prefix = unique_prefix("tp")
    with Testbed(3, prefix) as bed:
        assert sorted(namespaces_with_prefix(prefix)) == sorted([f"{prefix}1", f"{prefix}2", f"{prefix}3", f"{prefix}sw"])
        assert [h.address for h in bed.hosts] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
        for src, dst in ((1, 2), (2, 3), (3, 1)):
            _reachable(bed, src, dst)
        # No route out: a host can't even try to reach an address beyond its /24.
        no_route = bed.host(1).run(
            [sys.executable, "-c", "import socket; socket.create_connection(('203.0.113.1', 9), timeout=1)"],
            capture_output=True, text=True,
        )
        assert "unreachable" in no_route.stderr.lower()
        # A process left running in a host does not survive the testbed.
        sleeper = bed.host(2).popen(["sleep", "60"])
    assert sleeper.poll() is not None
    assert namespaces_with_prefix(prefix) == []


def test_up_is_idempotent_and_down_cleans_a_half_made_testbed() -> None:
    prefix = unique_prefix("ti")
    try:
        # Half-made: a host namespace without its link, and a stray host above N.
        for ns in (f"{prefix}1", f"{prefix}5"):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        with Testbed(2, prefix) as bed:
            assert sorted(namespaces_with_prefix(prefix)) == sorted([f"{prefix}1", f"{prefix}2", f"{prefix}sw"])
            bed.up()  # again: harmless
            _reachable(bed, 1, 2)
            status = subprocess.run([str(SCRIPT), "status", "--prefix", prefix], capture_output=True, text=True, check=True)
            assert f"{prefix}2: 10.77.0.2/24" in status.stdout
        assert namespaces_with_prefix(prefix) == []
        # down on a partial state (switch only) also works.
        subprocess.run(["ip", "netns", "add", f"{prefix}sw"], check=True)
        subprocess.run([str(SCRIPT), "down", "--prefix", prefix], check=True, capture_output=True)
        assert namespaces_with_prefix(prefix) == []
    finally:
        subprocess.run([str(SCRIPT), "down", "--prefix", prefix], capture_output=True)


def test_discovery_across_namespaces() -> None:
    prefix = unique_prefix("td")
    ids = {1: f"ns1{prefix}", 2: f"ns2{prefix}"}
    with Testbed(2, prefix) as bed:
        agents = {}
        for i in (1, 2):
            argv = agent_module.agent_command(
                device_id=ids[i], name=f"host{i}", port=7400, interfaces=[bed.host(i).address],
                security_level=i, max_seconds=30,
            )
            agents[i] = agent_module.AgentProcess(
                bed.host(i).popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        try:
            started = time.monotonic()
            for i, other in ((1, 2), (2, 1)):
                event = agents[i].wait_for(
                    lambda e, o=other: e["event"] == "found" and e["peer"]["device_id"] == ids[o], FIND_TIMEOUT
                )
                peer = event["peer"]
                assert peer["addresses"] == [bed.host(other).address]
                assert (peer["port"], peer["security_level"], peer["name"]) == (7400, other, f"host{other}")
            assert time.monotonic() - started < FIND_TIMEOUT + 1
            # Same name on two hosts would be a collision; different names here, so none is renamed.
            assert {agents[i].wait_for(lambda e: e["event"] == "started", 1)["instance"] for i in (1, 2)} == {"host1", "host2"}
            agents[2].stop()
            agents[1].wait_for(lambda e: e["event"] == "lost" and e["device_id"] == ids[2], 3)
        finally:
            for agent in agents.values():
                agent.stop()
    assert namespaces_with_prefix(prefix) == []


def test_loopback_is_separate_per_host() -> None:
    """Each host has its own lo: a server on 127.0.0.1 in host 1 is not visible in host 2."""
    prefix = unique_prefix("tl")
    with Testbed(2, prefix) as bed:
        server = bed.host(1).popen(
            [sys.executable, "-c",
             "import socket; s=socket.create_server(('127.0.0.1', 7498)); s.settimeout(5); "
             "print('ready', flush=True); s.accept()"],
            stdout=subprocess.PIPE, text=True,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        other = bed.host(2).run(
            [sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 7498), timeout=1)"],
            capture_output=True, text=True,
        )
        assert other.returncode != 0 and "refused" in other.stderr.lower()
        same = bed.host(1).run(
            [sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 7498), timeout=1)"],
            capture_output=True, text=True,
        )
        assert same.returncode == 0, same.stderr
        server.wait(5)


#: A fleet past the kernel's default neighbour-table room (1,024 entries for
#: all namespaces together): 40 hosts that each know the other 39 hold 1,560.
BIG_FLEET = 40
#: One host of the mesh: listen, connect to every other host and hold the
#: connections (a connection pins its neighbour entry, as a daemon's channels
#: do), say how many connected, and close when told to (stdin).
_MESH_HOST = """
import asyncio, sys
me, n = sys.argv[1], int(sys.argv[2])
async def main():
    server = await asyncio.start_server(lambda r, w: None, me, 7497)
    print("listening", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # all are listening
    async def dial(addr):
        try:
            return await asyncio.wait_for(asyncio.open_connection(addr, 7497), 5)
        except (OSError, TimeoutError):
            return None
    others = [f"10.77.0.{i}" for i in range(1, n + 1) if f"10.77.0.{i}" != me]
    held = await asyncio.gather(*(dial(a) for a in others))
    print(sum(c is not None for c in held), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # all have dialled
    server.close()
asyncio.run(main())
"""


def test_every_host_of_a_big_fleet_reaches_every_other() -> None:
    """``up`` makes room in the kernel's neighbour tables for N x N entries:
    with the default room the hosts past the first 30 or so could not
    connect to most others ("No buffer space available" for new neighbours:
    their SYNs never left), and 64 daemons never came online."""
    prefix = unique_prefix("tn")
    with Testbed(BIG_FLEET, prefix) as bed:
        for family in ("ipv4", "ipv6"):
            room = int(subprocess.run(["sysctl", "-n", f"net.{family}.neigh.default.gc_thresh3"],
                                      capture_output=True, text=True, check=True).stdout)
            assert room >= BIG_FLEET * BIG_FLEET, f"{family} neighbour table: room for {room} entries"
        procs = [host.popen([sys.executable, "-c", _MESH_HOST, host.address, str(BIG_FLEET)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for host in bed.hosts]
        try:
            for proc in procs:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            connected = [int(proc.stdout.readline() or -1) for proc in procs if proc.stdout is not None]
            assert connected == [BIG_FLEET - 1] * BIG_FLEET
        finally:
            for proc in procs:
                if proc.stdin is not None:
                    proc.stdin.close()
            for proc in procs:
                proc.wait(10)
    assert namespaces_with_prefix(prefix) == []
