"""Grafana dashboards for Callgate, built with Grafana's foundation SDK.

Run ``python dashboards/generate.py`` after changing a panel: it rewrites
``dashboards/grafana/*.json``. A test fails when the committed files differ
from what this code builds, so the two never drift apart.

Budget gauges are read from the store, so every process exports the same
value: panels take ``max by (workspace)`` of them and ``sum`` of counters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

OUT = Path(__file__).resolve().parent / "grafana"
# The datasource the provisioning file declares.
DATASOURCE = DataSourceRef(type_val="prometheus", uid="callgate-prometheus")
# Every PromQL expression of the drill-down is filtered by this variable.
WORKSPACE = 'workspace=~"$workspace"'


def _panel(
    title: str, unit: str, queries: list[tuple[str, str]], width: int = 12
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(width)
    )
    for ref_id, (expr, legend) in zip("ABCDEFGH", queries, strict=False):
        panel.with_target(
            prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref_id)
        )
    return panel


def overview() -> dashboard.Dashboard:
    """Every client: minutes, live calls, burn-down, refusals, money, latency."""
    return (
        dashboard.Dashboard("Callgate: clients")
        .uid("callgate-overview")
        .tags(["callgate"])
        .time("now-24h", "now")
        .refresh("30s")
        .with_panel(
            _panel(
                "Minutes this period, per client",
                "m",
                [
                    (
                        "max by (workspace) (callgate_budget_used_seconds) / 60",
                        "{{workspace}} used",
                    ),
                    (
                        "max by (workspace) (callgate_budget_allowance_seconds) / 60",
                        "{{workspace}} allowance",
                    ),
                ],
            )
        )
        .with_panel(
            _panel(
                "Live calls, per client",
                "short",
                [("sum by (workspace) (callgate_calls_active)", "{{workspace}}")],
            )
        )
        .with_panel(
            _panel(
                "Budget left under the hard cap",
                "m",
                [
                    (
                        "max by (workspace) (callgate_budget_remaining_seconds) / 60",
                        "{{workspace}}",
                    )
                ],
            )
        )
        .with_panel(
            _panel(
                "Calls refused at admission",
                "cps",
                [
                    (
                        "sum by (workspace, reason) "
                        "(rate(callgate_admissions_rejected_total[5m]))",
                        "{{workspace}} {{reason}}",
                    )
                ],
            )
        )
        .with_panel(
            _panel(
                "Price, cost and margin this period, per client",
                "short",
                [
                    (
                        f"max by (workspace, currency) (callgate_period_{kind})",
                        f"{{{{workspace}}}} {kind} ({{{{currency}}}})",
                    )
                    for kind in ("price", "cost", "margin")
                ],
            )
        )
        .with_panel(
            _panel(
                "Metered minutes per minute, per client",
                "short",
                [
                    (
                        "sum by (workspace) (rate(callgate_call_seconds_total[5m]))",
                        "{{workspace}}",
                    )
                ],
            )
        )
        .with_panel(
            _panel(
                "Relay latency, 99th percentile",
                "s",
                [
                    (
                        "histogram_quantile(0.99, sum by (le, direction) "
                        "(rate(callgate_relay_latency_seconds_bucket[5m])))",
                        "{{direction}}",
                    )
                ],
            )
        )
    )


def workspace() -> dashboard.Dashboard:
    """One client, chosen by the ``workspace`` variable."""
    variable = (
        dashboard.QueryVariable("workspace")
        .label("Workspace")
        .datasource(DATASOURCE)
        .query("label_values(callgate_calls_started_total, workspace)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
    )
    return (
        dashboard.Dashboard("Callgate: one client")
        .uid("callgate-workspace")
        .tags(["callgate"])
        .time("now-24h", "now")
        .refresh("30s")
        .with_variable(variable)
        .with_panel(
            _panel(
                "Minutes this period",
                "m",
                [
                    (f"max(callgate_budget_used_seconds{{{WORKSPACE}}}) / 60", "used"),
                    (
                        f"max(callgate_budget_included_seconds{{{WORKSPACE}}}) / 60",
                        "included",
                    ),
                    (
                        f"max(callgate_budget_allowance_seconds{{{WORKSPACE}}}) / 60",
                        "hard cap",
                    ),
                ],
            )
        )
        .with_panel(
            _panel(
                "Price, cost and margin this period",
                "short",
                [
                    (
                        f"max by (currency) (callgate_period_{kind}{{{WORKSPACE}}})",
                        f"{kind} ({{{{currency}}}})",
                    )
                    for kind in ("price", "cost", "margin")
                ],
            )
        )
        .with_panel(
            _panel(
                "Live calls",
                "short",
                [(f"sum(callgate_calls_active{{{WORKSPACE}}})", "live")],
            )
        )
        .with_panel(
            _panel(
                "Calls ended, by reason",
                "cps",
                [
                    (
                        "sum by (reason) "
                        f"(rate(callgate_calls_ended_total{{{WORKSPACE}}}[5m]))",
                        "{{reason}}",
                    )
                ],
            )
        )
        .with_panel(
            _panel(
                "Grant renewals, by outcome",
                "cps",
                [
                    (
                        "sum by (outcome) "
                        f"(rate(callgate_grant_renewals_total{{{WORKSPACE}}}[5m]))",
                        "{{outcome}}",
                    )
                ],
            )
        )
    )


def render() -> dict[str, str]:
    """Each dashboard's file name and JSON text."""
    encoder = JSONEncoder(sort_keys=True, indent=2)
    return {
        f"{built.uid}.json": encoder.encode(built) + "\n"
        for built in (overview().build(), workspace().build())
    }


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        # Fails loudly if the SDK ever produced something that is not JSON.
        json.loads(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
