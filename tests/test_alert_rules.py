"""The alert rules load in Prometheus and fire, with their labels, as intended.

``dashboards/alerts_test.yml`` feeds series for a workspace going over budget
next to one that does not, a store outage, a growing journal, drift and
upstream errors; promtool evaluates the rules over them. amtool checks the
Alertmanager configuration shipped beside them.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"


async def _promtool(*args: str) -> str:
    return await _run("promtool", *args)


async def _run(tool: str, *args: str) -> str:
    binary = shutil.which(tool)
    assert binary is not None, f"{tool} is missing: `make test` installs it"
    process = await asyncio.create_subprocess_exec(
        binary,
        *args,
        cwd=DASHBOARDS,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    report = output.decode("utf-8", "replace")
    assert process.returncode == 0, report
    return report


async def test_rules_are_valid() -> None:
    """Every rule parses and every expression is valid PromQL."""
    report = await _promtool("check", "rules", "alerts.yml")
    assert "SUCCESS: 10 rules found" in report


async def test_rules_fire_for_the_workspace_over_budget_only() -> None:
    """promtool's unit tests: expected alerts, labels and annotations, no others."""
    report = await _promtool("test", "rules", "alerts_test.yml")
    assert "SUCCESS" in report


async def test_alertmanager_config_is_valid_and_routes_by_severity() -> None:
    """amtool accepts the shipped config; info goes to chat, the rest pages."""
    report = await _run("amtool", "check-config", "alertmanager.yml")
    assert "3 inhibit rules" in report
    config = "--config.file=alertmanager.yml"
    routes = ("config", "routes", "test", config)
    info = await _run("amtool", *routes, "severity=info", "workspace=ws_a")
    assert info.splitlines()[-1] == "callgate-chat"
    page = await _run("amtool", *routes, "severity=critical", "workspace=ws_a")
    assert page.splitlines()[-1] == "callgate-pager"
