"""Plays Vapi against Callgate: POST /call and the vapi.websocket audio transport."""

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from aiohttp import web
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .errors import PeerStateError, PeerTimeoutError
from .serving import serve_on_loopback
from .waiting import Changes, wait_for_event

__all__ = ["FakeVapi", "FakeVapiCall", "create_call_problems"]

logger = logging.getLogger("tests.peers")

JsonObject = dict[str, Any]
AUDIO_FORMATS: Final = frozenset({"mulaw", "pcm_s16le"})
MAX_SAMPLE_RATE_HZ: Final = 192_000
# §5.3: the docs spell the in-band hang-up both ways.
HANGUP_TYPES: Final = frozenset({"end-call", "hangup"})
_CLOSE_TIMEOUT_SECS: Final = 5.0


def create_call_problems(body: object) -> list[str]:
    """List what is wrong with a POST /call body for the websocket transport (§5.1).

    An empty list means Vapi would accept it.
    """
    if not isinstance(body, dict):
        return ["body must be a json object"]
    problems = []
    assistant_id = body.get("assistantId")
    if not isinstance(assistant_id, str) or not assistant_id:
        problems.append("assistantId must be a non-empty string")
    for field in ("phoneNumber", "phoneNumberId"):
        if field in body:
            problems.append(f"{field} is not allowed with the vapi.websocket transport")
    transport = body.get("transport")
    if not isinstance(transport, dict):
        return [*problems, "transport must be an object"]
    if transport.get("provider") != "vapi.websocket":
        problems.append("transport.provider must be vapi.websocket")
    audio_format = transport.get("audioFormat")
    if not isinstance(audio_format, dict):
        return [*problems, "transport.audioFormat must be an object"]
    if audio_format.get("format") not in AUDIO_FORMATS:
        problems.append("transport.audioFormat.format must be mulaw or pcm_s16le")
    if audio_format.get("container", "raw") != "raw":
        problems.append("transport.audioFormat.container must be raw")
    rate = audio_format.get("sampleRate")
    # bool is an int subclass, and true is no sample rate.
    if (
        not isinstance(rate, int)
        or isinstance(rate, bool)
        or not 0 < rate <= MAX_SAMPLE_RATE_HZ
    ):
        problems.append("transport.audioFormat.sampleRate must be 1..192000")
    return problems


def _error(status: int, message: str | list[str]) -> web.Response:
    # Vapi's API answers errors in the NestJS shape.
    body = {
        "message": message,
        "error": HTTPStatus(status).phrase,
        "statusCode": status,
    }
    return web.json_response(body, status=status)


class FakeVapiCall:
    """One call created through POST /call, and what its transport socket carried.

    Times ending in _at are event-loop seconds (loop.time()).
    """

    def __init__(
        self,
        call_id: str,
        api_key: str,
        request_json: JsonObject,
        websocket_call_url: str,
        echo_audio: bool,
    ) -> None:
        self.id = call_id
        self.api_key = api_key
        self.request_json = request_json
        self.websocket_call_url = websocket_call_url
        self.echo_audio = echo_audio
        self.received_audio = bytearray()
        self.received_frames = 0
        self.received_text: list[JsonObject] = []
        self.protocol_errors: list[str] = []
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.ended_by: Literal["client", "vapi"] | None = None
        self.first_connected_at: float | None = None
        self.closed_at: float | None = None
        self.rejected_connections = 0
        self._ws: ServerConnection | None = None
        self._transport_claimed = False
        self._changes = Changes()

    @property
    def audio_format(self) -> JsonObject:
        """The transport.audioFormat the client asked for."""
        transport: JsonObject = self.request_json["transport"]
        audio_format: JsonObject = transport["audioFormat"]
        return audio_format

    async def wait_connected(self, timeout_secs: float) -> None:
        """Wait for the client to open the transport socket."""
        await wait_for_event(self.connected, f"call {self.id} to connect", timeout_secs)

    async def wait_closed(self, timeout_secs: float) -> None:
        """Wait for the transport socket to close, from either side."""
        await wait_for_event(self.closed, f"call {self.id} to close", timeout_secs)

    async def wait_for_audio(self, nbytes: int, timeout_secs: float) -> None:
        """Wait until the client has sent at least nbytes of audio."""
        await self._changes.wait_until(
            lambda: len(self.received_audio) >= nbytes,
            f"{nbytes} bytes of audio on call {self.id}",
            timeout_secs,
        )

    def _open_socket(self) -> ServerConnection:
        if self._ws is None or self.closed.is_set():
            raise PeerStateError(f"call {self.id} has no open transport")
        return self._ws


