"""Settling a SIP-path call, from whichever of Twilio's reports of its end arrives.

The SIP leg's terminal callback, the ``<Dial>`` action that follows it and the
caller's own status callback each say the call is over. Twilio retries none
of them, so any one may be the only one to arrive; the first settles the call
and the others find it settled and change nothing.
"""

from __future__ import annotations

from media.bridge import EndReason
from metering.ledger import CallRecord
from metering.meter import Meter
from metering.plans import INCREMENT_MS
from tenancy.logs import CallLog, call_logger, router_logger
from tenancy.twilio_api import TwilioApi, TwilioApiError
from tenancy.workspaces import Workspaces

# Twilio's final call statuses (a leg's or the caller's).
TERMINAL = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})


async def settle_sip_call(
    meter: Meter,
    workspaces: Workspaces,
    record: CallRecord,
    status: str,
    source: str,
    metered_ms: int | None = None,
) -> None:
    """Settle ``record`` as Twilio's ``status`` (from ``source``) says it ended.

    A call that completed after its SIP leg was answered ended normally (or
    by its budget, if the meter cut it off); any other end means Retell was
    never reached. A call already settled is left alone. ``metered_ms`` is
    the leg's length when Twilio's REST API gave it.
    """
    if record.ended_at_ms is not None:
        return
    workspace_id, call_sid = record.workspace_id, record.call_sid
    answered = status == "completed" and record.started_at_ms is not None
    reason = EndReason.COMPLETED if answered else EndReason.UPSTREAM_FAILED
    session = meter.session(call_sid)
    if session is not None and session.exhausted:
        reason = EndReason(session.cutoff_reason)
    plan = await workspaces.plan(workspace_id)
    step = INCREMENT_MS[plan.billing_increment] if plan else 0
    await meter.end_call(
        workspace_id,
        call_sid,
        reason.value,
        billing_step_ms=step,
        metered_ms=metered_ms,
    )
    CallLog(call_logger, {"workspace": workspace_id, "call": call_sid}).info(
        "call ended reason=%s %s=%s", reason.value, source, status
    )


async def sip_leg(
    twilio: TwilioApi, record: CallRecord
) -> tuple[str, int | None] | None:
    """Twilio's status of a SIP call's leg and its length in ms (once over).

    The leg is what is metered; before Twilio named it, the call is asked
    about. ``None`` when Twilio cannot say (unknown call, API error).
    """
    if record.account_sid is None:
        return None
    try:
        found = await twilio.fetch_call(
            record.account_sid, record.sip_call_sid or record.call_sid
        )
    except TwilioApiError as exc:
        router_logger.warning("cannot look call %s up: %s", record.call_sid, exc)
        return None
    if found is None:
        return None
    status, duration_secs = found
    return status, None if duration_secs is None else duration_secs * 1000
