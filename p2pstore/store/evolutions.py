"""Evolutions: a store's schema changed by numbered scripts, as Play does it
(seed 002), but safe for distributed tables.

A script ``N.sql`` (N = 1, 2, ...) holds two sections, each opened by a
comment line::

    -- Add the bonus column          <- first comment line: the description
    -- !Ups
    ALTER TABLE EMPLOYEE ADD COLUMN BONUS REAL;
    -- !Downs
    -- (nothing: a synced column can't be dropped)

Invariants:

- ``_p2p_evolutions`` records each applied revision: id, hash, description,
  applied_at, the scripts applied, ``state`` and ``last_problem``. It is
  written only here.
- A revision applies in one transaction, its capture changes with it
  (the store's: triggers rebuilt, device tables given the new columns,
  captured rows stamped). On failure everything is rolled back, and then the revision is
  recorded as ``applying_up`` (or ``applying_down``) with the problem: the
  store is *inconsistent* and nothing more applies until ``resolve`` or a
  fixed script.
- ``hash`` (``revision_hash``) is a function of the normalised Ups and
  Downs only; it never changes between releases (a test pins a value).
- Forward-only for distributed tables: a revision (Ups, or the Downs of a
  diverged one) that drops or renames a distributed table, drops or
  renames one of its synced columns, or changes its key or conflict column
  is refused with ``EVOLUTION_DESTRUCTIVE`` and changes nothing. Checked by
  comparing the tables' shapes before and after, inside the transaction,
  so no way of writing the SQL gets around it.
- SQL never comes from a peer: scripts are read from this device's files.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pstore.errors import EvolutionDestructive, EvolutionFailed, EvolutionInconsistent, EvolutionInvalid
from p2pstore.store.tables import read_table_info

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS _p2p_evolutions(
    id INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    description TEXT NOT NULL,
    applied_at INTEGER NOT NULL,        -- unix ms
    apply_script TEXT NOT NULL,         -- the Ups that ran
    revert_script TEXT NOT NULL,        -- the Downs that would undo them
    state TEXT NOT NULL,                -- applying_up, applying_down or applied
    last_problem TEXT NOT NULL DEFAULT ''
);
"""

APPLIED, APPLYING_UP, APPLYING_DOWN = "applied", "applying_up", "applying_down"

#: Largest script read (a schema change, not a data load).
MAX_SCRIPT_BYTES = 1 << 20

_MARK = re.compile(r"^\s*--\s*!\s*(ups|downs)\s*$", re.IGNORECASE)
_NAME = re.compile(r"^([1-9][0-9]{0,8})\.sql$")


@dataclass(frozen=True, slots=True)
class Evolution:
    """One script: revision ``id``, its sections and their hash."""

    id: int
    description: str
    ups: str
    downs: str

    @property
    def hash(self) -> str:
        return revision_hash(self.ups, self.downs)


