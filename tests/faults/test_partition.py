"""A network partition of four hosts and its healing (issue 10, fault suite).

Four network-namespace hosts (tests/multihost/testbed.py), one daemon each,
real mDNS, all mutually trusted, the seed's single_version EMPLOYEE table
with auto-sync. Every host writes concurrently (inserts, updates, deletes);
then the switch splits {1,2} | {3,4} (``Testbed.partition``: ports h3, h4
move to a second bridge), both halves keep writing — each deletes rows the
other half updated during the split — the split heals, and nobody is asked
to sync: SPEC §2 promises that with auto-sync "two devices that (re)connect
exchange what they missed".

The writes are designed so that the outcome is fixed under per-column LWW
and row tombstones (docs/sync.md): a row is deleted only when nobody writes
it afterwards — its own owner's early deletes, and the cross deletes, which
come after the other half's updates of those rows (the halves are only
apart after the keepalive declared the other side dead, > 10 s after those
updates, and all hosts share one wall clock). Concurrent updates of the same
cells are left to LWW: any winner will do, as long as all four agree.

Expected after healing: the four tables are identical (SHA3 of the synced
columns, computed by SQLite), every row inserted and not deleted is there,
and no row deleted anywhere is back.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import table_digest
from sync_helpers import SV_REF, Node, setup_employee, wait_until, write_schema
from test_daemons_multihost import HostDaemon
from testbed import Testbed, namespaces_with_prefix, unavailable_reason, unique_prefix

pytestmark = [
    pytest.mark.slow,
    pytest.mark.multihost,
    pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or ""),
    pytest.mark.timeout(400),
]

HOSTS = 4
LEFT, RIGHT = (1, 2), (3, 4)
ROWS_PER_HOST = 30
SEED = int(os.environ.get("P2PSTORE_FAULT_SEED", "0")) + 4
#: Discovery + trust across namespaces; keepalive: a silent peer is dead after 15 s (net/channel.py).
ONLINE_TIMEOUT = 30.0
OFFLINE_TIMEOUT = 25.0
CONVERGE_TIMEOUT = 90.0
COLUMNS, KEY = "NAME, AGE, SALARY, CODES", "NAME"


class Mesh:
    """Four trusted daemons and the bookkeeping of what the test wrote."""

    def __init__(self, bed: Testbed, root: Path) -> None:
        self.bed = bed
        self.nodes: dict[int, Node] = {}
        for i in range(1, HOSTS + 1):
            write_schema(root / f"h{i}", True)
            host = bed.host(i)
            proc = HostDaemon(root, f"h{i}", host.netns, host.address, [])
            proc.start()
            self.nodes[i] = Node(proc)
        self.inserted: set[str] = set()
        self.deleted: set[str] = set()
        self.paths: dict[int, Path] = {}

    def node(self, i: int) -> Node:
        return self.nodes[i]

    def trust_all(self) -> None:
        wait_until(lambda: all(a.view(b.id) for a in self.nodes.values() for b in self.nodes.values() if a is not b),
                   ONLINE_TIMEOUT, "all four daemons discover each other by mDNS")
        for a in self.nodes.values():
            for b in self.nodes.values():
                if a is not b:
                    a.call("devices.trust", device_id=b.id, name=b.name)
        self.wait_online(range(1, HOSTS + 1))

    def wait_online(self, group: Any) -> None:
        group = list(group)
        wait_until(lambda: all(self.nodes[i].sees_online(self.nodes[j]) for i in group for j in group if i != j),
                   ONLINE_TIMEOUT, f"hosts {group} see each other online", interval=0.2)

    def wait_split(self) -> None:
        wait_until(lambda: all(not self.nodes[i].sees_online(self.nodes[j]) and not self.nodes[j].sees_online(self.nodes[i])
                               for i in LEFT for j in RIGHT),
                   OFFLINE_TIMEOUT, "each half sees the other offline", interval=0.2)

    def setup(self) -> None:
        for i, node in self.nodes.items():
            setup_employee(node, auto_sync=True)
            self.paths[i] = Path(node.call("store.open", **SV_REF)["path"])

    # -- writes ------------------------------------------------------------

    def insert(self, i: int, name: str, age: int) -> None:
        self.nodes[i].call("store.insert", **SV_REF, table="EMPLOYEE",
                           values={"NAME": name, "AGE": age, "SALARY": i * 1.5, "CODES": {"$blob": ""}})
        self.inserted.add(name)

    def update(self, i: int, name: str, column: str, value: Any) -> None:
        self.nodes[i].call("store.update", **SV_REF, values={column: value},
                           predicates={"table": "EMPLOYEE", "where": [["NAME", "=", name]]})

    def delete(self, i: int, name: str) -> None:
        self.nodes[i].call("store.delete", **SV_REF, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", name]]})
        self.deleted.add(name)

    def concurrently(self, work: dict[int, Callable[[], None]]) -> None:
        """Each host's ops in its own thread, all at once (bounded wait)."""
        with concurrent.futures.ThreadPoolExecutor(len(work)) as pool:
            futures = [pool.submit(fn) for fn in work.values()]
            for f in futures:
                f.result(timeout=120)

    # -- checks ------------------------------------------------------------

    def digests(self, hosts: Any = None) -> dict[int, tuple[int, int, str]]:
        return {i: table_digest(self.paths[i], "EMPLOYEE", COLUMNS, KEY) for i in (hosts or self.nodes)}

    def converged(self, hosts: Any = None) -> bool:
        return len(set(self.digests(hosts).values())) == 1

    def names(self, i: int) -> set[str]:
        return {r[0] for r in self.nodes[i].rows(SV_REF, "SELECT NAME FROM EMPLOYEE")}

    def close(self) -> None:
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.stop()


