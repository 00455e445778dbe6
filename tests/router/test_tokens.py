"""Tests for stream tokens: signed, short-lived and single-use."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as redis

from router.tokens import StreamTokens
from tenancy import keyspace
from tenancy.errors import StreamTokenError

SECRET = "s" * 40


async def _issue(tokens: StreamTokens) -> str:
    return await tokens.issue(
        workspace_id=keyspace.new_id("ws"),
        agent_id=keyspace.new_id("ag"),
        number="+14155550100",
        account_sid="AC" + "1" * 32,
        call_sid="CA" + "2" * 32,
    )


async def test_token_verifies_and_works_once(store: redis.Redis) -> None:
    """A fresh token verifies, is consumed once, and is refused the second time."""
    tokens = StreamTokens(SECRET, store, ttl_secs=30)
    token = await _issue(tokens)
    claims = tokens.verify(token)
    assert claims.number == "+14155550100"
    await tokens.consume(claims)
    with pytest.raises(StreamTokenError, match="already used"):
        await tokens.consume(tokens.verify(token))


async def test_token_from_another_secret_is_refused(store: redis.Redis) -> None:
    """A token signed with a different secret key does not verify."""
    token = await _issue(StreamTokens(SECRET, store, ttl_secs=30))
    with pytest.raises(StreamTokenError, match="signature"):
        StreamTokens("x" * 40, store, ttl_secs=30).verify(token)


async def test_tampered_token_is_refused(store: redis.Redis) -> None:
    """Changing any character of the claims breaks the signature."""
    tokens = StreamTokens(SECRET, store, ttl_secs=30)
    token = await _issue(tokens)
    body, _, mac = token.partition(".")
    flipped = body[:10] + ("A" if body[10] != "A" else "B") + body[11:]
    for bad in (f"{flipped}.{mac}", "nodot", "a.b.c", "!!.??", token + "x"):
        with pytest.raises(StreamTokenError):
            tokens.verify(bad)


async def test_expired_token_is_refused(
    store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token past its lifetime is refused even though its nonce is stored."""
    tokens = StreamTokens(SECRET, store, ttl_secs=5)
    token = await _issue(tokens)
    later = time.time() + 6
    monkeypatch.setattr(time, "time", lambda: later)
    with pytest.raises(StreamTokenError, match="expired"):
        tokens.verify(token)


async def test_token_nonce_lapses_in_the_store(store: redis.Redis) -> None:
    """The store keeps the nonce no longer than the token's lifetime."""
    tokens = StreamTokens(SECRET, store, ttl_secs=7)
    claims = tokens.verify(await _issue(tokens))
    ttl = await store.ttl(keyspace.stream_token(claims.workspace_id, claims.nonce))
    assert 0 < ttl <= 7
