"""Offboarding: one workspace leaves whole, while another keeps taking calls."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import hashlib
import io
import os
import signal
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

from router import stream
from tenancy import keyspace, manage
from tenancy.workspaces import now_ms
from tests.harness import (
    OPERATOR_KEY,
    CallgateProcess,
    Harness,
    callgate_process,
    running_callgate,
    running_peers,
)
from tests.peers.audio import split_frames, tone_mulaw
from tests.peers.twilio import FakeTwilioRest

NUMBER_A = "+15005550001"
NUMBER_B = "+15005550002"
NUMBER_C = "+15005550003"
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


# What a workspace is, as opposed to what its calls add to it.
SETUP_KINDS = frozenset({"meta", "agents", "agent", "numbers", "number", "keys", "key"})


async def _snapshot(
    store: redis.Redis, workspace_id: str, kinds: frozenset[str]
) -> dict[str, bytes]:
    """DUMP of each of the workspace's keys of the given kinds."""
    prefix = keyspace.workspace_prefix(workspace_id) + ":"
    dumps: dict[str, bytes] = {}
    async for name in store.scan_iter(match=keyspace.workspace_pattern(workspace_id)):
        if name.removeprefix(prefix).split(":", 1)[0] in kinds:
            value = await store.dump(name)
            assert value is not None
            dumps[name] = value
    assert dumps
    return dumps


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
    status, _ = await callgate.api("PUT", f"{base}/plan", {"included_minutes": 100})
    assert status == 200
    status, hook = await callgate.api(
        "PUT", f"{base}/webhook", {"url": "https://hooks.example.com/alpha"}
    )
    assert status == 200
    bravo_setup = await _snapshot(store, bravo.workspace_id, SETUP_KINDS)
    # A finished call and a live one in A; a live one in B.
    done, _ = await callgate.connected_call(NUMBER_A, CALLER)
    tone = tone_mulaw(440, duration_ms=300)
    await done.send_audio(split_frames(tone))
    await done.wait_for_audio(len(tone), timeout_secs=5)
    await done.hang_up()
    await callgate.calls_settled()
    lingering, _ = await callgate.connected_call(NUMBER_A, CALLER)
    talking, _ = await callgate.connected_call(NUMBER_B, CALLER)

    # Paused after the suspension, the API's view is the one to export.
    paused = await _offboard(
        callgate,
        alpha.workspace_id,
        {
            "grace_secs": 1,
            "pause_after": "suspend",
            "numbers": {
                moved: {"action": "transfer", "to_account_sid": STRANGER},
            },
        },
    )
    assert paused["status"] == "paused", paused
    _, listed = await callgate.api("GET", f"{base}/calls")
    _, usage = await callgate.api("GET", f"{base}/usage")
    assert usage["statement"] is not None
    assert [call["call_sid"] for call in listed["items"]] == [lingering.sid, done.sid]

    # Resumed: the transfer target is wrong, so it stops at the numbers.
    first = await _offboard(callgate, alpha.workspace_id, {})
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
    assert await store.zscore(keyspace.WEBHOOKS_DUE, alpha.workspace_id) is None
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
        usages = orjson.loads(export.read("usage.json"))
        final = orjson.loads(export.read("statement.json"))
        page = export.read("statement.html").decode()
        audit = export.read("audit.jsonl").decode()
        events = orjson.loads(export.read("budget_events.json"))
        everything = b"".join(export.read(name) for name in names)
    assert {"calls.csv", "usage.json", "statement.json", "config.json"} <= names
    assert f"recordings/{done.sid}.wav" in names
    assert rows == [
        {name: "" if value is None else str(value) for name, value in call.items()}
        for call in listed["items"]
    ]
    assert usages[usage["period"]] == usage
    assert final == usage
    assert "Included minutes" in page
    assert "Amount due (USD)" in page
    assert "workspace.offboard" in audit
    assert alpha.api_key.encode() not in everything
    assert key["token"].encode() not in everything
    assert hook["secret"].encode() not in everything
    assert events == []

    status, certificate = await callgate.api("GET", f"{base}/offboarding/certificate")
    assert status == 200
    assert certificate["export_sha256"] == second["export"]["sha256"]
    assert certificate["numbers"] == {"release": 2, "transfer": 1}
    assert certificate["subaccount_closed"] is True
    assert CALLER not in str(certificate)

    # The archive is deleted once past its retention (30 days by default).
    offboarding = callgate.app[manage.OFFBOARDING]
    assert offboarding.prune_exports(now_ms()) == []
    month_ago = time.time() - 31 * 86_400
    os.utime(offboarding.export_path(alpha.workspace_id), (month_ago, month_ago))
    assert offboarding.prune_exports(now_ms()) == [alpha.workspace_id]
    status, gone = await callgate.api("GET", f"{base}/offboarding/export")
    assert (status, gone["type"]) == (410, "urn:callgate:problem:gone")

    # Running it again changes nothing and asks Twilio nothing new.
    sent = len(callgate.twilio_rest.requests)
    third = await _offboard(callgate, alpha.workspace_id, {})
    assert third["status"] == "done"
    assert len(callgate.twilio_rest.requests) == sent

    # A's number now belongs to nobody here: a call to it is rejected, unbilled.
    stray = await callgate.place(NUMBER_A, CALLER)
    assert stray.first_verb == "Reject"

    # B's call carried audio throughout and still does.
    await talking.send_audio(split_frames(tone))
    await talking.wait_for_audio(len(tone), timeout_secs=5)
    await talking.hang_up()
    await callgate.calls_settled()
    record = await callgate.call_record(bravo.workspace_id, talking.sid)
    assert record["end_reason"] == "caller_hung_up"
    # B's configuration and keys are byte for byte what they were.
    assert await _snapshot(store, bravo.workspace_id, SETUP_KINDS) == bravo_setup
    # Asking about the offboarding did not bring any of A's keys back.
    assert [k async for k in store.scan_iter(match=f"*{alpha.workspace_id}*")] == []


