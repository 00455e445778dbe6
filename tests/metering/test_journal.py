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
    journal.close()  # as a process's death does
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
    journal.close()
    restarted = Journal(tmp_path)
    restarted.append([_report(1, 2000, call="2")])
    assert restarted.take() == [_report(1, 1000, call="1"), _report(1, 2000, call="2")]
    restarted.done()
    assert restarted.depth == 0
    restarted.close()
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
    journal.close()
    journal = Journal(tmp_path)
    assert journal.slot == 0
    assert journal.depth <= 3 + 1024 + 3
    assert journal.take() == [_report(3600, 3_600_000, call=c) for c in "123"]
    journal.done()
    assert journal.depth == 0


def test_replays_tried_through_an_outage_keep_what_is_set_aside_small(
    tmp_path: Path,
) -> None:
    """Every tick appends and tries a replay that fails: a line per call stays."""
    journal = Journal(tmp_path)
    for tick in range(1, 601):
        journal.append([_report(tick, tick * 1000, call=c) for c in "123"])
        assert journal.take() == [_report(tick, tick * 1000, call=c) for c in "123"]
        assert journal.depth == 3  # the store is still down: no done()
    lines = (tmp_path / "meter.replaying.jsonl").read_bytes().count(b"\n")
    assert lines == 3


def test_processes_sharing_a_directory_keep_their_own_journals(tmp_path: Path) -> None:
    """Each live journal holds a slot; a dead one's slot and reports go to the next."""
    first, second = Journal(tmp_path), Journal(tmp_path)
    assert (first.slot, second.slot) == (0, 1)
    first.append([_report(1, 1000, call="1")])
    second.append([_report(1, 2000, call="2")])
    assert second.take() == [_report(1, 2000, call="2")]
    second.done()
    assert first.depth == 1
    second.close()  # the second process dies; a third starts in its place
    third = Journal(tmp_path)
    assert (third.slot, third.depth, third.take()) == (1, 0, [])
    first.close()
    third.close()
    assert Journal(tmp_path).take() == [_report(1, 1000, call="1")]
