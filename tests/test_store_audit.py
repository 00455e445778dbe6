"""The store audit that runs after every test catches what it is meant to."""

from __future__ import annotations

import pytest
import redis.asyncio as redis

from tenancy import keyspace
from tests.conftest import audit_store


async def test_audit_refuses_a_key_outside_every_namespace(store: redis.Redis) -> None:
    """A key in no workspace's namespace and not a documented global fails."""
    await store.set("stray", "1")
    with pytest.raises(AssertionError, match="outside any workspace"):
        await audit_store(store)
    await store.delete("stray")


async def test_audit_refuses_a_record_naming_another_workspace(
    store: redis.Redis,
) -> None:
    """A workspace record that holds another workspace's id fails."""
    alpha, bravo = keyspace.new_id("ws"), keyspace.new_id("ws")
    await store.hset(keyspace.workspace(alpha), mapping={"id": alpha})
    await audit_store(store)
    await store.hset(keyspace.workspace(alpha), "note", f"see {bravo}")
    with pytest.raises(AssertionError, match=bravo):
        await audit_store(store)
    await store.hdel(keyspace.workspace(alpha), "note")
