"""A peer-frame fuzzer driven by the protocol's own message types (issue 10,
fault suite).

The test process plays a *trusted* device (its own identity, trusted by the
daemon) over a real TLS 1.3 channel to one real daemon (like
tests/net/peer_agent.py, but speaking frames by hand) and sends, seeded:

- a valid instance of every registered message type (``message_types()``),
  built from the type hints, so a new type is fuzzed without touching this file;
- the same, truncated, bit-flipped, with a field of the wrong type, with a
  field missing or extra, with an unknown tag;
- frames over the cap, empty frames, frame lengths that lie (longer or
  shorter than the payload), msgpack headers announcing counts and lengths
  the payload does not have;
- garbage before HELLO;
- change batches inside a real push session to a real single_version store:
  valid, mutated, with lying counts, hostile clocks (separate test below).

After each case a ``Ping`` is the barrier: the daemon either answers the
``Pong`` (it handled the case and keeps the channel) or ends the channel
*cleanly*: a ``Close`` naming the problem, then end of stream. Which of the two
is decided by our own ``decode``: bytes it refuses must close the channel,
a message it accepts must not (except HELLO again, or our own goodbye). The
daemon must stay alive (process running, ``device.info`` answers), log no
``Traceback``, and a second real daemon must sync with it afterwards.

Reproduce: the seed is printed; ``P2PSTORE_FAULT_SEED=N`` shifts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import struct
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from peer_agent import make_hello
from sync_helpers import LO, SV_REF, Node, linked_daemons, setup_employee  # noqa: F401  (fixture)

from p2pstore import PROTOCOL_VERSION
from p2pstore.clock import pack, wall_ms
from p2pstore.errors import ProtocolError
from p2pstore.net.channel import dial_tls
from p2pstore.net.identity import Identity
from p2pstore.protocol.framing import MAX_FRAME_SIZE, encode_frame
from p2pstore.protocol.messages import (
    Close,
    Hello,
    HelloReject,
    Message,
    Ping,
    Struct,
    SyncBatch,
    SyncEnd,
    SyncOpen,
    SyncReady,
    decode,
    encode,
    message_types,
)
from p2pstore.protocol.session import Closed, MessageReceived, PongReceived, Session
from p2pstore.store.changes import MAX_BATCH_ROWS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SEED = int(os.environ.get("P2PSTORE_FAULT_SEED", "0")) + 10
ROUNDS = 3  # of every generator below: a few hundred frames in all
ANSWER_TIMEOUT = 15.0  # a loaded machine; a healthy daemon answers in milliseconds
CORRUPTED = 8
BUNDLE, STORE = SV_REF["bundle"], SV_REF["store"]


# ---------------------------------------------------------------------------- a trusted peer, frames by hand


class FuzzPeer:
    """One TLS channel to the daemon, HELLO exchanged by a real ``Session``, then raw frames."""

    def __init__(self, identity: Identity, port: int, daemon_id: str) -> None:
        self.identity, self.port, self.daemon_id = identity, port, daemon_id
        self.session: Session | None = None
        self.conn: Any = None
        self.eof = False
        self.closed_by_daemon: str | None = None
        self.messages: list[Message] = []
        self.pongs: set[int] = set()

    async def connect(self, *, hello: bool = True) -> None:
        self.conn = await dial_tls(LO, self.port, self.identity, expected_device_id=self.daemon_id)
        self.session = Session(make_hello(self.identity), is_dialer=True, expected_device_id=self.daemon_id)
        self.eof, self.closed_by_daemon, self.messages, self.pongs = False, None, [], set()
        start = self.session.start()
        if hello:
            await self.send_raw(start)
            await self.until(lambda: self.session is not None and self.session.peer_hello is not None, "the daemon's HELLO")

    async def send_raw(self, data: bytes) -> None:
        self.conn.writer.write(data)
        with contextlib.suppress(ConnectionError, OSError):
            await self.conn.writer.drain()

    async def send(self, msg: Message) -> None:
        await self.send_raw(encode_frame(encode(msg)))

    async def _read(self, timeout: float) -> None:
        try:
            data = await asyncio.wait_for(self.conn.reader.read(65536), timeout)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.eof = True
            return
        assert self.session is not None
        for event in self.session.receive_data(data):
            if isinstance(event, Closed):
                self.closed_by_daemon = event.reason
            elif isinstance(event, MessageReceived):
                self.messages.append(event.message)
            elif isinstance(event, PongReceived):
                self.pongs.add(event.nonce)

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = ANSWER_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            if condition():
                return
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                break
            with contextlib.suppress(TimeoutError):
                await self._read(min(left, 1.0))
        if not condition():
            raise AssertionError(f"{what}: not within {timeout} s (eof={self.eof}, close={self.closed_by_daemon!r})")

    async def barrier(self, nonce: int) -> str:
        """'open' (the daemon answered our ping after the case) or 'closed' (Close, then end of stream)."""
        await self.send_raw(encode_frame(encode(Ping(nonce))))
        await self.until(lambda: nonce in self.pongs or self.eof, f"an answer to ping {nonce} or the end of the channel")
        if nonce in self.pongs:
            return "open"
        return "closed"

    def abort(self) -> None:
        if self.conn is not None:
            self.conn.abort()


# ---------------------------------------------------------------------------- valid messages from the type hints

_SPECIAL: dict[str, list[Any]] = {
    "mode": ["push", "pull"],
    "table_type": ["collaborative", "single_version"],
    "security_level": [1, 2, 3, 4],
    "security_label": [1, 2, 3, 4],
    "protocol_version": [PROTOCOL_VERSION],
    "replica": ["two-way", "send", "receive", "checkout"],
    "hash": ["a" * 40, "0123456789abcdef0123456789abcdef01234567"],
}
_TEXT = ["x", "fuzz", "EMPLOYEE", "é✓", "a" * 200, "zz.top"]


def _sample(hint: Any, field: str, rng: random.Random, depth: int) -> Any:
    if field in _SPECIAL:
        return rng.choice(_SPECIAL[field])
    origin = typing.get_origin(hint)
    if origin in (typing.Union, __import__("types").UnionType):
        return _sample(rng.choice(typing.get_args(hint)), field, rng, depth)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return tuple(_sample(item, field, rng, depth + 1) for _ in range(rng.randint(0, 2 if depth < 2 else 0)))
    if isinstance(hint, type) and issubclass(hint, Struct):
        return build(hint, rng, depth + 1)
    if hint is int:
        return rng.choice([0, 1, rng.randint(1, 1000), rng.randint(1, 2**63 - 1)])
    if hint is str:
        return rng.choice(_TEXT)
    if hint is bytes:
        return rng.randbytes(rng.randint(0, 32))
    if hint is bool:
        return rng.random() < 0.5
    if hint is type(None):
        return None
    if hint is float:
        return rng.random()
    raise TypeError(f"no sampler for {hint!r}")


def build(cls: type[Struct], rng: random.Random, depth: int = 0) -> Any:
    """A valid instance of ``cls``: random fields from its hints, retried until its own rules accept them."""
    hints = typing.get_type_hints(cls)
    for _ in range(500):
        try:
            return cls(**{f.name: _sample(hints[f.name], f.name, rng, depth) for f in dataclasses.fields(cls)})
        except ProtocolError:
            continue
    raise AssertionError(f"could not build a valid {cls.__name__} from its type hints")


def _daemons_type(cls: type[Message]) -> bool:
    """A message type the daemon knows (defined by p2pstore, not by a test)."""
    return cls.__module__.startswith("p2pstore.")


def expected_for(payload: bytes) -> tuple[str, bool]:
    """What the daemon must do with one frame, by our own decoder's verdict: the channel
    "open" or "closed", and whether the frame was our goodbye (then no Close comes back)."""
    try:
        msg = decode(payload)
    except ProtocolError:
        return "closed", False
    if not _daemons_type(type(msg)):
        return "closed", False  # a type only this test process registered: unknown to the daemon
    if isinstance(msg, Hello):
        return "closed", False  # a second HELLO is a protocol error
    if isinstance(msg, (Close, HelloReject)):
        return "closed", True
    return "open", False


# ---------------------------------------------------------------------------- frame mutators

_WRONG = ["str", 2**64 - 1, -(2**63), -1, 1.5, float("nan"), None, [], {}, b"bin", True, [1, "a"], {"k": 1}, 2**63]


def _flip(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _wire(msg: Message) -> list[Any]:
    return msgpack.unpackb(encode(msg), raw=False)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def frame_cases(rng: random.Random) -> list[tuple[str, bytes, str | None]]:
    """(name, bytes on the wire, expected payload verdict or None = decided from the payload)."""
    cases: list[tuple[str, bytes, str | None]] = []
    # The protocol's own types: other test modules this worker imported may
    # have registered theirs (test.note, ...), which the daemon doesn't know.
    for tag, cls in sorted((t, c) for t, c in message_types().items() if _daemons_type(c)):
        for _ in range(ROUNDS):
            msg = build(cls, rng)
            payload = encode(msg)
            cases.append((f"valid {tag}", encode_frame(payload), None))
            cut = rng.randint(1, len(payload) - 1) if len(payload) > 1 else 1
            cases.append((f"truncated {tag} at {cut}/{len(payload)}", encode_frame(payload[:cut]), None))
            cases.append((f"bit flips {tag}", encode_frame(_flip(payload, rng)), None))
            t, body = _wire(msg)
            if body:
                field = rng.choice(sorted(body))
                bad = dict(body, **{field: rng.choice(_WRONG)})
                cases.append((f"wrong type {tag}.{field}", encode_frame(_pack([t, bad])), None))
                missing = {k: v for k, v in body.items() if k != field}
                cases.append((f"missing {tag}.{field}", encode_frame(_pack([t, missing])), None))
            cases.append((f"extra field {tag}", encode_frame(_pack([t, {**body, "zz_extra": 1}])), None))
            cases.append((f"tag {tag} with a list body", encode_frame(_pack([t, list(body.values())])), None))
            # lengths that lie: the header says more (padding makes up the rest) or less than the message
            more = rng.randint(1, 64)
            cases.append((f"length +{more} {tag}", struct.pack(">I", len(payload) + more) + payload + rng.randbytes(more), "closed"))
            less = rng.randint(1, len(payload) - 1) if len(payload) > 2 else 0
            if less and expected_for(payload[:-less])[0] == "closed":  # else the rest would be read as a frame header
                cases.append((f"length -{less} {tag}", struct.pack(">I", len(payload) - less) + payload, "closed"))
    for _ in range(ROUNDS):
        cases.append(("unknown tag", encode_frame(_pack([f"no_such_{rng.randint(0, 99)}", {}])), "closed"))
        cases.append(("not a pair", encode_frame(_pack(rng.choice([[], ["ping"], ["ping", {}, 1], {"ping": 1}, 7, "ping"]))), "closed"))
        cases.append(("random bytes", encode_frame(rng.randbytes(rng.randint(1, 300))), None))
        cases.append(("over the frame cap", struct.pack(">I", rng.randint(MAX_FRAME_SIZE + 1, 2**32 - 1)) + rng.randbytes(16), "closed"))
        cases.append(("empty frame", struct.pack(">I", 0) + rng.randbytes(4), "closed"))
        # msgpack headers announcing what is not there: array32, map32, str32, bin32
        for head in (b"\xdd", b"\xdf", b"\xdb", b"\xc6"):
            lie = rng.randint(2**20, 2**32 - 1)
            cases.append((f"msgpack 0x{head.hex()} announcing {lie}", encode_frame(b"\x92\xa4ping" + head + struct.pack(">I", lie)), "closed"))
        # a valid SyncBatch whose payload lies about its size is a session matter (below); here a huge one for no session
        cases.append(("sync_batch near the frame cap, unknown session",
                      encode_frame(encode(SyncBatch(rng.randint(1, 2**62), rng.randbytes(MAX_FRAME_SIZE - 1024)))), "open"))
    rng.shuffle(cases)
    return cases


# ---------------------------------------------------------------------------- batches inside a real session


def cell(column: str, value: Any, hlc: int, origin: str) -> list[Any]:
    return [column, value, hlc, origin, None, None]


def plain_batch(rows: list[Any], *, since: int = 0, last: int = 1, stream: str = "fuzzstream") -> dict[str, Any]:
    return {"mode": "single_version", "since_seq": since, "last_seq": last, "more": False, "full": False,
            "stream": stream, "rows": rows}


def sv_row(name: str, hlc: int, origin: str, seq: int = 1) -> list[Any]:
    return ["EMPLOYEE", "NAME", name, seq, [cell("NAME", name, hlc, origin), cell("AGE", 7, hlc, origin)], None]


def batch_cases(rng: random.Random, origin: str) -> list[tuple[str, bytes]]:
    """Payloads of a SyncBatch in a push session to the seed's store: each must get an ack or a SyncEnd."""
    now = pack(wall_ms(), 0)
    good = plain_batch([sv_row(f"fz-{i}", now + i, origin, i + 1) for i in range(3)], last=3)
    cases: list[tuple[str, bytes]] = [("valid batch", _pack(good))]
    for _ in range(ROUNDS * 3):
        raw = _pack(good)
        cases.append(("batch bit flips", _flip(raw, rng)))
        cases.append(("batch truncated", raw[: rng.randint(1, len(raw) - 1)]))
        key = rng.choice(sorted(good))
        cases.append((f"batch {key} of a wrong type", _pack({**good, key: rng.choice(_WRONG)})))
        row = list(good["rows"][0])
        pos = rng.randrange(6)
        row[pos] = rng.choice(_WRONG)
        cases.append((f"row item {pos} of a wrong type", _pack(plain_batch([row]))))
        c = cell("AGE", 1, now, origin)
        c[rng.randrange(6)] = rng.choice(_WRONG)
        cases.append(("cell of a wrong type", _pack(plain_batch([["EMPLOYEE", "NAME", "fz-c", 1, [c], None]]))))
    cases += [
        ("unknown table", _pack(plain_batch([["NO_SUCH", "NAME", "k", 1, [cell("NAME", "k", now, origin)], None]]))),
        ("unknown column", _pack(plain_batch([["EMPLOYEE", "NAME", "fz-u", 1, [cell("NOPE", 1, now, origin)], None]]))),
        ("last_seq below since_seq", _pack(plain_batch([], since=10, last=5))),
        ("seq 2**63", _pack(plain_batch([], since=0, last=2**63))),
        (f"{MAX_BATCH_ROWS + 1} rows (over the cap)", _pack(plain_batch([["EMPLOYEE", "NAME", "r", 1, [], None]] * (MAX_BATCH_ROWS + 1)))),
        ("rows array announcing 2**31 items", b"\x87" + b"".join(_pack(k) + _pack(v) for k, v in good.items() if k != "rows")
         + _pack("rows") + b"\xdd" + struct.pack(">I", 2**31)),
        ("random bytes", rng.randbytes(200)),
        ("a tomb of 3 items", _pack(plain_batch([["EMPLOYEE", "NAME", "fz-t", 1, [], [now, origin, None]]]))),
        ("NaN value", _pack(plain_batch([["EMPLOYEE", "NAME", "fz-n", 1, [cell("SALARY", float("nan"), now, origin)], None]]))),
        ("value beyond 64 bits", _pack(plain_batch([["EMPLOYEE", "NAME", "fz-b", 1, [cell("AGE", 2**64 - 1, now, origin)], None]]))),
        ("a 4000-character origin", _pack(plain_batch([sv_row("fz-o", now, "o" * 4000)]))),
    ]
    return cases


