"""The store goes down mid-call: continue on an emergency grant, or terminate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from metering.plans import bill_ms, period_of
from metering.quota import Quota
from router.budget import SWEEPER
from router.store import EmbeddedValkey, connect
from router.webhooks import METER
from tenancy.workspaces import now_ms
from tests.harness import Harness, running_callgate
from tests.peers.audio import split_frames, tone_mulaw

NUMBER = "+15005550001"
CALLER = "+14155551212"
PLAN = {"included_minutes": 60, "max_concurrent_calls": 5}


@asynccontextmanager
async def callgate_on_own_store(
    tmp_path: Path,
) -> AsyncIterator[tuple[Harness, EmbeddedValkey]]:
    """Callgate on a Valkey the test may stop and start again."""
    server = EmbeddedValkey(tmp_path / "store")
    await server.start()
    try:
        async with running_callgate(
            server.url,
            tmp_path / "data",
            CALLGATE_FLUSH_INTERVAL_MS="200",
            CALLGATE_GRANT_MS="1000",
            CALLGATE_STORE_TIMEOUT_MS="200",
        ) as callgate:
            yield callgate, server
    finally:
        await server.stop()


def _journal_files(data_dir: Path) -> list[str]:
    """The journal's report files (its slot lock files aside)."""
    return sorted(
        path.name
        for path in (data_dir / "journal").iterdir()
        if path.suffix == ".jsonl"
    )


async def test_outage_under_continue_loses_nothing_and_replays_once(
    tmp_path: Path,
) -> None:
    """The call rides out the outage; its journal replays exactly once."""
    async with callgate_on_own_store(tmp_path) as (callgate, server):
        tenant = await callgate.tenant("alpha", NUMBER)
        status, _ = await callgate.api(
            "PUT", f"/workspaces/{tenant.workspace_id}/plan", PLAN
        )
        assert status == 200
        call, _ = await callgate.connected_call(NUMBER, CALLER)
        loop = asyncio.get_running_loop()
        opened = loop.time()
        before = tone_mulaw(440, duration_ms=1000)
        await call.send_audio(split_frames(before))

        await server.stop()
        during = tone_mulaw(600, duration_ms=1500)
        await call.send_audio(split_frames(during))
        await call.wait_for_audio(len(before) + len(during), timeout_secs=5)
        assert not callgate.app[METER].store_up
        # The reports the store could not take are on disk, not only in memory.
        assert _journal_files(callgate.settings.data_dir)

        await server.start()
        assert await callgate.app[METER].replay()
        after = tone_mulaw(800, duration_ms=500)
        await call.send_audio(split_frames(after))
        await call.hang_up()
        closed = loop.time()
        await callgate.calls_settled()
        assert await callgate.app[METER].replay()

        record = await callgate.call_record(tenant.workspace_id, call.sid)
        assert record["end_reason"] == "caller_hung_up"
        assert abs(record["metered_ms"] - (closed - opened) * 1000) <= 500
        status, usage = await callgate.api(
            "GET", f"/workspaces/{tenant.workspace_id}/usage"
        )
        assert usage["ms"] == record["metered_ms"]  # counted exactly once
        store = connect(server.url)
        try:
            state = await Quota(store).state(
                tenant.workspace_id, period_of(now_ms(), "UTC").label
            )
        finally:
            await store.aclose()
        assert state.used_ms == bill_ms(record["metered_ms"], "second")
        assert state.reserved_ms == 0
        assert _journal_files(callgate.settings.data_dir) == []
        assert callgate.app[METER].store_up
        assert callgate.metric("callgate_meter_flushes_total", {"outcome": "error"})


async def test_outage_under_terminate_ends_calls_within_the_window(
    tmp_path: Path,
) -> None:
    """The call is ended when the store goes; its settlement lands later."""
    async with callgate_on_own_store(tmp_path) as (callgate, server):
        tenant = await callgate.tenant("alpha", NUMBER)
        await callgate.api("PUT", f"/workspaces/{tenant.workspace_id}/plan", PLAN)
        await callgate.set_policy(
            tenant.workspace_id, outage="terminate", emergency_grant_ms=5_000
        )
        call, _ = await callgate.connected_call(NUMBER, CALLER)
        talking = asyncio.create_task(
            call.send_audio(split_frames(tone_mulaw(440, duration_ms=10_000)))
        )
        # The call has been up a while once half a second of it echoed back.
        await call.wait_for_audio(4000, timeout_secs=5)

        loop = asyncio.get_running_loop()
        stopped = loop.time()
        await server.stop()
        await call.wait_closed(timeout_secs=5)
        assert loop.time() - stopped < 1.0  # well inside the 5 s window
        await talking
        await callgate.calls_settled()
        assert call.redirected_twiml is not None

        await server.start()
        assert await callgate.app[METER].replay()
        record = await callgate.call_record(tenant.workspace_id, call.sid)
        assert record["end_reason"] == "store_outage"
        assert 400 <= record["metered_ms"] <= 2_000


async def test_leases_lapsed_in_an_outage_are_not_taken_when_it_ends(
    tmp_path: Path,
) -> None:
    """A lease lapses for want of a store; the sweeper leaves its call alone."""
    server = EmbeddedValkey(tmp_path / "store")
    await server.start()
    try:
        async with running_callgate(
            server.url,
            tmp_path / "data",
            # A report a second: the sweep below comes well before the next.
            CALLGATE_FLUSH_INTERVAL_MS="1000",
            CALLGATE_LEASE_MS="2000",
            CALLGATE_STORE_TIMEOUT_MS="200",
        ) as callgate:
            # No plan: the call holds a lease but no grant.
            tenant = await callgate.tenant("alpha", NUMBER)
            call, _ = await callgate.connected_call(NUMBER, CALLER)
            before = tone_mulaw(440, duration_ms=500)
            await call.send_audio(split_frames(before))
            await call.wait_for_audio(len(before), timeout_secs=5)

            await server.stop()
            # Longer than the 2 s lease, while the store is down.
            during = tone_mulaw(600, duration_ms=2500)
            await call.send_audio(split_frames(during))
            await call.wait_for_audio(len(before) + len(during), timeout_secs=10)
            await server.start()
            assert await callgate.app[SWEEPER].sweep() == 0

            after = tone_mulaw(800, duration_ms=300)
            await call.send_audio(split_frames(after))
            await call.wait_for_audio(
                len(before) + len(during) + len(after), timeout_secs=5
            )
            await call.hang_up()
            await callgate.calls_settled()
            record = await callgate.call_record(tenant.workspace_id, call.sid)
            assert record["end_reason"] == "caller_hung_up"
    finally:
        await server.stop()
