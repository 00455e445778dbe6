"""Plays Retell against Callgate: register-phone-call, and the SIP side of the dial."""

import asyncio
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from aiohttp import web

from .errors import PeerStateError, PeerTimeoutError
from .serving import serve_on_loopback
from .sip import HangUpBy, SipUri, parse_sip_uri

__all__ = [
    "REGISTRATION_TTL_SECS",
    "FakeRetell",
    "RetellCallStatus",
    "RetellRegistration",
    "register_problems",
]

logger = logging.getLogger("tests.peers")

JsonObject = dict[str, Any]
RetellCallStatus = Literal["registered", "not_connected", "ongoing", "ended", "error"]

# §6.1: a registered call id must be dialed within 5 minutes.
REGISTRATION_TTL_SECS: Final = 300.0
SIP_HOST: Final = "sip.retellai.com"
# The SIP answer to an INVITE for a call id Retell does not hold.
SIP_NOT_FOUND: Final = 404
_E164: Final = re.compile(r"\+[1-9][0-9]{1,14}")
_OVERRIDE_PARTS: Final = frozenset({"agent", "retell_llm", "conversation_flow"})
_REGISTER_FIELDS: Final = frozenset(
    {
        "agent_id",
        "agent_version",
        "agent_override",
        "direction",
        "from_number",
        "to_number",
        "metadata",
        "retell_llm_dynamic_variables",
    }
)
# Who hung up, as Retell's disconnection_reason names it. Twilio cutting the leg
# at its time limit or on a REST update reaches Retell as the user's BYE.
_DISCONNECTION_REASONS: Final[dict[str, str]] = {
    "callee": "agent_hangup",
    "caller": "user_hangup",
    "limit": "user_hangup",
    "rest": "user_hangup",
}


def register_problems(body: object) -> list[str]:
    """List what is wrong with a POST /v2/register-phone-call body (§6.1).

    Fields follow retell-python-sdk's CallRegisterPhoneCallParams; null counts
    as absent for the optional ones. Unknown fields are refused, so a misspelt
    field fails the test instead of being dropped.
    """
    if not isinstance(body, dict):
        return ["body must be a json object"]
    problems = [
        f"unknown field {name}" for name in sorted(set(body) - _REGISTER_FIELDS)
    ]
    agent_id = body.get("agent_id")
    if not isinstance(agent_id, str) or not agent_id:
        problems.append("agent_id must be a non-empty string")
    version = body.get("agent_version")
    # bool is an int subclass, and true is no version.
    if version is not None and (
        not isinstance(version, int) or isinstance(version, bool) or version < 0
    ):
        problems.append("agent_version must be a non-negative integer")
    if body.get("direction") not in (None, "inbound", "outbound"):
        problems.append("direction must be inbound or outbound")
    for name in ("from_number", "to_number"):
        number = body.get(name)
        if number is not None and (
            not isinstance(number, str) or not _E164.fullmatch(number)
        ):
            problems.append(f"{name} must be an E.164 number")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        problems.append("metadata must be an object")
    problems.extend(_override_problems(body.get("agent_override")))
    variables = body.get("retell_llm_dynamic_variables")
    if variables is not None and (
        not isinstance(variables, dict)
        or not all(isinstance(value, str) for value in variables.values())
    ):
        problems.append("retell_llm_dynamic_variables must map strings to strings")
    return problems


def _override_problems(override: object) -> list[str]:
    if override is None:
        return []
    if not isinstance(override, dict):
        return ["agent_override must be an object"]
    problems = [
        f"agent_override.{name} is not agent, retell_llm or conversation_flow"
        for name in sorted(set(override) - _OVERRIDE_PARTS)
    ]
    for name in sorted(set(override) & _OVERRIDE_PARTS):
        if not isinstance(override[name], dict):
            problems.append(f"agent_override.{name} must be an object")
    return problems


def _error(status: int, message: str) -> web.Response:
    # Unverified against real Retell: the SDK reads only the HTTP status, so
    # the fake answers a plain message.
    return web.json_response({"status": status, "message": message}, status=status)


