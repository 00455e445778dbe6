"""Every TwiML document Callgate answers with, built with Twilio's own library.

A rejected call gets ``<Reject>`` as its first verb, so Twilio leaves it
unanswered and unbilled; anything else answers the call (protocols.md 1.6).
"""

from __future__ import annotations

from twilio.twiml.voice_response import VoiceResponse

UNAVAILABLE_MESSAGE = (
    "Sorry, this line is temporarily unavailable. Please try again later. Goodbye."
)
NOT_IN_SERVICE_MESSAGE = "Sorry, this number is not taking calls right now. Goodbye."


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


def connect_stream(url: str, parameters: dict[str, str]) -> str:
    """``<Connect><Stream>`` to ``url``, with nothing after ``</Connect>``.

    With no verb after the stream, the call ends when Callgate closes it.
    """
    response = VoiceResponse()
    stream = response.connect().stream(url=url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    return str(response)
