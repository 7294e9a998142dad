"""The sync session's machines (protocol/sync_session.py): events in, actions out; no sockets, no store."""

from __future__ import annotations

import json
import random
from importlib import resources
from typing import Any

import pytest

from p2pstore.config import Config
from p2pstore.errors import (
    DeviceOffline,
    DeviceUntrusted,
    DiskFull,
    ProtocolError,
    SecurityLevelDenied,
    SqlError,
    StoreNotOpen,
)
from p2pstore.protocol import batch as wire_batch
from p2pstore.protocol.batch import Cell, OutBatch, RowChange
from p2pstore.protocol.messages import (
    MAX_PAYLOAD,
    MAX_REASON_LEN,
    SyncAck,
    SyncBatch,
    SyncEnd,
    SyncOpen,
    SyncReady,
    decode,
    encode,
)
from p2pstore.protocol.sync_session import (
    DEFAULT_WINDOW,
    MAX_WINDOW,
    MIN_WINDOW,
    RESULT_CODES,
    MAX_RESUMES,
    Acked,
    Apply,
    Code,
    Drained,
    Finish,
    Prepare,
    Problem,
    ReadBatch,
    Ready,
    Receiver,
    RecordAck,
    Send,
    Sender,
    SessionEnded,
    State,
    end_message,
    ended,
    result_code,
)

REQ = 77
STREAM = "s-A"
OPEN = SyncOpen(REQ, "b", "s", "push", None, None, None, ())


def batch(since: int, last: int, *, more: bool, full: bool = True, rows: int | None = None,
          snapshot: int | None = None) -> OutBatch:
    n = last - since if rows is None else rows
    changes = tuple(RowChange("T", "", since + i + 1, since + i + 1, (Cell("v", i, 10 + i, "DEVA"),)) for i in range(n))
    return OutBatch("collaborative", since, last, changes, more, full, STREAM, snapshot, snapshot is not None and since == 0)


def ack(last_seq: int, applied: int = 0) -> SyncAck:
    return SyncAck(REQ, last_seq, applied, 0, 0)


def sent(actions: list[Any]) -> list[Any]:
    return [a.message for a in actions if isinstance(a, Send)]


def finish(actions: list[Any]) -> Finish:
    assert isinstance(actions[-1], Finish), actions
    return actions[-1]


def streaming_sender(window: int = 2) -> tuple[Sender, list[Any]]:
    s = Sender(REQ, window=window)
    assert s.start(OPEN) == [Send(OPEN)]
    assert s.receive(SyncReady(REQ, 0, (), STREAM)) == [Prepare(SyncReady(REQ, 0, (), STREAM))]
    return s, s.begin(0)


# --------------------------------------------------------------------------
# The one table of result codes


def test_result_code_numbers_never_change() -> None:
    assert {c.name: int(c) for c in Code} == {
        "SUCCESS": 0, "FAIL": 1, "OFFLINE": 2, "INVALID_ARGS": 3, "DISTRIBUTED_TABLE_NOT_SET": 4,
        "TABLE_FIELD_MISMATCH": 5, "DISTRIBUTED_SCHEMA_MISMATCH": 6, "BUSY": 7, "CORRUPTED": 8, "TIMEOUT": 9,
        "SCHEMA_CHANGED": 10, "CONSTRAINT_VIOLATION": 11, "UNTRUSTED": 12, "SECURITY_LEVEL": 13,
        "RESYNC_REQUIRED": 14, "DISK_FULL": 15, "RESTORE_PENDING": 16, "EVOLUTION_INCONSISTENT": 17, "REPLICA_MISMATCH": 18, "IN_CONFLICT": 19,
    }


def test_the_engine_re_exports_the_same_objects() -> None:
    from p2pstore.protocol import sync_session
    from p2pstore.sync import engine

    for name in ("Code", "SessionEnded", "Stats", "code_name"):
        assert getattr(engine, name) is getattr(sync_session, name)
    assert engine.session_code is result_code


def test_every_problem_has_a_code_in_the_table() -> None:
    assert set(Problem) <= set(RESULT_CODES)
    for problem in Problem:
        end = ended(problem, "why")
        assert end.code == RESULT_CODES[problem] and end.message == "why"
        assert end.channel_lost == (problem is Problem.CHANNEL_CLOSED)


