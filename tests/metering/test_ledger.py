"""Tests for call records and usage counters, on a real Valkey."""

from __future__ import annotations

import pytest
import redis.asyncio as redis

from metering.ledger import CallNotFoundError, Ledger, day_of, month_of
from metering.quota import Quota, Report
from tenancy import keyspace

CALL = "CA" + "a" * 32
NUMBER = "+14155550100"


@pytest.fixture
def ids() -> tuple[str, str]:
    """A fresh workspace id and agent id."""
    return keyspace.new_id("ws"), keyspace.new_id("ag")


async def _open(ledger: Ledger, workspace: str, agent: str, at_ms: int) -> None:
    await ledger.open_call(
        workspace,
        CALL,
        agent_id=agent,
        from_number="+12125550123",
        to_number=NUMBER,
        arrived_at_ms=at_ms,
    )
    await ledger.start_call(
        workspace,
        CALL,
        agent_id=agent,
        number=NUMBER,
        stream_sid="MZ" + "b" * 32,
        started_at_ms=at_ms,
        period=month_of(at_ms),
        day=day_of(at_ms),
    )


_seq = iter(range(1, 1000))


async def _report(
    store: redis.Redis,
    workspace: str,
    agent: str,
    metered_ms: int,
    at_ms: int,
    end_reason: str | None = None,
    *,
    cost: tuple[int, int, int] = (0, 0, 0),
) -> list[object]:
    """Report through report.lua with no grant, as a budget-less call does.

    ``cost`` is a final report's (cost, caller's leg part, Twilio rate).
    """
    reply = await Quota(store).report(
        Report(
            workspace_id=workspace,
            call_sid=CALL,
            period=month_of(at_ms),
            day=day_of(at_ms),
            seq=next(_seq),
            used_ms=metered_ms,
            want_ms=0,
            now_ms=at_ms,
            lease_ms=0,
            limit_ms=0,
            agent_id=agent,
            number=NUMBER,
            end_reason=end_reason,
            cost_micros=cost[0],
            caller_leg_micros=cost[1],
            twilio_micros_per_minute=cost[2],
        )
    )
    return [-1 if reply.state == "closed" and not reply.added_ms else reply.added_ms]


def test_periods_are_utc_months_and_days() -> None:
    """Epoch milliseconds map to their UTC month and day."""
    assert month_of(1_796_256_000_000) == "2026-12"
    assert day_of(1_796_256_000_000) == "2026-12-03"


async def test_cumulative_reports_never_count_twice(
    store: redis.Redis, ids: tuple[str, str]
) -> None:
    """Retried and reordered reports add only what is new."""
    workspace, agent = ids
    ledger = Ledger(store)
    at = 1_796_256_000_000
    await _open(ledger, workspace, agent, at)
    assert await _report(store, workspace, agent, 1000, at) == [1000]
    assert await _report(store, workspace, agent, 1000, at) == [0]
    assert await _report(store, workspace, agent, 2500, at) == [1500]
    assert await _report(store, workspace, agent, 2000, at) == [0]
    usage = await ledger.usage(workspace, "2026-12")
    assert (usage.ms, usage.calls) == (2500, 1)
    assert usage.agents[agent].ms == 2500
    assert usage.numbers[NUMBER].ms == 2500
    assert (await ledger.usage(workspace, "2026-12-03")).ms == 2500


async def test_final_report_closes_the_record_once(
    store: redis.Redis, ids: tuple[str, str]
) -> None:
    """The end report sets the end time and reason; a replay keeps the first."""
    workspace, agent = ids
    ledger = Ledger(store)
    at = 1_796_256_000_000
    await _open(ledger, workspace, agent, at)
    await _report(store, workspace, agent, 6000, at + 6000, "caller_hung_up")
    await _report(store, workspace, agent, 6000, at + 9000, "agent_hung_up")
    record = await ledger.get_call(workspace, CALL)
    assert record.status == "completed"
    assert record.metered_ms == 6000
    assert record.ended_at_ms == at + 6000
    assert record.end_reason == "caller_hung_up"


async def test_start_counts_a_call_once(
    store: redis.Redis, ids: tuple[str, str]
) -> None:
    """A repeated start does not count the call again."""
    workspace, agent = ids
    ledger = Ledger(store)
    at = 1_796_256_000_000
    await _open(ledger, workspace, agent, at)
    again = await ledger.start_call(
        workspace,
        CALL,
        agent_id=agent,
        number=NUMBER,
        stream_sid="MZ" + "b" * 32,
        started_at_ms=at + 5,
        period=month_of(at + 5),
        day=day_of(at + 5),
    )
    assert again is False
    assert (await ledger.usage(workspace, "2026-12")).calls == 1


