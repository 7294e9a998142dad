"""Device IDs as small numbers in the clock tables.

Every clock names the device that wrote it (its *origin*). A device ID is 56
characters; stored as text in each log row, row clock and cell clock of a
store, it was a third of the store's size after a sync (docs/performance.md).
The clock tables (``_p2p_log``, ``_p2p_rows``, ``_p2p_cells``, ``_p2p_tombs``)
therefore store a number instead, ``_p2p_origins.id``, and the IDs once.

Invariants:

- NULL still means "this device" in ``origin`` (a local change) and, beside
  a ``prev_hlc``, in ``prev_origin``; a number always has its
  ``_p2p_origins`` row (written in the transaction that first uses it).
- Numbers are local to a file: they never travel. What leaves the store
  (batches, views, conflicts, failures, the API) carries device IDs.
- Numbers are never reused or renumbered, so a cached mapping only grows;
  a rolled-back transaction may take a new number back with it, so a cache
  is reloaded after a rollback (``Origins.reload``).
"""

from __future__ import annotations

import sqlite3

SCHEMA_SQL = "CREATE TABLE IF NOT EXISTS _p2p_origins(id INTEGER PRIMARY KEY, device TEXT NOT NULL UNIQUE);"


def device_sql(column: str, me: str) -> str:
    """SQL giving the device ID of the stored origin ``column``, with ``me``
    (an SQL expression: a parameter) for NULL — this device."""
    return f"CASE WHEN {column} IS NULL THEN {me} ELSE (SELECT o.device FROM _p2p_origins o WHERE o.id = {column}) END"


class Origins:
    """The number ↔ device ID mapping of one store, cached per connection user."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._ids: dict[str, int] = {}
        self._devices: dict[int, str] = {}
        self.reload(conn)

    def reload(self, conn: sqlite3.Connection) -> None:
        """Read the mapping again (after a rollback that may have taken numbers back)."""
        self._devices = dict(conn.execute("SELECT id, device FROM _p2p_origins"))
        self._ids = {device: n for n, device in self._devices.items()}

    def number(self, conn: sqlite3.Connection, device: str) -> int:
        """The number of ``device``, given one in the caller's transaction if it has none."""
        n = self._ids.get(device)
        if n is None:
            conn.execute("INSERT OR IGNORE INTO _p2p_origins(device) VALUES (?)", (device,))
            n = int(conn.execute("SELECT id FROM _p2p_origins WHERE device = ?", (device,)).fetchone()[0])
            self._ids[device], self._devices[n] = n, device
        return n

    def known(self, device: str) -> int | None:
        """The number of ``device`` if it has one (None: none yet; nothing is written)."""
        return self._ids.get(device)

    def device(self, n: int) -> str:
        """The device ID of number ``n`` (a KeyError would be a broken file)."""
        return self._devices[n]
