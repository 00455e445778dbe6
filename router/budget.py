"""Budgets at the edges of a call: admission, the call's grant, the cut-off, sweeping.

The quota engine (metering.quota) does the arithmetic; this module decides
when to ask it. A workspace without a plan has no budget: its calls are
admitted and metered, never cut off. With a plan, a call is admitted against
the period's hard cap and concurrency cap, renews its grant while it runs, and
is sent to the plan's goodbye (or redirect number) when nothing more can be
granted. Every process sweeps for leases whose owner stopped renewing them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import redis.asyncio as redis
from aiohttp import web

from metering.ledger import CallNotFoundError
from metering.meter import Budget, CallSession, Meter
from metering.metrics import Metrics
from metering.plans import INCREMENT_MS, Plan, hard_cap_ms, period_of
from metering.quota import Admission, Quota
from router.settings import Settings
from tenancy import keyspace
from tenancy.logs import metering_logger
from tenancy.numbers import Route
from tenancy.replies import Store, texts
from tenancy.twilio_api import TwilioApi, TwilioApiError
from tenancy.workspaces import CallPolicy, Workspaces, now_ms

# The smallest first grant worth answering a call for.
MIN_GRANT_MS = 1_000

SWEEPER: web.AppKey[Sweeper] = web.AppKey("sweeper")


async def admit(
    quota: Quota,
    plan: Plan,
    route: Route,
    call_sid: str,
    account_sid: str,
    settings: Settings,
) -> Admission:
    """Take the call's concurrency lease and first grant, or say why not."""
    at_ms = now_ms()
    return await quota.admit(
        route.workspace.id,
        call_sid,
        period=period_of(at_ms, plan.timezone).label,
        limit_ms=hard_cap_ms(plan),
        max_concurrent=plan.max_concurrent_calls,
        grant_ms=settings.grant_ms,
        min_grant_ms=MIN_GRANT_MS,
        lease_ms=settings.lease_ms,
        account_sid=account_sid,
        now_ms=at_ms,
    )


def budget(plan: Plan, policy: CallPolicy, period: str, settings: Settings) -> Budget:
    """How a call under ``plan`` renews its grant and rides out a store outage."""
    return Budget(
        period=period,
        timezone=plan.timezone,
        grant_ms=settings.grant_ms,
        limit_ms=hard_cap_ms(plan),
        lease_ms=settings.lease_ms,
        billing_step_ms=INCREMENT_MS[plan.billing_increment],
        outage=policy.outage,
        emergency_grant_ms=policy.emergency_grant_ms,
    )


class Cutoff:
    """Carries a call's budget exhaustion to whatever can end the call.

    The meter may fire before the code that ends the call is in place (a
    tiny last grant), so a firing is remembered until an action is attached.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._action: Callable[[str], Coroutine[Any, Any, None]] | None = None

    async def fire(self, session: CallSession) -> None:
        """The meter's exhaustion callback; the session says why."""
        self.reason = session.cutoff_reason
        if self._action is not None:
            await self._action(self.reason)

    async def attach(self, action: Callable[[str], Coroutine[Any, Any, None]]) -> None:
        """Set what ending the call means; run it now if it was already due."""
        self._action = action
        if self.reason is not None:
            await action(self.reason)


