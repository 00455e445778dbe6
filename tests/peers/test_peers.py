"""Self-checks of the protocol peers, against stand-ins and twilio's own vectors."""

import asyncio
import base64
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from .audio import mulaw_decode, mulaw_encode, split_frames, tone_mulaw
from .errors import PeerStateError, StreamRejected
from .playback import PlaybackClock
from .twilio import (
    FakeTwilioRest,
    SimulatedCall,
    TwilioAccount,
    TwilioSimulator,
    new_account,
    new_call_sid,
    sign,
)
from .vapi import FakeVapi

TIMEOUT_SECS = 2.0
VECTOR_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
VECTOR_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675309",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
}


class StandInStream:
    """One stream the stand-in accepted: its socket and the JSON it has read."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.messages.get(), TIMEOUT_SECS)

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(message))


class StandIn:
    """A minimal Callgate stand-in: checks signatures, answers TwiML, holds the stream.

    It uses aiohttp's websocket, as Callgate does, so the peer's websockets client
    is exercised against a different implementation.
    """

    def __init__(self, account: TwilioAccount, after_connect: str = "") -> None:
        self.account = account
        self.after_connect = after_connect
        self.streams: asyncio.Queue[StandInStream] = asyncio.Queue()
        self._runner: web.AppRunner | None = None
        self.base = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/voice", self._voice)
        app.router.add_post("/status", self._status)
        app.router.add_get("/media", self._media)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base = f"127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _valid(self, url: str, params: dict[str, str], request: web.Request) -> bool:
        validator = RequestValidator(self.account.auth_token)
        header = request.headers.get("X-Twilio-Signature", "")
        return bool(validator.validate(url, params, header))

    async def _voice(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        if not self._valid(f"http://{self.base}/voice", form, request):
            return web.Response(status=403)
        twiml = (
            "<Response><Connect>"
            f'<Stream url="ws://{self.base}/media">'
            '<Parameter name="route" value="vapi"/>'
            "</Stream></Connect>"
            f"{self.after_connect}</Response>"
        )
        return web.Response(text=twiml, content_type="text/xml")

    async def _status(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        if not self._valid(f"http://{self.base}/status", form, request):
            return web.Response(status=403)
        return web.Response(status=204)

    async def _media(self, request: web.Request) -> web.StreamResponse:
        if not self._valid(f"ws://{self.base}/media", {}, request):
            return web.Response(status=403)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        stream = StandInStream(ws)
        self.streams.put_nowait(stream)
        # Read continuously, as Callgate does, so close handshakes complete.
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                stream.messages.put_nowait(json.loads(message.data))
        return ws

    async def next_stream(self) -> StandInStream:
        return await asyncio.wait_for(self.streams.get(), TIMEOUT_SECS)


def basic_auth(account: TwilioAccount) -> dict[str, str]:
    token = f"{account.sid}:{account.auth_token}".encode()
    return {"Authorization": "Basic " + base64.b64encode(token).decode()}


def media(stream_sid: str, audio: bytes) -> dict[str, Any]:
    payload = base64.b64encode(audio).decode()
    return {"event": "media", "streamSid": stream_sid, "media": {"payload": payload}}


def mark(stream_sid: str, name: str) -> dict[str, Any]:
    return {"event": "mark", "streamSid": stream_sid, "mark": {"name": name}}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def stand_in() -> AsyncIterator[StandIn]:
    server = StandIn(new_account())
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def simulator(
    session: aiohttp.ClientSession, stand_in: StandIn
) -> AsyncIterator[TwilioSimulator]:
    sim = TwilioSimulator(
        session,
        stand_in.account,
        f"http://{stand_in.base}/voice",
        f"http://{stand_in.base}/status",
    )
    yield sim
    await sim.close()


@pytest.fixture
async def vapi() -> AsyncIterator[FakeVapi]:
    fake = FakeVapi()
    fake.add_key("vapi-key")
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def rest() -> AsyncIterator[FakeTwilioRest]:
    fake = FakeTwilioRest()
    await fake.start()
    yield fake
    await fake.close()


async def open_call(
    simulator: TwilioSimulator, stand_in: StandIn
) -> tuple[SimulatedCall, StandInStream]:
    call = await simulator.place_call("+15005550006", "+14155551212")
    await call.open_stream()
    stream = await stand_in.next_stream()
    await stream.next()
    await stream.next()
    return call, stream


def test_sign_matches_twilio_form_vector() -> None:
    """The webhook signature matches twilio-python's published test vector."""
    assert sign("12345", VECTOR_URL, VECTOR_PARAMS) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def test_sign_matches_wss_upgrade_vector() -> None:
    """The stream upgrade is signed over the wss URL alone."""
    signature = sign("12345", "wss://example.com/media", {})
    assert signature == "7PR3qMkpDyEJtMrVOY/LDyNq8J8="


