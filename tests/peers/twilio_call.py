"""One simulated inbound call: the TwiML it runs, its media stream, its dialed legs."""

import asyncio
import base64
import binascii
import contextlib
import email.utils
import functools
import json
import logging
import math
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal
from xml.etree import ElementTree

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .errors import PeerStateError, PeerTimeoutError, StreamRejected, TwimlError
from .playback import PlaybackClock
from .sip import SipEndpoint
from .twilio_auth import SIGNATURE_HEADER, TwilioAccount, new_stream_sid, sign
from .twilio_dial import DialedLeg
from .twiml import parse_dial, parse_twiml
from .waiting import Changes
from .webhooks import WebhookSender

__all__ = [
    "TERMINAL_STATUSES",
    "CallStatus",
    "ProtocolError",
    "SimulatedCall",
]

logger = logging.getLogger("tests.peers")

DTMF_DIGITS: Final = frozenset("0123456789*#")
TERMINAL_STATUSES: Final = frozenset(
    {"completed", "busy", "failed", "no-answer", "canceled"}
)
# Verbs that answer a call still ringing (§1.6: anything but a first <Reject>).
_ANSWERING_VERBS: Final = frozenset({"Say", "Play", "Pause", "Gather", "Connect"})
# Media Streams error codes (protocols.md §2.8) recorded against the server.
ERROR_BINARY_FRAME: Final = 31950
ERROR_BAD_MESSAGE: Final = 31924
# The loop may wake a timer a clock tick early; a mark that early still counts.
_MARK_SLACK_SECS: Final = 0.001
_CLOSE_TIMEOUT_SECS: Final = 5.0

CallStatus = Literal[
    "queued",
    "ringing",
    "in-progress",
    "completed",
    "busy",
    "failed",
    "no-answer",
    "canceled",
]
JsonObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """A frame from the server that real Twilio would reject, with Twilio's code."""

    code: int
    detail: str
    frame: str | bytes


