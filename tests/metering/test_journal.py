"""Tests for the local journal of reports the store could not take."""

from __future__ import annotations

from pathlib import Path

from metering.journal import Journal, latest
from metering.quota import Report


def _report(
    seq: int,
    used_ms: int,
    end_reason: str | None = None,
    call: str = "1",
    day: str = "2026-12-03",
) -> Report:
    return Report(
        workspace_id="ws_aaaaaaaaaaaaaaaa",
        call_sid="CA" + call * 32,
        period="2026-12",
        day=day,
        seq=seq,
        used_ms=used_ms,
        want_ms=30_000,
        now_ms=1_796_256_000_000 + used_ms,
        lease_ms=10_000,
        limit_ms=3_600_000,
        agent_id="ag_aaaaaaaaaaaaaaaa",
        number="+15005550001",
        end_reason=end_reason,
    )


def test_journal_keeps_reports_in_order_across_restarts(tmp_path: Path) -> None:
    """Appended reports come back in order, even from a new Journal object."""
    journal = Journal(tmp_path)
    journal.append([_report(1, 1000, call="1"), _report(1, 2000, call="2")])
    journal.append([_report(2, 2500, "caller_hung_up", call="1")])
    assert journal.depth == 3
    again = Journal(tmp_path)
    assert again.depth == 3
    # A call's older report is superseded by its later one.
    assert again.take() == [
        _report(1, 2000, call="2"),
        _report(2, 2500, "caller_hung_up", call="1"),
    ]


def test_journal_forgets_only_after_done(tmp_path: Path) -> None:
    """Taken reports stay on disk until done(); a crash before that keeps them."""
    journal = Journal(tmp_path)
    journal.append([_report(1, 1000, call="1")])
    assert journal.take() == [_report(1, 1000, call="1")]
    # A crash here: the next process takes the same reports again, plus new ones.
    restarted = Journal(tmp_path)
    restarted.append([_report(1, 2000, call="2")])
    assert restarted.take() == [_report(1, 1000, call="1"), _report(1, 2000, call="2")]
    restarted.done()
    assert restarted.depth == 0
    assert Journal(tmp_path).take() == []


def test_latest_keeps_each_calls_last_report_per_day_in_order() -> None:
    """Older reports of a call go; a day's last report stays beside the next day's."""
    reports = [
        _report(1, 1000, call="1"),
        _report(1, 500, call="2"),
        _report(2, 2000, call="1"),
        _report(3, 3000, call="1", day="2026-12-04"),
        _report(2, 900, "caller_hung_up", call="2"),
        _report(4, 3500, call="1", day="2026-12-04"),
    ]
    assert latest(reports) == [
        _report(2, 2000, call="1"),
        _report(2, 900, "caller_hung_up", call="2"),
        _report(4, 3500, call="1", day="2026-12-04"),
    ]


def test_journal_stays_small_through_a_long_outage(tmp_path: Path) -> None:
    """An hour of one-second ticks for three calls keeps about a line per call."""
    journal = Journal(tmp_path)
    for tick in range(1, 3601):
        journal.append([_report(tick, tick * 1000, call=c) for c in "123"])
        assert journal.depth <= 3 + 1024 + 3
    assert Journal(tmp_path).depth == journal.depth
    assert journal.take() == [_report(3600, 3_600_000, call=c) for c in "123"]
    journal.done()
    assert journal.depth == 0