def name(host: int, k: int, phase: str = "") -> str:
    return f"h{host}-{phase}{k:03d}"


# Rows of phase 0 by k % 10: 0-5 stable (updated by anyone, never deleted),
# 6-7 updated by the right half during the split, then deleted by the left,
# 8 updated by the left during the split, then deleted by the right,
# 9 deleted by their owner right after inserting (nobody updates them).
STABLE, CROSS_LEFT_DELETES, CROSS_RIGHT_DELETES, DOOMED = range(6), (6, 7), (8,), (9,)


def phase0(mesh: Mesh, i: int, rng: random.Random) -> Callable[[], None]:
    def run() -> None:
        for k in range(ROWS_PER_HOST):
            mesh.insert(i, name(i, k), k)
            if k % 10 in DOOMED:
                mesh.delete(i, name(i, k))
            elif k % 10 in STABLE and rng.random() < 0.5:
                mesh.update(i, name(rng.randint(1, HOSTS), rng.choice([k for k in range(k + 1) if k % 10 in STABLE])),
                            rng.choice(["AGE", "SALARY"]), rng.randint(0, 999))
    return run


def split_updates(mesh: Mesh, i: int, rng: random.Random) -> Callable[[], None]:
    """During the split (before it is noticed): the cross updates, stable updates, inserts."""
    crossed = CROSS_LEFT_DELETES if i in RIGHT else CROSS_RIGHT_DELETES

    def run() -> None:
        for owner in range(1, HOSTS + 1):
            for k in range(ROWS_PER_HOST):
                if k % 10 in crossed and (k + owner) % 2 == i % 2:
                    mesh.update(i, name(owner, k), "AGE", 1000 + i)
        for k in range(10):
            mesh.insert(i, name(i, k, "s"), k)
            mesh.update(i, name(rng.randint(1, HOSTS), rng.choice([k for k in range(ROWS_PER_HOST) if k % 10 in STABLE])),
                        rng.choice(["AGE", "SALARY"]),
                        rng.randint(0, 999))
    return run


