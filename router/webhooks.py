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

from media.retell import RetellClient, sip_uri
from metering.ledger import CallNotFoundError
from metering.meter import Meter
from metering.metrics import Metrics
from router import budget, reconcile, twiml
from router.settings import Settings
from router.settlement import TERMINAL, settle_sip_call
from router.signatures import TwilioSigner
from router.tokens import StreamTokens
from tenancy import api, keyspace
from tenancy.errors import (
    SealError,
    SignatureError,
    StoreError,
    UnknownNumberError,
    UpstreamError,
)
from tenancy.logs import router_logger
from tenancy.numbers import Route
from tenancy.problems import problem
from tenancy.workspaces import now_ms

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
SIGNER = web.AppKey("signer", TwilioSigner)
TOKENS = web.AppKey("tokens", StreamTokens)

RETELL = web.AppKey("retell", RetellClient)
METER = web.AppKey("meter", Meter)

STREAM_PATH = "/twilio/stream/"
SIP_STATUS_PATH = "/twilio/sip-status/"
DIAL_ACTION_PATH = "/twilio/dial-action/"
# The longest a SIP-routed call may last, as Twilio's <Dial timeLimit> (4 h).
MAX_CALL_SECS = 4 * 3600


def twiml_response(document: str) -> web.Response:
    return web.Response(text=document, content_type="text/xml")