async def push_session(peer: FuzzPeer, req: int) -> SyncReady:
    await peer.send(SyncOpen(req, BUNDLE, STORE, "push", None, None, None, (), None))
    await peer.until(lambda: any(getattr(m, "req", None) == req for m in peer.messages), f"SyncReady for {req}")
    [answer] = [m for m in peer.messages if getattr(m, "req", None) == req]
    assert isinstance(answer, SyncReady), answer
    return answer


async def send_batch(peer: FuzzPeer, req: int, payload: bytes) -> Message:
    """One batch in a fresh push session; the daemon's answer (SyncAck, or SyncEnd for a bad batch)."""
    await push_session(peer, req)
    await peer.send(SyncBatch(req, payload))
    await peer.until(lambda: sum(getattr(m, "req", None) == req for m in peer.messages) >= 2, f"an answer to batch {req}")
    answer = [m for m in peer.messages if getattr(m, "req", None) == req][1]
    if not isinstance(answer, SyncEnd):
        await peer.send(SyncEnd(req, 0, ""))
    return answer


# ---------------------------------------------------------------------------- the checks around it


def trusted_fuzzer(root: Path, node: Node) -> Identity:
    identity = Identity.load_or_create(root / "fuzzer", "fuzzer")
    node.call("devices.trust", device_id=identity.device_id, name="fuzzer")
    return identity


