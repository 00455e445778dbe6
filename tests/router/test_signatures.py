"""Tests for Twilio signature checks, against Twilio's own test vectors."""

from __future__ import annotations

import pytest

from router.signatures import TwilioSigner, static_tokens
from tenancy.errors import SignatureError

ACCOUNT = "AC" + "0" * 32
URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675309",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
}


async def test_verify_accepts_twilios_published_vector() -> None:
    """The twilio-python test vector validates with token 12345."""
    await TwilioSigner(static_tokens({ACCOUNT: "12345"})).verify(
        ACCOUNT, URL, PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    )


async def test_verify_accepts_a_websocket_upgrade_signature() -> None:
    """An upgrade is signed over the wss:// URL with no parameters."""
    await TwilioSigner(static_tokens({ACCOUNT: "12345"})).verify(
        ACCOUNT, "wss://example.com/media", {}, "7PR3qMkpDyEJtMrVOY/LDyNq8J8="
    )


@pytest.mark.parametrize(
    ("account", "params", "signature", "message"),
    [
        (ACCOUNT, PARAMS, None, "missing"),
        (ACCOUNT, PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8X", "does not match"),
        (
            ACCOUNT,
            {**PARAMS, "To": "+18005551213"},
            "RSOYDt4T1cUTdK1PDd93/VVr8B8=",
            "match",
        ),
        ("AC" + "9" * 32, PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8=", "no auth token"),
    ],
)
async def test_verify_refuses_wrong_signatures(
    account: str, params: dict[str, str], signature: str | None, message: str
) -> None:
    """Missing, altered, or unknown-account signatures raise SignatureError."""
    with pytest.raises(SignatureError, match=message):
        await TwilioSigner(static_tokens({ACCOUNT: "12345"})).verify(
            account, URL, params, signature
        )


async def test_disabled_signer_accepts_anything() -> None:
    """With signatures turned off (development only) nothing is checked."""
    await TwilioSigner(static_tokens({}), enabled=False).verify(
        ACCOUNT, URL, PARAMS, None
    )
