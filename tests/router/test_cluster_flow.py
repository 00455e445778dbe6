"""Callgate on a real Redis Cluster: route, bridge, budget and meter a call."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio.cluster import RedisCluster

from metering.plans import period_of
from metering.quota import Quota
from tenancy.workspaces import now_ms
from tests.harness import running_callgate
from tests.peers.audio import split_frames, tone_mulaw

NUMBER_A = "+15005550001"
NUMBER_B = "+15005550002"
CALLER = "+14155551212"


async def test_a_budgeted_call_runs_end_to_end_on_a_cluster(
    cluster_store: RedisCluster, redis_cluster: str, tmp_path: Path
) -> None:
    """With CALLGATE_REDIS_CLUSTER every path works across three primaries."""
    async with running_callgate(
        redis_cluster, tmp_path, CALLGATE_REDIS_CLUSTER="true"
    ) as callgate:
        async with callgate.http.get(f"{callgate.base_url}/readyz") as ready:
            assert ready.status == 200
        alpha = await callgate.tenant("alpha", NUMBER_A)
        bravo = await callgate.tenant("bravo", NUMBER_B)
        status, _ = await callgate.api(
            "PUT",
            f"/workspaces/{alpha.workspace_id}/plan",
            {"included_minutes": 10, "max_concurrent_calls": 1},
        )
        assert status == 200

        call, vapi_call = await callgate.connected_call(NUMBER_A, CALLER)
        assert vapi_call.api_key == alpha.api_key
        refused = await callgate.place(NUMBER_A, CALLER)  # the cap is one call
        assert refused.first_verb == "Say"
        tone = tone_mulaw(440, duration_ms=1000)
        await call.send_audio(split_frames(tone))
        await call.wait_for_audio(len(tone), timeout_secs=5)
        assert bytes(call.received_audio) == tone
        await call.hang_up()
        await callgate.calls_settled()

        record = await callgate.call_record(alpha.workspace_id, call.sid)
        assert record["end_reason"] == "caller_hung_up"
        status, usage = await callgate.api(
            "GET", f"/workspaces/{alpha.workspace_id}/usage"
        )
        assert (usage["calls"], usage["ms"]) == (1, record["metered_ms"])
        status, usage_b = await callgate.api(
            "GET", f"/workspaces/{bravo.workspace_id}/usage"
        )
        assert usage_b["ms"] == 0
        status, listing = await callgate.api("GET", "/workspaces")
        assert {w["id"] for w in listing["items"]} == {
            alpha.workspace_id,
            bravo.workspace_id,
        }
        state = await Quota(cluster_store).state(
            alpha.workspace_id, period_of(now_ms(), "UTC").label
        )
        assert state.reserved_ms == 0
        assert state.used_ms == -(-record["metered_ms"] // 1000) * 1000