def assert_alive(node: Node) -> None:
    assert node.proc.proc is not None and node.proc.proc.poll() is None, f"daemon died:\n{node.proc.log()[-4000:]}"
    assert node.call("device.info")["device_id"] == node.id


def assert_no_traceback(node: Node) -> None:
    log = node.proc.log()
    if "Traceback" in log:
        i = log.index("Traceback")
        raise AssertionError(f"{node.name}'s log has a traceback:\n{log[max(0, i - 1500): i + 3000]}")


def assert_legitimate_sync(a: Node, b: Node, tag: str) -> None:
    """A second real daemon still syncs with the fuzzed one, both ways, and both can still write."""
    for writer, reader in ((b, a), (a, b)):
        name = f"legit-{tag}-{writer.name}"
        writer.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": name, "AGE": 1})
        [r] = writer.call("store.sync", **SV_REF, mode="push", predicates={"devices": [reader.id]})["results"]
        assert r["code"] == 0, r
        assert reader.rows(SV_REF, "SELECT AGE FROM EMPLOYEE WHERE NAME = ?", [name]) == [[1]], name


def test_fuzzed_peer_frames_end_cleanly_and_a_real_peer_syncs_after(linked_daemons, short_tmp: Path) -> None:
    a, b = linked_daemons(2, schema=True)
    setup_employee(a)
    setup_employee(b)
    identity = trusted_fuzzer(short_tmp, a)
    rng = random.Random(SEED)
    cases = frame_cases(rng)
    print(f"peer fuzz: seed {SEED}, {len(cases)} frame cases (P2PSTORE_FAULT_SEED shifts the seed)")
    t0 = time.monotonic()
    outcomes: dict[str, int] = {}

    async def fuzz() -> None:
        peer = FuzzPeer(identity, a.port, a.id)
        await peer.connect()
        for n, (what, data, verdict) in enumerate(cases, 1):
            expected, goodbye = (verdict, False) if verdict else expected_for(data[4:])
            await peer.send_raw(data)
            got = await peer.barrier(n)
            outcomes[got] = outcomes.get(got, 0) + 1
            assert got == expected, f"case {n} ({what}): expected the channel {expected}, it is {got}"
            if got == "closed":
                assert goodbye or peer.closed_by_daemon, f"case {n} ({what}): channel dropped without a Close"
                peer.abort()
                if n % 25 == 0:
                    assert_alive(a)
                await peer.connect()
        # Garbage before HELLO.
        for n in range(ROUNDS * 3):
            await peer.connect(hello=False)
            await peer.send_raw(encode_frame(rng.randbytes(rng.randint(1, 64))))
            await peer.until(lambda: peer.eof, "the daemon ends a channel with garbage before HELLO")
            peer.abort()
        # Change batches inside real push sessions.
        await peer.connect()
        answers: dict[str, int] = {}
        for n, (what, payload) in enumerate(batch_cases(rng, identity.device_id), 1):
            answer = await send_batch(peer, 10_000 + n, payload)
            kind = type(answer).__name__ if not isinstance(answer, SyncEnd) else f"SyncEnd {answer.code}"
            answers[kind] = answers.get(kind, 0) + 1
            if isinstance(answer, SyncEnd):
                assert answer.code == CORRUPTED, f"batch case {n} ({what}): {answer}"
            assert await peer.barrier(100_000 + n) == "open", f"batch case {n} ({what}) closed the channel"
        outcomes.update({f"batch: {k}": v for k, v in answers.items()})
        peer.abort()

    asyncio.run(fuzz())
    print(f"  outcomes {outcomes}; {time.monotonic() - t0:.1f} s")
    assert_alive(a)
    assert_no_traceback(a)
    assert_legitimate_sync(a, b, "fuzz")
    assert_alive(a)
    assert_no_traceback(a)


