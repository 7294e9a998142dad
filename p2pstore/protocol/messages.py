"""Messages between devices: frozen dataclasses, encoded with msgpack.

Invariants:

- A message object that exists is valid: every message (and every nested
  struct such as ``StoreOffer``) checks its fields against its type hints and
  its own rules in ``__post_init__``. So ``decode`` is "unpack, convert,
  construct", and a peer cannot smuggle in anything the constructor would
  refuse.
- ``decode`` has exactly one failure mode: ``ProtocolError``. Garbage,
  truncated or hostile bytes, wrong types, unknown type tags, missing or
  extra fields all end there (a hypothesis test checks this). Only fields a
  struct lists in ``OPTIONAL_ON_WIRE`` (added later, with a default) may be
  missing; such a field at its default is left off the wire.
- Wire form of a message: the msgpack array ``[type_tag, {field: value}]``.
  Nested structs are maps with exactly their fields; tuples are arrays.
- msgpack settings keep SQLite values exact: ``bytes`` travel as bin and
  ``str`` as str (``use_bin_type=True`` / ``raw=False``), integers keep full
  64-bit range, map keys must be strings, ext types are refused, and every
  length is capped by the frame it arrived in.

Adding a message type: write a ``@register`` + ``@dataclass(frozen=True,
slots=True)`` class deriving from ``Message`` with a unique ``TYPE`` tag and
type-hinted fields; put extra rules in ``_validate``. Field types understood:
``int``, ``float``, ``str``, ``bytes``, ``bool``, ``None``, unions of those,
``tuple[T, ...]`` and nested ``Struct`` subclasses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgpack

from p2pstore.errors import ProtocolError
from p2pstore.protocol.framing import MAX_FRAME_SIZE
from p2pstore.protocol.replica_kind import ReplicaKind
from p2pstore.protocol.table_type import TableType

#: Integers must fit msgpack's 64-bit encodings (signed or unsigned).
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
#: Caps for human-readable text fields; they keep logs and UIs sane.
MAX_NAME_LEN = 255
MAX_REASON_LEN = 1024
MAX_DEVICE_ID_LEN = 64
TABLE_TYPES = frozenset(TableType)
REPLICA_KINDS = frozenset(k.value for k in ReplicaKind)
SECURITY_LEVELS = range(1, 5)


class Struct:
    """Base of everything that travels: type-checked, then ``_validate``d."""

    __slots__ = ()
    #: Fields an older sender leaves out (they have defaults); every other field is required.
    OPTIONAL_ON_WIRE: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        for name, hint in _field_hints(type(self)):
            _check(getattr(self, name), hint, f"{type(self).__name__}.{name}")
        self._validate()

    def _validate(self) -> None:
        """Rules beyond the type hints; subclasses raise ``ProtocolError``."""


class Message(Struct):
    """A top-level message; ``TYPE`` is its tag on the wire."""

    __slots__ = ()
    TYPE: ClassVar[str]


_REGISTRY: dict[str, type[Message]] = {}
M = TypeVar("M", bound=type[Message])


def register(cls: M) -> M:
    """Make ``cls`` decodable under its ``TYPE`` tag (tags are unique)."""
    tag = cls.TYPE
    if tag in _REGISTRY:
        raise ValueError(f"message type tag {tag!r} is already used by {_REGISTRY[tag].__name__}")
    _REGISTRY[tag] = cls
    return cls


def message_types() -> dict[str, type[Message]]:
    """The registry, tag → class (a copy)."""
    return dict(_REGISTRY)


# --------------------------------------------------------------------------
# Messages


def _text(value: str, what: str, *, max_len: int = MAX_NAME_LEN, empty: bool = False) -> None:
    if not empty and not value:
        raise ProtocolError(f"{what} must not be empty")
    if len(value) > max_len:
        raise ProtocolError(f"{what} is {len(value)} characters long; the limit is {max_len}")


def _nonce(value: int) -> None:
    if not 0 <= value <= INT_MAX:
        raise ProtocolError("nonce must be an unsigned 64-bit integer")


def _level(value: int, what: str) -> None:
    if value not in SECURITY_LEVELS:
        raise ProtocolError(f"{what} must be 1..4 (S1..S4), got {value}")


@dataclass(frozen=True, slots=True)
class TableOffer(Struct):
    """One distributed table of a store, as the sending device has it."""

    name: str
    schema_version: int | None
    sync_columns: tuple[str, ...]
    conflict_column: str | None
    #: The table's conflict policy (store/policies.py), canonical JSON; absent: lww. Added later.
    OPTIONAL_ON_WIRE: ClassVar[frozenset[str]] = frozenset({"policy"})
    policy: str | None = None

    def _validate(self) -> None:
        _text(self.name, "table name")
        if self.schema_version is not None and self.schema_version < 0:
            raise ProtocolError(f"table {self.name}: schema_version must be >= 0")
        for column in self.sync_columns:
            _text(column, f"table {self.name}: sync column name")
        if len(set(self.sync_columns)) != len(self.sync_columns):
            raise ProtocolError(f"table {self.name}: sync columns repeat")
        if self.conflict_column is not None:
            _text(self.conflict_column, f"table {self.name}: conflict column name")
        if self.policy is not None:
            _text(self.policy, f"table {self.name}: policy", max_len=MAX_NAME_LEN)


@dataclass(frozen=True, slots=True)
class RevisionOffer(Struct):
    """One applied schema evolution of a store (store/evolutions.py): its
    number and hash, never its SQL — peers compare, they never run each other's scripts."""

    id: int
    hash: str

    def _validate(self) -> None:
        if not 1 <= self.id <= INT_MAX:
            raise ProtocolError(f"revision id must be >= 1, got {self.id}")
        if len(self.hash) != 40 or not all(c in "0123456789abcdef" for c in self.hash):
            raise ProtocolError(f"revision {self.id}: hash must be 40 lowercase hex digits")


