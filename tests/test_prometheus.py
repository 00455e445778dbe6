"""A real Prometheus scrapes two Callgate processes; panels answer, alerts page.

Prometheus and Alertmanager are the Debian packages' servers (``make test``
installs them). Two ``callgate serve`` processes share one store; calls run in
two workspaces, one on each process, and one call is refused for concurrency.
Then every PromQL expression of every dashboard panel goes through
Prometheus's HTTP API: each must return data, and the per-client minutes must
equal what the API reports as each workspace's billed usage. Prometheus also
evaluates ``dashboards/alerts.yml``: the workspace that spent its budget pages
through Alertmanager, and the other stays silent.

Prometheus has no way to announce a scrape or an evaluation, so the waits on
it poll its API (and the operator API) against a deadline; the wait for a page
is on the receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.harness import CallgateProcess, callgate_process, running_peers
from tests.monitoring import running_alertmanager, running_prometheus, until
from tests.peers.audio import split_frames, tone_mulaw
from tests.peers.pager import Pager

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
NUMBER_A = "+15005550001"
NUMBER_B = "+15005550002"
CALLER = "+14155550123"
# What alpha's one call, billed as a whole minute on a one-minute plan, sets off.
ALPHA_ALERTS = {"CallgateBudget100Percent", "CallgateBudgetExhausted"}


async def _talk(callgate: CallgateProcess, number: str) -> None:
    call = await callgate.twilio.place_call(number, CALLER)
    callgate.twilio_rest.register_call(call)
    await call.open_stream()
    tone = tone_mulaw(440, duration_ms=1500)
    await call.send_audio(split_frames(tone))
    await call.wait_for_audio(len(tone), timeout_secs=10)
    await call.hang_up()


def _panel_queries() -> list[str]:
    queries = []
    for path in sorted((DASHBOARDS / "grafana").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                queries.append(target["expr"])
    return queries


# ``store`` empties the shared store first and audits it afterwards.
@pytest.mark.usefixtures("store")
async def test_every_dashboard_query_answers_from_a_real_prometheus(
    valkey_url: str, tmp_path: Path
) -> None:
    """Two processes, two workspaces: panels have data, minutes match, alerts page."""
    env = {"CALLGATE_REDIS_URL": valkey_url, "CALLGATE_FLUSH_INTERVAL_MS": "200"}
    async with contextlib.AsyncExitStack() as stack:
        peers = await stack.enter_async_context(running_peers())
        first = await stack.enter_async_context(
            callgate_process(tmp_path / "p1", peers, **env)
        )
        second = await stack.enter_async_context(
            callgate_process(tmp_path / "p2", peers, **env)
        )
        targets = [
            url.removeprefix("http://") for url in (first.base_url, second.base_url)
        ]
        http = await stack.enter_async_context(aiohttp.ClientSession())
        pager = Pager()
        await pager.start()
        stack.push_async_callback(pager.close)
        alertmanager = await stack.enter_async_context(
            running_alertmanager(
                http,
                tmp_path / "alertmanager",
                pager.url,
                # The inhibitions shipped for operators, as they are written.
                inhibit_rules=yaml.safe_load(
                    (DASHBOARDS / "alertmanager.yml").read_text()
                )["inhibit_rules"],
            )
        )
        prometheus = await stack.enter_async_context(
            running_prometheus(
                http,
                tmp_path / "prometheus",
                targets,
                rule_files=[DASHBOARDS / "alerts.yml"],
                alertmanager=alertmanager,
            )
        )
        query = prometheus.query

        alpha = await first.tenant("alpha", NUMBER_A)
        bravo = await first.tenant("bravo", NUMBER_B)
        # One call billed as a whole minute spends alpha's whole plan.
        await first.put_plan(
            alpha, {"included_minutes": 1, "billing_increment": "minute"}
        )
        await first.put_plan(bravo, {"included_minutes": 10, "max_concurrent_calls": 1})
        # Alpha talks on one process while bravo talks on the other.
        bravo_call = asyncio.create_task(_talk(second, NUMBER_B))
        await asyncio.gather(_talk(first, NUMBER_A), bravo_call)
        # While a bravo call is live, a second caller is refused by the cap.
        held = await second.twilio.place_call(NUMBER_B, CALLER)
        second.twilio_rest.register_call(held)
        await held.open_stream()
        refused = await second.twilio.place_call(NUMBER_B, "+14155550999")
        assert refused.first_verb in ("Reject", "Say")
        await held.hang_up()

        expected: dict[str, float] = {}
        expected_cost: dict[str, float] = {}
        # Alpha made one call; bravo made two (the refused one never connected).
        for workspace_id, calls in ((alpha, 1), (bravo, 2)):

            async def settled(
                workspace_id: str = workspace_id, calls: int = calls
            ) -> bool:
                usage = await first.usage(workspace_id)
                return usage["calls"] == calls and usage["statement"] is not None

            await until(settled, "calls settled")
        for workspace_id in (alpha, bravo):
            usage = await first.usage(workspace_id)
            expected[workspace_id] = usage["statement"]["billed_ms"] / 60_000
            expected_cost[workspace_id] = usage["statement"]["cost_micros"] / 1e6
            assert expected_cost[workspace_id] > 0

        minutes = "max by (workspace) (callgate_budget_used_seconds) / 60"
        cost = "max by (workspace) (callgate_period_cost)"

        async def caught_up() -> bool:
            got = {
                r["metric"]["workspace"]: float(r["value"][1])
                for r in await query(minutes)
            }
            spent = {
                r["metric"]["workspace"]: float(r["value"][1])
                for r in await query(cost)
            }
            return all(
                abs(got.get(w, -1) - m) < 1e-9
                and abs(spent.get(w, -1) - expected_cost[w]) < 1e-9
                for w, m in expected.items()
            )

        await until(caught_up, "prometheus has the final usage and cost")
        for expr in _panel_queries():
            dashboard_expr = expr.replace("$workspace", alpha)

            async def answers(dashboard_expr: str = dashboard_expr) -> bool:
                return bool(await query(dashboard_expr))

            await until(answers, dashboard_expr)

        # Alpha spent everything its plan allows. Both of its alerts fire;
        # the hard cap's pages, named for alpha, with its severity and runbook,
        # and inhibits the included-minutes one, which says less.
        page = await pager.wait_paged(
            "CallgateBudgetExhausted", timeout_secs=60, workspace=alpha
        )
        assert page.status == "firing"
        assert page.labels["severity"] == "warning"
        assert alpha in page.annotations["description"]
        assert page.annotations["runbook"] == (
            "dashboards/README.md#callgatebudgetexhausted"
        )
        alerts = f"http://{alertmanager}/api/v2/alerts"

        async def inhibited() -> bool:
            async with http.get(alerts) as response:
                held = await response.json()
            return any(
                alert["labels"]["alertname"] == "CallgateBudget100Percent"
                and alert["status"]["inhibitedBy"]
                for alert in held
            )

        await until(inhibited, "the 100% alert inhibited")
        assert pager.paged("CallgateBudget100Percent") == []
        # Bravo's gauges were evaluated beside alpha's and set off nothing, and
        # alpha, though at its cap, is not past it by more than the bound.
        firing = {
            (r["metric"]["alertname"], r["metric"].get("workspace"))
            for r in await query("ALERTS")
        }
        assert firing == {(name, alpha) for name in ALPHA_ALERTS}
        assert not [
            page for page in pager.pages if page.labels.get("workspace") == bravo
        ]
