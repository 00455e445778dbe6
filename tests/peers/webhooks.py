"""Requests Twilio makes to the server under test: signed, sent and recorded."""

import asyncio
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

import aiohttp

from .errors import PeerTimeoutError
from .twilio_auth import SIGNATURE_HEADER, TwilioAccount, sign
from .twiml import HttpMethod

__all__ = ["WebhookDelivery", "WebhookSender"]

logger = logging.getLogger("tests.peers")


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One callback Twilio sent and what the server answered.

    http_status is None when no answer came back; error then says why.
    sent_at is event-loop seconds (loop.time()) when the request went out.
    """

    method: HttpMethod
    url: str
    params: Mapping[str, str]
    http_status: int | None
    body: str
    error: str | None
    sent_at: float

    @property
    def ok(self) -> bool:
        """True for a 2xx answer, the only kind Twilio treats as success."""
        return self.http_status is not None and 200 <= self.http_status < 300


class WebhookSender:
    """Sends one account's webhooks, signed with its auth token (§1.3)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        account: TwilioAccount,
        timeout_secs: float,
    ) -> None:
        self.session = session
        self.account = account
        self.timeout_secs = timeout_secs
        # URL fragment -> how many more deliveries to it are lost on the way.
        self._losing: dict[str, int] = {}

    def lose(self, url_fragment: str, count: int = 1) -> None:
        """Lose the next ``count`` deliveries to URLs containing ``url_fragment``.

        Twilio does not retry a status callback that never arrived, so a lost
        one is simply gone; the delivery is recorded with no answer.
        """
        self._losing[url_fragment] = self._losing.get(url_fragment, 0) + count

    def _lost(self, url: str) -> bool:
        for fragment, left in self._losing.items():
            if left > 0 and fragment in url:
                self._losing[fragment] = left - 1
                return True
        return False

    async def request(
        self,
        url: str,
        params: Mapping[str, str],
        signature: str | None = None,
        method: HttpMethod = "POST",
    ) -> tuple[int, str]:
        """Send params as Twilio does and return (HTTP status, body).

        POST sends a form and signs URL plus params; GET moves the params into
        the query string and signs the resulting URL alone. signature replaces
        the correct X-Twilio-Signature, for negative tests. Raises
        PeerTimeoutError after timeout_secs, aiohttp.ClientError on I/O failure.
        """
        target = url
        form: dict[str, str] | None = dict(params)
        signed_params: Mapping[str, str] = params
        if method == "GET":
            joiner = "&" if urlsplit(url).query else "?"
            target = f"{url}{joiner}{urlencode(params)}" if params else url
            form = None
            signed_params = {}
        if signature is None:
            signature = sign(self.account.auth_token, target, signed_params)
        headers = {
            SIGNATURE_HEADER: signature,
            "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
        }
        timeout = aiohttp.ClientTimeout(total=self.timeout_secs)
        try:
            async with self.session.request(
                method, target, data=form, headers=headers, timeout=timeout
            ) as response:
                return response.status, await response.text()
        except TimeoutError as exc:
            raise PeerTimeoutError(
                f"a webhook reply from {url}", self.timeout_secs
            ) from exc

    async def deliver(
        self,
        url: str,
        params: Mapping[str, str],
        signature: str | None = None,
        method: HttpMethod = "POST",
    ) -> WebhookDelivery:
        """Send like request(), but record a failure instead of raising it.

        Twilio carries on with the call whatever a status callback gets back, so
        a callback the server drops must not fail the simulated call.
        """
        sent_at = asyncio.get_running_loop().time()
        params = dict(params)
        if self._lost(url):
            logger.info("webhook %s %s lost on the way", method, url)
            return WebhookDelivery(method, url, params, None, "", "lost", sent_at)
        try:
            status, body = await self.request(url, params, signature, method)
        except (aiohttp.ClientError, PeerTimeoutError) as exc:
            logger.warning("webhook %s %s got no answer: %s", method, url, exc)
            reason = str(exc) or type(exc).__name__
            return WebhookDelivery(method, url, params, None, "", reason, sent_at)
        return WebhookDelivery(method, url, params, status, body, None, sent_at)
