"""Python side of scripts/testbed: N network-namespace hosts for one test.

    with Testbed(3, prefix="t1234") as bed:
        proc = bed.host(1).popen([sys.executable, "-m", "p2pstore", "daemon", ...])
        bed.host(2).run(["ping", "-c1", bed.host(1).address], check=True)

``Testbed`` always runs ``scripts/testbed down`` on exit, also when ``up``
failed half way, and first stops the processes it started (by PID), so a
failing test leaves no namespace and no process behind. Use a prefix unique
to the test run (``unique_prefix()``): several test runs may share a machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "testbed"
SUBNET_PREFIX = "10.77.0"
DEFAULT_TIMEOUT = 30.0


def unavailable_reason() -> str | None:
    """Why a testbed can't be made here (for pytest.skip), or None if it can."""
    if os.geteuid() != 0:
        return "multi-host tests need root (they create network namespaces)"
    if shutil.which("ip") is None:
        return "iproute2 'ip' is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"'ip netns' is unavailable: {probe.stderr.strip()}"
    if not SCRIPT.exists():
        return f"{SCRIPT} is missing"
    return None


def unique_prefix(tag: str = "t") -> str:
    """A namespace prefix no concurrent test run uses (PID-based, <= 12 chars)."""
    return f"{tag}{os.getpid() % 100000}x"[:12]


def namespaces_with_prefix(prefix: str) -> list[str]:
    """Namespaces that belong to a testbed with this prefix (NAME<digits> or NAMEsw)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix) and (n[len(prefix):].isdigit() or n[len(prefix):] == "sw")]


class Host:
    """One namespace host: run commands in it and know its address."""

    def __init__(self, testbed: Testbed, index: int) -> None:
        self.testbed = testbed
        self.index = index
        self.netns = f"{testbed.prefix}{index}"
        self.address = f"{SUBNET_PREFIX}.{index}"

    def argv(self, args: list[str]) -> list[str]:
        """``args`` wrapped to run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *map(str, args)]

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``args`` in this host; the testbed stops it on exit if still running."""
        proc = subprocess.Popen(self.argv(args), **kwargs)
        self.testbed._processes.append(proc)
        return proc

    def run(self, args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run in this host, with a default timeout so no test hangs."""
        kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
        return subprocess.run(self.argv(args), **kwargs)

    def __repr__(self) -> str:
        return f"Host({self.netns}, {self.address})"


class Testbed:
    """Context manager around ``scripts/testbed up N`` / ``down``."""

    __test__ = False  # a helper, not a test class, whatever pytest thinks of its name

    def __init__(self, n: int, prefix: str = "p2ps") -> None:
        if not 1 <= n <= 250:
            raise ValueError("a testbed has 1..250 hosts")
        self.n = n
        self.prefix = prefix
        self.hosts = [Host(self, i) for i in range(1, n + 1)]
        self._processes: list[subprocess.Popen[Any]] = []

    def host(self, i: int) -> Host:
        """Host ``i`` (1-based, like the namespace names and addresses)."""
        if not 1 <= i <= self.n:
            raise IndexError(f"host {i} not in 1..{self.n}")
        return self.hosts[i - 1]

    def _script(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), *args, "--prefix", self.prefix],
            capture_output=True, text=True, timeout=DEFAULT_TIMEOUT,
        )

    def up(self) -> None:
        """Create the hosts; on failure tear down what was made and raise."""
        result = self._script("up", str(self.n))
        if result.returncode != 0:
            try:
                self.down()
            except RuntimeError as exc:
                raise RuntimeError(f"testbed up failed ({result.returncode}): {result.stderr.strip()}; {exc}") from exc
            raise RuntimeError(f"testbed up failed ({result.returncode}): {result.stderr.strip()}")

    def down(self) -> None:
        """Stop our processes, then remove every namespace with our prefix."""
        for proc in self._processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._processes:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._processes.clear()
        result = self._script("down")
        if result.returncode != 0:
            raise RuntimeError(f"testbed down failed ({result.returncode}): {result.stderr.strip()}")

    @property
    def switch(self) -> str:
        """The switch namespace (bridge br0, one port ``h<i>`` per host)."""
        return f"{self.prefix}sw"

    def _switch(self, *args: str) -> None:
        result = subprocess.run(["ip", "-n", self.switch, *args], capture_output=True, text=True, timeout=DEFAULT_TIMEOUT)
        if result.returncode != 0:
            raise RuntimeError(f"ip -n {self.switch} {' '.join(args)} failed: {result.stderr.strip()}")

    def partition(self, *hosts: int) -> None:
        """Cut ``hosts`` off from the others: their switch ports move to a second bridge ``br1``.

        Both groups keep their links up (no carrier loss, no FIN): to the
        daemons it looks like a network split, noticed only by the keepalive.
        """
        if not hosts or any(not 1 <= i <= self.n for i in hosts):
            raise ValueError(f"partition needs hosts in 1..{self.n}, got {hosts}")
        self._switch("link", "add", "br1", "type", "bridge")
        self._switch("link", "set", "br1", "type", "bridge", "mcast_snooping", "0")
        self._switch("link", "set", "br1", "up")
        for i in hosts:
            self._switch("link", "set", f"h{i}", "master", "br1")

    def heal(self) -> None:
        """Undo ``partition``: every port back on br0, br1 removed."""
        for i in range(1, self.n + 1):
            self._switch("link", "set", f"h{i}", "master", "br0")
        self._switch("link", "del", "br1")

    def __enter__(self) -> Testbed:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