@pytest.mark.parametrize(("exc", "code"), [
    (StoreNotOpen("x"), Code.DISTRIBUTED_TABLE_NOT_SET),
    (ProtocolError("x"), Code.CORRUPTED),
    (DiskFull("x"), Code.DISK_FULL),
    (SecurityLevelDenied("x"), Code.SECURITY_LEVEL),
    (DeviceOffline("x"), Code.OFFLINE),
    (DeviceUntrusted("x"), Code.UNTRUSTED),
    (SqlError("x"), Code.FAIL),
    (ValueError("x"), Code.FAIL),
    (SessionEnded(Code.RESYNC_REQUIRED, "x"), Code.RESYNC_REQUIRED),
    (SessionEnded(42, "a code of a later release"), 42),
])
def test_result_code_of_an_error(exc: BaseException, code: int) -> None:
    assert result_code(exc) == code


def test_end_message_tells_the_peer_unless_it_decided_or_the_channel_is_gone() -> None:
    assert end_message(REQ, SessionEnded(Code.FAIL, "x", from_peer=True)) is None
    assert end_message(REQ, ended(Problem.CHANNEL_CLOSED, "gone")) is None
    assert end_message(REQ, SessionEnded(Code.OFFLINE, "offline")) is None
    msg = end_message(REQ, SessionEnded(Code.DISK_FULL, "é" * 5000))
    assert msg is not None and msg.code == Code.DISK_FULL and len(msg.message) == MAX_REASON_LEN
    assert decode(encode(msg)) == msg
    assert end_message(REQ, SessionEnded(Code.FAIL, "raw \udcff text")).message == "raw ? text"


def test_window_option_agrees_with_the_machine() -> None:
    schema = json.loads(resources.files("p2pstore.schemas").joinpath("config.schema.json").read_text())
    rule = schema["properties"]["sync_window"]
    assert (rule["minimum"], rule["maximum"]) == (MIN_WINDOW, MAX_WINDOW)
    assert Config().sync_window == DEFAULT_WINDOW
    for bad in (0, MAX_WINDOW + 1):
        with pytest.raises(ValueError, match="window"):
            Sender(REQ, window=bad)


# --------------------------------------------------------------------------
# Sender


def test_sender_push_every_transition() -> None:
    s, actions = streaming_sender(window=2)
    assert actions == [ReadBatch(0)] and s.state is State.STREAMING
    b1, b2, b3 = batch(0, 3, more=True), batch(3, 6, more=True), batch(6, 8, more=False)
    actions = s.batch_read(b1)
    assert sent(actions) == [SyncBatch(REQ, wire_batch.encode(b1))] and actions[-1] == ReadBatch(3)
    actions = s.batch_read(b2)
    assert sent(actions) == [SyncBatch(REQ, wire_batch.encode(b2))] and not any(isinstance(a, ReadBatch) for a in actions)
    assert len(s.unacked) == 2  # window full: nothing read until an ack
    actions = s.receive(ack(3, 3))
    assert actions == [Acked(b1, ack(3, 3), (3, STREAM)), ReadBatch(6)]
    actions = s.batch_read(b3)
    assert s.state is State.DRAINING and sent(actions) == [SyncBatch(REQ, wire_batch.encode(b3))]
    assert s.receive(ack(6, 3)) == [Acked(b2, ack(6, 3), (6, STREAM))]
    actions = s.receive(ack(8, 2))
    assert actions[:3] == [Acked(b3, ack(8, 2), (8, STREAM)), RecordAck(8, STREAM), Send(SyncEnd(REQ, 0, ""))]
    assert finish(actions).code == Code.SUCCESS and s.done
    assert (s.stats.sent, s.stats.applied, s.stats.batches, s.stats.tables) == (8, 8, 3, {"T": 8})
    assert s.receive(ack(9)) == [] and s.timed_out(1) == [] and s.channel_closed("x") == []  # DONE ignores all


