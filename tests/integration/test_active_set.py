"""The bounded active set (issue 15 item 3; net/overlay.py, docs/sync.md
"Auto-sync in a fleet"), with real daemons finding each other by mDNS on
loopback:

- beyond ``active_set`` + 1 devices each daemon holds channels only along
  the overlay's links (the same graph every device computes), not to every
  peer, and still lists the others as online (not connected);
- a write still reaches every device, along its writer's tree, in N - 1
  sync sessions (no relays: every device got it from its tree parent);
- ``store.sync`` and a remote query to a device outside the set open a
  channel on demand, which closes again once idle (``idle_close_s``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sync_helpers import SV_REF, Node, quiet_sessions, setup_employee, wait_until, write_schema

from p2pstore.net import overlay

N = 6
K = 2
IDLE_S = 1.5
MDNS = ("--discovery",)


def connected(node: Node) -> set[str]:
    return {d["device_id"] for d in node.call("devices.list") if d["connected"]}


@pytest.fixture
def fleet(daemon_factory, short_tmp: Path, loopback_multicast) -> list[Node]:
    config = short_tmp / "fleet.toml"
    config.write_text(f"active_set = {K}\nfull_mesh_peers = {K}\nidle_close_s = {IDLE_S}\nrelay_fanout = 1\nanti_entropy_interval_s = 0\n",
                      encoding="utf-8")
    names = [chr(ord("a") + i) for i in range(N)]
    for name in names:
        write_schema(short_tmp / name, True)
    nodes = [Node(daemon_factory(name, *MDNS, "--config", str(config))) for name in names]
    ids = {n.id for n in nodes}
    wait_until(lambda: all({d["device_id"] for d in n.call("devices.list")} >= ids - {n.id} for n in nodes),
               60, "every daemon discovers the others by mDNS")
    for n in nodes:  # the bulk form: one call per device
        n.call("devices.trust", devices=[{"device_id": o.id, "name": o.name} for o in nodes if o is not n])
    return nodes


def test_channels_follow_the_overlay_and_a_write_reaches_everyone(fleet: list[Node]) -> None:
    nodes = fleet
    links = overlay.graph([n.id for n in nodes], K)
    assert any(len(links[n.id]) < N - 1 for n in nodes)  # (6 devices choosing 2 each: not a mesh)
    wait_until(lambda: all(connected(n) == links[n.id] for n in nodes), 20,
               "each daemon connected along its overlay links only")
    for n in nodes:  # the rest: online, not connected
        views = {d["device_id"]: d for d in n.call("devices.list")}
        for o in nodes:
            if o is not n and o.id not in links[n.id]:
                assert views[o.id]["online"] and not views[o.id]["connected"], (n.name, views[o.id])
    for n in nodes:
        setup_employee(n, auto_sync=True)
    # A first write on every device: each link's first eager push asks for one lazy whole push
    # (the watermark a grant needs; sync/engine.py ``_forwarding``), once.
    for n in nodes:
        n.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": f"first-{n.name}", "AGE": 0})
    wait_until(lambda: all(n.count(SV_REF, "EMPLOYEE") == N for n in nodes), 10, "the first writes everywhere")
    before = quiet_sessions(nodes, 3.0)  # (those whole pushes wait for 1 s of quiet: WHOLE_QUIET_S)
    for k, writer in enumerate(nodes[:3]):
        t0 = int(time.time() * 1000) - 5
        writer.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": f"one{k}", "AGE": k})
        wait_until(lambda: all(n.rows(SV_REF, "SELECT count(*) FROM EMPLOYEE WHERE NAME = ?", [f"one{k}"])[0][0] == 1
                               for n in nodes), 10, f"row one{k} on all {N} devices")
        after = quiet_sessions(nodes, 1.5)
        for n in nodes:  # each device got the row first from its parent in the writer's tree
            if n is writer:
                continue
            parent = next(p.id for p in nodes if n.id in overlay.children(links, writer.id, p.id))
            got = sorted((e for e in n.call("store.sync_log", **SV_REF, limit=100)
                          if e["direction"] == "receive" and e["applied"] and e["at"] >= t0), key=lambda e: e["at"])
            assert got and got[0]["peer"] == parent, (k, n.name, parent, got)
        # N - 1 pushes along the writer's tree and no relay: each device got the change from its
        # parent in that tree (a relay by each receiver made it 2 (N - 1); one spare for a retry)
        assert N - 1 <= after - before <= N, f"insert {k}: {after - before} sessions"
        before = after
    assert all(connected(n) == links[n.id] for n in nodes)
    # Each device's origin marks cover every writer — from its own links, or granted by its tree
    # parents — so a pull from any linked peer (as anti-entropy does) moves no row at all. A grant
    # comes with a lazy whole push, which waits for 1 s of quiet after the last change applied: 3 s
    # of quiet (not the 1.5 s above) leaves a loaded machine time for the last of them.
    quiet_sessions(nodes, 3.0)
    for n in nodes:
        got = n.sync("pull", SV_REF, sorted(links[n.id]))
        assert all(r["code"] == 0 and r["sent"] == 0 for r in got.values()), \
            (n.name, {peer[:7]: (r["code"], r["sent"]) for peer, r in got.items()})


def test_sync_and_query_reach_a_device_outside_the_set_on_demand(fleet: list[Node]) -> None:
    nodes = fleet
    links = overlay.graph([n.id for n in nodes], K)
    wait_until(lambda: all(connected(n) == links[n.id] for n in nodes), 20, "the overlay is up")
    a, b = next((x, y) for x in nodes for y in nodes if x is not y and y.id not in links[x.id])
    setup_employee(a)
    setup_employee(b)
    a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": "direct", "AGE": 7})
    result = a.sync("push", SV_REF, [b])
    assert result[b.id]["code"] == 0, result
    assert b.rows(SV_REF, "SELECT AGE FROM EMPLOYEE WHERE NAME = 'direct'") == [[7]]
    assert b.id in connected(a)
    answer = a.call("store.remote_query", **SV_REF, device=b.id, table="EMPLOYEE")
    assert any("direct" in row for row in answer["rows"]), answer
    # idle: the on-demand channel closes again, and the device stays online, not connected
    wait_until(lambda: b.id not in connected(a), IDLE_S + 10, "the on-demand channel closes once idle")
    view = next(d for d in a.call("devices.list") if d["device_id"] == b.id)
    assert view["online"] and not view["connected"]
    assert connected(a) == links[a.id]
