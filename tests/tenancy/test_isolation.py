"""Isolation, proven: no key of workspace B reaches anything of workspace A."""

from __future__ import annotations

import redis.asyncio as redis

from tenancy import keyspace
from tenancy.access import ENDPOINTS
from tests.harness import Harness

NUMBER_A = "+15005550001"
NUMBER_B = "+15005550002"
CALLER = "+14155551212"


async def _snapshot(store: redis.Redis, workspace_id: str) -> dict[str, bytes]:
    """Every key of the workspace with its serialised value."""
    dumps: dict[str, bytes] = {}
    async for name in store.scan_iter(match=keyspace.workspace_pattern(workspace_id)):
        value = await store.dump(name)
        assert value is not None
        dumps[name] = value
    return dumps


async def test_every_endpoint_hides_workspace_a_from_workspace_b(
    callgate: Harness, store: redis.Redis
) -> None:
    """B's admin and viewer keys get 404 on every A endpoint and change nothing."""
    alpha = await callgate.tenant("alpha", NUMBER_A)
    bravo = await callgate.tenant("bravo", NUMBER_B)
    call, _ = await callgate.connected_call(NUMBER_A, CALLER)
    await call.hang_up()
    await callgate.calls_settled()
    status, a_key = await callgate.api(
        "POST",
        f"/workspaces/{alpha.workspace_id}/keys",
        {"role": "viewer", "name": "a"},
    )
    assert status == 201
    tokens = {}
    for role in ("admin", "viewer"):
        status, key = await callgate.api(
            "POST",
            f"/workspaces/{bravo.workspace_id}/keys",
            {"role": role, "name": role},
        )
        assert status == 201
        tokens[role] = key["token"]
    values = {
        "workspace_id": alpha.workspace_id,
        "agent_id": alpha.agent_id,
        "number": NUMBER_A,
        "call_sid": call.sid,
        "key_id": a_key["id"],
    }
    before = await _snapshot(store, alpha.workspace_id)
    checked = 0
    for declared in ENDPOINTS:
        if "{workspace_id}" not in declared.path:
            continue
        path = declared.path.removeprefix("/api/v1").format(**values)
        for role, token in tokens.items():
            status, problem = await callgate.api(declared.method, path, {}, key=token)
            assert status == 404, (role, declared.method, path, status)
            assert problem["type"] == "urn:callgate:problem:not-found"
            checked += 1
    assert checked >= 2 * 20  # every workspace endpoint, with both roles
    assert await _snapshot(store, alpha.workspace_id) == before

    # A's number stays A's: B can neither attach it nor see it.
    status, _ = await callgate.api(
        "POST",
        f"/workspaces/{bravo.workspace_id}/numbers",
        {"number": NUMBER_A, "agent_id": bravo.agent_id},
        key=tokens["admin"],
    )
    assert status == 409
    status, listing = await callgate.api("GET", "/workspaces", key=tokens["admin"])
    assert [w["id"] for w in listing["items"]] == [bravo.workspace_id]
    assert await _snapshot(store, alpha.workspace_id) == before


async def test_moving_a_number_is_an_explicit_logged_operator_act(
    callgate: Harness,
) -> None:
    """Only the operator moves a number between workspaces; both logs say so."""
    alpha = await callgate.tenant("alpha", NUMBER_A)
    bravo = await callgate.tenant("bravo", NUMBER_B)
    move = {"workspace_id": bravo.workspace_id, "agent_id": bravo.agent_id}
    path = f"/workspaces/{alpha.workspace_id}/numbers/{NUMBER_A}/move"
    status, key = await callgate.api(
        "POST", f"/workspaces/{alpha.workspace_id}/keys", {"role": "admin", "name": "a"}
    )
    status, _ = await callgate.api("POST", path, move, key=key["token"])
    assert status == 403
    status, moved = await callgate.api("POST", path, move)
    assert (status, moved["workspace_id"]) == (200, bravo.workspace_id)
    call = await callgate.place(NUMBER_A, CALLER)
    assert call.stream_parameters["workspace"] == bravo.workspace_id
    for workspace_id, action in (
        (alpha.workspace_id, "number.move_out"),
        (bravo.workspace_id, "number.move_in"),
    ):
        status, log = await callgate.api("GET", f"/workspaces/{workspace_id}/audit")
        changes = [e for e in log["items"] if e["action"] != "api.request"]
        assert changes[0]["action"] == action
        assert changes[0]["target"] == NUMBER_A