@pytest.mark.parametrize("window", [1, 2, 4, 64])
@pytest.mark.parametrize("seed", range(4))
def test_sender_never_has_more_than_window_unacked_and_fills_it(window: int, seed: int) -> None:
    """A receiver that acks at random moments (odd seeds) or only when the
    sender has nothing left to do (even seeds, a slow receiver): the window
    bounds what is in flight, and the slow receiver sees it full."""
    rng = random.Random(seed)
    s, actions = streaming_sender(window=window)
    total, in_flight, acked, peak = 300, [], 0, 0
    todo = list(actions)
    for _ in range(10_000):  # bounded
        if s.done:
            break
        if todo:
            action = todo.pop(0)
            if isinstance(action, ReadBatch):
                last = action.since + 1
                todo += s.batch_read(batch(action.since, last, more=last < total))
            elif isinstance(action, Send) and isinstance(action.message, SyncBatch):
                in_flight.append(wire_batch.decode(action.message.payload).last_seq)
            peak = max(peak, len(s.unacked))
            assert len(s.unacked) <= window
            if seed % 2 == 0 or rng.random() < 0.7:
                continue
        if in_flight:
            todo += s.receive(ack(in_flight.pop(0)))
            acked += 1
    assert s.done and s.end is not None and s.end.code == Code.SUCCESS
    assert acked == total and s.watermark == (total, STREAM)
    assert peak == window if seed % 2 == 0 else peak <= window


