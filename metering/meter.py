"""Meters connected time per call and flushes it to the store in batches.

Each process holds one :class:`Meter`. A call's session counts milliseconds on
the monotonic clock from stream start; once per flush interval a single
pipeline reports every live call's cumulative total. At hang-up the session is
settled at once with its exact duration. Reports are cumulative, so a report
that is retried after an error or lost response never counts twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as redis

from metering.ledger import Ledger
from metering.metrics import Metrics
from tenancy.logs import metering_logger
from tenancy.workspaces import now_ms


@dataclass(slots=True, eq=False)
class CallSession:
    """The meter of one connected call, owned by whoever carries its audio."""

    workspace_id: str
    call_sid: str
    agent_id: str
    number: str
    started_ns: int
    ended_ns: int | None = None
    end_reason: str | None = None
    reported_ms: int = 0

    def metered_ms(self, now_ns: int) -> int:
        """Connected milliseconds up to ``now_ns``, or in total once ended."""
        until = self.ended_ns if self.ended_ns is not None else now_ns
        return (until - self.started_ns) // 1_000_000


_CLOSED_ELSEWHERE = -2


class Meter:
    """Owns the live sessions of this process and the task that flushes them."""

    def __init__(
        self,
        ledger: Ledger,
        metrics: Metrics,
        interval_ms: int,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        """``clock`` returns monotonic nanoseconds; tests may pass their own."""
        self._ledger = ledger
        self._clock = clock
        self._metrics = metrics
        self._interval_secs = interval_ms / 1000
        self._sessions: dict[str, CallSession] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()

    def metered_ms(self, session: CallSession) -> int:
        """The session's connected milliseconds by this meter's clock."""
        return session.metered_ms(self._clock())

    @property
    def active(self) -> int:
        """Calls being metered in this process."""
        return sum(1 for s in self._sessions.values() if s.ended_ns is None)

    def start(self) -> None:
        """Start the periodic flush."""
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._run(), name="meter-flush")

    async def close(self) -> None:
        """Stop the periodic flush, then report what is still pending."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        await self.flush()

    async def begin(
        self,
        workspace_id: str,
        call_sid: str,
        *,
        agent_id: str,
        number: str,
        stream_sid: str = "",
    ) -> CallSession | None:
        """Start metering a call that just connected (media or SIP leg).

        Returns ``None`` if the call had already started, here or in another
        process: a repeated start must not meter the same call twice.
        """
        session = CallSession(
            workspace_id=workspace_id,
            call_sid=call_sid,
            agent_id=agent_id,
            number=number,
            started_ns=self._clock(),
        )
        started = await self._ledger.start_call(
            workspace_id,
            call_sid,
            agent_id=agent_id,
            number=number,
            stream_sid=stream_sid,
            started_at_ms=now_ms(),
        )
        if not started:
            return None
        self._sessions[call_sid] = session
        self._metrics.calls_started.labels(workspace_id).inc()
        self._metrics.calls_active.labels(workspace_id).inc()
        return session

    def session(self, call_sid: str) -> CallSession | None:
        """The live session of ``call_sid`` in this process, if it has one."""
        return self._sessions.get(call_sid)

    async def end(self, session: CallSession, reason: str) -> None:
        """Stop the clock and settle the call's exact duration in the store.

        If the store cannot be reached, the session stays queued and the
        periodic flush settles it later; nothing is lost while this process
        lives.
        """
        if session.ended_ns is not None:
            return
        session.ended_ns = self._clock()
        session.end_reason = reason
        self._metrics.calls_active.labels(session.workspace_id).dec()
        self._metrics.calls_ended.labels(session.workspace_id, reason).inc()
        await self.flush([session])

    async def end_call(self, workspace_id: str, call_sid: str, reason: str) -> None:
        """End a call whose end was reported to this process, wherever it began.

        A SIP call's callbacks may reach any process. If this one holds the
        session it ends it; otherwise it settles the record from its start
        time on the server clock, and the process holding the session drops it
        at its next flush.
        """
        session = self._sessions.get(call_sid)
        if session is not None:
            await self.end(session, reason)
            return
        await self._ledger.settle_from_start(
            workspace_id, call_sid, ended_at_ms=now_ms(), end_reason=reason
        )
        self._metrics.calls_ended.labels(workspace_id, reason).inc()

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
            await self.flush()

    async def _write(self, batch: list[CallSession]) -> None:
        now_ns = self._clock()
        at_ms = now_ms()
        queued: list[tuple[CallSession, int, bool]] = []
        async with self._ledger.pipeline() as pipe:
            for session in batch:
                total = session.metered_ms(now_ns)
                # Snapshot whether this report carries the end: the call may
                # end while the write is in flight, and only a write that
                # carried the end may retire the session.
                finished = session.end_reason is not None
                if total <= session.reported_ms and not finished:
                    continue
                await self._ledger.queue_meter(
                    pipe,
                    session.workspace_id,
                    session.call_sid,
                    metered_ms=total,
                    agent_id=session.agent_id,
                    number=session.number,
                    at_ms=at_ms,
                    end_reason=session.end_reason,
                )
                queued.append((session, total, finished))
            if not queued:
                return
            try:
                results = await pipe.execute(raise_on_error=False)
            except redis.RedisError:
                self._metrics.meter_flushes.labels("error").inc()
                metering_logger.warning(
                    "could not flush %d call meters; will retry",
                    len(queued),
                    exc_info=True,
                )
                return
        self._metrics.meter_flushes.labels("ok").inc()
        for (session, total, finished), result in zip(queued, results, strict=True):
            self._apply(session, total, finished, result)

    def _apply(
        self, session: CallSession, total: int, finished: bool, result: object
    ) -> None:
        if isinstance(result, Exception):
            metering_logger.warning(
                "meter report for call %s failed: %s", session.call_sid, result
            )
            return
        if result == _CLOSED_ELSEWHERE:
            # Another process settled this call (a SIP call's completed
            # callback can land anywhere); this session has nothing to add.
            self._forget(session)
            return
        if isinstance(result, int) and result > 0:
            self._metrics.call_seconds.labels(session.workspace_id).inc(result / 1000)
        session.reported_ms = max(session.reported_ms, total)
        if finished:
            self._sessions.pop(session.call_sid, None)

    def _forget(self, session: CallSession) -> None:
        if self._sessions.pop(session.call_sid, None) is not None and (
            session.ended_ns is None
        ):
            session.ended_ns = self._clock()
            self._metrics.calls_active.labels(session.workspace_id).dec()
