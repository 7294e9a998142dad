"""Replica kinds: which way a store's rows may move between two devices (seed 004).

Each device keeps, per store and peer, the kind of its own end of the link
(store/replicas.py); a session's opener says its kind in ``SyncOpen`` and
the other side checks both ends here, before any row moves:

- ``two-way`` (the default): both send and receive;
- ``send`` / ``receive``: a one-way pair; the ``send`` end is the parent,
  the ``receive`` end's distributed tables are read-only to applications;
- ``checkout``: the child of a check-out (``p2pstore checkout``): it pulls
  a snapshot of selected rows once and pushes its edits back once
  (``p2pstore checkin``); the parent's end is a plain ``two-way``.

Ends agree when they are ``two-way``/``two-way``, ``send``/``receive`` (either
way round) or ``checkout``/``two-way``; anything else is ``REPLICA_MISMATCH``
and no row moves. The rules are pure: the same on every device.
"""

from __future__ import annotations

import enum


class ReplicaKind(str, enum.Enum):
    TWO_WAY = "two-way"
    SEND = "send"
    RECEIVE = "receive"
    CHECKOUT = "checkout"

    def __str__(self) -> str:
        return self.value

    @property
    def sends(self) -> bool:
        """Whether this end may send its rows to the other."""
        return self is not ReplicaKind.RECEIVE

    @property
    def receives(self) -> bool:
        """Whether this end may take the other's rows."""
        return self is not ReplicaKind.SEND


#: What the other end must be for each kind.
PARTNER = {
    ReplicaKind.TWO_WAY: frozenset({ReplicaKind.TWO_WAY, ReplicaKind.CHECKOUT}),
    ReplicaKind.SEND: frozenset({ReplicaKind.RECEIVE}),
    ReplicaKind.RECEIVE: frozenset({ReplicaKind.SEND}),
    ReplicaKind.CHECKOUT: frozenset({ReplicaKind.TWO_WAY}),
}


def problem(sender: ReplicaKind, receiver: ReplicaKind) -> str | None:
    """Why rows may not move from an end of kind ``sender`` to one of kind
    ``receiver`` (None: they may)."""
    if receiver not in PARTNER[sender]:
        return (f"the replica kinds do not agree: the sending end is {sender}, the receiving end {receiver} "
                "(pairs: two-way/two-way, send/receive, checkout/two-way)")
    if not sender.sends:
        return f"the sending end is a {sender} replica, which does not send"
    if not receiver.receives:
        return f"the receiving end is a {receiver} replica, which does not receive"
    return None
