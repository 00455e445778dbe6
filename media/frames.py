"""The Twilio Media Streams protocol as pure functions: text frames in, events out.

Follows Twilio's bidirectional stream messages (``connected``, ``start``,
``media``, ``dtmf``, ``mark``, ``stop`` inbound; ``media``, ``mark``, ``clear``
outbound). Every field is checked before use; a malformed frame raises
:class:`InvalidStreamMessageError` with a close code, never a ``KeyError``.
No I/O happens here.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from tenancy.errors import InvalidStreamMessageError

# RFC 6455 close codes used to answer a broken stream.
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY_VIOLATION = 1008

STREAM_SID = re.compile(r"MZ[0-9a-fA-F]{32}")
_DIGITS = re.compile(r"[0-9]{1,12}")
_DTMF_DIGIT = re.compile(r"[0-9*#A-D]")
_MAX_FRAME_CHARS = 64 * 1024


class StreamFrameError(InvalidStreamMessageError):
    """A malformed frame, with the WebSocket close code that answers it."""

    def __init__(self, message: str, close_code: int = CLOSE_INVALID_PAYLOAD) -> None:
        super().__init__(message)
        self.close_code = close_code


@dataclass(frozen=True, slots=True)
class Connected:
    """First message on every stream; carries no stream id."""

    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class Start:
    """Stream metadata; ``custom_parameters`` come from TwiML ``<Parameter>``."""

    sequence: int
    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str]
    encoding: str
    sample_rate_hz: int
    channels: int


@dataclass(frozen=True, slots=True)
class Media:
    """One chunk of caller audio: raw µ-law bytes, 160 per 20 ms at 8 kHz."""

    sequence: int
    stream_sid: str
    track: str
    chunk: int
    timestamp_ms: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A keypad digit pressed by the caller."""

    sequence: int
    stream_sid: str
    digit: str


@dataclass(frozen=True, slots=True)
class Mark:
    """Twilio's echo of a mark we sent: the audio queued before it has played."""

    sequence: int
    stream_sid: str
    name: str


@dataclass(frozen=True, slots=True)
class Stop:
    """The stream ended because the call ended or the stream was stopped."""

    sequence: int
    stream_sid: str
    account_sid: str
    call_sid: str


StreamEvent = Connected | Start | Media | Dtmf | Mark | Stop


def parse(frame: str | bytes) -> StreamEvent | None:
    """Decode one text frame; ``None`` for an event type this version ignores.

    Twilio may add event types; unknown ones are skipped rather than fatal.
    """
    if len(frame) > _MAX_FRAME_CHARS:
        raise StreamFrameError("frame too large", CLOSE_POLICY_VIOLATION)
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise StreamFrameError("frame is not JSON") from None
    if not isinstance(message, dict):
        raise StreamFrameError("frame is not a JSON object")
    event = message.get("event")
    if event == "media":
        return _media(message)
    if event == "connected":
        return Connected(
            protocol=_string(message, "protocol"), version=_string(message, "version")
        )
    if event == "start":
        return _start(message)
    if event == "dtmf":
        body = _object(message, "dtmf")
        digit = _string(body, "digit")
        if not _DTMF_DIGIT.fullmatch(digit):
            raise StreamFrameError("dtmf.digit is not a keypad digit")
        return Dtmf(_sequence(message), _stream_sid(message), digit)
    if event == "mark":
        body = _object(message, "mark")
        return Mark(_sequence(message), _stream_sid(message), _string(body, "name"))
    if event == "stop":
        body = _object(message, "stop")
        return Stop(
            sequence=_sequence(message),
            stream_sid=_stream_sid(message),
            account_sid=_string(body, "accountSid"),
            call_sid=_string(body, "callSid"),
        )
    if not isinstance(event, str):
        raise StreamFrameError("frame has no event name")
    return None


def media_frame(stream_sid: str, payload: bytes) -> str:
    """An outbound ``media`` message carrying raw µ-law ``payload``."""
    encoded = binascii.b2a_base64(payload, newline=False).decode("ascii")
    # stream_sid was checked against STREAM_SID and base64 needs no escaping,
    # so the message can be assembled without a JSON encoder on the hot path.
    return (
        '{"event":"media","streamSid":"'
        + stream_sid
        + '","media":{"payload":"'
        + encoded
        + '"}}'
    )


def mark_frame(stream_sid: str, name: str) -> str:
    """An outbound ``mark``; Twilio echoes it once earlier audio has played."""
    message = {"event": "mark", "streamSid": stream_sid, "mark": {"name": name}}
    return orjson.dumps(message).decode("utf-8")


def clear_frame(stream_sid: str) -> str:
    """An outbound ``clear``: drop Twilio's buffered audio (barge-in)."""
    return orjson.dumps({"event": "clear", "streamSid": stream_sid}).decode("utf-8")


