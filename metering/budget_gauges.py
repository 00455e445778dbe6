"""Budget and money gauges read from the store, so every process exports the same.

Counters are per process and sum in PromQL, but a budget (or a period's price,
cost and margin) is one number per workspace however many processes serve it.
Each scrape reads them from the store, at most once per ``max_age_secs``, and
sets the gauges from that. The money gauges are the period's statement, as
``GET /workspaces/{id}/usage`` reports it, in units of the plan's currency.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Gauge

from metering.ledger import Ledger
from metering.metrics import Metrics
from metering.plans import (
    MS_PER_MINUTE,
    hard_cap_ms,
    overrun_bound_ms,
    period_of,
    statement,
)
from metering.quota import Quota
from tenancy.workspaces import Workspaces, now_ms

# D in the overrun bound, as the slow hang-up alert assumes it: that alert
# fires when the 99th percentile of measured hang-ups takes longer.
ASSUMED_HANGUP_MS = 1_000


class BudgetGauges:
    """Sets the budget and ``callgate_period_*`` gauges of workspaces with a plan."""

    def __init__(
        self,
        metrics: Metrics,
        workspaces: Workspaces,
        quota: Quota,
        ledger: Ledger,
        *,
        tick_ms: int,
        lease_ms: int,
        max_age_secs: float = 5.0,
    ) -> None:
        """``tick_ms`` and ``lease_ms`` are τ and L of the overrun bound."""
        self._metrics = metrics
        self._workspaces = workspaces
        self._quota = quota
        self._ledger = ledger
        self._tick_ms = tick_ms
        self._lease_ms = lease_ms
        self._max_age_secs = max_age_secs
        self._read_at: float | None = None
        self._lock = asyncio.Lock()
        self._times = _Family(
            metrics.budget_included,
            metrics.budget_allowance,
            metrics.budget_used,
            metrics.budget_remaining,
            metrics.budget_overrun_bound,
        )
        self._money = _Family(
            metrics.period_price, metrics.period_cost, metrics.period_margin
        )

    async def refresh(self) -> None:
        """Read every budget again unless the last read is recent enough."""
        async with self._lock:
            now = time.monotonic()
            if self._read_at is not None and now - self._read_at < self._max_age_secs:
                return
            # A few round trips however many workspaces: their records, their
            # plans, then this period's budgets and costs, each pipelined.
            workspaces = {w.id: w for w in await self._workspaces.all()}
            plans = await self._workspaces.plans(list(workspaces))
            periods = [
                (workspace_id, period_of(now_ms(), plan.timezone).label)
                for workspace_id, plan in plans.items()
            ]
            states = await self._quota.states(periods)
            costs = await self._ledger.costs_micros(periods)

            times: dict[tuple[str, ...], tuple[float, ...]] = {}
            money: dict[tuple[str, ...], tuple[float, ...]] = {}
            for (workspace_id, _), state, cost_micros in zip(
                periods, states, costs, strict=True
            ):
                plan = plans[workspace_id]
                allowance_ms = hard_cap_ms(plan)
                policy = workspaces[workspace_id].policy
                bound_ms = overrun_bound_ms(
                    plan,
                    tick_ms=self._tick_ms,
                    lease_ms=self._lease_ms,
                    emergency_grant_ms=(
                        policy.emergency_grant_ms if policy.outage == "continue" else 0
                    ),
                    hangup_ms=ASSUMED_HANGUP_MS,
                )
                times[(workspace_id,)] = (
                    plan.included_minutes * MS_PER_MINUTE / 1000,
                    allowance_ms / 1000,
                    state.used_ms / 1000,
                    max(0, allowance_ms - state.used_ms) / 1000,
                    bound_ms / 1000,
                )
                bill = statement(plan, state.used_ms, cost_micros)
                money[workspace_id, plan.currency] = (
                    bill.price_micros / 1e6,
                    bill.cost_micros / 1e6,
                    bill.margin_micros / 1e6,
                )
            self._times.publish(times)
            self._money.publish(money)
            self._read_at = time.monotonic()


class _Family:
    """Gauges that share label sets, set together from one read of the store."""

    def __init__(self, *gauges: Gauge) -> None:
        self._gauges = gauges
        self._published: set[tuple[str, ...]] = set()

    def publish(self, values: dict[tuple[str, ...], tuple[float, ...]]) -> None:
        """Set each label set's values; drop the label sets no longer read."""
        # A workspace deleted since the last read disappears from the scrape,
        # and one whose plan changed currency keeps no series under the old
        # one. The others keep their children: making them anew on every
        # read was most of a scrape's cost with many workspaces.
        for labels in self._published - values.keys():
            for gauge in self._gauges:
                gauge.remove(*labels)
        for labels, numbers in values.items():
            for gauge, value in zip(self._gauges, numbers, strict=True):
                gauge.labels(*labels).set(value)
        self._published = set(values)
