"""End to end: a Twilio call reaches a Vapi agent and lands in its workspace."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
from pathlib import Path

import pytest
import redis.asyncio as redis

from metering.ledger import Ledger, month_of
from router.store import EmbeddedValkey
from tenancy import keyspace
from tenancy.workspaces import now_ms
from tests.harness import Harness, running_callgate
from tests.peers.audio import split_frames, tone_mulaw
from tests.peers.twilio import StreamRejected

NUMBER_A = "+15005550001"
NUMBER_B = "+15005550002"
CALLER = "+14155551212"


async def _all_keys(store: redis.Redis) -> set[str]:
    return {key async for key in store.scan_iter(count=1000)}


async def test_call_reaches_its_workspaces_agent_and_is_metered(
    callgate: Harness, store: redis.Redis
) -> None:
    """A 6 s call reaches A's agent with A's key, echoes intact, meters only to A."""
    tenant_a = await callgate.tenant("alpha", NUMBER_A)
    tenant_b = await callgate.tenant("bravo", NUMBER_B)

    call = await callgate.twilio.place_call(NUMBER_A, CALLER)
    assert call.http_status == 200
    assert call.first_verb == "Connect"
    assert call.verbs_after_connect == []
    assert call.stream_parameters["workspace"] == tenant_a.workspace_id
    await call.open_stream()

    vapi_call = await callgate.vapi.wait_for_call(timeout_secs=5)
    assert vapi_call.api_key == tenant_a.api_key
    assert vapi_call.request_json["assistantId"] == tenant_a.assistant_id
    assert vapi_call.audio_format == {
        "format": "mulaw",
        "container": "raw",
        "sampleRate": 8000,
    }
    await vapi_call.wait_connected(timeout_secs=5)

    tone = tone_mulaw(440, duration_ms=6000)
    frames = split_frames(tone)
    assert await call.send_audio(frames) == len(frames)
    await call.wait_for_audio(len(tone), timeout_secs=5)
    assert bytes(call.received_audio) == tone
    assert bytes(vapi_call.received_audio) == tone
    assert call.protocol_errors == []

    await call.hang_up()
    await vapi_call.wait_closed(timeout_secs=5)
    await callgate.calls_settled()

    period = month_of(now_ms())
    status, usage_a = await callgate.api(
        "GET", f"/workspaces/{tenant_a.workspace_id}/usage?period={period}"
    )
    assert status == 200
    assert 5.0 <= usage_a["seconds"] <= 7.0
    assert usage_a["calls"] == 1
    assert usage_a["agents"][tenant_a.agent_id]["ms"] == usage_a["ms"]
    assert usage_a["numbers"][NUMBER_A]["ms"] == usage_a["ms"]
    status, usage_b = await callgate.api(
        "GET", f"/workspaces/{tenant_b.workspace_id}/usage?period={period}"
    )
    assert (status, usage_b["seconds"], usage_b["calls"]) == (200, 0, 0)

    assert await callgate.twilio.send_status_callback(call, duration_secs=7) == 204
    status, record = await callgate.api(
        "GET", f"/workspaces/{tenant_a.workspace_id}/calls/{call.sid}"
    )
    assert status == 200
    assert record["twilio_call_duration_secs"] == 7
    assert record["twilio_status"] == "completed"
    assert record["end_reason"] == "caller_hung_up"
    assert record["from_number"] == CALLER
    assert record["provider_call_id"] == vapi_call.id
    assert record["metered_ms"] == usage_a["ms"]
    status, _ = await callgate.api(
        "GET", f"/workspaces/{tenant_b.workspace_id}/calls/{call.sid}"
    )
    assert status == 404

    labels = {"workspace": tenant_a.workspace_id}
    assert callgate.metric("callgate_call_seconds_total", labels) == pytest.approx(
        usage_a["seconds"]
    )
    assert callgate.metric("callgate_calls_active", labels) == 0
    assert (
        callgate.metric(
            "callgate_call_seconds_total", {"workspace": tenant_b.workspace_id}
        )
        is None
    )
    # One Vapi call opened, and how long that took is on record.
    connect = {"provider": "vapi"}
    assert callgate.metric("callgate_upstream_connect_seconds_count", connect) == 1
    connect_secs = callgate.metric("callgate_upstream_connect_seconds_sum", connect)
    assert connect_secs is not None
    assert 0 < connect_secs < 5
    for direction in ("caller_to_agent", "agent_to_caller"):
        labels = {"direction": direction}
        batches = callgate.metric("callgate_relay_latency_seconds_count", labels)
        waited = callgate.metric("callgate_relay_latency_seconds_sum", labels)
        assert batches, direction
        assert waited is not None
        assert 0 <= waited / batches < 0.05, direction
    keys = await _all_keys(store)
    assert not any(call.sid in key and tenant_b.workspace_id in key for key in keys)


async def test_agent_hanging_up_ends_the_twilio_call(callgate: Harness) -> None:
    """When Vapi closes the call, Callgate closes the stream and Twilio hangs up."""
    tenant = await callgate.tenant("alpha", NUMBER_A)
    call, vapi_call = await callgate.connected_call(NUMBER_A, CALLER)
    await call.send_audio(split_frames(tone_mulaw(440, duration_ms=200)))

    await callgate.vapi.hang_up(vapi_call.id)
    await call.wait_closed(timeout_secs=5)
    assert call.ended_by_server
    await callgate.calls_settled()
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "agent_hung_up"


async def test_wrong_webhook_signature_is_refused_and_touches_nothing(
    callgate: Harness, store: redis.Redis
) -> None:
    """A forged webhook gets 403 and writes no key."""
    await callgate.tenant("alpha", NUMBER_A)
    before = await _all_keys(store)
    call = await callgate.twilio.place_call(
        NUMBER_A, CALLER, signature="bm90IGEgc2lnbmF0dXJlIGF0IGFsbA=="
    )
    assert call.http_status == 403
    assert call.stream_url is None
    assert await _all_keys(store) == before
    assert callgate.vapi.calls == {}
    assert (
        callgate.metric(
            "callgate_webhooks_total", {"endpoint": "voice", "outcome": "bad_signature"}
        )
        == 1
    )


async def test_wrong_upgrade_signature_is_refused_and_keeps_the_token(
    callgate: Harness,
) -> None:
    """A forged stream upgrade gets 403; the genuine one still works afterwards."""
    await callgate.tenant("alpha", NUMBER_A)
    call = await callgate.twilio.place_call(NUMBER_A, CALLER)
    with pytest.raises(StreamRejected) as rejected:
        await call.open_stream(signature="Zm9yZ2VkLXNpZ25hdHVyZQ==")
    assert rejected.value.status_code == 403
    assert callgate.vapi.calls == {}

    await call.open_stream()
    vapi_call = await callgate.vapi.wait_for_call(timeout_secs=5)
    await vapi_call.wait_connected(timeout_secs=5)
    await call.hang_up()
    await callgate.calls_settled()


async def test_stream_token_works_only_once(callgate: Harness) -> None:
    """A replayed stream URL is refused even with a valid Twilio signature."""
    await callgate.tenant("alpha", NUMBER_A)
    first = await callgate.twilio.place_call(NUMBER_A, CALLER)
    await first.open_stream()
    vapi_call = await callgate.vapi.wait_for_call(timeout_secs=5)
    await vapi_call.wait_connected(timeout_secs=5)

    # The voice webhook replayed for a call already under way is refused, so
    # it neither reopens the call nor admits it twice.
    replayed = await callgate.twilio.place_call(NUMBER_A, CALLER, call_sid=first.sid)
    assert replayed.status == "no-answer"
    assert (
        callgate.metric(
            "callgate_webhooks_total", {"endpoint": "voice", "outcome": "replayed"}
        )
        == 1
    )
    # Its stream URL, replayed by another call, is refused as well.
    replay = await callgate.twilio.place_call(NUMBER_A, CALLER)
    with pytest.raises(StreamRejected) as rejected:
        await replay.open_stream(url=first.stream_url)
    assert rejected.value.status_code == 403
    assert (
        callgate.metric("callgate_stream_upgrades_total", {"outcome": "token_reused"})
        == 1
    )
    await first.hang_up()
    await callgate.calls_settled()


async def test_expired_stream_token_is_refused(
    store: redis.Redis, valkey_url: str, tmp_path: Path
) -> None:
    """A stream URL used after its token's lifetime is refused."""
    async with running_callgate(
        valkey_url, tmp_path, CALLGATE_STREAM_TOKEN_TTL_SECS="1"
    ) as callgate:
        await callgate.tenant("alpha", NUMBER_A)
        call = await callgate.twilio.place_call(NUMBER_A, CALLER)
        # Real time has to pass for a real token to lapse.
        await asyncio.sleep(2.1)
        with pytest.raises(StreamRejected) as rejected:
            await call.open_stream()
        assert rejected.value.status_code == 403
        assert (
            callgate.metric("callgate_stream_upgrades_total", {"outcome": "bad_token"})
            == 1
        )
        assert callgate.vapi.calls == {}