async def _state_when(
    store: redis.Redis, workspace_id: str, statuses: set[str]
) -> dict[str, Any]:
    """The offboarding's state once its status is one of ``statuses``."""
    return await _state_where(
        store, workspace_id, lambda state: state["status"] in statuses
    )


async def _state_where(
    store: redis.Redis,
    workspace_id: str,
    holds: Callable[[dict[str, Any]], bool],
    timeout_secs: float = 30,
) -> dict[str, Any]:
    """The offboarding's state once ``holds`` is true of it.

    Woken by the store's keyspace notifications on the offboardings hash.
    """
    await store.config_set("notify-keyspace-events", "Kh")
    pubsub = store.pubsub()
    await pubsub.subscribe(f"__keyspace@0__:{keyspace.OFFBOARDINGS}")
    try:
        async with asyncio.timeout(timeout_secs):
            while True:
                raw = await store.hget(keyspace.OFFBOARDINGS, workspace_id)
                if raw is not None:
                    state: dict[str, Any] = orjson.loads(raw)
                    if holds(state):
                        return state
                await pubsub.get_message(timeout=1.0)
    finally:
        await pubsub.aclose()


async def _leaving_workspace(callgate: CallgateProcess, name: str) -> dict[str, Any]:
    """A workspace with a subaccount, an agent, two bought numbers and a key."""
    status, workspace = await callgate.api("POST", "/workspaces", {"name": name})
    assert status == 201, workspace
    base = f"/workspaces/{workspace['id']}"
    status, agent = await callgate.api(
        "POST",
        f"{base}/agents",
        {"name": "desk", "provider": "vapi", "assistant_id": "a", "api_key": "k"},
    )
    assert status == 201, agent
    numbers = []
    for _ in range(2):
        status, bought = await callgate.api(
            "POST", f"{base}/numbers/buy", {"area_code": "415", "agent_id": agent["id"]}
        )
        assert status == 201, bought
        numbers.append(bought["number"])
    status, _ = await callgate.api(
        "POST", f"{base}/keys", {"role": "viewer", "name": "client"}
    )
    assert status == 201
    return {**workspace, "numbers": numbers}


async def _export_names(callgate: CallgateProcess, workspace_id: str) -> list[str]:
    async with callgate.http.get(
        f"{callgate.base_url}/api/v1/workspaces/{workspace_id}/offboarding/export",
        headers={"Authorization": f"Bearer {OPERATOR_KEY}"},
    ) as response:
        assert response.status == 200
        archive = await response.read()
    with zipfile.ZipFile(io.BytesIO(archive)) as export:
        return sorted(export.namelist())


