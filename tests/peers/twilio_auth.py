"""Twilio identifiers and request signing, shared by every part of the Twilio peer."""

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from twilio.request_validator import RequestValidator

__all__ = [
    "API_VERSION",
    "SIGNATURE_HEADER",
    "TwilioAccount",
    "new_account",
    "new_call_sid",
    "new_stream_sid",
    "sign",
]

SIGNATURE_HEADER: Final = "X-Twilio-Signature"
# The ApiVersion every voice webhook and callback carries (§1.1).
API_VERSION: Final = "2010-04-01"


@dataclass(frozen=True, slots=True)
class TwilioAccount:
    """A (sub)account: its 34-character sid (AC…) and the token that signs for it."""

    sid: str
    auth_token: str


def new_account() -> TwilioAccount:
    """Return an account with a random sid and a random 32-hex-digit auth token."""
    return TwilioAccount(
        sid="AC" + secrets.token_hex(16), auth_token=secrets.token_hex(16)
    )


def new_call_sid() -> str:
    """Return a random call sid: CA and 32 hex digits."""
    return "CA" + secrets.token_hex(16)


def new_stream_sid() -> str:
    """Return a random stream sid: MZ and 32 hex digits."""
    return "MZ" + secrets.token_hex(16)


def sign(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """Return X-Twilio-Signature over url and form params (§1.3; {} for a GET).

    Uses twilio-python's own signer, so the peer signs exactly as Twilio would.
    """
    validator = RequestValidator(auth_token)
    return str(validator.compute_signature(url, dict(params)))
