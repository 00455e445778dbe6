"""Every TwiML document Callgate answers with, built with Twilio's own library.

A rejected call gets ``<Reject>`` as its first verb, so Twilio leaves it
unanswered and unbilled; anything else answers the call (protocols.md 1.6).
"""

from __future__ import annotations

from twilio.twiml.voice_response import VoiceResponse

from metering.plans import Plan
from tenancy.workspaces import CallPolicy

UNAVAILABLE_MESSAGE = (
    "Sorry, this line is temporarily unavailable. Please try again later. Goodbye."
)
NOT_IN_SERVICE_MESSAGE = "Sorry, this number is not taking calls right now. Goodbye."
BUSY_MESSAGE = "Sorry, all our lines are busy right now. Please call again shortly."
OVER_BUDGET_MESSAGE = (
    "Sorry, this line has reached its calling limit for now. "
    "Please try again later. Goodbye."
)
TIME_UP_MESSAGE = "I'm sorry, the time for this call has run out. Goodbye."


def reject() -> str:
    """``<Reject/>`` as the first verb: never answered, never billed."""
    response = VoiceResponse()
    response.reject(reason="rejected")
    return str(response)


def say_and_hang_up(message: str) -> str:
    """A short spoken message, then hang up."""
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return str(response)


def dial(number: str) -> str:
    """Bridge the call to ``number``: a transfer or a fallback number."""
    response = VoiceResponse()
    response.dial(number)
    return str(response)


def refuse(plan: Plan, reason: str) -> str:
    """A call the plan cannot admit: ``<Reject/>``, or a polite message."""
    if plan.reject_with == "reject":
        return reject()
    message = BUSY_MESSAGE if reason == "concurrency" else OVER_BUDGET_MESSAGE
    return say_and_hang_up(message)


def time_up(plan: Plan) -> str:
    """What a call hears when its budget runs out mid-call."""
    if plan.on_exhausted == "redirect" and plan.exhausted_redirect_number:
        return dial(plan.exhausted_redirect_number)
    return say_and_hang_up(TIME_UP_MESSAGE)


def fallback(policy: CallPolicy) -> str:
    """Where a call goes when its agent platform fails: a number, or a message."""
    if policy.fallback_number:
        return dial(policy.fallback_number)
    return say_and_hang_up(policy.fallback_message)


def connect_stream(url: str, parameters: dict[str, str]) -> str:
    """``<Connect><Stream>`` to ``url``, with nothing after ``</Connect>``.

    With no verb after the stream, the call ends when Callgate closes it.
    """
    response = VoiceResponse()
    stream = response.connect().stream(url=url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    return str(response)


def hang_up() -> str:
    """End the call."""
    response = VoiceResponse()
    response.hangup()
    return str(response)


def dial_sip(
    uri: str, *, time_limit_secs: int, action_url: str, status_url: str
) -> str:
    """``<Dial>`` a SIP URI, reporting the leg's progress to ``status_url``.

    ``timeLimit`` caps the dialled leg; ``action_url`` is asked for the next
    TwiML when the leg ends, which is where a failed leg gets the fallback.
    """
    response = VoiceResponse()
    dial = response.dial(time_limit=time_limit_secs, action=action_url, method="POST")
    dial.sip(
        uri,
        status_callback_event="initiated ringing answered completed",
        status_callback=status_url,
        status_callback_method="POST",
    )
    return str(response)
