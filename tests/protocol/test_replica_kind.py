"""Replica kinds (protocol/replica_kind.py): which ends agree and which way rows may move."""

from __future__ import annotations

import itertools

import msgpack
import pytest

from p2pstore.errors import ProtocolError
from p2pstore.protocol.messages import SyncOpen, decode, encode
from p2pstore.protocol.replica_kind import ReplicaKind, problem

K = ReplicaKind
#: (sending end, receiving end) pairs rows may move between; every other pair is refused.
ALLOWED = {(K.TWO_WAY, K.TWO_WAY), (K.SEND, K.RECEIVE), (K.TWO_WAY, K.CHECKOUT), (K.CHECKOUT, K.TWO_WAY)}


@pytest.mark.parametrize(("sender", "receiver"), list(itertools.product(K, K)))
def test_rows_move_only_between_ends_that_agree_and_the_right_way(sender: ReplicaKind, receiver: ReplicaKind) -> None:
    why = problem(sender, receiver)
    assert (why is None) == ((sender, receiver) in ALLOWED), (sender, receiver, why)


def test_a_one_way_pair_refuses_the_other_way_and_says_why() -> None:
    assert "receive replica, which does not send" in (problem(K.RECEIVE, K.SEND) or "")
    assert "do not agree" in (problem(K.SEND, K.TWO_WAY) or "")


def test_sync_open_carries_the_openers_kind_and_leaves_the_default_off_the_wire() -> None:
    plain = SyncOpen(1, "b", "s", "push", None, None, None, ())
    _tag, body = msgpack.unpackb(encode(plain), raw=False)
    assert "replica" not in body and decode(encode(plain)).replica == "two-way"
    child = SyncOpen(1, "b", "s", "pull", None, None, 0, (), replica="checkout")
    assert decode(encode(child)) == child
    body["replica"] = "sideways"
    with pytest.raises(ProtocolError, match="replica must be one of"):
        decode(msgpack.packb(["sync_open", body], use_bin_type=True))
