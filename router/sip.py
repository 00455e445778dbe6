"""The SIP path's callbacks: metering a Retell call from Twilio's view of its leg.

Twilio reports the dialled SIP leg's progress to ``/twilio/sip-status/{ws}``:
``answered`` starts the meter, a terminal status settles it (any process may
receive either; see Meter.end_call). When the leg ends Twilio asks
``/twilio/dial-action/{ws}`` what to do next: hang up after a call that took
place, or the workspace's fallback when Retell could not be reached.
"""

from __future__ import annotations

import redis.asyncio as redis
from aiohttp import web

from metering.ledger import CallNotFoundError
from metering.meter import Budget, CallSession, Exhausted
from metering.plans import day_of, period_of
from router import twiml
from router.settlement import TERMINAL, settle_sip_call, sip_leg
from router.stream import TWILIO_API, call_budget_of
from router.webhooks import (
    METER,
    METRICS,
    SETTINGS,
    field,
    forbidden,
    signed_form,
    twiml_response,
)
from tenancy import api, keyspace
from tenancy.errors import NotFoundError, SignatureError, StoreError
from tenancy.logs import router_logger
from tenancy.problems import problem
from tenancy.twilio_api import TwilioApiError
from tenancy.workspaces import now_ms


async def _sip_budget(
    app: web.Application, workspace_id: str, call_sid: str, account_sid: str
) -> tuple[Budget | None, Exhausted | None]:
    """A SIP call's budget under its workspace's plan, and how it is cut off."""
    plan, call_budget = await call_budget_of(app, workspace_id, call_sid)
    if plan is None:
        return None, None
    api_client = app[TWILIO_API]

    async def time_up(session: CallSession) -> None:
        # The SIP leg carries no media through Callgate: end it by
        # redirecting the parent call to the plan's goodbye.
        try:
            await api_client.redirect(account_sid, call_sid, twiml.time_up(plan))
        except TwilioApiError:
            router_logger.warning("could not cut off call %s", call_sid)

    return call_budget, time_up


class SipAdopter:
    """Carries on metering the SIP calls of a process that died.

    A Retell call's audio never passes through Callgate, so the death of the
    process metering it does not end it: when its lease lapses, the sweeper
    asks this adopter first. A leg Twilio says is over is settled at its
    length; a live one is taken over, lease, grant and all, and metered here
    from its start, so a deploy neither drops the call nor loses its time.
    """

    def __init__(self, app: web.Application) -> None:
        self._app = app

    async def adopt(self, workspace_id: str, call_sid: str) -> bool:
        """Take or settle the lapsed call; False to leave it to the sweeper."""
        app = self._app
        try:
            record = await app[api.LEDGER].get_call(workspace_id, call_sid)
        except CallNotFoundError:
            return False
        if (
            record.provider != "retell"
            or record.account_sid is None
            or record.started_at_ms is None
            or record.ended_at_ms is not None
        ):
            return False
        leg = await sip_leg(app[TWILIO_API], record)
        if leg is None:
            return False
        status, metered_ms = leg
        meter = app[METER]
        if status in TERMINAL:
            await settle_sip_call(
                meter, app[api.WORKSPACES], record, status, "api", metered_ms=metered_ms
            )
            return True
        settings = app[SETTINGS]
        taken = await app[api.QUOTA].adopt(
            workspace_id, call_sid, now_ms(), settings.lease_ms
        )
        if taken is None:
            return False
        seq, held_ms = taken
        call_budget, time_up = await _sip_budget(
            app, workspace_id, call_sid, record.account_sid
        )
        counted = await app[api.LEDGER].counted_in(workspace_id, call_sid)
        if counted is None:  # started before records kept where they count
            started = record.started_at_ms
            counted = (period_of(started, "UTC").label, day_of(started, "UTC"))
        period, day = counted
        session = meter.adopt(
            record,
            period=call_budget.period if call_budget else period,
            day=day,
            seq=seq,
            held_ms=held_ms,
            budget=call_budget,
            on_exhausted=time_up,
        )
        router_logger.warning("took over call %s of a vanished process", call_sid)
        await meter.flush([session])
        return True


