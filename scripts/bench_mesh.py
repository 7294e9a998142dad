"""``scripts/bench mesh``: what one write costs in a fleet (issue 15).

N network-namespace hosts (scripts/testbed, tests/multihost/testbed.py), one
daemon each with real mDNS, all mutually trusted (one bulk ``devices.trust``
each), the seed's single_version EMPLOYEE table with auto-sync on every
host. For each N it prints one JSON object:

- ``mesh_online_s``: from the trust calls until every daemon sees every
  other online;
- ``single_row``: ``INSERTS`` single-row inserts, one at a time on rotating
  hosts; ``reach_all_ms`` p50 / max: from the insert's answer until every
  other host's ``remote`` subscriber had its dataChange; ``sessions`` and
  ``batches`` per insert: sync sessions opened and batches sent, summed over
  all hosts (``status`` ``traffic``, sync/traffic.py), once the fleet is
  quiet again; ``duplicates`` per insert: rows received that changed
  nothing;
- ``burst``: ``BURST_ROWS`` single-row inserts on every host at once;
  ``writes_s`` (the slowest host's writes) against ``lone_writes_s`` (the
  same burst on every host at once before any host had a peer, into a
  store that never syncs: the cost of N daemons sharing this machine's
  cores, without sync), and ``converged_after_s``:
  from the end of the writes until every host's table is identical (count
  and a digest of the synced columns);
- ``log_problems``: ERROR / Traceback lines in all daemons' logs.

``P2PSTORE_BENCH_ACTIVE_SET=K`` runs every daemon with that ``active_set``
(docs/config.md; 0: a full mesh at every size).

Every wait is bounded; the testbed and the daemons are removed at the end,
also when a step fails (``P2PSTORE_BENCH_KEEP=1`` keeps the daemons' data
directories and logs, and says where). Only the testbed's private bridge
carries traffic.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "multihost"))
from testbed import Testbed, unavailable_reason  # noqa: E402

from p2pstore.client import Client  # noqa: E402
from p2pstore.net.overlay import DEFAULT_ACTIVE_SET, DEFAULT_FULL_MESH_PEERS, sparse  # noqa: E402

SV = {"store": "RdbTest", "bundle": "com.example.rdbDataSync"}
LONE = {"store": "lone"}
CREATE = ("CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, "
          "NAME TEXT NOT NULL UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB)")
INSERTS = 12
BURST_ROWS = 200
START_TIMEOUT = 30.0
#: Seconds a fleet of N has to come online, at the least and per host: 64
#: daemons on 2 cores start 4,032 TLS handshakes and catch-up pulls at once
#: (184 s to come online there).
ONLINE_TIMEOUT = 180.0
ONLINE_TIMEOUT_PER_HOST = 10.0
REACH_TIMEOUT = 30.0
QUIET_S = 1.0  # no row moved for this long: the fleet is done with a write
ACTIVE_SET = os.environ.get("P2PSTORE_BENCH_ACTIVE_SET")  # e.g. 0: a full mesh at every size (default: the config's)
QUIET_TIMEOUT = 60.0  # at the least; ``QUIET_TIMEOUT_PER_HOST`` × N with more hosts
#: 64 hosts right after coming online: their 4,032 catch-up sessions were not
#: over 60 s later on 2 cores.
QUIET_TIMEOUT_PER_HOST = 5.0
CONVERGE_TIMEOUT = 900.0


class _HostDaemon:
    def __init__(self, bed: Testbed, root: Path, i: int) -> None:
        host = bed.host(i)
        self.name = f"h{i}"
        self.data_dir = root / self.name
        self.data_dir.mkdir(mode=0o700)
        shutil.copy(REPO / "sync_schema.json", self.data_dir / "sync_schema.json")
        self.socket = root / f"{self.name}.sock"
        self.log_path = root / f"{self.name}.log"
        self._log = open(self.log_path, "ab")
        argv = [sys.executable, "-m", "p2pstore", "daemon", "--data-dir", str(self.data_dir), "--socket", str(self.socket),
                "--interface", host.address, "--name", self.name, "--log-level", "info"]
        if ACTIVE_SET:
            config = self.data_dir / "bench.toml"
            config.write_text(f"active_set = {int(ACTIVE_SET)}\n", encoding="utf-8")
            argv += ["--config", str(config)]
        self.proc = host.popen(argv, cwd=REPO, stdout=self._log, stderr=self._log)
        self.client: Client | None = None
        self.id = ""

    async def connect(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} did not start: {self.log_path.read_text(errors='replace')[-2000:]}")
            await asyncio.sleep(0.05)
        self.client = await Client(self.socket).connect()
        self.id = (await self.client.call("device.info"))["device_id"]

    async def call(self, method: str, **params: Any) -> Any:
        assert self.client is not None
        return await self.client.call(method, **params)

    async def close(self) -> None:
        if self.client is not None:
            try:
                await self.client.close()
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


async def _until(condition, timeout: float, what: str, interval: float = 0.1) -> float:
    start = time.monotonic()
    for _ in range(int(timeout / interval) + 2):
        if await condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            break
        await asyncio.sleep(interval)
    raise RuntimeError(f"{what}: not within {timeout} s")


async def _all_online(hosts: list[_HostDaemon]) -> bool:
    for h in hosts:
        online = {d["device_id"] for d in await h.call("devices.list") if d["online"]}
        if len(online & {o.id for o in hosts if o is not h}) < len(hosts) - 1:
            return False
    return True


async def _traffic(hosts: list[_HostDaemon]) -> dict[str, int]:
    """The fleet's traffic totals, asked of every host at once: one host after
    the other took over a second at 64 hosts, and a round that long nearly
    always saw an anti-entropy pull start (2 a second fleet-wide there), so
    ``_quiet`` never found the fleet quiet."""
    total: dict[str, int] = {}
    for status in await asyncio.gather(*(h.call("status") for h in hosts)):
        for key, value in status["traffic"].items():
            total[key] = total.get(key, 0) + value
    return total


#: What moves while a write still travels. Sessions and batches don't tell:
#: anti-entropy pulls of nothing start all the time in a big fleet (N every
#: 30 s on average: 2 a second at 64 hosts), and 1 s without any was rare.
#: Nor do rows sent in a fleet with an active set, where a pull resends a row
#: the puller got along the writer's tree until a grant covers it (64 hosts:
#: rows kept moving for minutes after each insert; docs/performance.md,
#: "Fleet, round 7"): there, quiet is no row *applied* for QUIET_S.
MOVING = ("rows_sent", "rows_received")
MOVING_SPARSE = ("rows_applied",)


def _sparse(n: int) -> bool:
    """Whether ``n`` daemons keep an active set rather than a full mesh (net/overlay.py)."""
    k = int(ACTIVE_SET) if ACTIVE_SET else DEFAULT_ACTIVE_SET
    return sparse(n, k, DEFAULT_FULL_MESH_PEERS)


async def _quiet(hosts: list[_HostDaemon]) -> dict[str, int]:
    """Traffic totals once no row moved between any hosts for QUIET_S."""
    last = await _traffic(hosts)
    since = time.monotonic()
    timeout = max(QUIET_TIMEOUT, QUIET_TIMEOUT_PER_HOST * len(hosts))
    deadline = since + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        now = await _traffic(hosts)
        if any(now[key] != last[key] for key in (MOVING_SPARSE if _sparse(len(hosts)) else MOVING)):
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= QUIET_S:
            return now
    raise RuntimeError(f"the fleet did not go quiet within {timeout} s")


async def _anti_entropy_since(hosts: list[_HostDaemon], since_ms: float) -> int:
    """Anti-entropy pulls the hosts started at or after ``since_ms`` (unix ms;
    their sync logs, which record every session with its kind)."""
    logs = await asyncio.gather(*(h.call("store.sync_log", **SV, limit=500) for h in hosts))
    return sum(1 for log in logs for e in log if e["kind"] == "anti-entropy" and e["at"] >= since_ms)


async def _digest(h: _HostDaemon) -> tuple[int, str]:
    rows = (await h.call("store.query", **SV, sql="SELECT NAME, AGE, SALARY, hex(CODES) FROM EMPLOYEE ORDER BY NAME"))["rows"]
    return len(rows), hashlib.sha256(repr(rows).encode()).hexdigest()


async def _insert(h: _HostDaemon, name: str, age: int, ref: dict[str, str] = SV) -> None:
    await h.call("store.insert", **ref, table="EMPLOYEE", values={"NAME": name, "AGE": age, "SALARY": age * 1.5})


async def _write_burst(h: _HostDaemon, prefix: str, ref: dict[str, str] = SV) -> float:
    t0 = time.perf_counter()
    for k in range(BURST_ROWS):
        await _insert(h, f"{prefix}-{k:04d}", k % 90, ref)
    return time.perf_counter() - t0


def _log_problems(hosts: list[_HostDaemon]) -> list[str]:
    found = []
    for h in hosts:
        for line in h.log_path.read_text(errors="replace").splitlines():
            if " ERROR " in line or "Traceback" in line or "CRITICAL" in line:
                found.append(f"{h.name}: {line[:300]}")
    return found


async def _mesh(bed: Testbed, root: Path, n: int) -> dict[str, Any]:
    hosts = [_HostDaemon(bed, root, i) for i in range(1, n + 1)]
    try:
        for h in hosts:
            await h.connect()
        for h in hosts:
            await h.call("store.open", **SV)
            await h.call("store.execute", **SV, sql=CREATE)
            await h.call("store.set_distributed_tables", **SV, tables=["EMPLOYEE"],
                         config={"table_type": "single_version", "auto_sync": True})
        # The same burst with no peer yet, into a store that never syncs (a
        # collaborative copy of the table, auto-sync off): what the writes
        # cost with N daemons sharing this machine's cores, capture included.
        for h in hosts:
            await h.call("store.open", **LONE)
            await h.call("store.execute", **LONE, sql=CREATE)
            await h.call("store.set_distributed_tables", **LONE, tables=["EMPLOYEE"], config={"auto_sync": False})
        lone = await asyncio.gather(*(_write_burst(h, f"lone-{h.name}", LONE) for h in hosts))
        lone_s = max(lone)

        t0 = time.monotonic()
        for h in hosts:
            await h.call("devices.trust", devices=[{"device_id": o.id, "name": o.name} for o in hosts if o is not h])
        await _until(lambda: _all_online(hosts), max(ONLINE_TIMEOUT, ONLINE_TIMEOUT_PER_HOST * n), f"all {n} daemons online to each other", 0.2)
        online_s = time.monotonic() - t0

        subs = {}
        for h in hosts:
            subs[h.name] = await h.call("store.subscribe", **SV, type="remote")
        await _quiet(hosts)
        before = await _quiet(hosts)
        reach, per_insert, spans = [], [], []
        for k in range(INSERTS):
            writer = hosts[k % n]
            others = [h for h in hosts if h is not writer]
            for h in others:
                assert h.client is not None
                while not h.client.notifications.empty():
                    h.client.notifications.get_nowait()
            started_ms = time.time() * 1000
            await _insert(writer, f"one-{k:03d}", k)
            t_written = time.perf_counter()
            arrived = await asyncio.gather(*(_data_change(h) for h in others))
            reach.append((max(arrived) - t_written) * 1000)
            after = await _quiet(hosts)
            spans.append(time.perf_counter() - t_written)
            per_insert.append({key: after[key] - before[key] for key in after})
            per_insert[-1]["anti_entropy"] = await _anti_entropy_since(hosts, started_ms)
            before = after

        t_burst = time.perf_counter()
        writes = await asyncio.gather(*(_write_burst(h, f"burst-{h.name}") for h in hosts))
        writes_end = time.perf_counter()
        converged = await _until(lambda: _same(hosts), CONVERGE_TIMEOUT, "every host identical after the burst", 0.2)
        count, _ = await _digest(hosts[0])
        expected = BURST_ROWS * n + INSERTS
        if count != expected:
            raise RuntimeError(f"{count} rows after the burst, expected {expected}")
        final = await _traffic(hosts)
        return {
            "hosts": n,
            "mesh_online_s": round(online_s, 2),
            "single_row": {
                "inserts": INSERTS,
                "reach_all_ms": {"p50": round(statistics.median(reach), 1), "max": round(max(reach), 1)},
                # The insert's own sessions: those started while it spread, less the periodic
                # anti-entropy pulls that fell in the same span (each device's, every ~30 s).
                "sessions_per_insert": statistics.median(p["sessions_started"] - p["anti_entropy"] for p in per_insert),
                "sessions_each_insert": [p["sessions_started"] - p["anti_entropy"] for p in per_insert],
                "anti_entropy_each_insert": [p["anti_entropy"] for p in per_insert],
                "batches_per_insert": statistics.median(p["batches_sent"] for p in per_insert),
                "duplicates_per_insert": statistics.median(p["duplicates_received"] for p in per_insert),
                "goal_sessions_per_insert": 2 * (n - 1),
                "insert_to_quiet_s": round(statistics.median(spans), 2),
            },
            "burst": {
                "rows_per_host": BURST_ROWS,
                "writes_s": round(max(writes), 2), "lone_writes_s": round(lone_s, 2),
                "writes_started_to_end_s": round(writes_end - t_burst, 2),
                "converged_after_s": round(converged, 2),
                "rows_everywhere": count,
            },
            "traffic_totals": final,
            "log_problems": _log_problems(hosts)[:20],
        }
    finally:
        for h in hosts:
            await h.close()


async def _data_change(h: _HostDaemon) -> float:
    assert h.client is not None
    deadline = time.monotonic() + REACH_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{h.name} got no dataChange within {REACH_TIMEOUT} s")
        note = await asyncio.wait_for(h.client.notifications.get(), left)
        if note.get("method") == "dataChange":
            return time.perf_counter()


async def _same(hosts: list[_HostDaemon]) -> bool:
    """Every host's table digest, asked of all at once: one after the other,
    a round at 64 hosts under a burst's load took minutes (the fleet had been
    identical for 6 min when the 900 s bound ran out), so the figure said
    more about the check than about the fleet."""
    digests = set(await asyncio.gather(*(_digest(h) for h in hosts)))
    return len(digests) == 1


def bench_mesh(sizes: list[int]) -> list[dict[str, Any]]:
    reason = unavailable_reason()
    if reason is not None:
        return [{"bench": "mesh", "skipped": reason}]
    out = []
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix="p2pmesh-", dir="/tmp"))
        os.chmod(root, 0o700)
        load = [round(x, 2) for x in os.getloadavg()]
        try:
            with Testbed(n, prefix=f"bm{os.getpid() % 10000}x") as bed:
                result = asyncio.run(_mesh(bed, root, n))
            out.append({"bench": "mesh", "loadavg_at_start": load, **result})
        except Exception as exc:  # one size failing still reports the others
            out.append({"bench": "mesh", "hosts": n, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            if os.environ.get("P2PSTORE_BENCH_KEEP"):
                print(f"kept {root} (P2PSTORE_BENCH_KEEP)", file=sys.stderr)
            else:
                shutil.rmtree(root, ignore_errors=True)
    return out