async def test_unknown_number_is_rejected_unanswered(callgate: Harness) -> None:
    """A call to a number no workspace owns gets <Reject/> as its first verb."""
    await callgate.tenant("alpha", NUMBER_A)
    call = await callgate.twilio.place_call("+15005550999", CALLER)
    assert call.http_status == 200
    assert call.first_verb == "Reject"
    assert (
        callgate.metric(
            "callgate_webhooks_total",
            {"endpoint": "voice", "outcome": "unknown_number"},
        )
        == 1
    )


async def test_malformed_frame_is_counted_and_the_call_goes_on(
    callgate: Harness,
) -> None:
    """A malformed frame is counted and skipped; the call keeps relaying audio."""
    tenant = await callgate.tenant("alpha", NUMBER_A)
    call, _ = await callgate.connected_call(NUMBER_A, CALLER)
    await call.send_raw('{"event":"media","sequenceNumber":"2","media":{}}')
    await call.send_raw(b"\x00binary")
    tone = tone_mulaw(440, duration_ms=200)
    await call.send_audio(split_frames(tone))
    await call.wait_for_audio(len(tone), timeout_secs=5)
    assert bytes(call.received_audio) == tone
    assert callgate.metric("callgate_frames_malformed_total", {"source": "twilio"}) == 2
    await call.hang_up()
    await callgate.calls_settled()
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "caller_hung_up"