def _normalise(section: str) -> str:
    """Trailing blanks of each line and blank lines at either end removed, LF line ends."""
    lines = [line.rstrip() for line in section.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def revision_hash(ups: str, downs: str) -> str:
    """The stable hash of a revision: SHA-1 (hex) of ``ups:\\n<Ups>\\ndowns:\\n<Downs>``,
    both normalised (``_normalise``). Never change this: stored hashes must
    keep matching unchanged scripts across releases."""
    text = f"ups:\n{_normalise(ups)}\ndowns:\n{_normalise(downs)}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def parse(revision: int, text: str, where: str = "") -> Evolution:
    """A script's description and sections; ``EvolutionInvalid`` names what is wrong."""
    label = where or f"{revision}.sql"
    description = ""
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        mark = _MARK.match(line)
        if mark:
            name = mark.group(1).lower()
            if name in sections:
                raise EvolutionInvalid(f"{label}: line {number}: a second '-- !{name.capitalize()}'", data={"file": label, "line": number})
            if name == "ups" and "downs" in sections:
                raise EvolutionInvalid(f"{label}: line {number}: '-- !Ups' must come before '-- !Downs'", data={"file": label, "line": number})
            sections[name], current = [], name
        elif current is not None:
            sections[current].append(line)
        elif line.strip().startswith("--") and not description:
            description = line.strip()[2:].strip()
        elif line.strip() and not line.strip().startswith("--"):
            raise EvolutionInvalid(f"{label}: line {number}: SQL before '-- !Ups'", data={"file": label, "line": number})
    if "ups" not in sections:
        raise EvolutionInvalid(f"{label}: no '-- !Ups' section", data={"file": label})
    return Evolution(revision, description, "\n".join(sections["ups"]), "\n".join(sections.get("downs", [])))


def load_dir(directory: Path) -> list[Evolution]:
    """The scripts of ``directory`` (``1.sql, 2.sql, ...``; none if it does
    not exist), in order; numbering must start at 1 with no gap."""
    if not directory.is_dir():
        return []
    found: dict[int, Path] = {}
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found[int(match.group(1))] = path
    out = []
    for expected, revision in enumerate(sorted(found), start=1):
        if revision != expected:
            raise EvolutionInvalid(f"{directory}: revision {expected}.sql is missing (found {revision}.sql)", data={"file": str(directory)})
        path = found[revision]
        raw = path.read_bytes()
        if len(raw) > MAX_SCRIPT_BYTES:
            raise EvolutionInvalid(f"{path}: larger than {MAX_SCRIPT_BYTES} bytes", data={"file": str(path)})
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise EvolutionInvalid(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})", data={"file": str(path)}) from exc
        out.append(parse(revision, text, str(path)))
    return out


def statements(script: str) -> list[str]:
    """The SQL statements of a section, split where SQLite says one ends (a
    ';' inside a string, a comment or a trigger body does not end one)."""
    out, start = [], 0
    for i, char in enumerate(script):
        if char == ";" and sqlite3.complete_statement(script[start:i + 1]):
            out.append(script[start:i + 1].strip())
            start = i + 1
    rest = script[start:]
    if any(line.strip() and not line.strip().startswith("--") for line in rest.split("\n")):
        out.append(rest.strip())  # a last statement without ';'
    return [sql for sql in out if sql.strip(";").strip()]


# -- the store's record --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Revision:
    """One revision as ``status`` sees it."""

    id: int
    description: str
    hash: str | None  # the script's (None: only in the store)
    stored_hash: str | None  # the store's record (None: not applied)
    state: str  # pending, applied, diverged, applying_up, applying_down, removed
    applied_at: int | None
    last_problem: str


def status(conn: sqlite3.Connection, scripts: Sequence[Evolution]) -> list[Revision]:
    """Every revision, script or record, in id order, with what it is here."""
    stored = {r[0]: r for r in conn.execute(
        "SELECT id, hash, description, applied_at, state, last_problem FROM _p2p_evolutions ORDER BY id")}
    out = []
    for ev in scripts:
        rec = stored.pop(ev.id, None)
        if rec is None:
            state = "pending"
        elif rec[4] != APPLIED:
            state = rec[4]
        else:
            state = APPLIED if rec[1] == ev.hash else "diverged"
        out.append(Revision(ev.id, ev.description, ev.hash, rec[1] if rec else None, state,
                            rec[3] if rec else None, rec[5] if rec else ""))
    for rid, rec in sorted(stored.items()):
        out.append(Revision(rid, rec[2], None, rec[1], rec[4] if rec[4] != APPLIED else "removed", rec[3], rec[5]))
    return sorted(out, key=lambda r: r.id)


def applied(conn: sqlite3.Connection) -> tuple[tuple[int, str], ...]:
    """The applied revisions as (id, hash), oldest first: what peers are shown."""
    return tuple((int(r[0]), r[1]) for r in conn.execute("SELECT id, hash FROM _p2p_evolutions WHERE state = ? ORDER BY id", (APPLIED,)))


