"""Module purity, and docs/sync_schema.md covering every rule."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from p2pstore.schema import entry, rules, sync_schema, table_rules, table_shape, upgrade_rules

ROOT = Path(__file__).resolve().parents[2]
#: The modules the rules live in (sync_schema is the entry point; the rules
#: are registered in ``rules`` by the layer-2 and layer-3 modules).
RULE_MODULES = (sync_schema, rules, entry, table_shape, table_rules, upgrade_rules)


def test_sync_schema_module_is_pure() -> None:
    # Like protocol/: no event loop, no I/O libraries, and of p2pstore only
    # the error tree and the JSON Schema loader, so the rules can be used (and tested) anywhere.
    allowed = {"p2pstore.errors", "p2pstore.schemas"} | {m.__name__ for m in RULE_MODULES}
    for module in RULE_MODULES:
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.level == 0, module.__name__
                imported.add(node.module)
        forbidden = {"asyncio", "socket", "ssl", "sqlite3", "aiosqlite", "anyio", "threading"}
        assert not {m for m in imported if m.split(".")[0] in forbidden}, module.__name__
        assert {m for m in imported if m.split(".")[0] == "p2pstore"} <= allowed, module.__name__


def test_importing_the_module_loads_no_event_loop_in_a_fresh_process() -> None:
    code = (
        "import sys, p2pstore.schema.sync_schema as m; "
        "print('asyncio' in sys.modules, 'sqlite3' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


def test_docs_describe_every_rule_and_no_other() -> None:
    text = (ROOT / "docs" / "sync_schema.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^### `([a-z-]+)`", text, flags=re.MULTILINE))
    assert documented == set(sync_schema.RULES)


def test_every_rule_the_code_can_report_is_registered() -> None:
    source = "\n".join(Path(m.__file__).read_text(encoding="utf-8") for m in RULE_MODULES)
    used = set(re.findall(r'"([a-z]+(?:-[a-z]+)+)",\n', source)) | set(re.findall(r'\bSchemaIssue\([^)]*?"([a-z]+(?:-[a-z]+)+)"', source))
    used |= {r.id for layer in rules.LAYERS for r in rules.rules_of(layer)}  # registered with their check
    assert used <= set(sync_schema.RULES), used - set(sync_schema.RULES)
    # ... and every registered rule is reported somewhere ("shape" is the
    # fallback for jsonschema errors, built from a variable).
    assert set(sync_schema.RULES) - used == {"shape"}