async def test_stream_that_keeps_sending_garbage_is_closed_with_1007(
    callgate: Harness,
) -> None:
    """Past ten malformed frames the stream is closed with 1007 and recorded."""
    tenant = await callgate.tenant("alpha", NUMBER_A)
    call, vapi_call = await callgate.connected_call(NUMBER_A, CALLER)
    for _ in range(11):
        await call.send_raw("not json at all")
    await call.wait_closed(timeout_secs=5)
    assert call.close_code == 1007
    await vapi_call.wait_closed(timeout_secs=5)
    await callgate.calls_settled()
    assert (
        callgate.metric("callgate_frames_malformed_total", {"source": "twilio"}) == 11
    )
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "protocol_error"
    status, _ = await callgate.api("GET", "/workspaces")
    assert status == 200


async def test_agent_platform_refusing_ends_the_call_and_is_counted(
    callgate: Harness,
) -> None:
    """When Vapi answers 500, the stream closes and the reason is recorded."""
    tenant = await callgate.tenant("alpha", NUMBER_A)
    callgate.vapi.create_status_override = 500
    call = await callgate.twilio.place_call(NUMBER_A, CALLER)
    await call.open_stream()
    await call.wait_closed(timeout_secs=10)
    await callgate.calls_settled()
    assert (
        callgate.metric(
            "callgate_upstream_errors_total", {"provider": "vapi", "kind": "connect"}
        )
        == 1
    )
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "upstream_failed"
    assert record["status"] == "completed"


async def test_shutdown_ends_live_calls_and_settles_them(
    callgate: Harness, store: redis.Redis
) -> None:
    """Stopping the server hangs up live calls and settles their time first."""
    tenant = await callgate.tenant("alpha", NUMBER_A)
    call, vapi_call = await callgate.connected_call(NUMBER_A, CALLER)
    tone = tone_mulaw(440, duration_ms=1000)
    await call.send_audio(split_frames(tone))
    await call.wait_for_audio(len(tone), timeout_secs=5)

    shutdown_started = asyncio.get_running_loop().time()
    await callgate.shut_down()
    assert asyncio.get_running_loop().time() - shutdown_started < 1.0
    await vapi_call.wait_closed(timeout_secs=5)
    await call.wait_closed(timeout_secs=5)
    record = await Ledger(store).get_call(tenant.workspace_id, call.sid)
    assert record.end_reason == "shutdown"
    assert record.status == "completed"
    # 50 frames paced 20 ms apart span 980 ms; the shutdown adds little.
    assert 900 <= record.metered_ms <= 2000


async def test_status_callback_with_a_wrong_signature_is_refused(
    callgate: Harness, store: redis.Redis
) -> None:
    """A forged status callback gets 403 and the record stays unchanged."""
    tenant = await callgate.tenant("alpha", NUMBER_A)
    call = await callgate.twilio.place_call(NUMBER_A, CALLER)
    before = await store.hgetall(keyspace.call(tenant.workspace_id, call.sid))
    status = await callgate.twilio.send_status_callback(
        call, duration_secs=99, signature="Zm9yZ2Vk"
    )
    assert status == 403
    after = await store.hgetall(keyspace.call(tenant.workspace_id, call.sid))
    assert after == before