def _twilio_operations(rest: FakeTwilioRest, subaccount: str) -> list[str]:
    """The irreversible requests sent about one subaccount and its numbers."""
    operations = []
    for request in rest.requests:
        if f"/Accounts/{subaccount}" not in request.path or request.method == "GET":
            continue
        if request.method == "DELETE":
            operations.append("release")
        elif "AccountSid" in request.form:
            operations.append("transfer")
        elif request.form.get("Status") == "closed":
            operations.append("close")
    return sorted(operations)


async def test_killed_after_any_step_the_rerun_ends_as_an_unbroken_run(
    store: redis.Redis, valkey_url: str, tmp_path: Path
) -> None:
    """SIGKILL after each step in turn; the rerun repeats no Twilio operation."""
    env = {"CALLGATE_REDIS_URL": valkey_url}
    data_dir = tmp_path / "data"
    async with running_peers() as peers:
        client = peers.twilio_rest.create_subaccount(peers.account, "client")
        for index in range(12):
            peers.twilio_rest.add_available(f"+1415555{index:04d}", "415")

        def body(workspace: dict[str, Any]) -> dict[str, Any]:
            moved = workspace["numbers"][1]
            wish = {"action": "transfer", "to_account_sid": client.sid}
            return {"grace_secs": 0, "numbers": {moved: wish}}

        async def outcome(
            callgate: CallgateProcess, workspace: dict[str, Any]
        ) -> tuple[Any, ...]:
            workspace_id = workspace["id"]
            _, certificate = await callgate.api(
                "GET", f"/workspaces/{workspace_id}/offboarding/certificate"
            )
            left = [k async for k in store.scan_iter(match=f"*{workspace_id}*")]
            return (
                certificate["deleted_keys"],
                certificate["numbers"],
                certificate["subaccount_closed"],
                await _export_names(callgate, workspace_id),
                _twilio_operations(peers.twilio_rest, workspace["twilio_account_sid"]),
                [peers.twilio_rest.owner_of(n) for n in workspace["numbers"]],
                left,
            )

        async with callgate_process(data_dir, peers, **env) as callgate:
            reference = await _leaving_workspace(callgate, "reference")
            path = f"/workspaces/{reference['id']}/offboarding"
            status, _ = await callgate.api("POST", path, body(reference))
            assert status == 202
            final = await _state_when(store, reference["id"], {"done", "failed"})
            assert final["status"] == "done", final
            expected = await outcome(callgate, reference)
        assert expected[4] == ["close", "release", "transfer"]
        assert expected[5] == [None, client.sid]
        assert expected[6] == []

        for step in ("suspend", "export", "numbers", "revoke", "delete"):
            async with callgate_process(data_dir, peers, **env) as callgate:
                workspace = await _leaving_workspace(callgate, step)
                path = f"/workspaces/{workspace['id']}/offboarding"
                status, _ = await callgate.api(
                    "POST", path, {**body(workspace), "pause_after": step}
                )
                assert status == 202
                paused = await _state_when(store, workspace["id"], {"paused", "failed"})
                assert list(paused["steps"])[-1] == step
                # The pause gave the lease back with the same write, so a
                # process killed right after it leaves the resume to anyone.
                leases = keyspace.OFFBOARDING_LEASES
                assert await store.hget(leases, workspace["id"]) is None
                callgate.process.send_signal(signal.SIGKILL)
                await callgate.process.wait()
            async with callgate_process(data_dir, peers, **env) as callgate:
                status, _ = await callgate.api("POST", path, {})
                assert status == 202
                final = await _state_when(store, workspace["id"], {"done", "failed"})
                assert final["status"] == "done", (step, final)
                assert await outcome(callgate, workspace) == expected, step