def test_mulaw_encodes_known_values() -> None:
    """Zero, full scale and their decodings follow G.711."""
    assert mulaw_encode([0, 32767, -32768, -1]) == bytes([0xFF, 0x80, 0x00, 0x7F])
    assert mulaw_decode(bytes([0xFF, 0x80, 0x00])) == [0, 32124, -32124]


def test_mulaw_round_trip_error_is_small() -> None:
    """A tone survives encode and decode within the µ-law step size."""
    samples = [round(12000 * math.sin(n / 5)) for n in range(400)]
    decoded = mulaw_decode(mulaw_encode(samples))
    for original, restored in zip(samples, decoded, strict=True):
        assert abs(original - restored) <= abs(original) / 16 + 8


def test_tone_and_split_frames_pad_with_silence() -> None:
    """A 50 ms tone makes two full frames and a last one padded with 0xFF."""
    frames = split_frames(tone_mulaw(440, 50))
    assert [len(frame) for frame in frames] == [160, 160, 160]
    assert frames[-1][80:] == b"\xff" * 80


def test_playback_clock_releases_marks_when_played() -> None:
    """A mark is due when the audio before it has played; clear releases it early."""
    clock = PlaybackClock()
    clock.add_audio(8000, now=10.0)
    clock.add_mark("a", now=10.0)
    assert clock.next_due_at() == pytest.approx(11.0)
    assert clock.pop_due(10.5) == []
    assert clock.pop_due(11.0) == ["a"]
    clock.add_audio(8000, now=12.0)
    clock.add_mark("b", now=12.0)
    assert clock.clear(12.2) == ["b"]
    assert clock.queued_secs(12.2) == 0.0


async def test_simulated_call_speaks_media_streams(
    simulator: TwilioSimulator, stand_in: StandIn
) -> None:
    """The call sends connected, start and paced media, and echoes marks in time."""
    call = await simulator.place_call("+15005550006", "+14155551212")
    assert call.http_status == 200
    assert call.first_verb == "Connect"
    assert call.stream_parameters == {"route": "vapi"}
    await call.open_stream()
    stream = await stand_in.next_stream()
    assert (await stream.next())["event"] == "connected"
    start = await stream.next()
    assert start["sequenceNumber"] == "1"
    assert start["start"]["customParameters"] == {"route": "vapi"}
    sid = start["streamSid"]

    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await call.send_audio(split_frames(tone_mulaw(440, 100))) == 5
    assert loop.time() - began >= 0.079
    sent = [await stream.next() for _ in range(5)]
    assert [m["sequenceNumber"] for m in sent] == ["2", "3", "4", "5", "6"]
    assert [m["media"]["chunk"] for m in sent] == ["1", "2", "3", "4", "5"]

    await stream.send(media(sid, b"\x7f" * 800))
    await stream.send(mark(sid, "a"))
    marked_at = loop.time()
    echo = await stream.next()
    assert echo["mark"] == {"name": "a"}
    assert echo["sequenceNumber"] == "7"
    assert loop.time() - marked_at >= 0.09
    assert call.received_audio == b"\x7f" * 800

    await stream.send(media(sid, b"\x7f" * 8000))
    await stream.send(mark(sid, "b"))
    await stream.send({"event": "clear", "streamSid": sid})
    assert (await stream.next())["mark"] == {"name": "b"}
    assert len(call.clears_received) == 1

    await stream.ws.send_bytes(b"\x00")
    await call.hang_up()
    stop = await stream.next()
    assert stop["event"] == "stop"
    assert stop["stop"]["callSid"] == call.sid
    assert call.close_code == 1000
    assert [e.code for e in call.protocol_errors] == [31950]
    assert not call.closed_by_server.is_set()


async def test_simulated_call_follows_server_close(
    simulator: TwilioSimulator, stand_in: StandIn
) -> None:
    """A server close ends the call only when no verb follows </Connect>."""
    stand_in.after_connect = "<Say>Goodbye.</Say>"
    call, stream = await open_call(simulator, stand_in)
    assert [verb.tag for verb in call.verbs_after_connect] == ["Say"]
    await stream.ws.close(code=1000)
    await call.wait_closed(TIMEOUT_SECS)
    assert call.closed_by_server.is_set()
    assert call.close_code == 1000
    assert not call.ended_by_server
    assert call.status == "in-progress"


