"""Tests for workspace keys: roles, revocation, rotation, audit, storage."""

from __future__ import annotations

import redis.asyncio as redis

from tenancy.replies import text_map
from tests.harness import Harness

NUMBER = "+15005550001"


async def _key(callgate: Harness, workspace_id: str, role: str) -> dict[str, str]:
    status, key = await callgate.api(
        "POST", f"/workspaces/{workspace_id}/keys", {"role": role, "name": role}
    )
    assert status == 201, key
    result: dict[str, str] = key
    return result


async def test_viewer_reads_usage_and_calls_and_nothing_else(callgate: Harness) -> None:
    """A viewer key reads its usage and calls; every write or admin read is 403."""
    tenant = await callgate.tenant("alpha", NUMBER)
    viewer = (await _key(callgate, tenant.workspace_id, "viewer"))["token"]
    base = f"/workspaces/{tenant.workspace_id}"
    for path in (base, f"{base}/usage", f"{base}/calls"):
        status, _ = await callgate.api("GET", path, key=viewer)
        assert status == 200, path
    for method, path, body in (
        ("GET", f"{base}/agents", None),
        ("GET", f"{base}/keys", None),
        ("PATCH", base, {"name": "renamed"}),
        ("POST", f"{base}/keys", {"role": "admin", "name": "escalate"}),
        ("PUT", f"{base}/plan", {"included_minutes": 10}),
        ("POST", "/workspaces", {"name": "another"}),
    ):
        status, problem = await callgate.api(method, path, body, key=viewer)
        assert status == 403, (method, path)
        assert problem["type"] == "urn:callgate:problem:forbidden"
    status, listing = await callgate.api("GET", "/workspaces", key=viewer)
    assert [w["id"] for w in listing["items"]] == [tenant.workspace_id]


async def test_admin_key_manages_its_workspace_but_not_its_plan(
    callgate: Harness,
) -> None:
    """An admin key manages its workspace; plans and suspension are the operator's."""
    tenant = await callgate.tenant("alpha", NUMBER)
    admin = (await _key(callgate, tenant.workspace_id, "admin"))["token"]
    base = f"/workspaces/{tenant.workspace_id}"
    status, _ = await callgate.api("PATCH", base, {"recording": True}, key=admin)
    assert status == 200
    status, _ = await callgate.api(
        "PUT", f"{base}/plan", {"included_minutes": 9}, key=admin
    )
    assert status == 403
    status, _ = await callgate.api("POST", f"{base}/suspend", key=admin)
    assert status == 403


async def test_revoked_and_rotated_keys_stop_working(callgate: Harness) -> None:
    """Revoking a key makes it 401 at once; rotating swaps in a new token."""
    tenant = await callgate.tenant("alpha", NUMBER)
    base = f"/workspaces/{tenant.workspace_id}"
    first = await _key(callgate, tenant.workspace_id, "viewer")
    status, rotated = await callgate.api("POST", f"{base}/keys/{first['id']}/rotate")
    assert status == 201
    status, _ = await callgate.api("GET", base, key=first["token"])
    assert status == 401
    status, _ = await callgate.api("GET", base, key=rotated["token"])
    assert status == 200
    status, revoked = await callgate.api("DELETE", f"{base}/keys/{rotated['id']}")
    assert status == 200
    assert revoked["revoked_at"] is not None
    status, _ = await callgate.api("GET", base, key=rotated["token"])
    assert status == 401
    for forged in (rotated["token"][:-2] + "xx", "cgk.nope", "cgk.a.b.c.d"):
        status, _ = await callgate.api("GET", base, key=forged)
        assert status == 401


async def test_keys_are_stored_as_digests_and_never_listed(
    callgate: Harness, store: redis.Redis
) -> None:
    """A key's secret is in no store value and no listing; only its digest is."""
    tenant = await callgate.tenant("alpha", NUMBER)
    key = await _key(callgate, tenant.workspace_id, "admin")
    secret = key["token"].rsplit(".", 1)[1]
    status, listing = await callgate.api(
        "GET", f"/workspaces/{tenant.workspace_id}/keys"
    )
    assert status == 200
    assert secret not in str(listing)
    assert "token" not in listing["items"][0]
    async for name in store.scan_iter(count=1000):
        if await store.type(name) == "hash":
            assert secret not in str(text_map(await store.hgetall(name))), name


async def test_audit_log_attributes_every_change(callgate: Harness) -> None:
    """Changes are logged with who made them, newest first, without secrets."""
    tenant = await callgate.tenant("alpha", NUMBER)
    base = f"/workspaces/{tenant.workspace_id}"
    admin = await _key(callgate, tenant.workspace_id, "admin")
    status, _ = await callgate.api(
        "PATCH", base, {"recording": True}, key=admin["token"]
    )
    assert status == 200
    status, log = await callgate.api("GET", f"{base}/audit")
    assert status == 200
    actions = [(entry["actor"], entry["action"]) for entry in log["items"]]
    assert (f"key:{admin['id']}", "workspace.update") in actions
    assert ("operator", "key.create") in actions
    assert ("operator", "agent.create") in actions
    assert ("operator", "number.attach") in actions
    assert tenant.api_key not in str(log)
    assert admin["token"] not in str(log)


async def test_every_use_of_a_key_is_in_its_workspaces_log(callgate: Harness) -> None:
    """Reads and refusals by a key are logged in its own workspace, ids left out."""
    alpha = await callgate.tenant("alpha", NUMBER)
    bravo = await callgate.tenant("bravo", "+15005550002")
    viewer = await _key(callgate, bravo.workspace_id, "viewer")
    await callgate.api(
        "GET", f"/workspaces/{bravo.workspace_id}/usage", key=viewer["token"]
    )
    await callgate.api(
        "GET", f"/workspaces/{alpha.workspace_id}/calls", key=viewer["token"]
    )
    status, log = await callgate.api("GET", f"/workspaces/{bravo.workspace_id}/audit")
    assert status == 200
    uses = [
        (entry["target"], entry["detail"])
        for entry in log["items"]
        if entry["actor"] == f"key:{viewer['id']}"
    ]
    assert ("GET /api/v1/workspaces/{workspace_id}/usage", "200") in uses
    assert ("GET /api/v1/workspaces/{workspace_id}/calls", "404") in uses
    _, theirs = await callgate.api("GET", f"/workspaces/{alpha.workspace_id}/audit")
    assert all(entry["actor"] != f"key:{viewer['id']}" for entry in theirs["items"])
