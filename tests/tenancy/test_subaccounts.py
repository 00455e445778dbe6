"""Each workspace gets its own Twilio subaccount; its numbers sign with its token."""

from __future__ import annotations

from tests.harness import Harness
from tests.peers.twilio import TwilioAccount, TwilioSimulator

CALLER = "+14155551212"


async def test_subaccount_numbers_accept_only_their_own_signature(
    callgate: Harness,
) -> None:
    """Workspace → subaccount → bought number; a main-token signature is refused."""
    status, workspace = await callgate.api("POST", "/workspaces", {"name": "alpha"})
    assert status == 201
    sub_sid = workspace["twilio_account_sid"]
    assert sub_sid in callgate.twilio_rest.subaccounts
    assert callgate.twilio_rest.parent_of(sub_sid) == callgate.account.sid
    callgate.vapi.add_key("alpha-vapi-key")
    status, agent = await callgate.api(
        "POST",
        f"/workspaces/{workspace['id']}/agents",
        {
            "name": "desk",
            "provider": "vapi",
            "assistant_id": "assistant-alpha",
            "api_key": "alpha-vapi-key",
        },
    )
    assert status == 201
    status, bought = await callgate.api(
        "POST",
        f"/workspaces/{workspace['id']}/numbers/buy",
        {"area_code": "415", "agent_id": agent["id"]},
    )
    assert status == 201, bought
    number = bought["number"]
    assert bought["twilio_account_sid"] == sub_sid
    assert callgate.twilio_rest.owner_of(number) == sub_sid
    settings = callgate.twilio_rest.incoming_number(number)
    assert settings is not None
    assert settings.voice_url == f"{callgate.base_url}/twilio/voice"

    subaccount = callgate.twilio_rest.account_for(number)
    voice, status_url = callgate.twilio.voice_url, callgate.twilio.status_url
    # The main account's token, with the subaccount's sid: a forgery.
    forged = TwilioSimulator(
        callgate.http,
        TwilioAccount(sub_sid, callgate.account.auth_token),
        voice,
        status_url,
    )
    refused = await forged.place_call(number, CALLER)
    assert refused.http_status == 403

    genuine = TwilioSimulator(callgate.http, subaccount, voice, status_url)
    try:
        call = await genuine.place_call(number, CALLER)
        assert call.http_status == 200
        assert call.first_verb == "Connect"
        # The stream upgrade is checked with the subaccount's token too.
        await call.open_stream()
        vapi_call = await callgate.vapi.wait_for_call(timeout_secs=5)
        assert vapi_call.api_key == "alpha-vapi-key"
        await call.hang_up()
        await callgate.calls_settled()
        record = await callgate.call_record(workspace["id"], call.sid)
        assert record["end_reason"] == "caller_hung_up"
    finally:
        await genuine.close()
        await forged.close()


async def test_workspace_can_go_without_a_subaccount(callgate: Harness) -> None:
    """Asking for none makes none; buying a number then is a clear 409."""
    status, workspace = await callgate.api(
        "POST", "/workspaces", {"name": "plain", "twilio_subaccount": False}
    )
    assert (status, workspace["twilio_account_sid"]) == (201, None)
    status, agent = await callgate.api(
        "POST",
        f"/workspaces/{workspace['id']}/agents",
        {"name": "d", "provider": "vapi", "assistant_id": "a", "api_key": "k"},
    )
    assert status == 201
    before = len(callgate.twilio_rest.requests)
    status, problem = await callgate.api(
        "POST",
        f"/workspaces/{workspace['id']}/numbers/buy",
        {"area_code": "415", "agent_id": agent["id"]},
    )
    assert (status, problem["type"]) == (409, "urn:callgate:problem:conflict")
    assert "subaccount" in problem["detail"]
    assert len(callgate.twilio_rest.requests) == before