@dataclass(frozen=True, slots=True)
class OriginMark(Struct):
    """What a receiver already holds of one origin's changes: every change
    that ``device`` wrote with an hlc up to ``hlc`` (or a newer state of its
    row). A sender leaves out rows whose every clock is so covered
    (store/stream.py ``covered``): in a fleet, most of what a device's
    stream holds was relayed, and its peers had it from the writer."""

    device: str
    hlc: int

    def _validate(self) -> None:
        _text(self.device, "origin device", max_len=MAX_DEVICE_ID_LEN)
        if not 0 <= self.hlc <= INT_MAX:
            raise ProtocolError("origin mark: hlc must be an unsigned 64-bit integer")


#: Most origin marks one session opening carries (one per device of a fleet).
MAX_ORIGIN_MARKS = 4096


def _marks(marks: tuple[OriginMark, ...]) -> None:
    if len(marks) > MAX_ORIGIN_MARKS:
        raise ProtocolError(f"have: {len(marks)} origin marks; the limit is {MAX_ORIGIN_MARKS}")
    if len({m.device for m in marks}) != len(marks):
        raise ProtocolError("have: a device is listed twice")


@dataclass(frozen=True, slots=True)
class StoreOffer(Struct):
    """A store with distributed tables that the sending device can sync."""

    bundle: str
    store: str
    security_label: int
    table_type: str
    tables: tuple[TableOffer, ...]
    #: Lag figures for the device the offer goes to (docs/sync.md, "Lag"):
    #: the rows of this store's stream it has not been sent yet, and the
    #: stream position (``last_seq`` in ``stream``) that count runs up to.
    #: Optional: absent (an older sender) reads as None, "unknown".
    #: ``revisions``: the store's applied evolutions, oldest first (absent: none).
    OPTIONAL_ON_WIRE: ClassVar[frozenset[str]] = frozenset({"unsent", "last_seq", "stream", "revisions"})
    unsent: int | None = None
    last_seq: int | None = None
    stream: str | None = None
    revisions: tuple[RevisionOffer, ...] = ()

    def _validate(self) -> None:
        _text(self.bundle, "bundle name")
        _text(self.store, "store name")
        _level(self.security_label, f"store {self.bundle}/{self.store}: security_label")
        if self.unsent is not None:
            _seq(self.unsent, f"store {self.bundle}/{self.store}: unsent")
        if self.last_seq is not None:
            _seq(self.last_seq, f"store {self.bundle}/{self.store}: last_seq")
        _stream(self.stream)
        ids = [r.id for r in self.revisions]
        if ids != sorted(set(ids)):
            raise ProtocolError(f"store {self.bundle}/{self.store}: revisions must be in increasing order, each once")
        if self.table_type not in TABLE_TYPES:
            raise ProtocolError(
                f"store {self.bundle}/{self.store}: table_type must be one of "
                f"{sorted(TABLE_TYPES)}, got {self.table_type!r}"
            )
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ProtocolError(f"store {self.bundle}/{self.store}: a table is listed twice")


