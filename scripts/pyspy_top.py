"""Summarize a ``py-spy record --format raw`` file (as ``scripts/bench --profile DIR`` writes).

Usage: python scripts/pyspy_top.py FILE... [--top N] [--lines]

Prints the share of samples per thread and the top functions by inclusive
time (the function anywhere on the stack, counted once per sample) and by
own time (the function on top of the stack). py-spy records only samples
where a thread was not idle, so shares are of the busy time of the process.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def _frame(text: str) -> str:
    """``func (path/file.py:123)`` -> ``func (file.py)``: lines of one function add up."""
    name, _, where = _LINE.sub(")", text).partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def summarize(path: Path, top: int, lines: bool = False) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    own_lines: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
        raw = [f for f in frames if not f.startswith(("thread", "process"))]
        frames = [_frame(f) for f in raw]
        if raw:
            own_lines[raw[-1].rsplit("/", 1)[-1]] += n
        total += n
        threads[thread] += n
        for f in set(frames):
            inclusive[f] += n
        if frames:
            own[frames[-1]] += n
    out = [f"{path.name}: {total} busy samples"]
    out += [f"  thread {share / total:6.1%}  {name}" for name, share in threads.most_common(6)]
    out.append("  inclusive:")
    out += [f"    {c / total:6.1%}  {f}" for f, c in inclusive.most_common(top)]
    out.append("  own:")
    out += [f"    {c / total:6.1%}  {f}" for f, c in own.most_common(top)]
    if lines:
        out.append("  own, by line:")
        out += [f"    {c / total:6.1%}  {f}" for f, c in own_lines.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--lines", action="store_true", help="also own time by source line")
    args = parser.parse_args()
    for f in args.files:
        print(summarize(f, args.top, args.lines))


if __name__ == "__main__":
    main()