class FakeVapi:
    """Vapi's REST API (aiohttp, 127.0.0.1) and transport server (websockets).

    Owns both servers and every transport connection; close() ends them all.
    Failure knobs for tests: create_status_override answers POST /call with that
    HTTP status, create_delay_secs holds the answer back (seconds).
    """

    def __init__(self, *, echo_audio: bool = True) -> None:
        self.calls: dict[str, FakeVapiCall] = {}
        self.create_attempts = 0
        self.create_status_override: int | None = None
        self.create_delay_secs = 0.0
        self.echo_audio = echo_audio
        self.org_id = str(uuid.uuid4())
        self._keys: set[str] = set()
        self._created: asyncio.Queue[FakeVapiCall] = asyncio.Queue()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._ws_server: Server | None = None
        self._api_url: str | None = None
        self._ws_url: str | None = None

    @property
    def api_url(self) -> str:
        """Base URL of the REST API, e.g. http://127.0.0.1:41234."""
        if self._api_url is None:
            raise PeerStateError("fake vapi is not started")
        return self._api_url

    @property
    def ws_url(self) -> str:
        """Base URL of the transport server, e.g. ws://127.0.0.1:41235."""
        if self._ws_url is None:
            raise PeerStateError("fake vapi is not started")
        return self._ws_url

    def add_key(self, key: str) -> None:
        """Accept this private API key as a bearer token."""
        self._keys.add(key)

    async def start(self) -> None:
        """Listen on two ephemeral loopback ports, one per server."""
        self._ws_server = await serve(
            self._serve_transport,
            "127.0.0.1",
            0,
            process_request=self._check_transport_path,
            close_timeout=_CLOSE_TIMEOUT_SECS,
        )
        ws_port = next(iter(self._ws_server.sockets)).getsockname()[1]
        self._ws_url = f"ws://127.0.0.1:{ws_port}"

        app = web.Application()
        app.router.add_post("/call", self._create_call)
        self._runner, self._api_url = await serve_on_loopback(app)

    async def close(self) -> None:
        """Close every transport (1001) and stop both servers."""
        self._closing.set()
        for call in self.calls.values():
            if call.connected.is_set() and call.ended_by is None:
                call.ended_by = "vapi"
        if self._ws_server is not None:
            self._ws_server.close()
            await self._ws_server.wait_closed()
            self._ws_server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for_call(self, timeout_secs: float) -> FakeVapiCall:
        """Return the next created call not yet returned, oldest first."""
        try:
            async with asyncio.timeout(timeout_secs):
                return await self._created.get()
        except TimeoutError as exc:
            raise PeerTimeoutError("a vapi call to be created", timeout_secs) from exc

    async def hang_up(self, call_id: str, timeout_secs: float = 5.0) -> None:
        """End the call from the agent's side: close the transport with 1000."""
        call = self._call(call_id)
        ws = call._open_socket()
        call.ended_by = "vapi"
        await ws.close(1000)
        await call.wait_closed(timeout_secs)

    async def drop(self, call_id: str, timeout_secs: float = 5.0) -> None:
        """Vapi fails mid-call: reset the transport with no close frame."""
        call = self._call(call_id)
        ws = call._open_socket()
        call.ended_by = "vapi"
        ws.transport.abort()
        await call.wait_closed(timeout_secs)

    async def send_json(self, call_id: str, message: JsonObject) -> None:
        """Send a JSON text event, e.g. {"type": "user-interrupted"}."""
        await self._call(call_id)._open_socket().send(json.dumps(message))

    async def send_audio(self, call_id: str, frames: Sequence[bytes]) -> None:
        """Send assistant audio, one binary frame per item, as fast as possible."""
        ws = self._call(call_id)._open_socket()
        for frame in frames:
            await ws.send(frame)

    def _call(self, call_id: str) -> FakeVapiCall:
        call = self.calls.get(call_id)
        if call is None:
            raise PeerStateError(f"no vapi call {call_id}")
        return call

    # REST --------------------------------------------------------------------

    async def _create_call(self, request: web.Request) -> web.Response:
        self.create_attempts += 1
        if self.create_delay_secs > 0:
            # Hold the answer back, but let close() cut the wait short.
            try:
                async with asyncio.timeout(self.create_delay_secs):
                    await self._closing.wait()
            except TimeoutError:
                pass
        if self.create_status_override is not None:
            return _error(self.create_status_override, "injected failure")

        key = _bearer_key(request)
        if key is None or key not in self._keys:
            return _error(401, "invalid api key")
        try:
            body = json.loads(await request.text())
        except ValueError:
            return _error(400, ["body must be valid json"])
        problems = create_call_problems(body)
        if problems:
            return _error(400, problems)

        call_id = str(uuid.uuid4())
        url = f"{self.ws_url}/{call_id}/transport"
        call = FakeVapiCall(call_id, key, body, url, self.echo_audio)
        self.calls[call_id] = call
        self._created.put_nowait(call)
        logger.info("vapi call %s created", call_id)
        return web.json_response(self._call_resource(call), status=201)

    def _call_resource(self, call: FakeVapiCall) -> JsonObject:
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        return {
            "id": call.id,
            "assistantId": call.request_json["assistantId"],
            "type": "vapi.websocketCall",
            "status": "queued",
            "cost": 0,
            "orgId": self.org_id,
            "createdAt": now,
            "updatedAt": now,
            "transport": {
                "provider": "vapi.websocket",
                "websocketCallUrl": call.websocket_call_url,
            },
        }

    # Transport ---------------------------------------------------------------

    def _call_for_path(self, path: str) -> FakeVapiCall | None:
        parts = urlsplit(path).path.split("/")
        if len(parts) != 3 or parts[0] or parts[2] != "transport":
            return None
        return self.calls.get(parts[1])

    def _check_transport_path(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        call = self._call_for_path(request.path)
        if call is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "call not found\n")
        if call._transport_claimed:
            # Unverified against real Vapi: the fake lets a call's transport be
            # used once, so a reconnect shows up as a test failure.
            call.rejected_connections += 1
            return connection.respond(HTTPStatus.CONFLICT, "transport already used\n")
        call._transport_claimed = True
        return None

    async def _serve_transport(self, ws: ServerConnection) -> None:
        assert ws.request is not None, "handler runs after the handshake"
        call = self._call_for_path(ws.request.path)
        assert call is not None, "process_request admitted an unknown call"
        loop = asyncio.get_running_loop()
        call._ws = ws
        call.first_connected_at = loop.time()
        call.connected.set()
        logger.info("vapi call %s transport connected", call.id)

        try:
            async for frame in ws:
                if isinstance(frame, bytes):
                    await self._on_audio(call, ws, frame)
                elif await self._on_text(call, ws, frame):
                    break
        except ConnectionClosed:
            pass

        await ws.wait_closed()
        call.close_code = ws.close_code
        call.closed_at = loop.time()
        if call.ended_by is None:
            call.ended_by = "client"
        logger.info(
            "vapi call %s transport closed with %s by %s",
            call.id,
            call.close_code,
            call.ended_by,
        )
        call.closed.set()
        call._changes.notify()

    async def _on_audio(
        self, call: FakeVapiCall, ws: ServerConnection, frame: bytes
    ) -> None:
        call.received_audio.extend(frame)
        call.received_frames += 1
        call._changes.notify()
        if call.echo_audio:
            await ws.send(frame)

    async def _on_text(
        self, call: FakeVapiCall, ws: ServerConnection, frame: str
    ) -> bool:
        """Record a control message; return True once the client has hung up."""
        try:
            message = json.loads(frame)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            call.protocol_errors.append(frame)
            return False
        call.received_text.append(message)
        call._changes.notify()
        if message.get("type") not in HANGUP_TYPES:
            return False
        call.ended_by = "client"
        await ws.close(1000)
        return True


def _bearer_key(request: web.Request) -> str | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()