class Phase(Enum):
    """Where a stream is in its lifecycle."""

    AWAITING_CONNECTED = "awaiting connected"
    AWAITING_START = "awaiting start"
    STREAMING = "streaming"
    STOPPED = "stopped"


class StreamState:
    """Checks one stream's messages arrive in order and belong to it.

    ``connected`` must come first, then one ``start``; later messages must
    carry the started stream's id. Sequence gaps are counted, not fatal:
    Twilio numbers every message, so a gap means a message was lost in between.
    """

    def __init__(self) -> None:
        self.phase = Phase.AWAITING_CONNECTED
        self.start: Start | None = None
        self.last_sequence = 0
        self.sequence_gaps = 0

    def receive(self, frame: str | bytes) -> StreamEvent | None:
        """Parse ``frame`` and check it against the stream so far."""
        event = parse(frame)
        if event is None:
            return None
        if isinstance(event, Connected):
            self._expect(Phase.AWAITING_CONNECTED, "connected")
            self.phase = Phase.AWAITING_START
            return event
        if isinstance(event, Start):
            self._expect(Phase.AWAITING_START, "start")
            self.start = event
            self.phase = Phase.STREAMING
        else:
            self._expect(Phase.STREAMING, type(event).__name__.lower())
            assert self.start is not None
            if event.stream_sid != self.start.stream_sid:
                raise StreamFrameError(
                    "message for another stream", CLOSE_POLICY_VIOLATION
                )
            if isinstance(event, Stop):
                self.phase = Phase.STOPPED
        if event.sequence > self.last_sequence + 1 and self.last_sequence:
            self.sequence_gaps += event.sequence - self.last_sequence - 1
        self.last_sequence = max(self.last_sequence, event.sequence)
        return event

    def _expect(self, phase: Phase, event: str) -> None:
        if self.phase is not phase:
            raise StreamFrameError(
                f"unexpected {event} while {self.phase.value}", CLOSE_POLICY_VIOLATION
            )


def _media(message: dict[str, Any]) -> Media:
    body = _object(message, "media")
    try:
        payload = binascii.a2b_base64(_string(body, "payload"), strict_mode=True)
    except binascii.Error:
        raise StreamFrameError("media.payload is not base64") from None
    return Media(
        sequence=_sequence(message),
        stream_sid=_stream_sid(message),
        track=body.get("track", "inbound")
        if isinstance(body.get("track"), str)
        else "",
        chunk=_counter(body, "chunk"),
        timestamp_ms=_counter(body, "timestamp"),
        payload=payload,
    )


def _start(message: dict[str, Any]) -> Start:
    body = _object(message, "start")
    stream_sid = _string(body, "streamSid")
    if not STREAM_SID.fullmatch(stream_sid):
        raise StreamFrameError("start.streamSid is malformed")
    params = body.get("customParameters", {})
    if not isinstance(params, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in params.items()
    ):
        raise StreamFrameError("start.customParameters must map strings to strings")
    fmt = _object(body, "mediaFormat")
    tracks = body.get("tracks", [])
    if not isinstance(tracks, list) or not all(isinstance(t, str) for t in tracks):
        raise StreamFrameError("start.tracks must be a list of strings")
    return Start(
        sequence=_sequence(message),
        stream_sid=stream_sid,
        call_sid=_string(body, "callSid"),
        account_sid=_string(body, "accountSid"),
        tracks=tuple(tracks),
        custom_parameters=dict(params),
        encoding=_string(fmt, "encoding"),
        sample_rate_hz=_integer(fmt, "sampleRate"),
        channels=_integer(fmt, "channels"),
    )


def _object(message: dict[str, Any], name: str) -> dict[str, Any]:
    value = message.get(name)
    if not isinstance(value, dict):
        raise StreamFrameError(f"{name} must be an object")
    return value


def _string(message: dict[str, Any], name: str) -> str:
    value = message.get(name)
    if not isinstance(value, str):
        raise StreamFrameError(f"{name} must be a string")
    return value


def _integer(message: dict[str, Any], name: str) -> int:
    value = message.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise StreamFrameError(f"{name} must be an integer")
    return value


def _counter(message: dict[str, Any], name: str) -> int:
    """A non-negative integer that Twilio sends as a string of digits."""
    value = message.get(name)
    if not isinstance(value, str) or not _DIGITS.fullmatch(value):
        raise StreamFrameError(f"{name} must be a string of digits")
    return int(value)


def _sequence(message: dict[str, Any]) -> int:
    return _counter(message, "sequenceNumber")


def _stream_sid(message: dict[str, Any]) -> str:
    value = _string(message, "streamSid")
    if not STREAM_SID.fullmatch(value):
        raise StreamFrameError("streamSid is malformed")
    return value