# ---------------------------------------------------------------------------- hostile clocks

MAX_HLC = 2**63 - 1
HOSTILE_CLOCKS = [
    pytest.param(MAX_HLC, "cell", id="cell-hlc-2**63-1"),
    pytest.param(MAX_HLC - 5, "cell", id="cell-hlc-2**63-6"),
    pytest.param(MAX_HLC, "tomb", id="tomb-hlc-2**63-1"),
    pytest.param(MAX_HLC, "prev", id="prev-hlc-2**63-1"),
    pytest.param(2**63, "cell", id="cell-hlc-2**63"),
    pytest.param(-1, "cell", id="cell-hlc-negative"),
    pytest.param(pack(wall_ms(), 0xFFFF), "cell", id="cell-huge-counter"),
    pytest.param(pack(wall_ms() + 10 * 365 * 86_400_000, 0), "cell", id="cell-ten-years-ahead"),
]


def hostile_row(where: str, hlc: int, origin: str) -> list[Any]:
    now = pack(wall_ms(), 0)
    if where == "cell":
        return sv_row("fz-clock", hlc, origin)
    if where == "tomb":
        return ["EMPLOYEE", "NAME", "fz-clock", 1, [], [hlc, origin, None, None]]
    return ["EMPLOYEE", "NAME", "fz-clock", 1, [["AGE", 3, now, origin, hlc, origin]], None]


