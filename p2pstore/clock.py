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

A value from outside (a peer's change, the persisted state at open) is taken
only if it is at most ``max_offset_ms`` ahead of local physical time, as HLC
systems bound it: one peer with a broken or hostile clock can then drag the
mesh at most that far, never to the end of the 64-bit range (where every
later write would fail). ``limit`` is that bound and ``too_far_ahead`` the one
check of it; the merge code sends a change beyond it to the sync-failure log.

Time is passed in (``wall_ms``) so tests can give any clock they need.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

from p2pstore.errors import ClockOverflow

COUNTER_BITS = 16
COUNTER_MASK = (1 << COUNTER_BITS) - 1
#: Largest value that fits a signed 64-bit SQLite INTEGER.
MAX_HLC = (1 << 63) - 1
#: How far ahead of local physical time an outside clock value may be
#: (config ``max_clock_offset_ms``): five minutes covers devices whose clocks
#: drift without NTP for a while; a peer further ahead is broken or hostile.
DEFAULT_MAX_OFFSET_MS = 5 * 60 * 1000


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def pack(ms: int, counter: int) -> int:
    return (ms << COUNTER_BITS) + counter


def physical_ms(hlc: int) -> int:
    return hlc >> COUNTER_BITS


def to_str(hlc: int) -> str:
    """Readable form for logs and the CLI: ``<ms>.<counter>``."""
    return f"{hlc >> COUNTER_BITS}.{hlc & COUNTER_MASK}"


def ms_to_iso(ms: int) -> str:
    """A physical time as UTC ISO 8601, for messages (any 47-bit ms value fits)."""
    try:
        return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms"


@dataclass(slots=True)
class HybridClock:
    """The clock of one device. ``last`` is persisted by the store."""

    last: int = 0
    max_offset_ms: int = DEFAULT_MAX_OFFSET_MS

    def limit(self, wall: int | None = None) -> int:
        """The largest value taken from outside now: ``max_offset_ms`` ahead of physical time."""
        ms = wall_ms() if wall is None else wall
        return min(pack(ms + self.max_offset_ms + 1, 0) - 1, MAX_HLC)

    def too_far_ahead(self, value: int, wall: int | None = None) -> str | None:
        """Why ``value`` can't be taken from outside (None: it can)."""
        ms = wall_ms() if wall is None else wall
        if value <= self.limit(ms):
            return None
        return (f"clock {ms_to_iso(physical_ms(value))} is {physical_ms(value) - ms} ms ahead of local time "
                f"{ms_to_iso(ms)}, max offset {self.max_offset_ms} ms")

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
            # Only a wall clock in the year 6429 gets here: outside values are bounded (observe, restore).
            raise ClockOverflow(f"the hybrid logical clock can't stamp {n} more change(s): it is at {to_str(self.last)}, "
                                f"the end of its 64-bit range (is the system clock right?)", data={"hlc": self.last})
        self.last = last
        return first

    def observe(self, remote: int, wall: int | None = None) -> bool:
        """Move past a value received from a peer; False (and no move) if it
        is beyond ``limit``.

        A peer whose clock is ahead drags ours along; that is the HLC
        trade-off, and it keeps order causal. The bound keeps the drag to
        ``max_offset_ms``: callers check ``too_far_ahead`` first and keep such
        a change out of the store, so here it is only a safety net.
        """
        if not 0 <= remote <= MAX_HLC:
            raise ValueError(f"clock value out of range: {remote}")
        ms = wall_ms() if wall is None else wall
        if self.too_far_ahead(remote, ms) is not None:
            return False
        self.last = max(self.last, remote, pack(ms, 0) - 1)
        return True

    def restore(self, stored: int, wall: int | None = None) -> bool:
        """Take a persisted clock state (at open); False if it is beyond
        ``limit`` and was ignored.

        Releases without the bound accepted any peer clock and persisted it,
        so such a state only means the clock was dragged by a hostile or
        broken peer. Keeping it would leave the store at the end of the range
        (every write failing); the clock restarts from physical time instead.
        """
        ms = wall_ms() if wall is None else wall
        if self.too_far_ahead(stored, ms) is not None:
            return False
        self.last = max(self.last, stored)
        return True
