"""Retell calls go by SIP: registered, dialled, and metered from Twilio's callbacks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as redis

from router.app import RECONCILER
from router.webhooks import MAX_CALL_SECS, METER
from tests.harness import Harness, running_callgate
from tests.peers.errors import DialRefusedError

NUMBER = "+15005550003"
CALLER = "+14155551212"
FALLBACK = "+15005550888"


async def test_retell_call_is_dialled_by_sip_and_metered(callgate: Harness) -> None:
    """The call dials the SIP URI of the call id Retell issued, with A's key."""
    tenant = await callgate.tenant("alpha", NUMBER, provider="retell")
    call = await callgate.place(NUMBER, CALLER)
    registration = await callgate.retell.wait_for_registration(timeout_secs=5)
    assert registration.api_key == tenant.api_key
    assert registration.request_json["agent_id"] == tenant.assistant_id
    assert registration.request_json["from_number"] == CALLER
    assert registration.request_json["to_number"] == NUMBER
    assert registration.request_json["metadata"] == {
        "callgate_workspace_id": tenant.workspace_id,
        "twilio_call_sid": call.sid,
    }

    assert call.first_verb == "Dial"
    leg = call.dial_leg
    assert leg.target == callgate.retell.sip_uri(registration.call_id)
    assert leg.time_limit_secs == MAX_CALL_SECS
    await leg.ring()
    await leg.answer()
    # Real time has to pass for a call to have a length.
    await asyncio.sleep(1.0)
    await leg.hang_up(by="callee")
    await leg.wait_ended(timeout_secs=5)
    assert leg.callback_statuses() == [
        "initiated",
        "ringing",
        "in-progress",
        "completed",
    ]
    assert all(delivery.ok for delivery in leg.callbacks)
    assert leg.action_delivery is not None
    assert leg.action_delivery.ok
    assert call.after_dial_twiml is not None
    assert "<Hangup" in call.after_dial_twiml

    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["provider"] == "retell"
    assert record["provider_call_id"] == registration.call_id
    assert record["end_reason"] == "completed"
    assert 900 <= record["metered_ms"] <= 1600
    # Both Twilio legs (one started minute each) and two seconds of Retell.
    seconds = -(-record["metered_ms"] // 1000)
    assert record["cost_micros"] == 8_500 + 4_000 + (seconds * 70_000 + 30) // 60
    status, usage = await callgate.api(
        "GET", f"/workspaces/{tenant.workspace_id}/usage"
    )
    assert (status, usage["calls"], usage["ms"]) == (200, 1, record["metered_ms"])
    assert callgate.vapi.calls == {}


async def test_a_lost_terminal_callback_is_settled_by_the_dial_action(
    callgate: Harness,
) -> None:
    """The leg's last callback never arrives; the <Dial> action ends the call."""
    tenant = await callgate.tenant("alpha", NUMBER, provider="retell")
    call = await callgate.place(NUMBER, CALLER)
    await callgate.retell.wait_for_registration(timeout_secs=5)
    leg = call.dial_leg
    await leg.ring()
    await leg.answer()
    # Real time has to pass for a call to have a length.
    await asyncio.sleep(1.0)
    callgate.twilio.webhooks.lose("/twilio/sip-status/")
    await leg.hang_up(by="callee")
    await leg.wait_ended(timeout_secs=5)
    assert leg.callbacks[-1].error == "lost"
    assert leg.action_delivery is not None
    assert leg.action_delivery.ok

    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "completed"
    assert 900 <= record["metered_ms"] <= 1600
    # The meter no longer counts the call's time.
    assert callgate.app[METER].session(call.sid) is None


async def test_the_callers_status_callback_settles_when_both_leg_reports_are_lost(
    callgate: Harness,
) -> None:
    """Neither the leg's last callback nor the action arrives; the call's does."""
    tenant = await callgate.tenant("alpha", NUMBER, provider="retell")
    call = await callgate.place(NUMBER, CALLER)
    await callgate.retell.wait_for_registration(timeout_secs=5)
    leg = call.dial_leg
    await leg.ring()
    await leg.answer()
    # Real time has to pass for a call to have a length.
    await asyncio.sleep(1.0)
    callgate.twilio.webhooks.lose("/twilio/sip-status/")
    callgate.twilio.webhooks.lose("/twilio/dial-action/")
    await leg.hang_up(by="callee")
    await leg.wait_ended(timeout_secs=5)
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] is None

    assert await callgate.twilio.send_status_callback(call, "completed") == 204
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "completed"
    assert 900 <= record["metered_ms"] <= 1600
    assert callgate.app[METER].session(call.sid) is None


