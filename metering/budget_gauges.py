"""Budget gauges read from the store, so every process exports the same values.

Counters are per process and sum in PromQL, but a budget is one number per
workspace however many processes serve it. Each scrape reads it from the
store, at most once per ``max_age_secs``, and sets the gauges from that.
"""

from __future__ import annotations

import asyncio
import time

from metering.metrics import Metrics
from metering.plans import MS_PER_MINUTE, hard_cap_ms, period_of
from metering.quota import Quota
from tenancy.workspaces import Workspaces, now_ms


class BudgetGauges:
    """Sets the ``callgate_budget_*`` gauges of every workspace with a plan."""

    def __init__(
        self,
        metrics: Metrics,
        workspaces: Workspaces,
        quota: Quota,
        max_age_secs: float = 5.0,
    ) -> None:
        self._metrics = metrics
        self._workspaces = workspaces
        self._quota = quota
        self._max_age_secs = max_age_secs
        self._read_at: float | None = None
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Read every budget again unless the last read is recent enough."""
        async with self._lock:
            now = time.monotonic()
            if self._read_at is not None and now - self._read_at < self._max_age_secs:
                return
            values: dict[str, tuple[float, float, float, float]] = {}
            for workspace in await self._workspaces.all():
                plan = await self._workspaces.plan(workspace.id)
                if plan is None:
                    continue
                period = period_of(now_ms(), plan.timezone).label
                state = await self._quota.state(workspace.id, period)
                allowance_ms = hard_cap_ms(plan)
                values[workspace.id] = (
                    plan.included_minutes * MS_PER_MINUTE / 1000,
                    allowance_ms / 1000,
                    state.used_ms / 1000,
                    max(0, allowance_ms - state.used_ms) / 1000,
                )
            metrics = self._metrics
            gauges = (
                metrics.budget_included,
                metrics.budget_allowance,
                metrics.budget_used,
                metrics.budget_remaining,
            )
            # A workspace deleted since the last read disappears from the scrape.
            for gauge in gauges:
                gauge.clear()
            for workspace_id, numbers in values.items():
                for gauge, value in zip(gauges, numbers, strict=True):
                    gauge.labels(workspace_id).set(value)
            self._read_at = time.monotonic()
