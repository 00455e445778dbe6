"""Plays Twilio against Callgate: signed voice webhooks, the calls they start, REST.

The REST side also runs subaccounts and phone numbers (§3); twilio_numbers holds
that state and lists the error codes it answers with.
"""

import base64
import binascii
import email.utils
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import DialRefusedError, PeerStateError, StreamRejected
from .serving import serve_on_loopback
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
from .twilio_numbers import (
    SUBACCOUNT_LIMIT,
    AccountRecord,
    AccountStatus,
    IncomingNumber,
    NumberConfig,
    RestRefusedError,
    TwilioDirectory,
    account_resource,
    available_resource,
    number_resource,
)
from .waiting import Changes
from .webhooks import WebhookDelivery, WebhookSender

__all__ = [
    "AccountStatus",
    "CallStatus",
    "DialRefusedError",
    "DialedLeg",
    "FakeTwilioRest",
    "IncomingNumber",
    "LegStatus",
    "ProtocolError",
    "RecordedRequest",
    "RestRefusedError",
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
    """One request FakeTwilioRest received and the HTTP status it answered.

    form is the posted body; query holds the URL's parameters, as a search sends.
    """

    method: str
    path: str
    form: Mapping[str, str]
    status: int
    query: Mapping[str, str] = field(default_factory=dict)


_ACCOUNT_BASE: Final = f"/{API_VERSION}/Accounts/{{account_sid}}"
_CALL_PATH: Final = f"{_ACCOUNT_BASE}/Calls/{{call_sid}}.json"
_ACCOUNTS_PATH: Final = f"/{API_VERSION}/Accounts.json"
_ACCOUNT_PATH: Final = f"{_ACCOUNT_BASE}.json"
_AVAILABLE_PATH: Final = (
    f"{_ACCOUNT_BASE}/AvailablePhoneNumbers/{{country}}/{{kind}}.json"
)
_NUMBERS_PATH: Final = f"{_ACCOUNT_BASE}/IncomingPhoneNumbers.json"
_NUMBER_PATH: Final = f"{_ACCOUNT_BASE}/IncomingPhoneNumbers/{{number_sid}}.json"
# Twilio's default PageSize for list resources.
_PAGE_SIZE: Final = 50


def _twilio_error(status: int, code: int, message: str) -> web.Response:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return web.json_response(body, status=status)


def _refusal(error: RestRefusedError) -> web.Response:
    response = _twilio_error(error.status, error.code, error.message)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
    return response


@web.middleware
async def _answer_refusals(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    try:
        return await handler(request)
    except RestRefusedError as exc:
        return _refusal(exc)


def _page_size(query: Mapping[str, str]) -> int:
    raw = query.get("PageSize")
    if raw is None:
        return _PAGE_SIZE
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise RestRefusedError(400, 20001, "PageSize must be 1 to 1000")
    return int(raw)


def _page(
    key: str, items: list[JsonObject], request: web.Request, page_size: int
) -> JsonObject:
    """A v2010 list answer: page 0 only, with no next page, as no test pages."""
    return {
        key: items[:page_size],
        "end": max(min(len(items), page_size) - 1, 0),
        "first_page_uri": request.path_qs,
        "next_page_uri": None,
        "page": 0,
        "page_size": page_size,
        "previous_page_uri": None,
        "start": 0,
        "uri": request.path_qs,
    }


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
    """Twilio's REST API for calls (§2.7), subaccounts and phone numbers (§3).

    Serves http://127.0.0.1:<port>, meant as CALLGATE_TWILIO_API_URL. Calls are
    live SimulatedCalls; accounts and numbers live in a TwilioDirectory, which a
    fresh fake stocks with a few numbers for sale in area codes 415 and 212.
    """

    def __init__(self, *, subaccount_limit: int = SUBACCOUNT_LIMIT) -> None:
        self.requests: list[RecordedRequest] = []
        self._recorded = Changes()
        self._directory = TwilioDirectory(subaccount_limit)
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
        """Accept Basic auth with this account's sid and token, as a main account.

        A sid the fake knows already, such as a subaccount it created, keeps its
        place; the same sid with another token raises PeerStateError.
        """
        self._directory.add_main(account)

    @property
    def subaccounts(self) -> dict[str, TwilioAccount]:
        """Every subaccount created so far, closed ones included, by sid."""
        return self._directory.subaccounts()

    def parent_of(self, sid: str) -> str | None:
        """The main account owning subaccount sid; None for a main or unknown sid."""
        record = self._directory.account(sid)
        if record is None or record.is_main:
            return None
        return record.owner_account_sid

    def account_status(self, sid: str) -> AccountStatus:
        """active, suspended or closed; PeerStateError for an unknown sid."""
        return self._known(sid).status

    def create_subaccount(
        self, parent: TwilioAccount, friendly_name: str | None = None
    ) -> TwilioAccount:
        """Create a subaccount of parent as POST /Accounts.json would, unrecorded.

        For tests that start from a workspace provisioned earlier.
        """
        record = self._directory.create_subaccount(
            self._known(parent.sid), friendly_name
        )
        return record.account

    def add_available(self, number: str, area_code: str) -> None:
        """Put an E.164 +1 number in area_code up for sale."""
        self._directory.add_available(number, area_code)

    def port_out(self, phone_number: str) -> None:
        """The number leaves Twilio for another carrier, as a port-out does."""
        number = self._directory.owned(phone_number)
        if number is None:
            raise PeerStateError(f"{phone_number} is not on this twilio")
        self._directory.release(number)

    def owner_of(self, phone_number: str) -> str | None:
        """The sid of the account that owns phone_number, None if nobody does."""
        number = self._directory.owned(phone_number)
        return None if number is None else number.account_sid

    def incoming_number(self, phone_number: str) -> IncomingNumber | None:
        """The bought number with its voice configuration, None if not owned."""
        return self._directory.owned(phone_number)

    def account_for(self, phone_number: str) -> TwilioAccount:
        """The owner of phone_number, whose token signs its webhooks (§3).

        Build the TwilioSimulator for that number with it. PeerStateError if no
        account owns the number.
        """
        owner = self.owner_of(phone_number)
        if owner is None:
            raise PeerStateError(f"no account owns {phone_number}")
        return self._known(owner).account

    def _known(self, sid: str) -> AccountRecord:
        record = self._directory.account(sid)
        if record is None:
            raise PeerStateError(f"unknown account {sid}")
        return record

    def register_call(self, call: SimulatedCall) -> None:
        """Make call reachable under its account's Calls resource."""
        self._calls[call.sid] = call

    async def start(self) -> None:
        """Listen on an ephemeral loopback port."""
        app = web.Application(middlewares=[self._record, _answer_refusals])
        app.router.add_post(_CALL_PATH, self._update_call)
        app.router.add_get(_CALL_PATH, self._fetch_call)
        app.router.add_get(_ACCOUNTS_PATH, self._list_accounts)
        app.router.add_post(_ACCOUNTS_PATH, self._create_account)
        app.router.add_get(_ACCOUNT_PATH, self._fetch_account)
        app.router.add_post(_ACCOUNT_PATH, self._update_account)
        app.router.add_get(_AVAILABLE_PATH, self._search_numbers)
        app.router.add_get(_NUMBERS_PATH, self._list_numbers)
        app.router.add_post(_NUMBERS_PATH, self._buy_number)
        app.router.add_get(_NUMBER_PATH, self._fetch_number)
        app.router.add_post(_NUMBER_PATH, self._update_number)
        app.router.add_delete(_NUMBER_PATH, self._release_number)
        self._runner, self._url = await serve_on_loopback(app)

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
        query = dict(request.query)
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
                RecordedRequest(request.method, request.path, form, status, query)
            )
            self._recorded.notify()

    def _caller(self, request: web.Request) -> AccountRecord:
        """The active account whose sid and token the request carries."""
        header = request.headers.get("Authorization", "")
        credentials = _basic_credentials(header)
        if credentials is not None:
            caller = self._directory.authenticate(*credentials)
            if caller is not None:
                return caller
        raise RestRefusedError(401, 20003, "Authenticate")

    def _authorize(self, request: web.Request) -> tuple[AccountRecord, AccountRecord]:
        """The caller and the path's account, if the caller's credentials reach it.

        A main account reaches its subaccounts; a subaccount only itself (§3).
        """
        caller = self._caller(request)
        account = self._directory.account(request.match_info["account_sid"])
        if account is None or not self._directory.may_act_on(caller, account.sid):
            raise RestRefusedError(401, 20003, "Authenticate")
        return caller, account

    def _authenticate(self, request: web.Request) -> web.Response | None:
        try:
            self._authorize(request)
        except RestRefusedError as exc:
            return _refusal(exc)
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

    # Accounts (§3) ------------------------------------------------------------

    async def _list_accounts(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        name = request.query.get("FriendlyName")
        status = request.query.get("Status")
        records = [
            record
            for record in self._directory.visible_to(caller)
            if name in (None, record.friendly_name) and status in (None, record.status)
        ]
        items = [account_resource(record) for record in records]
        page_size = _page_size(request.query)
        return web.json_response(_page("accounts", items, request, page_size))

    async def _create_account(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        form = await _form(request)
        record = self._directory.create_subaccount(caller, form.get("FriendlyName"))
        logger.info("subaccount %s created under %s", record.sid, caller.sid)
        return web.json_response(account_resource(record), status=201)

    async def _fetch_account(self, request: web.Request) -> web.Response:
        _, account = self._authorize(request)
        return web.json_response(account_resource(account))

    async def _update_account(self, request: web.Request) -> web.Response:
        caller, account = self._authorize(request)
        form = await _form(request)
        status = form.get("Status")
        self._directory.update_account(
            caller, account, status, form.get("FriendlyName")
        )
        if status is not None:
            logger.info("account %s is %s", account.sid, account.status)
        return web.json_response(account_resource(account))

    # Phone numbers (§3) -------------------------------------------------------

    async def _search_numbers(self, request: web.Request) -> web.Response:
        self._authorize(request)
        country, kind = request.match_info["country"], request.match_info["kind"]
        if (country, kind) != ("US", "Local"):
            message = f"The requested resource {request.path} was not found"
            raise RestRefusedError(404, 20404, message)
        page_size = _page_size(request.query)
        found = self._directory.search(request.query.get("AreaCode"), page_size)
        items = [available_resource(number) for number in found]
        key = "available_phone_numbers"
        return web.json_response(_page(key, items, request, page_size))

    async def _buy_number(self, request: web.Request) -> web.Response:
        _, account = self._authorize(request)
        form = await _form(request)
        number = self._directory.buy(
            account,
            form.get("PhoneNumber"),
            form.get("AreaCode"),
            NumberConfig.from_form(form),
        )
        logger.info("number %s bought into %s", number.phone_number, account.sid)
        return web.json_response(number_resource(number), status=201)

    async def _list_numbers(self, request: web.Request) -> web.Response:
        _, account = self._authorize(request)
        page_size = _page_size(request.query)
        owned = self._directory.numbers_of(
            account.sid, request.query.get("PhoneNumber")
        )
        items = [number_resource(number) for number in owned]
        key = "incoming_phone_numbers"
        return web.json_response(_page(key, items, request, page_size))

    async def _fetch_number(self, request: web.Request) -> web.Response:
        _, account = self._authorize(request)
        number = self._directory.number(account.sid, request.match_info["number_sid"])
        return web.json_response(number_resource(number))

    async def _update_number(self, request: web.Request) -> web.Response:
        caller, account = self._authorize(request)
        number = self._directory.number(account.sid, request.match_info["number_sid"])
        form = await _form(request)
        config = NumberConfig.from_form(form)
        self._directory.update_number(caller, number, form.get("AccountSid"), config)
        if number.account_sid != account.sid:
            logger.info(
                "number %s moved from %s to %s",
                number.phone_number,
                account.sid,
                number.account_sid,
            )
        return web.json_response(number_resource(number))

    async def _release_number(self, request: web.Request) -> web.Response:
        _, account = self._authorize(request)
        number = self._directory.number(account.sid, request.match_info["number_sid"])
        self._directory.release(number)
        logger.info("number %s released by %s", number.phone_number, account.sid)
        return web.Response(status=204)