def test_sender_stops_reading_once_the_batches_in_flight_hold_the_byte_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the window, what is unacked holds at most about
    ``MAX_UNACKED_BYTES`` (large rows go ~4 MiB a batch): the sender asks
    for no batch past the bound, and an ack makes room again."""
    from p2pstore.protocol import sync_session

    one = len(wire_batch.encode(batch(0, 3, more=True)))
    monkeypatch.setattr(sync_session, "MAX_UNACKED_BYTES", 2 * one)
    s, actions = streaming_sender(window=64)
    assert actions == [ReadBatch(0)]
    assert s.batch_read(batch(0, 3, more=True))[-1] == ReadBatch(3)
    actions = s.batch_read(batch(3, 6, more=True))
    assert not any(isinstance(a, ReadBatch) for a in actions) and len(s.unacked) == 2  # 2 × one bytes out
    assert s.receive(ack(3))[-1] == ReadBatch(6)  # room again


def test_sender_asks_for_one_batch_at_a_time_even_when_acks_arrive_while_it_reads() -> None:
    s, actions = streaming_sender(window=4)
    assert actions == [ReadBatch(0)]
    b1 = batch(0, 2, more=True)
    actions = s.batch_read(b1)
    assert actions[-1] == ReadBatch(2)
    # the ack of b1 arrives while b2 is being read: no second read is asked for
    assert s.receive(ack(2)) == [Acked(b1, ack(2), (2, STREAM))]
    assert s.batch_read(batch(2, 4, more=True))[-1] == ReadBatch(4)
    one, _ = streaming_sender(window=1)
    assert not any(isinstance(a, ReadBatch) for a in one.batch_read(batch(0, 2, more=True)))  # window full
    with pytest.raises(ProtocolError):
        one.batch_read(batch(2, 4, more=True))  # nobody asked for it


def test_sender_out_of_order_or_extra_ack_ends_the_session_and_records_nothing_beyond() -> None:
    s, _ = streaming_sender(window=4)
    b1 = batch(0, 2, more=True)
    s.batch_read(b1)
    s.batch_read(batch(2, 4, more=False))
    s.receive(ack(2))
    actions = s.receive(ack(4))
    assert RecordAck(4, STREAM) in actions and finish(actions).code == Code.SUCCESS
    s2, _ = streaming_sender(window=4)
    s2.batch_read(batch(0, 2, more=True))
    s2.receive(ack(2))
    actions = s2.receive(ack(9))  # an ack for a batch that was never sent
    end = finish(actions).end
    assert end.code == Code.FAIL and "not sent" in end.message
    assert not any(isinstance(a, RecordAck) for a in actions) and s2.watermark == (2, STREAM)


def test_sender_watermark_moves_only_with_whole_stream_batches() -> None:
    s, _ = streaming_sender()
    s.batch_read(batch(0, 3, more=False, full=False))  # a table or query sync
    actions = s.receive(ack(0, 3))
    assert actions[0] == Acked(batch(0, 3, more=False, full=False), ack(0, 3), None)
    assert not any(isinstance(a, RecordAck) for a in actions) and finish(actions).code == Code.SUCCESS


def test_sender_resync_moves_the_watermark_only_at_its_last_batch() -> None:
    s, _ = streaming_sender(window=4)
    b1, b2 = batch(0, 0, more=True, rows=2, snapshot=5), batch(0, 9, more=False, rows=1, snapshot=5)
    s.always_send = True
    s.batch_read(b1)
    s.batch_read(b2)
    assert s.receive(ack(0))[0].watermark is None
    actions = s.receive(ack(9))
    assert actions[0].watermark == (9, STREAM) and RecordAck(9, STREAM) in actions


def test_sender_sends_an_empty_batch_only_first_when_it_moves_or_always() -> None:
    s, _ = streaming_sender(window=4)
    assert len(sent(s.batch_read(batch(0, 0, more=True)))) == 1  # the first, even empty
    assert sent(s.batch_read(batch(0, 0, more=True))) == []  # empty and not moving: not sent
    assert len(sent(s.batch_read(batch(0, 5, more=True, rows=0)))) == 1  # empty but moves the position
    r = Sender(REQ)
    r.begin(0, always_send=True)
    r.batch_read(batch(0, 0, more=True, snapshot=3))
    assert len(sent(r.batch_read(batch(0, 0, more=True, snapshot=3)))) == 1


def test_sender_refuses_a_change_too_big_for_a_message() -> None:
    s, _ = streaming_sender()
    huge = OutBatch("collaborative", 0, 1, (RowChange("Photos", "", 1, 1, (Cell("img", b"x" * (MAX_PAYLOAD + 1), 1, "DEVA"),)),),
                    False, True, STREAM)
    actions = s.batch_read(huge)
    assert sent(actions) == [] and finish(actions).code == Code.FAIL
    assert "table Photos" in finish(actions).end.message and str(MAX_PAYLOAD) in finish(actions).end.message


@pytest.mark.parametrize("msg", [SyncBatch(REQ, b"\x90"), ack(1), SyncOpen(REQ, "b", "s", "pull", None, None, 0, ())])
def test_sender_unexpected_message_before_ready_is_fail(msg: Any) -> None:
    s = Sender(REQ)
    s.start(OPEN)
    end = finish(s.receive(msg)).end
    assert end.code == Code.FAIL and "expected ready" in end.message and s.done


@pytest.mark.parametrize("msg", [SyncBatch(REQ, b"\x90"), SyncReady(REQ, 0, ())])
def test_sender_unexpected_message_while_streaming_is_fail(msg: Any) -> None:
    s, _ = streaming_sender()
    end = finish(s.receive(msg)).end
    assert end.code == Code.FAIL and "expected an ack" in end.message


def test_sender_peer_end_timeout_and_channel_close() -> None:
    s, _ = streaming_sender()
    end = finish(s.receive(SyncEnd(REQ, int(Code.DISK_FULL), "disk full"))).end
    assert (end.code, end.message, end.from_peer) == (Code.DISK_FULL, "disk full", True)
    s, _ = streaming_sender()
    end = finish(s.timed_out(30)).end
    assert end.code == Code.TIMEOUT and "30 s" in end.message
    s, _ = streaming_sender()
    end = finish(s.channel_closed("closed")).end
    assert end.code == Code.OFFLINE and end.channel_lost and end_message(REQ, end) is None
    s, _ = streaming_sender()
    assert finish(s.abort(ended(Problem.PEER_TOO_FAR_AHEAD, "flood"))).code == Code.FAIL


def test_sender_calls_out_of_turn_are_the_callers_bug() -> None:
    s = Sender(REQ)
    with pytest.raises(ProtocolError):
        s.batch_read(batch(0, 1, more=False))
    s.begin(0)
    with pytest.raises(ProtocolError):
        s.begin(0)


def lingering_sender() -> Sender:
    s = Sender(REQ, window=2, linger=True)
    s.start(OPEN)
    s.receive(SyncReady(REQ, 0, (), STREAM))
    assert s.begin(0) == [ReadBatch(0)]
    return s


def test_a_lingering_sender_reads_on_in_the_same_session_while_changes_come() -> None:
    s = lingering_sender()
    b1 = batch(0, 3, more=False)
    s.batch_read(b1)
    actions = s.receive(ack(3, 3))
    assert actions == [Acked(b1, ack(3, 3), (3, STREAM)), RecordAck(3, STREAM), Drained()]
    assert s.state is State.DRAINED and not s.done and sent(actions) == []
    assert s.resume() == [ReadBatch(3)] and s.state is State.STREAMING
    b2 = batch(3, 5, more=False)
    assert sent(s.batch_read(b2)) == [SyncBatch(REQ, wire_batch.encode(b2))]
    assert s.receive(ack(5, 2))[-1] == Drained()
    # Nothing new came: the session ends as an ordinary one does.
    actions = s.stop()
    assert sent(actions) == [SyncEnd(REQ, 0, "")] and finish(actions).code == Code.SUCCESS and s.done
    assert (s.stats.sent, s.stats.batches) == (5, 2)


def test_a_lingering_sender_sends_no_empty_batch_and_stops_after_max_resumes() -> None:
    s = lingering_sender()
    s.batch_read(batch(0, 1, more=False))
    assert s.receive(ack(1))[-1] == Drained()
    for _ in range(MAX_RESUMES - 1):
        assert s.resume() == [ReadBatch(1)]
        actions = s.batch_read(batch(1, 1, more=False, rows=0))  # the change was already sent: nothing moves
        assert sent(actions) == [] and actions == [Drained()]
    s.resume()
    actions = s.batch_read(batch(1, 1, more=False, rows=0))
    assert sent(actions) == [SyncEnd(REQ, 0, "")] and s.done, "the session ends after MAX_RESUMES, lingering or not"
    assert s.resume() == [] and s.stop() == []  # DONE ignores all


def test_an_ordinary_sender_never_lingers_and_out_of_turn_calls_are_the_callers_bug() -> None:
    s, _ = streaming_sender()
    with pytest.raises(ProtocolError):
        s.resume()
    with pytest.raises(ProtocolError):
        s.stop()
    s.batch_read(batch(0, 2, more=False))
    actions = s.receive(ack(2))
    assert not any(isinstance(a, Drained) for a in actions) and s.done


# --------------------------------------------------------------------------
# Receiver


def payload(b: OutBatch) -> SyncBatch:
    return SyncBatch(REQ, wire_batch.encode(b))


def test_receiver_every_transition() -> None:
    r = Receiver(REQ)
    ready = SyncReady(REQ, 0, (), STREAM)
    assert r.start(ready) == [Send(ready)] and r.state is State.STREAMING
    b1 = batch(0, 3, more=False)
    assert r.receive(payload(b1)) == [Apply(b1)]
    assert r.applied(3, 3, 0, 0) == [Send(SyncAck(REQ, 3, 3, 0, 0))]
    assert r.watermark == 3
    assert finish(r.receive(SyncEnd(REQ, 0, ""))).code == Code.SUCCESS and r.done
    assert (r.stats.sent, r.stats.applied) == (3, 3)


def test_receiver_watermark_is_exactly_the_last_applied_batch_when_a_window_arrives_at_once() -> None:
    """A sender's whole window (and its end) arrives before the first batch
    is applied: batches apply one at a time, in order; each ack goes out only
    once its batch committed, carrying that batch's watermark; an
    out-of-turn completion is refused and moves nothing."""
    r = Receiver(REQ)
    r.start()
    batches = [batch(i * 10, i * 10 + 10, more=i < 3) for i in range(4)]
    actions = [a for b in batches for a in r.receive(payload(b))]
    assert actions == [Apply(batches[0])]
    assert r.receive(SyncEnd(REQ, 0, "")) == []  # after the pending batches, not before
    for i, b in enumerate(batches):
        assert r.applying == b
        actions = r.applied(b.last_seq, 10, 0, 0)
        assert r.watermark == b.last_seq
        assert actions[0] == Send(SyncAck(REQ, b.last_seq, 10, 0, 0))
        if i < 3:
            assert actions[1:] == [Apply(batches[i + 1])]
            with pytest.raises(ProtocolError):
                Receiver(REQ).applied(99, 1, 0, 0)
    assert finish(actions).code == Code.SUCCESS
    assert r.watermark == 40 and r.stats.batches == 4


def test_receiver_group_commit_takes_the_waiting_batches_and_acks_each_in_order() -> None:
    """``take_waiting``: batches that came while one is applied join it (one
    transaction); each is still acked on its own, in order, with its own
    watermark, and the session goes on after the group as before."""
    r = Receiver(REQ)
    r.start()
    batches = [batch(i * 10, i * 10 + 10, more=i < 4) for i in range(5)]
    assert [a for b in batches for a in r.receive(payload(b))] == [Apply(batches[0])]
    assert r.receive(SyncEnd(REQ, 0, "")) == []
    taken = r.take_waiting(2)
    assert [b for b, _ in taken] == batches[1:3]
    assert [size for _, size in taken] == [len(payload(b).payload) for b in batches[1:3]]
    assert r.take_waiting(0) == []
    acks = []
    for b in batches[:3]:
        actions = r.applied(b.last_seq, 10, 0, 0)
        acks.append(actions[0])
        assert r.watermark == b.last_seq
        if b is not batches[2]:
            assert actions[1:] == []  # the group's next batch is being applied: nothing new starts
    assert acks == [Send(SyncAck(REQ, b.last_seq, 10, 0, 0)) for b in batches[:3]]
    assert actions[1:] == [Apply(batches[3])]  # the rest as before
    assert r.take_waiting(5) == [(batches[4], len(payload(batches[4]).payload))]  # never the end
    r.applied(40, 10, 0, 0)
    assert finish(r.applied(50, 10, 0, 0)).code == Code.SUCCESS
    assert r.watermark == 50 and r.stats.batches == 5


def test_receiver_group_commit_leaves_a_batch_that_does_not_decode_for_its_turn() -> None:
    r = Receiver(REQ)
    r.start()
    good = batch(0, 5, more=True)
    r.receive(payload(good))
    r.receive(SyncBatch(REQ, b"\xc1 not msgpack"))
    assert r.take_waiting(3) == []
    actions = r.applied(5, 5, 0, 0)
    assert actions[0] == Send(SyncAck(REQ, 5, 5, 0, 0))
    assert finish(actions).end.code == Code.CORRUPTED
    assert r.watermark == 5


def test_receiver_decodes_a_batch_as_it_arrives(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that arrives while another is applied is decoded at once (the
    engine hands it over meanwhile, so its decode overlaps that apply), and
    never again in its turn; one that fails to decode still ends the session
    in its turn only, after the batches before it."""
    decoded: list[bytes] = []
    real = wire_batch.decode

    def spy(data: bytes) -> OutBatch:
        decoded.append(data)
        return real(data)

    monkeypatch.setattr(wire_batch, "decode", spy)
    r = Receiver(REQ)
    r.start()
    first, second = batch(0, 5, more=True), batch(5, 9, more=True)
    assert r.receive(payload(first)) == [Apply(first)]
    assert r.receive(payload(second)) == [] and decoded == [payload(first).payload, payload(second).payload]
    assert r.receive(SyncBatch(REQ, b"\xc1 not msgpack")) == [] and len(decoded) == 3  # (not the end yet)
    actions = r.applied(5, 5, 0, 0)
    assert actions == [Send(SyncAck(REQ, 5, 5, 0, 0)), Apply(second)] and len(decoded) == 3
    actions = r.applied(9, 4, 0, 0)
    assert actions[0] == Send(SyncAck(REQ, 9, 4, 0, 0))
    assert finish(actions).end.code == Code.CORRUPTED and r.watermark == 9


