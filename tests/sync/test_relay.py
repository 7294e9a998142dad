"""sync/engine.py's choice of relay targets (docs/sync.md, "Auto-sync in a
fleet"), without daemons: at most ``relay_fanout`` online trusted peers,
never the sender or an origin of the changes, spread at random."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from types import SimpleNamespace
from typing import Any

from p2pstore.net import overlay
from p2pstore.net.overlay import Overlay
from p2pstore.sync.engine import SyncEngine

PEERS = ["P1", "P2", "P3", "P4", "P5", "P6"]


def engine(fanout: int, online: list[str], trusted: set[str] | None = None, seed: int = 1) -> SyncEngine:
    trusted = set(online) if trusted is None else trusted
    peers: Any = SimpleNamespace(channels=lambda: list(online), overlay=Overlay("ME", 0))  # (no bound: a full mesh)
    directory: Any = SimpleNamespace(trust_store=SimpleNamespace(is_trusted=lambda d: d in trusted))
    registry: Any = SimpleNamespace(stores=lambda: [])
    return SyncEngine(registry=registry, peers=peers, directory=directory, on_applied=lambda *a: None,
                      relay_fanout=fanout, rng=random.Random(seed))


def test_at_most_fanout_targets_never_the_sender_or_an_origin() -> None:
    e = engine(1, PEERS)
    for _ in range(50):
        got = e.relay_targets("P1", ["P2"])
        assert len(got) == 1 and got[0] not in ("P1", "P2")
    e2 = engine(3, PEERS)
    got = e2.relay_targets("P1", ["P2", "P3"])
    assert len(got) == 3 and set(got) == {"P4", "P5", "P6"}  # only three are left: all of them


def test_zero_fanout_relays_nothing_and_untrusted_peers_are_never_chosen() -> None:
    assert engine(0, PEERS).relay_targets("P1", []) == []
    e = engine(10, PEERS, trusted={"P1", "P2", "P3"})
    assert e.relay_targets("P1", []) == ["P2", "P3"]


def test_targets_are_spread_over_the_other_peers() -> None:
    e = engine(1, PEERS, seed=7)
    counts = Counter(e.relay_targets("P1", [])[0] for _ in range(1000))
    assert set(counts) == {"P2", "P3", "P4", "P5", "P6"}
    assert min(counts.values()) > 120  # about 200 each



def sparse_engine(me: str, view: list[str], seed: int = 1) -> SyncEngine:
    """An engine with a 2-peer active set over ``view`` (all online, trusted)."""
    e = engine(1, [d for d in view if d != me], seed=seed)
    e.peers.overlay = Overlay(me, 2, 2)
    e.peers.overlay.update(view)
    assert e.peers.overlay.sparse
    return e


def test_in_a_large_fleet_a_change_that_came_along_its_tree_is_not_relayed() -> None:
    view = [f"D{i:02d}" for i in range(12)]
    links = overlay.graph(view, 2, 2)
    for me in view:
        e = sparse_engine(me, view)
        parent_of = {w: e.peers.overlay.parent(w) for w in view if w != me}
        for writer, parent in parent_of.items():
            assert parent is not None and me in overlay.children(links, writer, parent)
            # from its parent in the writer's tree: the tree goes on, no relay
            assert e.relay_targets(parent, [writer]) == []
            # from anyone else (a relay, a whole push): one relay, as in a full mesh
            other = next(d for d in view if d not in (me, parent, writer))
            got = e.relay_targets(other, [writer])
            assert len(got) == 1 and got[0] not in (other, writer, me)
        # changes of several writers in one batch: no relay only if the sender is the parent in every tree
        w1, w2 = sorted(parent_of)[:2]
        assert (e.relay_targets(parent_of[w1], [w1, w2]) == []) == (parent_of[w1] == parent_of[w2])


def test_a_forwarding_link_gets_one_lazy_whole_push_until_the_peer_acked_past_where_forwarding_began() -> None:
    """A grant (protocol 5) needs the peer's watermark past the seq where
    forwarding to it began; along the trees no relay moves it, so the first
    eager read on a link asks for a lazy whole push — also when this daemon
    has seen no whole-stream ack from the peer yet (before, no grant ever
    formed then) — and none once the peer acked past it."""
    view = [f"D{i:02d}" for i in range(12)]
    me = view[0]
    store: Any = SimpleNamespace(bundle="b", name="s")

    async def run() -> None:
        e = sparse_engine(me, view)
        peer = next(p for p in sorted(e.peers.overlay.links()) if e.peers.overlay.forwarding(p))
        key = (("b", "s"), peer)
        forwarding, _ = e._forwarding(store, peer, 10)  # first eager read, no whole ack known
        assert forwarding and key in e._whole_timers
        e._whole_timers.pop(key).cancel()
        e._whole_acked[("b", "s", peer)] = 9  # a whole push acked, but short of where forwarding began
        e._forwarding(store, peer, 12)
        assert key in e._whole_timers
        e._whole_timers.pop(key).cancel()
        e._whole_acked[("b", "s", peer)] = 12  # past it: grants can form, no more whole pushes
        e._forwarding(store, peer, 20)
        assert key not in e._whole_timers

    asyncio.run(run())


def test_a_whole_push_grants_what_the_eager_pushes_book_says() -> None:
    """The lazy whole push that moves the peer's watermark past where
    forwarding began carries the grants itself (``_granting``): the book of
    the eager reads, unchanged by the whole push, and nothing before any
    eager read; a batch of another stream (the store restored since) loses
    them (``_check_granting_stream``)."""
    from p2pstore.protocol.batch import Grant, OutBatch

    view = [f"D{i:02d}" for i in range(12)]
    store: Any = SimpleNamespace(bundle="b", name="s")

    async def run() -> None:
        e = sparse_engine(view[0], view)
        peer = next(p for p in sorted(e.peers.overlay.links()) if e.peers.overlay.forwarding(p))
        assert e._granting(store, peer) == {}  # no eager read yet: no book
        forwarding, _ = e._forwarding(store, peer, 10)
        first = OutBatch("single_version", 10, 10, (), False, False, "S1")
        e._check_forwarding_stream(store, peer, 10, forwarding, first)  # the book's stream: S1, from seq 10
        for t in e._whole_timers.values():
            t.cancel()
        book = e._granting(store, peer)
        assert book == {d: 10 for d in forwarding}
        assert e._granting(store, peer) == book  # (reading it changes nothing)
        granted = OutBatch("single_version", 10, 30, (), False, True, "S1", grants=(Grant(sorted(forwarding)[0], 99, 10),))
        assert e._check_granting_stream(store, peer, granted) is granted
        restored = OutBatch("single_version", 0, 30, (), False, True, "S2", grants=granted.grants)
        assert e._check_granting_stream(store, peer, restored).grants == ()

    asyncio.run(run())
