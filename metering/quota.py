"""The quota engine: budgets reserved before use, like telecom online charging.

A call is admitted with a concurrency lease and a first grant reserved from
its workspace's budget for the billing period (admit.lua). While it runs, each
report debits what it used and tops the grant up again (report.lua); the last
report settles the exact use and returns the rest. A process that dies stops
renewing its leases, and any process's sweeper returns their reservations
(reclaim.lua). All keys of one workspace share its hash slot, so every script
runs unchanged on Redis Cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Literal

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from tenancy import keyspace
from tenancy.replies import Store, text, text_map, texts

Refusal = Literal["concurrency", "budget"]
ReportState = Literal["ok", "settled", "reclaimed", "closed"]


def _lua(name: str) -> str:
    return files("metering").joinpath("lua", f"{name}.lua").read_text("utf-8")


def _script(store: Store, name: str) -> AsyncScript:
    # Every script here may append budget events, so each carries their code.
    return store.register_script(_lua("events") + "\n" + _lua(name))


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of admitting a call: a first grant, or why there is none."""

    granted_ms: int
    refused: Refusal | None = None
    available_ms: int = 0
    events: int = 0

    @property
    def admitted(self) -> bool:
        """True when the call got a lease and a grant."""
        return self.refused is None


@dataclass(frozen=True, slots=True)
class ReportAnswer:
    """What a report did: the grant now held, and the call's state."""

    granted_ms: int
    held_ms: int
    state: ReportState
    added_ms: int
    events: int = 0


@dataclass(frozen=True, slots=True)
class QuotaState:
    """A workspace's budget for one period, in milliseconds."""

    limit_ms: int
    used_ms: int
    reserved_ms: int

    @property
    def remaining_ms(self) -> int:
        """What can still be granted: the limit less what is used or reserved."""
        return max(0, self.limit_ms - self.used_ms - self.reserved_ms)


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """A call whose process vanished: its reservation went back to the budget."""

    workspace_id: str
    call_sid: str
    account_sid: str
    returned_ms: int
    # False for a call that held only a lease: its workspace has no budget.
    budgeted: bool = True
    # True when an earlier sweep reclaimed it but its settlement never came.
    again: bool = False


@dataclass(frozen=True, slots=True)
class Report:
    """One call's report, as the meter queues it."""

    workspace_id: str
    call_sid: str
    period: str
    day: str
    seq: int
    used_ms: int
    want_ms: int
    now_ms: int
    lease_ms: int
    limit_ms: int
    agent_id: str
    number: str
    end_reason: str | None = None
    billable_extra_ms: int = 0
    cost_micros: int = 0
    # Final only: the caller's leg's share of cost_micros, and the Twilio rate
    # that reprices it if Twilio's duration is already on the record.
    caller_leg_micros: int = 0
    twilio_micros_per_minute: int = 0
    # Final only: used_ms is the call's length by Twilio, and replaces a
    # larger total reported before (a call whose end reports were lost).
    exact: bool = False
    # Final only: the budget ended this call, so the period's cut-off event
    # is recorded with its final report (after the thresholds it crosses).
    cut_off: bool = False