def test_receiver_out_of_turn_completion_does_not_move_the_watermark() -> None:
    r = Receiver(REQ)
    r.start()
    r.receive(payload(batch(0, 5, more=True)))
    r.applied(5, 5, 0, 0)
    with pytest.raises(ProtocolError):
        r.applied(9, 4, 0, 0)  # no batch is being applied
    assert r.watermark == 5 and r.stats.batches == 1


def test_receiver_undecodable_batch_is_corrupted() -> None:
    r = Receiver(REQ)
    r.start()
    end = finish(r.receive(SyncBatch(REQ, b"\xc1 not msgpack"))).end
    assert end.code == Code.CORRUPTED and "batch" in end.message
    r = Receiver(REQ)
    r.start()
    plain = wire_batch.batch_to_plain(batch(0, 1, more=False))
    plain["mode"] = "nonsense"
    assert finish(r.receive(SyncBatch(REQ, wire_batch.pack_values(plain)))).code == Code.CORRUPTED


@pytest.mark.parametrize("msg", [ack(1), SyncReady(REQ, 0, ()), OPEN])
def test_receiver_unexpected_message_is_fail(msg: Any) -> None:
    r = Receiver(REQ)
    r.start()
    end = finish(r.receive(msg)).end
    assert end.code == Code.FAIL and "expected a batch" in end.message


