"""Budgets enforced live: plans, admission, the mid-call cut-off, the sweeper."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from metering.plans import bill_ms, period_of
from metering.quota import Quota
from router import budget
from tenancy.workspaces import now_ms
from tests.harness import Harness, running_callgate
from tests.peers.audio import split_frames, tone_mulaw

NUMBER = "+15005550001"
CALLER = "+14155551212"
# A 3 s budget: no included minutes, overage capped at 3000 micro-dollars at
# $0.06 a minute (60000 micros), which buys exactly 3000 ms.
THREE_SECONDS: dict[str, Any] = {
    "included_minutes": 0,
    "overage": "money",
    "overage_limit": 3_000,
    "overage_price_micros_per_minute": 60_000,
    "max_concurrent_calls": 5,
}
TICK_MS = 200


@pytest.fixture
async def fast_callgate(
    store: redis.Redis, valkey_url: str, tmp_path: Path
) -> AsyncIterator[Harness]:
    """Callgate with 1 s grants, a 200 ms tick and 2 s leases."""
    async with running_callgate(
        valkey_url,
        tmp_path,
        CALLGATE_GRANT_MS="1000",
        CALLGATE_FLUSH_INTERVAL_MS=str(TICK_MS),
        CALLGATE_LEASE_MS="2000",
    ) as harness:
        yield harness


async def _plan(callgate: Harness, workspace_id: str, **plan: Any) -> dict[str, Any]:
    status, body = await callgate.api("PUT", f"/workspaces/{workspace_id}/plan", plan)
    assert status == 200, body
    result: dict[str, Any] = body
    return result


async def test_plan_is_validated_and_reports_its_hard_cap(callgate: Harness) -> None:
    """A plan is stored with its hard cap; a bad field is a 422 naming it."""
    tenant = await callgate.tenant("alpha", NUMBER)
    status, _ = await callgate.api("GET", f"/workspaces/{tenant.workspace_id}/plan")
    assert status == 404
    plan = await _plan(callgate, tenant.workspace_id, **THREE_SECONDS)
    assert plan["hard_cap_ms"] == 3_000
    for bad, field in (
        ({"max_concurrent_calls": 0}, "max_concurrent_calls"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"billing_increment": "hourly"}, "billing_increment"),
        ({"surprise": 1}, "surprise"),
    ):
        status, problem = await callgate.api(
            "PUT", f"/workspaces/{tenant.workspace_id}/plan", bad
        )
        assert (status, problem["field"]) == (422, field)


async def test_over_concurrency_and_over_budget_calls_are_refused_politely(
    callgate: Harness,
) -> None:
    """Calls past the concurrency cap or the budget hear a message, counted."""
    tenant = await callgate.tenant("alpha", NUMBER)
    await _plan(
        callgate, tenant.workspace_id, **{**THREE_SECONDS, "max_concurrent_calls": 1}
    )
    first, _ = await callgate.connected_call(NUMBER, CALLER)
    second = await callgate.place(NUMBER, CALLER)
    assert second.first_verb == "Say"
    assert second.twiml_text is not None
    assert "all our lines are busy" in second.twiml_text
    await first.hang_up()
    await callgate.calls_settled()
    assert (
        callgate.metric(
            "callgate_admissions_rejected_total",
            {"workspace": tenant.workspace_id, "reason": "concurrency"},
        )
        == 1
    )

    await _plan(
        callgate,
        tenant.workspace_id,
        **{
            **THREE_SECONDS,
            "overage_limit": 0,
            "overage": "none",
            "reject_with": "reject",
        },
    )
    broke = await callgate.place(NUMBER, CALLER)
    assert broke.first_verb == "Reject"
    assert (
        callgate.metric(
            "callgate_admissions_rejected_total",
            {"workspace": tenant.workspace_id, "reason": "budget"},
        )
        == 1
    )


async def test_budget_running_out_mid_call_ends_it_within_the_bound(
    fast_callgate: Harness, store: redis.Redis
) -> None:
    """A call that outlives a 3 s budget hears the goodbye within tick + hang-up."""
    callgate = fast_callgate
    tenant = await callgate.tenant("alpha", NUMBER)
    await _plan(callgate, tenant.workspace_id, **THREE_SECONDS)
    call, _ = await callgate.connected_call(NUMBER, CALLER)
    talking = asyncio.create_task(
        call.send_audio(split_frames(tone_mulaw(440, 10_000)))
    )
    await call.wait_closed(timeout_secs=10)
    await talking
    await callgate.calls_settled()

    assert call.redirected_twiml is not None
    assert "the time for this call has run out" in call.redirected_twiml
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "budget"
    # The overrun past the hard cap is at most one tick plus the hang-up.
    assert 2_900 <= record["metered_ms"] <= 3_000 + TICK_MS + 500
    period = period_of(now_ms(), "UTC").label
    state = await Quota(store).state(tenant.workspace_id, period)
    # The budget is debited billable time: per started second on this plan.
    assert state.used_ms == bill_ms(record["metered_ms"], "second")
    assert state.reserved_ms == 0
    assert (
        callgate.metric(
            "callgate_budget_cutoffs_total", {"workspace": tenant.workspace_id}
        )
        == 1
    )
    renewals = {
        outcome: callgate.metric(
            "callgate_grant_renewals_total",
            {"workspace": tenant.workspace_id, "outcome": outcome},
        )
        or 0
        for outcome in ("full", "partial", "denied", "reclaimed")
    }
    # The last renewal came back short: that is what armed the cut-off timer.
    assert renewals["partial"] + renewals["denied"] >= 1, renewals
    assert renewals["reclaimed"] == 0
    # D, observed once: the hang-up took less than the 500 ms allowed above.
    assert callgate.metric("callgate_hangup_latency_seconds_count", {}) == 1
    latency = callgate.metric("callgate_hangup_latency_seconds_sum", {})
    assert latency is not None
    assert 0 < latency < 0.5


async def test_sip_time_limit_is_what_the_budget_can_cover(callgate: Harness) -> None:
    """A Retell call's <Dial timeLimit> is the budget left when it was admitted."""
    tenant = await callgate.tenant("alpha", NUMBER, provider="retell")
    await _plan(callgate, tenant.workspace_id, **THREE_SECONDS)
    call = await callgate.place(NUMBER, CALLER)
    assert call.first_verb == "Dial"
    assert call.dial_leg.time_limit_secs == 3


