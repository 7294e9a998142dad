"""Hybrid logical clock: monotonic whatever the wall clock does.

Time is always passed in (``wall=``), never patched.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pstore.clock import (
    COUNTER_BITS,
    COUNTER_MASK,
    DEFAULT_MAX_OFFSET_MS,
    MAX_HLC,
    HybridClock,
    pack,
    physical_ms,
    to_str,
    wall_ms,
)
from p2pstore.errors import ClockOverflow


def test_pack_and_unpack_round_trip() -> None:
    value = pack(1_700_000_000_000, 5)
    assert physical_ms(value) == 1_700_000_000_000
    assert value & COUNTER_MASK == 5
    assert to_str(value) == "1700000000000.5"


def test_now_follows_the_wall_when_it_moves_forward() -> None:
    clock = HybridClock()
    assert clock.now(wall=1000) == pack(1000, 0)
    assert clock.now(wall=2000) == pack(2000, 0)
    assert clock.last == pack(2000, 0)


def test_now_counts_up_within_one_millisecond() -> None:
    clock = HybridClock()
    values = [clock.now(wall=1000) for _ in range(5)]
    assert values == [pack(1000, i) for i in range(5)]


def test_now_stays_monotonic_when_the_wall_goes_back() -> None:
    clock = HybridClock()
    before = clock.now(wall=10_000)
    after = [clock.now(wall=w) for w in (9_000, 5_000, 0, 9_999)]
    assert all(v > before for v in after)
    assert after == sorted(after) and len(set(after)) == len(after)
    # Physical part does not go backwards either: it stays at the highest wall seen.
    assert all(physical_ms(v) == 10_000 for v in after)
    # Once the wall passes the clock again, the clock follows it.
    assert clock.now(wall=20_000) == pack(20_000, 0)


def test_counter_carries_into_milliseconds_instead_of_wrapping() -> None:
    clock = HybridClock(last=pack(1000, COUNTER_MASK - 1))
    a = clock.now(wall=1000)
    b = clock.now(wall=1000)
    assert a == pack(1000, COUNTER_MASK)
    assert b == pack(1001, 0) and b > a


def test_reserve_returns_first_of_n_consecutive_values() -> None:
    clock = HybridClock()
    first = clock.reserve(10, wall=5000)
    assert first == pack(5000, 0)
    assert clock.last == first + 9
    assert clock.now(wall=5000) == first + 10


def test_reserve_after_wall_went_back_starts_past_last() -> None:
    clock = HybridClock()
    clock.reserve(3, wall=5000)
    last = clock.last
    first = clock.reserve(4, wall=1)
    assert first == last + 1
    assert clock.last == last + 4


@pytest.mark.parametrize("n", [0, -1])
def test_reserve_refuses_non_positive_counts(n: int) -> None:
    clock = HybridClock(last=7)
    with pytest.raises(ValueError):
        clock.reserve(n, wall=1)
    assert clock.last == 7


def test_reserve_refuses_to_overflow_64_bits_with_a_domain_error() -> None:
    clock = HybridClock(last=MAX_HLC - 1)
    assert clock.now(wall=0) == MAX_HLC
    with pytest.raises(ClockOverflow, match="end of its 64-bit range"):
        clock.now(wall=0)
    with pytest.raises(ClockOverflow):
        clock.reserve(5, wall=0)
    assert clock.last == MAX_HLC


NOW = 1_760_000_000_000  # a wall time in 2025 (ms)
HOSTILE = (1 << 63) - 6  # the value: a few stamps short of the end of the range


def test_limit_is_the_max_offset_ahead_of_physical_time() -> None:
    clock = HybridClock(max_offset_ms=1000)
    assert clock.limit(wall=NOW) == pack(NOW + 1000, COUNTER_MASK)
    assert clock.too_far_ahead(pack(NOW + 1000, COUNTER_MASK), wall=NOW) is None
    reason = clock.too_far_ahead(pack(NOW + 1001, 0), wall=NOW)
    assert reason is not None and "1001 ms ahead of local time" in reason and "max offset 1000 ms" in reason
    assert HybridClock().max_offset_ms == DEFAULT_MAX_OFFSET_MS


def test_limit_never_passes_the_end_of_the_range() -> None:
    assert HybridClock(max_offset_ms=10**12).limit(wall=(1 << 47) - 1) == MAX_HLC


def test_observe_ignores_a_hostile_clock_and_the_clock_keeps_working() -> None:
    clock = HybridClock()
    mine = clock.now(wall=NOW)
    assert clock.observe(HOSTILE, wall=NOW) is False
    assert clock.last == mine
    reason = clock.too_far_ahead(HOSTILE, wall=NOW)
    assert reason is not None and reason.startswith("clock 6429-") and "ahead of local time 2025-" in reason
    # Thousands of later stamps are fine: nothing dragged the clock to the end of its range.
    first = clock.reserve(100_000, wall=NOW)
    assert physical_ms(first) == NOW and physical_ms(clock.last) < NOW + 10


def test_observe_takes_a_value_just_inside_the_bound() -> None:
    clock = HybridClock(max_offset_ms=60_000)
    edge = clock.limit(wall=NOW)
    assert clock.observe(edge, wall=NOW) is True
    assert clock.now(wall=NOW) == edge + 1
    assert clock.observe(edge + 1_000_000, wall=NOW) is False


def test_restore_ignores_a_poisoned_persisted_state() -> None:
    clock = HybridClock()
    assert clock.restore(HOSTILE, wall=NOW) is False
    assert clock.now(wall=NOW) == pack(NOW, 0)
    assert clock.restore(pack(NOW + 5, 3), wall=NOW) is True
    assert clock.now(wall=NOW) == pack(NOW + 5, 4)


def test_observe_moves_past_a_remote_value_ahead_of_us() -> None:
    clock = HybridClock()
    clock.now(wall=1000)
    remote = pack(50_000, 7)
    clock.observe(remote, wall=1000)
    assert clock.now(wall=1000) == remote + 1


def test_observe_of_an_older_value_changes_nothing_but_wall() -> None:
    clock = HybridClock()
    mine = clock.now(wall=9000)
    clock.observe(pack(10, 0), wall=9000)
    assert clock.last == mine
    nxt = clock.now(wall=9000)
    assert nxt == mine + 1


def test_observe_with_a_later_wall_lets_now_start_at_the_wall() -> None:
    clock = HybridClock()
    clock.observe(pack(100, 3), wall=200)
    assert clock.now(wall=200) == pack(200, 0)


@pytest.mark.parametrize("bad", [-1, MAX_HLC + 1])
def test_observe_refuses_out_of_range_values(bad: int) -> None:
    clock = HybridClock(last=5)
    with pytest.raises(ValueError):
        clock.observe(bad, wall=1)
    assert clock.last == 5


def test_default_wall_is_the_real_clock() -> None:
    before = wall_ms()
    value = HybridClock().now()
    after = wall_ms()
    assert before <= physical_ms(value) <= after
    assert COUNTER_BITS == 16


ops = st.one_of(
    st.tuples(st.just("now"), st.integers(0, 1 << 40), st.just(1)),
    st.tuples(st.just("reserve"), st.integers(0, 1 << 40), st.integers(1, 70_000)),
    st.tuples(st.just("observe"), st.integers(0, 1 << 40), st.integers(0, (1 << 56))),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, min_size=1, max_size=40))
def test_values_strictly_increase_under_any_wall_and_observations(steps: list[tuple[str, int, int]]) -> None:
    clock = HybridClock()
    last_issued = -1
    seen_max = 0
    for op, wall, arg in steps:
        if op == "observe":
            if clock.observe(arg, wall=wall):
                seen_max = max(seen_max, arg)
            else:  # refused only beyond the bound, and then the clock is unchanged
                assert clock.too_far_ahead(arg, wall=wall) is not None
            continue
        first = clock.now(wall=wall) if op == "now" else clock.reserve(arg, wall=wall)
        assert first > last_issued
        assert first > seen_max  # causally after everything observed
        last_issued = clock.last
        assert last_issued >= first
