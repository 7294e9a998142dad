"""How big a query result may get: the one rule ``store.query`` and remote query share.

A result is held whole to answer one API call and then written as one JSON
line, so it is capped in rows and in the bytes of that line. Both are
counted row by row while the rows are read, so an oversized result fails
after reading at most one row past the cap, never after building the whole
of it (3,000 rows of 100 KB blobs once took a daemon to 2 GB).

Sizes are those of the API's JSON line (``api/jsonrpc.py``: BLOBs as
``{"$blob": "<base64>"}``, text as UTF-8 with JSON escapes), an upper bound
that is exact for the common cases: what counts is what the daemon builds
and the client reads.
"""

from __future__ import annotations

from typing import Any, Sequence

from p2pstore.errors import ResultTooLarge

#: Rows one result may hold (store.query and store.remote_query).
MAX_RESULT_ROWS = 200_000
#: Default and largest ``max_result_bytes``: bytes of JSON one result may take.
MAX_RESULT_BYTES = 256 * 1024 * 1024

#: Control characters, which JSON writes as an escape of up to 6 bytes (``\u001f``).
_DROP_CONTROL = dict.fromkeys(range(32))
_BLOB_WRAPPER = len('{"$blob":""}')


def json_size(value: Any) -> int:
    """Bytes ``value`` (a SQLite value) takes in the API's JSON line, at most."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (len(value) + 2) // 3 * 4 + _BLOB_WRAPPER
    if isinstance(value, str):
        size = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
        controls = len(value) - len(value.translate(_DROP_CONTROL))
        return size + 2 + value.count('"') + value.count("\\") + 5 * controls
    if value is None or isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return 20
    return 24  # a float's repr, or "inf"


class ResultBudget:
    """Counts a result's rows and bytes as they are read; raises ResultTooLarge past either cap."""

    def __init__(self, *, max_bytes: int = MAX_RESULT_BYTES, max_rows: int = MAX_RESULT_ROWS, source: str = "the query",
                 hint: str = "add a LIMIT and page with OFFSET", data: dict[str, Any] | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_rows = max_rows
        self.source = source
        self.hint = hint
        self.data = data or {}
        self.rows = 0
        self.bytes = 0

    def add_columns(self, columns: Sequence[str]) -> None:
        self.bytes += sum(json_size(c) + 1 for c in columns) + 2
        self._check()

    def add(self, row: Sequence[Any]) -> None:
        self.rows += 1
        self.bytes += sum(json_size(v) + 1 for v in row) + 3  # [..] and the comma after it
        self._check()

    def _check(self) -> None:
        if self.rows > self.max_rows or self.bytes > self.max_bytes:
            raise ResultTooLarge(
                f"{self.source} returns more than {self.max_rows} rows or {_show_bytes(self.max_bytes)} of JSON "
                f"(max_result_bytes); {self.hint}",
                data={**self.data, "max_rows": self.max_rows, "max_bytes": self.max_bytes},
            )


def _show_bytes(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"