def test_receiver_cuts_off_a_peer_further_ahead_than_any_window() -> None:
    r = Receiver(REQ)
    r.start()
    b = payload(batch(0, 1, more=True))
    for _ in range(MAX_WINDOW + 1):  # one applying, MAX_WINDOW waiting
        r.receive(b)
    assert not r.done
    end = finish(r.receive(b)).end
    assert end.code == Code.FAIL and str(MAX_WINDOW) in end.message


def test_receiver_peer_error_end_stops_at_once() -> None:
    r = Receiver(REQ)
    r.start()
    r.receive(payload(batch(0, 1, more=True)))
    r.receive(payload(batch(1, 2, more=True)))
    end = finish(r.receive(SyncEnd(REQ, int(Code.FAIL), "reader broke"))).end
    assert end.from_peer and end.code == Code.FAIL and r.applied(1, 1, 0, 0) == []


def test_receiver_of_a_catch_up_waits_for_ready() -> None:
    r = Receiver(REQ, await_ready=True)
    opening = SyncOpen(REQ, "b", "s", "catchup", None, None, None, ())
    assert r.start(opening) == [Send(opening)] and r.state is State.AWAIT_READY
    assert finish(Receiver(REQ, await_ready=True).receive(payload(batch(0, 1, more=False)))).code == Code.FAIL
    ready = SyncReady(REQ, 4, (), STREAM)
    assert r.receive(ready) == [Ready(ready)]
    b = batch(0, 1, more=False)
    assert r.receive(payload(b)) == [Apply(b)]
    r2 = Receiver(REQ, await_ready=True)
    r2.start(opening)
    assert finish(r2.receive(SyncEnd(REQ, int(Code.RESTORE_PENDING), "no"))).end.from_peer


