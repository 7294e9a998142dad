"""The sync, stores-offer and remote-query messages (protocol/messages.py):
each round-trips through its wire form, and each field a peer could get
wrong is refused with a ProtocolError, whether built here or decoded."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from p2pstore.errors import ProtocolError
from p2pstore.protocol.messages import (
    Message,
    OriginMark,
    QueryError,
    QueryMore,
    QueryPage,
    QueryRequest,
    RevisionOffer,
    StoreOffer,
    StoresOffer,
    SyncAck,
    SyncBatch,
    SyncEnd,
    SyncOpen,
    SyncReady,
    TableOffer,
    decode,
    encode,
)

TABLES = (TableOffer("EMPLOYEE", 3, ("NAME", "AGE"), "NAME"), TableOffer("T", None, (), None))
STREAM = "0f" * 16


def sync_open(**over: Any) -> SyncOpen:
    fields: dict[str, Any] = dict(req=7, bundle="b", store="s", mode="pull", table="T", where='[["n", ">", 1]]',
                                  since=12, tables=TABLES, stream=STREAM)
    fields.update(over)
    return SyncOpen(**fields)


MESSAGES: list[Message] = [
    StoresOffer((StoreOffer("b", "s", 2, "single_version", TABLES),)),
    StoresOffer(()),
    sync_open(),
    sync_open(mode="push", table=None, where=None, since=None, stream=None),
    SyncReady(7, 0, TABLES, None),
    SyncReady(7, 2**63 - 1, (), STREAM),
    SyncReady(7, 3, (), STREAM, have=(OriginMark("DEV-A", 2**64 - 1), OriginMark("DEV-B", 0))),
    sync_open(mode="pull", have=(OriginMark("DEV-A", 5),)),
    sync_open(mode="push", table=None, where=None, since=None, stream=None, own=True),
    SyncAck(7, 12, 10, 1, 1, 0, (OriginMark("DEV-A", 9),)),
    SyncBatch(7, b"\x00" * 100),
    SyncAck(7, 12, 10, 1, 1),
    SyncEnd(7, 0, ""),
    SyncEnd(7, 27, "schema mismatch"),
    QueryRequest(9, "b", "s", "T", ("a", "b"), '{"where": []}'),
    QueryPage(9, ("a", "b"), msgpack.packb([[1, "x"]]), True),
    QueryMore(9),
    QueryError(9, "SECURITY_LEVEL", "no"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize("make", [
    lambda: sync_open(req=0),
    lambda: sync_open(req=2**64),
    lambda: sync_open(mode="both"),
    lambda: sync_open(bundle=""),
    lambda: sync_open(table=""),
    lambda: sync_open(where="w" * (64 * 1024 + 1)),
    lambda: sync_open(since=None),  # a pull must say since which seq
    lambda: sync_open(own=True),  # own changes only: a push, of the whole store
    lambda: sync_open(mode="push", since=None, where=None, own=True),
    lambda: sync_open(mode="push", table=None, where=None, since=None, own=1),
    lambda: sync_open(since=-1),
    lambda: sync_open(since=2**63),
    lambda: sync_open(stream=""),
    lambda: sync_open(stream="s" * 300),
    lambda: sync_open(stream=5),
    lambda: SyncReady(7, -1, (), None),
    lambda: SyncReady(7, 0, (), ""),
    lambda: SyncReady(7, 0, (), None, have=(OriginMark("DEV-A", 1), OriginMark("DEV-A", 2))),  # a device twice
    lambda: SyncReady(7, 0, (), None, have=tuple(OriginMark(f"D{i}", 1) for i in range(4097))),  # too many
    lambda: SyncReady(7, 0, (), None, have=(OriginMark("", 1),)),
    lambda: SyncReady(7, 0, (), None, have=(OriginMark("DEV-A", -1),)),
    lambda: sync_open(have=(OriginMark("x" * 65, 1),)),
    lambda: SyncAck(7, 1, 0, 0, 0, 0, (OriginMark("DEV-A", 1), OriginMark("DEV-A", 1))),
    lambda: SyncAck(7, -1, 0, 0, 0),
    lambda: SyncAck(7, 1, -1, 0, 0),
    lambda: SyncEnd(7, 100, ""),
    lambda: SyncEnd(7, 1, "m" * 2000),
    lambda: QueryRequest(9, "b", "s", "", (), "{}"),
    lambda: QueryRequest(9, "b", "s", "T", ("",), "{}"),
    lambda: QueryRequest(9, "b", "s", "T", (), "p" * (1 << 20)),
    lambda: QueryError(9, "", "m"),
    lambda: QueryMore(0),
    lambda: StoresOffer((StoreOffer("b", "s", 1, "collaborative", ()),) * 2),
])
def test_bad_fields_are_refused(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolError):
        make()


def _wire(msg: Message, **change: Any) -> bytes:
    tag, body = msgpack.unpackb(encode(msg), raw=False)
    body.update(change)
    return msgpack.packb([tag, body], use_bin_type=True)


@pytest.mark.parametrize("payload", [
    _wire(sync_open(), stream=""),
    _wire(sync_open(), stream=[STREAM]),
    _wire(sync_open(), since="12"),
    _wire(sync_open(), mode=None),
    _wire(SyncReady(7, 0, (), STREAM), stream=b"bytes"),
    _wire(SyncBatch(7, b"x"), payload="not bytes"),
    _wire(SyncAck(7, 1, 1, 0, 0), applied=True),
    _wire(QueryPage(9, ("a",), b"", True), last=1),
    msgpack.packb(["sync_ready", {"req": 7, "since": 0, "tables": []}], use_bin_type=True),  # no stream field
])
def test_bad_wire_forms_are_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(payload)


def test_store_offer_lag_figures_round_trip_and_are_optional_on_the_wire() -> None:
    with_lag = StoresOffer((StoreOffer("b", "s", 1, "collaborative", TABLES, 1200, 4711, STREAM),))
    assert decode(encode(with_lag)) == with_lag
    # An offer from a sender without the figures (an older release): they read as unknown.
    old = msgpack.packb(["stores_offer", {"stores": [{"bundle": "b", "store": "s", "security_label": 1,
                                                      "table_type": "collaborative", "tables": []}]}], use_bin_type=True)
    (offer,) = decode(old).stores  # type: ignore[attr-defined]
    assert (offer.unsent, offer.last_seq, offer.stream) == (None, None, None)


def test_optional_fields_at_their_default_stay_off_the_wire() -> None:
    """A store without evolutions, an ack without parked cells: read by an
    older release exactly as before the fields existed."""
    plain = StoresOffer((StoreOffer("b", "s", 1, "collaborative", TABLES),))
    _tag, body = msgpack.unpackb(encode(plain), raw=False)
    assert set(body["stores"][0]) == {"bundle", "store", "security_label", "table_type", "tables"}
    _tag, ack = msgpack.unpackb(encode(SyncAck(7, 1, 1, 0, 0)), raw=False)
    assert set(ack) == {"req", "last_seq", "applied", "conflicts", "failed"}
    assert decode(encode(SyncAck(7, 1, 1, 0, 0, parked=3))) == SyncAck(7, 1, 1, 0, 0, 3)


def test_store_offer_revisions_round_trip() -> None:
    revs = (RevisionOffer(1, "a" * 40), RevisionOffer(2, "0123456789abcdef0123456789abcdef01234567"))
    offer = StoresOffer((StoreOffer("b", "s", 1, "collaborative", TABLES, revisions=revs),))
    assert decode(encode(offer)) == offer
    _tag, body = msgpack.unpackb(encode(offer), raw=False)
    assert body["stores"][0]["revisions"] == [{"id": 1, "hash": "a" * 40}, {"id": 2, "hash": revs[1].hash}]


@pytest.mark.parametrize("revisions", [
    [{"id": 0, "hash": "a" * 40}],                                # ids start at 1
    [{"id": 1, "hash": "A" * 40}],                                # lowercase hex only
    [{"id": 1, "hash": "a" * 39}],
    [{"id": 1, "hash": "a" * 40, "sql": "DROP TABLE T"}],         # SQL never travels
    [{"id": 2, "hash": "a" * 40}, {"id": 1, "hash": "b" * 40}],   # in order
    [{"id": 1, "hash": "a" * 40}, {"id": 1, "hash": "b" * 40}],   # each once
    {"id": 1, "hash": "a" * 40},
])
def test_store_offer_refuses_bad_revisions(revisions: Any) -> None:
    tag, body = msgpack.unpackb(encode(StoresOffer((StoreOffer("b", "s", 1, "collaborative", ()),))), raw=False)
    body["stores"][0]["revisions"] = revisions
    with pytest.raises(ProtocolError):
        decode(msgpack.packb([tag, body], use_bin_type=True))


@pytest.mark.parametrize("over", [dict(unsent=-1), dict(last_seq=2**63), dict(stream=""), dict(unsent="12"), dict(last_seq=True)])
def test_store_offer_refuses_bad_lag_figures(over: dict[str, Any]) -> None:
    good = StoresOffer((StoreOffer("b", "s", 1, "collaborative", (), 0, 0, STREAM),))
    tag, body = msgpack.unpackb(encode(good), raw=False)
    body["stores"][0].update(over)
    with pytest.raises(ProtocolError):
        decode(msgpack.packb([tag, body], use_bin_type=True))
    # The other required fields stay required.
    del body["stores"][0]["tables"]
    with pytest.raises(ProtocolError):
        decode(msgpack.packb([tag, body], use_bin_type=True))


def test_own_is_on_the_wire_only_when_set() -> None:
    """A push of the whole stream reads as it did before protocol 4."""
    plain = sync_open(mode="push", table=None, where=None, since=None, stream=None)
    assert "own" not in msgpack.unpackb(encode(plain), raw=False, strict_map_key=False)[1]
    own = sync_open(mode="push", table=None, where=None, since=None, stream=None, own=True)
    assert msgpack.unpackb(encode(own), raw=False, strict_map_key=False)[1]["own"] is True
