"""Plays Twilio against Callgate: signed voice webhooks, the calls they start, REST."""

import base64
import binascii
import email.utils
import hmac
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import DialRefusedError, PeerStateError, StreamRejected
from .sip import SipEndpoint
from .twilio_auth import (
    API_VERSION,
    TwilioAccount,
    new_account,
    new_call_sid,
    new_stream_sid,
    sign,
)
from .twilio_call import TERMINAL_STATUSES, CallStatus, ProtocolError, SimulatedCall
from .twilio_dial import DialedLeg, LegStatus
from .waiting import Changes
from .webhooks import WebhookDelivery, WebhookSender

__all__ = [
    "CallStatus",
    "DialRefusedError",
    "DialedLeg",
    "FakeTwilioRest",
    "LegStatus",
    "ProtocolError",
    "RecordedRequest",
    "SimulatedCall",
    "StreamRejected",
    "TwilioAccount",
    "TwilioSimulator",
    "WebhookDelivery",
    "new_account",
    "new_call_sid",
    "new_stream_sid",
    "sign",
]

logger = logging.getLogger("tests.peers")

JsonObject = dict[str, Any]


class TwilioSimulator:
    """Sends Twilio's voice webhooks for one account's number to the server under test.

    voice_url and status_url are the URLs configured on the number; they are what
    gets signed, so they must match what the server reconstructs. sip_endpoint
    answers <Dial><Sip> INVITEs (a FakeRetell); without one every SIP target
    rings. rest, if given, learns every placed call, so REST updates reach it.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        account: TwilioAccount,
        voice_url: str,
        status_url: str,
        *,
        request_timeout_secs: float = 15.0,
        sip_endpoint: SipEndpoint | None = None,
        rest: "FakeTwilioRest | None" = None,
    ) -> None:
        self.session = session
        self.account = account
        self.voice_url = voice_url
        self.status_url = status_url
        self.request_timeout_secs = request_timeout_secs
        self.sip_endpoint = sip_endpoint
        self.rest = rest
        self.webhooks = WebhookSender(session, account, request_timeout_secs)
        self.calls: list[SimulatedCall] = []
        if rest is not None:
            rest.add_account(account)

    async def place_call(
        self,
        to: str,
        from_: str,
        call_sid: str | None = None,
        extra_params: Mapping[str, str] | None = None,
        signature: str | None = None,
    ) -> SimulatedCall:
        """POST the inbound-call webhook (§1.1) and return the call its TwiML starts.

        signature replaces the correct X-Twilio-Signature, for negative tests.
        """
        params = {
            "AccountSid": self.account.sid,
            "ApiVersion": API_VERSION,
            "CallSid": call_sid or new_call_sid(),
            "CallStatus": "ringing",
            "Called": to,
            "CalledCountry": "US",
            "Caller": from_,
            "CallerCountry": "US",
            "Direction": "inbound",
            "From": from_,
            "FromCountry": "US",
            "To": to,
            "ToCountry": "US",
        }
        params.update(extra_params or {})
        status, text = await self._post(self.voice_url, params, signature)
        call = SimulatedCall(
            self.account,
            params,
            status,
            text,
            document_url=self.voice_url,
            webhooks=self.webhooks,
            sip_endpoint=self.sip_endpoint,
        )
        self.calls.append(call)
        if self.rest is not None:
            self.rest.register_call(call)
        logger.info("call %s placed: http %d, %s", call.sid, status, call.status)
        return call

    async def send_status_callback(
        self,
        call: SimulatedCall,
        status: CallStatus = "completed",
        duration_secs: int | None = None,
        signature: str | None = None,
    ) -> int:
        """POST a status callback (§1.2) for call and return the HTTP status.

        duration_secs defaults to the call's own answer-to-hang-up time; Duration is
        sent as whole minutes rounded up, as Twilio bills.
        """
        params = call.status_callback_params(status, duration_secs)
        http_status, _ = await self._post(self.status_url, params, signature)
        return http_status

    async def close(self) -> None:
        """Close every call this simulator placed."""
        for call in self.calls:
            await call.aclose()

    async def _post(
        self, url: str, params: Mapping[str, str], signature: str | None
    ) -> tuple[int, str]:
        return await self.webhooks.request(url, params, signature)


def _rfc2822(moment: datetime | None) -> str | None:
    return None if moment is None else email.utils.format_datetime(moment)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request FakeTwilioRest received and the HTTP status it answered."""

    method: str
    path: str
    form: Mapping[str, str]
    status: int