async def test_simulated_call_maps_refused_upgrade(
    simulator: TwilioSimulator,
) -> None:
    """A wrong upgrade signature surfaces as StreamRejected with the HTTP status."""
    call = await simulator.place_call("+15005550006", "+14155551212")
    with pytest.raises(StreamRejected) as caught:
        await call.open_stream(signature="forged")
    assert caught.value.status_code == 403


async def test_simulator_status_callback_is_signed(
    simulator: TwilioSimulator,
) -> None:
    """Status callbacks validate, and a forged one is refused."""
    call = await simulator.place_call("+15005550006", "+14155551212")
    assert await simulator.send_status_callback(call, duration_secs=61) == 204
    params = call.status_callback_params("completed", 61)
    assert params["Duration"] == "2"
    assert params["SequenceNumber"] == "1"
    assert await simulator.send_status_callback(call, signature="forged") == 403


async def test_fake_vapi_create_call_returns_transport_url(
    vapi: FakeVapi, session: aiohttp.ClientSession
) -> None:
    """POST /call with a registered key answers 201 and a websocketCallUrl."""
    body = {
        "assistantId": "asst-1",
        "transport": {
            "provider": "vapi.websocket",
            "audioFormat": {"format": "mulaw", "container": "raw", "sampleRate": 8000},
        },
    }
    headers = {"authorization": "Bearer vapi-key"}
    async with session.post(f"{vapi.api_url}/call", json=body, headers=headers) as r:
        assert r.status == 201
        created = await r.json()
    assert created["type"] == "vapi.websocketCall"
    url = created["transport"]["websocketCallUrl"]
    assert url == f"{vapi.ws_url}/{created['id']}/transport"
    call = await vapi.wait_for_call(TIMEOUT_SECS)
    assert call.id == created["id"]
    assert call.api_key == "vapi-key"


async def test_fake_vapi_transport_echoes_frames_in_order(
    vapi: FakeVapi, session: aiohttp.ClientSession
) -> None:
    """Binary frames come back unchanged and in order; end-call closes the socket."""
    body = {
        "assistantId": "asst-1",
        "transport": {
            "provider": "vapi.websocket",
            "audioFormat": {"format": "pcm_s16le", "sampleRate": 16000},
        },
    }
    headers = {"authorization": "Bearer vapi-key"}
    async with session.post(f"{vapi.api_url}/call", json=body, headers=headers) as r:
        url = (await r.json())["transport"]["websocketCallUrl"]
    frames = [bytes([n]) * 320 for n in range(10)]
    async with connect(url, proxy=None) as ws:
        for frame in frames:
            await ws.send(frame)
        echoed = [await asyncio.wait_for(ws.recv(), TIMEOUT_SECS) for _ in frames]
        await ws.send(json.dumps({"type": "end-call"}))
        await asyncio.wait_for(ws.wait_closed(), TIMEOUT_SECS)
    assert echoed == frames
    call = await vapi.wait_for_call(TIMEOUT_SECS)
    await call.wait_closed(TIMEOUT_SECS)
    assert call.received_audio == b"".join(frames)
    assert call.received_text == [{"type": "end-call"}]
    assert call.ended_by == "client"


async def test_fake_vapi_rejects_unregistered_key_and_unknown_call(
    vapi: FakeVapi, session: aiohttp.ClientSession
) -> None:
    """An unknown key gets 401 and an unknown transport id a 404 handshake."""
    headers = {"authorization": "Bearer nope"}
    async with session.post(f"{vapi.api_url}/call", json={}, headers=headers) as r:
        assert r.status == 401
    with pytest.raises(InvalidStatus) as caught:
        await connect(f"{vapi.ws_url}/missing/transport", proxy=None)
    assert caught.value.response.status_code == 404


async def create_vapi_call(vapi: FakeVapi, session: aiohttp.ClientSession) -> str:
    body = {
        "assistantId": "asst-1",
        "transport": {
            "provider": "vapi.websocket",
            "audioFormat": {"format": "mulaw", "container": "raw", "sampleRate": 8000},
        },
    }
    headers = {"authorization": "Bearer vapi-key"}
    async with session.post(f"{vapi.api_url}/call", json=body, headers=headers) as r:
        url: str = (await r.json())["transport"]["websocketCallUrl"]
    return url