async def sip_status(request: web.Request) -> web.Response:
    """``POST /twilio/sip-status/{workspace_id}``: the SIP leg's progress."""
    try:
        form = await signed_form(request, "sip_status")
    except SignatureError:
        return forbidden()
    app = request.app
    count = app[METRICS].webhooks
    workspace_id = request.match_info["workspace_id"]
    call_sid = field(form, "ParentCallSid")
    status = field(form, "CallStatus")
    if not keyspace.WORKSPACE_ID.fullmatch(workspace_id) or not (
        keyspace.CALL_SID.fullmatch(call_sid)
    ):
        count.labels("sip_status", "malformed").inc()
        return problem(400, "malformed-webhook", "Bad Request", "malformed callback")

    ledger = app[api.LEDGER]
    try:
        record = await ledger.get_call(workspace_id, call_sid)
        if status == "in-progress" and app[METER].session(call_sid) is None:
            call_budget, time_up = await _sip_budget(
                app, workspace_id, call_sid, field(form, "AccountSid")
            )
            await app[METER].begin(
                workspace_id,
                call_sid,
                agent_id=record.agent_id,
                number=record.to_number,
                budget=call_budget,
                on_exhausted=time_up,
                provider="retell",
            )
            await ledger.set_fields(
                workspace_id, call_sid, {"sip_call_sid": field(form, "CallSid")}
            )
        elif status in TERMINAL and record.status != "completed":
            await settle_sip_call(
                app[METER], app[api.WORKSPACES], record, status, "sip_status"
            )
    except CallNotFoundError:
        count.labels("sip_status", "unknown_call").inc()
        return web.Response(status=204)
    except (StoreError, redis.RedisError):
        # Twilio retries nothing here; the store's outage policy (issue 4)
        # and reconciliation with Twilio settle such calls later.
        router_logger.error("cannot record sip leg progress", exc_info=True)
        return problem(503, "store-unavailable", "Store Unavailable")
    count.labels("sip_status", "recorded").inc()
    return web.Response(status=204)


async def dial_action(request: web.Request) -> web.Response:
    """``POST /twilio/dial-action/{workspace_id}``: what follows the SIP leg."""
    try:
        form = await signed_form(request, "dial_action")
    except SignatureError:
        return forbidden()
    app = request.app
    workspace_id = request.match_info["workspace_id"]
    call_sid = field(form, "CallSid")
    dial_status = field(form, "DialCallStatus")
    try:
        # The leg is over: settle the call here too, in case the leg's own
        # terminal callback was lost.
        if keyspace.WORKSPACE_ID.fullmatch(workspace_id) and (
            keyspace.CALL_SID.fullmatch(call_sid)
        ):
            record = await app[api.LEDGER].get_call(workspace_id, call_sid)
            await settle_sip_call(
                app[METER], app[api.WORKSPACES], record, dial_status, "dial_status"
            )
    except (CallNotFoundError, NotFoundError):
        pass
    except (StoreError, redis.RedisError):
        router_logger.warning("could not settle call %s after its dial", call_sid)
    if dial_status == "completed":
        return twiml_response(twiml.hang_up())

    # The SIP leg never connected: Retell was unreachable or refused it.
    try:
        workspace = await app[api.WORKSPACES].get(workspace_id)
    except NotFoundError:
        return twiml_response(twiml.hang_up())
    except (StoreError, redis.RedisError):
        return twiml_response(twiml.say_and_hang_up(twiml.UNAVAILABLE_MESSAGE))
    app[METRICS].upstream_errors.labels("retell", "sip").inc()
    app[METRICS].fallbacks.labels("done").inc()
    return twiml_response(twiml.fallback(workspace.policy))
