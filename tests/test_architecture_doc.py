"""docs/architecture.md's layer diagram names every module of p2pstore/
(issue 14: a newcomer finds each file there)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_layer_diagram_names_every_module() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    diagram = doc[doc.index("```"):doc.index("| module |")]
    modules = sorted(ROOT.joinpath("p2pstore").rglob("*.py"))
    missing = [str(m.relative_to(ROOT)) for m in modules
               if (m.name != "__init__.py" or m.parent.name == "schemas")
               and (m.name if m.name != "__init__.py" else "schemas/__init__.py") not in diagram]
    assert not missing, f"docs/architecture.md's diagram lacks {missing}"
