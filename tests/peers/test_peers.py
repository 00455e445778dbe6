"""Self-checks of the protocol peers, against stand-ins and twilio's own vectors."""

import asyncio
import base64
import json
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from .audio import mulaw_decode, mulaw_encode, split_frames, tone_mulaw
from .errors import DialRefusedError, PeerStateError, StreamRejected, TwimlError
from .playback import PlaybackClock
from .retell import FakeRetell
from .sip import parse_sip_uri
from .twilio import (
    FakeTwilioRest,
    SimulatedCall,
    TwilioAccount,
    TwilioSimulator,
    new_account,
    new_call_sid,
    sign,
)
from .twiml import parse_dial, parse_twiml
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


class DialStandIn:
    """A Callgate stand-in for dialed legs: answers <Dial>, records every request.

    Each request is checked against the account's token, then recorded in
    arrival order with whether its signature held; forged ones get 403.
    """

    def __init__(self, account: TwilioAccount) -> None:
        self.account = account
        self.twiml = "<Response/>"
        self.after_dial = "<Response><Say>Goodbye.</Say><Hangup/></Response>"
        self.requests: list[tuple[str, dict[str, str], bool]] = []
        self._runner: web.AppRunner | None = None
        self.base = ""

    def url(self, path: str) -> str:
        return f"http://{self.base}{path}"

    def forms(self, path: str) -> list[dict[str, str]]:
        return [form for seen, form, _ in self.requests if seen == path]

    async def start(self) -> None:
        app = web.Application()
        for path in ("/voice", "/dial-status", "/dial-action"):
            app.router.add_post(path, self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base = f"127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        validator = RequestValidator(self.account.auth_token)
        header = request.headers.get("X-Twilio-Signature", "")
        valid = bool(validator.validate(self.url(request.path_qs), form, header))
        self.requests.append((request.path, form, valid))
        if not valid:
            return web.Response(status=403)
        if request.path == "/dial-status":
            return web.Response(status=204)
        twiml = self.twiml if request.path == "/voice" else self.after_dial
        return web.Response(text=twiml, content_type="text/xml")


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
async def retell() -> AsyncIterator[FakeRetell]:
    fake = FakeRetell()
    fake.add_key("retell-key")
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def dial_stand_in() -> AsyncIterator[DialStandIn]:
    server = DialStandIn(new_account())
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def dial_simulator(
    session: aiohttp.ClientSession, dial_stand_in: DialStandIn, retell: FakeRetell
) -> AsyncIterator[TwilioSimulator]:
    sim = TwilioSimulator(
        session,
        dial_stand_in.account,
        dial_stand_in.url("/voice"),
        dial_stand_in.url("/status"),
        sip_endpoint=retell,
    )
    yield sim
    await sim.close()


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


def test_parse_sip_uri_reads_retell_target() -> None:
    """A Retell SIP URI splits into call id, host and transport; junk is None."""
    uri = parse_sip_uri("sip:abc123@SIP.retellai.com;transport=tcp")
    assert uri is not None
    assert (uri.user, uri.host, uri.port) == ("abc123", "sip.retellai.com", None)
    assert uri.param("Transport") == "tcp"
    assert parse_sip_uri("sip:sip.retellai.com") is None
    assert parse_sip_uri("tel:+14155551212") is None
    assert parse_sip_uri("sip:a@host:99999") is None


def test_parse_dial_fills_defaults_and_refuses_mixed_nouns() -> None:
    """Defaults apply, a bad timeLimit only warns, and <Sip> must stand alone."""
    root = parse_twiml(
        '<Response><Dial timeLimit="soon" action="next">'
        '<Number statusCallback="/s">+14155550100</Number></Dial></Response>'
    )
    assert root is not None
    spec = parse_dial(root[0], "https://cg.example.com/twilio/voice")
    assert (spec.kind, spec.time_limit_secs, spec.ring_timeout_secs) == (
        "number",
        14400,
        30,
    )
    assert spec.action_url == "https://cg.example.com/twilio/next"
    assert spec.status_callback_url == "https://cg.example.com/s"
    assert spec.status_callback_events == frozenset({"completed"})
    assert spec.warnings[0].startswith("13216")
    mixed = parse_twiml(
        "<Dial><Sip>sip:a@b.example.com</Sip><Number>+14155550100</Number></Dial>"
    )
    assert mixed is not None
    with pytest.raises(TwimlError):
        parse_dial(mixed)


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
    assert call.spoken == ["Out of minutes."]
    assert call.status == "completed"
    with pytest.raises(PeerStateError):
        await call.wait_for_audio(1, TIMEOUT_SECS)


def api(rest: FakeTwilioRest, path: str) -> str:
    return f"{rest.url}/2010-04-01{path}"


async def create_subaccount(
    rest: FakeTwilioRest, session: aiohttp.ClientSession, main: TwilioAccount
) -> TwilioAccount:
    form = {"FriendlyName": "workspace"}
    async with session.post(
        api(rest, "/Accounts.json"), data=form, headers=basic_auth(main)
    ) as r:
        assert r.status == 201
        body = await r.json()
    return TwilioAccount(body["sid"], body["auth_token"])


async def buy_number(
    rest: FakeTwilioRest,
    session: aiohttp.ClientSession,
    credentials: TwilioAccount,
    owner_sid: str,
    form: dict[str, str],
) -> tuple[int, dict[str, Any]]:
    path = api(rest, f"/Accounts/{owner_sid}/IncomingPhoneNumbers.json")
    async with session.post(path, data=form, headers=basic_auth(credentials)) as r:
        return r.status, await r.json()


@pytest.fixture
def main_account(rest: FakeTwilioRest) -> TwilioAccount:
    account = new_account()
    rest.add_account(account)
    return account


async def test_fake_twilio_rest_creates_subaccount_with_own_token(
    rest: FakeTwilioRest, session: aiohttp.ClientSession, main_account: TwilioAccount
) -> None:
    """A main account creates a subaccount whose token reaches only itself."""
    form = {"FriendlyName": "workspace w_1"}
    headers = basic_auth(main_account)
    async with session.post(
        api(rest, "/Accounts.json"), data=form, headers=headers
    ) as r:
        assert r.status == 201
        body = await r.json()
    sub = TwilioAccount(body["sid"], body["auth_token"])
    assert re.fullmatch(r"AC[0-9a-f]{32}", sub.sid)
    assert re.fullmatch(r"[0-9a-f]{32}", sub.auth_token)
    assert body["owner_account_sid"] == main_account.sid
    assert (body["status"], body["type"]) == ("active", "Full")
    assert body["friendly_name"] == "workspace w_1"
    assert rest.subaccounts == {sub.sid: sub}
    assert rest.parent_of(sub.sid) == main_account.sid
    assert rest.parent_of(main_account.sid) is None

    async with session.get(
        api(rest, f"/Accounts/{sub.sid}.json"), headers=basic_auth(sub)
    ) as r:
        assert r.status == 200
        assert (await r.json())["auth_token"] == sub.auth_token
    async with session.get(
        api(rest, f"/Accounts/{main_account.sid}.json"), headers=basic_auth(sub)
    ) as r:
        assert r.status == 401
        assert (await r.json())["code"] == 20003
    async with session.get(api(rest, "/Accounts.json"), headers=headers) as r:
        listed = [account["sid"] for account in (await r.json())["accounts"]]
    assert listed == [main_account.sid, sub.sid]


async def test_fake_twilio_rest_refuses_subaccount_creating_accounts(
    rest: FakeTwilioRest, session: aiohttp.ClientSession, main_account: TwilioAccount
) -> None:
    """Subaccount credentials get 403 with code 20006 on POST /Accounts.json."""
    sub = await create_subaccount(rest, session, main_account)
    async with session.post(
        api(rest, "/Accounts.json"), data={}, headers=basic_auth(sub)
    ) as r:
        assert r.status == 403
        assert (await r.json())["code"] == 20006
    assert list(rest.subaccounts) == [sub.sid]


async def test_fake_twilio_rest_buys_searched_number_into_subaccount(
    rest: FakeTwilioRest, session: aiohttp.ClientSession, main_account: TwilioAccount
) -> None:
    """A number found by area code is bought into the subaccount and leaves sale."""
    sub = await create_subaccount(rest, session, main_account)
    search = api(rest, f"/Accounts/{sub.sid}/AvailablePhoneNumbers/US/Local.json")
    headers = basic_auth(main_account)
    async with session.get(search, params={"AreaCode": "415"}, headers=headers) as r:
        found = (await r.json())["available_phone_numbers"]
    assert [n["phone_number"][:5] for n in found] == ["+1415"] * 3
    assert found[0]["friendly_name"] == "(415) 555-0101"
    number = found[0]["phone_number"]

    form = {
        "PhoneNumber": number,
        "VoiceUrl": "https://callgate.test/twilio/voice",
        "VoiceMethod": "POST",
        "StatusCallback": "https://callgate.test/twilio/status",
        "StatusCallbackMethod": "POST",
    }
    status, bought = await buy_number(rest, session, main_account, sub.sid, form)
    assert status == 201
    assert re.fullmatch(r"PN[0-9a-f]{32}", bought["sid"])
    assert (bought["phone_number"], bought["account_sid"]) == (number, sub.sid)
    assert bought["voice_url"] == "https://callgate.test/twilio/voice"
    assert bought["status_callback"] == "https://callgate.test/twilio/status"
    assert rest.owner_of(number) == sub.sid
    assert rest.account_for(number) == sub

    async with session.get(search, params={"AreaCode": "415"}, headers=headers) as r:
        left = [n["phone_number"] for n in (await r.json())["available_phone_numbers"]]
    assert number not in left
    numbers = api(rest, f"/Accounts/{sub.sid}/IncomingPhoneNumbers")
    own = basic_auth(sub)
    query = {"PhoneNumber": number}
    async with session.get(f"{numbers}.json", params=query, headers=own) as r:
        listed = (await r.json())["incoming_phone_numbers"]
    assert [n["sid"] for n in listed] == [bought["sid"]]
    async with session.get(f"{numbers}/{bought['sid']}.json", headers=own) as r:
        assert (await r.json())["phone_number"] == number
    assert rest.requests[-1].query == {}
    assert rest.requests[-2].query == query


async def test_fake_twilio_rest_refuses_unavailable_number(
    rest: FakeTwilioRest, session: aiohttp.ClientSession, main_account: TwilioAccount
) -> None:
    """A number not for sale gets 21422; an area code with none left gets 21452."""
    sub = await create_subaccount(rest, session, main_account)
    form = {"PhoneNumber": "+14155550199"}
    status, body = await buy_number(rest, session, main_account, sub.sid, form)
    assert (status, body["code"]) == (400, 21422)

    rest.add_available("+13105550101", "310")
    form = {"AreaCode": "310"}
    status, body = await buy_number(rest, session, main_account, sub.sid, form)
    assert (status, body["phone_number"]) == (201, "+13105550101")
    status, body = await buy_number(rest, session, main_account, sub.sid, form)
    assert (status, body["code"]) == (400, 21452)
    form = {"PhoneNumber": "+13105550101"}
    status, body = await buy_number(rest, session, main_account, sub.sid, form)
    assert (status, body["code"]) == (400, 21422)
    assert rest.owner_of("+14155550199") is None


async def test_fake_twilio_rest_transfers_number_only_with_parent_credentials(
    rest: FakeTwilioRest, session: aiohttp.ClientSession, main_account: TwilioAccount
) -> None:
    """The parent moves a number between subaccounts; their own tokens cannot."""
    first = await create_subaccount(rest, session, main_account)
    second = await create_subaccount(rest, session, main_account)
    stranger = new_account()
    rest.add_account(stranger)
    foreign = rest.create_subaccount(stranger)
    form = {"PhoneNumber": "+12125550101", "VoiceUrl": "https://callgate.test/v"}
    _, bought = await buy_number(rest, session, first, first.sid, form)
    path = api(rest, f"/Accounts/{first.sid}/IncomingPhoneNumbers/{bought['sid']}")

    move = {"AccountSid": second.sid}
    async with session.post(f"{path}.json", data=move, headers=basic_auth(first)) as r:
        assert r.status == 400
        assert (await r.json())["code"] == 21474
    away = {"AccountSid": foreign.sid}
    headers = basic_auth(main_account)
    async with session.post(f"{path}.json", data=away, headers=headers) as r:
        assert r.status == 400
        assert (await r.json())["code"] == 21473
    assert rest.owner_of("+12125550101") == first.sid

    async with session.post(f"{path}.json", data=move, headers=headers) as r:
        assert r.status == 200
        moved = await r.json()
    assert (moved["account_sid"], moved["voice_url"]) == (
        second.sid,
        "https://callgate.test/v",
    )
    assert rest.owner_of("+12125550101") == second.sid
    assert rest.account_for("+12125550101") == second
    async with session.get(f"{path}.json", headers=headers) as r:
        assert (await r.json())["code"] == 20404


async def test_fake_twilio_rest_releases_number(
    rest: FakeTwilioRest, session: aiohttp.ClientSession, main_account: TwilioAccount
) -> None:
    """DELETE answers 204 and the number has no owner afterwards."""
    sub = await create_subaccount(rest, session, main_account)
    form = {"AreaCode": "212"}
    _, bought = await buy_number(rest, session, main_account, sub.sid, form)
    path = api(rest, f"/Accounts/{sub.sid}/IncomingPhoneNumbers/{bought['sid']}.json")
    async with session.delete(path, headers=basic_auth(sub)) as r:
        assert r.status == 204
    assert rest.owner_of(bought["phone_number"]) is None
    with pytest.raises(PeerStateError):
        rest.account_for(bought["phone_number"])
    async with session.get(path, headers=basic_auth(sub)) as r:
        assert r.status == 404
    assert rest.count("DELETE", 204) == 1


async def test_fake_twilio_rest_closing_account_releases_numbers(
    rest: FakeTwilioRest, session: aiohttp.ClientSession, main_account: TwilioAccount
) -> None:
    """Status=closed releases every number and retires the subaccount's token."""
    sub = await create_subaccount(rest, session, main_account)
    for number in ("+14155550101", "+14155550102"):
        await buy_number(rest, session, sub, sub.sid, {"PhoneNumber": number})
    path = api(rest, f"/Accounts/{sub.sid}.json")
    headers = basic_auth(main_account)

    closed = {"Status": "closed"}
    async with session.post(path, data=closed, headers=basic_auth(sub)) as r:
        assert (r.status, (await r.json())["code"]) == (403, 20006)
    async with session.post(path, data=closed, headers=headers) as r:
        assert (await r.json())["status"] == "closed"
    assert rest.owner_of("+14155550101") is None
    assert rest.owner_of("+14155550102") is None
    assert rest.account_status(sub.sid) == "closed"
    async with session.get(path, headers=basic_auth(sub)) as r:
        assert r.status == 401
    reopen = {"Status": "active"}
    async with session.post(path, data=reopen, headers=headers) as r:
        assert (r.status, (await r.json())["code"]) == (400, 21100)
    main_path = api(rest, f"/Accounts/{main_account.sid}.json")
    async with session.post(main_path, data=closed, headers=headers) as r:
        assert (r.status, (await r.json())["code"]) == (400, 21477)


async def test_fake_twilio_rest_number_webhooks_need_owner_token(
    rest: FakeTwilioRest, session: aiohttp.ClientSession, main_account: TwilioAccount
) -> None:
    """A subaccount number's webhooks validate with its token, not the main one."""
    sub = rest.create_subaccount(main_account, "workspace w_2")
    form = {"AreaCode": "415"}
    _, bought = await buy_number(rest, session, main_account, sub.sid, form)
    number = bought["phone_number"]
    server = StandIn(sub)
    await server.start()
    voice = f"http://{server.base}/voice"
    status = f"http://{server.base}/status"
    owner = TwilioSimulator(session, rest.account_for(number), voice, status, rest=rest)
    parent = TwilioSimulator(session, main_account, voice, status)
    try:
        call = await owner.place_call(number, "+14155551212")
        assert call.account == sub
        assert await owner.send_status_callback(call, duration_secs=5) == 204
        assert await parent.send_status_callback(call, duration_secs=5) == 403
    finally:
        await owner.close()
        await server.close()
    assert rest.parent_of(sub.sid) == main_account.sid


def drive_with_twilio_python(base_url: str, main: TwilioAccount) -> list[str]:
    """Provision through twilio-python's own client, as Callgate might."""
    client = Client(main.sid, main.auth_token)
    client.api.base_url = base_url
    accounts = client.api.v2010.accounts
    sub = accounts.create(friendly_name="workspace w_3")
    scoped = accounts(sub.sid)
    found = scoped.available_phone_numbers("US").local.list(area_code="212", limit=2)
    bought = scoped.incoming_phone_numbers.create(
        phone_number=found[0].phone_number, voice_url="https://callgate.test/v"
    )
    other = accounts.create()
    moved = scoped.incoming_phone_numbers(bought.sid).update(account_sid=other.sid)
    listed = accounts(other.sid).incoming_phone_numbers.list()
    closed = accounts(sub.sid).update(status="closed")
    return [
        str(sub.owner_account_sid),
        str(bought.phone_number),
        str(moved.account_sid),
        str(listed[0].sid == bought.sid),
        str(closed.status),
    ]


async def test_fake_twilio_rest_speaks_twilio_python(
    rest: FakeTwilioRest, main_account: TwilioAccount
) -> None:
    """twilio-python's REST client reads every resource the fake renders."""
    seen = await asyncio.to_thread(drive_with_twilio_python, rest.url, main_account)
    owner = rest.owner_of("+12125550101")
    assert owner in rest.subaccounts
    assert seen == [main_account.sid, "+12125550101", owner, "True", "closed"]


RETELL_AUTH = {"Authorization": "Bearer retell-key"}
REGISTER_BODY: dict[str, Any] = {
    "agent_id": "agent_1",
    "agent_version": 3,
    "direction": "inbound",
    "from_number": "+14155551212",
    "to_number": "+15005550006",
    "metadata": {"workspace": "w_1"},
    "retell_llm_dynamic_variables": {"caller_name": "Ada"},
}


async def register_retell_call(
    retell: FakeRetell, session: aiohttp.ClientSession
) -> str:
    url = f"{retell.api_url}/v2/register-phone-call"
    async with session.post(url, json=REGISTER_BODY, headers=RETELL_AUTH) as r:
        assert r.status == 201
        call_id: str = (await r.json())["call_id"]
    return call_id


def sip_dial_twiml(stand_in: DialStandIn, sip_uri: str, time_limit: int = 1) -> str:
    # A relative action, so the simulator must resolve it against /voice.
    return (
        f'<Response><Dial timeLimit="{time_limit}" action="/dial-action">'
        '<Sip statusCallbackEvent="initiated ringing answered completed" '
        f'statusCallback="{stand_in.url("/dial-status")}">{sip_uri}</Sip>'
        "</Dial></Response>"
    )


async def test_fake_retell_registers_phone_call(
    retell: FakeRetell, session: aiohttp.ClientSession
) -> None:
    """A registered key gets 201 and a call id that SIP admits for 5 minutes."""
    url = f"{retell.api_url}/v2/register-phone-call"
    async with session.post(url, json=REGISTER_BODY, headers=RETELL_AUTH) as r:
        assert r.status == 201
        created = await r.json()
    call_id = created["call_id"]
    assert len(call_id) == 32
    assert created["call_type"] == "phone_call"
    assert created["call_status"] == "registered"
    assert created["agent_version"] == 3
    assert created["metadata"] == {"workspace": "w_1"}
    assert created["retell_llm_dynamic_variables"] == {"caller_name": "Ada"}
    assert "start_timestamp" not in created
    assert "telephony_identifier" not in created

    registration = await retell.wait_for_registration(TIMEOUT_SECS)
    assert registration.call_id == call_id
    assert registration.api_key == "retell-key"
    assert registration.request_json == REGISTER_BODY
    assert retell.accepts(retell.sip_uri(call_id))
    assert not retell.accepts(f"sip:{call_id}@elsewhere.example.com")
    assert not retell.expired(call_id, registration.registered_at + 299.9)
    assert retell.expired(call_id, registration.registered_at + 300.0)


async def test_fake_retell_refuses_bad_key_and_body(
    retell: FakeRetell, session: aiohttp.ClientSession
) -> None:
    """An unknown key gets 401, a bad body a 400 naming each problem."""
    url = f"{retell.api_url}/v2/register-phone-call"
    wrong = {"Authorization": "Bearer nope"}
    async with session.post(url, json=REGISTER_BODY, headers=wrong) as r:
        assert r.status == 401
    bad = {
        "agent_version": True,
        "direction": "sideways",
        "to_number": "5550006",
        "retell_llm_dynamic_variables": {"n": 1},
        "agentId": "a",
    }
    async with session.post(url, json=bad, headers=RETELL_AUTH) as r:
        assert r.status == 400
        message = (await r.json())["message"]
    for problem in (
        "unknown field agentId",
        "agent_id must be a non-empty string",
        "agent_version must be a non-negative integer",
        "direction must be inbound or outbound",
        "to_number must be an E.164 number",
        "retell_llm_dynamic_variables must map strings to strings",
    ):
        assert problem in message
    retell.register_status_override = 503
    async with session.post(url, json=REGISTER_BODY, headers=RETELL_AUTH) as r:
        assert r.status == 503
    assert retell.register_attempts == 3
    assert retell.registrations == {}


async def test_dial_sip_leg_reports_progress_until_time_limit(
    retell: FakeRetell,
    session: aiohttp.ClientSession,
    dial_stand_in: DialStandIn,
    dial_simulator: TwilioSimulator,
) -> None:
    """Signed callbacks arrive in order and the leg ends itself at timeLimit."""
    call_id = await register_retell_call(retell, session)
    sip_uri = retell.sip_uri(call_id)
    dial_stand_in.twiml = sip_dial_twiml(dial_stand_in, sip_uri)
    call = await dial_simulator.place_call("+15005550006", "+14155551212")
    assert call.first_verb == "Dial"
    leg = call.dial_leg
    assert (leg.kind, leg.target, leg.time_limit_secs) == ("sip", sip_uri, 1)
    assert leg.action_url == dial_stand_in.url("/dial-action")

    await leg.ring()
    await leg.answer()
    answered_at = asyncio.get_running_loop().time()
    assert retell.registrations[call_id].call_status == "ongoing"
    await leg.wait_ended(TIMEOUT_SECS)
    assert asyncio.get_running_loop().time() - answered_at >= 0.99
    assert (leg.status, leg.ended_by) == ("completed", "limit")

    paths = [path for path, _, _ in dial_stand_in.requests]
    assert paths == ["/voice"] + ["/dial-status"] * 4 + ["/dial-action"]
    assert all(valid for _, _, valid in dial_stand_in.requests)
    callbacks = dial_stand_in.forms("/dial-status")
    assert [form["CallStatus"] for form in callbacks] == [
        "initiated",
        "ringing",
        "in-progress",
        "completed",
    ]
    assert [form["SequenceNumber"] for form in callbacks] == ["0", "1", "2", "3"]
    for form in callbacks:
        assert form["CallSid"] == leg.child_sid
        assert form["ParentCallSid"] == call.sid
        assert form["Direction"] == "outbound-dial"
        assert (form["From"], form["To"]) == ("+14155551212", sip_uri)
    completed = callbacks[-1]
    assert (completed["CallDuration"], completed["Duration"]) == ("1", "1")
    assert completed["SipResponseCode"] == "200"

    action = dial_stand_in.forms("/dial-action")[0]
    assert action["CallSid"] == call.sid
    assert action["DialCallSid"] == leg.child_sid
    assert action["DialCallStatus"] == "completed"
    assert action["DialCallDuration"] == "1"
    assert action["DialBridged"] == "true"
    assert call.after_dial_twiml == dial_stand_in.after_dial
    assert call.spoken == ["Goodbye."]
    assert call.status == "completed"
    url = f"{retell.api_url}/v2/get-call/{call_id}"
    async with session.get(url, headers=RETELL_AUTH) as r:
        fetched = await r.json()
    assert fetched["call_status"] == "ended"
    assert fetched["telephony_identifier"] == {"twilio_call_sid": leg.child_sid}
    assert fetched["disconnection_reason"] == "user_hangup"
    assert fetched["duration_ms"] >= 990


@pytest.mark.parametrize("registered", [False, True])
async def test_dial_sip_leg_to_unknown_or_expired_call_fails_with_404(
    registered: bool,
    retell: FakeRetell,
    session: aiohttp.ClientSession,
    dial_stand_in: DialStandIn,
    dial_simulator: TwilioSimulator,
) -> None:
    """Retell refuses a call id it lacks or let expire; the leg fails with 404."""
    call_id = "0" * 32
    if registered:
        call_id = await register_retell_call(retell, session)
        retell.registration_ttl_secs = 0.0
    dial_stand_in.twiml = sip_dial_twiml(dial_stand_in, retell.sip_uri(call_id))
    call = await dial_simulator.place_call("+15005550006", "+14155551212")
    with pytest.raises(DialRefusedError) as caught:
        await call.dial_leg.answer()
    assert caught.value.sip_response_code == 404

    leg = call.dial_leg
    assert (leg.status, leg.sip_response_code) == ("failed", 404)
    callbacks = dial_stand_in.forms("/dial-status")
    assert [form["CallStatus"] for form in callbacks] == ["initiated", "failed"]
    assert callbacks[-1]["SipResponseCode"] == "404"
    assert callbacks[-1]["CallDuration"] == "0"
    action = dial_stand_in.forms("/dial-action")[0]
    assert action["DialCallStatus"] == "failed"
    assert (action["DialBridged"], action["DialCallDuration"]) == ("false", "0")
    assert action["DialSipResponseCode"] == "404"
    assert call.status == "completed"
    if registered:
        registration = retell.registrations[call_id]
        assert registration.disconnection_reason == "registered_call_timeout"


async def test_dial_leg_caller_hang_up_cancels_and_forged_callbacks_fail(
    dial_stand_in: DialStandIn, dial_simulator: TwilioSimulator
) -> None:
    """A caller leaving a ringing leg cancels it; a forged signature gets 403."""
    dial_stand_in.twiml = (
        '<Response><Dial action="/dial-action">'
        '<Number statusCallbackEvent="ringing completed" '
        f'statusCallback="{dial_stand_in.url("/dial-status")}">+14155550100</Number>'
        "</Dial></Response>"
    )
    call = await dial_simulator.place_call("+15005550006", "+14155551212")
    leg = call.dial_leg
    assert (leg.kind, leg.time_limit_secs) == ("number", 14400)
    leg.signature_override = "Zm9yZ2Vk"
    await leg.ring()
    await call.hang_up()
    assert (leg.status, leg.ended_by) == ("canceled", "caller")
    assert leg.callback_statuses() == ["ringing", "canceled"]
    assert [delivery.http_status for delivery in leg.callbacks] == [403, 403]
    assert leg.action_delivery is not None
    assert leg.action_delivery.http_status == 403
    assert leg.action_delivery.params["DialCallStatus"] == "canceled"
    assert leg.action_delivery.params["CallStatus"] == "completed"
    assert call.status == "completed"
    with pytest.raises(PeerStateError):
        await leg.hang_up()


async def test_fake_twilio_rest_transfer_dials_and_completes_number_leg(
    rest: FakeTwilioRest,
    session: aiohttp.ClientSession,
    simulator: TwilioSimulator,
    stand_in: StandIn,
) -> None:
    """Twiml=<Dial><Number> ends the stream and starts a leg REST can end."""
    call, stream = await open_call(simulator, stand_in)
    rest.add_account(call.account)
    rest.register_call(call)
    base = f"{rest.url}/2010-04-01/Accounts/{call.account.sid}/Calls"
    auth = basic_auth(call.account)
    twiml = (
        "<Response><Dial><Number "
        f'statusCallback="http://{stand_in.base}/status" '
        'statusCallbackEvent="answered completed">+14155550100</Number>'
        "</Dial></Response>"
    )
    async with session.post(
        f"{base}/{call.sid}.json", data={"Twiml": twiml}, headers=auth
    ) as r:
        assert r.status == 200
    assert (await stream.next())["event"] == "stop"
    await call.wait_closed(TIMEOUT_SECS)
    leg = call.dial_leg
    assert (leg.kind, leg.target) == ("number", "+14155550100")

    await leg.answer()
    async with session.get(f"{base}/{leg.child_sid}.json", headers=auth) as r:
        child = await r.json()
    assert (child["status"], child["parent_call_sid"]) == ("in-progress", call.sid)
    assert child["direction"] == "outbound-dial"
    form = {"Status": "completed"}
    async with session.post(f"{base}/{call.sid}.json", data=form, headers=auth) as r:
        assert (await r.json())["status"] == "completed"
    await leg.wait_ended(TIMEOUT_SECS)
    assert (leg.status, leg.ended_by) == ("completed", "rest")
    assert leg.callback_statuses() == ["in-progress", "completed"]
    assert [delivery.http_status for delivery in leg.callbacks] == [204, 204]
    assert call.status == "completed"