def split_deletes(mesh: Mesh, i: int, rng: random.Random) -> Callable[[], None]:
    """Once each half sees the other dead: delete what the other half updated, and more writes."""
    doomed = CROSS_LEFT_DELETES if i in LEFT else CROSS_RIGHT_DELETES

    def run() -> None:
        for owner in range(1, HOSTS + 1):
            for k in range(ROWS_PER_HOST):
                if k % 10 in doomed and (k + owner) % 2 == i % 2:
                    mesh.delete(i, name(owner, k))
        for k in range(10):
            mesh.insert(i, name(i, k, "t"), k)
            if k % 3 == 0:
                mesh.delete(i, name(i, k, "t"))
            mesh.update(i, name(rng.randint(1, HOSTS), rng.choice([k for k in range(ROWS_PER_HOST) if k % 10 in STABLE])),
                        "SALARY", rng.random() * 1000)
    return run


def test_partition_and_heal_converge_and_resurrect_nothing(short_tmp: Path) -> None:
    prefix = unique_prefix("fp")
    rng = random.Random(SEED)
    print(f"partition test: seed {SEED} (P2PSTORE_FAULT_SEED shifts it)")
    t0 = time.monotonic()
    try:
        with Testbed(HOSTS, prefix) as bed:
            mesh = Mesh(bed, short_tmp)
            try:
                mesh.trust_all()
                mesh.setup()
                seeds = {i: random.Random(rng.random()) for i in mesh.nodes}
                mesh.concurrently({i: phase0(mesh, i, seeds[i]) for i in mesh.nodes})
                wait_until(mesh.converged, CONVERGE_TIMEOUT, "all four converge before the split", interval=0.3)
                t_connected = time.monotonic() - t0

                bed.partition(*RIGHT)
                t_split = time.monotonic()
                mesh.concurrently({i: split_updates(mesh, i, seeds[i]) for i in mesh.nodes})
                mesh.wait_split()
                noticed = time.monotonic() - t_split
                mesh.concurrently({i: split_deletes(mesh, i, seeds[i]) for i in mesh.nodes})
                for half in (LEFT, RIGHT):  # each half still syncs inside itself
                    wait_until(lambda: mesh.converged(half), CONVERGE_TIMEOUT, f"hosts {half} converge during the split",
                               interval=0.3)
                left, right = mesh.digests(LEFT)[LEFT[0]], mesh.digests(RIGHT)[RIGHT[0]]
                assert left != right, "the halves did not diverge: the partition did not partition"

                bed.heal()
                t_heal = time.monotonic()
                mesh.wait_online(range(1, HOSTS + 1))
                online = time.monotonic() - t_heal
                wait_until(mesh.converged, CONVERGE_TIMEOUT, "all four converge after healing, by auto-sync alone",
                           interval=0.3)
                healed = time.monotonic() - t_heal

                expected = mesh.inserted - mesh.deleted
                for i in mesh.nodes:
                    names = mesh.names(i)
                    assert not names & mesh.deleted, f"host {i}: deleted rows came back: {sorted(names & mesh.deleted)}"
                    assert names == expected, f"host {i}: missing {sorted(expected - names)}, extra {sorted(names - expected)}"
                    assert mesh.nodes[i].call("store.sync_failures", **SV_REF) == [], i
                    assert mesh.nodes[i].rows(SV_REF, "PRAGMA integrity_check") == [["ok"]], i
                digest = mesh.digests()[1]
                print(f"  {len(mesh.inserted)} rows inserted, {len(mesh.deleted)} deleted, {digest[0]} left on each host; "
                      f"connected phase {t_connected:.1f} s, split noticed after {noticed:.1f} s, "
                      f"online {online:.1f} s and converged {healed:.1f} s after healing; {time.monotonic() - t0:.1f} s in all")
                for node in mesh.nodes.values():
                    log = node.proc.log()
                    assert "Traceback" not in log, f"{node.name}: {log[log.index('Traceback') - 2000:][:4000]}"
            finally:
                mesh.close()
    finally:
        assert namespaces_with_prefix(prefix) == []
