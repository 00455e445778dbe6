"""Provider credentials are sealed with AES-GCM before they reach the store.

Each sealed value is bound to a context string (for example the workspace and
agent it belongs to) as associated data, so a ciphertext copied into another
workspace's record does not open there. Keys are derived from the operator's
secret key with HKDF, one purpose per derived key.
"""

from __future__ import annotations

import secrets
from base64 import urlsafe_b64decode, urlsafe_b64encode

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tenancy.errors import SealError

_VERSION = "v1"
_NONCE_BYTES = 12


def derive_key(secret_key: str, purpose: str, length: int = 32) -> bytes:
    """A key for one ``purpose``, derived from the operator's secret key."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=length,
        salt=b"callgate",
        info=purpose.encode("utf-8"),
    )
    return hkdf.derive(secret_key.encode("utf-8"))


class Vault:
    """Seals and opens short secrets (API keys, auth tokens) for storage."""

    def __init__(self, secret_key: str) -> None:
        self._aead = AESGCM(derive_key(secret_key, "credentials at rest"))

    def seal(self, plaintext: str, context: str) -> str:
        """Encrypt ``plaintext`` bound to ``context``; the result is ASCII."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead.encrypt(
            nonce, plaintext.encode("utf-8"), context.encode("utf-8")
        )
        body = urlsafe_b64encode(nonce + sealed).decode("ascii")
        return f"{_VERSION}.{body}"

    def open(self, sealed: str, context: str) -> str:
        """Decrypt a value made by :meth:`seal` with the same ``context``."""
        version, _, body = sealed.partition(".")
        if version != _VERSION or not body:
            raise SealError("unknown sealed value format")
        try:
            raw = urlsafe_b64decode(body.encode("ascii"))
            plaintext = self._aead.decrypt(
                raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], context.encode("utf-8")
            )
        except (InvalidTag, ValueError) as exc:
            raise SealError("sealed value does not open in this context") from exc
        return plaintext.decode("utf-8")
