"""Stream tokens: the capability in a stream URL that binds it to one routed call.

A token names the workspace, agent, number, Twilio account and call it was
issued for. It is HMAC-signed with a key derived from the secret key, expires
after a few seconds, and works once: issuing stores a nonce with a TTL, and
the stream upgrade deletes it atomically, so a replayed URL finds nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from base64 import urlsafe_b64decode, urlsafe_b64encode
from dataclasses import dataclass

import orjson

from tenancy import keyspace
from tenancy.errors import InvalidInputError, StreamTokenError
from tenancy.replies import Store
from tenancy.vault import derive_key

_MAX_TOKEN_CHARS = 1024


@dataclass(frozen=True, slots=True)
class StreamClaims:
    """What a stream token vouches for."""

    workspace_id: str
    agent_id: str
    number: str
    account_sid: str
    call_sid: str
    nonce: str
    expires_at_secs: int


def _b64(data: bytes) -> str:
    return urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StreamTokens:
    """Issues, verifies and consumes stream tokens."""

    def __init__(self, secret_key: str, store: Store, ttl_secs: int) -> None:
        self._key = derive_key(secret_key, "stream tokens")
        self._store = store
        self._ttl_secs = ttl_secs

    async def issue(
        self,
        *,
        workspace_id: str,
        agent_id: str,
        number: str,
        account_sid: str,
        call_sid: str,
    ) -> str:
        """A fresh single-use token for one routed call."""
        claims = StreamClaims(
            workspace_id=workspace_id,
            agent_id=agent_id,
            number=number,
            account_sid=account_sid,
            call_sid=call_sid,
            nonce=secrets.token_urlsafe(18),
            expires_at_secs=int(time.time()) + self._ttl_secs,
        )
        await self._store.set(
            keyspace.stream_token(workspace_id, claims.nonce),
            call_sid,
            ex=self._ttl_secs,
            nx=True,
        )
        payload = orjson.dumps(
            {
                "w": claims.workspace_id,
                "a": claims.agent_id,
                "n": claims.number,
                "s": claims.account_sid,
                "c": claims.call_sid,
                "o": claims.nonce,
                "e": claims.expires_at_secs,
            }
        )
        return f"{_b64(payload)}.{_b64(self._sign(payload))}"

    def verify(self, token: str) -> StreamClaims:
        """Check the token's signature and expiry; the store is not touched."""
        if len(token) > _MAX_TOKEN_CHARS or token.count(".") != 1:
            raise StreamTokenError("malformed stream token")
        body, _, mac = token.partition(".")
        try:
            payload = _unb64(body)
            given = _unb64(mac)
        except ValueError:
            raise StreamTokenError("malformed stream token") from None
        if not hmac.compare_digest(given, self._sign(payload)):
            raise StreamTokenError("stream token signature does not match")
        try:
            fields = orjson.loads(payload)
            claims = StreamClaims(
                workspace_id=keyspace.check(
                    keyspace.WORKSPACE_ID, fields["w"], "workspace_id"
                ),
                agent_id=keyspace.check(keyspace.AGENT_ID, fields["a"], "agent_id"),
                number=keyspace.check(keyspace.E164, fields["n"], "number"),
                account_sid=str(fields["s"]),
                call_sid=keyspace.check(keyspace.CALL_SID, fields["c"], "call_sid"),
                nonce=str(fields["o"]),
                expires_at_secs=int(fields["e"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, InvalidInputError):
            raise StreamTokenError("malformed stream token") from None
        if claims.expires_at_secs < time.time():
            raise StreamTokenError("stream token expired")
        return claims

    async def consume(self, claims: StreamClaims) -> None:
        """Use the token up; raise if it was used before or has lapsed."""
        deleted = await self._store.delete(
            keyspace.stream_token(claims.workspace_id, claims.nonce)
        )
        if deleted != 1:
            raise StreamTokenError("stream token already used or expired")

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()
