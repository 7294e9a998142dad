"""Per-peer sync traffic: what ``status`` and ``devices.list`` count so that
the cost of a change can be seen (docs/sync.md, "Traffic").

A change made on one device may reach another more than once: relayed by
every device that received it, or sent back to where it came from. The
receiver then applies it as a no-op. ``duplicates_received`` counts those
rows, so the amplification of a fleet's dissemination is a number, not a
guess: in a mesh where everyone relays everything it grows with the square
of the fleet.

Counted since the daemon started, in memory, per peer over all stores:

- ``sessions_started`` / ``sessions_served``: sync sessions this device
  opened with the peer (``store.sync``, auto-sync, a catch-up) and sessions
  the peer opened here;
- ``batches_sent`` / ``bytes_sent``: batches this device sent (payload bytes
  of the ``SyncBatch`` messages), ``rows_sent``: rows in the batches the
  peer acknowledged;
- ``batches_received`` / ``bytes_received`` / ``rows_received``: batches
  applied from the peer, ``rows_applied``: rows that changed this store,
  ``conflicts`` / ``failed``: rows logged as losing changes or failures,
  ``duplicates_received``: the rest (rows this store already held, or
  older than what it holds); ``commits_received``: the transactions those
  batches were applied in (a receiver applies the batches waiting for it in
  one: a group commit, sync/engine.py), so batches ÷ commits says how much
  a large sync saved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(slots=True)
class PeerTraffic:
    sessions_started: int = 0
    sessions_served: int = 0
    batches_sent: int = 0
    bytes_sent: int = 0
    rows_sent: int = 0
    batches_received: int = 0
    bytes_received: int = 0
    rows_received: int = 0
    rows_applied: int = 0
    conflicts: int = 0
    failed: int = 0
    duplicates_received: int = 0
    commits_received: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


#: The keys of every traffic dict, in display order.
FIELDS = tuple(f.name for f in fields(PeerTraffic))


class Traffic:
    """The counters of every peer; the sync engine feeds them."""

    def __init__(self) -> None:
        self._peers: dict[str, PeerTraffic] = {}

    def of(self, peer: str) -> PeerTraffic:
        found = self._peers.get(peer)
        if found is None:
            found = self._peers[peer] = PeerTraffic()
        return found

    def session(self, peer: str, *, served: bool) -> None:
        t = self.of(peer)
        if served:
            t.sessions_served += 1
        else:
            t.sessions_started += 1

    def sent(self, peer: str, payload_bytes: int) -> None:
        t = self.of(peer)
        t.batches_sent += 1
        t.bytes_sent += payload_bytes

    def acked(self, peer: str, rows: int) -> None:
        self.of(peer).rows_sent += rows

    def received(self, peer: str, payload_bytes: int, rows: int, applied: int, conflicts: int, failed: int) -> None:
        t = self.of(peer)
        t.batches_received += 1
        t.bytes_received += payload_bytes
        t.rows_received += rows
        t.rows_applied += applied
        t.conflicts += conflicts
        t.failed += failed
        t.duplicates_received += max(0, rows - applied - conflicts - failed)

    def committed(self, peer: str) -> None:
        """One transaction applied batches of ``peer`` (``received`` counts each batch)."""
        self.of(peer).commits_received += 1

    def peer_dict(self, peer: str) -> dict[str, int]:
        """One device's ``traffic`` (zeros for a peer never synced with)."""
        found = self._peers.get(peer)
        return (found or PeerTraffic()).to_dict()

    def totals(self) -> dict[str, Any]:
        """The sums over every peer (``status``'s top-level ``traffic``)."""
        total = PeerTraffic()
        for t in self._peers.values():
            for name in FIELDS:
                setattr(total, name, getattr(total, name) + getattr(t, name))
        return total.to_dict()
