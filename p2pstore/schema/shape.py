"""Read a live SQLite table's shape for layer 2 of sync_schema validation.

This is the only part of ``p2pstore.schema`` that touches SQLite; the rules
themselves (``table_rules.check_table``) work on the :class:`TableShape` it
returns, so they stay pure and testable with plain data.

Invariants:

- Read-only: only ``sqlite_master`` and the ``pragma_*`` table-valued
  functions are queried, with the table name bound as a parameter (never
  spliced into SQL).
- The caller's ``row_factory`` is left alone: a private cursor reads tuples.
- Table names are matched exactly (case-sensitive), like every name in
  sync_schema.json; SQLite itself would accept any case, but the schema file
  must name the table as it was created.
"""

from __future__ import annotations

import re
import sqlite3

from p2pstore.schema.table_shape import ColumnShape, TableShape

__all__ = ["ColumnShape", "TableShape", "read_table_shape", "sql_tokens", "has_autoincrement", "is_without_rowid"]


def read_table_shape(conn: sqlite3.Connection, table: str) -> TableShape | None:
    """The shape of table ``table`` in ``conn``'s main database, or None when
    there is no such table (views and virtual tables' shadow tables count as
    tables only if sqlite_master says ``type='table'``)."""
    cur = conn.cursor()
    cur.row_factory = None
    row = cur.execute(
        "SELECT name, sql FROM main.sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    if row is None:
        return None
    name, sql = row[0], row[1] or ""
    tokens = sql_tokens(sql)
    infos = cur.execute(
        'SELECT cid, name, type, "notnull", dflt_value, pk FROM pragma_table_info(?, \'main\') ORDER BY cid', (name,)
    ).fetchall()

    # Single-column UNIQUE constraints and indexes. A partial index only
    # makes some rows unique, and an expression index no column, so neither
    # counts.
    unique: set[str] = set()
    for _seq, index_name, is_unique, _origin, partial in cur.execute(
        "SELECT seq, name, \"unique\", origin, partial FROM pragma_index_list(?, 'main')", (name,)
    ).fetchall():
        if not is_unique or partial:
            continue
        cols = [r[0] for r in cur.execute("SELECT name FROM pragma_index_info(?, 'main')", (index_name,)).fetchall()]
        if len(cols) == 1 and cols[0] is not None:
            unique.add(cols[0])

    pk_columns = [info for info in infos if info[5]]
    # AUTOINCREMENT is only legal on the INTEGER PRIMARY KEY column, so its
    # presence in the CREATE statement pins down that one column.
    auto = has_autoincrement(tokens)
    columns = tuple(
        ColumnShape(
            name=col_name,
            declared_type=decl or "",
            not_null=bool(notnull),
            default=dflt,
            pk_index=int(pk),
            unique=col_name in unique or (bool(pk) and len(pk_columns) == 1),
            autoincrement=bool(pk) and len(pk_columns) == 1 and auto and (decl or "").strip().upper() == "INTEGER",
        )
        for _cid, col_name, decl, notnull, dflt, pk in infos
    )
    return TableShape(name=name, columns=columns, without_rowid=is_without_rowid(tokens))


# ---------------------------------------------------------------------------
# A just-good-enough SQL tokenizer: enough to tell keywords from the same
# words inside string literals, quoted identifiers and comments.

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
    | (?P<string>'(?:[^']|'')*(?:'|\Z))
    | (?P<ident>"(?:[^"]|"")*(?:"|\Z)|`(?:[^`]|``)*(?:`|\Z)|\[[^\]]*(?:\]|\Z))
    | (?P<word>[^\W\d]\w*|\d\w*)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)


def sql_tokens(sql: str) -> list[tuple[str, str]]:
    """``(kind, text)`` pairs for ``sql`` without spaces and comments; words
    are upper-cased so keyword checks are case-insensitive."""
    out: list[tuple[str, str]] = []
    for match in _TOKEN.finditer(sql):
        kind = match.lastgroup or "punct"
        if kind in ("space", "comment"):
            continue
        text = match.group()
        out.append((kind, text.upper() if kind == "word" else text))
    return out


def has_autoincrement(tokens: list[tuple[str, str]]) -> bool:
    """True when a column constraint reads ``PRIMARY KEY [ASC|DESC]
    [ON CONFLICT x] AUTOINCREMENT`` — the only place SQLite accepts the
    keyword — outside strings, quoted names and comments."""
    words = [text if kind == "word" else None for kind, text in tokens]
    for i, word in enumerate(words):
        if word != "AUTOINCREMENT":
            continue
        j = i - 1
        if j >= 2 and words[j - 2] == "ON" and words[j - 1] == "CONFLICT":
            j -= 3
        if j >= 0 and words[j] in ("ASC", "DESC"):
            j -= 1
        if j >= 1 and words[j] == "KEY" and words[j - 1] == "PRIMARY":
            return True
    return False


def is_without_rowid(tokens: list[tuple[str, str]]) -> bool:
    """True for ``CREATE TABLE ... (...) WITHOUT ROWID``: looks only after the
    column list closes, so a column named "without" can't fool it."""
    depth = 0
    closed = False
    tail: list[str] = []
    for kind, text in tokens:
        if kind == "punct" and text == "(":
            depth += 1
        elif kind == "punct" and text == ")":
            depth -= 1
            if depth == 0:
                closed = True
                tail = []
        elif closed and depth == 0 and kind == "word":
            tail.append(text)
    return any(a == "WITHOUT" and b == "ROWID" for a, b in zip(tail, tail[1:]))