def compare(mine: Sequence[tuple[int, str]], theirs: Sequence[tuple[int, str]]) -> str:
    """Where a peer's applied revisions stand against ours: ``diverged`` (a
    revision both applied has another hash on each side), else ``same``,
    ``behind`` (it lacks revisions we applied) or ``ahead`` (the reverse).
    Peers on different revisions keep syncing the columns both have
    (docs/evolutions.md); this only tells users who should upgrade."""
    here, there = dict(mine), dict(theirs)
    if any(here[r] != there[r] for r in here.keys() & there.keys()):
        return "diverged"
    if here.keys() == there.keys():
        return "same"
    if here.keys() > there.keys():
        return "behind"
    if here.keys() < there.keys():
        return "ahead"
    return "diverged"  # each has one the other lacks (a gap): neither is a prefix


def inconsistent(conn: sqlite3.Connection) -> tuple[int, str, str] | None:
    """(id, state, problem) of the revision left half-applied, or None."""
    row = conn.execute("SELECT id, state, last_problem FROM _p2p_evolutions WHERE state != ? ORDER BY id LIMIT 1", (APPLIED,)).fetchone()
    return (int(row[0]), row[1], row[2]) if row is not None else None


@dataclass(frozen=True, slots=True)
class Guarded:
    """What a revision may not change: a distributed table's name, its synced
    columns, its key and conflict column (forward-only, like Corrosion)."""

    table: str
    synced: tuple[str, ...]  # single_version: its sync columns, the conflict column among them; collaborative: all
    key: str | None


def _shape_problems(conn: sqlite3.Connection, guarded: Sequence[Guarded]) -> list[str]:
    problems = []
    for g in guarded:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (g.table,)).fetchone() is None:
            problems.append(f"distributed table {g.table} would be dropped or renamed")
            continue
        info = read_table_info(conn, g.table)
        gone = [c for c in g.synced if c not in info.columns]
        if gone:
            problems.append(f"synced column(s) {', '.join(gone)} of {g.table} would be dropped or renamed")
        if info.key != g.key:
            problems.append(f"the key of {g.table} would change ({g.key or 'rowid'} -> {info.key or 'rowid'})")
    return problems


@dataclass(frozen=True, slots=True)
class Step:
    """One revision ``apply`` runs: its sections in order (a diverged one: its
    stored Downs, then the new Ups), and what it is recorded as if it fails."""

    revision: int
    scripts: tuple[str, ...]
    evolution: Evolution
    fail_state: str


def apply_revision(conn: sqlite3.Connection, step: Step, guarded: Sequence[Guarded], execute: Callable[[str], None],
                   wall_ms: int) -> None:
    """Run ``step`` inside the caller's write transaction and record it.

    ``execute`` runs one statement as user SQL (the store's authorizer
    keeps its internal tables out of reach). ``EvolutionDestructive``: a
    distributed table would lose what it syncs by; the caller rolls back and
    nothing changed. An ``sqlite3.Error`` (a statement SQLite refused): the
    caller rolls back and records the failure (``record_failure``)."""
    for script in step.scripts:
        for sql in statements(script):
            execute(sql)
    problems = _shape_problems(conn, guarded)
    if problems:
        raise EvolutionDestructive(f"revision {step.revision}: {'; '.join(problems)}; distributed tables only move forward",
                                   data={"revision": step.revision, "problems": problems})
    ev = step.evolution
    conn.execute("INSERT OR REPLACE INTO _p2p_evolutions(id, hash, description, applied_at, apply_script, revert_script, state) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)", (ev.id, ev.hash, ev.description, wall_ms, ev.ups, ev.downs, APPLIED))


