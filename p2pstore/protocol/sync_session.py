"""One sync session's rules, sans I/O: a ``Sender`` and a ``Receiver`` state machine.

A session moves one store's change stream from a *sender* to a *receiver*
(the message flow is the comment above ``SyncOpen`` in protocol/messages.py).
Each side of a session is one of these machines, fed with events — a
message received, a batch read, a batch applied, a timeout, the channel
closed — and answering with the actions the caller (sync/engine.py) carries
out: send this message, read the next batch from this seq, apply this
batch, record this ack, finish with this code. The caller owns the channel,
the store, the timers; the machine owns the order of things and the codes.

Invariants:

- **Bounded window.** A sender has at most ``window`` batches unacked
  (``DEFAULT_WINDOW``, 1..``MAX_WINDOW``, the ``sync_window`` option), and
  asks for another only while those hold less than ``MAX_UNACKED_BYTES``:
  so reading batch n+1 overlaps the receiver applying batch n, and memory
  stays bounded whatever the size of the sync.
- **Acks come in order and move the watermark.** A receiver applies its
  batches in the order they came, each with its watermark in the
  transaction that applies it (store/merge.py; several waiting batches may
  share one: ``take_waiting``), and acks each when — and only when — it is
  committed; its ``watermark`` is the store's answer for the last applied
  batch. A sender pairs each ack with its oldest unacked batch; an ack with
  no batch in flight ends the session. A sender's ``watermark`` is the last
  ack of a whole-stream batch, and is recorded once, at the successful end
  (``RecordAck``); a session that breaks records nothing, and the next one
  resends from the receiver's committed watermark: a re-sent change is a
  no-op, never a duplicate.
- **A lingering sender goes on.** With ``linger`` (auto-sync pushes), a
  sender whose every batch is acked records the ack and asks its caller
  (``Drained``) whether changes came meanwhile: if so (``resume``) it reads
  on from where it stopped, in the same session, instead of ending and
  opening another — at most ``MAX_RESUMES`` times, then it ends.
- **Nothing a peer sends raises out of a machine.** An unexpected message, a
  batch that does not decode, a peer that runs more than ``MAX_WINDOW``
  batches ahead: each is a ``Finish`` with its code, never an exception.
  (Calling a machine out of turn — ``batch_read`` without a ``ReadBatch``
  asked for — is the caller's bug, and raises ``ProtocolError``.)
- **One table of result codes.** ``RESULT_CODES`` maps every reason a session
  can end — an error raised by the store or the network, or a ``Problem`` a
  side finds — to its SyncResultCode (SPEC §2, docs/sync.md). ``ended`` and
  ``result_code`` are the only ways in.
- After ``Finish`` a machine is DONE and ignores every further event.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from p2pstore.errors import (
    DeviceOffline,
    DeviceUntrusted,
    DiskFull,
    EvolutionInconsistent,
    InConflict,
    ProtocolError,
    ReplicaMismatch,
    SecurityLevelDenied,
    StoreNotOpen,
)
from p2pstore.protocol import batch as wire_batch
from p2pstore.protocol.batch import OutBatch
from p2pstore.protocol.messages import (
    MAX_PAYLOAD,
    MAX_REASON_LEN,
    Message,
    OriginMark,
    SyncAck,
    SyncBatch,
    SyncEnd,
    SyncReady,
)

#: Batches a sender may have unacked, by default and at most (``sync_window``).
#: 32: a receiver applies the batches waiting for it in one transaction (a
#: group commit, up to 16), and it finds 16 waiting only if the sender is
#: that far ahead (docs/performance.md, round 6).
DEFAULT_WINDOW = 32
MIN_WINDOW, MAX_WINDOW = 1, 64
#: Payload bytes a sender may have unacked, whatever its window: large rows
#: go up to ~4 MiB a batch, and both sides hold what is in flight.
MAX_UNACKED_BYTES = 16 * 1024 * 1024
#: Times a lingering sender reads on after draining, before it ends its session anyway
#: (so one session does not hold its sync slot for ever under constant writes).
MAX_RESUMES = 64


class Code(enum.IntEnum):
    """Per-device sync result codes (HarmonyOS SyncResultCode + ours); the numbers never change."""

    SUCCESS = 0
    FAIL = 1
    OFFLINE = 2
    INVALID_ARGS = 3
    DISTRIBUTED_TABLE_NOT_SET = 4
    TABLE_FIELD_MISMATCH = 5
    DISTRIBUTED_SCHEMA_MISMATCH = 6
    BUSY = 7
    CORRUPTED = 8
    TIMEOUT = 9
    SCHEMA_CHANGED = 10
    CONSTRAINT_VIOLATION = 11
    UNTRUSTED = 12
    SECURITY_LEVEL = 13
    #: The device is behind deletes the other side has forgotten (store/gc.py):
    #: only a full sync from that side, which resyncs it, can go on.
    RESYNC_REQUIRED = 14
    #: The receiver's disk is full: nothing of the batch applied, its watermark unchanged.
    DISK_FULL = 15
    #: The store was restored from a backup and has not caught up from a peer
    #: yet (store/restore.py): it sends nothing of its own until it has.
    RESTORE_PENDING = 16
    #: A schema evolution of the store failed half-way (store/evolutions.py):
    #: it neither sends nor receives until the script is fixed or resolved.
    EVOLUTION_INCONSISTENT = 17
    #: The replica kinds of the two ends forbid rows to move this way
    #: (protocol/replica_kind.py): nothing was sent.
    REPLICA_MISMATCH = 18
    #: The sending store has conflicts queued for a person to reconcile
    #: (store/policies.py): it receives, but sends nothing until they are resolved.
    IN_CONFLICT = 19


def code_name(code: int) -> str:
    """A sync result code's name (a peer may send one this release does not know)."""
    try:
        return Code(code).name
    except ValueError:
        return f"CODE_{code}"


