"""The protocol package stays sans-I/O: importing it pulls in no I/O modules."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import p2pstore.protocol

FORBIDDEN = {"asyncio", "socket", "ssl", "sqlite3", "selectors"}
PACKAGE_DIR = pathlib.Path(p2pstore.protocol.__file__).parent


def test_protocol_modules_import_no_io_in_a_fresh_interpreter() -> None:
    modules = sorted(f"p2pstore.protocol.{p.stem}" for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__")
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"print(sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_protocol_sources_import_only_allowed_modules() -> None:
    allowed_roots = {"__future__", "collections", "dataclasses", "enum", "itertools", "math", "operator", "struct", "types", "typing", "msgpack",
                     "p2pstore"}
    for path in PACKAGE_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                assert root in allowed_roots, f"{path.name} imports {name}"
                if root == "p2pstore":
                    # the clock is pure (layer 0): a batch's clocks are checked against its range
                    assert name in ("p2pstore.errors", "p2pstore.clock") or name.startswith("p2pstore.protocol"), \
                        f"{path.name} imports {name}"