async def test_fake_vapi_hang_up_closes_from_agent_side(
    vapi: FakeVapi, session: aiohttp.ClientSession
) -> None:
    """Events reach the client, and hang_up closes the transport with 1000."""
    url = await create_vapi_call(vapi, session)
    call = await vapi.wait_for_call(TIMEOUT_SECS)
    async with connect(url, proxy=None) as ws:
        await call.wait_connected(TIMEOUT_SECS)
        await vapi.send_json(call.id, {"type": "user-interrupted"})
        received = await asyncio.wait_for(ws.recv(), TIMEOUT_SECS)
        assert json.loads(received) == {"type": "user-interrupted"}
        await vapi.hang_up(call.id, TIMEOUT_SECS)
        await asyncio.wait_for(ws.wait_closed(), TIMEOUT_SECS)
        assert ws.close_code == 1000
    assert call.ended_by == "vapi"
    with pytest.raises(InvalidStatus) as caught:
        await connect(url, proxy=None)
    assert caught.value.response.status_code == 409


async def test_fake_vapi_failure_knobs_and_validation(
    vapi: FakeVapi, session: aiohttp.ClientSession
) -> None:
    """Bad bodies get 400 with reasons; the override and delay knobs apply."""
    headers = {"authorization": "Bearer vapi-key"}
    bad = {"assistantId": "a", "transport": {"provider": "vapi.websocket"}}
    async with session.post(f"{vapi.api_url}/call", json=bad, headers=headers) as r:
        assert r.status == 400
        assert (await r.json())["message"] == [
            "transport.audioFormat must be an object"
        ]
    vapi.create_status_override = 503
    vapi.create_delay_secs = 0.05
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with session.post(f"{vapi.api_url}/call", json=bad, headers=headers) as r:
        assert r.status == 503
    assert loop.time() - began >= 0.05
    assert vapi.create_attempts == 2
    assert vapi.calls == {}


async def test_fake_twilio_rest_enforces_basic_auth(
    rest: FakeTwilioRest, session: aiohttp.ClientSession
) -> None:
    """Wrong credentials get Twilio's 20003; unknown calls get 20404."""
    account = new_account()
    rest.add_account(account)
    path = f"{rest.url}/2010-04-01/Accounts/{account.sid}/Calls/{new_call_sid()}.json"
    wrong = basic_auth(TwilioAccount(account.sid, "wrong"))
    async with session.get(path, headers=wrong) as r:
        assert r.status == 401
        assert (await r.json())["code"] == 20003
    async with session.get(path, headers=basic_auth(account)) as r:
        assert r.status == 404
        assert (await r.json())["code"] == 20404
    assert [req.status for req in rest.requests] == [401, 404]


async def test_fake_twilio_rest_completes_live_call(
    rest: FakeTwilioRest,
    session: aiohttp.ClientSession,
    simulator: TwilioSimulator,
    stand_in: StandIn,
) -> None:
    """Status=completed makes the call send stop and close its stream."""
    call, stream = await open_call(simulator, stand_in)
    rest.add_account(call.account)
    rest.register_call(call)
    path = f"{rest.url}/2010-04-01/Accounts/{call.account.sid}/Calls/{call.sid}.json"
    auth = basic_auth(call.account)
    async with session.post(path, data={"Status": "completed"}, headers=auth) as r:
        assert r.status == 200
        assert (await r.json())["status"] == "completed"
    assert (await stream.next())["event"] == "stop"
    await call.wait_closed(TIMEOUT_SECS)
    async with session.get(path, headers=auth) as r:
        resource = await r.json()
    assert resource["status"] == "completed"
    assert resource["duration"] == "1"
    assert rest.count("POST", 200) == 1


async def test_fake_twilio_rest_redirect_ends_stream(
    rest: FakeTwilioRest,
    session: aiohttp.ClientSession,
    simulator: TwilioSimulator,
    stand_in: StandIn,
) -> None:
    """Twiml= ends the stream, is recorded, and a plain <Say> then ends the call."""
    call, stream = await open_call(simulator, stand_in)
    rest.add_account(call.account)
    rest.register_call(call)
    path = f"{rest.url}/2010-04-01/Accounts/{call.account.sid}/Calls/{call.sid}.json"
    twiml = "<Response><Say>Out of minutes.</Say></Response>"
    form = {"Twiml": twiml}
    async with session.post(path, data=form, headers=basic_auth(call.account)) as r:
        assert r.status == 200
    assert (await stream.next())["event"] == "stop"
    await call.wait_closed(TIMEOUT_SECS)
    assert call.redirected_twiml == twiml
    assert call.status == "completed"
    with pytest.raises(PeerStateError):
        await call.wait_for_audio(1, TIMEOUT_SECS)
