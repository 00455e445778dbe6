"""The telephony actions a live call may need, done through Twilio's REST API.

This is the bridge's ``CallControl``: a transfer to an allowed number, the
workspace's fallback when the agent platform fails, and hanging up a call whose
stream vanished. Each returns whether Twilio accepted it; none raises, because
a failed action must not take the rest of the call's cleanup down with it.
"""

from __future__ import annotations

from metering.metrics import Metrics
from metering.plans import Plan
from router import twiml
from tenancy.logs import CallLog
from tenancy.twilio_api import TwilioApi, TwilioApiError
from tenancy.workspaces import CallPolicy


class TwilioCallControl:
    """Acts on one live call, on behalf of its workspace."""

    def __init__(
        self,
        api: TwilioApi,
        account_sid: str,
        call_sid: str,
        policy: CallPolicy,
        metrics: Metrics,
        log: CallLog,
        plan: Plan | None = None,
    ) -> None:
        self._api = api
        self._account_sid = account_sid
        self._call_sid = call_sid
        self._policy = policy
        self._metrics = metrics
        self._log = log
        self._plan = plan

    async def transfer(self, number: str) -> bool:
        """Redirect the call to ``<Dial>number</Dial>``."""
        return await self._redirect(twiml.dial(number), "transfer")

    async def fall_back(self) -> bool:
        """Dial the workspace's fallback number, or say its fallback message."""
        accepted = await self._redirect(twiml.fallback(self._policy), "fallback")
        self._metrics.fallbacks.labels("done" if accepted else "failed").inc()
        return accepted

    async def cut_off(self) -> bool:
        """Redirect to the plan's goodbye, or its number for exhausted budgets."""
        if self._plan is None:
            return await self.hang_up()
        return await self._redirect(twiml.time_up(self._plan), "budget")

    async def hang_up(self) -> bool:
        """End the call on Twilio's side."""
        try:
            return await self._api.complete(self._account_sid, self._call_sid)
        except TwilioApiError as exc:
            self._log.warning("could not hang up through twilio: %s", exc)
            return False

    async def _redirect(self, document: str, purpose: str) -> bool:
        try:
            return await self._api.redirect(self._account_sid, self._call_sid, document)
        except TwilioApiError as exc:
            self._log.warning("twilio refused the %s redirect: %s", purpose, exc)
            return False
