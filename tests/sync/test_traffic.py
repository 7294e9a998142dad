"""sync/traffic.py: the per-peer counters, without daemons."""

from __future__ import annotations

from p2pstore.sync.traffic import FIELDS, Traffic


def test_a_peer_never_synced_with_reads_as_zeros() -> None:
    t = Traffic()
    assert t.peer_dict("P") == dict.fromkeys(FIELDS, 0)
    assert t.totals() == dict.fromkeys(FIELDS, 0)


def test_rows_that_changed_nothing_count_as_duplicates() -> None:
    t = Traffic()
    t.session("P", served=True)
    t.received("P", 1000, rows=10, applied=6, conflicts=1, failed=1)
    t.received("P", 500, rows=4, applied=0, conflicts=0, failed=0)
    got = t.peer_dict("P")
    assert got["sessions_served"] == 1 and got["sessions_started"] == 0
    assert got["batches_received"] == 2 and got["bytes_received"] == 1500 and got["rows_received"] == 14
    assert got["rows_applied"] == 6 and got["conflicts"] == 1 and got["failed"] == 1
    assert got["duplicates_received"] == 2 + 4
    assert got["commits_received"] == 0  # the engine says when a transaction applied them
    t.committed("P")
    assert t.peer_dict("P")["commits_received"] == 1 and t.totals()["commits_received"] == 1


def test_sent_and_acked_and_totals_over_peers() -> None:
    t = Traffic()
    t.session("P", served=False)
    t.sent("P", 300)
    t.sent("P", 200)
    t.acked("P", 7)
    t.session("Q", served=False)
    t.sent("Q", 50)
    assert t.peer_dict("P")["batches_sent"] == 2 and t.peer_dict("P")["bytes_sent"] == 500
    assert t.peer_dict("P")["rows_sent"] == 7
    totals = t.totals()
    assert totals["sessions_started"] == 2 and totals["batches_sent"] == 3 and totals["bytes_sent"] == 550
    # a copy: changing it changes no counter
    totals["bytes_sent"] = 0
    assert t.totals()["bytes_sent"] == 550