class SimulatedCall:
    """One inbound call as Twilio sees it: its TwiML, media stream and dialed legs.

    Created by TwilioSimulator.place_call. The call owns its receiver and mark-echo
    tasks, any shutdown started by FakeTwilioRest, and its dialed legs' time-limit
    tasks; aclose() ends them. Times ending in _at are event-loop seconds
    (loop.time()). document_url is the URL the TwiML came from, for resolving
    relative URLs in it; webhooks sends the dialed legs' callbacks.
    """

    def __init__(
        self,
        account: TwilioAccount,
        params: Mapping[str, str],
        http_status: int,
        twiml_text: str,
        *,
        document_url: str | None = None,
        webhooks: WebhookSender | None = None,
        sip_endpoint: SipEndpoint | None = None,
    ) -> None:
        self.account = account
        self.params: dict[str, str] = dict(params)
        self.sid = self.params["CallSid"]
        self.to = self.params["To"]
        self.from_ = self.params["From"]
        self.http_status = http_status
        self.twiml_text = twiml_text
        self.twiml = parse_twiml(twiml_text)
        self.document_url = document_url
        self.webhooks = webhooks
        self.sip_endpoint = sip_endpoint
        self.status: CallStatus = "ringing"
        self.created_at_utc = datetime.now(UTC)
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.ended_at_utc: datetime | None = None

        self.stream_sid: str | None = None
        self.stream_started_at: float | None = None
        self.stream_ended_at: float | None = None
        self.received_audio = bytearray()
        self.received_events: list[JsonObject] = []
        self.protocol_errors: list[ProtocolError] = []
        self.clears_received: list[float] = []
        self.marks_echoed: list[str] = []
        self.closed_by_server = asyncio.Event()
        self.close_code: int | None = None
        self.ended_by_server = False
        self.redirected_twiml: str | None = None
        self.redirected_url: str | None = None
        # Text of every <Say> run, what Twilio found wrong in the TwiML, the
        # latest and every dialed leg, and the TwiML the <Dial action> returned.
        self.spoken: list[str] = []
        self.twiml_problems: list[str] = []
        self.dial: DialedLeg | None = None
        self.dial_legs: list[DialedLeg] = []
        self.after_dial_twiml: str | None = None

        self._ws: ClientConnection | None = None
        self._stream_closed = asyncio.Event()
        self._closing_locally = False
        self._reading = asyncio.Event()
        self._reading.set()
        self._sequence = 0
        self._chunk = 0
        self._next_frame_at = 0.0
        self._callback_sequence = 0
        self._send_lock = asyncio.Lock()
        self._audio_lock = asyncio.Lock()
        self._playback = PlaybackClock()
        self._playback_changed = asyncio.Event()
        self._changes = Changes()
        self._tasks: set[asyncio.Task[None]] = set()
        # The leg whose end continues this call's TwiML, and what follows its
        # <Dial> in the document (run when the <Dial> has no action).
        self._active_leg: DialedLeg | None = None
        self._after_dial_verbs: list[ElementTree.Element] = []
        self._after_dial_base: str | None = None
        self._settle_status()

    # TwiML views -------------------------------------------------------------

    @property
    def first_verb(self) -> str | None:
        """Tag of the first verb in <Response>, e.g. "Connect" or "Reject"."""
        if self.twiml is None or len(self.twiml) == 0:
            return None
        return self.twiml[0].tag

    @property
    def stream_url(self) -> str | None:
        """The url of <Connect><Stream>, exactly as written in the TwiML."""
        stream = self._stream_element()
        return None if stream is None else stream.get("url")

    @property
    def stream_parameters(self) -> dict[str, str]:
        """The <Parameter name value> pairs under <Stream>; start.customParameters."""
        stream = self._stream_element()
        if stream is None:
            return {}
        return {
            param.get("name", ""): param.get("value", "")
            for param in stream.iter("Parameter")
        }

    @property
    def verbs_after_connect(self) -> list[ElementTree.Element]:
        """The verbs Twilio runs if the server closes the stream (§1.6)."""
        if self.twiml is None:
            return []
        verbs = list(self.twiml)
        for index, verb in enumerate(verbs):
            if verb.tag == "Connect":
                return verbs[index + 1 :]
        return []

    def _stream_element(self) -> ElementTree.Element | None:
        if self.twiml is None:
            return None
        return self.twiml.find("./Connect/Stream")

    @property
    def dial_leg(self) -> DialedLeg:
        """The latest dialed leg; raises PeerStateError if the TwiML never dialed."""
        if self.dial is None:
            raise PeerStateError(f"call {self.sid} has no <Dial> leg")
        return self.dial

    # Call state --------------------------------------------------------------

    @property
    def duration_secs(self) -> int | None:
        """Whole seconds from answer to hang-up, or so far; None if never answered.

        At least 1: Twilio bills a completed sub-second call as one second.
        """
        if self.answered_at is None:
            return None
        end = self.ended_at
        if end is None:
            end = asyncio.get_running_loop().time()
        return max(1, round(end - self.answered_at))

    @property
    def streamed_secs(self) -> float:
        """Wall seconds from sending start until the stream closed (or now)."""
        if self.stream_started_at is None:
            return 0.0
        end = self.stream_ended_at
        if end is None:
            end = asyncio.get_running_loop().time()
        return end - self.stream_started_at

    @property
    def stream_open(self) -> bool:
        """True between a successful open_stream and the socket closing."""
        return self._ws is not None and not self._stream_closed.is_set()

    def queued_playback_secs(self) -> float:
        """Seconds of server audio not yet "played" by this fake Twilio."""
        return self._playback.queued_secs(asyncio.get_running_loop().time())

    def _settle_status(self) -> None:
        now = asyncio.get_running_loop().time()
        root = self.twiml
        answered_ok = 200 <= self.http_status < 300
        if not answered_ok or root is None or root.tag != "Response":
            # Twilio plays "an application error has occurred" and hangs up.
            self._end_unanswered("failed", now)
        elif self.first_verb == "Reject":
            # Only a first-verb <Reject> leaves the call unanswered (§1.6).
            busy = root[0].get("reason") == "busy"
            self._end_unanswered("busy" if busy else "no-answer", now)
        else:
            self.status = "in-progress"
            # A first-verb <Dial answerOnBridge="true"> keeps the caller ringing
            # until the dialed leg answers, so billing starts then (leg_answered).
            first = root[0] if len(root) else None
            bridged_answer = (
                first is not None
                and first.tag == "Dial"
                and first.get("answerOnBridge", "").lower() == "true"
            )
            if not bridged_answer:
                self.answered_at = now
            self._run_verbs(list(root), self.document_url)

    def _run_verbs(
        self, verbs: Sequence[ElementTree.Element], base_url: str | None
    ) -> None:
        """Run TwiML verbs the way Twilio does, up to the first that lasts.

        <Say> is recorded in spoken, <Hangup> ends the call, <Connect> waits for
        the test to open the stream, <Dial> starts a DialedLeg. Other verbs are
        skipped; running off the end of the document hangs up.
        """
        for index, verb in enumerate(verbs):
            if verb.tag in _ANSWERING_VERBS and self.answered_at is None:
                # A caller held ringing by answerOnBridge is answered by the
                # first verb that plays to them.
                self.answered_at = asyncio.get_running_loop().time()
            if verb.tag == "Say":
                self.spoken.append((verb.text or "").strip())
            elif verb.tag in ("Hangup", "Reject"):
                break
            elif verb.tag == "Connect":
                return
            elif verb.tag == "Dial":
                if self._start_dial(verb, base_url, verbs[index + 1 :]):
                    return
                break
            else:
                logger.debug("call %s skips <%s>", self.sid, verb.tag)
        self._complete()

    def _start_dial(
        self,
        verb: ElementTree.Element,
        base_url: str | None,
        after: Sequence[ElementTree.Element],
    ) -> bool:
        """Start the leg a <Dial> asks for; False if the <Dial> is unusable."""
        try:
            spec = parse_dial(verb, base_url)
        except TwimlError as exc:
            # Twilio reads this as an application error and hangs up.
            logger.warning("call %s: unusable <Dial>: %s", self.sid, exc)
            self.twiml_problems.append(str(exc))
            return False
        for warning in spec.warnings:
            logger.warning("call %s: <Dial> warning: %s", self.sid, warning)
        self.twiml_problems.extend(spec.warnings)
        leg = DialedLeg(spec, self)
        self.dial = leg
        self.dial_legs.append(leg)
        self._active_leg = leg
        self._after_dial_verbs = list(after)
        self._after_dial_base = base_url
        logger.info(
            "call %s dials %s %s as %s", self.sid, spec.kind, spec.target, leg.child_sid
        )
        return True

    def _end_unanswered(self, status: CallStatus, now: float) -> None:
        self.status = status
        self.ended_at = now
        self.ended_at_utc = datetime.now(UTC)

    def _complete(self) -> None:
        if self.status in TERMINAL_STATUSES:
            return
        self.status = "completed"
        self.ended_at = asyncio.get_running_loop().time()
        self.ended_at_utc = datetime.now(UTC)
        self._changes.notify()

    def status_callback_params(
        self, status: CallStatus, duration_secs: int | None = None
    ) -> dict[str, str]:
        """Build the form of the next status callback (§1.2) for this call.

        duration_secs defaults to the call's own answer-to-hang-up time; Duration
        is whole minutes rounded up, as Twilio bills. Each call advances the
        call's 0-based SequenceNumber.
        """
        params = dict(self.params)
        params["CallStatus"] = status
        if status in TERMINAL_STATUSES:
            if duration_secs is None:
                duration_secs = self.duration_secs or 0
            params["CallDuration"] = str(duration_secs)
            params["Duration"] = str(math.ceil(duration_secs / 60))
        params["Timestamp"] = email.utils.format_datetime(datetime.now(UTC))
        params["CallbackSource"] = "call-progress-events"
        params["SequenceNumber"] = str(self._callback_sequence)
        self._callback_sequence += 1
        return params

    # Media stream: sending ---------------------------------------------------

    async def open_stream(
        self,
        signature: str | None = None,
        url: str | None = None,
        *,
        connect_url: str | None = None,
        timeout_secs: float = 5.0,
    ) -> None:
        """Open the media stream and send connected and start (§2.1, §2.2).

        The upgrade is signed over url (default: the TwiML stream url) with no
        params, unless signature overrides it. connect_url, if given, is where the
        socket really goes, for TwiML that names a public host the test cannot reach.
        Raises StreamRejected when the server answers the upgrade with a non-101.
        """
        target = url if url is not None else self.stream_url
        if target is None:
            raise PeerStateError("twiml has no <Connect><Stream url>")
        if self._ws is not None:
            raise PeerStateError("stream already opened")
        if self.status != "in-progress":
            raise PeerStateError(f"call is {self.status}, not in-progress")
        if signature is None:
            signature = sign(self.account.auth_token, target, {})

        try:
            ws = await connect(
                connect_url or target,
                additional_headers={SIGNATURE_HEADER: signature},
                open_timeout=timeout_secs,
                close_timeout=_CLOSE_TIMEOUT_SECS,
                # Loopback only: never route through a proxy from the environment.
                proxy=None,
                compression=None,
            )
        except InvalidStatus as exc:
            raise StreamRejected(exc.response.status_code) from exc
        except TimeoutError as exc:
            raise PeerTimeoutError("the stream upgrade", timeout_secs) from exc

        loop = asyncio.get_running_loop()
        self._ws = ws
        self.stream_sid = new_stream_sid()
        self.stream_started_at = loop.time()
        self._next_frame_at = self.stream_started_at
        logger.info("stream %s opened for call %s", self.stream_sid, self.sid)
        # Hold the send lock so a mark echo can never take sequence number 1.
        async with self._send_lock:
            self._spawn(self._receive(ws), "receive")
            self._spawn(self._echo_marks_when_played(), "echo-marks")
            connected = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
            await ws.send(json.dumps(connected))
            await self._send_locked(ws, self._start_message)

    def _start_message(self, sequence: str) -> JsonObject:
        return {
            "event": "start",
            "sequenceNumber": sequence,
            "start": {
                "accountSid": self.account.sid,
                "streamSid": self.stream_sid,
                "callSid": self.sid,
                "tracks": ["inbound"],
                "customParameters": self.stream_parameters,
                "mediaFormat": {
                    "encoding": "audio/x-mulaw",
                    "sampleRate": 8000,
                    "channels": 1,
                },
            },
            "streamSid": self.stream_sid,
        }

    async def send_audio(self, frames: Sequence[bytes], frame_ms: int = 20) -> int:
        """Send one media message per frame (160 bytes = 20 ms), paced in real time.

        Frames go out on absolute loop-time deadlines, continuing the cadence of the
        previous call, so pacing does not drift. Stops early, without raising, if the
        stream closes; returns how many frames were sent.
        """
        if self._ws is None:
            raise PeerStateError("stream is not open")
        if self.stream_started_at is None:
            raise PeerStateError("stream has not started")
        loop = asyncio.get_running_loop()
        frame_secs = frame_ms / 1000
        sent = 0
        async with self._audio_lock:
            deadline = max(loop.time(), self._next_frame_at)
            for frame in frames:
                delay = deadline - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self._closing_locally or self._stream_closed.is_set():
                    break
                self._chunk += 1
                timestamp_ms = round((deadline - self.stream_started_at) * 1000)
                media = {
                    "track": "inbound",
                    "chunk": str(self._chunk),
                    "timestamp": str(timestamp_ms),
                    "payload": base64.b64encode(frame).decode("ascii"),
                }
                try:
                    await self._send_sequenced(
                        functools.partial(self._media_message, media)
                    )
                except ConnectionClosed:
                    break
                sent += 1
                deadline += frame_secs
            self._next_frame_at = deadline
        return sent

    def _media_message(self, media: JsonObject, sequence: str) -> JsonObject:
        return {
            "event": "media",
            "sequenceNumber": sequence,
            "media": media,
            "streamSid": self.stream_sid,
        }

    async def send_dtmf(self, digit: str) -> None:
        """Send a dtmf message for one key (0-9, * or #)."""
        if digit not in DTMF_DIGITS:
            raise ValueError(f"{digit!r} is not a dtmf digit")
        await self._send_or_fail(
            lambda seq: {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": seq,
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    async def send_raw(self, frame: str | bytes) -> None:
        """Send a frame as is, outside the sequence numbering (for malformed input)."""
        if self._ws is None:
            raise PeerStateError("stream is not open")
        try:
            await self._ws.send(frame)
        except ConnectionClosed as exc:
            raise PeerStateError("stream is closed") from exc

    async def hang_up(self) -> None:
        """The caller hangs up: send stop, close the socket with 1000, end the call.

        A dialed leg still up ends too (by="caller"), callbacks and action included.
        """
        await self._end_stream()
        self._complete()
        leg = self._active_leg
        if leg is not None:
            await leg.end("caller")

    async def drop(self) -> None:
        """The network fails: reset the connection with no stop and no close frame."""
        ws = self._ws
        if ws is None or self._stream_closed.is_set():
            raise PeerStateError("no open stream to drop")
        self._closing_locally = True
        ws.transport.abort()
        await self._changes.wait_until(
            self._stream_closed.is_set, "the stream to close", _CLOSE_TIMEOUT_SECS
        )
        self._complete()

    async def aclose(self) -> None:
        """Hang up if still streaming and wait for every task the call owns."""
        if self.stream_open:
            await self.hang_up()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _end_stream(self) -> None:
        ws = self._ws
        if ws is None or self._stream_closed.is_set():
            return
        if not self._closing_locally:
            self._closing_locally = True
            with contextlib.suppress(ConnectionClosed):
                await self._send_sequenced(self._stop_message)
            await ws.close(1000)
        await self._changes.wait_until(
            self._stream_closed.is_set, "the stream to close", 2 * _CLOSE_TIMEOUT_SECS
        )

    def _stop_message(self, sequence: str) -> JsonObject:
        return {
            "event": "stop",
            "sequenceNumber": sequence,
            "stop": {"accountSid": self.account.sid, "callSid": self.sid},
            "streamSid": self.stream_sid,
        }

    async def _send_or_fail(self, make: Callable[[str], JsonObject]) -> None:
        try:
            await self._send_sequenced(make)
        except ConnectionClosed as exc:
            raise PeerStateError("stream is closed") from exc

    async def _send_sequenced(self, make: Callable[[str], JsonObject]) -> None:
        if self._ws is None:
            raise PeerStateError("stream is not open")
        async with self._send_lock:
            await self._send_locked(self._ws, make)

    async def _send_locked(
        self, ws: ClientConnection, make: Callable[[str], JsonObject]
    ) -> None:
        # Numbering happens under the send lock so numbers go out in order.
        self._sequence += 1
        await ws.send(json.dumps(make(str(self._sequence))))

    # Media stream: receiving -------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=f"{self.sid}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def pause_reading(self) -> None:
        """Stop taking frames off the socket, as a congested caller leg would.

        websockets then stops reading from TCP once its own queue is full, so
        the server's writes back up into its buffers.
        """
        self._reading.clear()

    def resume_reading(self) -> None:
        """Take frames off the socket again."""
        self._reading.set()

    async def _receive(self, ws: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for frame in ws:
                to_echo = self._handle_frame(frame, loop.time())
                if to_echo:
                    await self._echo_marks(to_echo)
                await self._reading.wait()
        except ConnectionClosed:
            pass
        await ws.wait_closed()
        self._on_closed(ws, loop.time())

    def _handle_frame(self, frame: str | bytes, now: float) -> list[str]:
        """Record one server frame; return marks a clear releases for echo now."""
        if isinstance(frame, bytes):
            self._protocol_error(ERROR_BINARY_FRAME, "binary frame", frame)
            return []
        try:
            message = json.loads(frame)
        except ValueError:
            self._protocol_error(ERROR_BAD_MESSAGE, "not json", frame)
            return []
        if not isinstance(message, dict):
            self._protocol_error(ERROR_BAD_MESSAGE, "not a json object", frame)
            return []
        self.received_events.append(message)
        self._changes.notify()
        if message.get("streamSid") != self.stream_sid:
            self._protocol_error(ERROR_BAD_MESSAGE, "wrong or missing streamSid", frame)
            return []

        event = message.get("event")
        if event == "media":
            return self._handle_media(message, frame, now)
        if event == "mark":
            mark = message.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if not isinstance(name, str):
                self._protocol_error(ERROR_BAD_MESSAGE, "mark without name", frame)
                return []
            self._playback.add_mark(name, now)
            self._playback_changed.set()
            return []
        if event == "clear":
            self.clears_received.append(now)
            self._playback_changed.set()
            return self._playback.clear(now)
        self._protocol_error(ERROR_BAD_MESSAGE, f"unknown event {event!r}", frame)
        return []

    def _handle_media(self, message: JsonObject, frame: str, now: float) -> list[str]:
        media = message.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            self._protocol_error(ERROR_BAD_MESSAGE, "media without payload", frame)
            return []
        try:
            audio = base64.b64decode(payload, validate=True)
        except binascii.Error:
            self._protocol_error(ERROR_BAD_MESSAGE, "payload is not base64", frame)
            return []
        self.received_audio.extend(audio)
        self._playback.add_audio(len(audio), now)
        self._changes.notify()
        return []

    def _protocol_error(self, code: int, detail: str, frame: str | bytes) -> None:
        logger.warning(
            "call %s: server sent a bad frame (%d, %s)", self.sid, code, detail
        )
        self.protocol_errors.append(ProtocolError(code, detail, frame))
        self._changes.notify()

    async def _echo_marks_when_played(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stream_closed.is_set():
            self._playback_changed.clear()
            due = self._playback.pop_due(loop.time() + _MARK_SLACK_SECS)
            if due:
                try:
                    await self._echo_marks(due)
                except ConnectionClosed:
                    return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(self._playback.next_due_at()):
                    await self._playback_changed.wait()

    async def _echo_marks(self, names: list[str]) -> None:
        for name in names:
            await self._send_sequenced(functools.partial(self._mark_message, name))
            self.marks_echoed.append(name)
            self._changes.notify()

    def _mark_message(self, name: str, sequence: str) -> JsonObject:
        return {
            "event": "mark",
            "sequenceNumber": sequence,
            "streamSid": self.stream_sid,
            "mark": {"name": name},
        }

    def _on_closed(self, ws: ClientConnection, now: float) -> None:
        self.close_code = ws.close_code
        self.stream_ended_at = now
        if not self._closing_locally:
            # §2.6: Twilio moves on to the verbs after </Connect>; with none
            # left, the call is over.
            self.closed_by_server.set()
            if not self.verbs_after_connect:
                self.ended_by_server = True
                self._complete()
        logger.info(
            "stream %s closed with code %s (by %s)",
            self.stream_sid,
            self.close_code,
            "peer" if self._closing_locally else "server",
        )
        self._stream_closed.set()
        self._playback_changed.set()
        self._changes.notify()

    # Waiting -----------------------------------------------------------------

    async def wait_for_audio(self, nbytes: int, timeout_secs: float) -> None:
        """Wait until the server has sent at least nbytes of µ-law in media messages.

        Raises PeerStateError if the stream closes first.
        """
        await self._changes.wait_until(
            lambda: len(self.received_audio) >= nbytes or self._stream_closed.is_set(),
            f"{nbytes} bytes of audio",
            timeout_secs,
        )
        if len(self.received_audio) < nbytes:
            got = len(self.received_audio)
            raise PeerStateError(f"stream closed after {got} of {nbytes} audio bytes")

    async def wait_for_event(
        self, event: str, timeout_secs: float, count: int = 1
    ) -> JsonObject:
        """Wait for the count-th server message with this event name and return it."""

        def matching() -> list[JsonObject]:
            return [m for m in self.received_events if m.get("event") == event]

        await self._changes.wait_until(
            lambda: len(matching()) >= count, f"{event} message #{count}", timeout_secs
        )
        return matching()[count - 1]

    async def wait_closed(self, timeout_secs: float) -> None:
        """Wait until the stream socket is closed, by either side."""
        await self._changes.wait_until(
            self._stream_closed.is_set, "the stream to close", timeout_secs
        )

    # Driven by FakeTwilioRest ------------------------------------------------

    def complete_via_rest(self) -> None:
        """Hang up as REST Status=completed does: stream and dialed leg end too.

        The stream's stop and close and the leg's callbacks run in the background.
        """
        # Real Twilio answers the REST request first and hangs up after, so the
        # shutdown runs in the background rather than inside the HTTP handler.
        self._complete()
        self._spawn(self._end_stream(), "rest-hangup")
        leg = self._active_leg
        if leg is not None:
            self._spawn(leg.end("rest"), "rest-hangup-leg")

    def redirect_via_rest(self, twiml: str | None, url: str | None) -> None:
        """Replace the call's TwiML as REST Twiml= or Url= does.

        The stream ends, and so does a dialed leg, without its <Dial action>: the
        new TwiML owns the call now. A Url is recorded, not fetched. A Twiml runs
        at once: <Say> is recorded, <Dial> starts a new leg (a transfer), and a
        document that ends without a lasting verb ends the call.
        """
        self.redirected_twiml = twiml
        self.redirected_url = url
        self._spawn(self._end_stream(), "rest-redirect")
        leg = self._active_leg
        self._active_leg = None
        if leg is not None:
            self._spawn(leg.end("rest"), "rest-redirect-leg")
        if twiml is None:
            return
        root = parse_twiml(twiml)
        if root is None or root.tag != "Response":
            self.twiml_problems.append("redirect twiml is not a <Response> document")
            self._complete()
            return
        self._run_verbs(list(root), None)

    # Driven by DialedLeg (the LegOwner protocol) -----------------------------

    def spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run coro as a task this call owns; aclose() cancels it."""
        self._spawn(coro, name)

    def leg_answered(self, leg: DialedLeg) -> None:
        """Start billing the caller if an answerOnBridge <Dial> held it ringing."""
        if self.answered_at is None and self.status == "in-progress":
            self.answered_at = leg.answered_at
        self._changes.notify()

    async def leg_ended(self, leg: DialedLeg) -> None:
        """Continue after a leg: request <Dial action>, or run what followed <Dial>.

        The action is requested even when the caller has gone (by caller or by
        REST), but its TwiML then only gets recorded in after_dial_twiml.
        """
        if leg is not self._active_leg:
            # A REST redirect replaced this leg; the new TwiML owns the call.
            return
        self._active_leg = None
        if leg.ended_by == "caller":
            self._complete()

        if leg.action_url is None:
            if self.status == "in-progress":
                self._run_verbs(self._after_dial_verbs, self._after_dial_base)
            return
        params = dict(self.params)
        params["CallStatus"] = self.status
        params.update(leg.action_params())
        delivery = await leg.deliver(leg.action_url, params, leg.spec.action_method)
        leg.action_delivery = delivery
        if delivery.ok:
            self.after_dial_twiml = delivery.body
        self._changes.notify()
        if self.status != "in-progress":
            return
        root = parse_twiml(delivery.body) if delivery.ok else None
        if root is None or root.tag != "Response":
            # Twilio says "an application error has occurred" and hangs up.
            self.twiml_problems.append("dial action did not answer with twiml")
            self._complete()
            return
        self._run_verbs(list(root), leg.action_url)
