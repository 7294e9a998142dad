"""Who keeps a channel to whom in a large fleet, and along which links a
change travels: the bounded active set.

A full mesh costs N − 1 channels per device and N (N − 1) links whose
sessions all compete under a burst. Beyond ``full_mesh_peers`` + 1 devices each
device instead *chooses* ``active_set`` peers by rendezvous hashing over
the trusted devices it sees (highest ``sha256(own id | peer id)`` first)
and dials only those; a link exists where either end chose the other. Every
device computes every device's choice from the same view, so all of them
know the same graph without a message about it: a random K-out graph,
connected with high probability for K ≥ 2, in which a device joining or
leaving moves only the links that touch it.

A change then travels eagerly along a spanning tree of that graph rooted at
its writer (breadth-first, neighbours taken in the order of
``sha256(writer | device)``, so every device finds the same parent for
itself and the same children under it, and the forwarding is spread over
the devices instead of falling on those with the smallest IDs): N − 1
sessions per change, Plumtree's eager push without its PRUNE messages,
since the tree is known beforehand. Where two devices' views differ (one
has not seen a newcomer yet), a change may miss part of a tree; the lazy
relays and anti-entropy pulls of sync/engine.py repair that, as they repair
any lost push.

Pure functions of device IDs: no sockets, no clocks (tests/net/test_overlay.py).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Mapping

#: Peers each device chooses to dial in a large fleet (config ``active_set``; 0: no bound, a full
#: mesh): 8, measured best at 32 hosts, and at 64 hosts on one 2-core machine the fleet converged
#: 10 × sooner than as a full mesh (docs/performance.md, "Fleet, round 5" and "round 7").
DEFAULT_ACTIVE_SET = 8
#: Peers up to which every device still dials every other (config ``full_mesh_peers``): at 16 hosts
#: the full mesh measured better than an 8-peer active set (docs/performance.md, "Fleet, round 5").
DEFAULT_FULL_MESH_PEERS = 16

Graph = Mapping[str, frozenset[str]]


def _score(chooser: str, peer: str) -> bytes:
    return hashlib.sha256(f"{chooser}|{peer}".encode()).digest()


def sparse(devices: int, k: int, mesh: int = 0) -> bool:
    """Whether a fleet of ``devices`` keeps an active set of ``k`` (more than
    max(``k``, ``mesh``) peers each) rather than a full mesh; ``k`` 0: never."""
    return 0 < k and max(k, mesh) < devices - 1


def chosen(me: str, view: Iterable[str], k: int, mesh: int = 0) -> frozenset[str]:
    """The peers ``me`` dials among the devices of ``view``: all of them
    unless the fleet is ``sparse``, else the ``k`` ranked highest for ``me``."""
    others = sorted(set(view) - {me})
    if not sparse(len(others) + 1, k, mesh):
        return frozenset(others)
    return frozenset(sorted(others, key=lambda p: _score(me, p), reverse=True)[:k])


def graph(view: Iterable[str], k: int, mesh: int = 0) -> dict[str, frozenset[str]]:
    """Every device's links: an edge wherever either end chose the other."""
    devices = sorted(set(view))
    links: dict[str, set[str]] = {d: set() for d in devices}
    for d in devices:
        for p in chosen(d, devices, k, mesh):
            links[d].add(p)
            links[p].add(d)
    return {d: frozenset(ps) for d, ps in links.items()}


def tree(links: Graph, origin: str) -> dict[str, str | None]:
    """Each device's parent in the breadth-first tree of ``links`` rooted at
    ``origin`` (``origin`` itself: None), neighbours visited in the order of
    their hash with ``origin``; empty when ``origin`` is not in the graph."""
    if origin not in links:
        return {}
    parent: dict[str, str | None] = {origin: None}
    queue = deque([origin])
    while queue:
        node = queue.popleft()
        for nxt in sorted(links[node], key=lambda d: _score(origin, d)):
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return parent


def children(links: Graph, origin: str, me: str) -> frozenset[str]:
    """The devices ``me`` passes ``origin``'s changes on to: its children in
    ``origin``'s tree (empty when either is not in the graph)."""
    if me not in links:
        return frozenset()
    return frozenset(d for d, p in tree(links, origin).items() if p == me)


class Overlay:
    """One device's view of the overlay, recomputed only when the view changes.

    ``update(view)`` with the trusted devices it sees (itself included or
    not); then ``links()``, ``chosen()`` and ``children(origin)`` answer
    from a cache, so the engine may ask once per received batch.
    """

    def __init__(self, me: str, k: int = DEFAULT_ACTIVE_SET, mesh: int = DEFAULT_FULL_MESH_PEERS) -> None:
        self.me = me
        self.k = k
        self.mesh = mesh
        self._view: frozenset[str] = frozenset({me})
        self._graph: dict[str, frozenset[str]] = {me: frozenset()}
        self._trees: dict[str, dict[str, str | None]] = {}
        self._children: dict[str, frozenset[str]] = {}
        self._forwarding: dict[str, frozenset[str]] = {}

    @property
    def sparse(self) -> bool:
        """Whether the bound applies (more than max(``k``, ``mesh``) peers in view)."""
        return sparse(len(self._view), self.k, self.mesh)

    def update(self, view: Iterable[str]) -> bool:
        """Take a new view; True if it differs from the last one."""
        new = frozenset(view) | {self.me}
        if new == self._view:
            return False
        self._view = new
        self._graph = graph(new, self.k, self.mesh)
        self._trees = {}
        self._children = {}
        self._forwarding = {}
        return True

    def view(self) -> frozenset[str]:
        return self._view

    def chosen(self) -> frozenset[str]:
        return chosen(self.me, self._view, self.k, self.mesh)

    def links(self) -> frozenset[str]:
        return self._graph.get(self.me, frozenset())

    def _tree(self, origin: str) -> dict[str, str | None]:
        found = self._trees.get(origin)
        if found is None:
            found = self._trees[origin] = tree(self._graph, origin)
        return found

    def children(self, origin: str) -> frozenset[str]:
        found = self._children.get(origin)
        if found is None:
            mine = self._tree(origin)
            found = self._children[origin] = frozenset(d for d, p in mine.items() if p == self.me)
        return found

    def parent(self, origin: str) -> str | None:
        """The device this one gets ``origin``'s changes from along
        ``origin``'s tree (None for ``origin`` itself, or one not in view)."""
        return self._tree(origin).get(self.me)

    def forwarding(self, peer: str) -> frozenset[str]:
        """The other devices whose changes this one passes on to ``peer``:
        those under whose tree ``peer`` is its child (none in a full mesh,
        where every writer reaches every device itself)."""
        found = self._forwarding.get(peer)
        if found is None:
            found = self._forwarding[peer] = frozenset(
                o for o in self._view if o not in (self.me, peer) and peer in self.children(o))
        return found
