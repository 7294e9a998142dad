"""Micro-measure of a block as a SQLite image against today's msgpack block
(docs/performance.md, round 8): one block of 1,000 rows of the
``push_outside`` shape, each step timed alone (median of 200).

    .venv/bin/python scripts/block_image_micro.py

Today: msgpack encode, decode (unpack + ``block_from_plain``), staging
(``store/blocks.py load``). Image: built from Python rows (``executemany``
into an in-memory database + ``serialize``), the checks ``block_from_plain``
makes as SQL over the attached image, ``quick_check``, and the staging as
one ``INSERT ... SELECT``. Nothing here is used by the daemon.
"""

from __future__ import annotations

import os
import random
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pstore.protocol import batch as wire  # noqa: E402
from p2pstore.store import blocks  # noqa: E402

N = 1000
COLUMNS = ("AGE", "CODES", "NAME", "SALARY")  # (in name order, as the sender reads them; NAME is the key)
CREATE = "CREATE TABLE b(k, seq, hlc, o, ph, po, th, tor, tph, tpo, " + ", ".join(f"v{i}" for i in range(len(COLUMNS))) + ")"
#: block_from_plain's rules for one row (single_version), as one SQL expression
ROW_OK = ("typeof(seq) = 'integer' AND seq >= 0 AND k IS NOT NULL AND (hlc IS NULL) = (o IS NULL) "
          "AND (hlc IS NULL OR (typeof(hlc) = 'integer' AND hlc >= 0)) AND (o IS NULL OR (typeof(o) = 'integer' AND o BETWEEN 0 AND ?1)) "
          "AND (ph IS NULL) = (po IS NULL) AND (th IS NULL) = (tor IS NULL) AND (tph IS NULL) = (tpo IS NULL) "
          "AND (ph IS NULL OR hlc IS NOT NULL) AND (tph IS NULL OR th IS NOT NULL) AND NOT (hlc IS NULL AND th IS NULL)")


def median_ms(step: Callable[[], object], runs: int = 200) -> float:
    step()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return round(sorted(times)[runs // 2] * 1000, 3)


def main() -> None:
    rows = []
    for i in range(N):
        key = uuid.uuid4().hex
        rows.append([key, i + 1, 1_000_000 + i, 0, None, None, None, None, None, None,
                     random.randint(0, 100), os.urandom(5), key, random.random() * 1000])
    block = wire.Block("EMPLOYEE", "NAME", COLUMNS, ("D" * 32,), rows)
    batch = wire.OutBatch("single_version", 0, N, (), False, True, "s", blocks=(block,))
    conn = sqlite3.connect(":memory:")
    conn.execute("PRAGMA temp_store = MEMORY")
    payload = wire.encode(batch)
    decoded = wire.decode(payload).blocks[0]
    columns = wire.Columns.of(decoded)
    print("msgpack bytes", len(payload))
    print("encode (msgpack) ms", median_ms(lambda: wire.encode(batch)))
    print("decode (unpack + checks) ms", median_ms(lambda: wire.decode(payload)))
    print("staging executemany ms", median_ms(lambda: blocks.load(conn, decoded, columns)))

    def image() -> bytes:
        mem = sqlite3.connect(":memory:")
        mem.execute(CREATE)
        mem.executemany(f"INSERT INTO b VALUES ({', '.join('?' * len(rows[0]))})", rows)
        mem.commit()
        data = mem.serialize()
        mem.close()
        return data

    data = image()
    print("image bytes", len(data))
    print("image from Python rows ms", median_ms(image))
    check = sqlite3.connect(":memory:")
    check.execute("ATTACH ':memory:' AS img")
    check.deserialize(data, name="img")
    assert check.execute("SELECT type, name, tbl_name, sql FROM img.sqlite_schema").fetchall() == [("table", "b", "b", CREATE)]
    print("deserialize ms", median_ms(lambda: check.deserialize(data, name="img")))
    for what, sql in [("row checks", f"SELECT sum(NOT ({ROW_OK})) FROM img.b"),
                      ("distinct keys", "SELECT count(DISTINCT k) FROM img.b"),
                      ("text keys' bytes", "SELECT CAST(group_concat(CAST(k AS BLOB), char(0)) AS BLOB) FROM img.b WHERE typeof(k) = 'text'"),
                      ("quick_check", "PRAGMA img.quick_check")]:
        print(f"{what} ms", median_ms(lambda: check.execute(sql, (0,) if "?1" in sql else ()).fetchall()))
    conn.execute("ATTACH ':memory:' AS p2p_in")
    values = ", ".join(f"v{i}" for i in range(len(COLUMNS)))

    def stage_image() -> None:
        stage = blocks.stage_table(conn, len(COLUMNS))
        conn.deserialize(data, name="p2p_in")
        conn.execute(f"INSERT INTO temp.{stage}(k, hlc, o, {values}) SELECT k, hlc, o, {values} FROM p2p_in.b ORDER BY rowid")

    print("staging from the image ms", median_ms(stage_image))


if __name__ == "__main__":
    main()