# --------------------------------------------------------------------------
# Both sides together, with a crash


class FakeStore:
    """A receiver's store: batch and watermark commit together (as store/merge.py)."""

    def __init__(self) -> None:
        self.watermark = 0
        self.applied: list[int] = []

    def apply(self, b: OutBatch) -> int:
        if b.full and b.since_seq <= self.watermark < b.last_seq:
            self.applied += [r.seq for r in b.rows if r.seq > self.watermark]
            self.watermark = b.last_seq
        return self.watermark


def run_session(store: FakeStore, total: int, window: int, rng: random.Random, crash_after: int | None) -> bool:
    """One push of seqs 1..total in batches of 7 over an in-memory channel
    with random delivery; stops dead (both sides lost) after ``crash_after``
    receiver steps. True if it finished with SUCCESS."""
    s, r = Sender(REQ, window=window), Receiver(REQ)
    s_todo = s.start(OPEN)
    r_todo = r.start()
    to_r: list[Any] = []
    to_s: list[Any] = []
    steps = 0
    for _ in range(100_000):  # bounded
        if s.done and r.done:
            break
        choice = rng.randrange(4)
        if choice == 0 and s_todo:
            a = s_todo.pop(0)
            if isinstance(a, Send):
                to_r.append(a.message)
            elif isinstance(a, Prepare):
                s_todo += s.begin(a.ready.since)
            elif isinstance(a, ReadBatch):
                last = min(a.since + 7, total)
                s_todo += s.batch_read(batch(a.since, last, more=last < total))
        elif choice == 1 and r_todo:
            a = r_todo.pop(0)
            if isinstance(a, Send):
                to_s.append(a.message)
            elif isinstance(a, Apply):
                steps += 1
                if crash_after is not None and steps > crash_after:
                    return False  # kill -9: the apply did not commit, nothing after it happens
                wm = store.apply(a.batch)
                r_todo += r.applied(wm, len(a.batch.rows), 0, 0)
        elif choice == 2 and to_r:
            msg = to_r.pop(0)
            if isinstance(msg, SyncOpen):
                to_s.append(SyncReady(REQ, store.watermark, (), STREAM))
            else:
                r_todo += r.receive(msg)
        elif choice == 3 and to_s:
            s_todo += s.receive(to_s.pop(0))
    return s.end is not None and s.end.code == Code.SUCCESS and r.end is not None and r.end.code == Code.SUCCESS


@pytest.mark.parametrize("window", [1, 4, 64])
@pytest.mark.parametrize("seed", range(5))
def test_a_crash_mid_push_resends_from_the_committed_watermark_and_never_duplicates(window: int, seed: int) -> None:
    rng = random.Random(seed * 100 + window)
    store, total = FakeStore(), 200
    assert not run_session(store, total, window, rng, crash_after=rng.randrange(1, 25))
    committed = store.watermark
    assert store.applied == list(range(1, committed + 1))
    assert run_session(store, total, window, rng, crash_after=None)
    assert store.applied == list(range(1, total + 1))  # every seq exactly once
    assert store.watermark == total
