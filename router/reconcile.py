"""Reconciliation: every settled call ends up with Twilio's own duration.

Twilio's status callback normally brings ``CallDuration``. A call that has
none some minutes after it settled is looked up through the REST API. Either
way the drift between what Twilio reports and what Callgate metered is
observed per workspace, so an operator can see when the two disagree.

A Retell call is settled by one of three reports of its SIP leg's end, none
of which Twilio retries. So that a call whose three reports were all lost is
not metered for ever, the process metering it asks Twilio about its leg every
``sip_check_secs`` and settles it once Twilio says the leg is over.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as redis

from metering.ledger import CallNotFoundError, CallRecord, Ledger
from metering.meter import Meter
from metering.metrics import Metrics
from router.settlement import TERMINAL, settle_sip_call, sip_leg
from tenancy import keyspace
from tenancy.logs import metering_logger
from tenancy.replies import Store, texts
from tenancy.twilio_api import TwilioApi, TwilioApiError
from tenancy.workspaces import Workspaces, now_ms

# Above any real callback's SequenceNumber: a REST lookup is final.
_LOOKED_UP = 1 << 30


def observe(
    metrics: Metrics, record: CallRecord, duration_secs: int, source: str
) -> None:
    """Count a reconciled call and how far its two durations are apart.

    Twilio counts from answer to hang-up, Callgate from stream start, so a
    second or two is normal; more points at lost time on one side.
    """
    metrics.reconciled.labels(record.workspace_id, source).inc()
    drift_secs = abs(duration_secs - record.metered_ms / 1000)
    metrics.reconciliation_drift.labels(record.workspace_id).observe(drift_secs)


class Reconciler:
    """Asks Twilio about settled calls its callbacks never reported."""

    def __init__(
        self,
        store: Store,
        ledger: Ledger,
        twilio: TwilioApi,
        metrics: Metrics,
        after_secs: int,
        meter: Meter | None = None,
        workspaces: Workspaces | None = None,
        sip_check_secs: int = 60,
    ) -> None:
        """With a ``meter`` and ``workspaces``, live Retell calls are watched too."""
        self._store = store
        self._ledger = ledger
        self._twilio = twilio
        self._metrics = metrics
        self._meter = meter
        self._workspaces = workspaces
        self._after_ms = after_secs * 1000
        self._sip_check_ms = sip_check_secs * 1000
        self._sip_checked: dict[str, int] = {}
        self._interval_secs = min(60.0, after_secs / 2, sip_check_secs / 2)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Reconcile periodically until closed."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="reconciler")

    async def close(self) -> None:
        """Stop reconciling."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def reconcile(self) -> int:
        """Look every overdue call up now; return how many were reconciled."""
        done = 0
        cutoff_ms = now_ms() - self._after_ms
        for workspace_id in texts(await self._store.zrange(keyspace.WORKSPACES, 0, -1)):
            for call_sid in await self._ledger.unreconciled(workspace_id, cutoff_ms):
                if await self._look_up(workspace_id, call_sid):
                    done += 1
        return done

    async def _look_up(self, workspace_id: str, call_sid: str) -> bool:
        try:
            record = await self._ledger.get_call(workspace_id, call_sid)
        except CallNotFoundError:
            await self._ledger.forget_unreconciled(workspace_id, call_sid)
            return False
        if record.account_sid is None:
            await self._ledger.forget_unreconciled(workspace_id, call_sid)
            return False
        try:
            found = await self._twilio.fetch_call(record.account_sid, call_sid)
        except TwilioApiError as exc:
            metering_logger.warning("cannot look call %s up: %s", call_sid, exc)
            return False
        if found is None:
            # Twilio does not know the call; asking again will not help.
            await self._ledger.forget_unreconciled(workspace_id, call_sid)
            return False
        status, duration_secs = found
        if duration_secs is None:
            return False  # not over on Twilio's side yet
        await self._ledger.record_twilio_status(
            workspace_id,
            call_sid,
            status=status,
            call_duration_secs=duration_secs,
            sequence=_LOOKED_UP,
        )
        observe(self._metrics, record, duration_secs, "api")
        return True

    async def check_sip_calls(self) -> int:
        """Ask Twilio about this process's Retell calls not asked about lately.

        Return how many were found over and settled. A leg Twilio reports over
        settles its call with the leg's own duration as its length.
        """
        meter, workspaces = self._meter, self._workspaces
        if meter is None or workspaces is None:
            return 0
        live = meter.live("retell")
        # How far into each call it was last asked about, by the meter's clock.
        self._sip_checked = {
            s.call_sid: self._sip_checked.get(s.call_sid, 0) for s in live
        }
        settled = 0
        for session in live:
            into_ms = meter.metered_ms(session)
            if into_ms - self._sip_checked[session.call_sid] < self._sip_check_ms:
                continue
            self._sip_checked[session.call_sid] = into_ms
            record = await self._sip_call_over(session.workspace_id, session.call_sid)
            if record is not None:
                call, status, metered_ms = record
                await settle_sip_call(
                    meter, workspaces, call, status, "api", metered_ms=metered_ms
                )
                settled += 1
        return settled

    async def _sip_call_over(
        self, workspace_id: str, call_sid: str
    ) -> tuple[CallRecord, str, int | None] | None:
        """The open call, Twilio's final status of its leg and the leg's length
        in ms, if Twilio says the leg is over; None while it is not."""
        try:
            record = await self._ledger.get_call(workspace_id, call_sid)
        except CallNotFoundError:
            return None
        if record.ended_at_ms is not None:
            return None
        leg = await sip_leg(self._twilio, record)
        if leg is None or leg[0] not in TERMINAL:
            return None
        return record, *leg

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_secs)
            try:
                await self.check_sip_calls()
                await self.reconcile()
            except redis.RedisError:
                metering_logger.warning(
                    "reconciliation failed; will retry", exc_info=True
                )