class Problem(enum.Enum):
    """Why a side ends a session when no error was raised: the keys of
    ``RESULT_CODES`` besides exception types."""

    UNEXPECTED_MESSAGE = "the peer sent a message out of turn"
    PEER_TOO_FAR_AHEAD = "the peer ran more batches ahead than any window allows"
    CHANGE_TOO_BIG = "one row change does not fit in a message"
    INTERNAL = "an unexpected error in this daemon"
    NO_ANSWER = "no answer from the peer in time"
    CHANNEL_CLOSED = "the connection closed or the peer went offline"
    NOT_TRUSTED = "the device is not trusted"
    TABLE_NOT_DISTRIBUTED = "a table of the sync is not distributed on one side"
    SCHEMA_MISMATCH = "the two sides' tables can't sync"
    BAD_ROW_FILTER = "the row filter (where) is not valid"
    BEHIND_FORGOTTEN_DELETES = "the device is behind deletes the other side has forgotten"
    RESTORE_PENDING = "the store was restored from a backup and has not caught up"
    BACKUP_CATCH_UP_FAILED = "the catch-up of a restored store could not run"


#: The one table from what ended a session to its result code: an exception
#: type (matched with isinstance, in order) or a ``Problem``. Anything else is FAIL.
RESULT_CODES: dict[type[BaseException] | Problem, Code] = {
    StoreNotOpen: Code.DISTRIBUTED_TABLE_NOT_SET,
    ProtocolError: Code.CORRUPTED,
    DiskFull: Code.DISK_FULL,
    EvolutionInconsistent: Code.EVOLUTION_INCONSISTENT,
    ReplicaMismatch: Code.REPLICA_MISMATCH,
    InConflict: Code.IN_CONFLICT,
    SecurityLevelDenied: Code.SECURITY_LEVEL,
    DeviceOffline: Code.OFFLINE,
    DeviceUntrusted: Code.UNTRUSTED,
    Problem.UNEXPECTED_MESSAGE: Code.FAIL,
    Problem.PEER_TOO_FAR_AHEAD: Code.FAIL,
    Problem.CHANGE_TOO_BIG: Code.FAIL,
    Problem.INTERNAL: Code.FAIL,
    Problem.NO_ANSWER: Code.TIMEOUT,
    Problem.CHANNEL_CLOSED: Code.OFFLINE,
    Problem.NOT_TRUSTED: Code.UNTRUSTED,
    Problem.TABLE_NOT_DISTRIBUTED: Code.DISTRIBUTED_TABLE_NOT_SET,
    Problem.SCHEMA_MISMATCH: Code.DISTRIBUTED_SCHEMA_MISMATCH,
    Problem.BAD_ROW_FILTER: Code.INVALID_ARGS,
    Problem.BEHIND_FORGOTTEN_DELETES: Code.RESYNC_REQUIRED,
    Problem.RESTORE_PENDING: Code.RESTORE_PENDING,
    Problem.BACKUP_CATCH_UP_FAILED: Code.RESTORE_PENDING,
}


