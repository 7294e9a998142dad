"""The bounded active set and its trees (net/overlay.py): pure functions of IDs."""

from __future__ import annotations

import hashlib
from collections import deque

import pytest

from p2pstore.net import overlay
from p2pstore.net.overlay import Overlay


def ids(n: int) -> list[str]:
    return [hashlib.sha256(f"dev{i}".encode()).hexdigest()[:52].upper() for i in range(n)]


def connected(links: dict[str, frozenset[str]]) -> bool:
    start = next(iter(links))
    seen, queue = {start}, deque([start])
    while queue:
        for nxt in links[queue.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return len(seen) == len(links)


def test_small_fleet_is_a_full_mesh() -> None:
    devices = ids(9)
    for d in devices:
        assert overlay.chosen(d, devices, 8) == frozenset(devices) - {d}
    g = overlay.graph(devices, 8)
    assert all(g[d] == frozenset(devices) - {d} for d in devices)
    # no tree to pass changes along: every writer reaches everyone itself
    assert all(overlay.children(g, o, d) == frozenset() for o in devices for d in devices if d != o)
    assert overlay.children(g, devices[0], devices[0]) == frozenset(devices[1:])


def test_zero_means_no_bound() -> None:
    devices = ids(40)
    assert overlay.chosen(devices[0], devices, 0) == frozenset(devices[1:])
    o = Overlay(devices[0], 0)
    o.update(devices)
    assert not o.sparse and o.links() == frozenset(devices[1:])


@pytest.mark.parametrize("n", [10, 16, 32, 64, 200])
def test_large_fleet_chooses_k_and_stays_connected(n: int) -> None:
    devices = ids(n)
    g = overlay.graph(devices, 8)
    for d in devices:
        mine = overlay.chosen(d, devices, 8)
        assert len(mine) == 8 and d not in mine
        assert mine <= g[d]
        assert all(d in g[p] for p in g[d])  # links are symmetric
    assert connected(g)
    average = sum(len(v) for v in g.values()) / n
    assert average < min(n - 1, 2 * 8)  # sparser than the mesh, bounded by ~2K


def test_choice_is_the_same_from_any_order_of_the_view() -> None:
    devices = ids(30)
    assert overlay.chosen(devices[3], devices, 8) == overlay.chosen(devices[3], list(reversed(devices)), 8)
    assert overlay.graph(devices, 8) == overlay.graph(reversed(devices), 8)


def test_a_newcomer_moves_only_links_that_touch_it() -> None:
    devices = ids(30)
    before = overlay.graph(devices, 8)
    new = ids(31)[-1]
    after = overlay.graph([*devices, new], 8)
    for d in devices:
        assert after[d] - {new} <= before[d]  # nobody gains a link to an old device
    lost = [(d, p) for d in devices for p in before[d] - after[d]]
    assert lost  # (with 30 devices some device ranks the newcomer in its top 8)
    # a link goes only where one end chose the newcomer instead
    assert all(new in overlay.chosen(d, [*devices, new], 8) or new in overlay.chosen(p, [*devices, new], 8)
               for d, p in lost)


@pytest.mark.parametrize("n", [12, 32, 64])
def test_each_origin_tree_spans_the_fleet_once(n: int) -> None:
    devices = ids(n)
    g = overlay.graph(devices, 8)
    for origin in devices[:5]:
        edges = [(d, c) for d in devices for c in overlay.children(g, origin, d)]
        assert len(edges) == n - 1  # N - 1 pushes per change
        reached = {origin} | {c for _, c in edges}
        assert reached == set(devices)
        assert all(c in g[d] for d, c in edges)  # along links only
        assert origin not in {c for _, c in edges}


def test_overlay_caches_and_forwarding_matches_children() -> None:
    devices = ids(20)
    me = devices[0]
    o = Overlay(me, 4, mesh=0)
    assert o.update(devices) and not o.update(list(reversed(devices)))
    assert o.sparse and o.chosen() == overlay.chosen(me, devices, 4)
    assert o.links() == overlay.graph(devices, 4)[me]
    for peer in o.links():
        expected = {x for x in devices if x not in (me, peer) and peer in o.children(x)}
        assert o.forwarding(peer) == expected
    assert o.forwarding("NOT-IN-VIEW") == frozenset()
    # a device leaving changes the answer
    o.update(devices[:10])
    assert o.links() == overlay.graph(devices[:10], 4)[me]


def test_unknown_origin_has_no_tree() -> None:
    devices = ids(12)
    g = overlay.graph(devices, 4)
    assert overlay.children(g, "ELSEWHERE", devices[0]) == frozenset()


def test_the_full_mesh_stays_up_to_its_own_bound() -> None:
    devices = ids(17)  # 16 peers each: still a mesh (active set 8, mesh up to 16 by default)
    o = Overlay(devices[0], 8)
    o.update(devices)
    assert not o.sparse and o.links() == frozenset(devices[1:])
    assert overlay.graph(devices, 8, 16)[devices[5]] == frozenset(devices) - {devices[5]}
    o.update(ids(18))  # one more: the active set
    assert o.sparse and len(o.chosen()) == 8 and o.chosen() <= o.links() < frozenset(ids(18)[1:])


def test_by_default_a_full_mesh_up_to_16_peers_then_8_chosen() -> None:
    me = ids(1)[0]
    small = Overlay(me)
    small.update(ids(17))  # me and 16 others
    assert not small.sparse and small.links() == frozenset(ids(17)[1:])
    large = Overlay(me)
    large.update(ids(100))
    assert large.sparse and len(large.chosen()) == 8 and large.chosen() <= large.links() < frozenset(ids(100)[1:])


def test_active_set_0_is_no_bound() -> None:
    o = Overlay(ids(1)[0], k=0)
    o.update(ids(100))
    assert not o.sparse and o.links() == frozenset(ids(100)[1:])