@pytest.mark.parametrize(("hlc", "where"), HOSTILE_CLOCKS)
def test_a_hostile_clock_from_a_peer_never_stops_local_writes(linked_daemons, short_tmp: Path, hlc: int, where: str) -> None:
    """One batch with a hostile clock, then writes keep working on the daemon and on its peer (after a sync)."""
    a, b = linked_daemons(2, schema=True)
    setup_employee(a)
    setup_employee(b)
    identity = trusted_fuzzer(short_tmp, a)

    async def send() -> Message:
        peer = FuzzPeer(identity, a.port, a.id)
        await peer.connect()
        try:
            answer = await send_batch(peer, 77, _pack(plain_batch([hostile_row(where, hlc, identity.device_id)])))
            assert await peer.barrier(1) == "open"
            return answer
        finally:
            peer.abort()

    answer = asyncio.run(send())
    print(f"hostile clock {hlc} in a {where}: the daemon answered {answer}")
    if isinstance(answer, SyncEnd):
        assert answer.code == CORRUPTED, answer
    for i in range(20):  # more writes than the values left below 2**63
        a.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": f"after-{i}", "AGE": i})
    assert_alive(a)
    assert_legitimate_sync(a, b, "clock")
    for i in range(20):
        b.call("store.insert", **SV_REF, table="EMPLOYEE", values={"NAME": f"b-after-{i}", "AGE": i})
    assert_no_traceback(a)
    assert_no_traceback(b)