async def test_twilio_connection_dropping_ends_the_call_as_lost(
    callgate: Harness,
) -> None:
    """A stream reset with no stop hangs up the agent and is recorded as lost."""
    tenant = await callgate.tenant("alpha", NUMBER_A)
    call, vapi_call = await callgate.connected_call(NUMBER_A, CALLER)
    await call.send_audio(split_frames(tone_mulaw(440, duration_ms=300)))
    await call.drop()
    await vapi_call.wait_closed(timeout_secs=5)
    await callgate.calls_settled()
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "stream_lost"
    assert record["metered_ms"] >= 250


async def test_agent_platform_dropping_mid_call_is_an_upstream_failure(
    callgate: Harness,
) -> None:
    """A Vapi socket reset mid-call ends the stream with reason upstream_failed."""
    tenant = await callgate.tenant("alpha", NUMBER_A)
    call, vapi_call = await callgate.connected_call(NUMBER_A, CALLER)
    await call.send_audio(split_frames(tone_mulaw(440, duration_ms=200)))
    await callgate.vapi.drop(vapi_call.id)
    await call.wait_closed(timeout_secs=5)
    await callgate.calls_settled()
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "upstream_failed"


async def test_logs_carry_no_secret_token_or_audio(
    callgate: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole call, with a refused forgery, logs no key, token or audio."""
    caplog.set_level(logging.DEBUG)
    tenant = await callgate.tenant("alpha", NUMBER_A)
    call, _ = await callgate.connected_call(NUMBER_A, CALLER)
    tone = tone_mulaw(440, duration_ms=400)
    await call.send_audio(split_frames(tone))
    await call.wait_for_audio(len(tone), timeout_secs=5)
    await call.hang_up()
    await callgate.calls_settled()
    await callgate.twilio.place_call(NUMBER_A, CALLER, signature="Zm9yZ2Vk")

    assert call.stream_url is not None
    stream_token = call.stream_url.rsplit("/", 1)[1]
    secrets = {
        "operator key": callgate.settings.operator_key,
        "secret key": callgate.settings.secret_key,
        "twilio auth token": callgate.account.auth_token,
        "vapi key": tenant.api_key,
        "stream token": stream_token,
        "audio": base64.b64encode(tone[:160]).decode(),
    }
    ours = [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith(("callgate", "aiohttp"))
    ]
    assert any("call ended" in line for line in ours)
    assert any("/twilio/stream/{token} 101" in line for line in ours)
    for what, secret in secrets.items():
        leaked = [line for line in ours if secret in line]
        assert leaked == [], what


async def test_hung_store_gets_a_polite_answer_quickly(tmp_path: Path) -> None:
    """With the store frozen, a caller hears 'unavailable' within seconds."""
    server = EmbeddedValkey(tmp_path / "store")
    await server.start()
    assert server.pid is not None
    try:
        async with running_callgate(
            server.url, tmp_path / "data", CALLGATE_STORE_TIMEOUT_MS="300"
        ) as callgate:
            await callgate.tenant("alpha", NUMBER_A)
            os.kill(server.pid, signal.SIGSTOP)
            try:
                loop = asyncio.get_running_loop()
                started = loop.time()
                call = await callgate.twilio.place_call(NUMBER_A, CALLER)
                assert loop.time() - started < 3.0
                async with callgate.http.get(f"{callgate.base_url}/readyz") as ready:
                    assert ready.status == 503
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert call.http_status == 200
            assert call.first_verb == "Say"
            assert call.twiml_text is not None
            assert "<Hangup" in call.twiml_text
    finally:
        await server.stop()


async def test_stream_for_another_call_is_closed_and_recorded(
    callgate: Harness,
) -> None:
    """A start naming a call other than the token's closes with 1008."""
    tenant = await callgate.tenant("alpha", NUMBER_A)
    call = await callgate.twilio.place_call(NUMBER_A, CALLER)
    other = await callgate.twilio.place_call(NUMBER_A, CALLER)
    # The second call's simulator opens the first call's stream URL, signed
    # correctly, and announces itself in start: the token names the first.
    await other.open_stream(url=call.stream_url)
    await other.wait_closed(timeout_secs=5)
    assert other.close_code == 1008
    await callgate.calls_settled()
    assert callgate.vapi.calls == {}
    status, record = await callgate.api(
        "GET", f"/workspaces/{tenant.workspace_id}/calls/{call.sid}"
    )
    assert status == 200
    assert (record["status"], record["end_reason"]) == ("completed", "protocol_error")
    assert record["metered_ms"] == 0
