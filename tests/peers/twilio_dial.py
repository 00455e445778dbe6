"""The child leg a <Dial> places: its progress, status callbacks and time limit."""

import asyncio
import contextlib
import email.utils
import logging
import math
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol

from .errors import DialRefusedError, PeerStateError
from .sip import HangUpBy, SipEndpoint, SipUri, parse_sip_uri
from .twilio_auth import API_VERSION, TwilioAccount, new_call_sid
from .twiml import DialKind, DialSpec, HttpMethod
from .waiting import Changes, wait_for_event
from .webhooks import WebhookDelivery, WebhookSender

__all__ = ["DialedLeg", "LegOwner", "LegStatus", "UnansweredStatus"]

logger = logging.getLogger("tests.peers")

LegStatus = Literal[
    "initiated",
    "ringing",
    "in-progress",
    "completed",
    "busy",
    "failed",
    "no-answer",
    "canceled",
]
UnansweredStatus = Literal["busy", "no-answer", "failed"]
_LIVE: Final = frozenset({"initiated", "ringing", "in-progress"})
# The SIP final response Twilio reports for each way a leg can end (§1.2).
_SIP_CODES: Final[dict[str, int]] = {
    "completed": 200,
    "busy": 486,
    "no-answer": 487,
    "canceled": 487,
    "failed": 503,
}
# A loop timer may fire a hair late; a leg cut at 1.0004 s still lasted 1 s.
_DURATION_SLACK_SECS: Final = 0.001


