"""Workspace API keys: random, shown once, stored as digests, scoped to one workspace.

A key reads ``cgk.<workspace id>.<key id>.<secret>``. The store keeps only an
HMAC of the secret, under a key derived from Callgate's secret key, in the
workspace's own namespace; authenticating a key reads nothing outside its
workspace, and a workspace's keys go when the workspace does.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

from tenancy import keyspace
from tenancy.replies import HashFields, Store, text_map, texts
from tenancy.vault import derive_key
from tenancy.workspaces import now_ms

Role = Literal["admin", "viewer"]
ROLES: tuple[Role, ...] = ("admin", "viewer")
_PREFIX = "cgk"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A workspace key as listed: never its secret."""

    id: str
    workspace_id: str
    role: Role
    name: str
    created_at_ms: int
    revoked_at_ms: int | None
    last_used_at_ms: int | None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling the API: the operator, or one workspace's key."""

    workspace_id: str | None = None
    role: Role | None = None
    key_id: str | None = None

    @property
    def is_operator(self) -> bool:
        """True for the operator key, which reaches every workspace."""
        return self.workspace_id is None

    @property
    def label(self) -> str:
        """How the audit log names this principal."""
        return "operator" if self.is_operator else f"key:{self.key_id}"


OPERATOR = Principal()


class Keys:
    """Creates, authenticates, rotates and revokes workspace keys."""

    def __init__(self, store: Store, secret_key: str) -> None:
        self._store = store
        self._digest_key = derive_key(secret_key, "api keys")

    async def create(
        self, workspace_id: str, role: Role, name: str
    ) -> tuple[ApiKey, str]:
        """A new key and its token; the token is shown this once."""
        key = ApiKey(
            id=keyspace.new_id("ky"),
            workspace_id=workspace_id,
            role=role,
            name=name,
            created_at_ms=now_ms(),
            revoked_at_ms=None,
            last_used_at_ms=None,
        )
        secret = secrets.token_urlsafe(32)
        fields: HashFields = {
            "id": key.id,
            "workspace_id": workspace_id,
            "role": role,
            "name": name,
            "digest": self._digest(secret),
            "created_at_ms": key.created_at_ms,
        }
        async with self._store.pipeline(transaction=True) as pipe:
            pipe.hset(keyspace.api_key(workspace_id, key.id), mapping=fields)
            pipe.sadd(keyspace.api_keys(workspace_id), key.id)
            await pipe.execute()
        return key, f"{_PREFIX}.{workspace_id}.{key.id}.{secret}"

    async def all(self, workspace_id: str) -> list[ApiKey]:
        """The workspace's keys, oldest first, revoked ones included."""
        ids = sorted(texts(await self._store.smembers(keyspace.api_keys(workspace_id))))
        keys = [await self._get(workspace_id, key_id) for key_id in ids]
        found = [key for key in keys if key is not None]
        return sorted(found, key=lambda key: key.created_at_ms)

    async def revoke(self, workspace_id: str, key_id: str) -> ApiKey | None:
        """Revoke a key at once; None if the workspace has no such key."""
        if not keyspace.KEY_ID.fullmatch(key_id):
            return None
        key = await self._get(workspace_id, key_id)
        if key is None:
            return None
        if key.revoked_at_ms is None:
            await self._store.hset(
                keyspace.api_key(workspace_id, key_id), "revoked_at_ms", now_ms()
            )
        return await self._get(workspace_id, key_id)

    async def rotate(self, workspace_id: str, key_id: str) -> tuple[ApiKey, str] | None:
        """Replace a key with a new one of the same role and name."""
        old = await self.revoke(workspace_id, key_id)
        if old is None:
            return None
        return await self.create(workspace_id, old.role, old.name)

    async def authenticate(self, token: str) -> Principal | None:
        """The principal a token stands for, or None if it is not a live key."""
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != _PREFIX:
            return None
        _, workspace_id, key_id, secret = parts
        if not keyspace.WORKSPACE_ID.fullmatch(workspace_id):
            return None
        if not keyspace.KEY_ID.fullmatch(key_id):
            return None
        key_hash = keyspace.api_key(workspace_id, key_id)
        fields = text_map(await self._store.hgetall(key_hash))
        if not fields or fields.get("revoked_at_ms"):
            return None
        if not hmac.compare_digest(fields["digest"], self._digest(secret)):
            return None
        await self._store.hset(key_hash, "last_used_at_ms", now_ms())
        role: Role = "admin" if fields["role"] == "admin" else "viewer"
        return Principal(workspace_id=workspace_id, role=role, key_id=key_id)

    async def _get(self, workspace_id: str, key_id: str) -> ApiKey | None:
        fields = text_map(
            await self._store.hgetall(keyspace.api_key(workspace_id, key_id))
        )
        if not fields:
            return None
        return ApiKey(
            id=fields["id"],
            workspace_id=fields["workspace_id"],
            role="admin" if fields["role"] == "admin" else "viewer",
            name=fields["name"],
            created_at_ms=int(fields["created_at_ms"]),
            revoked_at_ms=int(fields["revoked_at_ms"])
            if fields.get("revoked_at_ms")
            else None,
            last_used_at_ms=int(fields["last_used_at_ms"])
            if fields.get("last_used_at_ms")
            else None,
        )

    def _digest(self, secret: str) -> str:
        return hmac.new(self._digest_key, secret.encode(), hashlib.sha256).hexdigest()
