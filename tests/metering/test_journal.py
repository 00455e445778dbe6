"""Tests for the local journal of reports the store could not take."""

from __future__ import annotations

from pathlib import Path

from metering.journal import Journal
from metering.quota import Report


def _report(seq: int, used_ms: int, end_reason: str | None = None) -> Report:
    return Report(
        workspace_id="ws_aaaaaaaaaaaaaaaa",
        call_sid="CA" + "1" * 32,
        period="2026-12",
        day="2026-12-03",
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
    journal.append([_report(1, 1000), _report(2, 2000)])
    journal.append([_report(3, 2500, "caller_hung_up")])
    assert journal.depth == 3
    again = Journal(tmp_path)
    assert again.depth == 3
    assert again.take() == [
        _report(1, 1000),
        _report(2, 2000),
        _report(3, 2500, "caller_hung_up"),
    ]


def test_journal_forgets_only_after_done(tmp_path: Path) -> None:
    """Taken reports stay on disk until done(); a crash before that keeps them."""
    journal = Journal(tmp_path)
    journal.append([_report(1, 1000)])
    assert journal.take() == [_report(1, 1000)]
    # A crash here: the next process takes the same reports again, plus new ones.
    restarted = Journal(tmp_path)
    restarted.append([_report(2, 2000)])
    assert restarted.take() == [_report(1, 1000), _report(2, 2000)]
    restarted.done()
    assert restarted.depth == 0
    assert Journal(tmp_path).take() == []