class LegOwner(Protocol):
    """What a dialed leg needs from the call that placed it; SimulatedCall."""

    @property
    def account(self) -> TwilioAccount: ...

    @property
    def sid(self) -> str: ...

    @property
    def from_(self) -> str: ...

    @property
    def webhooks(self) -> WebhookSender | None: ...

    @property
    def sip_endpoint(self) -> SipEndpoint | None: ...

    def spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run coro as a task the call owns and cancels on close."""
        ...

    def leg_answered(self, leg: "DialedLeg") -> None:
        """The leg was answered (answerOnBridge answers the parent only now)."""
        ...

    async def leg_ended(self, leg: "DialedLeg") -> None:
        """The leg ended and its callbacks went out: run <Dial action> or go on."""
        ...


class DialedLeg:
    """One outbound-dial child leg, driven by the test the way its callee acts.

    Progress methods (initiate, ring, answer, hang_up, fail) send the status
    callbacks the <Number>/<Sip> subscribed to, in order, each signed with the
    account's token. Ending a leg sends its completed callback and then lets the
    owning call request the <Dial action> URL, before the method returns.
    Times ending in _at are event-loop seconds (loop.time()).
    """

    def __init__(self, spec: DialSpec, owner: LegOwner) -> None:
        self.spec = spec
        self.child_sid = new_call_sid()
        self.status: LegStatus = "initiated"
        self.sip_response_code: int | None = None
        self.created_at_utc = datetime.now(UTC)
        self.answered_at: float | None = None
        self.answered_at_utc: datetime | None = None
        self.ended_at: float | None = None
        self.ended_at_utc: datetime | None = None
        self.ended_by: HangUpBy | None = None
        self.callbacks: list[WebhookDelivery] = []
        self.action_delivery: WebhookDelivery | None = None
        # Replaces the X-Twilio-Signature of every request this leg causes.
        self.signature_override: str | None = None

        self._owner = owner
        self._sip_uri: SipUri | None = (
            parse_sip_uri(spec.target) if spec.kind == "sip" else None
        )
        self._initiated = False
        self._invite_accepted = False
        self._refused_with: int | None = None
        self._sequence = 0
        # One progress step at a time, so callbacks leave in event order even
        # when the time-limit task and the test act at once.
        self._lock = asyncio.Lock()
        self._ended = asyncio.Event()
        self._finished = asyncio.Event()
        self._changes = Changes()

    # What the TwiML asked for --------------------------------------------------

    @property
    def kind(self) -> DialKind:
        """ "sip" for <Sip>, "number" for <Number> or a bare number."""
        return self.spec.kind

    @property
    def target(self) -> str:
        """The SIP URI or number exactly as written in the TwiML; the leg's To."""
        return self.spec.target

    @property
    def time_limit_secs(self) -> int:
        """<Dial timeLimit>: the longest the answered leg may last (default 4 h)."""
        return self.spec.time_limit_secs

    @property
    def action_url(self) -> str | None:
        """<Dial action>, requested when the leg ends."""
        return self.spec.action_url

    @property
    def status_callback_url(self) -> str | None:
        """The noun's statusCallback."""
        return self.spec.status_callback_url

    @property
    def status_callback_events(self) -> frozenset[str]:
        """The subscribed events: initiated, ringing, answered, completed."""
        return self.spec.status_callback_events

    # State -------------------------------------------------------------------

    @property
    def live(self) -> bool:
        """True until the leg reaches a terminal status."""
        return self.status in _LIVE

    @property
    def duration_secs(self) -> int:
        """Whole seconds from answer to end (or now), rounded up; 0 if unanswered.

        Never more than time_limit_secs: Twilio cuts the leg at its limit.
        """
        if self.answered_at is None:
            return 0
        end = self.ended_at
        if end is None:
            end = asyncio.get_running_loop().time()
        elapsed = min(end - self.answered_at, self.time_limit_secs)
        return max(1, math.ceil(elapsed - _DURATION_SLACK_SECS))

    def callback_statuses(self) -> list[str]:
        """CallStatus of every status callback sent so far, in order."""
        return [delivery.params["CallStatus"] for delivery in self.callbacks]

    # Driving the leg ---------------------------------------------------------

    async def initiate(self) -> None:
        """Twilio starts dialing: send initiated, then try the SIP INVITE.

        A SIP endpoint that refuses the INVITE (FakeRetell for an unknown or
        expired call id) ends the leg as failed with its SIP code, without
        raising; check status and sip_response_code.
        """
        async with self._lock:
            await self._initiate_locked()

    async def ring(self) -> None:
        """The callee's phone rings: initiated (if not yet sent), then ringing.

        Raises DialRefusedError if the INVITE is refused, PeerStateError if the
        leg is already answered or over.
        """
        async with self._lock:
            await self._ring_locked()

    async def answer(self) -> None:
        """The callee picks up: ring first if needed, then answered (in-progress).

        From here the time limit runs: a task the call owns ends the leg after
        time_limit_secs of answered time (by="limit").
        """
        async with self._lock:
            await self._ring_locked()
            if self.status != "ringing":
                raise PeerStateError(f"dialed leg is {self.status}, not ringing")
            loop = asyncio.get_running_loop()
            self.status = "in-progress"
            self.answered_at = loop.time()
            self.answered_at_utc = datetime.now(UTC)
            self._changes.notify()
            if self._sip_uri is not None and self._owner.sip_endpoint is not None:
                self._owner.sip_endpoint.sip_answered(self._sip_uri, self.child_sid)
            self._owner.leg_answered(self)
            deadline = self.answered_at + self.time_limit_secs
            self._owner.spawn_task(
                self._enforce_time_limit(deadline), f"{self.child_sid}-time-limit"
            )
            logger.info("dialed leg %s answered", self.child_sid)
            await self._send_callback("answered")

    async def hang_up(self, by: Literal["callee", "caller"] = "callee") -> None:
        """One party hangs up: completed (or canceled, if unanswered), then action.

        by="caller" is the original caller leaving, which ends the parent call
        too, and may come before the answer. An unanswered callee ends the leg
        with fail() instead. Raises PeerStateError if the leg is already over.
        """
        async with self._lock:
            if not self.live:
                raise PeerStateError(f"dialed leg is already {self.status}")
            if by == "callee" and self.status != "in-progress":
                raise PeerStateError("an unanswered callee ends the leg with fail()")
            await self._end_locked(by)

    async def fail(
        self,
        status: UnansweredStatus = "failed",
        sip_response_code: int | None = None,
    ) -> None:
        """The dial ends unanswered: busy, no-answer or failed, then action.

        sip_response_code defaults to 486 busy, 487 no-answer or 503 failed.
        """
        async with self._lock:
            if self.status not in ("initiated", "ringing"):
                raise PeerStateError(f"dialed leg is {self.status}; cannot fail it")
            if not self._initiated:
                await self._initiate_locked()
                if not self.live:
                    return
            code = sip_response_code or _SIP_CODES[status]
            await self._finish_locked(status, None, code)

    async def end(self, by: HangUpBy) -> None:
        """End the leg if it is still live, as the owning call or REST does."""
        async with self._lock:
            if self.live:
                await self._end_locked(by)

    def complete_via_rest(self) -> None:
        """REST Status=completed on the child sid: end it in the background."""
        # As for the parent, Twilio answers the REST request before hanging up.
        self._owner.spawn_task(self.end("rest"), f"{self.child_sid}-rest-hangup")

    # Waiting -----------------------------------------------------------------

    async def wait_status(self, status: LegStatus, timeout_secs: float) -> None:
        """Wait until the leg reaches status (it may already have)."""
        await self._changes.wait_until(
            lambda: self.status == status,
            f"dialed leg {self.child_sid} to be {status}",
            timeout_secs,
        )

    async def wait_ended(self, timeout_secs: float) -> None:
        """Wait until the leg is over and its completed and action requests done."""
        await wait_for_event(
            self._finished, f"dialed leg {self.child_sid} to end", timeout_secs
        )

    # Internals ---------------------------------------------------------------

    async def _initiate_locked(self) -> None:
        if self._initiated:
            return
        self._initiated = True
        logger.info("dialed leg %s to %s initiated", self.child_sid, self.target)
        await self._send_callback("initiated")
        endpoint = self._owner.sip_endpoint
        if self._sip_uri is None or endpoint is None:
            # Numbers, and SIP with no endpoint configured, always ring.
            self._invite_accepted = True
            return
        refusal = endpoint.sip_invite(self._sip_uri, self.child_sid)
        if refusal is None:
            self._invite_accepted = True
            return
        self._refused_with = refusal
        await self._finish_locked("failed", None, refusal)

    async def _ring_locked(self) -> None:
        await self._initiate_locked()
        if self._refused_with is not None:
            raise DialRefusedError(self.target, self._refused_with)
        if not self.live:
            raise PeerStateError(f"dialed leg is already {self.status}")
        if self.status != "initiated":
            return
        self.status = "ringing"
        self._changes.notify()
        await self._send_callback("ringing")

    async def _end_locked(self, by: HangUpBy) -> None:
        if self.status == "in-progress":
            await self._finish_locked("completed", by, _SIP_CODES["completed"])
        else:
            # Hung up before the callee answered: Twilio cancels the INVITE.
            await self._finish_locked("canceled", by, _SIP_CODES["canceled"])

    async def _finish_locked(
        self, status: LegStatus, by: HangUpBy | None, sip_code: int
    ) -> None:
        # The status turns terminal before any await, so the time-limit task
        # and a concurrent hang-up both see the leg as over.
        self.status = status
        self.ended_by = by
        self.sip_response_code = sip_code
        self.ended_at = asyncio.get_running_loop().time()
        self.ended_at_utc = datetime.now(UTC)
        self._ended.set()
        self._changes.notify()
        logger.info(
            "dialed leg %s %s after %d s (by %s, sip %d)",
            self.child_sid,
            status,
            self.duration_secs,
            by or "callee",
            sip_code,
        )
        endpoint = self._owner.sip_endpoint
        if self._sip_uri is not None and endpoint is not None and self._invite_accepted:
            endpoint.sip_ended(self._sip_uri, by or "callee")

        await self._send_callback("completed")
        await self._owner.leg_ended(self)
        self._finished.set()
        self._changes.notify()

    async def _enforce_time_limit(self, deadline: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._ended.wait()
        if not self._ended.is_set():
            logger.info("dialed leg %s reached its time limit", self.child_sid)
            await self.end("limit")

    async def _send_callback(self, event: str) -> None:
        url = self.status_callback_url
        if url is None or event not in self.status_callback_events:
            return
        delivery = await self.deliver(
            url, self._callback_params(), self.spec.status_callback_method
        )
        self.callbacks.append(delivery)
        self._changes.notify()

    def _callback_params(self) -> dict[str, str]:
        params = {
            "AccountSid": self._owner.account.sid,
            "ApiVersion": API_VERSION,
            "CallSid": self.child_sid,
            "CallStatus": self.status,
            "Direction": "outbound-dial",
            "From": self.spec.caller_id or self._owner.from_,
            "ParentCallSid": self._owner.sid,
            "To": self.target,
            "Timestamp": email.utils.format_datetime(datetime.now(UTC)),
            "CallbackSource": "call-progress-events",
            "SequenceNumber": str(self._sequence),
        }
        self._sequence += 1
        if not self.live:
            duration = self.duration_secs
            params["CallDuration"] = str(duration)
            params["Duration"] = str(math.ceil(duration / 60))
            params["SipResponseCode"] = str(self.sip_response_code)
        return params

    def action_params(self) -> dict[str, str]:
        """The Dial* parameters Twilio adds to the <Dial action> request."""
        params = {
            "DialCallSid": self.child_sid,
            "DialCallStatus": self.status,
            "DialCallDuration": str(self.duration_secs),
            "DialBridged": "true" if self.answered_at is not None else "false",
        }
        if self.kind == "sip":
            # Twilio's <Sip> page: the action also gets the INVITE's response
            # code and SIP Call-ID; the simulator makes one up from the sid.
            params["DialSipCallId"] = f"{self.child_sid[2:]}@simulator.invalid"
            params["DialSipResponseCode"] = str(self.sip_response_code or 0)
        return params

    async def deliver(
        self, url: str, params: dict[str, str], method: HttpMethod
    ) -> WebhookDelivery:
        """Send one request on this leg's behalf through the call's webhooks."""
        webhooks = self._owner.webhooks
        if webhooks is None:
            raise PeerStateError("call has no webhook sender; use TwilioSimulator")
        return await webhooks.deliver(url, params, self.signature_override, method)
