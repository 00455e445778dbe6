"""Carries one call's audio between Twilio's stream and the agent platform.

Four tasks per call, two per direction: a reader fills a bounded backlog and
a writer empties it, so a slow side drops its stalest audio instead of stalling
the other. The first reader to finish decides how the call ended. Barge-in
clears the agent's backlog and tells Twilio to ``clear`` at once; marks every
half second tell how much agent audio the caller actually heard, and the
agent's last words are allowed to play out before its hang-up closes the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from aiohttp import WSMsgType, web
from prometheus_client import Counter

from media import frames
from media.backlog import Backlog
from media.recording import Recorder
from media.upstream import (
    AgentAudio,
    AgentInterrupted,
    TransferRequested,
    UpstreamCall,
)
from metering.metrics import Metrics
from tenancy.errors import UpstreamError
from tenancy.logs import CallLog

MULAW_BYTES_PER_SEC = 8000
# About one second of audio per direction; past that the oldest frames go.
BACKLOG_LIMIT_BYTES = MULAW_BYTES_PER_SEC
MARK_EVERY_BYTES = MULAW_BYTES_PER_SEC // 2
# Undecodable frames a call survives before its stream is closed.
MAX_MALFORMED_FRAMES = 10
# How long the agent's last words may take to play after it hangs up.
GOODBYE_LIMIT_SECS = 15.0


class EndReason(StrEnum):
    """Why a call ended; exactly one is recorded per call."""

    CALLER_HUNG_UP = "caller_hung_up"
    # A SIP-routed call ended normally; Twilio does not say which side hung up.
    COMPLETED = "completed"
    AGENT_HUNG_UP = "agent_hung_up"
    TRANSFERRED = "transferred"
    STREAM_LOST = "stream_lost"
    PROTOCOL_ERROR = "protocol_error"
    UPSTREAM_FAILED = "upstream_failed"
    SHUTDOWN = "shutdown"
    # The workspace's budget ran out mid-call.
    BUDGET = "budget"
    # The process carrying the call vanished; a sweeper ended it.
    OWNER_LOST = "owner_lost"
    # The store was unreachable and the workspace's policy ended the call.
    STORE_OUTAGE = "store_outage"


class CallControl(Protocol):
    """What the bridge may ask of the telephony side beyond the stream."""

    async def transfer(self, number: str) -> bool:
        """Move the live call to ``number``; True once Twilio accepted it."""

    async def fall_back(self) -> bool:
        """Send the caller to the workspace's fallback; True once accepted."""

    async def hang_up(self) -> bool:
        """End the call on Twilio's side; True if it was still up."""

    async def cut_off(self) -> bool:
        """Send the call to its plan's goodbye; True once Twilio accepted it."""


@dataclass(frozen=True, slots=True)
class BridgeResult:
    """How a bridged call went, for its record and its metrics."""

    reason: EndReason
    transferred_to: str | None
    agent_audio_ms: int
    agent_played_ms: int
    interruptions: int
    dropped_frames: int


