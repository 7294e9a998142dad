"""The daemon's collector settings (daemon.tune_gc): cheaper, never off."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_tune_gc_collects_rarely_but_still_collects_cycles() -> None:
    # In a child: the settings are process-wide and pytest's own must stay.
    code = textwrap.dedent("""
        import gc, weakref
        from p2pstore.daemon import GC_THRESHOLD, tune_gc
        tune_gc()
        assert gc.isenabled()
        assert gc.get_threshold()[0] == GC_THRESHOLD > 700
        assert gc.get_freeze_count() > 1000  # start-up's objects are out of every collection
        class Node: pass
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        keep = [[] for _ in range(2 * GC_THRESHOLD)]  # allocations alone trigger a young collection
        assert gone() is None, "a cycle was not collected"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
