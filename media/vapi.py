"""Vapi over its WebSocket transport, with µ-law 8 kHz passed through untouched.

``POST {api}/call`` with ``transport.provider = vapi.websocket`` creates the
call and returns ``transport.websocketCallUrl``; binary frames on that socket
carry raw audio both ways and text frames carry JSON events. Vapi documents no
hang-up message from its side, so the socket closing is the agent hanging up.
See protocols.md section 5.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from media.codecs import AgentPcm16ToCaller, CallerToAgentPcm16
from media.platform_http import post_json
from media.upstream import (
    AgentAudio,
    AgentEvent,
    AgentInterrupted,
    TransferRequested,
    UpstreamEvent,
)
from tenancy.errors import UpstreamError
from tenancy.keyspace import E164
from tenancy.logs import media_logger

PROVIDER = "vapi"
# Caller audio is forwarded as Twilio delivers it: no transcoding.
MULAW_8K = {"format": "mulaw", "container": "raw", "sampleRate": 8000}
# For assistants that want linear audio; converted at this adapter's edge.
PCM16_16K = {"format": "pcm_s16le", "container": "raw", "sampleRate": 16000}
_END_CALL = orjson.dumps({"type": "end-call"}).decode("utf-8")
_MAX_MESSAGE_BYTES = 1 << 20


class VapiCall:
    """One Vapi call's transport socket; owned by the bridge that opened it."""

    provider = PROVIDER

    def __init__(
        self,
        call_id: str,
        socket: aiohttp.ClientWebSocketResponse,
        pcm16: bool = False,
    ) -> None:
        """With ``pcm16`` the socket carries PCM16 16 kHz, the bridge µ-law 8 kHz."""
        self.call_id = call_id
        self._socket = socket
        self._to_agent = CallerToAgentPcm16() if pcm16 else None
        self._to_caller = AgentPcm16ToCaller() if pcm16 else None
        self._hung_up = False
        self.malformed_messages = 0

    async def send_audio(self, payload: bytes) -> None:
        """Forward caller audio; dropped silently once the socket has closed."""
        if self._socket.closed:
            return
        if self._to_agent is not None:
            payload = self._to_agent.process(payload)
        try:
            await self._socket.send_bytes(payload)
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise UpstreamError("vapi transport lost while sending") from exc

    async def events(self) -> AsyncIterator[UpstreamEvent]:
        """Agent audio and JSON events until Vapi closes the socket.

        A normal close (1000) is the agent hanging up; any other end of the
        socket raises :class:`UpstreamError`.
        """
        async for message in self._socket:
            if message.type is aiohttp.WSMsgType.BINARY:
                audio = message.data
                if self._to_caller is not None:
                    audio = self._to_caller.process(audio)
                if audio:
                    yield AgentAudio(audio)
            elif message.type is aiohttp.WSMsgType.TEXT:
                event = self._decode(message.data)
                if event is not None:
                    yield event
            elif message.type is aiohttp.WSMsgType.ERROR:
                raise UpstreamError(f"vapi transport error: {self._socket.exception()}")
        if self._socket.close_code not in (1000, None) and not self._hung_up:
            raise UpstreamError(f"vapi transport closed with {self._socket.close_code}")

    async def send_dtmf(self, digit: str) -> None:
        """Pass a keypad digit to the assistant as a user message.

        Vapi's websocket transport has no DTMF message; of the messages a
        client may send (add-message, control, say, end-call, transfer),
        add-message is the one that reaches the model as caller input.
        """
        message = {
            "type": "add-message",
            "message": {"role": "user", "content": f"[keypad] {digit}"},
            "triggerResponseEnabled": True,
        }
        await self._send_text(orjson.dumps(message).decode("utf-8"))

    async def _send_text(self, text: str) -> None:
        if self._socket.closed:
            return
        try:
            await self._socket.send_str(text)
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise UpstreamError("vapi transport lost while sending") from exc

    async def hang_up(self) -> None:
        """Tell Vapi to end the call, then close the transport."""
        if self._socket.closed:
            return
        self._hung_up = True
        # Vapi's docs show both "end-call" and "hangup"; "end-call" followed
        # by closing the socket is what its "Ending the call" section uses.
        try:
            await self._socket.send_str(_END_CALL)
        except (ConnectionError, aiohttp.ClientError):
            media_logger.debug("vapi socket for %s went away first", self.call_id)
        await self._socket.close()

    def _decode(self, data: str) -> UpstreamEvent | None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.malformed_messages += 1
            return None
        if not isinstance(message, dict):
            self.malformed_messages += 1
            return None
        kind = message.get("type")
        if kind == "user-interrupted":
            return AgentInterrupted()
        if kind == "transfer-update":
            number = _transfer_number(message)
            if number is not None:
                return TransferRequested(number)
        return AgentEvent(message)


class VapiClient:
    """Creates Vapi calls over its REST API and opens their transports."""

    def __init__(
        self, session: aiohttp.ClientSession, api_url: str, timeout_secs: float
    ) -> None:
        self._session = session
        self._api_url = api_url
        self._timeout = aiohttp.ClientTimeout(total=timeout_secs)

    async def connect(
        self,
        *,
        api_key: str,
        assistant_id: str,
        metadata: dict[str, str],
        pcm16: bool = False,
    ) -> VapiCall:
        """Create a websocket-transport call for ``assistant_id`` and connect it.

        With ``pcm16`` Vapi is asked for PCM16 at 16 kHz instead of µ-law.

        Raises :class:`UpstreamError` if Vapi cannot be reached, refuses the
        call, answers with something unexpected, or the transport won't open.
        """
        body = {
            "assistantId": assistant_id,
            "transport": {
                "provider": "vapi.websocket",
                "audioFormat": PCM16_16K if pcm16 else MULAW_8K,
            },
            "metadata": metadata,
        }
        created = await post_json(
            self._session,
            f"{self._api_url}/call",
            api_key=api_key,
            body=body,
            limits=self._timeout,
            platform=PROVIDER,
        )
        call_id, url = _transport(created)
        try:
            socket = await self._session.ws_connect(
                url,
                timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                max_msg_size=_MAX_MESSAGE_BYTES,
                autoping=True,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(f"vapi transport did not open: {exc}") from exc
        return VapiCall(call_id, socket, pcm16=pcm16)


def _transfer_number(message: dict[str, Any]) -> str | None:
    """The E.164 number of a ``transfer-update`` to a phone number, if any.

    Transfers to another assistant stay inside Vapi; only a number needs the
    telephony side, which over the websocket transport is Callgate's job.
    """
    destination = message.get("destination")
    if not isinstance(destination, dict) or destination.get("type") != "number":
        return None
    number = destination.get("number")
    if isinstance(number, str) and E164.fullmatch(number):
        return number
    return None


def _transport(created: dict[str, Any]) -> tuple[str, str]:
    """The call id and transport URL from Vapi's create-call response."""
    call_id = created.get("id")
    transport = created.get("transport")
    url = transport.get("websocketCallUrl") if isinstance(transport, dict) else None
    if not isinstance(call_id, str) or not isinstance(url, str):
        raise UpstreamError("vapi response lacks id or transport.websocketCallUrl")
    if urlsplit(url).scheme not in {"ws", "wss"}:
        raise UpstreamError("vapi transport URL is not a WebSocket URL")
    return call_id, url
