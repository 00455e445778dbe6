"""Trying to break the budget: 200 calls over 4 processes on one workspace."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as redis

from metering.plans import period_of
from metering.quota import Quota
from tenancy.workspaces import now_ms
from tests.harness import CallgateProcess, callgate_process, running_peers
from tests.peers.audio import split_frames, tone_mulaw
from tests.peers.errors import PeerError

NUMBER = "+15005550100"
CALLS = 200
PROCESSES = 4
CAP = 20
TICK_MS = 200
CALL_MS = 3_000
BUDGET_MS = 100_000  # a sixth of what 200 three-second calls would use
# D, the hang-up latency the published bound assumes.
HANG_UP_MS = 1_000


@dataclass
class Outcome:
    """What one caller saw: refused, or connected from ``opened`` to ``closed``."""

    call_sid: str
    admitted: bool
    opened: float = 0.0
    closed: float = 0.0


async def _caller(callgate: CallgateProcess, index: int, start_at: float) -> Outcome:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    call = await callgate.twilio.place_call(NUMBER, f"+1415555{index:04d}")
    if call.first_verb != "Connect":
        return Outcome(call.sid, admitted=False)
    await call.open_stream()
    outcome = Outcome(call.sid, admitted=True, opened=loop.time())
    with contextlib.suppress(PeerError):
        await call.send_audio(split_frames(tone_mulaw(440, CALL_MS)))
    if call.stream_open:
        await call.hang_up()
    await call.wait_closed(timeout_secs=10)
    outcome.closed = loop.time()
    return outcome


def _most_at_once(outcomes: list[Outcome]) -> int:
    events = sorted(
        [(o.opened, 1) for o in outcomes] + [(o.closed, -1) for o in outcomes],
        key=lambda event: (event[0], event[1]),
    )
    live = peak = 0
    for _, step in events:
        live += step
        peak = max(peak, live)
    return peak


async def test_the_overrun_bound_holds_across_four_processes(
    store: redis.Redis, valkey_url: str, tmp_path: Path
) -> None:
    """200 calls, 4 processes, one budget: cap, bound and totals all hold."""
    env = {
        "CALLGATE_REDIS_URL": valkey_url,
        "CALLGATE_FLUSH_INTERVAL_MS": str(TICK_MS),
        "CALLGATE_GRANT_MS": "1000",
        "CALLGATE_LEASE_MS": "5000",
    }
    async with contextlib.AsyncExitStack() as stack:
        peers = await stack.enter_async_context(running_peers())
        processes = [
            await stack.enter_async_context(
                callgate_process(tmp_path / f"p{i}", peers, **env)
            )
            for i in range(PROCESSES)
        ]
        workspace_id = await processes[0].tenant("load", NUMBER)
        await processes[0].put_plan(
            workspace_id,
            {
                "included_minutes": 0,
                "overage": "money",
                # $0.06 a minute buys 1 ms per micro-dollar.
                "overage_price_micros_per_minute": 60_000,
                "overage_limit": BUDGET_MS,
                "max_concurrent_calls": CAP,
            },
        )
        loop = asyncio.get_running_loop()
        begin = loop.time() + 0.5
        outcomes = await asyncio.gather(
            *(
                _caller(processes[i % PROCESSES], i, begin + i * 0.05)
                for i in range(CALLS)
            )
        )
        connected = [o for o in outcomes if o.admitted]

        usage = await processes[1].usage(workspace_id)
        records = {
            sid: await processes[2].call_record(workspace_id, sid)
            for sid in (o.call_sid for o in connected)
        }

    reasons: dict[str, int] = {}
    for record in records.values():
        reasons[record["end_reason"]] = reasons.get(record["end_reason"], 0) + 1
    # Calls end by hanging up, or are cut off when the budget runs out.
    assert set(reasons) <= {"caller_hung_up", "budget"}, reasons
    assert reasons.get("budget", 0) > 0, reasons
    # Never more than the cap at any instant, as the callers saw it.
    assert _most_at_once(connected) <= CAP
    # Some calls were turned away once the budget ran out.
    assert CAP < len(connected) < CALLS
    # Each settled call's time matches what its caller lived, within 1 s.
    for outcome in connected:
        record = records[outcome.call_sid]
        real_ms = (outcome.closed - outcome.opened) * 1000
        assert abs(record["metered_ms"] - real_ms) <= 1_000, record
        assert record["status"] == "completed"
    metered = sum(record["metered_ms"] for record in records.values())
    assert usage["ms"] == metered
    # The published bound: connected time past the hard cap is at most
    # C x (tick + hang-up latency); billing rounding then adds at most one
    # increment (here a second) per call still live at the cap.
    overrun_ms = metered - BUDGET_MS
    assert overrun_ms <= CAP * (TICK_MS + HANG_UP_MS), overrun_ms
    period = period_of(now_ms(), "UTC").label
    state = await Quota(store).state(workspace_id, period)
    billed_overrun_ms = state.used_ms - BUDGET_MS
    assert billed_overrun_ms <= CAP * (TICK_MS + HANG_UP_MS + 1_000)
    assert state.reserved_ms == 0
    assert await Quota(store).live_calls(workspace_id, now_ms()) == 0
    print(
        f"\nbound test: {len(connected)} of {CALLS} calls connected, "
        f"metered {metered} ms against {BUDGET_MS} ms, overrun {overrun_ms} ms "
        f"(bound {CAP * (TICK_MS + HANG_UP_MS)} ms), billed {state.used_ms} ms, "
        f"most at once {_most_at_once(connected)} (cap {CAP}), ends {reasons}"
    )
