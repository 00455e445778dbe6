"""Twilio's REST API: live calls, subaccounts and phone numbers.

Live calls are redirected (a fallback, a transfer, a budget's goodbye) or
hung up when the media stream cannot do it (protocols.md 2.7). Each workspace
may get a subaccount of its own, and numbers are bought into it (protocols.md
3). Requests authenticate with HTTP Basic: an account's own token when
Callgate holds it, otherwise the main account's, which may act on its
subaccounts.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from tenancy.errors import CallgateError
from tenancy.logs import tenancy_logger

_CALL_GONE = 20404
_API = "/2010-04-01"


class TwilioApiError(CallgateError):
    """Twilio's API could not be reached or refused a request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TwilioApi:
    """Calls ``{CALLGATE_TWILIO_API_URL}/2010-04-01`` for Callgate's accounts."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        api_url: str,
        tokens: Mapping[str, str],
        main_account_sid: str | None = None,
        timeout_secs: float = 5.0,
    ) -> None:
        """``tokens`` maps account sids to auth tokens Callgate holds."""
        self._session = session
        self._api_url = api_url
        self._tokens = tokens
        self._main = main_account_sid
        self._timeout = aiohttp.ClientTimeout(total=timeout_secs)

    @property
    def main_account_sid(self) -> str | None:
        """The main account, which can create and act on subaccounts."""
        return self._main

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
        status, document = await self._send(
            "GET", account_sid, f"/Accounts/{account_sid}/Calls/{call_sid}.json"
        )
        if status == 404:
            return None
        if status != 200:
            raise TwilioApiError(f"twilio answered {status}", status)
        duration = document.get("duration")
        seconds = (
            int(duration) if isinstance(duration, str) and duration.isdigit() else None
        )
        return str(document.get("status", "")), seconds

    async def create_subaccount(self, friendly_name: str) -> tuple[str, str]:
        """A new subaccount of the main account: its sid and auth token."""
        if self._main is None:
            raise TwilioApiError("no main Twilio account is configured")
        status, document = await self._send(
            "POST", self._main, "/Accounts.json", form={"FriendlyName": friendly_name}
        )
        if status not in (200, 201):
            raise TwilioApiError(f"twilio refused the subaccount with {status}", status)
        sid, token = document.get("sid"), document.get("auth_token")
        if not isinstance(sid, str) or not isinstance(token, str):
            raise TwilioApiError("twilio answered without sid or auth_token")
        return sid, token

    async def available_numbers(self, account_sid: str, area_code: str) -> list[str]:
        """Local US numbers in ``area_code`` the account could buy now."""
        status, document = await self._send(
            "GET",
            account_sid,
            f"/Accounts/{account_sid}/AvailablePhoneNumbers/US/Local.json",
            query={"AreaCode": area_code},
        )
        if status != 200:
            raise TwilioApiError(f"twilio refused the search with {status}", status)
        found = document.get("available_phone_numbers", [])
        return [
            entry["phone_number"]
            for entry in found
            if isinstance(entry, dict) and isinstance(entry.get("phone_number"), str)
        ]

    async def buy_number(
        self, account_sid: str, number: str, voice_url: str, status_url: str
    ) -> str:
        """Buy ``number`` into the account, pointed at Callgate; its PN sid."""
        status, document = await self._send(
            "POST",
            account_sid,
            f"/Accounts/{account_sid}/IncomingPhoneNumbers.json",
            form={
                "PhoneNumber": number,
                "VoiceUrl": voice_url,
                "VoiceMethod": "POST",
                "StatusCallback": status_url,
                "StatusCallbackMethod": "POST",
            },
        )
        if status not in (200, 201) or not isinstance(document.get("sid"), str):
            raise TwilioApiError(f"twilio refused to sell {number}: {status}", status)
        return str(document["sid"])

    async def find_number(self, account_sid: str, number: str) -> str | None:
        """The PN sid of ``number`` in the account, or None if it holds none."""
        status, document = await self._send(
            "GET",
            account_sid,
            f"/Accounts/{account_sid}/IncomingPhoneNumbers.json",
            query={"PhoneNumber": number},
        )
        if status != 200:
            raise TwilioApiError(f"twilio refused the lookup with {status}", status)
        for entry in document.get("incoming_phone_numbers", []):
            if isinstance(entry, dict) and entry.get("phone_number") == number:
                sid = entry.get("sid")
                return sid if isinstance(sid, str) else None
        return None

    async def release_number(self, account_sid: str, number_sid: str) -> None:
        """Give a number back to Twilio."""
        status, _ = await self._send(
            "DELETE",
            account_sid,
            f"/Accounts/{account_sid}/IncomingPhoneNumbers/{number_sid}.json",
        )
        if status not in (200, 204):
            raise TwilioApiError(f"twilio refused the release with {status}", status)

    async def transfer_number(
        self, account_sid: str, number_sid: str, to_account_sid: str
    ) -> None:
        """Move a number to another account of the same family."""
        status, _ = await self._send(
            "POST",
            account_sid,
            f"/Accounts/{account_sid}/IncomingPhoneNumbers/{number_sid}.json",
            form={"AccountSid": to_account_sid},
        )
        if status != 200:
            raise TwilioApiError(f"twilio refused the transfer with {status}", status)

    async def close_account(self, account_sid: str) -> None:
        """Close a subaccount for good (its numbers are released with it)."""
        status, _ = await self._send(
            "POST", account_sid, f"/Accounts/{account_sid}.json", {"Status": "closed"}
        )
        if status != 200:
            raise TwilioApiError(f"twilio refused to close with {status}", status)

    async def _update(
        self, account_sid: str, call_sid: str, form: dict[str, str]
    ) -> bool:
        status, document = await self._send(
            "POST", account_sid, f"/Accounts/{account_sid}/Calls/{call_sid}.json", form
        )
        if status == 200:
            return True
        if status == 404 and document.get("code") == _CALL_GONE:
            tenancy_logger.debug("call %s had already ended", call_sid)
            return False
        raise TwilioApiError(f"twilio answered {status}", status)

    async def _send(
        self,
        method: str,
        account_sid: str,
        path: str,
        form: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        try:
            async with self._session.request(
                method,
                f"{self._api_url}{_API}{path}",
                data=form,
                params=query,
                headers={"Authorization": self._authorization(account_sid)},
                timeout=self._timeout,
            ) as response:
                status = response.status
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TwilioApiError(f"twilio unreachable: {type(exc).__name__}") from exc
        try:
            document = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            raise TwilioApiError(
                f"twilio answered {status} with invalid JSON"
            ) from None
        return status, document if isinstance(document, dict) else {}

    def _authorization(self, account_sid: str) -> str:
        login = account_sid if account_sid in self._tokens else self._main
        if login is None or login not in self._tokens:
            raise TwilioApiError("no credentials for this Twilio account")
        pair = f"{login}:{self._tokens[login]}".encode()
        return "Basic " + b64encode(pair).decode("ascii")
