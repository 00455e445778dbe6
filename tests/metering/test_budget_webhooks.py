"""Budget webhooks: signed events, once each, in order, through a failing receiver."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from standardwebhooks.webhooks import Webhook as ReferenceWebhook

from metering.budget_events import BudgetEvent
from metering.delivery import backoff_secs, signature
from metering.plans import day_of, period_of
from metering.quota import Report
from tenancy import api, keyspace
from tenancy.errors import InvalidInputError
from tenancy.hooks import check_url
from tenancy.vault import Vault
from tenancy.workspaces import now_ms
from tests.harness import Harness, Tenant, callgate_process, running_callgate
from tests.peers.audio import split_frames, tone_mulaw
from tests.peers.budget_hooks import BudgetHookReceiver

NUMBER_A = "+15005550001"
NUMBER_B = "+15005550002"
CALLER = "+14155550123"
RETRY_MS = 300


def _plan(allowance_ms: int) -> dict[str, Any]:
    # Money overage at 60 000 micro-units a minute buys one ms per micro-unit.
    return {
        "included_minutes": 0,
        "overage": "money",
        "overage_limit": allowance_ms,
        "overage_price_micros_per_minute": 60_000,
        "max_concurrent_calls": 2,
    }


@pytest.fixture
async def receiver() -> AsyncIterator[BudgetHookReceiver]:
    """A webhook receiver on a loopback port."""
    hooks = BudgetHookReceiver()
    await hooks.start()
    try:
        yield hooks
    finally:
        await hooks.close()


@pytest.fixture
async def fast_callgate(
    store: redis.Redis, valkey_url: str, tmp_path: Path
) -> AsyncIterator[Harness]:
    """Callgate with 1 s grants, a 200 ms tick and quick webhook retries."""
    async with running_callgate(
        valkey_url,
        tmp_path,
        CALLGATE_GRANT_MS="1000",
        CALLGATE_FLUSH_INTERVAL_MS="200",
        CALLGATE_LEASE_MS="2000",
        CALLGATE_WEBHOOK_RETRY_MS=str(RETRY_MS),
    ) as harness:
        yield harness


async def _talk(callgate: Harness, number: str, duration_ms: int) -> None:
    """A call that talks for ``duration_ms`` unless the budget ends it first."""
    call, _ = await callgate.connected_call(number, CALLER)
    await call.send_audio(split_frames(tone_mulaw(440, duration_ms)))
    if not call.closed_by_server.is_set():
        await call.hang_up()


async def _register(
    callgate: Harness, receiver: BudgetHookReceiver, path: str, endpoint: str
) -> None:
    status, hook = await callgate.api("PUT", path, {"url": receiver.url(endpoint)})
    assert status == 200, hook
    assert hook["secret"].startswith("whsec_")
    receiver.secrets[endpoint] = hook["secret"]
    # The secret is shown once: reading or replacing the URL never shows it.
    status, again = await callgate.api("GET", path)
    assert (status, again["secret"]) == (200, None)
    status, again = await callgate.api("PUT", path, {"url": receiver.url(endpoint)})
    assert (status, again["secret"]) == (200, None)


async def test_events_arrive_signed_once_in_order_through_a_failing_receiver(
    fast_callgate: Harness,
    receiver: BudgetHookReceiver,
    valkey_url: str,
    tmp_path: Path,
) -> None:
    """Alpha crosses 50/80/100% and is cut off; bravo crosses 50%.

    Alpha's own webhook fails twice before it accepts anything; the operator's
    webhook gets every workspace's events. A second process shares the store,
    so two dispatchers compete for every delivery.
    """
    callgate = fast_callgate
    alpha = await callgate.tenant("alpha", NUMBER_A)
    bravo = await callgate.tenant("bravo", NUMBER_B)
    for tenant, allowance_ms in ((alpha, 3_000), (bravo, 4_000)):
        status, body = await callgate.api(
            "PUT", f"/workspaces/{tenant.workspace_id}/plan", _plan(allowance_ms)
        )
        assert status == 200, body
    await _register(
        callgate, receiver, f"/workspaces/{alpha.workspace_id}/webhook", "alpha"
    )
    await _register(callgate, receiver, "/webhook", "operator")
    receiver.failures["alpha"] = 2

    async with callgate_process(
        tmp_path / "other",
        CALLGATE_REDIS_URL=valkey_url,
        CALLGATE_WEBHOOK_RETRY_MS=str(RETRY_MS),
    ):
        # Alpha talks past its 3 s and is cut off; bravo uses 3 s of its 4 s.
        await asyncio.gather(
            _talk(callgate, NUMBER_A, 6_000), _talk(callgate, NUMBER_B, 2_400)
        )
        await callgate.calls_settled()
        refused = await callgate.place(NUMBER_A, CALLER)
        assert refused.first_verb == "Say"

        alpha_seen = await receiver.wait_accepted("alpha", 4)
        operator_seen = await receiver.wait_accepted("operator", 5)

    # Each event once per period: the refused call added no second cut-off.
    # The workspace's own viewer key may read its events.
    status, viewer = await callgate.api(
        "POST",
        f"/workspaces/{alpha.workspace_id}/keys",
        {"role": "viewer", "name": "client"},
    )
    assert status == 201
    status, listing = await callgate.api(
        "GET",
        f"/workspaces/{alpha.workspace_id}/budget-events",
        key=viewer["token"],
    )
    assert status == 200, listing
    events = listing["items"]
    kinds = [(e["type"], e["data"].get("threshold_percent")) for e in events]
    assert kinds == [
        ("budget.threshold_reached", 50),
        ("budget.threshold_reached", 80),
        ("budget.threshold_reached", 100),
        ("budget.cut_off", None),
    ]
    assert events[-1]["data"]["reason"] == "call_ended"
    assert all(e["data"]["allowance_ms"] == 3_000 for e in events)
    for event in events[:3]:
        percent = event["data"]["threshold_percent"]
        assert event["data"]["used_ms"] * 100 >= 3_000 * percent
    assert all(e["delivered_to"] == ["workspace", "operator"] for e in events)

    # In order, once each, every request signed (checked by the reference
    # library), and the same bytes and id on every retry.
    ids = [e["id"] for e in events]
    assert [r.webhook_id for r in alpha_seen] == ids
    assert [r.event for r in alpha_seen] == [
        {k: v for k, v in e.items() if k != "delivered_to"} for e in events
    ]
    alpha_requests = [r for r in receiver.requests if r.endpoint == "alpha"]
    assert [r.answered for r in alpha_requests] == [500, 500, 204, 204, 204, 204]
    first_three = alpha_requests[:3]
    assert {r.webhook_id for r in first_three} == {ids[0]}
    assert len({r.body for r in first_three}) == 1
    # Backed off: about RETRY_MS, then twice that (less up to a quarter).
    gaps = [b.at - a.at for a, b in itertools.pairwise(first_three)]
    assert gaps[0] >= 0.75 * RETRY_MS / 1000
    assert gaps[1] >= 0.75 * 2 * RETRY_MS / 1000
    assert all(r.verified for r in receiver.requests)

    # The operator's webhook has alpha's four in order and bravo's one; alpha's
    # own webhook never hears of bravo.
    operator_ids = [r.webhook_id for r in operator_seen]
    assert len(set(operator_ids)) == len(operator_ids) == 5
    assert [i for i in operator_ids if alpha.workspace_id in i] == ids
    bravo_events = [
        r.event for r in operator_seen if bravo.workspace_id in r.webhook_id
    ]
    assert [(e["type"], e["data"]["threshold_percent"]) for e in bravo_events] == [
        ("budget.threshold_reached", 50)
    ]
    assert all(bravo.workspace_id.encode() not in r.body for r in alpha_requests)

    status, hook = await callgate.api(
        "GET", f"/workspaces/{alpha.workspace_id}/webhook"
    )
    assert status == 200
    assert hook["delivery"] == {
        "delivered": 4,
        "pending": 0,
        "attempts": 0,
        "last_status": 204,
        "last_error": None,
        "next_attempt_at": None,
        "last_delivered_at": hook["delivery"]["last_delivered_at"],
    }


async def _spend(callgate: Harness, tenant: Tenant, index: int, used_ms: int) -> None:
    """A call using ``used_ms`` of a 10 s budget, admitted and settled by the
    quota engine as the meter does it (its events announced to the dispatcher)."""
    ledger, quota = callgate.app[api.LEDGER], callgate.app[api.QUOTA]
    call_sid = f"CA{index:032x}"
    at_ms = now_ms()
    period = period_of(at_ms, "UTC").label
    await ledger.open_call(
        tenant.workspace_id,
        call_sid,
        agent_id=tenant.agent_id,
        from_number=CALLER,
        to_number=tenant.number,
        arrived_at_ms=at_ms,
    )
    admission = await quota.admit(
        tenant.workspace_id,
        call_sid,
        period=period,
        limit_ms=10_000,
        max_concurrent=5,
        grant_ms=used_ms,
        min_grant_ms=1_000,
        lease_ms=10_000,
        account_sid="AC" + "0" * 32,
        now_ms=at_ms,
    )
    assert admission.admitted
    await quota.report(
        Report(
            workspace_id=tenant.workspace_id,
            call_sid=call_sid,
            period=period,
            day=day_of(at_ms, "UTC"),
            seq=1,
            used_ms=used_ms,
            want_ms=0,
            now_ms=at_ms,
            lease_ms=10_000,
            limit_ms=10_000,
            agent_id=tenant.agent_id,
            number=tenant.number,
            end_reason="completed",
        )
    )


async def test_a_webhook_in_backoff_holds_back_no_other_and_mends_at_once(
    store: redis.Redis, valkey_url: str, tmp_path: Path, receiver: BudgetHookReceiver
) -> None:
    """Alpha's own webhook fails and backs off for 15 s or more.

    The operator's webhook, slow to answer, still gets the 80% event that was
    recorded while it was receiving the 50% one; and once the operator points
    alpha's webhook at a working URL, both events reach it at once, in order.
    """
    async with running_callgate(
        valkey_url, tmp_path, CALLGATE_WEBHOOK_RETRY_MS="20000"
    ) as callgate:
        alpha = await callgate.tenant("alpha", NUMBER_A)
        path = f"/workspaces/{alpha.workspace_id}/webhook"
        await _register(callgate, receiver, path, "alpha")
        await _register(callgate, receiver, "/webhook", "operator")
        receiver.failures["alpha"] = 1_000
        receiver.delays["operator"] = 1.0

        await _spend(callgate, alpha, 1, 5_000)  # 50%
        await receiver.changes.wait_until(
            lambda: "operator" in receiver.arrivals,
            "the operator's first delivery",
            10.0,
        )
        # The operator's webhook is taking the 50% event now, alpha's failed.
        await _spend(callgate, alpha, 2, 3_000)  # 80%
        seen = await receiver.wait_accepted("operator", 2, timeout_secs=5.0)
        assert [r.event["data"]["threshold_percent"] for r in seen] == [50, 80]
        assert [r.answered for r in receiver.requests if r.endpoint == "alpha"] == [500]

        status, hook = await callgate.api("GET", path)
        assert (status, hook["delivery"]["pending"]) == (200, 2)
        receiver.secrets["mended"] = receiver.secrets["alpha"]
        status, _ = await callgate.api("PUT", path, {"url": receiver.url("mended")})
        assert status == 200
        mended = await receiver.wait_accepted("mended", 2, timeout_secs=5.0)
        assert [r.webhook_id for r in mended] == [r.webhook_id for r in seen]


async def test_a_secret_that_does_not_open_holds_back_only_its_own_webhook(
    callgate: Harness, receiver: BudgetHookReceiver, store: redis.Redis
) -> None:
    """Bravo's event arrives; alpha's waits, readable, until its secret is rotated.

    The operator's webhook gets both workspaces' events all the while.
    """
    alpha = await callgate.tenant("alpha", NUMBER_A)
    bravo = await callgate.tenant("bravo", NUMBER_B)
    for tenant, endpoint in ((alpha, "alpha"), (bravo, "bravo")):
        path = f"/workspaces/{tenant.workspace_id}/webhook"
        await _register(callgate, receiver, path, endpoint)
    await _register(callgate, receiver, "/webhook", "operator")
    # As if CALLGATE_SECRET_KEY had changed since alpha's secret was sealed.
    stranger = Vault("another-" + "k" * 32)
    await store.hset(
        keyspace.webhook(alpha.workspace_id),
        "secret",
        stranger.seal("whsec_AAAA", f"webhook:{alpha.workspace_id}"),
    )
    # A call refused by a spent budget records each period's cut-off.
    quota = callgate.app[api.QUOTA]
    period = period_of(now_ms(), "UTC").label
    for tenant in (alpha, bravo):
        admission = await quota.admit(
            tenant.workspace_id,
            "CA" + "0" * 32,
            period=period,
            limit_ms=0,
            max_concurrent=1,
            grant_ms=1_000,
            min_grant_ms=1_000,
            lease_ms=1_000,
            account_sid="AC" + "0" * 32,
            now_ms=now_ms(),
        )
        assert admission.refused == "budget"

    [bravo_event] = await receiver.wait_accepted("bravo", 1)
    assert bravo_event.event["data"]["workspace_id"] == bravo.workspace_id
    operator_seen = await receiver.wait_accepted("operator", 2)
    assert {r.event["data"]["workspace_id"] for r in operator_seen} == {
        alpha.workspace_id,
        bravo.workspace_id,
    }
    path = f"/workspaces/{alpha.workspace_id}/webhook"
    status, hook = await callgate.api("GET", path)
    assert status == 200, hook
    assert hook["delivery"]["pending"] == 1
    status, mended = await callgate.api(
        "PUT", path, {"url": receiver.url("alpha"), "rotate_secret": True}
    )
    assert status == 200, mended
    receiver.secrets["alpha"] = mended["secret"]
    [alpha_event] = await receiver.wait_accepted("alpha", 1)
    assert alpha_event.event["type"] == "budget.cut_off"
    assert alpha_event.event["data"]["workspace_id"] == alpha.workspace_id


async def test_registration_is_the_operators_and_checks_the_url(
    callgate: Harness,
) -> None:
    """A workspace key cannot register a webhook; a bad URL is a 422 naming it."""
    alpha = await callgate.tenant("alpha", NUMBER_A)
    path = f"/workspaces/{alpha.workspace_id}/webhook"
    body = {"url": "https://hooks.example.com/budget"}
    status, admin = await callgate.api(
        "POST",
        f"/workspaces/{alpha.workspace_id}/keys",
        {"role": "admin", "name": "client"},
    )
    assert status == 201
    status, problem = await callgate.api("PUT", path, body, key=admin["token"])
    assert (status, problem["type"]) == (403, "urn:callgate:problem:forbidden")
    for url in ("ftp://hooks.example.com/x", "/relative", "https://", "http://h/#x"):
        status, problem = await callgate.api("PUT", path, {"url": url})
        assert (status, problem["field"]) == (422, "url"), url
    status, _ = await callgate.api("GET", path)
    assert status == 404
    status, _ = await callgate.api("PUT", path, body)
    assert status == 200
    status, rotated = await callgate.api("PUT", path, {**body, "rotate_secret": True})
    assert status == 200
    assert rotated["secret"].startswith("whsec_")
    status, _ = await callgate.api("DELETE", path)
    assert status == 204
    status, _ = await callgate.api("DELETE", path)
    assert status == 404


def test_signature_is_what_the_reference_library_computes() -> None:
    """Our signing and the Standard Webhooks reference agree byte for byte."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    event = BudgetEvent(
        stream_id="1-0",
        workspace_id="ws_aaaaaaaaaaaaaaaa",
        kind="80",
        period="2026-12",
        used_ms=2_400,
        allowance_ms=3_000,
        at_ms=1_796_300_000_000,
    )
    body = event.body()
    timestamp = 1_796_300_000
    ours = signature(secret, event.id, timestamp, body)
    reference = ReferenceWebhook(secret).sign(
        event.id, datetime.fromtimestamp(timestamp, UTC), body
    )
    assert ours == reference


def test_backoff_doubles_up_to_its_cap() -> None:
    """Each failure waits twice as long as the one before, jittered, capped."""
    for attempts, full in ((1, 5.0), (2, 10.0), (3, 20.0), (12, 3600.0), (99, 3600.0)):
        delay = backoff_secs(attempts, 5.0, 3600.0)
        assert 0.75 * full <= delay <= full


def test_webhook_urls_are_absolute_http() -> None:
    """Only absolute http(s) URLs with a host and no fragment are accepted."""
    assert (
        check_url("https://hooks.example.com/a?b=c")
        == "https://hooks.example.com/a?b=c"
    )
    assert check_url("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080/x"
    assert check_url("https://bücher.example/h") == "https://bücher.example/h"
    for bad in (
        "mailto:x@example.com",
        "https:///path",
        "x" * 2001,
        # Hosts no connection can be made to, which aiohttp fails to encode.
        "https://hooks..example.com/x",
        "https://.:1/",
        "https://exa mple.com/",
        "https://-hooks.example.com/",
    ):
        with pytest.raises(InvalidInputError):
            check_url(bad)