@register
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message each side sends once the peer is authenticated and trusted."""

    TYPE: ClassVar[str] = "hello"
    protocol_version: int
    device_id: str
    name: str
    security_level: int
    stores: tuple[StoreOffer, ...]

    def _validate(self) -> None:
        if self.protocol_version < 1:
            raise ProtocolError(f"protocol_version must be >= 1, got {self.protocol_version}")
        _text(self.device_id, "device_id", max_len=MAX_DEVICE_ID_LEN)
        if not (self.device_id.isascii() and self.device_id.isprintable()):
            raise ProtocolError("device_id must be printable ASCII")
        _text(self.name, "device name", empty=True)
        _level(self.security_level, "security_level")
        keys = [(s.bundle, s.store) for s in self.stores]
        if len(set(keys)) != len(keys):
            raise ProtocolError("a store is offered twice")


@register
@dataclass(frozen=True, slots=True)
class HelloReject(Message):
    """Answer to a HELLO this device can't accept; the connection ends after it."""

    TYPE: ClassVar[str] = "hello_reject"
    reason: str

    def _validate(self) -> None:
        _text(self.reason, "reason", max_len=MAX_REASON_LEN, empty=True)


@register
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Keepalive probe; the receiver answers with a ``Pong`` of the same nonce."""

    TYPE: ClassVar[str] = "ping"
    nonce: int

    def _validate(self) -> None:
        _nonce(self.nonce)


@register
@dataclass(frozen=True, slots=True)
class Pong(Message):
    """Keepalive answer."""

    TYPE: ClassVar[str] = "pong"
    nonce: int

    def _validate(self) -> None:
        _nonce(self.nonce)


@register
@dataclass(frozen=True, slots=True)
class Close(Message):
    """Orderly goodbye with a reason the peer logs; nothing follows it."""

    TYPE: ClassVar[str] = "close"
    reason: str

    def _validate(self) -> None:
        _text(self.reason, "reason", max_len=MAX_REASON_LEN, empty=True)


@register
@dataclass(frozen=True, slots=True)
class StoresOffer(Message):
    """The stores and distributed tables a device can sync.

    Sent by each side once the channel is online — that is, after both HELLOs,
    so the peer has shown it trusts us too. HELLO itself carries no stores, so
    a device that trusts us but is not trusted back learns no store names.
    """

    TYPE: ClassVar[str] = "stores_offer"
    stores: tuple[StoreOffer, ...]

    def _validate(self) -> None:
        keys = [(s.bundle, s.store) for s in self.stores]
        if len(set(keys)) != len(keys):
            raise ProtocolError("a store is offered twice")


# --------------------------------------------------------------------------
# Sync sessions
#
# A session moves one store's changes from a *sender* to a *receiver*. The
# receiver owns the watermark (the highest seq of the sender's stream it has
# applied) and moves it in the same transaction as the batch it covers.
#
#   push (opener sends):     opener -> SyncOpen(push)   receiver -> SyncReady(since, tables)
#                            opener -> SyncBatch ...    receiver -> SyncAck ...      opener -> SyncEnd
#   pull (opener receives):  opener -> SyncOpen(pull, since, tables)
#                            sender -> SyncBatch ...    opener   -> SyncAck ...      sender -> SyncEnd
#
# Seqs are positions in the sender store's change stream, named by its stream
# ID: a watermark is (stream, seq), and a sender asked for a stream it no
# longer has (its store was recreated or restored) starts from 0.
#
# Either side may end a session early with SyncEnd(code != 0); codes are the
# SyncResultCode values of SPEC §2. ``req`` is a random id chosen by the
# opener, unique on the channel.

#: ``catchup``: the opener was restored from a backup and asks for the
#: receiver's copy of its own rows (store/restore.py); flows like a pull.
SYNC_MODES = frozenset({"push", "pull", "catchup"})
#: Largest JSON text of a query-sync row filter.
MAX_WHERE_LEN = 64 * 1024


def _req(value: int) -> None:
    if not 0 < value <= INT_MAX:
        raise ProtocolError("req must be a positive 64-bit integer")


def _seq(value: int, what: str) -> None:
    if not 0 <= value < 2**63:
        raise ProtocolError(f"{what} must be a sequence number >= 0")


def _stream(value: str | None) -> None:
    if value is not None:
        _text(value, "stream")


@register
@dataclass(frozen=True, slots=True)
class SyncOpen(Message):
    """Start a session on one store; for a pull (the opener receives) ``since``
    and ``stream`` are the opener's watermark for the sender's store."""

    TYPE: ClassVar[str] = "sync_open"
    req: int
    bundle: str
    store: str
    mode: str
    table: str | None
    where: str | None
    since: int | None
    tables: tuple[TableOffer, ...]
    stream: str | None = None
    #: The opener's replica kind for the other device (protocol/replica_kind.py); added later.
    #: ``have``: a pull's opener (the receiver) says what it holds per origin (``OriginMark``); added later.
    #: ``own`` (protocol 4): a push of the sender's own changes only (docs/sync.md, "Auto-sync in a
    #: fleet"): the receiver answers with where it holds all of them (its *eager position*), and
    #: batches that leave out changes the sender relayed do not move its watermark.
    OPTIONAL_ON_WIRE: ClassVar[frozenset[str]] = frozenset({"replica", "have", "own"})
    replica: str = ReplicaKind.TWO_WAY.value
    have: tuple[OriginMark, ...] = ()
    own: bool = False

    def _validate(self) -> None:
        _req(self.req)
        _text(self.bundle, "bundle name")
        _text(self.store, "store name")
        _marks(self.have)
        if self.replica not in REPLICA_KINDS:
            raise ProtocolError(f"replica must be one of {sorted(REPLICA_KINDS)}, got {self.replica!r:.40}")
        if self.mode not in SYNC_MODES:
            raise ProtocolError(f"mode must be push, pull or catchup, got {self.mode!r:.40}")
        if self.table is not None:
            _text(self.table, "table name")
        if self.where is not None:
            _text(self.where, "where", max_len=MAX_WHERE_LEN)
        if self.mode == "pull" and self.since is None:
            raise ProtocolError("a pull must say since which seq it needs changes")
        if type(self.own) is not bool:
            raise ProtocolError(f"own must be true or false, got {self.own!r:.40}")
        if self.own and (self.mode != "push" or self.table is not None or self.where is not None):
            raise ProtocolError("only a push of the whole store (no table, no where) can carry own changes only")
        if self.since is not None:
            _seq(self.since, "since")
        _stream(self.stream)


@register
@dataclass(frozen=True, slots=True)
class SyncReady(Message):
    """The receiver of a push accepts: its watermark for the sender (``since``
    in the sender's ``stream``) and its distributed tables."""

    TYPE: ClassVar[str] = "sync_ready"
    req: int
    since: int
    tables: tuple[TableOffer, ...]
    stream: str | None = None
    #: What the receiver holds per origin (``OriginMark``); added later: absent, nothing is left out.
    OPTIONAL_ON_WIRE: ClassVar[frozenset[str]] = frozenset({"have"})
    have: tuple[OriginMark, ...] = ()

    def _validate(self) -> None:
        _req(self.req)
        _seq(self.since, "since")
        _stream(self.stream)
        _marks(self.have)


@register
@dataclass(frozen=True, slots=True)
class SyncBatch(Message):
    """One bounded slice of the sender's change stream (msgpack of store.changes' plain form)."""

    TYPE: ClassVar[str] = "sync_batch"
    req: int
    payload: bytes

    def _validate(self) -> None:
        _req(self.req)


@register
@dataclass(frozen=True, slots=True)
class SyncAck(Message):
    """The receiver applied a batch (in one transaction with its watermark)."""

    TYPE: ClassVar[str] = "sync_ack"
    req: int
    last_seq: int
    applied: int
    conflicts: int
    failed: int
    #: Row changes kept for columns the receiver lacks (added later: absent reads as 0).
    #: ``have``: the receiver's origin marks after this batch (protocol 3; absent: unchanged),
    #: so a long session leaves out what the receiver got meanwhile from elsewhere.
    OPTIONAL_ON_WIRE: ClassVar[frozenset[str]] = frozenset({"parked", "have"})
    parked: int = 0
    have: tuple[OriginMark, ...] = ()

    def _validate(self) -> None:
        _req(self.req)
        _seq(self.last_seq, "last_seq")
        for name in ("applied", "conflicts", "failed", "parked"):
            _seq(getattr(self, name), name)
        _marks(self.have)


@register
@dataclass(frozen=True, slots=True)
class SyncEnd(Message):
    """The session is over: ``code`` 0 success, else a SyncResultCode with a reason."""

    TYPE: ClassVar[str] = "sync_end"
    req: int
    code: int
    message: str

    def _validate(self) -> None:
        _req(self.req)
        if not 0 <= self.code <= 99:
            raise ProtocolError("code must be 0..99")
        _text(self.message, "message", max_len=MAX_REASON_LEN, empty=True)


# --------------------------------------------------------------------------
# Remote query
#
#   asker -> QueryRequest   answerer -> QueryPage ... (last=True)   or   QueryError
#
# The answerer compiles the predicates itself against the columns it syncs
# (never SQL from a peer) and checks trust and the security-level rule.
# Pages are bounded in bytes (PAGE_BYTES); the asker acknowledges each page
# with QueryMore before the next is read, so neither side buffers a whole
# large result in flight.

#: Target size of one page of remote query results (encoded rows).
PAGE_BYTES = 4 * 1024 * 1024
#: Largest bytes field (a sync batch, a query page) one message can carry:
#: a frame, less room for the message around it.
MAX_PAYLOAD = MAX_FRAME_SIZE - 64 * 1024
#: Largest JSON text of remote query predicates.
MAX_PREDICATES_LEN = 256 * 1024


@register
@dataclass(frozen=True, slots=True)
class QueryRequest(Message):
    """Run a structured query on the answerer's copy of ``table``."""

    TYPE: ClassVar[str] = "query_request"
    req: int
    bundle: str
    store: str
    table: str
    columns: tuple[str, ...]
    predicates: str  # JSON object: where, order_by, limit, offset (SPEC §5)

    def _validate(self) -> None:
        _req(self.req)
        _text(self.bundle, "bundle name")
        _text(self.store, "store name")
        _text(self.table, "table name")
        for column in self.columns:
            _text(column, "column name")
        _text(self.predicates, "predicates", max_len=MAX_PREDICATES_LEN)


@register
@dataclass(frozen=True, slots=True)
class QueryPage(Message):
    """One page of results; ``rows`` is msgpack of a list of row lists."""

    TYPE: ClassVar[str] = "query_page"
    req: int
    columns: tuple[str, ...]
    rows: bytes
    last: bool

    def _validate(self) -> None:
        _req(self.req)


@register
@dataclass(frozen=True, slots=True)
class QueryMore(Message):
    """The asker took a page and wants the next one."""

    TYPE: ClassVar[str] = "query_more"
    req: int

    def _validate(self) -> None:
        _req(self.req)


@register
@dataclass(frozen=True, slots=True)
class QueryError(Message):
    """The query was refused or failed; ``name`` is a p2pstore error name."""

    TYPE: ClassVar[str] = "query_error"
    req: int
    name: str
    message: str

    def _validate(self) -> None:
        _req(self.req)
        _text(self.name, "error name", max_len=64)
        _text(self.message, "message", max_len=MAX_REASON_LEN, empty=True)


# --------------------------------------------------------------------------
# Encoding


def encode(msg: Message) -> bytes:
    """The msgpack payload of ``msg`` (frame it with ``encode_frame``)."""
    if not isinstance(msg, Message) or type(msg).TYPE not in _REGISTRY:
        raise ProtocolError(f"not a registered message: {msg!r}")
    return msgpack.packb([msg.TYPE, _struct_to_wire(msg)], use_bin_type=True)


def pack_values(obj: Any) -> bytes:
    """Rows of SQLite values (a change batch, a query page) -> msgpack.

    TEXT that is not valid UTF-8 (another program wrote it; the stores read
    it as a str with lone surrogates, ``surrogateescape``) travels as a
    msgpack str holding exactly its bytes: the receiver stores the same
    bytes, still TEXT. Message fields never hold such text (``encode``).
    """
    return msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogateescape")


def unpack(payload: bytes, what: str = "message", *, raw_text: bool = False) -> Any:
    """msgpack bytes from a peer (or stored from one) -> plain values.

    The one place untrusted msgpack is read: str and bin kept apart, string
    map keys only, no ext types, every length capped by the payload itself
    (and the frame limit). Any defect is a ``ProtocolError`` naming ``what``.
    ``raw_text`` (payloads of ``pack_values``): a str that is not valid UTF-8
    becomes a str with lone surrogates, as the stores read such TEXT; the
    caller checks that names and keys are not such text.
    """
    limit = min(len(payload), MAX_FRAME_SIZE)
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            unicode_errors="surrogateescape" if raw_text else "strict",
            use_list=True,
            strict_map_key=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=0,
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable {what}: {exc}") from exc


def decode(payload: bytes) -> Message:
    """Parse one frame payload; any defect raises ``ProtocolError``."""
    obj = unpack(payload)
    if not (isinstance(obj, list) and len(obj) == 2):
        raise ProtocolError("a message must be a [type, fields] pair")
    tag, body = obj
    cls = _REGISTRY.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {tag!r:.80}")
    return typing.cast(Message, _struct_from_wire(body, cls, cls.TYPE))


def peek_protocol_version(payload: bytes) -> int | None:
    """``protocol_version`` of a HELLO-tagged payload, even one that fails ``decode``."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False, max_ext_len=0)
    except Exception:  # noqa: BLE001 - best effort on bytes already known to be bad
        return None
    if isinstance(obj, list) and len(obj) >= 2 and obj[0] == Hello.TYPE and isinstance(obj[1], dict):
        version = obj[1].get("protocol_version")
        if isinstance(version, int) and not isinstance(version, bool):
            return version
    return None


# --------------------------------------------------------------------------
# Generic field handling, driven by type hints


_HINTS: dict[type, tuple[tuple[str, Any], ...]] = {}
_PRIMITIVES = (bool, int, float, str, bytes, type(None))


def _field_hints(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = _HINTS.get(cls)
    if hints is None:
        resolved = typing.get_type_hints(cls)
        hints = tuple((f.name, resolved[f.name]) for f in dataclasses.fields(cls))
        _HINTS[cls] = hints
    return hints


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _check(value: Any, hint: Any, path: str) -> None:
    """Raise ``ProtocolError`` unless ``value`` has type ``hint`` (constructed form)."""
    if _is_union(hint):
        for option in typing.get_args(hint):
            try:
                _check(value, option, path)
                return
            except ProtocolError:
                continue
        raise ProtocolError(f"{path}: expected {hint}, got {type(value).__name__}")
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, tuple):
            raise ProtocolError(f"{path}: expected a tuple, got {type(value).__name__}")
        (item_hint, _ellipsis) = typing.get_args(hint)
        for i, item in enumerate(value):
            _check(item, item_hint, f"{path}[{i}]")
        return
    if hint in _PRIMITIVES:
        # bool is an int subclass; neither may stand in for the other.
        if type(value) is not hint:
            raise ProtocolError(f"{path}: expected {_describe(hint)}, got {type(value).__name__}")
        if hint is int and not INT_MIN <= value <= INT_MAX:
            raise ProtocolError(f"{path}: integer out of the 64-bit range")
        return
    if isinstance(hint, type) and issubclass(hint, Struct):
        if type(value) is not hint:
            raise ProtocolError(f"{path}: expected {hint.__name__}, got {type(value).__name__}")
        return
    raise TypeError(f"{path}: unsupported field type {hint!r}")


def _from_wire(value: Any, hint: Any, path: str) -> Any:
    """Turn unpacked msgpack data into the constructed form of ``hint``."""
    if _is_union(hint):
        for option in typing.get_args(hint):
            try:
                return _from_wire(value, option, path)
            except ProtocolError:
                continue
        raise ProtocolError(f"{path}: expected {hint}, got {type(value).__name__}")
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise ProtocolError(f"{path}: expected an array, got {type(value).__name__}")
        (item_hint, _ellipsis) = typing.get_args(hint)
        return tuple(_from_wire(item, item_hint, f"{path}[{i}]") for i, item in enumerate(value))
    if isinstance(hint, type) and issubclass(hint, Struct):
        return _struct_from_wire(value, hint, path)
    _check(value, hint, path)
    return value


def _struct_from_wire(body: Any, cls: type[Struct], path: str) -> Struct:
    if not isinstance(body, dict):
        raise ProtocolError(f"{path}: expected a map of fields, got {type(body).__name__}")
    hints = _field_hints(cls)
    expected = {name for name, _ in hints}
    if body.keys() != expected:
        # Fields added after a message was first sent may be absent (read as their default).
        missing = sorted(expected - body.keys() - cls.OPTIONAL_ON_WIRE)
        extra = sorted(str(k)[:40] for k in body.keys() - expected)
        if missing or extra:
            raise ProtocolError(f"{path}: missing fields {missing}, unexpected fields {extra}")
    kwargs = {name: _from_wire(body[name], hint, f"{path}.{name}") for name, hint in hints if name in body}
    return cls(**kwargs)


def _struct_to_wire(obj: Struct) -> dict[str, Any]:
    """Optional fields at their default stay off the wire: a release that
    predates them reads the message as it always did."""
    optional = type(obj).OPTIONAL_ON_WIRE
    wire = {}
    for name, _ in _field_hints(type(obj)):
        value = getattr(obj, name)
        if name in optional and value == _default(type(obj), name):
            continue
        wire[name] = _to_wire(value)
    return wire


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _to_wire(value: Any) -> Any:
    if isinstance(value, Struct):
        return _struct_to_wire(value)
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    return value