class Bridge:
    """Owns the four tasks of one call for as long as it runs."""

    def __init__(
        self,
        twilio: web.WebSocketResponse,
        stream: frames.StreamState,
        upstream: UpstreamCall,
        control: CallControl,
        transfer_numbers: frozenset[str],
        metrics: Metrics,
        log: CallLog,
        recorder: Recorder | None = None,
    ) -> None:
        """``recorder``, if given, gets both sides' audio as the caller heard it."""
        assert stream.start is not None
        self._twilio = twilio
        self._stream = stream
        self._stream_sid = stream.start.stream_sid
        self._upstream = upstream
        self._control = control
        self._transfer_numbers = transfer_numbers
        self._metrics = metrics
        self._log = log
        self._recorder = recorder
        self._to_agent = Backlog(BACKLOG_LIMIT_BYTES)
        self._to_caller = Backlog(BACKLOG_LIMIT_BYTES)
        self._inbound = metrics.frames_relayed.labels("caller_to_agent")
        self._outbound = metrics.frames_relayed.labels("agent_to_caller")
        self._latency_in = metrics.relay_latency.labels("caller_to_agent")
        self._latency_out = metrics.relay_latency.labels("agent_to_caller")
        self._dropped_in = metrics.frames_dropped.labels("caller_to_agent")
        self._dropped_out = metrics.frames_dropped.labels("agent_to_caller")
        # Marks: name -> agent audio bytes sent before it.
        self._marks: dict[str, int] = {}
        self._mark_serial = 0
        self._bytes_at_last_mark = 0
        self._sent_bytes = 0
        self._played_bytes = 0
        self._stale_marks_below = 0
        self._interruptions = 0
        self._malformed_frames = 0
        self._transferring: str | None = None
        self._cut_off: EndReason | None = None
        self._goodbye_mark: str | None = None
        self._goodbye_played = asyncio.Event()

    async def run(self) -> BridgeResult:
        """Relay audio until one side ends; then hang up both sides.

        Whatever happens, including cancellation at shutdown, every task is
        finished and both sides hung up before this returns.
        """
        caller = asyncio.create_task(self._read_caller(), name="read-caller")
        agent = asyncio.create_task(self._read_agent(), name="read-agent")
        to_agent = asyncio.create_task(self._write_agent(), name="write-agent")
        to_caller = asyncio.create_task(self._write_caller(), name="write-caller")
        tasks = (caller, agent, to_agent, to_caller)
        reason: EndReason | None = None
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            # If several finished in the same loop turn, the caller's account
            # wins: the caller hanging up is what Twilio will report too.
            first = next(task for task in tasks if task in done)
            reason = first.result()
            if reason is EndReason.AGENT_HUNG_UP:
                reason = await self._let_goodbye_play(caller, to_caller)
            return self._result(reason)
        finally:
            await _cancel(*tasks)
            await self._hang_up(reason)

    def _result(self, reason: EndReason) -> BridgeResult:
        return BridgeResult(
            reason=reason,
            transferred_to=self._transferring
            if reason is EndReason.TRANSFERRED
            else None,
            agent_audio_ms=self._sent_bytes * 1000 // MULAW_BYTES_PER_SEC,
            agent_played_ms=self._played_bytes * 1000 // MULAW_BYTES_PER_SEC,
            interruptions=self._interruptions,
            dropped_frames=self._to_agent.dropped_frames
            + self._to_caller.dropped_frames,
        )

    async def _let_goodbye_play(
        self, caller: asyncio.Task[EndReason], to_caller: asyncio.Task[EndReason]
    ) -> EndReason:
        """Send what the agent said last and wait until Twilio has played it."""
        self._to_caller.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(GOODBYE_LIMIT_SECS):
                await asyncio.wait(
                    {to_caller, caller}, return_when=asyncio.FIRST_COMPLETED
                )
                if caller.done() or self._twilio.closed or not self._sent_bytes:
                    return EndReason.AGENT_HUNG_UP
                self._goodbye_mark = await self._send_mark()
                if self._goodbye_mark is None:
                    return EndReason.AGENT_HUNG_UP
                played = asyncio.create_task(self._goodbye_played.wait())
                try:
                    await asyncio.wait(
                        {played, caller}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    await _cancel(played)
        return EndReason.AGENT_HUNG_UP

    async def _hang_up(self, reason: EndReason | None) -> None:
        """Hang up both sides, the one still waiting on the other first."""
        if reason is EndReason.UPSTREAM_FAILED:
            # The redirect must reach Twilio before the stream closes, or the
            # call would end on the empty TwiML after </Connect>.
            await self._control.fall_back()
        elif reason is EndReason.STREAM_LOST:
            # The socket is gone but the phone call may not be.
            await self._control.hang_up()
        if reason in _AGENT_SIDE_ENDINGS:
            # Nothing follows <Connect> in our TwiML, so Twilio ends the call
            # once we close the stream (protocols.md 2.6).
            await self._twilio.close(code=frames.CLOSE_NORMAL)
            await self._upstream.hang_up()
        else:
            await self._upstream.hang_up()
            await self._twilio.close(code=frames.CLOSE_NORMAL)

    async def _read_caller(self) -> EndReason:
        """Twilio stream: caller audio, keypad digits, mark echoes, the stop."""
        async for message in self._twilio:
            if message.type is WSMsgType.TEXT:
                try:
                    event = self._stream.receive(message.data)
                except frames.StreamFrameError as exc:
                    if await self._malformed(str(exc), exc.close_code):
                        return EndReason.PROTOCOL_ERROR
                    continue
                if isinstance(event, frames.Media):
                    if self._recorder is not None:
                        self._recorder.caller(event.payload)
                    await self._queue(self._to_agent, event.payload, self._dropped_in)
                elif isinstance(event, frames.Mark):
                    self._on_mark(event.name)
                elif isinstance(event, frames.Dtmf):
                    try:
                        await self._upstream.send_dtmf(event.digit)
                    except UpstreamError as exc:
                        self._log.warning("agent platform dropped: %s", exc)
                        return EndReason.UPSTREAM_FAILED
                elif isinstance(event, frames.Stop):
                    # A redirect (transfer, budget) stops the stream too, and
                    # its stop can overtake the REST API's answer.
                    if self._cut_off is not None:
                        return self._cut_off
                    if self._transferring is not None:
                        return EndReason.TRANSFERRED
                    return EndReason.CALLER_HUNG_UP
            elif message.type is WSMsgType.BINARY and await self._malformed(
                "binary frame on a text-only stream", frames.CLOSE_UNSUPPORTED_DATA
            ):
                return EndReason.PROTOCOL_ERROR
            elif message.type is WSMsgType.ERROR:
                self._log.warning("twilio stream error: %s", self._twilio.exception())
                return EndReason.STREAM_LOST
        return self._cut_off or EndReason.STREAM_LOST

    async def _write_agent(self) -> EndReason:
        """Caller audio to the agent, oldest first, as fast as it will take it."""
        while True:
            _, batch = await self._to_agent.take()
            for payload in batch:
                try:
                    await self._upstream.send_audio(payload)
                except UpstreamError as exc:
                    self._log.warning("agent platform dropped: %s", exc)
                    return EndReason.UPSTREAM_FAILED
            self._inbound.inc(len(batch))
            if batch:
                self._latency_in.observe(time.monotonic() - self._to_agent.taken_since)

    async def _read_agent(self) -> EndReason:
        """The agent platform: its audio, barge-in, transfers, its hang-up."""
        try:
            async for event in self._upstream.events():
                if isinstance(event, AgentAudio):
                    await self._queue(self._to_caller, event.payload, self._dropped_out)
                elif isinstance(event, AgentInterrupted):
                    await self._barge_in()
                elif isinstance(event, TransferRequested) and await self._transfer(
                    event.number
                ):
                    return EndReason.TRANSFERRED
        except UpstreamError as exc:
            self._log.warning("agent platform dropped: %s", exc)
            return EndReason.UPSTREAM_FAILED
        return EndReason.AGENT_HUNG_UP

    async def _queue(self, backlog: Backlog, payload: bytes, dropped: Counter) -> None:
        """Queue ``payload``; count what a backlog full of stale audio drops."""
        lost = backlog.put(payload)
        if lost:
            dropped.inc(lost)
        # A reader with a burst ready (an agent speaking faster than real
        # time) would fill the backlog before its writer runs at all; yield
        # once so only a writer that is truly stuck ever loses audio.
        if backlog.size_bytes > backlog.limit_bytes // 2:
            await asyncio.sleep(0)

    async def _write_caller(self) -> EndReason:
        """Agent audio to Twilio as ``media``, with a ``mark`` every half second."""
        while True:
            generation, batch = await self._to_caller.take()
            if not batch:
                return EndReason.AGENT_HUNG_UP  # closed and drained
            for payload in batch:
                # A barge-in between frames makes the rest of this batch stale.
                if self._to_caller.generation != generation or self._twilio.closed:
                    break
                try:
                    await self._twilio.send_str(
                        frames.media_frame(self._stream_sid, payload)
                    )
                except ConnectionError:
                    return EndReason.STREAM_LOST
                self._outbound.inc()
                self._sent_bytes += len(payload)
                if self._recorder is not None:
                    self._recorder.agent(payload)
            self._latency_out.observe(time.monotonic() - self._to_caller.taken_since)
            if self._sent_bytes - self._bytes_at_last_mark >= MARK_EVERY_BYTES:
                await self._send_mark()

    async def cut_off(self, reason: str) -> None:
        """End the call for ``reason`` (the budget ran out, or the store is
        down and the policy says terminate): send it to the plan's goodbye.

        Twilio ends the stream once it takes the redirect; if it will not,
        closing the stream ends the call all the same.
        """
        if self._cut_off is not None:
            return
        self._cut_off = EndReason(reason)
        self._log.info("ending the call: %s", reason)
        if not await self._control.cut_off():
            await self._twilio.close(code=frames.CLOSE_NORMAL)

    async def _send_mark(self) -> str | None:
        """Mark the current end of sent agent audio; None if the stream is gone."""
        self._mark_serial += 1
        name = f"cg-{self._mark_serial}"
        self._marks[name] = self._sent_bytes
        self._bytes_at_last_mark = self._sent_bytes
        try:
            await self._twilio.send_str(frames.mark_frame(self._stream_sid, name))
        except ConnectionError:
            return None
        return name

    def _on_mark(self, name: str) -> None:
        """Twilio played everything up to the mark ``name`` (unless cleared)."""
        position = self._marks.pop(name, None)
        if position is None:
            return
        serial = int(name.removeprefix("cg-"))
        # After a clear Twilio echoes every pending mark at once; those marks
        # say the audio was flushed, not played.
        if serial > self._stale_marks_below:
            self._played_bytes = max(self._played_bytes, position)
        if name == self._goodbye_mark:
            self._goodbye_played.set()

    async def _barge_in(self) -> None:
        """The caller talked over the agent: drop its queued audio, clear Twilio."""
        self._to_caller.clear()
        if self._recorder is not None:
            self._recorder.clear()
        self._interruptions += 1
        self._stale_marks_below = self._mark_serial
        if not self._twilio.closed:
            with contextlib.suppress(ConnectionError):
                await self._twilio.send_str(frames.clear_frame(self._stream_sid))
        self._metrics.barge_ins.inc()

    async def _transfer(self, number: str) -> bool:
        if number not in self._transfer_numbers:
            self._metrics.transfers.labels("refused").inc()
            self._log.warning("agent asked to transfer to a number not allowed")
            return False
        self._transferring = number
        if not await self._control.transfer(number):
            self._transferring = None
            self._metrics.transfers.labels("failed").inc()
            return False
        self._metrics.transfers.labels("done").inc()
        return True

    async def _malformed(self, problem: str, close_code: int) -> bool:
        """Count a bad frame; True once the stream was closed for bad frames.

        An odd undecodable frame is skipped: the caller should not lose the
        call over it. A policy violation (a frame for another stream, a second
        start) means this may not be the stream it claims to be, so it ends
        the call at once, as does a stream that keeps sending bad frames.
        """
        self._metrics.frames_malformed.labels("twilio").inc()
        self._malformed_frames += 1
        fatal = close_code == frames.CLOSE_POLICY_VIOLATION
        if not fatal and self._malformed_frames <= MAX_MALFORMED_FRAMES:
            self._log.warning("skipped a malformed frame: %s", problem)
            return False
        self._log.warning("closing stream on malformed frames: %s", problem)
        await self._twilio.close(code=close_code, message=problem[:120].encode())
        return True


_AGENT_SIDE_ENDINGS = (EndReason.AGENT_HUNG_UP, EndReason.UPSTREAM_FAILED)


async def _cancel(*tasks: asyncio.Task[object] | asyncio.Task[EndReason]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
