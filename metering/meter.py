"""Meters connected time per call, renews its grant, and enforces its budget.

Each process holds one :class:`Meter`. A call's session counts milliseconds on
the monotonic clock from the moment it connects; once per flush interval a
single pipeline reports every live call's cumulative total, which debits the
budget and tops its grant up (metering.quota). When a grant can no longer be
topped up the call is on its final units: a timer fires the session's
exhaustion callback the moment they run out, so the overrun past a hard budget
is the hang-up latency, and at most one flush interval more if the timer is
late. At hang-up the exact use is settled at once. Reports carry totals, so a
retried or lost report never counts twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.asyncio as redis

from metering.journal import Journal
from metering.ledger import CallRecord, Ledger
from metering.metrics import Metrics
from metering.plans import Provider, RateCard, call_cost_micros, day_of, period_of
from metering.quota import Quota, Report, ReportAnswer
from tenancy.logs import metering_logger
from tenancy.workspaces import now_ms

Exhausted = Callable[["CallSession"], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class Budget:
    """How a call's grant is renewed: target, period limit, lease, rounding.

    ``grant_ms`` is the reservation each report tops up to; ``limit_ms`` the
    period's hard cap; ``billing_step_ms`` the plan's billing increment (1000
    per second, 6000 per six seconds, 60000 per started minute).
    """

    period: str
    timezone: str
    grant_ms: int
    limit_ms: int
    lease_ms: int
    billing_step_ms: int = 1000
    # What a call does while the store is unreachable: run on what it holds
    # plus an emergency grant G, or be ended at once.
    outage: Literal["continue", "terminate"] = "continue"
    emergency_grant_ms: int = 60_000


@dataclass(slots=True, eq=False)
class CallSession:
    """The meter of one connected call, owned by whoever carries it."""

    workspace_id: str
    call_sid: str
    agent_id: str
    number: str
    started_ns: int
    period: str
    day: str
    budget: Budget | None = None
    on_exhausted: Exhausted | None = None
    provider: Provider = "vapi"
    ended_ns: int | None = None
    end_reason: str | None = None
    reported_ms: int = 0
    seq: int = 0
    held_ms: int = 0
    exhausted: bool = False
    exhausted_ns: int | None = None
    cutoff_reason: str = "budget"
    cut_by_budget: bool = False
    stranded: bool = False
    # Ended at a length Twilio gave, which replaces a larger total reported.
    exact_end: bool = False
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def metered_ms(self, now_ns: int) -> int:
        """Connected milliseconds up to ``now_ns``, or in total once ended."""
        until = self.ended_ns if self.ended_ns is not None else now_ns
        return (until - self.started_ns) // 1_000_000


class Meter:
    """Owns the live sessions of this process and the task that reports them."""

    def __init__(
        self,
        ledger: Ledger,
        quota: Quota,
        metrics: Metrics,
        interval_ms: int,
        clock: Callable[[], int] = time.monotonic_ns,
        journal: Journal | None = None,
        rates: RateCard | None = None,
        lease_ms: int = 0,
    ) -> None:
        """``clock`` returns monotonic nanoseconds; tests may pass their own.

        With a ``journal``, reports the store cannot take are written there
        and replayed later, instead of being held in memory only. A non-zero
        ``lease_ms`` gives calls without a budget a lease of that length,
        renewed by every report, so that a sweeper settles them if this
        process dies; budgeted calls take theirs from their budget.
        """
        self._ledger = ledger
        self._lease_ms = lease_ms
        self._journal = journal
        self._rates = rates or RateCard()
        self.store_up = True
        # When the store last came back after an outage, by ``clock``.
        self._store_back_ns: int | None = None
        self._quota = quota
        self._metrics = metrics
        self._clock = clock
        self._interval_secs = interval_ms / 1000
        self._sessions: dict[str, CallSession] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._callbacks: set[asyncio.Task[None]] = set()

    def metered_ms(self, session: CallSession) -> int:
        """The session's connected milliseconds by this meter's clock."""
        return session.metered_ms(self._clock())

    @property
    def active(self) -> int:
        """Calls being metered in this process."""
        return sum(1 for s in self._sessions.values() if s.ended_ns is None)

    def store_steady(self, for_ms: int) -> bool:
        """Whether reports have reached the store for at least ``for_ms``.

        False during an outage, and for ``for_ms`` after one, while calls
        that could not renew their leases catch up.
        """
        if not self.store_up:
            return False
        back_ns = self._store_back_ns
        return back_ns is None or self._clock() - back_ns >= for_ms * 1_000_000

    def session(self, call_sid: str) -> CallSession | None:
        """The live session of ``call_sid`` in this process, if it has one."""
        return self._sessions.get(call_sid)

    def start(self) -> None:
        """Start the periodic report."""
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._run(), name="meter-flush")

    async def close(self) -> None:
        """Stop reporting periodically, then report what is still pending."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        await self.flush()
        for task in list(self._callbacks):
            task.cancel()
        await asyncio.gather(*self._callbacks, return_exceptions=True)
        if self._journal is not None:
            self._journal.close()

    async def begin(
        self,
        workspace_id: str,
        call_sid: str,
        *,
        agent_id: str,
        number: str,
        stream_sid: str = "",
        budget: Budget | None = None,
        on_exhausted: Exhausted | None = None,
        provider: Provider = "vapi",
    ) -> CallSession | None:
        """Start metering a call that just connected (media or SIP leg).

        With a ``budget`` the call's grant (taken at admission) is renewed on
        every report, and ``on_exhausted`` is awaited once if it runs out.
        Returns ``None`` if the call had already started, here or elsewhere:
        a repeated start must not meter the same call twice.
        """
        started_at_ms = now_ms()
        zone = budget.timezone if budget else "UTC"
        period = budget.period if budget else period_of(started_at_ms, zone).label
        day = day_of(started_at_ms, zone)
        started = await self._ledger.start_call(
            workspace_id,
            call_sid,
            agent_id=agent_id,
            number=number,
            stream_sid=stream_sid,
            started_at_ms=started_at_ms,
            period=period,
            day=day,
            lease_until_ms=(
                0 if budget or not self._lease_ms else started_at_ms + self._lease_ms
            ),
        )
        if not started:
            return None
        session = CallSession(
            workspace_id=workspace_id,
            call_sid=call_sid,
            agent_id=agent_id,
            number=number,
            started_ns=self._clock(),
            period=period,
            day=day,
            budget=budget,
            on_exhausted=on_exhausted,
            provider=provider,
            held_ms=budget.grant_ms if budget else 0,
        )
        self._sessions[call_sid] = session
        self._metrics.calls_started.labels(workspace_id).inc()
        self._metrics.calls_active.labels(workspace_id).inc()
        return session

    def adopt(
        self,
        record: CallRecord,
        *,
        period: str,
        day: str,
        seq: int,
        held_ms: int,
        budget: Budget | None = None,
        on_exhausted: Exhausted | None = None,
    ) -> CallSession:
        """Meter here a started call whose process died (see Quota.adopt).

        The clock runs from the call's start by the server clock, so the time
        since its last report is counted too; reports go on from ``seq`` and
        the cumulative total the store holds.
        """
        assert record.started_at_ms is not None, "only a started call is adopted"
        elapsed_ms = max(0, now_ms() - record.started_at_ms)
        session = CallSession(
            workspace_id=record.workspace_id,
            call_sid=record.call_sid,
            agent_id=record.agent_id,
            number=record.to_number,
            started_ns=self._clock() - elapsed_ms * 1_000_000,
            period=period,
            day=day,
            budget=budget,
            on_exhausted=on_exhausted,
            provider="retell" if record.provider == "retell" else "vapi",
            reported_ms=record.metered_ms,
            seq=seq,
            held_ms=held_ms,
        )
        self._sessions[record.call_sid] = session
        self._metrics.calls_active.labels(record.workspace_id).inc()
        return session

    def live(self, provider: Provider | None = None) -> list[CallSession]:
        """The calls this process is metering now, of ``provider`` if given."""
        return [
            s
            for s in self._sessions.values()
            if s.ended_ns is None and provider in (None, s.provider)
        ]

    async def end(
        self, session: CallSession, reason: str, metered_ms: int | None = None
    ) -> None:
        """Stop the clock and settle the call's exact use in the store.

        ``metered_ms``, when the call's length is known from elsewhere (Twilio
        asked after the fact), ends it that long after its start rather than
        now, and takes back time already reported past that length.

        If the store cannot be reached, the session stays queued and the
        periodic report settles it later; nothing is lost while this process
        lives.
        """
        if session.ended_ns is not None:
            return
        session.ended_ns = self._clock()
        if metered_ms is not None:
            session.ended_ns = min(
                session.ended_ns, session.started_ns + metered_ms * 1_000_000
            )
            session.exact_end = True
        session.end_reason = reason
        self._cancel_timer(session)
        self._metrics.calls_active.labels(session.workspace_id).dec()
        self._metrics.calls_ended.labels(session.workspace_id, reason).inc()
        if session.exhausted_ns is not None and session.on_exhausted is not None:
            # D in the overrun bound: from the budget running out to the call
            # being over, hang-up through Twilio included.
            latency_secs = (session.ended_ns - session.exhausted_ns) / 1e9
            self._metrics.hangup_latency.observe(latency_secs)
        await self.flush([session])

    async def end_call(
        self,
        workspace_id: str,
        call_sid: str,
        reason: str,
        billing_step_ms: int = 0,
        metered_ms: int | None = None,
    ) -> None:
        """End a call whose end was reported to this process, wherever it began.

        A SIP call's callbacks may reach any process. If this one holds the
        session it ends it; otherwise it settles the record from its start
        time on the server clock, rounded up to ``billing_step_ms`` (0 for no
        rounding) as the plan bills it, and the process holding the session
        drops it at its next report. ``metered_ms`` caps the length when
        Twilio has said how long the call was.
        """
        session = self._sessions.get(call_sid)
        if session is not None:
            await self.end(session, reason, metered_ms)
            return
        record = await self._ledger.get_call(workspace_id, call_sid)
        ended_at_ms = now_ms()
        started = record.started_at_ms
        used_ms = max(0, ended_at_ms - started) if started is not None else 0
        if metered_ms is not None:
            used_ms = min(used_ms, metered_ms)
        # Counted where it started (the plan's time zone decides the day);
        # a call that never started falls back to UTC.
        counted = await self._ledger.counted_in(workspace_id, call_sid)
        if counted is None:
            grant = await self._ledger.grant_period(workspace_id, call_sid)
            at_ms = started or ended_at_ms
            counted = (grant or period_of(at_ms, "UTC").label, day_of(at_ms, "UTC"))
        period, day = counted
        report = Report(
            workspace_id=workspace_id,
            call_sid=call_sid,
            period=period,
            day=day,
            seq=1 << 30,
            used_ms=used_ms,
            want_ms=0,
            now_ms=ended_at_ms,
            lease_ms=0,
            limit_ms=0,
            agent_id=record.agent_id,
            number=record.to_number,
            end_reason=reason,
            billable_extra_ms=-used_ms % billing_step_ms if billing_step_ms else 0,
            exact=metered_ms is not None,
        )
        await self._quota.report(self._priced(report, record.provider or "vapi"))
        self._metrics.calls_ended.labels(workspace_id, reason).inc()

    async def close_unstarted(
        self,
        workspace_id: str,
        call_sid: str,
        *,
        agent_id: str,
        number: str,
        reason: str,
    ) -> None:
        """Close the record of a call that never connected, and free its grant."""
        at_ms = now_ms()
        grant = await self._ledger.grant_period(workspace_id, call_sid)
        await self._quota.report(
            Report(
                workspace_id=workspace_id,
                call_sid=call_sid,
                period=grant or period_of(at_ms, "UTC").label,
                day=day_of(at_ms, "UTC"),
                seq=1 << 30,
                used_ms=0,
                want_ms=0,
                now_ms=at_ms,
                lease_ms=0,
                limit_ms=0,
                agent_id=agent_id,
                number=number,
                end_reason=reason,
                # Twilio answered the caller, so its leg costs what its
                # duration says once Twilio reports it.
                twilio_micros_per_minute=self._rates.twilio_micros_per_minute,
            )
        )

    async def flush(self, sessions: list[CallSession] | None = None) -> None:
        """Report ``sessions`` (default: every pending one) in one pipeline."""
        async with self._flush_lock:
            batch = list(self._sessions.values()) if sessions is None else sessions
            batch = [s for s in batch if s.call_sid in self._sessions]
            if batch:
                await self._write(batch)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_secs)
            await self.replay()
            await self.flush()

    async def replay(self) -> bool:
        """Deliver the journal to the store; True once nothing is left in it."""
        journal = self._journal
        if journal is None or not journal.depth:
            return True
        # Under the flush lock: a report journaled mid-replay must not be
        # forgotten by the replay's done().
        async with self._flush_lock:
            reports = journal.take()
            try:
                replies = await self._quota.report_many(reports)
            except redis.RedisError:
                return False
            if any(isinstance(reply, BaseException) for reply in replies):
                return False
            journal.done()
        self._store_reached()
        self._metrics.journal_depth.set(journal.depth)
        metering_logger.info("replayed %d journaled reports", len(reports))
        return True

    async def _write(self, batch: list[CallSession]) -> None:
        now_ns = self._clock()
        at_ms = now_ms()
        queued: list[tuple[CallSession, int, bool]] = []
        reports: list[Report] = []
        for session in batch:
            total = session.metered_ms(now_ns)
            # Snapshot whether this report carries the end: the call may end
            # while the write is in flight, and only a write that carried the
            # end may retire the session.
            finished = session.end_reason is not None
            topping_up = session.budget and session.held_ms < session.budget.grant_ms
            if total <= session.reported_ms and not finished and not topping_up:
                continue
            reports.append(self._report(session, total, at_ms, finished))
            queued.append((session, total, finished))
        if not reports:
            return
        try:
            replies = await self._quota.report_many(reports)
        except redis.RedisError:
            self._metrics.meter_flushes.labels("error").inc()
            self._store_lost(queued, reports)
            return
        self._store_reached()
        failed = sum(1 for reply in replies if isinstance(reply, BaseException))
        self._metrics.meter_flushes.labels("error" if failed else "ok").inc()
        for (session, total, finished), reply in zip(queued, replies, strict=True):
            if isinstance(reply, BaseException):
                metering_logger.warning(
                    "report for call %s failed: %s", session.call_sid, reply
                )
                continue
            self._apply(session, total, finished, reply)

    def _store_reached(self) -> None:
        """The store answered: if it was lost, it is back from now."""
        if not self.store_up:
            self.store_up = True
            self._store_back_ns = self._clock()
            self._metrics.store_up.set(1)
            metering_logger.warning("store reachable again")

    def _store_lost(
        self, queued: list[tuple[CallSession, int, bool]], reports: list[Report]
    ) -> None:
        """The store is unreachable: journal the reports, apply each outage policy."""
        if self.store_up:
            self.store_up = False
            self._metrics.store_up.set(0)
            metering_logger.error("store unreachable; journaling usage", exc_info=True)
        if self._journal is None:
            return  # the sessions keep their totals and are reported again
        self._journal.append(reports)
        self._metrics.journal_depth.set(self._journal.depth)
        now_ns = self._clock()
        for session, total, finished in queued:
            # Journaled counts as delivered: the replay will deliver it.
            session.seq += 1
            last_total = session.reported_ms
            session.reported_ms = max(session.reported_ms, total)
            if finished:
                self._sessions.pop(session.call_sid, None)
                continue
            budget = session.budget
            if budget is None or session.stranded:
                continue
            session.stranded = True
            if budget.outage == "terminate":
                self._exhaust(session, "store_outage")
            else:
                used_since = session.metered_ms(now_ns) - last_total
                left_ms = session.held_ms - used_since + budget.emergency_grant_ms
                self._arm_timer(session, max(0, left_ms), "store_outage")

    def _report(
        self, session: CallSession, total: int, at_ms: int, finished: bool
    ) -> Report:
        budget = session.budget
        extra = 0
        if finished and budget is not None:
            step = budget.billing_step_ms
            extra = -total % step if total else 0
        report = Report(
            workspace_id=session.workspace_id,
            call_sid=session.call_sid,
            period=session.period,
            day=session.day,
            seq=session.seq + 1,
            used_ms=total,
            want_ms=budget.grant_ms if budget and not finished else 0,
            now_ms=at_ms,
            lease_ms=budget.lease_ms if budget else self._lease_ms,
            limit_ms=budget.limit_ms if budget else 0,
            agent_id=session.agent_id,
            number=session.number,
            end_reason=session.end_reason if finished else None,
            billable_extra_ms=extra,
            exact=finished and session.exact_end,
            cut_off=finished and session.cut_by_budget,
        )
        return self._priced(report, session.provider) if finished else report

    def _priced(self, report: Report, provider: str) -> Report:
        """A final report with its call's cost by the rate card, and the rate
        that reprices the caller's leg once Twilio reports its duration."""
        platform: Provider = "retell" if provider == "retell" else "vapi"
        cost = call_cost_micros(report.used_ms, platform, self._rates)
        return dataclasses.replace(
            report,
            cost_micros=cost.total_micros,
            caller_leg_micros=cost.caller_leg_micros,
            twilio_micros_per_minute=self._rates.twilio_micros_per_minute,
        )

    def _apply(
        self, session: CallSession, total: int, finished: bool, reply: ReportAnswer
    ) -> None:
        session.seq += 1
        if reply.added_ms > 0:
            self._metrics.call_seconds.labels(session.workspace_id).inc(
                reply.added_ms / 1000
            )
        session.reported_ms = max(session.reported_ms, total)
        if reply.state == "closed":
            # Another process settled this call (a SIP call's completed
            # callback can land anywhere); this session has nothing to add.
            self._forget(session)
            return
        if finished:
            self._sessions.pop(session.call_sid, None)
            return
        if session.budget is None:
            return
        session.held_ms = reply.held_ms
        session.stranded = False
        self._metrics.grant_renewals.labels(
            session.workspace_id, _renewal_outcome(reply, session.budget.grant_ms)
        ).inc()
        if reply.state == "reclaimed":
            # The grant was taken back: this process was presumed dead.
            self._exhaust(session)
        elif reply.held_ms < session.budget.grant_ms:
            self._arm_timer(session, reply.held_ms)
        else:
            self._cancel_timer(session)

    def _arm_timer(
        self, session: CallSession, held_ms: int, reason: str = "budget"
    ) -> None:
        """Final units: fire the exhaustion callback when ``held_ms`` runs out."""
        self._cancel_timer(session)
        loop = asyncio.get_running_loop()
        session._timer = loop.call_later(
            held_ms / 1000, self._units_spent, session, reason
        )

    def _units_spent(self, session: CallSession, reason: str) -> None:
        """The final units ran out: end the call, and if the budget did it, say so."""
        if session.exhausted or session.ended_ns is not None:
            return
        # The final report records the period's cut-off with the call's end.
        session.cut_by_budget = reason == "budget" and session.budget is not None
        self._exhaust(session, reason)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    def _cancel_timer(self, session: CallSession) -> None:
        if session._timer is not None:
            session._timer.cancel()
            session._timer = None

    def _exhaust(self, session: CallSession, reason: str = "budget") -> None:
        session._timer = None
        if session.exhausted or session.ended_ns is not None:
            return
        session.exhausted = True
        session.exhausted_ns = self._clock()
        session.cutoff_reason = reason
        if session.on_exhausted is None:
            return
        self._metrics.budget_cutoffs.labels(session.workspace_id).inc()
        self._spawn(session.on_exhausted(session))

    def _forget(self, session: CallSession) -> None:
        self._cancel_timer(session)
        if self._sessions.pop(session.call_sid, None) is not None and (
            session.ended_ns is None
        ):
            session.ended_ns = self._clock()
            self._metrics.calls_active.labels(session.workspace_id).dec()


def _renewal_outcome(reply: ReportAnswer, grant_ms: int) -> str:
    """How a grant renewal went: full, partial, denied or reclaimed."""
    if reply.state == "reclaimed":
        return "reclaimed"
    if reply.held_ms >= grant_ms:
        return "full"
    return "partial" if reply.held_ms > 0 else "denied"