class Quota:
    """Admits, renews, settles and reclaims grants in the store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._clustered = isinstance(store, RedisCluster)
        self._admit = _script(store, "admit")
        self._report = _script(store, "report")
        self._reclaim = _script(store, "reclaim")
        self._orphan = store.register_script(_lua("orphan"))
        self._adopt = store.register_script(_lua("adopt"))
        # Told the workspace's id whenever a script appended budget events.
        self.on_events: Callable[[str], Awaitable[None]] | None = None

    async def _announce(self, workspace_id: str, events: int) -> None:
        if events > 0 and self.on_events is not None:
            await self.on_events(workspace_id)

    async def admit(
        self,
        workspace_id: str,
        call_sid: str,
        *,
        period: str,
        limit_ms: int,
        max_concurrent: int,
        grant_ms: int,
        min_grant_ms: int,
        lease_ms: int,
        account_sid: str,
        now_ms: int,
    ) -> Admission:
        """Reserve ``grant_ms`` (or what is left) and a lease, or refuse."""
        reply = await self._admit(
            keys=[
                keyspace.quota(workspace_id, period),
                keyspace.grant(workspace_id, call_sid),
                keyspace.leases(workspace_id),
                keyspace.budget_events(workspace_id),
            ],
            args=[
                now_ms,
                grant_ms,
                lease_ms,
                max_concurrent,
                limit_ms,
                period,
                min_grant_ms,
                call_sid,
                account_sid,
            ],
        )
        admitted, granted, reason = int(reply[0]), int(reply[1]), text(reply[2])
        events = int(reply[4])
        await self._announce(workspace_id, events)
        if admitted:
            return Admission(granted, available_ms=int(reply[3]), events=events)
        refused: Refusal = "concurrency" if reason == "concurrency" else "budget"
        return Admission(0, refused, events=events)

    async def queue_report(self, pipe: redis.client.Pipeline, report: Report) -> None:
        """Queue ``report`` on ``pipe``; parse its reply with :func:`answer`."""
        await self._report(
            keys=_report_keys(report), args=_report_args(report), client=pipe
        )

    async def report_many(
        self, reports: list[Report]
    ) -> list[ReportAnswer | BaseException]:
        """Send every report at once; a failed one is its exception in the list.

        On one server the reports share a pipeline (one round trip); a Redis
        Cluster refuses scripts in pipelines, so there they go concurrently,
        each to its workspace's slot.
        """
        if self._clustered:
            raw = await asyncio.gather(
                *(self._report_now(report) for report in reports),
                return_exceptions=True,
            )
        else:
            assert isinstance(self._store, redis.Redis)
            async with self._store.pipeline(transaction=False) as pipe:
                for report in reports:
                    await self.queue_report(pipe, report)
                raw = await pipe.execute(raise_on_error=False)
        answers = [r if isinstance(r, BaseException) else answer(r) for r in raw]
        announced = {
            report.workspace_id
            for report, reply in zip(reports, answers, strict=True)
            if isinstance(reply, ReportAnswer) and reply.events > 0
        }
        for workspace_id in sorted(announced):
            await self._announce(workspace_id, 1)
        return answers

    async def _report_now(self, report: Report) -> Any:
        return await self._report(keys=_report_keys(report), args=_report_args(report))

    async def report(self, report: Report) -> ReportAnswer:
        """Send one report on its own (tests and settlement outside a batch)."""
        reply = answer(await self._report_now(report))
        await self._announce(report.workspace_id, reply.events)
        return reply

    async def set_limit(self, workspace_id: str, period: str, limit_ms: int) -> None:
        """Set the period's hard cap; running calls follow it at their next report."""
        await self._store.hset(
            keyspace.quota(workspace_id, period), "limit_ms", limit_ms
        )

    async def state(self, workspace_id: str, period: str) -> QuotaState:
        """The workspace's budget for ``period`` as the store holds it now."""
        fields = await self._store.hgetall(keyspace.quota(workspace_id, period))
        return _quota_state(fields)

    async def states(self, budgets: Sequence[tuple[str, str]]) -> list[QuotaState]:
        """:meth:`state` of each (workspace id, period), in one round trip."""
        async with self._store.pipeline(transaction=False) as pipe:
            for workspace_id, period in budgets:
                pipe.hgetall(keyspace.quota(workspace_id, period))
            replies: list[Any] = await pipe.execute()
        return [_quota_state(fields) for fields in replies]

    async def live_calls(self, workspace_id: str, now_ms: int) -> int:
        """Calls holding an unexpired lease: what counts against the cap."""
        count: int = await self._store.zcount(
            keyspace.leases(workspace_id), f"({now_ms}", "+inf"
        )
        return count

    async def forget(self, workspace_id: str, call_sid: str) -> None:
        """Drop the grant and lease of a call that has no record to settle."""
        async with self._store.pipeline(transaction=not self._clustered) as pipe:
            pipe.delete(keyspace.grant(workspace_id, call_sid))
            pipe.zrem(keyspace.leases(workspace_id), call_sid)
            await pipe.execute()

    async def expired_leases(self, workspace_id: str, now_ms: int) -> list[str]:
        """The calls whose leases have lapsed: their process stopped renewing."""
        return texts(
            await self._store.zrangebyscore(
                keyspace.leases(workspace_id), "-inf", now_ms
            )
        )

    async def adopt(
        self, workspace_id: str, call_sid: str, now_ms: int, lease_ms: int
    ) -> tuple[int, int] | None:
        """Take a lapsed call's lease (and grant) to meter it here.

        Returns the grant's last report sequence and held ms ((0, 0) for a
        call without a budget), or ``None`` if the call is not to be taken:
        its lease is live, it never started or is over, or it was reclaimed.
        """
        taken = await self._adopt(
            keys=[
                keyspace.leases(workspace_id),
                keyspace.grant(workspace_id, call_sid),
                keyspace.call(workspace_id, call_sid),
            ],
            args=[now_ms, call_sid, lease_ms],
        )
        if taken is None:
            return None
        return int(taken[0]), int(taken[1])

    async def reclaim_expired(
        self, workspace_id: str, now_ms: int, lease_ms: int
    ) -> list[Reclaimed]:
        """Return the reservations of every call whose lease has expired.

        A call without a budget holds a lease and no grant; it is returned too,
        with nothing given back, once the store shows it still open.
        """
        expired = await self._store.zrangebyscore(
            keyspace.leases(workspace_id), "-inf", now_ms
        )
        reclaimed: list[Reclaimed] = []
        for raw_sid in expired:
            call_sid = text(raw_sid)
            grant = text_map(
                await self._store.hgetall(keyspace.grant(workspace_id, call_sid))
            )
            period = grant.get("period")
            if period is None:
                account_sid = await self._orphan(
                    keys=[
                        keyspace.leases(workspace_id),
                        keyspace.grant(workspace_id, call_sid),
                        keyspace.call(workspace_id, call_sid),
                    ],
                    args=[now_ms, call_sid, lease_ms],
                )
                if account_sid is not None:
                    reclaimed.append(
                        Reclaimed(
                            workspace_id=workspace_id,
                            call_sid=call_sid,
                            account_sid=text(account_sid),
                            returned_ms=0,
                            budgeted=False,
                        )
                    )
                continue
            returned = int(
                await self._reclaim(
                    keys=[
                        keyspace.quota(workspace_id, period),
                        keyspace.grant(workspace_id, call_sid),
                        keyspace.leases(workspace_id),
                    ],
                    args=[now_ms, call_sid, lease_ms],
                )
            )
            if returned >= 0 or returned == -2:
                reclaimed.append(
                    Reclaimed(
                        workspace_id=workspace_id,
                        call_sid=call_sid,
                        account_sid=grant.get("account_sid", ""),
                        returned_ms=max(0, returned),
                        again=returned == -2,
                    )
                )
        return reclaimed


