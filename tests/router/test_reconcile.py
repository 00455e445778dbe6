"""Reconciliation: Twilio's duration reaches every call record, drift is observed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as redis

from router.app import RECONCILER
from tenancy import keyspace
from tenancy.replies import texts
from tests.harness import Harness, running_callgate
from tests.peers.audio import split_frames, tone_mulaw

NUMBER = "+15005550001"
CALLER = "+14155551212"


async def _finished_call(callgate: Harness) -> tuple[str, str]:
    tenant = await callgate.tenant("alpha", NUMBER)
    call, _ = await callgate.connected_call(NUMBER, CALLER)
    tone = tone_mulaw(440, duration_ms=600)
    await call.send_audio(split_frames(tone))
    await call.wait_for_audio(len(tone), timeout_secs=5)
    await call.hang_up()
    await callgate.calls_settled()
    return tenant.workspace_id, call.sid


async def test_status_callback_reconciles_and_observes_drift(
    callgate: Harness, store: redis.Redis
) -> None:
    """Twilio's CallDuration settles the record and its drift is observed.

    Twilio bills the caller's leg for 61 s, two started minutes, where
    Callgate metered under one: the call's cost, and the workspace's, move by
    one minute of Twilio's rate (8 500 micro-units by default).
    """
    workspace_id, call_sid = await _finished_call(callgate)
    assert texts(await store.zrange(keyspace.unreconciled(workspace_id), 0, -1)) == [
        call_sid
    ]
    settled = await callgate.call_record(workspace_id, call_sid)
    status, usage = await callgate.api("GET", f"/workspaces/{workspace_id}/usage")
    assert (status, usage["cost_micros"]) == (200, settled["cost_micros"])
    call = callgate.twilio.calls[-1]
    assert await callgate.twilio.send_status_callback(call, duration_secs=61) == 204
    record = await callgate.call_record(workspace_id, call_sid)
    assert record["cost_micros"] == settled["cost_micros"] + 8_500
    status, usage = await callgate.api("GET", f"/workspaces/{workspace_id}/usage")
    assert usage["cost_micros"] == record["cost_micros"]
    assert await store.zcard(keyspace.unreconciled(workspace_id)) == 0
    labels = {"workspace": workspace_id}
    assert (
        callgate.metric(
            "callgate_reconciled_calls_total", {**labels, "source": "callback"}
        )
        == 1
    )
    drift = callgate.metric("callgate_reconciliation_drift_seconds_sum", labels)
    assert drift is not None
    assert abs(drift - abs(61 - record["metered_ms"] / 1000)) < 1e-9


async def test_calls_without_a_callback_are_looked_up(
    store: redis.Redis, valkey_url: str, tmp_path: Path
) -> None:
    """A call Twilio never reported is fetched from its REST API after a while."""
    async with running_callgate(
        valkey_url, tmp_path, CALLGATE_RECONCILE_AFTER_SECS="1"
    ) as callgate:
        workspace_id, call_sid = await _finished_call(callgate)
        assert await callgate.app[RECONCILER].reconcile() == 0  # not overdue yet
        # Real time has to pass for the call to become overdue.
        await asyncio.sleep(1.1)
        assert await callgate.app[RECONCILER].reconcile() == 1
        record = await callgate.call_record(workspace_id, call_sid)
        call = callgate.twilio.calls[-1]
        assert record["twilio_call_duration_secs"] == call.duration_secs
        assert record["twilio_status"] == "completed"
        assert await store.zcard(keyspace.unreconciled(workspace_id)) == 0
        assert (
            callgate.metric(
                "callgate_reconciled_calls_total",
                {"workspace": workspace_id, "source": "api"},
            )
            == 1
        )
        assert await callgate.app[RECONCILER].reconcile() == 0