def _epoch_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class RetellRegistration:
    """One call id issued by register-phone-call, and what became of it.

    Times ending in _at are event-loop seconds (loop.time()); _ms fields are
    Unix epoch milliseconds, as Retell's API reports them.
    """

    call_id: str
    api_key: str
    request_json: JsonObject
    registered_at: float
    call_status: RetellCallStatus = "registered"
    invited_by: str | None = None
    twilio_call_sid: str | None = None
    connected_at: float | None = None
    start_timestamp_ms: int | None = None
    ended_at: float | None = None
    end_timestamp_ms: int | None = None
    disconnection_reason: str | None = None
    refused_invites: list[int] = field(default_factory=list)


class FakeRetell:
    """Retell's REST API (aiohttp, 127.0.0.1) and its SIP server's call admission.

    Pass it to TwilioSimulator as sip_endpoint: a <Dial><Sip> to
    sip:CALL_ID@sip.retellai.com then connects only for a registered, unexpired,
    unused call id, and the registration follows the leg (ongoing, ended).
    Failure knobs: register_status_override answers POST /v2/register-phone-call
    with that status; register_delay_secs holds the answer back (seconds);
    registration_ttl_secs shortens the 5-minute expiry for tests.
    """

    def __init__(self) -> None:
        self.registrations: dict[str, RetellRegistration] = {}
        self.register_attempts = 0
        self.register_status_override: int | None = None
        self.register_delay_secs = 0.0
        self.registration_ttl_secs = REGISTRATION_TTL_SECS
        self.sip_host = SIP_HOST
        self._keys: set[str] = set()
        self._registered: asyncio.Queue[RetellRegistration] = asyncio.Queue()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._api_url: str | None = None

    @property
    def api_url(self) -> str:
        """Base URL of the REST API, e.g. http://127.0.0.1:41236."""
        if self._api_url is None:
            raise PeerStateError("fake retell is not started")
        return self._api_url

    def add_key(self, key: str) -> None:
        """Accept this API key as a bearer token."""
        self._keys.add(key)

    async def start(self) -> None:
        """Listen on an ephemeral loopback port."""
        app = web.Application()
        app.router.add_post("/v2/register-phone-call", self._register)
        app.router.add_get("/v2/get-call/{call_id}", self._get_call)
        self._runner, self._api_url = await serve_on_loopback(app)

    async def close(self) -> None:
        """Stop serving; a delayed registration answer is cut short."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for_registration(self, timeout_secs: float) -> RetellRegistration:
        """Return the next registration not yet returned, oldest first."""
        try:
            async with asyncio.timeout(timeout_secs):
                return await self._registered.get()
        except TimeoutError as exc:
            raise PeerTimeoutError("a retell call registration", timeout_secs) from exc

    def sip_uri(self, call_id: str) -> str:
        """The URI Twilio should dial for call_id (§6.1), over TCP."""
        return f"sip:{call_id}@{self.sip_host};transport=tcp"

    def expired(self, call_id: str, now: float) -> bool:
        """True once an undialed registration is registration_ttl_secs old.

        now is event-loop seconds. Raises PeerStateError for an unknown call id.
        """
        registration = self._registration(call_id)
        if registration.connected_at is not None or registration.invited_by:
            return False
        return now - registration.registered_at >= self.registration_ttl_secs

    def accepts(self, sip_uri: str) -> bool:
        """True if an INVITE to sip_uri would be accepted now."""
        uri = parse_sip_uri(sip_uri)
        return uri is not None and self._refusal(uri) is None

    # SipEndpoint -------------------------------------------------------------

    def sip_invite(self, uri: SipUri, call_sid: str) -> int | None:
        """Admit an INVITE for a registered, unexpired, undialed call id."""
        refusal = self._refusal(uri)
        registration = self.registrations.get(uri.user)
        if registration is not None and refusal is None:
            registration.invited_by = call_sid
            return None
        refusal = refusal or SIP_NOT_FOUND
        if registration is not None:
            registration.refused_invites.append(refusal)
            self._note_expiry(registration)
        logger.info("retell refused sip %s with %d", uri.text, refusal)
        return refusal

    def sip_answered(self, uri: SipUri, call_sid: str) -> None:
        """The agent picked up: the call is ongoing from now."""
        registration = self._registration(uri.user)
        registration.call_status = "ongoing"
        registration.twilio_call_sid = call_sid
        registration.connected_at = asyncio.get_running_loop().time()
        registration.start_timestamp_ms = _epoch_ms()
        logger.info("retell call %s connected", uri.user)

    def sip_ended(self, uri: SipUri, by: HangUpBy) -> None:
        """BYE (or CANCEL, if never answered) for an admitted call."""
        registration = self._registration(uri.user)
        registration.ended_at = asyncio.get_running_loop().time()
        registration.end_timestamp_ms = _epoch_ms()
        if registration.connected_at is None:
            registration.call_status = "not_connected"
        else:
            registration.call_status = "ended"
            registration.disconnection_reason = _DISCONNECTION_REASONS[by]
        logger.info("retell call %s %s", uri.user, registration.call_status)

    def _refusal(self, uri: SipUri) -> int | None:
        registration = self.registrations.get(uri.user)
        if uri.host != self.sip_host or registration is None:
            return SIP_NOT_FOUND
        # A call id carries one call; a second INVITE finds nothing to join.
        # Unverified against real Retell, which may answer another 4xx.
        if registration.invited_by is not None:
            return SIP_NOT_FOUND
        if self.expired(uri.user, asyncio.get_running_loop().time()):
            return SIP_NOT_FOUND
        return None

    def _note_expiry(self, registration: RetellRegistration) -> None:
        now = asyncio.get_running_loop().time()
        if registration.call_status == "registered" and self.expired(
            registration.call_id, now
        ):
            # Unverified which status Retell shows; the reason is documented.
            registration.call_status = "ended"
            registration.disconnection_reason = "registered_call_timeout"

    def _registration(self, call_id: str) -> RetellRegistration:
        registration = self.registrations.get(call_id)
        if registration is None:
            raise PeerStateError(f"no retell registration {call_id}")
        return registration

    # REST --------------------------------------------------------------------

    async def _register(self, request: web.Request) -> web.Response:
        self.register_attempts += 1
        if self.register_delay_secs > 0:
            # Hold the answer back, but let close() cut the wait short.
            try:
                async with asyncio.timeout(self.register_delay_secs):
                    await self._closing.wait()
            except TimeoutError:
                pass
        if self.register_status_override is not None:
            return _error(self.register_status_override, "injected failure")

        key = _bearer_key(request)
        if key is None or key not in self._keys:
            return _error(401, "invalid api key")
        try:
            body = json.loads(await request.text())
        except ValueError:
            return _error(400, "body must be valid json")
        problems = register_problems(body)
        if problems:
            return _error(400, "; ".join(problems))

        loop = asyncio.get_running_loop()
        call_id = secrets.token_hex(16)
        registration = RetellRegistration(call_id, key, body, loop.time())
        self.registrations[call_id] = registration
        self._registered.put_nowait(registration)
        logger.info("retell call %s registered", call_id)
        return web.json_response(self._phone_call(registration), status=201)

    async def _get_call(self, request: web.Request) -> web.Response:
        key = _bearer_key(request)
        if key is None or key not in self._keys:
            return _error(401, "invalid api key")
        registration = self.registrations.get(request.match_info["call_id"])
        if registration is None or registration.api_key != key:
            return _error(404, "call not found")
        self._note_expiry(registration)
        return web.json_response(self._phone_call(registration))

    def _phone_call(self, registration: RetellRegistration) -> JsonObject:
        request = registration.request_json
        body: JsonObject = {
            "call_id": registration.call_id,
            "call_type": "phone_call",
            "call_status": registration.call_status,
            "agent_id": request["agent_id"],
            "agent_version": request.get("agent_version") or 0,
            "direction": request.get("direction") or "inbound",
        }
        for name in ("from_number", "to_number", "metadata"):
            if request.get(name) is not None:
                body[name] = request[name]
        body["retell_llm_dynamic_variables"] = (
            request.get("retell_llm_dynamic_variables") or {}
        )
        if registration.twilio_call_sid is not None:
            body["telephony_identifier"] = {
                "twilio_call_sid": registration.twilio_call_sid
            }
        if registration.start_timestamp_ms is not None:
            body["start_timestamp"] = registration.start_timestamp_ms
        if registration.end_timestamp_ms is not None:
            body["end_timestamp"] = registration.end_timestamp_ms
            if registration.start_timestamp_ms is not None:
                duration_ms = (
                    registration.end_timestamp_ms - registration.start_timestamp_ms
                )
                body["duration_ms"] = duration_ms
        if registration.disconnection_reason is not None:
            body["disconnection_reason"] = registration.disconnection_reason
        return body


def _bearer_key(request: web.Request) -> str | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()
