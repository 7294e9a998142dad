"""What a sync_schema.json rule is, what it reports, and the registry of them.

Every rule has a stable kebab-case id, a layer ("layer 1" shape, "selection"
which entries apply, "layer 2" against the live table, "layer 3" against the
accepted version) and a severity. Rules that are checks of their own
(layers 2 and 3) register with :func:`rule` on the small function that
checks them; the others (layer 1 is read off the JSON Schema's errors, the
selection rules off ``validate``'s arguments) are :func:`declare`\\ d where they
are reported. ``sync_schema.RULES`` — the table docs/sync_schema.md and the
store read — is :func:`rule_table`, so no rule can be reported without being
listed, and none listed twice.

Invariants:

- Pure: no I/O, no p2pstore import beyond the error tree.
- A rule function yields ``(path, message)`` pairs and never builds the issue
  itself: :func:`run` attaches the rule's id and files the issue as an error
  or a warning by the rule's severity, so a rule's id and severity are
  written once, in its registration.
- Rules of one layer run in registration order; rules with the same ``each``
  that are registered one after another run per item (per field, per sync
  column, ...) together, so issues come out grouped by the item they concern.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from p2pstore.errors import SchemaInvalid

#: The layers, in the order the rule table lists them.
LAYERS = ("layer 1", "selection", "layer 2", "layer 3")

#: A rule function's findings: ``(JSON pointer, message)``.
Finding = tuple[str, str]


# --------------------------------------------------------------------------
# What a rule reports


@dataclass(frozen=True, slots=True)
class SchemaIssue:
    """One problem found in a sync_schema.json document.

    ``path`` is a JSON pointer (RFC 6901) into the document so an editor or a
    user can go straight to the node; ``rule`` is stable so scripts and tests
    can match on it while ``message`` stays free to improve.
    """

    path: str
    rule: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "rule": self.rule, "message": self.message}


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """The outcome of ``sync_schema.validate``: errors block the schema, warnings don't.

    ``added_sync_columns`` (layer 3) maps a table to the sync columns the new
    version adds, so the store can mark existing rows to be sent again; it is
    not part of :meth:`to_dict` because the API result is
    ``{valid, errors, warnings}``.
    """

    errors: tuple[SchemaIssue, ...]
    warnings: tuple[SchemaIssue, ...] = ()
    added_sync_columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False, hash=False)

    @property
    def valid(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "errors": [issue.to_dict() for issue in self.errors],
            "warnings": [issue.to_dict() for issue in self.warnings],
        }

    def raise_if_invalid(self) -> None:
        """Raise ``SchemaInvalid`` carrying the whole report, for callers that
        must refuse the schema (``set_distributed_tables``, SIGHUP reload)."""
        if self.valid:
            return
        first = self.errors[0]
        more = len(self.errors) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise SchemaInvalid(
            f"sync_schema.json is invalid: {first.message}{suffix}",
            data={"errors": [e.to_dict() for e in self.errors], "warnings": [w.to_dict() for w in self.warnings]},
        )


# --------------------------------------------------------------------------
# The registry


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: its id, where it sits, and (for layers 2 and 3) its check.

    ``each`` names what the check is called once per (the caller's
    ``items`` decides what that means, e.g. ``"field"``: every described
    field); None: once per table entry or db entry. ``live``: the check needs
    the live table and is skipped when there is none (document-only mode).
    """

    id: str
    layer: str
    severity: str = "error"
    note: str = ""
    check: Callable[..., Iterable[Finding]] | None = None
    each: str | None = None
    live: bool = False

    @property
    def summary(self) -> str:
        """The rule table's entry: "layer 2 warning", "layer 2 error (live data: ...)"."""
        text = f"{self.layer} {self.severity}"
        return f"{text} ({self.note})" if self.note else text


_REGISTRY: dict[str, Rule] = {}


def _register(new: Rule) -> Rule:
    if new.layer not in LAYERS:
        raise ValueError(f"rule {new.id!r}: unknown layer {new.layer!r}")
    if new.severity not in ("error", "warning"):
        raise ValueError(f"rule {new.id!r}: unknown severity {new.severity!r}")
    if new.id in _REGISTRY:
        raise ValueError(f"rule {new.id!r} is registered twice")
    _REGISTRY[new.id] = new
    return new


def declare(rule_id: str, layer: str, *, severity: str = "error", note: str = "") -> Rule:
    """Register a rule that is reported by code outside a rule function
    (layer 1, selection, live data counted by the store)."""
    return _register(Rule(rule_id, layer, severity, note))


def rule(
    rule_id: str, layer: str, *, severity: str = "error", note: str = "", each: str | None = None, live: bool = False
) -> Callable[[Callable[..., Iterable[Finding]]], Callable[..., Iterable[Finding]]]:
    """Decorator: register the function as the check of rule ``rule_id``."""

    def register(check: Callable[..., Iterable[Finding]]) -> Callable[..., Iterable[Finding]]:
        _register(Rule(rule_id, layer, severity, note, check, each, live))
        return check

    return register


def rules_of(layer: str) -> list[Rule]:
    """The rules of ``layer`` that have a check, in registration order."""
    return [r for r in _REGISTRY.values() if r.layer == layer and r.check is not None]


def rule_table() -> dict[str, str]:
    """Every registered rule id → its summary, layer by layer."""
    ordered = sorted(_REGISTRY.values(), key=lambda r: LAYERS.index(r.layer))  # stable: registration order inside a layer
    return {r.id: r.summary for r in ordered}


def run(
    layer: str,
    facts: object,
    items: Callable[[str | None], Iterable[Sequence[Any]]],
    *,
    live: bool = True,
) -> tuple[list[SchemaIssue], list[SchemaIssue]]:
    """Run every check of ``layer`` on ``facts``; returns ``(errors, warnings)``.

    ``items(each)`` gives the argument tuples a rule with that ``each`` is
    called with after ``facts`` (``items(None)`` is ``[()]``). With
    ``live=False`` rules that need the live table are skipped.
    """
    errors: list[SchemaIssue] = []
    warnings: list[SchemaIssue] = []
    for each, group in groupby(rules_of(layer), key=lambda r: r.each):
        checks = [r for r in group if live or not r.live]
        for args in items(each):
            for r in checks:
                assert r.check is not None
                target = warnings if r.severity == "warning" else errors
                target.extend(SchemaIssue(path, r.id, message) for path, message in r.check(facts, *args))
    return errors, warnings


# --------------------------------------------------------------------------
# Helpers every layer's messages use


def pointer(parts: Sequence[Any]) -> str:
    """RFC 6901 JSON pointer for a path of keys and indexes."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def show(value: Any) -> str:
    """A value for a message: quoted, and short even for hostile input."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            text = repr(type(value).__name__)
    return text if len(text) <= 60 else text[:57] + "..."


def dedupe(issues: Iterable[SchemaIssue]) -> list[SchemaIssue]:
    """The issues without repeats, first occurrence first."""
    return list(dict.fromkeys(issues))
