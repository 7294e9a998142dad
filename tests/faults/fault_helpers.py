"""Helpers of the fault suite (a unique module name, like the other folders' helpers)."""

from __future__ import annotations

from pathlib import Path

from sync_helpers import sqlite3_shell


def table_digest(path: Path | str, table: str, columns: str, key: str) -> tuple[int, int, str]:
    """(rows, distinct keys, SHA3-256 of ``columns`` in ``key`` order) of ``table`` in the file at
    ``path``, all computed by SQLite (the ``sqlite3`` shell's ``sha3_query``: values with their types).

    ``sha3_query`` hashes the statement text too, so every file is hashed
    through the same text: a TEMP view (nothing is written to the store)
    names the table, which may be called differently on each device.
    """
    sql = (f'CREATE TEMP VIEW synced AS SELECT {columns} FROM "{table}";'
           f"SELECT count(*), count(DISTINCT {key}), hex(sha3_query('SELECT * FROM synced ORDER BY {key}')) FROM synced;")
    out = sqlite3_shell(path, sql)
    assert out.returncode == 0, f"{path}: {out.stderr}"
    count, distinct, digest = out.stdout.strip().split("|")
    return int(count), int(distinct), digest
