"""Fifty simultaneous calls through one Callgate process, each heard intact."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.harness import CallgateProcess, callgate_process
from tests.peers.audio import split_frames, tone_mulaw

NUMBER = "+15005550100"
CALLS = 50
CALL_SECS = 10


async def _call(callgate: CallgateProcess, index: int) -> tuple[bool, float]:
    """One caller: 10 s of its own tone; returns (echo intact, seconds of lag)."""
    tone = tone_mulaw(300 + 10 * index, duration_ms=CALL_SECS * 1000)
    call = await callgate.twilio.place_call(NUMBER, f"+1415555{index:04d}")
    await call.open_stream()
    loop = asyncio.get_running_loop()
    await call.send_audio(split_frames(tone))
    finished_sending = loop.time()
    await call.wait_for_audio(len(tone), timeout_secs=10)
    lag_secs = loop.time() - finished_sending
    intact = bytes(call.received_audio) == tone
    await call.hang_up()
    return intact, lag_secs


async def test_fifty_simultaneous_calls_stay_intact_and_in_order(
    tmp_path: Path,
) -> None:
    """50 calls x 10 s in one process: every echo is intact, in order, on time."""
    async with callgate_process(tmp_path) as callgate:
        workspace_id = await callgate.tenant("load", NUMBER)
        results = await asyncio.gather(*(_call(callgate, i) for i in range(CALLS)))

        assert [intact for intact, _ in results] == [True] * CALLS
        # No call stalls: each echo completes within a second of its last frame.
        assert max(lag for _, lag in results) < 1.0
        usage = await callgate.usage(workspace_id)
        assert usage["calls"] == CALLS
        assert CALLS * (CALL_SECS - 1) <= usage["seconds"] <= CALLS * (CALL_SECS + 2)