def record_failure(conn: sqlite3.Connection, step: Step, problem: str, wall_ms: int) -> EvolutionFailed:
    """After the rollback of a failed ``step`` (in a transaction of its own):
    the revision is recorded half-applied, with the problem; the store is
    inconsistent until the script is fixed or the revision resolved. Returns
    the error to raise."""
    ev = step.evolution
    conn.execute("INSERT OR REPLACE INTO _p2p_evolutions(id, hash, description, applied_at, apply_script, revert_script, "
                 "state, last_problem) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (ev.id, ev.hash, ev.description, wall_ms, ev.ups, ev.downs, step.fail_state, problem))
    return EvolutionFailed(f"revision {step.revision} failed and was rolled back: {problem}; the store is inconsistent until "
                           f"its script is fixed or `p2pstore evolutions resolve {step.revision}`",
                           data={"revision": step.revision, "problem": problem})


def plan(conn: sqlite3.Connection, scripts: Sequence[Evolution], up_to: int | None = None, *, downs: bool = True) -> list[Step]:
    """What ``apply`` runs, in order, up to revision ``up_to`` (None: all);
    without ``downs`` it stops before a diverged revision (Downs never run
    by themselves: ``auto_apply_evolutions``).
    An inconsistent store runs nothing (``EvolutionInconsistent``) unless the
    half-applied revision's script was fixed since (its hash changed): then
    it is tried again."""
    bad = inconsistent(conn)
    if bad is not None:
        rid, state, problem = bad
        fixed = next((ev for ev in scripts if ev.id == rid), None)
        stored_hash = conn.execute("SELECT hash FROM _p2p_evolutions WHERE id = ?", (rid,)).fetchone()[0]
        if state != APPLYING_UP or fixed is None or fixed.hash == stored_hash:
            raise EvolutionInconsistent(f"revision {rid} is {state} ({problem}); fix its script or `p2pstore evolutions resolve {rid}`",
                                        data={"revision": rid, "state": state, "problem": problem})
    steps: list[Step] = []
    by_id = {ev.id: ev for ev in scripts}
    for rev in status(conn, scripts):
        if up_to is not None and rev.id > up_to:
            break
        ev = by_id.get(rev.id)
        if ev is None:
            continue  # removed: its record stays (a Downs of a distributed table is never run by itself)
        if rev.state in ("pending", APPLYING_UP):
            steps.append(Step(rev.id, (ev.ups,), ev, APPLYING_UP))
        elif rev.state == "diverged":
            if not downs:
                break
            revert = conn.execute("SELECT revert_script FROM _p2p_evolutions WHERE id = ?", (rev.id,)).fetchone()[0]
            steps.append(Step(rev.id, (revert, ev.ups), ev, APPLYING_DOWN))
    return steps


def mark_applied(conn: sqlite3.Connection, ev: Evolution, wall_ms: int) -> None:
    """Record ``ev`` as applied without running it (it was applied by hand)."""
    conn.execute("INSERT OR REPLACE INTO _p2p_evolutions(id, hash, description, applied_at, apply_script, revert_script, state) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)", (ev.id, ev.hash, ev.description, wall_ms, ev.ups, ev.downs, APPLIED))


def resolve(conn: sqlite3.Connection, revision: int) -> str:
    """Declare an inconsistent revision settled by hand: ``applying_up`` →
    applied, ``applying_down`` → forgotten. Returns what it became."""
    row = conn.execute("SELECT state FROM _p2p_evolutions WHERE id = ?", (revision,)).fetchone()
    if row is None or row[0] == APPLIED:
        raise EvolutionInvalid(f"revision {revision} is not inconsistent; nothing to resolve", data={"revision": revision})
    if row[0] == APPLYING_UP:
        conn.execute("UPDATE _p2p_evolutions SET state = ?, last_problem = '' WHERE id = ?", (APPLIED, revision))
        return APPLIED
    conn.execute("DELETE FROM _p2p_evolutions WHERE id = ?", (revision,))
    return "forgotten"


def history(conn: sqlite3.Connection) -> list[dict[str, object]]:
    """The store's record, revision by revision, with the scripts that ran."""
    cursor = conn.execute("SELECT id, description, hash, applied_at, state, last_problem, apply_script, revert_script "
                          "FROM _p2p_evolutions ORDER BY id")
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor]