async def test_a_call_whose_every_end_report_is_lost_is_found_over_by_rest(
    store: redis.Redis, valkey_url: str, tmp_path: Path
) -> None:
    """No callback, no action, no status callback: Twilio's REST API says it.

    The process metering the call asks Twilio about its leg every
    CALLGATE_SIP_CHECK_SECS; while the leg is up nothing changes, and once it
    is over the call is settled at the leg's own length, not at the check.
    """
    async with running_callgate(
        valkey_url, tmp_path, CALLGATE_SIP_CHECK_SECS="1"
    ) as callgate:
        reconciler = callgate.app[RECONCILER]
        tenant = await callgate.tenant("alpha", NUMBER, provider="retell")
        call = await callgate.place(NUMBER, CALLER)
        await callgate.retell.wait_for_registration(timeout_secs=5)
        leg = call.dial_leg
        await leg.ring()
        await leg.answer()
        # Real time has to pass for the call to be due a check.
        await asyncio.sleep(1.1)
        assert await reconciler.check_sip_calls() == 0  # the leg is up
        assert callgate.app[METER].session(call.sid) is not None
        callgate.twilio.webhooks.lose("/twilio/sip-status/")
        callgate.twilio.webhooks.lose("/twilio/dial-action/")
        await leg.hang_up(by="callee")
        await leg.wait_ended(timeout_secs=5)
        # Checked 1.1 s into the call; the next check is due a second later.
        assert await reconciler.check_sip_calls() == 0
        await asyncio.sleep(1.0)
        assert await reconciler.check_sip_calls() == 1

        record = await callgate.call_record(tenant.workspace_id, call.sid)
        assert record["end_reason"] == "completed"
        assert record["sip_call_sid"] == leg.child_sid
        assert record["metered_ms"] == leg.duration_secs * 1000
        status, usage = await callgate.api(
            "GET", f"/workspaces/{tenant.workspace_id}/usage"
        )
        assert (status, usage["ms"]) == (200, record["metered_ms"])
        assert callgate.app[METER].session(call.sid) is None
        assert await reconciler.check_sip_calls() == 0


async def test_retell_refusing_the_registration_sends_the_caller_to_fallback(
    callgate: Harness,
) -> None:
    """A Retell that answers 500 gets the fallback answered straight away."""
    tenant = await callgate.tenant("alpha", NUMBER, provider="retell")
    await callgate.set_policy(tenant.workspace_id, fallback_number=FALLBACK)
    callgate.retell.register_status_override = 500
    call = await callgate.place(NUMBER, CALLER)
    assert call.first_verb == "Dial"
    assert call.dial_leg.target == FALLBACK
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "upstream_failed"
    assert (
        callgate.metric(
            "callgate_upstream_errors_total", {"provider": "retell", "kind": "connect"}
        )
        == 1
    )


async def test_failed_sip_leg_falls_back_and_is_recorded(callgate: Harness) -> None:
    """A SIP leg Retell refuses (expired registration) ends in the fallback."""
    tenant = await callgate.tenant("alpha", NUMBER, provider="retell")
    callgate.retell.registration_ttl_secs = 0
    call = await callgate.place(NUMBER, CALLER)
    with pytest.raises(DialRefusedError):
        await call.dial_leg.answer()
    await call.dial_leg.wait_ended(timeout_secs=5)
    assert call.dial_leg.status == "failed"
    assert call.after_dial_twiml is not None
    assert "<Say>Sorry, we can't take your call right now" in call.after_dial_twiml
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "upstream_failed"
    assert record["metered_ms"] == 0


async def test_forged_sip_callbacks_are_refused(callgate: Harness) -> None:
    """A SIP progress callback without Twilio's signature changes nothing."""
    tenant = await callgate.tenant("alpha", NUMBER, provider="retell")
    call = await callgate.place(NUMBER, CALLER)
    leg = call.dial_leg
    leg.signature_override = "Zm9yZ2Vk"
    await leg.ring()
    await leg.answer()
    assert [delivery.http_status for delivery in leg.callbacks] == [403, 403, 403]
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["started_at"] is None