async def signed_form(request: web.Request, endpoint: str) -> MultiDictProxy[Any]:
    """The request's form fields, after its Twilio signature has been checked."""
    form = await request.post()
    url = request.app[SETTINGS].public_url + request.raw_path
    account_sid = form.get("AccountSid")
    try:
        await request.app[SIGNER].verify(
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


def forbidden() -> web.Response:
    return problem(403, "bad-signature", "Forbidden", "invalid Twilio signature")


def field(form: MultiDictProxy[Any], name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


async def voice(request: web.Request) -> web.Response:
    """``POST /twilio/voice``: route an inbound call to its workspace's agent."""
    try:
        form = await signed_form(request, "voice")
    except SignatureError:
        return forbidden()
    count = request.app[METRICS].webhooks
    call_sid = field(form, "CallSid")
    to = field(form, "To")
    account_sid = field(form, "AccountSid")
    if not keyspace.CALL_SID.fullmatch(call_sid):
        count.labels("voice", "malformed").inc()
        return problem(400, "malformed-webhook", "Bad Request", "CallSid is malformed")

    try:
        route = await request.app[api.NUMBERS].resolve(to)
    except UnknownNumberError:
        count.labels("voice", "unknown_number").inc()
        return twiml_response(twiml.reject())
    except (StoreError, redis.RedisError):
        count.labels("voice", "store_unavailable").inc()
        router_logger.error("cannot route call: store unavailable", exc_info=True)
        return twiml_response(twiml.say_and_hang_up(twiml.UNAVAILABLE_MESSAGE))
    # A number recorded under a specific Twilio account only takes calls
    # signed by that account; another account's webhook for it is not ours.
    if route.number.twilio_account_sid not in (None, account_sid):
        count.labels("voice", "unknown_number").inc()
        return twiml_response(twiml.reject())
    if route.workspace.status != "active":
        count.labels("voice", "suspended").inc()
        return twiml_response(twiml.say_and_hang_up(twiml.NOT_IN_SERVICE_MESSAGE))

    try:
        # A call already past routing (a replayed or late-retried webhook for
        # it) is not admitted again: that would reopen its record and bill
        # the time since it started once more.
        try:
            seen = await request.app[api.LEDGER].get_call(route.workspace.id, call_sid)
        except CallNotFoundError:
            seen = None
        if seen is not None and seen.status != "routed":
            count.labels("voice", "replayed").inc()
            return twiml_response(twiml.reject())
        plan = await request.app[api.WORKSPACES].plan(route.workspace.id)
        admission = None
        if plan is not None:
            admission = await budget.admit(
                request.app[api.QUOTA],
                plan,
                route,
                call_sid,
                account_sid,
                request.app[SETTINGS],
            )
    except (StoreError, redis.RedisError):
        count.labels("voice", "store_unavailable").inc()
        router_logger.error("cannot admit call: store unavailable", exc_info=True)
        return twiml_response(twiml.say_and_hang_up(twiml.UNAVAILABLE_MESSAGE))
    if plan is not None and admission is not None and admission.refused:
        count.labels("voice", f"refused_{admission.refused}").inc()
        request.app[METRICS].admissions_rejected.labels(
            route.workspace.id, admission.refused
        ).inc()
        return twiml_response(twiml.refuse(plan, admission.refused))

    try:
        await request.app[api.LEDGER].open_call(
            route.workspace.id,
            call_sid,
            agent_id=route.agent.id,
            from_number=field(form, "From"),
            to_number=to,
            arrived_at_ms=now_ms(),
            account_sid=account_sid,
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
        return twiml_response(twiml.say_and_hang_up(twiml.UNAVAILABLE_MESSAGE))

    if route.agent.provider == "retell":
        # <Dial timeLimit> backs the live cut-off up: it ends the SIP leg when
        # the budget left at admission runs out, whatever else fails.
        limit_secs = MAX_CALL_SECS
        if admission is not None:
            limit_secs = max(1, min(MAX_CALL_SECS, admission.available_ms // 1000))
        return await _route_to_retell(
            request, route, call_sid, field(form, "From"), limit_secs
        )
    count.labels("voice", "routed").inc()
    url = request.app[SETTINGS].stream_base_url + STREAM_PATH + token
    parameters = {"workspace": route.workspace.id, "agent": route.agent.id}
    return twiml_response(twiml.connect_stream(url, parameters))


async def _route_to_retell(
    request: web.Request,
    route: Route,
    call_sid: str,
    from_number: str,
    time_limit_secs: int,
) -> web.Response:
    """Register the call with Retell and dial its SIP URI; no media via Callgate.

    Metering follows the SIP leg's call-progress callbacks (router.sip).
    """
    app = request.app
    workspace = route.workspace
    try:
        api_key = await app[api.WORKSPACES].agent_api_key(workspace.id, route.agent.id)
        with app[METRICS].upstream_connect.labels("retell").time():
            call_id = await app[RETELL].register(
                api_key=api_key,
                agent_id=route.agent.assistant_id,
                from_number=from_number,
                to_number=route.number.e164,
                metadata={
                    "callgate_workspace_id": workspace.id,
                    "twilio_call_sid": call_sid,
                },
            )
        await app[api.LEDGER].set_fields(
            workspace.id, call_sid, {"provider": "retell", "provider_call_id": call_id}
        )
    except UpstreamError as exc:
        app[METRICS].upstream_errors.labels("retell", "connect").inc()
        router_logger.warning("retell refused call %s: %s", call_sid, exc)
        await _close_unconnected(app, workspace.id, route, call_sid)
        app[METRICS].fallbacks.labels("done").inc()
        return twiml_response(twiml.fallback(workspace.policy))
    except (SealError, StoreError, redis.RedisError):
        app[METRICS].webhooks.labels("voice", "store_unavailable").inc()
        router_logger.error("cannot route call to retell", exc_info=True)
        return twiml_response(twiml.say_and_hang_up(twiml.UNAVAILABLE_MESSAGE))

    app[METRICS].webhooks.labels("voice", "routed").inc()
    base = app[SETTINGS].public_url
    document = twiml.dial_sip(
        sip_uri(call_id),
        time_limit_secs=time_limit_secs,
        action_url=base + DIAL_ACTION_PATH + workspace.id,
        status_url=base + SIP_STATUS_PATH + workspace.id,
    )
    return twiml_response(document)


async def _close_unconnected(
    app: web.Application, workspace_id: str, route: Route, call_sid: str
) -> None:
    try:
        await app[METER].close_unstarted(
            workspace_id,
            call_sid,
            agent_id=route.agent.id,
            number=route.number.e164,
            reason="upstream_failed",
        )
    except redis.RedisError:
        router_logger.warning("could not close call %s", call_sid, exc_info=True)


async def status(request: web.Request) -> web.Response:
    """``POST /twilio/status``: store Twilio's status and duration on the record."""
    try:
        form = await signed_form(request, "status")
    except SignatureError:
        return forbidden()
    count = request.app[METRICS].webhooks
    call_sid = field(form, "CallSid")
    duration = field(form, "CallDuration")
    sequence = field(form, "SequenceNumber") or "0"
    if (
        not keyspace.CALL_SID.fullmatch(call_sid)
        or not sequence.isdigit()
        or (duration and not duration.isdigit())
    ):
        count.labels("status", "malformed").inc()
        return problem(400, "malformed-webhook", "Bad Request", "malformed callback")

    workspace_id = await request.app[api.NUMBERS].owner(field(form, "To"))
    if workspace_id is None:
        count.labels("status", "unknown_call").inc()
        return web.Response(status=204)
    try:
        applied = await request.app[api.LEDGER].record_twilio_status(
            workspace_id,
            call_sid,
            status=field(form, "CallStatus"),
            call_duration_secs=int(duration) if duration else None,
            sequence=int(sequence),
        )
    except CallNotFoundError:
        count.labels("status", "unknown_call").inc()
        return web.Response(status=204)
    count.labels("status", "recorded" if applied else "stale").inc()
    status = field(form, "CallStatus")
    if applied and (duration or status in TERMINAL):
        record = await request.app[api.LEDGER].get_call(workspace_id, call_sid)
        if record.provider == "retell" and status in TERMINAL:
            # The caller's leg is over, so is its SIP leg: settle the call
            # here if neither of the leg's own reports of its end arrived.
            await settle_sip_call(
                request.app[METER],
                request.app[api.WORKSPACES],
                record,
                status,
                "call_status",
            )
        if duration and record.status == "completed":
            reconcile.observe(request.app[METRICS], record, int(duration), "callback")
    return web.Response(status=204)
