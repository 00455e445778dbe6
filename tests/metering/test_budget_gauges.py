"""Budget gauges come from the store, so two processes export the same values."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as redis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from metering.budget_gauges import BudgetGauges
from metering.ledger import Ledger
from metering.metrics import Metrics
from metering.plans import Plan
from metering.quota import Quota
from tenancy import keyspace
from tenancy.vault import Vault
from tenancy.workspaces import Workspaces
from tests.harness import SECRET_KEY, Harness, callgate_process
from tests.peers.audio import split_frames, tone_mulaw

NUMBER = "+15005550001"
CALLER = "+14155550123"


def _budget(text: str, workspace_id: str) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("workspace") != workspace_id:
                continue
            if sample.name.startswith("callgate_budget_"):
                values[sample.name] = sample.value
            elif sample.name.startswith("callgate_period_"):
                values[f"{sample.name} {sample.labels['currency']}"] = sample.value
    return values


async def test_two_processes_export_the_budget_the_store_holds(
    callgate: Harness, valkey_url: str, tmp_path: Path
) -> None:
    """After a call on one process, both scrape the same time and money."""
    alpha = await callgate.tenant("alpha", NUMBER)
    status, _ = await callgate.api(
        "PUT",
        f"/workspaces/{alpha.workspace_id}/plan",
        {
            "included_minutes": 2,
            "overage": "minutes",
            "overage_limit": 1,
            "base_fee_micros": 5_000_000,
            "currency": "EUR",
        },
    )
    assert status == 200
    call, _ = await callgate.connected_call(NUMBER, CALLER)
    tone = tone_mulaw(440, duration_ms=400)
    await call.send_audio(split_frames(tone))
    await call.wait_for_audio(len(tone), timeout_secs=5)
    await call.hang_up()
    await callgate.calls_settled()
    _, usage = await callgate.api("GET", f"/workspaces/{alpha.workspace_id}/usage")
    bill = usage["statement"]
    used_secs = bill["billed_ms"] / 1000
    assert used_secs > 0
    assert bill["cost_micros"] > 0

    async with callgate_process(
        tmp_path / "other", CALLGATE_REDIS_URL=valkey_url
    ) as other:
        scraped = []
        for base_url, http in (
            (callgate.base_url, callgate.http),
            (other.base_url, other.http),
        ):
            async with http.get(f"{base_url}/metrics") as response:
                assert response.status == 200
                text = await response.text()
            scraped.append(_budget(text, alpha.workspace_id))
    assert scraped[0] == scraped[1]
    assert scraped[0] == {
        "callgate_budget_included_seconds": 120.0,
        "callgate_budget_allowance_seconds": 180.0,
        "callgate_budget_used_seconds": used_secs,
        "callgate_budget_remaining_seconds": 180.0 - used_secs,
        # One call at a time: the 60 s emergency grant (longer than the tick
        # and the lease), 1 s to hang up and a one-second billing increment.
        "callgate_budget_overrun_bound_seconds": 62.0,
        "callgate_period_price EUR": 5.0,
        "callgate_period_cost EUR": bill["cost_micros"] / 1e6,
        "callgate_period_margin EUR": bill["margin_micros"] / 1e6,
    }
    assert bill["price_micros"] == 5_000_000


async def test_gauges_drop_the_series_of_a_changed_currency_and_a_deleted_workspace(
    store: redis.Redis,
) -> None:
    """A re-read keeps no series for a currency or a workspace that is gone."""
    registry = CollectorRegistry()
    workspaces = Workspaces(store, Vault(SECRET_KEY))
    gauges = BudgetGauges(
        Metrics(registry),
        workspaces,
        Quota(store),
        Ledger(store),
        tick_ms=1_000,
        lease_ms=10_000,
        max_age_secs=0,
    )
    alpha = await workspaces.create("alpha")
    bravo = await workspaces.create("bravo")
    fee = 2_000_000
    await workspaces.set_plan(alpha.id, Plan(base_fee_micros=fee, currency="EUR"))
    await workspaces.set_plan(bravo.id, Plan(included_minutes=5))
    await gauges.refresh()
    price = "callgate_period_price"
    assert registry.get_sample_value(price, {"workspace": alpha.id, "currency": "EUR"})
    used = {"workspace": bravo.id}
    assert registry.get_sample_value("callgate_budget_used_seconds", used) == 0

    await workspaces.set_plan(alpha.id, Plan(base_fee_micros=fee, currency="USD"))
    # What offboarding's last step leaves: no index entry, no keys.
    await store.zrem(keyspace.WORKSPACES, bravo.id)
    async for key in store.scan_iter(match=keyspace.workspace_pattern(bravo.id)):
        await store.delete(key)
    await gauges.refresh()

    assert (
        registry.get_sample_value(price, {"workspace": alpha.id, "currency": "EUR"})
        is None
    )
    assert (
        registry.get_sample_value(price, {"workspace": alpha.id, "currency": "USD"})
        == 2.0
    )
    assert registry.get_sample_value("callgate_budget_used_seconds", used) is None
    assert (
        registry.get_sample_value("callgate_budget_overrun_bound_seconds", used) is None
    )