async def test_a_restarted_process_finishes_an_offboarding_killed_mid_grace(
    store: redis.Redis, valkey_url: str, tmp_path: Path
) -> None:
    """Killed while waiting out a live call; the next process resumes by itself."""
    env = {"CALLGATE_REDIS_URL": valkey_url, "CALLGATE_LEASE_MS": "2000"}
    data_dir = tmp_path / "data"
    async with running_peers() as peers:
        async with callgate_process(data_dir, peers, **env) as callgate:
            workspace_id = await callgate.tenant("alpha", NUMBER_A)
            # With a plan, the call holds a lease the next process can sweep.
            await callgate.put_plan(workspace_id, {"included_minutes": 60})
            call = await callgate.twilio.place_call(NUMBER_A, CALLER)
            peers.twilio_rest.register_call(call)
            await call.open_stream()
            status, started = await callgate.api(
                "POST", f"/workspaces/{workspace_id}/offboarding", {"grace_secs": 1}
            )
            assert status == 202, started
            callgate.process.send_signal(signal.SIGKILL)
            await callgate.process.wait()
        raw = await store.hget(keyspace.OFFBOARDINGS, workspace_id)
        assert raw is not None
        interrupted = orjson.loads(raw)
        assert interrupted["status"] == "running"
        assert "export" not in interrupted["steps"]
        async with callgate_process(data_dir, peers, **env):
            final = await _state_when(store, workspace_id, {"done", "failed"})
        assert final["status"] == "done", final
        # The call the dead process carried was hung up through Twilio.
        hung_up = [
            r for r in peers.twilio_rest.requests if r.form.get("Status") == "completed"
        ]
        assert any(call.sid in r.path for r in hung_up)
        assert [k async for k in store.scan_iter(match=f"*{workspace_id}*")] == []


async def test_two_processes_told_to_resume_at_once_send_each_operation_once(
    store: redis.Redis, valkey_url: str, tmp_path: Path
) -> None:
    """Both processes take the resume; the lease lets one run it, and it ends once."""
    env = {"CALLGATE_REDIS_URL": valkey_url}
    async with running_peers() as peers:
        client = peers.twilio_rest.create_subaccount(peers.account, "client")
        for index in range(2):
            peers.twilio_rest.add_available(f"+1415555{index:04d}", "415")
        async with (
            callgate_process(tmp_path / "first", peers, **env) as first,
            callgate_process(tmp_path / "second", peers, **env) as second,
        ):
            workspace = await _leaving_workspace(first, "contested")
            path = f"/workspaces/{workspace['id']}/offboarding"
            moved = workspace["numbers"][1]
            wish = {"action": "transfer", "to_account_sid": client.sid}
            status, _ = await first.api(
                "POST",
                path,
                {"grace_secs": 0, "numbers": {moved: wish}, "pause_after": "export"},
            )
            assert status == 202
            paused = await _state_when(store, workspace["id"], {"paused", "failed"})
            assert paused["status"] == "paused", paused
            answers = await asyncio.gather(
                first.api("POST", path, {}), second.api("POST", path, {})
            )
            assert [status for status, _ in answers] == [202, 202]
            final = await _state_when(store, workspace["id"], {"done", "failed"})
            assert final["status"] == "done", final
            operations = _twilio_operations(
                peers.twilio_rest, workspace["twilio_account_sid"]
            )
            assert operations == ["close", "release", "transfer"]
            assert peers.twilio_rest.owner_of(moved) == client.sid


def _utc_ms(text: str) -> int:
    """Epoch milliseconds of an ISO 8601 UTC time."""
    return int(dt.datetime.fromisoformat(text).timestamp() * 1000)