class Sweeper:
    """Returns grants whose leases expired and hangs their calls up.

    A lease expires when the process that held it stopped renewing it, which
    means it died. Any process's sweeper may find it; the reclaim script lets
    exactly one of them take the grant back.
    """

    def __init__(
        self,
        store: Store,
        workspaces: Workspaces,
        quota: Quota,
        meter: Meter,
        twilio: TwilioApi,
        metrics: Metrics,
        lease_ms: int,
        adopt: Callable[[str, str], Awaitable[bool]] | None = None,
    ) -> None:
        """Sweeps every half ``lease_ms``, L in the overrun bound.

        ``adopt`` is offered each lapsed call (workspace id, call sid) first;
        a call it takes over or settles is not reclaimed.
        """
        self._adopt = adopt
        self._store = store
        self._workspaces = workspaces
        self._quota = quota
        self._meter = meter
        self._twilio = twilio
        self._metrics = metrics
        self._lease_ms = lease_ms
        self._interval_secs = lease_ms / 2000
        # After this sweeper's own store error, by the monotonic clock.
        self._quiet_until = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Sweep every ``interval_secs`` until closed."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="lease-sweeper")

    async def close(self) -> None:
        """Stop sweeping."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def sweep(self) -> int:
        """Reclaim every expired lease now; return how many calls it ended.

        Nothing is reclaimed during a store outage or for a lease's time
        after it: every process's renewals stop with the store, so its leases
        lapse for want of a store, not of their process, and their owners
        renew them at their first report once it is back.
        """
        if not self._meter.store_steady(self._lease_ms):
            return 0
        if time.monotonic() < self._quiet_until:
            return 0
        ended = 0
        workspace_ids = texts(await self._store.zrange(keyspace.WORKSPACES, 0, -1))
        for workspace_id in workspace_ids:
            if self._adopt is not None:
                for call_sid in await self._quota.expired_leases(
                    workspace_id, now_ms()
                ):
                    try:
                        await self._adopt(workspace_id, call_sid)
                    except redis.RedisError:
                        raise
                    except Exception as exc:  # noqa: BLE001 (one call's error stays its own)
                        metering_logger.error(
                            "could not take call %s over: %s",
                            call_sid,
                            type(exc).__name__,
                        )
            lost_calls = await self._quota.reclaim_expired(
                workspace_id, now_ms(), self._lease_ms
            )
            for lost in lost_calls:
                if lost.budgeted and not lost.again:
                    self._metrics.grants_reclaimed.labels(workspace_id).inc()
                metering_logger.warning(
                    "%s call %s of a vanished process (%d ms returned)",
                    "settling again" if lost.again else "reclaimed",
                    lost.call_sid,
                    lost.returned_ms,
                )
                # Settle before hanging up, so the books are closed by the time
                # anything outside can see the call end. The call keeps its
                # lease until then: if this fails, a later sweep tries again.
                plan = await self._workspaces.plan(workspace_id)
                step = INCREMENT_MS[plan.billing_increment] if plan else 0
                try:
                    await self._meter.end_call(
                        workspace_id, lost.call_sid, "owner_lost", billing_step_ms=step
                    )
                except redis.RedisError:
                    metering_logger.warning(
                        "could not settle call %s; the next sweep will",
                        lost.call_sid,
                    )
                    continue
                except CallNotFoundError:
                    # No record to settle (erased, or never written): the
                    # grant is back already; drop its lease and hang up.
                    await self._quota.forget(workspace_id, lost.call_sid)
                except Exception as exc:  # noqa: BLE001 (one call's error stays its own)
                    metering_logger.error(
                        "could not settle call %s: %s",
                        lost.call_sid,
                        type(exc).__name__,
                    )
                    continue
                account_sid = lost.account_sid or self._twilio.main_account_sid or ""
                try:
                    await self._twilio.complete(account_sid, lost.call_sid)
                except TwilioApiError:
                    metering_logger.warning(
                        "could not hang up orphaned call %s", lost.call_sid
                    )
                ended += 1
        return ended

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_secs)
            started = time.monotonic()
            try:
                await self.sweep()
            except redis.RedisError:
                # A process with no call of its own learns of an outage here.
                self._quiet_until = time.monotonic() + self._lease_ms / 1000
                metering_logger.warning("lease sweep failed; will retry", exc_info=True)
            except Exception as exc:  # noqa: BLE001 (the sweeper must outlive any error)
                metering_logger.error("lease sweep failed: %s", type(exc).__name__)
            metering_logger.debug("swept leases in %.3fs", time.monotonic() - started)
