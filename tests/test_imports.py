"""The package's shape: every module imports on its own (no cycles), and the
layers of SPEC §7 only depend downwards.

    errors, clock (, config)  <-  protocol  <-  store, schema  <-  net  <-  sync  <-  api  <-  daemon

``client`` and ``cli`` talk to the daemon through its socket only: they never
import store, net, sync or daemon (``cli/daemon_cmd.py`` may import
``p2pstore.daemon`` inside its function, so client-only commands start fast).
``protocol`` is sans-I/O: no asyncio, socket, ssl or sqlite3.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "p2pstore"

#: Layer rank of each top-level part of the package; a module may import
#: modules of its own rank or lower.
RANK = {
    "errors": 0, "clock": 0, "config": 0, "schemas": 0, "service": 0, "tasks": 0, "__init__": 0,
    "protocol": 1,
    "store": 2, "schema": 2,
    "net": 3,
    "sync": 4,
    "api": 5,
    "daemon": 6,
}
#: Parts outside the layer stack, and what they must never import.
SOCKET_ONLY = {"client", "cli", "__main__"}
SOCKET_ONLY_FORBIDDEN = {"store", "net", "sync", "daemon"}
SANS_IO_FORBIDDEN = {"asyncio", "socket", "ssl", "sqlite3", "aiosqlite"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def part_of(module: str) -> str:
    """'p2pstore.store.capture' -> 'store'; 'p2pstore' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at top level?) for every import in a file, resolved to absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                found.append((mod, top))
                # "from p2pstore import store" imports a subpackage
                found.extend((f"{mod}.{alias.name}", top) for alias in child.names if f"{mod}.{alias.name}" in MODULES)
            visit(child, inner)

    visit(tree, True)
    return found


FILES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_package_has_the_expected_parts() -> None:
    parts = {part_of(m) for m in MODULES}
    unknown = parts - set(RANK) - SOCKET_ONLY
    assert not unknown, f"new top-level part(s) {unknown}: give them a rank in this test (SPEC §7)"


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p) or "p2pstore")
def test_lower_layers_never_import_higher_ones(path: Path) -> None:
    me = module_name(path)
    mine = part_of(me)
    bad = []
    for imported, top in imports_of(path):
        if not imported.startswith("p2pstore"):
            continue
        theirs = part_of(imported)
        if mine in SOCKET_ONLY:
            if theirs in SOCKET_ONLY_FORBIDDEN:
                lazy_daemon = me == "p2pstore.cli.daemon_cmd" and imported == "p2pstore.daemon" and not top
                if not lazy_daemon:
                    bad.append(imported + ("" if top else " (in a function)"))
        elif theirs in SOCKET_ONLY:
            bad.append(imported)
        elif RANK[theirs] > RANK[mine]:
            bad.append(imported)
    assert not bad, f"{me} ({mine}) imports a higher layer: {bad}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "protocol").glob("*.py")), ids=lambda p: p.stem)
def test_protocol_is_sans_io(path: Path) -> None:
    bad = [m for m, _ in imports_of(path) if m.split(".")[0] in SANS_IO_FORBIDDEN]
    assert not bad, f"{module_name(path)} imports {bad}: the protocol layer does no I/O"


def test_protocol_does_not_pull_in_io_modules_at_run_time() -> None:
    mods = [m for m in MODULES if part_of(m) == "protocol"]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in mods)
        + f"print(sorted(m for m in {sorted(SANS_IO_FORBIDDEN)!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", f"importing p2pstore.protocol loads {out.stdout.strip()}"


def test_client_and_cli_do_not_load_the_server_side_at_run_time() -> None:
    code = (
        "import sys\nimport p2pstore.client, p2pstore.cli.main\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
        "(['p2pstore','store'], ['p2pstore','net'], ['p2pstore','sync'], ['p2pstore','daemon'])))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", f"the CLI loads server-side modules: {out.stdout.strip()}"


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    """One interpreter per module, so an import cycle can't hide behind an
    import order that happens to work (python-zeroconf does the same)."""
    targets = [m for m in MODULES if m != "p2pstore.__main__"]
    failures = []
    batch = 6  # bounded parallelism: 2 cores, short imports
    for i in range(0, len(targets), batch):
        procs = {
            m: subprocess.Popen([sys.executable, "-c", f"import {m}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for m in targets[i : i + batch]
        }
        for m, proc in procs.items():
            _, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                failures.append(f"{m}:\n{err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    assert not failures, "modules that fail to import on their own:\n" + "\n".join(failures)