async def test_kept_numbers_are_released_once_their_port_out_date_passes(
    callgate: Harness,
) -> None:
    """Kept until a date: still there after it is released, then the account shut."""
    alpha = await callgate.tenant("alpha", NUMBER_A)
    _, workspace = await callgate.api("GET", f"/workspaces/{alpha.workspace_id}")
    subaccount = workspace["twilio_account_sid"]
    waiting = await _buy(callgate, alpha.workspace_id, alpha.agent_id)
    ported = await _buy(callgate, alpha.workspace_id, alpha.agent_id)
    keep = {"action": "keep", "until": "2027-01-31"}
    state = await _offboard(
        callgate,
        alpha.workspace_id,
        {"grace_secs": 0, "numbers": {waiting: keep, ported: keep}},
    )
    assert state["status"] == "done", state
    assert callgate.twilio_rest.account_status(subaccount) == "active"
    # The client ported one number out before the date; the other stayed.
    callgate.twilio_rest.port_out(ported)
    offboarding = callgate.app[manage.OFFBOARDING]

    assert await offboarding.release_kept(_utc_ms("2027-01-31T23:59:59+00:00")) == []
    assert callgate.twilio_rest.owner_of(waiting) == subaccount
    assert await offboarding.release_kept(_utc_ms("2027-02-01T00:00:00+00:00")) == [
        waiting
    ]
    assert callgate.twilio_rest.owner_of(waiting) is None
    assert callgate.twilio_rest.account_status(subaccount) == "closed"
    status, state = await callgate.api(
        "GET", f"/workspaces/{alpha.workspace_id}/offboarding"
    )
    assert status == 200
    assert state["numbers"][waiting]["expired"] == "released"
    assert state["numbers"][ported]["expired"] == "ported"
    assert state["numbers"][waiting]["expired_at"] is not None
    status, certificate = await callgate.api(
        "GET", f"/workspaces/{alpha.workspace_id}/offboarding/certificate"
    )
    assert status == 200
    assert certificate["subaccount_closed"] is True
    assert certificate["numbers"] == {"keep": 2, "release": 1}

    # Once done, a later look asks Twilio nothing.
    asked = len(callgate.twilio_rest.requests)
    assert await offboarding.release_kept(_utc_ms("2027-03-01T00:00:00+00:00")) == []
    assert len(callgate.twilio_rest.requests) == asked


async def test_an_offboarding_runs_to_its_certificate_on_a_cluster(
    cluster_store: RedisCluster, redis_cluster: str, tmp_path: Path
) -> None:
    """Every script of a run keeps to one slot, so a cluster runs it to the end."""
    state_slot = cluster_store.keyslot(keyspace.OFFBOARDINGS)
    assert cluster_store.keyslot(keyspace.OFFBOARDING_LEASES) == state_slot
    async with running_callgate(
        redis_cluster, tmp_path, CALLGATE_REDIS_CLUSTER="true"
    ) as callgate:
        alpha = await callgate.tenant("alpha", NUMBER_A)
        bought = await _buy(callgate, alpha.workspace_id, alpha.agent_id)
        status, _ = await callgate.api(
            "POST", f"/workspaces/{alpha.workspace_id}/offboarding", {"grace_secs": 0}
        )
        assert status == 202
        async with asyncio.timeout(10):
            await callgate.app[manage.OFFBOARDING].wait(alpha.workspace_id)
        base = f"/workspaces/{alpha.workspace_id}/offboarding"
        status, state = await callgate.api("GET", base)
        assert (status, state["status"]) == (200, "done"), state
        status, certificate = await callgate.api("GET", f"{base}/certificate")
        assert status == 200
        assert certificate["export_sha256"] == state["export"]["sha256"]
        assert certificate["numbers"] == {"release": 2}
        assert certificate["subaccount_closed"] is True
        assert callgate.twilio_rest.owner_of(bought) is None
        # The run gave its lease back, and left nothing of the workspace behind.
        assert await cluster_store.hlen(keyspace.OFFBOARDING_LEASES) == 0
        pattern = keyspace.workspace_pattern(alpha.workspace_id)
        assert [k async for k in cluster_store.scan_iter(match=pattern)] == []


