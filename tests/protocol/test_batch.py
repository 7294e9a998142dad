"""The batch wire format (protocol/batch.py): frozen bytes, one decode, one failure mode."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pstore.errors import ProtocolError
from p2pstore.protocol import batch as wire_batch
from p2pstore.protocol.batch import Cell, OutBatch, RowChange
from p2pstore.protocol.messages import SyncBatch, decode, encode
from p2pstore.store import changes

BATCH = OutBatch(
    "single_version", 4, 9,
    (RowChange("EMPLOYEE", "NAME", "ann", 9,
               (Cell("AGE", 41, 123456789, "DEVA", 12345, "DEVB"), Cell("CODES", b"\x00\x01", 123456789, "DEVA")),
               99, "DEVB", None, None),),
    False, True, "str-1", 777, True,
)
#: What release 1 (commit 6c4dafa, store/changes.py batch_to_plain + messages.pack_values)
#: made of BATCH: peers on that release must keep reading and writing exactly this.
RELEASE1_PAYLOAD = bytes.fromhex(
    "88a46d6f6465ae73696e676c655f76657273696f6ea973696e63655f73657104a86c6173745f73657109a46d6f7265c2a466756c6cc3"
    "a673747265616da57374722d31a4726f77739196a8454d504c4f594545a44e414d45a3616e6e099296a341474529ce075bcd15a444"
    "455641cd3039a44445564296a5434f444553c4020001ce075bcd15a444455641c0c09463a444455642c0c0a8736e617073686f7492"
    "cd0309c3"
)
RELEASE1_MESSAGE = bytes.fromhex("92aa73796e635f626174636882a372657105a77061796c6f6164c4a4") + RELEASE1_PAYLOAD


def test_encoding_is_byte_for_byte_release_1() -> None:
    assert wire_batch.encode(BATCH) == RELEASE1_PAYLOAD
    assert encode(SyncBatch(5, wire_batch.encode(BATCH))) == RELEASE1_MESSAGE


def test_a_release_1_batch_decodes_to_the_same_batch() -> None:
    msg = decode(RELEASE1_MESSAGE)
    assert isinstance(msg, SyncBatch)
    assert wire_batch.decode(msg.payload) == BATCH


def test_the_store_re_exports_the_same_definitions() -> None:
    for name in ("Cell", "RowChange", "OutBatch", "batch_to_plain", "batch_from_plain", "row_to_plain",
                 "row_from_plain", "row_problem", "is_raw_text", "MAX_BATCH_ROWS", "MODES"):
        assert getattr(changes, name) is getattr(wire_batch, name)


def test_raw_text_travels_byte_exact() -> None:
    raw = b"caf\xe9".decode("utf-8", "surrogateescape")  # TEXT another program wrote in Latin-1
    b = OutBatch("collaborative", 0, 1, (RowChange("T", "", 1, 1, (Cell("v", raw, 5, "DEVA"),)),), False, True, "s")
    assert b"caf\xe9" in wire_batch.encode(b)
    assert wire_batch.decode(wire_batch.encode(b)) == b


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(), st.binary(max_size=4).map(lambda b: b.decode("utf-8", "surrogateescape")),
                          st.integers(), st.binary(max_size=4)), max_size=20))
def test_a_column_has_raw_text_when_one_of_its_values_is(column: list[object]) -> None:
    """The whole-column check (one ``isascii`` or one ``encode`` in C) says
    what asking each value says: raw text holds lone surrogates, which no
    neighbour pairs up."""
    assert wire_batch.has_raw_text(column) == any(wire_batch.is_raw_text(v) for v in column)


@pytest.mark.parametrize("payload", [
    b"", b"\xc1", b"\x90", wire_batch.pack_values({"mode": "collaborative"}),
    wire_batch.pack_values([1, 2, 3]), RELEASE1_PAYLOAD[:-3],
])
def test_decode_fails_only_with_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire_batch.decode(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_of_any_bytes_is_a_batch_or_a_protocol_error(data: bytes) -> None:
    try:
        wire_batch.decode(data)
    except ProtocolError:
        pass
    mutated = bytearray(RELEASE1_PAYLOAD)
    for i, byte in enumerate(data[:32]):
        mutated[(i * 7 + byte) % len(mutated)] = byte
    try:
        wire_batch.decode(bytes(mutated))
    except ProtocolError:
        pass


def test_grants_round_trip_and_leave_a_batch_without_them_as_it_was() -> None:
    """Protocol 5: an eager push's last batch may grant marks; a batch without
    grants is encoded exactly as before (no ``grants`` key)."""
    import dataclasses

    granted = dataclasses.replace(BATCH, grants=(wire_batch.Grant("DEVA", 123, 4), wire_batch.Grant("DEVC", 0, 0)))
    assert wire_batch.decode(wire_batch.encode(granted)).grants == granted.grants
    assert b"grants" not in wire_batch.encode(BATCH)


@pytest.mark.parametrize("grants", [
    "DEVA", [["DEVA", 1]], [["DEVA", -1, 0]], [["DEVA", 1, -2]], [["", 1, 0]], [[7, 1, 0]],
    [["DEVA", 1 << 64, 0]], [["DEVA", 1, 0]] * (wire_batch.MAX_GRANTS + 1),
])
def test_bad_grants_are_a_protocol_error(grants: object) -> None:
    plain = wire_batch.batch_to_plain(BATCH)
    plain["grants"] = grants
    with pytest.raises(ProtocolError):
        wire_batch.batch_from_plain(plain)
