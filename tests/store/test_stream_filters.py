"""The stream's two row filters on blocks (store/stream.py ``_uncovered``,
``_own_only``) against their rule applied row by row: their shortcuts (a
whole block kept when no row can be left out, found in C) must keep
exactly what the rule keeps."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from p2pstore.protocol.batch import HLC, ORIGIN, TOMB_HLC, TOMB_ORIGIN, VALUES, Block
from p2pstore.store import stream

DEVICES = ("DEVA", "DEVB", "DEVC")


def _row(n: int, hlc: int | None, origin: int | None, tomb: int | None, tomb_origin: int | None) -> list[Any]:
    row: list[Any] = [f"k{n}", n, hlc, origin, None, None, tomb, tomb_origin, None, None]
    return row + ["v" if hlc is not None else None]


def _blocks(seed: int) -> list[Block]:
    rng = random.Random(seed)
    out = []
    for _ in range(20):
        rows = []
        origins = [rng.randrange(len(DEVICES))] if rng.random() < 0.5 else list(range(len(DEVICES)))
        for n in range(rng.randint(1, 12)):
            hlc = None if rng.random() < 0.2 else rng.randint(1, 60)
            tomb = rng.randint(1, 60) if hlc is None or rng.random() < 0.3 else None
            rows.append(_row(n, hlc, rng.choice(origins) if hlc is not None else None,
                             tomb, rng.choice(origins) if tomb is not None else None))
        out.append(Block("items", "uid", ("b",), DEVICES, rows))
    assert all(len(r) == VALUES + 1 for b in out for r in b.rows)
    return out


def _covered_by_rule(row: list[Any], marks: dict[str, int]) -> bool:
    def has(hlc: int | None, origin: int | None) -> bool:
        return hlc is None or (origin is not None and hlc <= marks.get(DEVICES[origin], -1))
    return has(row[HLC], row[ORIGIN]) and has(row[TOMB_HLC], row[TOMB_ORIGIN])


def _eager_by_rule(row: list[Any], eager: set[str]) -> bool:
    return ((row[HLC] is not None and DEVICES[row[ORIGIN]] in eager)
            or (row[TOMB_HLC] is not None and DEVICES[row[TOMB_ORIGIN]] in eager))


@pytest.mark.parametrize("seed", range(30))
def test_uncovered_keeps_what_the_rule_keeps(seed: int) -> None:
    rng = random.Random(seed)
    for block in _blocks(seed):
        marks = {d: rng.choice([-1, 0, 10, 30, 59, 61]) for d in DEVICES if rng.random() < 0.8}
        _, kept = stream._uncovered([], [block], marks)
        want = [r for r in block.rows if not _covered_by_rule(r, marks)]
        assert [r for b in kept for r in b.rows] == want


@pytest.mark.parametrize("seed", range(30))
def test_own_only_keeps_what_the_rule_keeps(seed: int) -> None:
    rng = random.Random(seed)
    for block in _blocks(seed):
        eager = set(rng.sample(DEVICES, rng.randint(1, 3)))
        _, kept, left = stream._own_only([], [block], eager)
        want = [r for r in block.rows if _eager_by_rule(r, eager)]
        assert [r for b in kept for r in b.rows] == want and left == len(block.rows) - len(want)


def test_the_shortcuts_are_taken() -> None:
    """(So the comparisons above exercise both ways.)"""
    fresh = Block("items", "uid", ("b",), DEVICES, [_row(n, 50 + n, 0, None, None) for n in range(5)])
    _, kept = stream._uncovered([], [fresh], {"DEVA": 49, "DEVB": 99})
    assert kept == [fresh] and kept[0] is fresh  # the block itself: no pass row by row
    _, kept, left = stream._own_only([], [fresh], {"DEVA"})
    assert kept[0] is fresh and left == 0
    assert list(itertools.chain.from_iterable(b.rows for b in stream._uncovered([], [fresh], {"DEVA": 52})[1])) == fresh.rows[3:]