def _report_keys(report: Report) -> list[str]:
    workspace_id = report.workspace_id
    return [
        keyspace.quota(workspace_id, report.period),
        keyspace.grant(workspace_id, report.call_sid),
        keyspace.leases(workspace_id),
        keyspace.call(workspace_id, report.call_sid),
        keyspace.usage(workspace_id, report.period),
        keyspace.usage(workspace_id, report.day),
        keyspace.unreconciled(workspace_id),
        keyspace.budget_events(workspace_id),
    ]


def _report_args(report: Report) -> list[str | int]:
    return [
        report.seq,
        report.used_ms,
        report.want_ms,
        report.now_ms,
        report.lease_ms,
        report.limit_ms,
        "1" if report.end_reason is not None else "0",
        report.end_reason or "",
        report.agent_id,
        report.number,
        report.billable_extra_ms,
        report.call_sid,
        report.cost_micros,
        report.period,
        report.caller_leg_micros,
        report.twilio_micros_per_minute,
        report.day,
        "1" if report.exact else "0",
        "1" if report.cut_off else "0",
    ]


_STATES: dict[str, ReportState] = {
    "ok": "ok",
    "settled": "settled",
    "reclaimed": "reclaimed",
}


def answer(reply: Any) -> ReportAnswer:
    """A report script's reply as a :class:`ReportAnswer`."""
    return ReportAnswer(
        granted_ms=int(reply[0]),
        held_ms=int(reply[1]),
        state=_STATES.get(text(reply[2]), "closed"),
        added_ms=int(reply[3]),
        events=int(reply[4]),
    )


def _quota_state(raw: Any) -> QuotaState:
    fields = text_map(raw)
    return QuotaState(
        limit_ms=int(fields.get("limit_ms", 0)),
        used_ms=int(fields.get("used_ms", 0)),
        reserved_ms=int(fields.get("reserved_ms", 0)),
    )
