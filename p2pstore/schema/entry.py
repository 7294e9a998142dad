"""Reading the entries of a sync_schema.json document.

Written defensively: the store also reads documents that failed layer 1
(to report what it can), so a reader skips what isn't shaped rather than
raising. Pure, like the rest of ``p2pstore.schema`` but ``shape``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def find_db_entry(doc: dict[str, Any], bundle: str, db_name: str) -> tuple[int, dict[str, Any]] | None:
    """The entry of ``dbSchema`` for store ``(bundle, db_name)`` and its index."""
    dbs = doc.get("dbSchema") if isinstance(doc, dict) else None
    if not isinstance(dbs, list):
        return None
    for i, db in enumerate(dbs):
        if isinstance(db, dict) and db.get("bundleName") == bundle and db.get("dbName") == db_name:
            return i, db
    return None


def fields(entry: Mapping[str, Any]) -> list[tuple[int, Mapping[str, Any]]]:
    """``(index, field)`` of a table entry's fields that name a column."""
    described = entry.get("fields")
    if not isinstance(described, list):
        return []
    return [(k, f) for k, f in enumerate(described) if isinstance(f, dict) and isinstance(f.get("columnName"), str)]


def field_index(entry: Mapping[str, Any], column: str) -> int | None:
    """Index in ``fields`` of the first field describing ``column``."""
    for k, fld in fields(entry):
        if fld["columnName"] == column:
            return k
    return None


def sync_list(entry: Mapping[str, Any]) -> list[Any] | None:
    """``deviceSyncFields`` as written, or None when absent (or not a list)."""
    sync = entry.get("deviceSyncFields")
    return sync if isinstance(sync, list) else None


def sync_columns(entry: Mapping[str, Any]) -> list[str]:
    """The columns that actually travel: deviceSyncFields entries that are
    also described in ``fields`` (the seed: a sync column missing from fields
    is not synced). In deviceSyncFields order, without repeats."""
    described = {f["columnName"] for _, f in fields(entry)}
    result: list[str] = []
    for col in sync_list(entry) or []:
        if isinstance(col, str) and col in described and col not in result:
            result.append(col)
    return result


def conflict_column(entry: Mapping[str, Any]) -> str | None:
    """The conflict-resolution column (the one field with
    ``"primaryKey": true``), or None when there are zero or several."""
    marked = [f["columnName"] for _, f in fields(entry) if f.get("primaryKey") is True]
    return marked[0] if len(marked) == 1 else None