async def test_a_late_look_by_the_watcher_leaves_a_stopped_run_stopped(
    callgate: Harness, store: redis.Redis
) -> None:
    """Paused or failed, a run goes on only when the operator resumes it."""
    alpha = await callgate.tenant("alpha", NUMBER_A)
    _, workspace = await callgate.api("GET", f"/workspaces/{alpha.workspace_id}")
    subaccount = workspace["twilio_account_sid"]
    bought = await _buy(callgate, alpha.workspace_id, alpha.agent_id)
    offboarding = callgate.app[manage.OFFBOARDING]
    paused = await _offboard(
        callgate, alpha.workspace_id, {"grace_secs": 0, "pause_after": "export"}
    )
    assert paused["status"] == "paused", paused
    sent = len(callgate.twilio_rest.requests)

    # The watcher read "running" just before the pause and holds the lease
    # now: what it starts must leave the pause to the operator.
    late = await offboarding.run(alpha.workspace_id)
    assert late["status"] == "paused", late
    assert list(late["steps"]) == ["suspend", "export"]
    assert await offboarding.resume_interrupted() == []
    assert callgate.twilio_rest.owner_of(bought) == subaccount
    assert len(callgate.twilio_rest.requests) == sent
    assert await store.hget(keyspace.OFFBOARDING_LEASES, alpha.workspace_id) is None

    # Resumed, it fails at a transfer Twilio refuses; a late look leaves that too.
    stranger = {bought: {"action": "transfer", "to_account_sid": STRANGER}}
    failed = await _offboard(callgate, alpha.workspace_id, {"numbers": stranger})
    assert failed["status"] == "failed", failed
    sent = len(callgate.twilio_rest.requests)
    late = await offboarding.run(alpha.workspace_id)
    assert (late["status"], late["error"]) == ("failed", failed["error"])
    assert len(callgate.twilio_rest.requests) == sent

    # The operator's resume, with the number released instead, finishes it.
    release = {bought: {"action": "release"}}
    done = await _offboard(callgate, alpha.workspace_id, {"numbers": release})
    assert done["status"] == "done", done
    assert callgate.twilio_rest.owner_of(bought) is None


async def test_a_resume_may_not_change_a_number_twilio_has_acted_on(
    callgate: Harness,
) -> None:
    """A handled number keeps its fate (409); the own subaccount is no target (422)."""
    alpha = await callgate.tenant("alpha", NUMBER_A)
    base = f"/workspaces/{alpha.workspace_id}"
    _, workspace = await callgate.api("GET", base)
    subaccount = workspace["twilio_account_sid"]
    released = await _buy(callgate, alpha.workspace_id, alpha.agent_id)
    moved = await _buy(callgate, alpha.workspace_id, alpha.agent_id)
    client = callgate.twilio_rest.create_subaccount(callgate.account, "client")

    def transfer(account: str) -> dict[str, str]:
        return {"action": "transfer", "to_account_sid": account}

    # Closed with the workspace, its own subaccount would lose the number.
    status, problem = await callgate.api(
        "POST", f"{base}/offboarding", {"numbers": {moved: transfer(subaccount)}}
    )
    assert (status, problem["type"]) == (422, "urn:callgate:problem:invalid-input")
    assert moved in problem["detail"]
    status, _ = await callgate.api("GET", f"{base}/offboarding")
    assert status == 404

    failed = await _offboard(
        callgate,
        alpha.workspace_id,
        {"grace_secs": 0, "numbers": {moved: transfer(STRANGER)}},
    )
    assert failed["status"] == "failed", failed
    assert failed["numbers"][released]["status"] == "done"
    assert failed["numbers"][moved]["status"] == "pending"
    status, problem = await callgate.api(
        "POST", f"{base}/offboarding", {"numbers": {moved: transfer(subaccount)}}
    )
    assert (status, problem["type"]) == (422, "urn:callgate:problem:invalid-input")

    # Released already: the certificate must not say it was transferred.
    status, problem = await callgate.api(
        "POST", f"{base}/offboarding", {"numbers": {released: transfer(client.sid)}}
    )
    assert (status, problem["type"]) == (409, "urn:callgate:problem:conflict")
    assert released in problem["detail"]
    # Pending, but gone from its account: Twilio did act, whatever was saved.
    callgate.twilio_rest.port_out(moved)
    status, problem = await callgate.api(
        "POST", f"{base}/offboarding", {"numbers": {moved: {"action": "release"}}}
    )
    assert (status, problem["type"]) == (409, "urn:callgate:problem:conflict")
    assert moved in problem["detail"]
    _, state = await callgate.api("GET", f"{base}/offboarding")
    assert state["status"] == "failed"
    assert state["numbers"] == failed["numbers"]

    # The same wishes again are no change, so the resume goes ahead.
    done = await _offboard(
        callgate,
        alpha.workspace_id,
        {"numbers": {released: {"action": "release"}, moved: transfer(STRANGER)}},
    )
    assert done["status"] == "done", done
    _, certificate = await callgate.api("GET", f"{base}/offboarding/certificate")
    assert certificate["numbers"] == {"release": 2, "transfer": 1}


