"""Tests for the operator API: authentication, validation and problem documents."""

from __future__ import annotations

import pytest
import redis.asyncio as redis

from tenancy import keyspace
from tenancy.replies import text_map
from tests.harness import Harness

PROBLEM = "urn:callgate:problem:"


@pytest.mark.parametrize("key", ["", "wrong-key-" + "x" * 30])
async def test_api_refuses_missing_or_wrong_keys(callgate: Harness, key: str) -> None:
    """Without the operator key every API call gets a 401 problem."""
    status, body = await callgate.api("GET", "/workspaces", key=key)
    assert status == 401
    assert body["type"] == PROBLEM + "unauthorized"
    status, body = await callgate.api("POST", "/workspaces", {"name": "x"}, key=key)
    assert status == 401
    status, listing = await callgate.api("GET", "/workspaces")
    assert (status, listing["items"]) == (200, [])


async def test_api_answers_unknown_resources_with_404(callgate: Harness) -> None:
    """Unknown or malformed ids, and unknown paths, are 404 problems."""
    for path in (
        "/workspaces/" + keyspace.new_id("ws"),
        "/workspaces/not-an-id",
        "/workspaces/" + keyspace.new_id("ws") + "/usage",
        "/nothing-here",
    ):
        status, body = await callgate.api("GET", path)
        assert status == 404, path
        assert body["type"].startswith(PROBLEM)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"number": "555-1234", "agent_id": "ag_aaaaaaaaaaaaaaaa"}, "number"),
        ({"number": "+15005550001", "agent_id": "nope"}, "agent_id"),
        ({"number": "+15005550001"}, "agent_id"),
        ({"number": "+15005550001", "agent_id": "ag_a", "extra": 1}, "agent_id"),
    ],
)
async def test_api_names_the_invalid_field(
    callgate: Harness, body: dict[str, object], field: str
) -> None:
    """Invalid input is a 422 problem that names the field."""
    tenant = await callgate.tenant("alpha", "+15005550009")
    status, problem = await callgate.api(
        "POST", f"/workspaces/{tenant.workspace_id}/numbers", body
    )
    assert status == 422
    assert problem["type"] == PROBLEM + "invalid-input"
    assert problem["field"] == field


async def test_api_refuses_bodies_that_are_not_json(callgate: Harness) -> None:
    """A body that is not JSON is a 422 problem, not a crash."""
    async with callgate.http.post(
        f"{callgate.base_url}/api/v1/workspaces",
        data=b"{not json",
        headers={"Authorization": "Bearer " + callgate.settings.operator_key},
    ) as response:
        assert response.status == 422
        assert response.content_type == "application/problem+json"


async def test_number_belongs_to_one_workspace(callgate: Harness) -> None:
    """A number another workspace owns cannot be attached: 409, nothing changes."""
    alpha = await callgate.tenant("alpha", "+15005550001")
    bravo = await callgate.tenant("bravo", "+15005550002")
    status, problem = await callgate.api(
        "POST",
        f"/workspaces/{bravo.workspace_id}/numbers",
        {"number": alpha.number, "agent_id": bravo.agent_id},
    )
    assert (status, problem["type"]) == (409, PROBLEM + "number-owned")
    status, numbers = await callgate.api(
        "GET", f"/workspaces/{bravo.workspace_id}/numbers"
    )
    assert [n["number"] for n in numbers["items"]] == [bravo.number]
    status, numbers = await callgate.api(
        "GET", f"/workspaces/{alpha.workspace_id}/numbers"
    )
    assert [n["number"] for n in numbers["items"]] == [alpha.number]


async def test_agent_of_another_workspace_cannot_be_routed_to(
    callgate: Harness,
) -> None:
    """Attaching a number to another workspace's agent is a 404."""
    alpha = await callgate.tenant("alpha", "+15005550001")
    bravo = await callgate.tenant("bravo", "+15005550002")
    status, _ = await callgate.api(
        "POST",
        f"/workspaces/{bravo.workspace_id}/numbers",
        {"number": "+15005550003", "agent_id": alpha.agent_id},
    )
    assert status == 404


async def test_provider_keys_are_never_returned_or_stored_in_clear(
    callgate: Harness, store: redis.Redis
) -> None:
    """The agent's API key is write-only and only its sealed form is stored."""
    tenant = await callgate.tenant("alpha", "+15005550001")
    status, agents = await callgate.api(
        "GET", f"/workspaces/{tenant.workspace_id}/agents"
    )
    assert status == 200
    assert "api_key" not in agents["items"][0]
    assert tenant.api_key not in str(agents)
    async for key in store.scan_iter(count=1000):
        kind = await store.type(key)
        if kind == "hash":
            values = " ".join(text_map(await store.hgetall(key)).values())
        elif kind == "string":
            values = str(await store.get(key))
        else:
            continue
        assert tenant.api_key not in values, key


async def test_calls_are_paged_and_filtered_by_time_and_caller(
    callgate: Harness,
) -> None:
    """Calls come a page at a time, newest first, and filter by caller and time."""
    tenant = await callgate.tenant("alpha", "+15005550001")
    sids = []
    for index in range(5):
        caller = "+14155550001" if index % 2 == 0 else "+14155550002"
        call = await callgate.place("+15005550001", caller)
        sids.append(call.sid)
    base = f"/workspaces/{tenant.workspace_id}/calls"
    status, first = await callgate.api("GET", f"{base}?limit=2")
    assert [c["call_sid"] for c in first["items"]] == sids[::-1][:2]
    status, second = await callgate.api(
        "GET", f"{base}?limit=2&cursor={first['next_cursor']}"
    )
    assert [c["call_sid"] for c in second["items"]] == sids[::-1][2:4]
    status, last = await callgate.api(
        "GET", f"{base}?limit=2&cursor={second['next_cursor']}"
    )
    assert [c["call_sid"] for c in last["items"]] == sids[:1]
    assert last["next_cursor"] is None
    status, theirs = await callgate.api("GET", f"{base}?caller=%2B14155550002")
    assert [c["call_sid"] for c in theirs["items"]] == [sids[3], sids[1]]
    status, later = await callgate.api("GET", f"{base}?since=2999-01-01T00:00:00Z")
    assert later["items"] == []
    for bad, field in (
        ("until=yesterday", "until"),
        ("caller=555", "caller"),
        ("cursor=12345", "cursor"),
        (f"cursor=1_{sids[0]}x", "cursor"),
    ):
        status, problem = await callgate.api("GET", f"{base}?{bad}")
        assert (status, problem["field"]) == (422, field)
