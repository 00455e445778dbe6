"""Checks that webhooks and stream upgrades really come from Twilio.

Twilio signs with the auth token of the account that owns the number, so the
token is chosen by the request's account sid before anything else is trusted
(protocols.md 1.3, 2.5 and 3). The signed URL is rebuilt from
``CALLGATE_PUBLIC_URL``, never from the Host header, because Callgate usually
sits behind a TLS terminator that rewrites it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twilio.request_validator import RequestValidator

from tenancy.errors import SignatureError


class TwilioSigner:
    """Knows each Twilio account's auth token and checks signatures with it."""

    def __init__(self, tokens: Mapping[str, str], enabled: bool = True) -> None:
        self._validators = {
            sid: RequestValidator(token) for sid, token in tokens.items()
        }
        self.enabled = enabled

    def knows(self, account_sid: str) -> bool:
        """True if Callgate holds the auth token of ``account_sid``."""
        return account_sid in self._validators

    def verify(
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
        validator = self._validators.get(account_sid)
        if validator is None:
            raise SignatureError("no auth token for this account")
        if not validator.validate(url, params, signature):
            raise SignatureError("signature does not match")
