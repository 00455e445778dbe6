"""Reconciliation: every settled call ends up with Twilio's own duration.

Twilio's status callback normally brings ``CallDuration``. A call that has
none some minutes after it settled is looked up through the REST API. Either
way the drift between what Twilio reports and what Callgate metered is
observed per workspace, so an operator can see when the two disagree.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as redis

from metering.ledger import CallNotFoundError, CallRecord, Ledger
from metering.metrics import Metrics
from tenancy import keyspace
from tenancy.logs import metering_logger
from tenancy.replies import Store, texts
from tenancy.twilio_api import TwilioApi, TwilioApiError
from tenancy.workspaces import now_ms

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
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._twilio = twilio
        self._metrics = metrics
        self._after_ms = after_secs * 1000
        self._interval_secs = min(60.0, after_secs / 2)
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

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_secs)
            try:
                await self.reconcile()
            except redis.RedisError:
                metering_logger.warning(
                    "reconciliation failed; will retry", exc_info=True
                )
