"""Twilio's HTTP webhooks: the inbound call (answered with TwiML) and call status.

Order matters: the signature is checked before any lookup that depends on the
request's content, and a rejected call is answered with ``<Reject>`` as its
first verb so Twilio leaves it unanswered and unbilled (protocols.md 1.6).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from aiohttp import web
from multidict import MultiDictProxy

from metering.ledger import CallNotFoundError, Ledger
from metering.metrics import Metrics
from router import twiml
from router.settings import Settings
from router.signatures import TwilioSigner
from router.tokens import StreamTokens
from tenancy import keyspace
from tenancy.errors import SignatureError, StoreError, UnknownNumberError
from tenancy.logs import router_logger
from tenancy.numbers import Numbers
from tenancy.problems import problem
from tenancy.workspaces import now_ms

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
SIGNER = web.AppKey("signer", TwilioSigner)
TOKENS = web.AppKey("tokens", StreamTokens)
ROUTER_NUMBERS = web.AppKey("router_numbers", Numbers)
ROUTER_LEDGER = web.AppKey("router_ledger", Ledger)

STREAM_PATH = "/twilio/stream/"


def _twiml(document: str) -> web.Response:
    return web.Response(text=document, content_type="text/xml")


async def _signed_form(request: web.Request, endpoint: str) -> MultiDictProxy[Any]:
    """The request's form fields, after its Twilio signature has been checked."""
    form = await request.post()
    url = request.app[SETTINGS].public_url + request.raw_path
    account_sid = form.get("AccountSid")
    try:
        request.app[SIGNER].verify(
            account_sid if isinstance(account_sid, str) else "",
            url,
            form,
            request.headers.get("X-Twilio-Signature"),
        )
    except SignatureError as exc:
        request.app[METRICS].webhooks.labels(endpoint, "bad_signature").inc()
        router_logger.warning("refused %s webhook: %s", endpoint, exc)
        raise
    return form


def _forbidden() -> web.Response:
    return problem(403, "bad-signature", "Forbidden", "invalid Twilio signature")


def _field(form: MultiDictProxy[Any], name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


async def voice(request: web.Request) -> web.Response:
    """``POST /twilio/voice``: route an inbound call to its workspace's agent."""
    try:
        form = await _signed_form(request, "voice")
    except SignatureError:
        return _forbidden()
    count = request.app[METRICS].webhooks
    call_sid = _field(form, "CallSid")
    to = _field(form, "To")
    account_sid = _field(form, "AccountSid")
    if not keyspace.CALL_SID.fullmatch(call_sid):
        count.labels("voice", "malformed").inc()
        return problem(400, "malformed-webhook", "Bad Request", "CallSid is malformed")

    try:
        route = await request.app[ROUTER_NUMBERS].resolve(to)
    except UnknownNumberError:
        count.labels("voice", "unknown_number").inc()
        return _twiml(twiml.reject())
    except (StoreError, redis.RedisError):
        count.labels("voice", "store_unavailable").inc()
        router_logger.error("cannot route call: store unavailable", exc_info=True)
        return _twiml(twiml.say_and_hang_up(twiml.UNAVAILABLE_MESSAGE))
    # A number recorded under a specific Twilio account only takes calls
    # signed by that account; another account's webhook for it is not ours.
    if route.number.twilio_account_sid not in (None, account_sid):
        count.labels("voice", "unknown_number").inc()
        return _twiml(twiml.reject())
    if route.workspace.status != "active":
        count.labels("voice", "suspended").inc()
        return _twiml(twiml.say_and_hang_up(twiml.NOT_IN_SERVICE_MESSAGE))

    try:
        await request.app[ROUTER_LEDGER].open_call(
            route.workspace.id,
            call_sid,
            agent_id=route.agent.id,
            from_number=_field(form, "From"),
            to_number=to,
            arrived_at_ms=now_ms(),
        )
        token = await request.app[TOKENS].issue(
            workspace_id=route.workspace.id,
            agent_id=route.agent.id,
            number=to,
            account_sid=account_sid,
            call_sid=call_sid,
        )
    except (StoreError, redis.RedisError):
        count.labels("voice", "store_unavailable").inc()
        router_logger.error("cannot route call: store unavailable", exc_info=True)
        return _twiml(twiml.say_and_hang_up(twiml.UNAVAILABLE_MESSAGE))

    count.labels("voice", "routed").inc()
    url = request.app[SETTINGS].stream_base_url + STREAM_PATH + token
    parameters = {"workspace": route.workspace.id, "agent": route.agent.id}
    return _twiml(twiml.connect_stream(url, parameters))


async def status(request: web.Request) -> web.Response:
    """``POST /twilio/status``: store Twilio's status and duration on the record."""
    try:
        form = await _signed_form(request, "status")
    except SignatureError:
        return _forbidden()
    count = request.app[METRICS].webhooks
    call_sid = _field(form, "CallSid")
    duration = _field(form, "CallDuration")
    sequence = _field(form, "SequenceNumber") or "0"
    if (
        not keyspace.CALL_SID.fullmatch(call_sid)
        or not sequence.isdigit()
        or (duration and not duration.isdigit())
    ):
        count.labels("status", "malformed").inc()
        return problem(400, "malformed-webhook", "Bad Request", "malformed callback")

    workspace_id = await request.app[ROUTER_NUMBERS].owner(_field(form, "To"))
    if workspace_id is None:
        count.labels("status", "unknown_call").inc()
        return web.Response(status=204)
    try:
        applied = await request.app[ROUTER_LEDGER].record_twilio_status(
            workspace_id,
            call_sid,
            status=_field(form, "CallStatus"),
            call_duration_secs=int(duration) if duration else None,
            sequence=int(sequence),
        )
    except CallNotFoundError:
        count.labels("status", "unknown_call").inc()
        return web.Response(status=204)
    count.labels("status", "recorded" if applied else "stale").inc()
    return web.Response(status=204)
