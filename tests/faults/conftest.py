"""The fault suite (issue 10) reuses the helpers of the other test folders.

Those folders have no ``__init__.py``; pytest puts each one on ``sys.path``
only for its own tests. The fault tests import ``sync_helpers`` /
``p2ps_helpers`` (integration), ``testbed`` (multihost) and ``peer_agent``
(net), so those folders go on the path here, once.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
for folder in ("integration", "multihost", "net"):
    path = str(TESTS / folder)
    if path not in sys.path:
        sys.path.append(path)
if str(TESTS.parent) not in sys.path:
    sys.path.insert(0, str(TESTS.parent))