async def test_a_release_cut_short_by_a_crash_is_recorded_as_released(
    callgate: Harness, store: redis.Redis
) -> None:
    """The intent saved before Twilio is asked tells our release from a port-out."""
    alpha = await callgate.tenant("alpha", NUMBER_A)
    _, workspace = await callgate.api("GET", f"/workspaces/{alpha.workspace_id}")
    subaccount = workspace["twilio_account_sid"]
    kept = await _buy(callgate, alpha.workspace_id, alpha.agent_id)
    keep = {"action": "keep", "until": "2027-01-31"}
    state = await _offboard(
        callgate, alpha.workspace_id, {"grace_secs": 0, "numbers": {kept: keep}}
    )
    assert state["status"] == "done", state

    # A process saved its intent, released the number and died before it
    # could record the release.
    raw = await store.hget(keyspace.OFFBOARDINGS, alpha.workspace_id)
    assert raw is not None
    stored = orjson.loads(raw)
    stored["numbers"][kept]["releasing"] = True
    await store.hset(keyspace.OFFBOARDINGS, alpha.workspace_id, orjson.dumps(stored))
    twilio = callgate.app[stream.TWILIO_API]
    number_sid = await twilio.find_number(subaccount, kept)
    assert number_sid is not None
    await twilio.release_number(subaccount, number_sid)

    offboarding = callgate.app[manage.OFFBOARDING]
    assert await offboarding.release_kept(_utc_ms("2027-02-01T00:00:00+00:00")) == []
    _, state = await callgate.api(
        "GET", f"/workspaces/{alpha.workspace_id}/offboarding"
    )
    assert state["numbers"][kept]["expired"] == "released"
    assert "releasing" not in state["numbers"][kept]
    assert callgate.twilio_rest.account_status(subaccount) == "closed"


async def test_the_watcher_serves_the_next_workspace_when_one_fails(
    callgate: Harness, store: redis.Redis
) -> None:
    """Twilio refusing one workspace's kept number stops neither the watcher
    nor the release of another workspace's number."""
    keep = {"action": "keep", "until": "2020-01-31"}  # long past
    # Alpha's kept number sits in an account these credentials cannot reach.
    alpha = await callgate.tenant("alpha", NUMBER_A)
    status, attached = await callgate.api(
        "POST",
        f"/workspaces/{alpha.workspace_id}/numbers",
        {
            "number": NUMBER_C,
            "agent_id": alpha.agent_id,
            "twilio_account_sid": STRANGER,
        },
    )
    assert status == 201, attached
    first = await _offboard(
        callgate, alpha.workspace_id, {"grace_secs": 0, "numbers": {NUMBER_C: keep}}
    )
    assert first["status"] == "done", first
    bravo = await callgate.tenant("bravo", NUMBER_B)
    _, workspace = await callgate.api("GET", f"/workspaces/{bravo.workspace_id}")
    subaccount = workspace["twilio_account_sid"]
    kept = await _buy(callgate, bravo.workspace_id, bravo.agent_id)
    second = await _offboard(
        callgate, bravo.workspace_id, {"grace_secs": 0, "numbers": {kept: keep}}
    )
    assert second["status"] == "done", second
    assert first["started_at"] < second["started_at"]  # alpha's turn comes first

    # A watcher started now looks for kept numbers at once.
    offboarding = callgate.app[manage.OFFBOARDING]
    await offboarding.close()
    offboarding.watch()
    bravo_state = await _state_where(
        store,
        bravo.workspace_id,
        lambda state: state.get("subaccount_closed") is not None,
        timeout_secs=10,
    )
    assert bravo_state["numbers"][kept]["expired"] == "released"
    assert callgate.twilio_rest.owner_of(kept) is None
    assert callgate.twilio_rest.account_status(subaccount) == "closed"
    assert offboarding.watching
    # Alpha's number waits for the next look, and its lease was given back.
    _, state = await callgate.api(
        "GET", f"/workspaces/{alpha.workspace_id}/offboarding"
    )
    assert "expired" not in state["numbers"][NUMBER_C]
    assert await store.hget(keyspace.OFFBOARDING_LEASES, alpha.workspace_id) is None