class SessionEnded(Exception):
    """A session stopped with a result code (ours or the peer's)."""

    def __init__(self, code: Code | int, message: str, *, from_peer: bool = False, channel_lost: bool = False) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.from_peer = from_peer
        #: The session's channel closed (offline, or replaced by a duplicate's survivor).
        self.channel_lost = channel_lost


def ended(problem: Problem, message: str) -> SessionEnded:
    """The ending of a session for ``problem``, with its code from the table."""
    return SessionEnded(RESULT_CODES[problem], message, channel_lost=problem is Problem.CHANNEL_CLOSED)


def result_code(exc: BaseException) -> int:
    """The result code of a session that ended by raising ``exc``."""
    if isinstance(exc, SessionEnded):
        return exc.code
    for kind, code in RESULT_CODES.items():
        if isinstance(kind, type) and isinstance(exc, kind):
            return int(code)
    return int(Code.FAIL)


def end_message(req: int, end: SessionEnded) -> SyncEnd | None:
    """What tells the peer that the session ended (None: nothing can or need be told).

    An ending the peer decided needs no answer, and one caused by the channel
    closing can't be sent; any other is told, so the peer stops too.
    """
    if end.from_peer or end.channel_lost or end.code == Code.OFFLINE:
        return None
    text = end.message[:MAX_REASON_LEN].encode("utf-8", "replace").decode()
    return SyncEnd(req, end.code, text)


# --------------------------------------------------------------------------
# What a session moved


@dataclass
class Stats:
    """What one session moved, for results and syncProgress (the same on both sides)."""

    sent: int = 0
    applied: int = 0
    conflicts: int = 0
    failed: int = 0
    #: Row changes kept for columns the receiver lacks (docs/evolutions.md): applied later, not failures.
    parked: int = 0
    batches: int = 0
    tables: dict[str, int] = field(default_factory=dict)

    def outcome(self) -> str:
        """What the receiver made of the rows, in words (results, logs, the sync log)."""
        text = f"{self.applied} applied, {self.conflicts} conflict(s), {self.failed} failed"
        return text + f", {self.parked} parked" if self.parked else text

    def add(self, batch: OutBatch, applied: int, conflicts: int, failed: int, parked: int = 0) -> None:
        """Count one acked batch."""
        self.sent += batch.count
        self.applied += applied
        self.conflicts += conflicts
        self.failed += failed
        self.parked += parked
        self.batches += 1
        for table, n in batch.tables().items():
            self.tables[table] = self.tables.get(table, 0) + n