async def test_sweeper_returns_an_abandoned_grant_and_hangs_the_call_up(
    fast_callgate: Harness, store: redis.Redis
) -> None:
    """A grant whose lease lapses goes back to the budget; the call is ended."""
    callgate = fast_callgate
    tenant = await callgate.tenant("alpha", NUMBER)
    await _plan(callgate, tenant.workspace_id, **THREE_SECONDS)
    call = await callgate.place(NUMBER, CALLER)  # admitted, stream never opened
    period = period_of(now_ms(), "UTC").label
    assert (await Quota(store).state(tenant.workspace_id, period)).reserved_ms == 1_000
    # Real time has to pass for a real lease to lapse.
    await asyncio.sleep(2.1)
    await callgate.app[budget.SWEEPER].sweep()
    state = await Quota(store).state(tenant.workspace_id, period)
    assert state.reserved_ms == 0
    assert {"Status": "completed"} in [dict(f) for f in callgate.rest_forms(call.sid)]
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "owner_lost"


async def test_usage_states_price_cost_and_margin(callgate: Harness) -> None:
    """A month's usage carries its statement, worked out to the micro-unit."""
    tenant = await callgate.tenant("alpha", NUMBER)
    await _plan(callgate, tenant.workspace_id, **THREE_SECONDS)
    call, _ = await callgate.connected_call(NUMBER, CALLER)
    tone = tone_mulaw(440, duration_ms=1200)
    await call.send_audio(split_frames(tone))
    await call.wait_for_audio(len(tone), timeout_secs=5)
    await call.hang_up()
    await callgate.calls_settled()

    record = await callgate.call_record(tenant.workspace_id, call.sid)
    metered = record["metered_ms"]
    seconds = -(-metered // 1000)
    # Twilio: one started minute at 8500 micro-dollars; Vapi: per second at
    # 50000 a minute, rounded half up to the micro-unit.
    cost = 8_500 + (seconds * 50_000 + 30) // 60
    assert record["cost_micros"] == cost
    status, usage = await callgate.api(
        "GET", f"/workspaces/{tenant.workspace_id}/usage"
    )
    assert status == 200
    bill = usage["statement"]
    assert bill["billed_ms"] == seconds * 1000
    assert bill["included_ms"] == 0
    assert bill["overage_ms"] == seconds * 1000
    assert bill["price_micros"] == seconds * 1000  # $0.06/min is 1 micro per ms
    assert bill["cost_micros"] == cost
    assert bill["margin_micros"] == seconds * 1000 - cost
    assert bill["currency"] == "USD"


async def test_plan_change_reaches_a_running_call_within_a_grant(
    fast_callgate: Harness,
) -> None:
    """Lowering a plan mid-call cuts the running call off within one grant."""
    callgate = fast_callgate
    tenant = await callgate.tenant("alpha", NUMBER)
    await _plan(
        callgate, tenant.workspace_id, included_minutes=60, max_concurrent_calls=5
    )
    call, _ = await callgate.connected_call(NUMBER, CALLER)
    talking = asyncio.create_task(
        call.send_audio(split_frames(tone_mulaw(440, 10_000)))
    )
    await call.wait_for_audio(8000, timeout_secs=5)  # a second in
    changed_at = asyncio.get_running_loop().time()
    await _plan(callgate, tenant.workspace_id, **THREE_SECONDS)
    await call.wait_closed(timeout_secs=10)
    await talking
    await callgate.calls_settled()
    # A second in, the cap fell to 3 s: the call ends when the new cap runs
    # out, not after its ten seconds of audio.
    assert asyncio.get_running_loop().time() - changed_at < 4.0
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "budget"
    assert record["metered_ms"] <= 3_000 + TICK_MS + 1_000
