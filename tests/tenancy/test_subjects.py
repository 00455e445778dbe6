"""Data-subject requests: one caller's records leave one workspace, no other."""

from __future__ import annotations

import redis.asyncio as redis

from tenancy import keyspace
from tests.harness import Harness
from tests.peers.audio import split_frames, tone_mulaw

NUMBER_A = "+15005550001"
NUMBER_B = "+15005550002"
SUBJECT = "+14155550123"
OTHER = "+14155550999"


async def _talk(callgate: Harness, to: str, caller: str) -> str:
    call, _ = await callgate.connected_call(to, caller)
    tone = tone_mulaw(440, duration_ms=300)
    await call.send_audio(split_frames(tone))
    await call.wait_for_audio(len(tone), timeout_secs=5)
    await call.hang_up()
    await callgate.calls_settled()
    return call.sid


async def _snapshot(store: redis.Redis, workspace_id: str) -> dict[str, bytes]:
    dumps: dict[str, bytes] = {}
    async for name in store.scan_iter(match=keyspace.workspace_pattern(workspace_id)):
        value = await store.dump(name)
        assert value is not None
        dumps[name] = value
    return dumps


async def test_erasure_removes_one_callers_records_from_one_workspace(
    callgate: Harness, store: redis.Redis
) -> None:
    """Erasing a caller in A deletes their calls and recordings there only."""
    alpha = await callgate.tenant("alpha", NUMBER_A)
    bravo = await callgate.tenant("bravo", NUMBER_B)
    await callgate.set_policy(alpha.workspace_id, recording=True)
    subject_call = await _talk(callgate, NUMBER_A, SUBJECT)
    other_call = await _talk(callgate, NUMBER_A, OTHER)
    bravo_call = await _talk(callgate, NUMBER_B, SUBJECT)
    base = f"/workspaces/{alpha.workspace_id}"
    recordings = callgate.settings.data_dir / "workspaces" / alpha.workspace_id
    assert (recordings / "recordings" / f"{subject_call}.wav").exists()

    status, exported = await callgate.api(
        "POST", f"{base}/subjects/export", {"number": SUBJECT}
    )
    assert status == 200
    assert [call["call_sid"] for call in exported["calls"]] == [subject_call]
    assert exported["certificate"]["kind"] == "export"

    _, usage_before = await callgate.api("GET", f"{base}/usage")
    bravo_before = await _snapshot(store, bravo.workspace_id)
    status, certificate = await callgate.api(
        "POST", f"{base}/subjects/erase", {"number": SUBJECT}
    )
    assert status == 200
    assert (certificate["call_records"], certificate["recordings"]) == (1, 1)
    assert SUBJECT not in str(certificate)
    assert certificate["subject_digest"] not in (SUBJECT, "")

    status, _ = await callgate.api("GET", f"{base}/calls/{subject_call}")
    assert status == 404
    _, listing = await callgate.api("GET", f"{base}/calls")
    assert [call["call_sid"] for call in listing["items"]] == [other_call]
    assert not (recordings / "recordings" / f"{subject_call}.wav").exists()
    assert (recordings / "recordings" / f"{other_call}.wav").exists()
    _, usage_after = await callgate.api("GET", f"{base}/usage")
    assert (usage_after["ms"], usage_after["calls"]) == (
        usage_before["ms"],
        usage_before["calls"],
    )
    # The same caller in workspace B: untouched, to the byte.
    assert await _snapshot(store, bravo.workspace_id) == bravo_before
    status, _ = await callgate.api(
        "GET", f"/workspaces/{bravo.workspace_id}/calls/{bravo_call}"
    )
    assert status == 200

    status, again = await callgate.api(
        "POST", f"{base}/subjects/erase", {"number": SUBJECT}
    )
    assert again["call_records"] == 0
    _, certificates = await callgate.api("GET", f"{base}/subjects/certificates")
    assert [c["kind"] for c in certificates["items"]] == ["erase", "erase", "export"]
    assert SUBJECT not in str(certificates)


async def test_a_live_call_is_not_erased_under_its_meter(callgate: Harness) -> None:
    """Erasing a caller who is on the line now is refused until the call ends."""
    alpha = await callgate.tenant("alpha", NUMBER_A)
    call, _ = await callgate.connected_call(NUMBER_A, SUBJECT)
    base = f"/workspaces/{alpha.workspace_id}"
    status, problem = await callgate.api(
        "POST", f"{base}/subjects/erase", {"number": SUBJECT}
    )
    assert (status, problem["status"]) == (409, 409)
    assert "still live" in problem["detail"]
    record = await callgate.call_record(alpha.workspace_id, call.sid)
    assert record["status"] == "in-progress"

    await call.hang_up()
    await callgate.calls_settled()
    status, certificate = await callgate.api(
        "POST", f"{base}/subjects/erase", {"number": SUBJECT}
    )
    assert (status, certificate["call_records"]) == (200, 1)