# --------------------------------------------------------------------------
# Actions: what the caller does for a machine


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` on the session's channel."""

    message: Message


@dataclass(frozen=True, slots=True)
class Prepare:
    """(Sender of a push.) The receiver is ready: check its tables, find where
    to start (``since``, ``stream`` are its watermark), then call ``begin``."""

    ready: SyncReady


@dataclass(frozen=True, slots=True)
class Ready:
    """(Receiver of a catch-up.) The sender is ready; batches follow."""

    ready: SyncReady


@dataclass(frozen=True, slots=True)
class ReadBatch:
    """(Sender.) Read the batch after ``since``, then call ``batch_read``."""

    since: int


@dataclass(frozen=True, slots=True)
class Acked:
    """(Sender.) The receiver applied ``batch``; ``watermark`` is its new
    watermark as (seq, stream) if this ack moved it, else None."""

    batch: OutBatch
    ack: SyncAck
    watermark: tuple[int, str] | None


@dataclass(frozen=True, slots=True)
class RecordAck:
    """(Sender.) Record the receiver's last acked watermark (store/gc.py), before the end."""

    seq: int
    stream: str


@dataclass(frozen=True, slots=True)
class Drained:
    """(Lingering sender.) Every batch is acked and recorded: call ``resume``
    if changes came meanwhile, else ``stop``."""


@dataclass(frozen=True, slots=True)
class Apply:
    """(Receiver.) Apply ``batch`` with the watermark in one transaction, then
    call ``applied``. ``size``: the bytes it took on the wire (for traffic counts)."""

    batch: OutBatch
    size: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Finish:
    """The session is over: SUCCESS, or the ending to raise (and tell the peer, ``end_message``)."""

    end: SessionEnded

    @property
    def code(self) -> int:
        return self.end.code


Action = Send | Prepare | Ready | ReadBatch | Acked | RecordAck | Drained | Apply | Finish


class State(enum.Enum):
    AWAIT_READY = "await ready"      # our SyncOpen went out; the peer's SyncReady comes next
    PREPARING = "preparing"          # sender: the caller checks tables and finds the start
    STREAMING = "streaming"          # batches move
    DRAINING = "draining"            # sender: the last batch went out; acks still due
    DRAINED = "drained"              # lingering sender: all acked; the caller says resume or end
    DONE = "done"


def _success() -> Finish:
    return Finish(SessionEnded(Code.SUCCESS, ""))


def _unexpected(expected: str, msg: Message) -> Finish:
    return Finish(ended(Problem.UNEXPECTED_MESSAGE, f"expected {expected}, got {type(msg).__name__}"))


class _Machine:
    def __init__(self, req: int) -> None:
        self.req = req
        self.state = State.STREAMING
        self.stats = Stats()
        #: The ending, once there is one.
        self.end: SessionEnded | None = None

    def _finish(self, finish: Finish) -> list[Action]:
        self.state = State.DONE
        self.end = finish.end
        return [finish]

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    def timed_out(self, seconds: float) -> list[Action]:
        """Nothing came from the peer for ``seconds`` while we waited for it."""
        if self.done:
            return []
        return self._finish(Finish(ended(Problem.NO_ANSWER, f"no answer from the peer in {seconds:g} s")))

    def channel_closed(self, reason: str) -> list[Action]:
        """The session's channel closed (the peer went offline, or the channel was replaced)."""
        if self.done:
            return []
        return self._finish(Finish(ended(Problem.CHANNEL_CLOSED, reason)))

    def abort(self, end: SessionEnded) -> list[Action]:
        """End the session for a reason the caller found (its code already chosen)."""
        if self.done:
            return []
        return self._finish(Finish(end))

    def _peer_ended(self, msg: SyncEnd) -> list[Action]:
        return self._finish(Finish(SessionEnded(msg.code, msg.message or "ended by the peer", from_peer=True)))


class Sender(_Machine):
    """The side that reads its store's stream and sends it in batches;
    ``window``: batches unacked at most."""

    def __init__(self, req: int, *, window: int = DEFAULT_WINDOW, linger: bool = False) -> None:
        super().__init__(req)
        if not MIN_WINDOW <= window <= MAX_WINDOW:
            raise ValueError(f"window must be {MIN_WINDOW}..{MAX_WINDOW}, got {window}")
        self.window = window
        self.linger = linger
        self.resumes = 0
        self._recorded: tuple[int, str] | None = None
        self.always_send = False
        self.state = State.PREPARING
        self.unacked: deque[OutBatch] = deque()
        self._unacked_sizes: deque[int] = deque()  # their payloads' bytes
        #: The receiver's watermark as its last ack of a whole-stream batch said, as (seq, stream).
        self.watermark: tuple[int, str] | None = None
        self._since = 0
        self._first = True
        self._reading = False

    # -- events ------------------------------------------------------------

    def start(self, opening: Message | None = None) -> list[Action]:
        """A push opener's ``SyncOpen`` goes out and the receiver's ready is
        awaited; without ``opening`` the caller prepares and calls ``begin``."""
        if opening is None:
            return []
        self.state = State.AWAIT_READY
        return [Send(opening)]

    def begin(self, since: int, *, always_send: bool = False) -> list[Action]:
        """Start sending after ``since`` (checks done, start position known).

        ``always_send``: send every batch read, even an empty one (a resync
        or a catch-up copy, whose receiver acts on each); otherwise an empty
        batch goes only first or when it moves the stream position.
        """
        if self.state is not State.PREPARING:
            raise ProtocolError(f"begin() in state {self.state.value}")
        self.state = State.STREAMING
        self.always_send = always_send
        self._since = since
        return self._read()

    def batch_read(self, batch: OutBatch) -> list[Action]:
        """The batch a ``ReadBatch`` asked for."""
        if self.done:
            return []
        if not self._reading:
            raise ProtocolError("batch_read() without a ReadBatch")
        self._reading = False
        actions: list[Action] = []
        if batch.count or batch.last_seq > self._since or self._first or self.always_send:
            payload = wire_batch.encode(batch)
            if len(payload) > MAX_PAYLOAD:  # one row, alone in its batch, and too big
                table, key = batch.first_change()
                return self._finish(Finish(ended(
                    Problem.CHANGE_TOO_BIG, f"a change of table {table} (key {key!r:.40}) is {len(payload)} "
                                            f"bytes; a sync message carries at most {MAX_PAYLOAD}")))
            actions.append(Send(SyncBatch(self.req, payload)))
            self.unacked.append(batch)
            self._unacked_sizes.append(len(payload))
        self._first = False
        self._since = batch.last_seq
        if not batch.more:
            self.state = State.DRAINING
            return actions + self._drained()
        return actions + self._read()

    def receive(self, msg: Message) -> list[Action]:
        """A message of this session from the peer."""
        if self.done:
            return []
        if isinstance(msg, SyncEnd):
            return self._peer_ended(msg)
        if self.state is State.AWAIT_READY:
            if not isinstance(msg, SyncReady):
                return self._finish(_unexpected("ready", msg))
            self.state = State.PREPARING
            return [Prepare(msg)]
        if not isinstance(msg, SyncAck):
            return self._finish(_unexpected("an ack", msg))
        if not self.unacked:
            return self._finish(Finish(ended(Problem.UNEXPECTED_MESSAGE, "the peer acked a batch that was not sent")))
        batch = self.unacked.popleft()
        self._unacked_sizes.popleft()
        moved = None
        if batch.full and (batch.snapshot_hlc is None or not batch.more):
            moved = self.watermark = (msg.last_seq, batch.stream)
        self.stats.add(batch, msg.applied, msg.conflicts, msg.failed, msg.parked)
        actions: list[Action] = [Acked(batch, msg, moved)]
        if self.state is State.DRAINING:
            return actions + self._drained()
        return actions + self._read()

    # -- helpers -------------------------------------------------------------

    def _read(self) -> list[Action]:
        """Ask for the next batch if the window has room and none is being read."""
        if (self.state is not State.STREAMING or self._reading or len(self.unacked) >= self.window
                or sum(self._unacked_sizes) >= MAX_UNACKED_BYTES):
            return []
        self._reading = True
        return [ReadBatch(self._since)]

    def resume(self) -> list[Action]:
        """(After ``Drained``.) Changes came meanwhile: read on in this session."""
        if self.done:
            return []
        if self.state is not State.DRAINED:
            raise ProtocolError(f"resume() in state {self.state.value}")
        self.resumes += 1
        self.state = State.STREAMING
        return self._read()

    def stop(self) -> list[Action]:
        """(After ``Drained``.) Nothing new: the session ends, successfully."""
        if self.done:
            return []
        if self.state is not State.DRAINED:
            raise ProtocolError(f"stop() in state {self.state.value}")
        return [Send(SyncEnd(self.req, int(Code.SUCCESS), ""))] + self._finish(_success())

    def _drained(self) -> list[Action]:
        if self.unacked:
            return []
        actions: list[Action] = []
        if self.watermark is not None and self.watermark != self._recorded:
            actions.append(RecordAck(*self.watermark))
            self._recorded = self.watermark
        self.state = State.DRAINED
        if self.linger and self.resumes < MAX_RESUMES:
            return actions + [Drained()]
        return actions + self.stop()


class Receiver(_Machine):
    """The side that applies the peer's batches, in order, and acks each.

    Messages that arrive while a batch is being applied wait in the machine
    (at most ``MAX_WINDOW`` batches: no sender may have more in flight). A
    batch is decoded as it arrives: a driver that hands the machine what
    arrives while it applies a batch (sync/engine.py) decodes the next
    batches meanwhile, instead of after. One that fails to decode waits in
    its turn like any other, and ends the session there.
    ``await_ready``: the opener of a catch-up waits for the sender's ready.
    """

    def __init__(self, req: int, *, await_ready: bool = False) -> None:
        super().__init__(req)
        self.await_ready = await_ready
        if await_ready:
            self.state = State.AWAIT_READY
        self.pending: deque[_Arrived | SyncEnd] = deque()
        self.applying: OutBatch | None = None
        #: Batches taken to apply with ``applying`` in one transaction (``take_waiting``), in order.
        self.grouped: deque[OutBatch] = deque()
        #: The receiver's watermark for the sender after the last applied batch (the store's answer).
        self.watermark: int | None = None

    def start(self, opening: Message | None = None) -> list[Action]:
        """Our first message (SyncOpen of a pull or catch-up, SyncReady of a push's receiver)."""
        return [] if opening is None else [Send(opening)]

    def receive(self, msg: Message) -> list[Action]:
        """A message of this session from the peer."""
        if self.done:
            return []
        if self.state is State.AWAIT_READY:
            if isinstance(msg, SyncEnd):
                return self._peer_ended(msg)
            if not isinstance(msg, SyncReady):
                return self._finish(_unexpected("ready", msg))
            self.state = State.STREAMING
            return [Ready(msg)]
        if isinstance(msg, SyncEnd) and msg.code != Code.SUCCESS:
            return self._peer_ended(msg)  # batches still waiting are not applied: the next session resends them
        if not isinstance(msg, (SyncBatch, SyncEnd)):
            return self._finish(_unexpected("a batch", msg))
        if sum(isinstance(m, _Arrived) for m in self.pending) >= MAX_WINDOW:
            return self._finish(Finish(ended(Problem.PEER_TOO_FAR_AHEAD,
                                             f"the peer sent more than {MAX_WINDOW} batches ahead of their acks")))
        self.pending.append(_Arrived.of(msg) if isinstance(msg, SyncBatch) else msg)
        return self._next()

    def applied(self, last_seq: int, applied: int, conflicts: int, failed: int, parked: int = 0,
                have: tuple[OriginMark, ...] = ()) -> list[Action]:
        """The batch of the last ``Apply`` committed; ``last_seq`` is the
        watermark the store now holds, ``have`` its origin marks now."""
        if self.done:
            return []
        if self.applying is None:
            raise ProtocolError("applied() without an Apply")
        batch, self.applying = self.applying, (self.grouped.popleft() if self.grouped else None)
        self.watermark = last_seq
        self.stats.add(batch, applied, conflicts, failed, parked)
        return [Send(SyncAck(self.req, last_seq, applied, conflicts, failed, parked, have)), *self._next()]

    def take_waiting(self, limit: int) -> list[tuple[OutBatch, int]]:
        """While an ``Apply`` is carried out: up to ``limit`` batches that
        arrived meanwhile, decoded, with their wire sizes, to apply in the
        same transaction (a group commit: one commit for several batches).
        ``applied`` is then called once per batch, the ``Apply``'s first, in
        order; each ack goes out as before. A batch that fails to decode is
        left waiting: it ends the session in its turn."""
        taken: list[tuple[OutBatch, int]] = []
        while self.applying is not None and len(taken) < limit and self.pending:
            arrived = self.pending[0]
            if not isinstance(arrived, _Arrived) or arrived.batch is None:
                break
            self.pending.popleft()
            self.grouped.append(arrived.batch)
            taken.append((arrived.batch, arrived.size))
        return taken

    def _next(self) -> list[Action]:
        """Start on the oldest waiting message unless a batch is being applied."""
        if self.applying is not None or not self.pending:
            return []
        arrived = self.pending.popleft()
        if isinstance(arrived, SyncEnd):
            return self._finish(_success())
        if arrived.batch is None:
            assert arrived.error is not None
            return self._finish(Finish(SessionEnded(result_code(arrived.error), str(arrived.error))))
        self.applying = arrived.batch
        return [Apply(arrived.batch, arrived.size)]


@dataclass(frozen=True, slots=True)
class _Arrived:
    """A batch as it arrived (``Receiver.receive``): decoded, or why it can't be."""

    size: int
    batch: OutBatch | None
    error: ProtocolError | None = None

    @classmethod
    def of(cls, msg: SyncBatch) -> _Arrived:
        try:
            return cls(len(msg.payload), wire_batch.decode(msg.payload))
        except ProtocolError as exc:
            return cls(len(msg.payload), None, exc)
