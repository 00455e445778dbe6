"""Twilio's REST API for live calls: redirect with new TwiML, or hang up.

Used when the media stream cannot do the job itself: a fallback message after
the agent platform failed, a transfer, or ending a call whose stream is gone
(protocols.md 2.7). Requests authenticate with HTTP Basic, account sid and
auth token, of the account that owns the call.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Mapping

import aiohttp
import orjson

from tenancy.errors import CallgateError
from tenancy.logs import router_logger

_CALL_GONE = 20404


class TwilioApiError(CallgateError):
    """Twilio's API could not be reached or refused a request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TwilioApi:
    """Updates live calls through ``{CALLGATE_TWILIO_API_URL}/2010-04-01``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        api_url: str,
        tokens: Mapping[str, str],
        timeout_secs: float = 5.0,
    ) -> None:
        """``tokens`` maps each Twilio account sid Callgate serves to its token."""
        self._session = session
        self._api_url = api_url
        self._tokens = tokens
        self._timeout = aiohttp.ClientTimeout(total=timeout_secs)

    async def redirect(self, account_sid: str, call_sid: str, twiml: str) -> bool:
        """Replace the call's TwiML; False if the call has already ended."""
        return await self._update(account_sid, call_sid, {"Twiml": twiml})

    async def complete(self, account_sid: str, call_sid: str) -> bool:
        """Hang the call up; False if it had already ended."""
        return await self._update(account_sid, call_sid, {"Status": "completed"})

    async def fetch_call(
        self, account_sid: str, call_sid: str
    ) -> tuple[str, int | None] | None:
        """The call's status and duration (seconds) by Twilio; None if unknown."""
        url = f"{self._api_url}/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"
        try:
            async with self._session.get(
                url,
                headers={"Authorization": self._authorization(account_sid)},
                timeout=self._timeout,
            ) as response:
                status = response.status
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TwilioApiError(f"twilio unreachable: {type(exc).__name__}") from exc
        if status == 404:
            return None
        if status != 200:
            raise TwilioApiError(f"twilio answered {status}", status)
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise TwilioApiError("twilio answered with invalid JSON") from None
        if not isinstance(document, dict):
            raise TwilioApiError("twilio answered with a non-object")
        duration = document.get("duration")
        seconds = (
            int(duration) if isinstance(duration, str) and duration.isdigit() else None
        )
        return str(document.get("status", "")), seconds

    def _authorization(self, account_sid: str) -> str:
        token = self._tokens.get(account_sid)
        if token is None:
            raise TwilioApiError("no credentials for this Twilio account")
        credentials = b64encode(f"{account_sid}:{token}".encode()).decode("ascii")
        return f"Basic {credentials}"

    async def _update(
        self, account_sid: str, call_sid: str, form: dict[str, str]
    ) -> bool:
        authorization = self._authorization(account_sid)
        url = f"{self._api_url}/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"
        try:
            async with self._session.post(
                url,
                data=form,
                headers={"Authorization": authorization},
                timeout=self._timeout,
            ) as response:
                status = response.status
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TwilioApiError(f"twilio unreachable: {type(exc).__name__}") from exc
        if status == 200:
            return True
        if status == 404 and _error_code(body) == _CALL_GONE:
            router_logger.debug("call %s had already ended", call_sid)
            return False
        raise TwilioApiError(f"twilio answered {status}", status)


def _error_code(body: bytes) -> int | None:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    code = document.get("code") if isinstance(document, dict) else None
    return code if isinstance(code, int) else None
