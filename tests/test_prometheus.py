"""A real Prometheus scrapes two Callgate processes; every dashboard query answers.

Prometheus is the Debian package's server (``make test`` installs it). Two
``callgate serve`` processes share one store; calls run in two workspaces,
one on each process, and one call is refused for concurrency. Then every
PromQL expression of every dashboard panel goes through Prometheus's HTTP
API: each must return data, and the per-client minutes must equal what the
API reports as each workspace's billed usage.

Prometheus has no way to announce a scrape, so the waits here poll its API
(and the operator API) against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import CallgateProcess, callgate_process, running_peers
from tests.peers.audio import split_frames, tone_mulaw

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
NUMBER_A = "+15005550001"
NUMBER_B = "+15005550002"
CALLER = "+14155550123"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after 60 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        if await check():
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.25)


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
    """Two processes, two workspaces: panels have data, minutes match the API."""
    prometheus = shutil.which("prometheus")
    assert prometheus is not None, "prometheus is missing: `make test` installs it"
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
        config = tmp_path / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "callgate",
                            "static_configs": [{"targets": targets}],
                        }
                    ],
                }
            )
        )
        port = _free_port()
        server = await asyncio.create_subprocess_exec(
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        stack.push_async_callback(server.wait)
        stack.callback(server.terminate)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        api = f"http://127.0.0.1:{port}/api/v1/query"

        async def query(expr: str) -> list[dict[str, Any]]:
            async with http.get(api, params={"query": expr}) as response:
                body = await response.json()
            assert body["status"] == "success", (expr, body)
            result: list[dict[str, Any]] = body["data"]["result"]
            return result

        async def ready() -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{port}/-/ready") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await _until(ready, "prometheus ready")

        alpha = await first.tenant("alpha", NUMBER_A)
        bravo = await first.tenant("bravo", NUMBER_B)
        await first.put_plan(alpha, {"included_minutes": 10})
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

            await _until(settled, "calls settled")
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

        await _until(caught_up, "prometheus has the final usage and cost")
        for expr in _panel_queries():
            dashboard_expr = expr.replace("$workspace", alpha)

            async def answers(dashboard_expr: str = dashboard_expr) -> bool:
                return bool(await query(dashboard_expr))

            await _until(answers, dashboard_expr)
