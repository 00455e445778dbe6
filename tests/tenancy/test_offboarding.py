"""Offboarding: one workspace leaves whole, while another keeps taking calls."""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from typing import Any

import redis.asyncio as redis

from tenancy import keyspace, manage
from tests.harness import OPERATOR_KEY, Harness
from tests.peers.audio import split_frames, tone_mulaw

NUMBER_A = "+15005550001"
NUMBER_B = "+15005550002"
CALLER = "+14155550123"
# A sid no account of this family has: Twilio refuses to transfer to it.
STRANGER = "AC" + "0" * 32


async def _buy(callgate: Harness, workspace_id: str, agent_id: str) -> str:
    status, bought = await callgate.api(
        "POST",
        f"/workspaces/{workspace_id}/numbers/buy",
        {"area_code": "415", "agent_id": agent_id},
    )
    assert status == 201, bought
    number: str = bought["number"]
    return number


async def _offboard(
    callgate: Harness, workspace_id: str, body: object
) -> dict[str, Any]:
    status, state = await callgate.api(
        "POST", f"/workspaces/{workspace_id}/offboarding", body
    )
    assert status == 202, state
    await callgate.app[manage.OFFBOARDING].wait(workspace_id)
    status, state = await callgate.api("GET", f"/workspaces/{workspace_id}/offboarding")
    assert status == 200
    result: dict[str, Any] = state
    return result


async def test_offboarding_removes_a_workspace_while_another_keeps_calling(
    callgate: Harness, store: redis.Redis
) -> None:
    """Export, release, transfer, revoke, delete, certify; B's call never notices."""
    alpha = await callgate.tenant("alpha", NUMBER_A)
    bravo = await callgate.tenant("bravo", NUMBER_B)
    await callgate.set_policy(alpha.workspace_id, recording=True)
    base = f"/workspaces/{alpha.workspace_id}"
    status, workspace = await callgate.api("GET", base)
    subaccount = workspace["twilio_account_sid"]
    released = await _buy(callgate, alpha.workspace_id, alpha.agent_id)
    moved = await _buy(callgate, alpha.workspace_id, alpha.agent_id)
    status, key = await callgate.api(
        "POST", f"{base}/keys", {"role": "admin", "name": "client"}
    )
    assert status == 201
    # A finished call and a live one in A; a live one in B.
    done, _ = await callgate.connected_call(NUMBER_A, CALLER)
    tone = tone_mulaw(440, duration_ms=300)
    await done.send_audio(split_frames(tone))
    await done.wait_for_audio(len(tone), timeout_secs=5)
    await done.hang_up()
    await callgate.calls_settled()
    lingering, _ = await callgate.connected_call(NUMBER_A, CALLER)
    talking, _ = await callgate.connected_call(NUMBER_B, CALLER)
    _, listed = await callgate.api("GET", f"{base}/calls")

    # First run: the transfer target is wrong, so it stops at the numbers.
    first = await _offboard(
        callgate,
        alpha.workspace_id,
        {
            "grace_secs": 1,
            "numbers": {
                moved: {"action": "transfer", "to_account_sid": STRANGER},
            },
        },
    )
    assert first["status"] == "failed", first
    assert first["error"].startswith("numbers:")
    assert first["numbers"][released]["status"] == "done"
    assert callgate.twilio_rest.owner_of(released) is None
    # The live call in A was hung up through Twilio after the grace period.
    assert {"Status": "completed"} in [
        dict(form) for form in callgate.rest_forms(lingering.sid)
    ]
    status, refused = await callgate.api("GET", base, key=key["token"])
    assert status == 200, refused  # keys are not revoked yet

    # Resumed with the client's real account: the release is not sent again.
    client = callgate.twilio_rest.create_subaccount(callgate.account, "client")
    deletes = callgate.twilio_rest.count("DELETE")
    second = await _offboard(
        callgate,
        alpha.workspace_id,
        {"numbers": {moved: {"action": "transfer", "to_account_sid": client.sid}}},
    )
    assert second["status"] == "done", second
    assert callgate.twilio_rest.count("DELETE") == deletes
    assert callgate.twilio_rest.owner_of(moved) == client.sid
    # No number is kept in it, so the subaccount Callgate made is closed.
    assert callgate.twilio_rest.account_status(subaccount) == "closed"

    # Nothing of A is left in the store, and its key is dead.
    assert [k async for k in store.scan_iter(match=f"*{alpha.workspace_id}*")] == []
    owners = await store.hvals(keyspace.NUMBERS)
    assert alpha.workspace_id.encode() not in owners
    status, _ = await callgate.api("GET", base, key=key["token"])
    assert status == 401
    status, _ = await callgate.api("GET", base)
    assert status == 404

    # The export is the API's view, with no secret in it.
    async with callgate.http.get(
        f"{callgate.base_url}/api/v1{base}/offboarding/export",
        headers={"Authorization": f"Bearer {OPERATOR_KEY}"},
    ) as response:
        assert response.status == 200
        assert response.content_type == "application/zip"
        archive = await response.read()
    assert hashlib.sha256(archive).hexdigest() == second["export"]["sha256"]
    with zipfile.ZipFile(io.BytesIO(archive)) as export:
        names = set(export.namelist())
        rows = list(csv.DictReader(io.StringIO(export.read("calls.csv").decode())))
        audit = export.read("audit.jsonl").decode()
        everything = b"".join(export.read(name) for name in names)
    assert {"calls.csv", "usage.json", "statement.json", "config.json"} <= names
    assert f"recordings/{done.sid}.wav" in names
    assert sorted(row["call_sid"] for row in rows) == sorted(
        call["call_sid"] for call in listed["items"]
    )
    assert "workspace.offboard" in audit
    assert alpha.api_key.encode() not in everything
    assert key["token"].encode() not in everything

    status, certificate = await callgate.api("GET", f"{base}/offboarding/certificate")
    assert status == 200
    assert certificate["export_sha256"] == second["export"]["sha256"]
    assert certificate["numbers"] == {"release": 2, "transfer": 1}
    assert certificate["subaccount_closed"] is True
    assert CALLER not in str(certificate)

    # Running it again changes nothing and asks Twilio nothing new.
    sent = len(callgate.twilio_rest.requests)
    third = await _offboard(callgate, alpha.workspace_id, {})
    assert third["status"] == "done"
    assert len(callgate.twilio_rest.requests) == sent

    # B's call carried audio throughout and still does.
    await talking.send_audio(split_frames(tone))
    await talking.wait_for_audio(len(tone), timeout_secs=5)
    await talking.hang_up()
    await callgate.calls_settled()
    record = await callgate.call_record(bravo.workspace_id, talking.sid)
    assert record["end_reason"] == "caller_hung_up"
    # Asking about the offboarding did not bring any of A's keys back.
    assert [k async for k in store.scan_iter(match=f"*{alpha.workspace_id}*")] == []
