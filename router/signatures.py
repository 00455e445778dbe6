"""Checks that webhooks and stream upgrades really come from Twilio.

Twilio signs with the auth token of the account that owns the number, so the
token is chosen by the request's account sid before anything else is trusted
(protocols.md 1.3, 2.5 and 3); a subaccount's token comes from the store. The
signed URL is rebuilt from ``CALLGATE_PUBLIC_URL``, never from the Host
header, because Callgate usually sits behind a TLS terminator that rewrites it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from twilio.request_validator import RequestValidator

from tenancy.errors import SignatureError

TokenLookup = Callable[[str], Awaitable[str | None]]


def static_tokens(tokens: Mapping[str, str]) -> TokenLookup:
    """A lookup over a fixed map of account sids to tokens."""

    async def lookup(account_sid: str) -> str | None:
        return tokens.get(account_sid)

    return lookup


class TwilioSigner:
    """Checks signatures with the token of the account a request names."""

    def __init__(self, tokens: TokenLookup, enabled: bool = True) -> None:
        self._tokens = tokens
        self.enabled = enabled

    async def verify(
        self,
        account_sid: str,
        url: str,
        params: Mapping[str, Any],
        signature: str | None,
    ) -> None:
        """Raise :class:`SignatureError` unless ``signature`` is Twilio's for this.

        ``url`` is the full URL Twilio requested; ``params`` the POSTed form
        fields (empty for a GET or a WebSocket upgrade). A multidict is passed
        through as-is so repeated fields are signed the way Twilio signs them.
        """
        if not self.enabled:
            return
        if not signature:
            raise SignatureError("missing X-Twilio-Signature")
        token = await self._tokens(account_sid)
        if token is None:
            raise SignatureError("no auth token for this account")
        if not RequestValidator(token).validate(url, params, signature):
            raise SignatureError("signature does not match")
