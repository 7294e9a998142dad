"""Engine-level sync tests reuse the integration helpers (real daemons) and
the net folder's peer agent (and the store folder's in-process replicas); those folders have no ``__init__.py``, so they
go on ``sys.path`` here, once (as tests/faults/conftest.py does)."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
for folder in ("integration", "net", "store"):
    path = str(TESTS / folder)
    if path not in sys.path:
        sys.path.append(path)
if str(TESTS.parent) not in sys.path:
    sys.path.insert(0, str(TESTS.parent))