async def test_a_late_start_does_not_reopen_a_settled_call(
    store: redis.Redis, ids: tuple[str, str]
) -> None:
    """A leg's "in-progress" that arrives after its end report starts nothing."""
    workspace, agent = ids
    ledger = Ledger(store)
    at = 1_796_256_000_000
    await ledger.open_call(
        workspace,
        CALL,
        agent_id=agent,
        from_number="+12125550123",
        to_number=NUMBER,
        arrived_at_ms=at,
    )
    await _report(store, workspace, agent, 0, at + 2000, "upstream_failed")
    late = await ledger.start_call(
        workspace,
        CALL,
        agent_id=agent,
        number=NUMBER,
        stream_sid="",
        started_at_ms=at + 2500,
        period=month_of(at),
        day=day_of(at),
    )
    assert late is False
    record = await ledger.get_call(workspace, CALL)
    assert (record.status, record.started_at_ms) == ("completed", None)
    assert (await ledger.usage(workspace, "2026-12")).calls == 0


async def test_reports_for_unknown_calls_change_nothing(
    store: redis.Redis, ids: tuple[str, str]
) -> None:
    """Metering a call with no record neither creates it nor counts time."""
    workspace, agent = ids
    ledger = Ledger(store)
    assert await _report(store, workspace, agent, 5000, 1_796_256_000_000) == [-1]
    assert (await ledger.usage(workspace, "2026-12")).ms == 0
    with pytest.raises(CallNotFoundError):
        await ledger.get_call(workspace, CALL)


async def test_twilio_status_ignores_stale_callbacks(
    store: redis.Redis, ids: tuple[str, str]
) -> None:
    """A callback with a lower sequence number never overwrites a later one."""
    workspace, agent = ids
    ledger = Ledger(store)
    await _open(ledger, workspace, agent, 1_796_256_000_000)
    assert await ledger.record_twilio_status(
        workspace, CALL, status="completed", call_duration_secs=7, sequence=2
    )
    assert not await ledger.record_twilio_status(
        workspace, CALL, status="in-progress", call_duration_secs=None, sequence=1
    )
    record = await ledger.get_call(workspace, CALL)
    assert (record.twilio_status, record.twilio_call_duration_secs) == ("completed", 7)
    with pytest.raises(CallNotFoundError):
        await ledger.record_twilio_status(
            workspace,
            "CA" + "f" * 32,
            status="completed",
            call_duration_secs=1,
            sequence=0,
        )


@pytest.mark.parametrize("twilio_first", [False, True])
async def test_twilio_duration_reprices_the_callers_leg(
    store: redis.Redis, ids: tuple[str, str], twilio_first: bool
) -> None:
    """Twilio's duration prices the caller's leg, whichever report comes first.

    Callgate metered 50 s (one Twilio minute, 8 500) of a call Twilio billed
    for 61 s (two minutes): the cost moves by one minute in the record, the
    month and the day it settled into, and a repeated callback moves nothing.
    """
    workspace, agent = ids
    ledger = Ledger(store)
    at_ms = 1_796_256_000_000
    await _open(ledger, workspace, agent, at_ms)
    platform = 41_667
    settle = (8_500 + platform, 8_500, 8_500)

    async def twilio(sequence: int) -> bool:
        return await ledger.record_twilio_status(
            workspace,
            CALL,
            status="completed",
            call_duration_secs=61,
            sequence=sequence,
        )

    if twilio_first:
        assert await twilio(3)
    await _report(
        store, workspace, agent, 50_000, at_ms + 50_000, "caller_hung_up", cost=settle
    )
    if not twilio_first:
        assert await twilio(3)
    assert not await twilio(3)
    assert await ledger.record_twilio_status(
        workspace, CALL, status="completed", call_duration_secs=61, sequence=4
    )

    expected = 2 * 8_500 + platform
    assert (await ledger.get_call(workspace, CALL)).cost_micros == expected
    assert (await ledger.usage(workspace, month_of(at_ms))).cost_micros == expected
    assert (await ledger.usage(workspace, day_of(at_ms))).cost_micros == expected


async def test_pages_never_lose_calls_that_arrived_in_the_same_millisecond(
    store: redis.Redis, ids: tuple[str, str]
) -> None:
    """Pages of two walk seven calls, five of them in one millisecond, each once."""
    workspace, agent = ids
    ledger = Ledger(store)
    arrivals = {f"CA{index:032x}": 1_000 for index in range(5)}
    arrivals["CA" + "e" * 32] = 2_000
    arrivals["CA" + "f" * 32] = 500
    for sid, at_ms in arrivals.items():
        await ledger.open_call(
            workspace,
            sid,
            agent_id=agent,
            from_number="+12125550123",
            to_number=NUMBER,
            arrived_at_ms=at_ms,
        )
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        page, cursor = await ledger.recent_calls(workspace, 2, after=cursor)
        seen += [record.call_sid for record in page]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 7
    # Newest first; within a millisecond, by sid.
    assert seen == sorted(arrivals, key=lambda sid: (arrivals[sid], sid), reverse=True)
    # A time bound still applies with a cursor, and a caller filter pages too.
    page, _ = await ledger.recent_calls(
        workspace, 10, after=(1_000, seen[2]), since_ms=1_000
    )
    assert [record.call_sid for record in page] == seen[3:6]
    page, cursor = await ledger.recent_calls(workspace, 10, before_ms=1_000)
    assert ([record.call_sid for record in page], cursor) == ([seen[-1]], None)
