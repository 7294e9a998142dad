"""store.query's byte cap against a real daemon: a too-large result fails
cleanly, before it is built, and the daemon's memory stays bounded
(issue 10 item 7: 3,000 rows of 100 KB blobs drove a daemon to 2 GB RSS,
1.29 GB kept after)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from p2ps_helpers import DaemonProcess, unique, write_config

from p2pstore.config import Config
from p2pstore.errors import ResultTooLarge
from p2pstore.protocol.results import MAX_RESULT_BYTES

#: Rows of a 100 KB blob without end: only a cap counted while reading stops it.
ENDLESS = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
           "SELECT x, randomblob(100000) FROM c")


def rss_mb(d: DaemonProcess) -> float:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_result_over_the_configured_cap_fails_cleanly_and_memory_stays_bounded(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    d = start_daemon("cap", "--config", str(write_config(tmp_path, f"max_result_bytes = {4 << 20}\n")))
    store = unique("cap")
    with d.client() as c:
        c.call("store.open", store=store)
        c.call("store.execute", store=store, sql="CREATE TABLE B (id INTEGER PRIMARY KEY, data BLOB)")
        c.call("store.execute", store=store,
               sql="INSERT INTO B WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 60) "
                   "SELECT x, randomblob(100000) FROM c")  # 6 MB of blobs, 8 MB as JSON
        before = rss_mb(d)
        for _ in range(5):
            with pytest.raises(ResultTooLarge) as info:
                c.call("store.query", store=store, sql="SELECT * FROM B")
            assert "LIMIT" in info.value.message and "OFFSET" in info.value.message
            assert info.value.data["max_bytes"] == 4 << 20
            with pytest.raises(ResultTooLarge):
                c.call("store.query", store=store, sql=ENDLESS)  # never ends without the cap
        page = c.call("store.query", store=store, sql="SELECT * FROM B ORDER BY id LIMIT 20 OFFSET 10")
        assert [r[0] for r in page["rows"]] == list(range(11, 31))
        after = rss_mb(d)
        assert after - before < 40, f"daemon RSS grew from {before:.0f} MB to {after:.0f} MB"
        assert c.call("store.query", store=store, sql="SELECT count(*) FROM B")["rows"] == [[60]]
    assert d.proc is not None and d.proc.poll() is None


def test_the_default_cap_is_256_mib_and_stops_an_endless_result(start_daemon: Callable[..., DaemonProcess]) -> None:
    assert Config().max_result_bytes == MAX_RESULT_BYTES == 256 << 20
    d = start_daemon("default-cap")
    store = unique("dcap")
    with d.client() as c:
        c.call("store.open", store=store)
        before = rss_mb(d)
        with pytest.raises(ResultTooLarge) as info:
            c.call("store.query", store=store, sql=ENDLESS)
        assert info.value.data["max_bytes"] == 256 << 20 and "256 MiB" in info.value.message
        after = rss_mb(d)
        # About 190 MB of blobs were read before the cap: given back, not kept.
        assert after - before < 100, f"daemon RSS grew from {before:.0f} MB to {after:.0f} MB"
        # A big result that fits (1,000 x 100 KB, 133 MB of JSON) arrives whole; its memory is given back too.
        big = c.call("store.query", store=store, sql=ENDLESS + " LIMIT 1000")
        assert len(big["rows"]) == 1000 and big["rows"][-1][0] == 1000
        del big
        after = rss_mb(d)
        assert after - before < 100, f"daemon RSS grew from {before:.0f} MB to {after:.0f} MB after a big result"
        assert c.call("store.query", store=store, sql="SELECT 1")["rows"] == [[1]]
