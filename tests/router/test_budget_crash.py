"""A process dies with calls in flight: its grants come back, its calls end."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from metering.plans import period_of
from metering.quota import Quota
from tenancy.workspaces import now_ms
from tests.harness import CallgateProcess, Peers, callgate_process, running_peers
from tests.peers.audio import split_frames, tone_mulaw
from tests.peers.twilio import RecordedRequest

NUMBER = "+15005550100"
CALLS = 5
LEASE_MS = 2_000
TICK_MS = 200


async def _talking(callgate: CallgateProcess, peers: Peers, count: int) -> list[Any]:
    """``count`` calls through ``callgate`` whose first 600 ms were echoed."""
    calls = []
    for index in range(count):
        call = await callgate.twilio.place_call(NUMBER, f"+1415555000{index}")
        peers.twilio_rest.register_call(call)
        await call.open_stream()
        calls.append(call)
    tone = tone_mulaw(440, duration_ms=600)
    await asyncio.gather(*(call.send_audio(split_frames(tone)) for call in calls))
    await asyncio.gather(
        *(call.wait_for_audio(len(tone), timeout_secs=5) for call in calls)
    )
    return calls


def _hang_ups(sids: set[str]) -> Callable[[RecordedRequest], bool]:
    def hang_up(request: RecordedRequest) -> bool:
        return request.form.get("Status") == "completed" and any(
            sid in request.path for sid in sids
        )

    return hang_up


async def test_killed_process_returns_its_grants_and_its_calls_end(
    store: redis.Redis, valkey_url: str, tmp_path: Path
) -> None:
    """SIGKILL mid-call: within L the grants return and the calls are hung up."""
    env = {
        "CALLGATE_REDIS_URL": valkey_url,
        "CALLGATE_FLUSH_INTERVAL_MS": str(TICK_MS),
        "CALLGATE_GRANT_MS": "1000",
        "CALLGATE_LEASE_MS": str(LEASE_MS),
    }
    async with contextlib.AsyncExitStack() as stack:
        peers = await stack.enter_async_context(running_peers())
        doomed = await stack.enter_async_context(
            callgate_process(tmp_path / "doomed", peers, **env)
        )
        survivor = await stack.enter_async_context(
            callgate_process(tmp_path / "survivor", peers, **env)
        )
        workspace_id = await survivor.tenant("alpha", NUMBER)
        await survivor.put_plan(
            workspace_id,
            {"included_minutes": 60, "max_concurrent_calls": CALLS},
        )
        calls = await _talking(doomed, peers, CALLS)
        period = period_of(now_ms(), "UTC").label
        before = await Quota(store).state(workspace_id, period)
        assert before.reserved_ms > 0

        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        doomed.process.send_signal(signal.SIGKILL)
        sids = {call.sid for call in calls}

        # The survivor's sweeper runs every L/2; a lease lapses L after its
        # last renewal: every call is hung up within L + L/2 of the kill.
        await peers.twilio_rest.wait_for_requests(
            _hang_ups(sids), CALLS, timeout_secs=10
        )
        assert loop.time() - killed_at <= (LEASE_MS * 1.5 + 1_000) / 1000

        after = await Quota(store).state(workspace_id, period)
        assert after.reserved_ms == 0
        assert await Quota(store).live_calls(workspace_id, now_ms()) == 0
        records = [await survivor.call_record(workspace_id, sid) for sid in sids]
        assert {record["end_reason"] for record in records} == {"owner_lost"}
        usage = await survivor.usage(workspace_id)
        metered = sum(record["metered_ms"] for record in records)
        # Nothing counted twice: usage is the sum of the calls, each of which
        # ran from its start until the sweeper hung it up.
        assert usage["ms"] == metered
        for record in records:
            assert 600 <= record["metered_ms"] <= 600 + LEASE_MS * 2 + 1_000
        assert after.used_ms == sum(-(-r["metered_ms"] // 1000) * 1000 for r in records)


# ``store`` empties the shared store first and audits it afterwards.
@pytest.mark.usefixtures("store")
async def test_killed_process_calls_without_a_budget_are_settled_and_ended(
    valkey_url: str, tmp_path: Path
) -> None:
    """A workspace with no plan: its orphaned calls still end, counted once."""
    env = {
        "CALLGATE_REDIS_URL": valkey_url,
        "CALLGATE_FLUSH_INTERVAL_MS": str(TICK_MS),
        "CALLGATE_LEASE_MS": str(LEASE_MS),
    }
    async with contextlib.AsyncExitStack() as stack:
        peers = await stack.enter_async_context(running_peers())
        doomed = await stack.enter_async_context(
            callgate_process(tmp_path / "doomed", peers, **env)
        )
        survivor = await stack.enter_async_context(
            callgate_process(tmp_path / "survivor", peers, **env)
        )
        workspace_id = await survivor.tenant("alpha", NUMBER)
        calls = await _talking(doomed, peers, 2)
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        doomed.process.send_signal(signal.SIGKILL)
        sids = {call.sid for call in calls}

        await peers.twilio_rest.wait_for_requests(_hang_ups(sids), 2, timeout_secs=10)
        assert loop.time() - killed_at <= (LEASE_MS * 1.5 + 1_000) / 1000
        records = [await survivor.call_record(workspace_id, sid) for sid in sids]
        assert {record["end_reason"] for record in records} == {"owner_lost"}
        for record in records:
            assert 600 <= record["metered_ms"] <= 600 + LEASE_MS * 2 + 1_000
        usage = await survivor.usage(workspace_id)
        assert usage["ms"] == sum(record["metered_ms"] for record in records)
        assert usage["statement"] is None


@pytest.mark.usefixtures("store")  # an empty store: the number is free
async def test_a_sip_call_outlives_its_process_and_is_metered_to_its_end(
    valkey_url: str, tmp_path: Path
) -> None:
    """SIGKILL mid Retell call: the call goes on, another process meters it.

    Its audio never passed through the dead process, so nothing hangs it up:
    the survivor takes its lease and grant over when they lapse, and, with
    every report of the leg's end sent to the dead process and lost, finds
    the leg over through Twilio's REST API and settles it at its length.
    """
    env = {
        "CALLGATE_REDIS_URL": valkey_url,
        "CALLGATE_FLUSH_INTERVAL_MS": str(TICK_MS),
        "CALLGATE_GRANT_MS": "1000",
        "CALLGATE_LEASE_MS": str(LEASE_MS),
        "CALLGATE_SIP_CHECK_SECS": "1",
    }
    async with contextlib.AsyncExitStack() as stack:
        peers = await stack.enter_async_context(running_peers())
        doomed = await stack.enter_async_context(
            callgate_process(tmp_path / "doomed", peers, **env)
        )
        survivor = await stack.enter_async_context(
            callgate_process(tmp_path / "survivor", peers, **env)
        )
        workspace_id = await survivor.tenant("alpha", NUMBER, provider="retell")
        await survivor.put_plan(workspace_id, {"included_minutes": 60})
        call = await doomed.twilio.place_call(NUMBER, "+14155550199")
        peers.twilio_rest.register_call(call)
        await peers.retell.wait_for_registration(timeout_secs=5)
        leg = call.dial_leg
        await leg.ring()
        await leg.answer()
        loop = asyncio.get_running_loop()
        answered = loop.time()
        doomed.process.send_signal(signal.SIGKILL)

        # Metered on past the lapse of the dead process's lease.
        deadline = loop.time() + 10
        while True:
            record = await survivor.call_record(workspace_id, call.sid)
            if record["metered_ms"] > LEASE_MS * 2:
                break
            assert loop.time() < deadline, record
            await asyncio.sleep(0.2)
        assert record["ended_at"] is None
        assert leg.live

        await leg.hang_up(by="callee")
        deadline = loop.time() + 10
        while (record := await survivor.call_record(workspace_id, call.sid))[
            "ended_at"
        ] is None:
            assert loop.time() < deadline, record
            await asyncio.sleep(0.2)
        assert record["end_reason"] == "completed"
        # Twilio's whole seconds, or the time up to the look if that was less.
        assert (leg.duration_secs - 1) * 1000 <= record["metered_ms"]
        assert record["metered_ms"] <= leg.duration_secs * 1000
        assert leg.duration_secs >= int(loop.time() - answered) - 1
        usage = await survivor.usage(workspace_id)
        assert usage["ms"] == record["metered_ms"]
        assert usage["statement"]["billed_ms"] >= record["metered_ms"]
        hang_ups = [r for r in peers.twilio_rest.requests if _hang_ups({call.sid})(r)]
        assert hang_ups == []