_CALL_PATH: Final = "/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"


def _twilio_error(status: int, code: int, message: str) -> web.Response:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return web.json_response(body, status=status)


def _basic_credentials(header: str) -> tuple[str, str] | None:
    """Return (login, password) from an Authorization header, None if not Basic."""
    # aiohttp.BasicAuth is deprecated from aiohttp 3.14 on, so parse by hand.
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    login, colon, password = decoded.partition(":")
    return (login, password) if colon else None


async def _form(request: web.Request) -> dict[str, str]:
    # aiohttp caches the parsed body, so the recorder and the handler share it.
    posted = await request.post()
    return {name: value for name, value in posted.items() if isinstance(value, str)}


class FakeTwilioRest:
    """Twilio's REST API for calls (§2.7), acting on live SimulatedCalls.

    Serves http://127.0.0.1:<port>, meant as CALLGATE_TWILIO_API_URL.
    """

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._recorded = Changes()
        self._accounts: dict[str, TwilioAccount] = {}
        self._calls: dict[str, SimulatedCall] = {}
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Base URL, without a trailing slash."""
        if self._url is None:
            raise PeerStateError("fake twilio rest is not started")
        return self._url

    def add_account(self, account: TwilioAccount) -> None:
        """Accept Basic auth with this account's sid and token."""
        self._accounts[account.sid] = account

    def register_call(self, call: SimulatedCall) -> None:
        """Make call reachable under its account's Calls resource."""
        self._calls[call.sid] = call

    async def start(self) -> None:
        """Listen on an ephemeral loopback port."""
        app = web.Application(middlewares=[self._record])
        app.router.add_post(_CALL_PATH, self._update_call)
        app.router.add_get(_CALL_PATH, self._fetch_call)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self._url = f"http://{host}:{port}"

    async def close(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for_requests(
        self,
        matches: Callable[[RecordedRequest], bool],
        count: int,
        timeout_secs: float,
    ) -> None:
        """Wait until ``count`` recorded requests satisfy ``matches``."""
        await self._recorded.wait_until(
            lambda: sum(1 for r in self.requests if matches(r)) >= count,
            f"{count} matching REST requests",
            timeout_secs,
        )

    def count(self, method: str, status: int | None = None) -> int:
        """Count recorded requests by method (and answered status, if given)."""
        return sum(
            1
            for r in self.requests
            if r.method == method and (status is None or r.status == status)
        )

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        form = await _form(request)
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            self.requests.append(
                RecordedRequest(request.method, request.path, form, status)
            )
            self._recorded.notify()

    def _authenticate(self, request: web.Request) -> web.Response | None:
        account = self._accounts.get(request.match_info["account_sid"])
        credentials = _basic_credentials(request.headers.get("Authorization", ""))
        if (
            account is None
            or credentials is None
            or credentials[0] != account.sid
            or not hmac.compare_digest(credentials[1], account.auth_token)
        ):
            response = _twilio_error(401, 20003, "Authenticate")
            response.headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
            return response
        return None

    def _find_call(self, request: web.Request) -> SimulatedCall | None:
        call = self._calls.get(request.match_info["call_sid"])
        if call is None or call.account.sid != request.match_info["account_sid"]:
            return None
        return call

    def _find_leg(self, request: web.Request) -> tuple[SimulatedCall, DialedLeg] | None:
        """The dialed child leg a path names, with the call that placed it."""
        child_sid = request.match_info["call_sid"]
        for call in self._calls.values():
            if call.account.sid != request.match_info["account_sid"]:
                continue
            for leg in call.dial_legs:
                if leg.child_sid == child_sid:
                    return call, leg
        return None

    def _not_found(self, request: web.Request) -> web.Response:
        message = f"The requested resource {request.path} was not found"
        return _twilio_error(404, 20404, message)

    async def _fetch_call(self, request: web.Request) -> web.Response:
        refusal = self._authenticate(request)
        if refusal is not None:
            return refusal
        call = self._find_call(request)
        if call is not None:
            return web.json_response(self._resource(call, request.path))
        found = self._find_leg(request)
        if found is not None:
            return web.json_response(self._leg_resource(*found, request.path))
        return self._not_found(request)

    async def _update_call(self, request: web.Request) -> web.Response:
        refusal = self._authenticate(request)
        if refusal is not None:
            return refusal
        call = self._find_call(request)
        if call is None:
            found = self._find_leg(request)
            if found is None:
                return self._not_found(request)
            return await self._update_leg(request, *found)

        form = await _form(request)
        status = form.get("Status")
        twiml = form.get("Twiml")
        url = form.get("Url")
        if status is not None:
            if status not in ("completed", "canceled"):
                return _twilio_error(400, 21218, f"Invalid Status: {status}")
            # canceled only touches queued or ringing calls, which never last
            # past place_call here, so it changes nothing.
            if status == "completed" and call.status == "in-progress":
                call.complete_via_rest()
        elif twiml is not None or url is not None:
            if call.status != "in-progress":
                message = "Call is not in-progress. Cannot redirect."
                return _twilio_error(400, 21220, message)
            call.redirect_via_rest(twiml, url)
        else:
            return _twilio_error(400, 20001, "Missing Status, Twiml or Url")
        return web.json_response(self._resource(call, request.path))

    async def _update_leg(
        self, request: web.Request, call: SimulatedCall, leg: DialedLeg
    ) -> web.Response:
        """REST on a child sid: Status=completed ends the leg; the parent goes on."""
        form = await _form(request)
        status = form.get("Status")
        if status is None:
            # Unverified whether Twilio redirects a <Dial> child; not simulated.
            message = "the simulator only updates a dialed leg with Status"
            return _twilio_error(400, 20001, message)
        if status not in ("completed", "canceled"):
            return _twilio_error(400, 21218, f"Invalid Status: {status}")
        if status == "completed" and leg.live:
            leg.complete_via_rest()
        return web.json_response(self._leg_resource(call, leg, request.path))

    def _resource(self, call: SimulatedCall, path: str) -> JsonObject:
        ended = call.status in TERMINAL_STATUSES
        duration = call.duration_secs if ended else None
        started_utc = call.created_at_utc if call.answered_at is not None else None
        return {
            "sid": call.sid,
            "account_sid": call.account.sid,
            "parent_call_sid": None,
            "status": call.status,
            "to": call.to,
            "from": call.from_,
            "direction": "inbound",
            "api_version": API_VERSION,
            "date_created": _rfc2822(call.created_at_utc),
            "date_updated": _rfc2822(call.ended_at_utc or call.created_at_utc),
            "start_time": _rfc2822(started_utc),
            "end_time": _rfc2822(call.ended_at_utc),
            "duration": None if duration is None else str(duration),
            "price": None,
            "price_unit": "USD",
            "answered_by": None,
            "uri": path,
        }

    def _leg_resource(
        self, call: SimulatedCall, leg: DialedLeg, path: str
    ) -> JsonObject:
        updated = leg.ended_at_utc or leg.answered_at_utc or leg.created_at_utc
        return {
            "sid": leg.child_sid,
            "account_sid": call.account.sid,
            "parent_call_sid": call.sid,
            "status": leg.status,
            "to": leg.target,
            "from": leg.spec.caller_id or call.from_,
            "direction": "outbound-dial",
            "api_version": API_VERSION,
            "date_created": _rfc2822(leg.created_at_utc),
            "date_updated": _rfc2822(updated),
            "start_time": _rfc2822(leg.answered_at_utc),
            "end_time": _rfc2822(leg.ended_at_utc),
            "duration": None if leg.live else str(leg.duration_secs),
            "price": None,
            "price_unit": "USD",
            "answered_by": None,
            "uri": path,
        }
