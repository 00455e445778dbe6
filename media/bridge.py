"""Carries one call's audio between Twilio's stream and the agent platform.

Two pumps run side by side: caller to agent and agent to caller. The first to
finish decides how the call ended; the bridge then cancels the other pump,
hangs up whichever side is still there, and reports one end reason.
"""

from __future__ import annotations

import asyncio
from enum import StrEnum

from aiohttp import WSMsgType, web

from media import frames
from media.upstream import AgentAudio, UpstreamCall
from metering.metrics import Metrics
from tenancy.errors import UpstreamError
from tenancy.logs import CallLog


class EndReason(StrEnum):
    """Why a call ended; exactly one is recorded per call."""

    CALLER_HUNG_UP = "caller_hung_up"
    AGENT_HUNG_UP = "agent_hung_up"
    STREAM_LOST = "stream_lost"
    PROTOCOL_ERROR = "protocol_error"
    UPSTREAM_FAILED = "upstream_failed"
    SHUTDOWN = "shutdown"


_AGENT_SIDE_ENDINGS = (EndReason.AGENT_HUNG_UP, EndReason.UPSTREAM_FAILED)


class Bridge:
    """Owns the two pump tasks of one call for as long as it runs."""

    def __init__(
        self,
        twilio: web.WebSocketResponse,
        stream: frames.StreamState,
        upstream: UpstreamCall,
        metrics: Metrics,
        log: CallLog,
    ) -> None:
        assert stream.start is not None
        self._twilio = twilio
        self._stream = stream
        self._stream_sid = stream.start.stream_sid
        self._upstream = upstream
        self._metrics = metrics
        self._log = log
        self._inbound = metrics.frames_relayed.labels("caller_to_agent")
        self._outbound = metrics.frames_relayed.labels("agent_to_caller")

    async def run(self) -> EndReason:
        """Relay audio until one side ends; return why the call ended.

        Whatever happens, including cancellation at shutdown, both pumps are
        finished and both sides hung up before this returns.
        """
        caller = asyncio.create_task(self._from_caller(), name="caller-to-agent")
        agent = asyncio.create_task(self._from_agent(), name="agent-to-caller")
        reason: EndReason | None = None
        try:
            done, _ = await asyncio.wait(
                {caller, agent}, return_when=asyncio.FIRST_COMPLETED
            )
            # If both finished in the same loop turn, the caller's account
            # wins: the caller hanging up is what Twilio will report too.
            reason = (caller if caller in done else agent).result()
            return reason
        finally:
            await self._finish(caller, agent)
            await self._hang_up(agent_ended=reason in _AGENT_SIDE_ENDINGS)

    async def _hang_up(self, agent_ended: bool) -> None:
        """Hang up both sides, the one still waiting on the other first."""
        if agent_ended:
            # Nothing follows <Connect> in our TwiML, so Twilio ends the call
            # once we close the stream (protocols.md 2.6).
            await self._twilio.close(code=frames.CLOSE_NORMAL)
            await self._upstream.hang_up()
        else:
            await self._upstream.hang_up()
            await self._twilio.close(code=frames.CLOSE_NORMAL)

    async def _finish(self, *tasks: asyncio.Task[EndReason]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _from_caller(self) -> EndReason:
        """Twilio stream to agent: audio frames, DTMF and the caller's stop."""
        async for message in self._twilio:
            if message.type is WSMsgType.TEXT:
                try:
                    event = self._stream.receive(message.data)
                except frames.StreamFrameError as exc:
                    return await self._reject(str(exc), exc.close_code)
                if isinstance(event, frames.Media):
                    try:
                        await self._upstream.send_audio(event.payload)
                    except UpstreamError as exc:
                        self._log.warning("agent platform dropped: %s", exc)
                        return EndReason.UPSTREAM_FAILED
                    self._inbound.inc()
                elif isinstance(event, frames.Stop):
                    return EndReason.CALLER_HUNG_UP
                elif isinstance(event, frames.Dtmf):
                    self._log.debug("caller pressed a key")
            elif message.type is WSMsgType.BINARY:
                return await self._reject(
                    "binary frame on a text-only stream", frames.CLOSE_UNSUPPORTED_DATA
                )
            elif message.type is WSMsgType.ERROR:
                self._log.warning("twilio stream error: %s", self._twilio.exception())
                return EndReason.STREAM_LOST
        return EndReason.STREAM_LOST

    async def _from_agent(self) -> EndReason:
        """Agent to Twilio stream: audio as ``media`` messages, in order."""
        try:
            async for event in self._upstream.events():
                if not isinstance(event, AgentAudio):
                    continue
                if self._twilio.closed:
                    return EndReason.STREAM_LOST
                try:
                    await self._twilio.send_str(
                        frames.media_frame(self._stream_sid, event.payload)
                    )
                except ConnectionError:
                    return EndReason.STREAM_LOST
                self._outbound.inc()
        except UpstreamError as exc:
            self._log.warning("agent platform dropped: %s", exc)
            return EndReason.UPSTREAM_FAILED
        return EndReason.AGENT_HUNG_UP

    async def _reject(self, problem: str, close_code: int) -> EndReason:
        self._metrics.frames_malformed.labels("twilio").inc()
        self._log.warning("closing stream on malformed frame: %s", problem)
        await self._twilio.close(code=close_code, message=problem[:120].encode())
        return EndReason.PROTOCOL_ERROR
