"""Hybrid logical clock (HLC), pure.

A clock value is one 64-bit integer: ``(wall_ms << 16) | counter``. Values
from one device strictly increase, even if the wall clock steps back; a
value received from a peer pushes the local clock past it, so causally later
changes always carry larger values. Ties between devices are broken by device
ID in the merge code, not here.

The counter has 16 bits. A burst of more than 65,536 stamps in one
millisecond carries into the millisecond part: the clock then runs slightly
ahead of the wall and catches up later, which keeps it monotonic (the only
property the merge rules need).

Time is passed in (``wall_ms``) so tests can give any clock they need.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

COUNTER_BITS = 16
COUNTER_MASK = (1 << COUNTER_BITS) - 1
#: Largest value that fits a signed 64-bit SQLite INTEGER.
MAX_HLC = (1 << 63) - 1


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def pack(ms: int, counter: int) -> int:
    return (ms << COUNTER_BITS) + counter


def physical_ms(hlc: int) -> int:
    return hlc >> COUNTER_BITS


def to_str(hlc: int) -> str:
    """Readable form for logs and the CLI: ``<ms>.<counter>``."""
    return f"{hlc >> COUNTER_BITS}.{hlc & COUNTER_MASK}"


@dataclass(slots=True)
class HybridClock:
    """The clock of one device. ``last`` is persisted by the store."""

    last: int = 0

    def now(self, wall: int | None = None) -> int:
        """A new value, greater than every value seen so far."""
        return self.reserve(1, wall)

    def reserve(self, n: int, wall: int | None = None) -> int:
        """Reserve ``n`` consecutive values; returns the first.

        Stamping a batch of captured changes with one call keeps the daemon's
        per-row cost to an addition inside one UPDATE statement.
        """
        if n < 1:
            raise ValueError("reserve needs n >= 1")
        ms = wall_ms() if wall is None else wall
        first = max(pack(ms, 0), self.last + 1)
        last = first + n - 1
        if last > MAX_HLC:
            raise OverflowError("hybrid logical clock overflow")
        self.last = last
        return first

    def observe(self, remote: int, wall: int | None = None) -> None:
        """Move past a value received from a peer.

        A peer whose clock is far ahead drags ours along; that is the HLC
        trade-off (bounded by the peer's skew), and it keeps order causal.
        """
        if not 0 <= remote <= MAX_HLC:
            raise ValueError(f"clock value out of range: {remote}")
        ms = wall_ms() if wall is None else wall
        self.last = max(self.last, remote, pack(ms, 0) - 1)
