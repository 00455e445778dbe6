"""Budget webhook registrations: one per workspace, and one for every workspace.

The operator registers a URL for a workspace, or one URL that receives the
events of every workspace. Each registration has its own signing secret,
generated here in the Standard Webhooks form (``whsec_`` and base64 of 32
random bytes), shown once when it is made and stored sealed by the vault,
bound to the registration it belongs to.

A new registration starts at the present: events recorded before it are
not sent to it. Replacing the URL of an existing one keeps its place, so
nothing pending is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import secrets
import time
from base64 import b64encode
from dataclasses import dataclass
from typing import Final

from yarl import URL

from metering.budget_events import last_id
from tenancy import keyspace
from tenancy.errors import InvalidInputError
from tenancy.replies import HashFields, Store, text_map, text_or_none, texts
from tenancy.vault import Vault
from tenancy.workspaces import now_ms

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 (a format marker, not a secret)
MAX_URL_LENGTH: Final = 2000
# Deletes a workspace's delivery lock only if it is still the caller's.
RELEASE_LOCK: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# How long a registration change waits for a delivery in flight to finish.
_RESET_WAIT_SECS: Final = 30.0
_RESET_LOCK_MS: Final = 10_000


@dataclass(frozen=True, slots=True)
class Webhook:
    """A registration: where events go and the secret that signs them.

    ``secret`` is ``None`` where it was not opened: describing a webhook never
    needs it, so a secret that no longer opens does not stop the operator
    from seeing, replacing or removing its webhook.
    """

    url: str
    secret: str | None
    created_at_ms: int
    updated_at_ms: int


_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _host_ok(host: str) -> bool:
    """An IP address, or a DNS name (IDNA-encoded) of well-formed labels."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return True
    name = host.removesuffix(".")
    return 0 < len(name) <= 253 and all(
        _LABEL.fullmatch(label) for label in name.split(".")
    )


def check_url(url: str) -> str:
    """``url`` if it is an absolute http(s) URL a webhook can be sent to."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInputError("url is too long", "url")
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise InvalidInputError("url is not a valid URL", "url") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidInputError("url must be an absolute http or https URL", "url")
    if not _host_ok(parsed.raw_host or ""):
        raise InvalidInputError("url's host is not a valid host name", "url")
    if parsed.fragment:
        raise InvalidInputError("url must not have a fragment", "url")
    return url


def _context(workspace_id: str | None) -> str:
    return f"webhook:{workspace_id}" if workspace_id else "webhook:operator"


def _key(workspace_id: str | None) -> str:
    return keyspace.webhook(workspace_id) if workspace_id else keyspace.WEBHOOK


class Webhooks:
    """Registers, reads and removes budget webhooks."""

    def __init__(self, store: Store, vault: Vault) -> None:
        self._store = store
        self._vault = vault
        self._release = store.register_script(RELEASE_LOCK)

    @property
    def store(self) -> Store:
        """The store the registrations and their delivery state live in."""
        return self._store

    async def register(
        self, workspace_id: str | None, url: str, rotate_secret: bool = False
    ) -> tuple[Webhook, bool]:
        """Set the URL of a workspace's webhook, or of the operator's with ``None``.

        Returns the registration and whether its secret is new (a first
        registration, or ``rotate_secret``): only then should it be shown.
        """
        check_url(url)
        now = now_ms()
        current = await self.describe(workspace_id)
        fields: HashFields = {"url": url, "updated_at_ms": now}
        secret = None
        if current is None or rotate_secret:
            secret = SECRET_PREFIX + b64encode(secrets.token_bytes(32)).decode("ascii")
            fields["secret"] = self._vault.seal(secret, _context(workspace_id))
        created = now if current is None else current.created_at_ms
        if current is None:
            fields["created_at_ms"] = now
            await self._start_at_present(workspace_id)
        await self._store.hset(_key(workspace_id), mapping=fields)
        if current is not None and (secret is not None or current.url != url):
            await self._retry_now(workspace_id)
        return Webhook(url, secret, created, now), secret is not None

    async def _deliveries(self, workspace_id: str | None) -> list[tuple[str, str]]:
        """The (workspace, target) deliveries a registration feeds."""
        if workspace_id is not None:
            return [(workspace_id, "workspace")]
        ids = texts(await self._store.zrange(keyspace.WORKSPACES, 0, -1))
        return [(each, "operator") for each in ids]

    async def _retry_now(self, workspace_id: str | None) -> None:
        # A mended URL or secret is tried at once, not after the backoff the
        # broken one had earned. The reset is made under the workspace's
        # delivery lock, so that a delivery in flight cannot write its failure
        # (and its retry time) over it afterwards.
        for each, target in await self._deliveries(workspace_id):
            state = keyspace.webhook_delivery(each, target)
            retry_at = text_or_none(await self._store.hget(state, "next_attempt_ms"))
            if retry_at in (None, "0"):
                continue  # not backing off
            lock = keyspace.delivery_lock(each)
            token = secrets.token_hex(16)
            deadline = time.monotonic() + _RESET_WAIT_SECS
            while not await self._store.set(lock, token, nx=True, px=_RESET_LOCK_MS):
                if time.monotonic() > deadline:
                    break  # its next retry comes at its time
                await asyncio.sleep(0.05)
            else:
                try:
                    if await self._store.exists(keyspace.workspace(each)):
                        await self._store.hset(
                            state, mapping={"attempts": 0, "next_attempt_ms": 0}
                        )
                        await self._store.zadd(keyspace.WEBHOOKS_DUE, {each: now_ms()})
                finally:
                    await self._release(keys=[lock], args=[token])

    async def _start_at_present(self, workspace_id: str | None) -> None:
        # Deliveries of a new registration begin after the newest event.
        for each, target in await self._deliveries(workspace_id):
            newest = await last_id(self._store, each)
            state = keyspace.webhook_delivery(each, target)
            await self._store.delete(state)
            await self._store.hset(state, mapping={"cursor": newest, "since": newest})

    async def get(self, workspace_id: str | None) -> Webhook | None:
        """The registration, with its secret opened, or ``None``.

        Raises :class:`~tenancy.errors.SealError` if the secret does not open.
        """
        return await self._read(workspace_id, open_secret=True)

    async def describe(self, workspace_id: str | None) -> Webhook | None:
        """The registration without its secret, or ``None``."""
        return await self._read(workspace_id, open_secret=False)

    async def _read(
        self, workspace_id: str | None, open_secret: bool
    ) -> Webhook | None:
        fields = text_map(await self._store.hgetall(_key(workspace_id)))
        if "url" not in fields:
            return None
        secret = None
        if open_secret:
            secret = self._vault.open(fields["secret"], _context(workspace_id))
        return Webhook(
            url=fields["url"],
            secret=secret,
            created_at_ms=int(fields["created_at_ms"]),
            updated_at_ms=int(fields["updated_at_ms"]),
        )

    async def remove(self, workspace_id: str | None) -> bool:
        """Delete the registration; ``False`` when there was none."""
        removed = bool(await self._store.delete(_key(workspace_id)))
        if workspace_id is not None:
            await self._store.delete(
                keyspace.webhook_delivery(workspace_id, "workspace")
            )
        return removed

    async def target_names(self, workspace_id: str) -> list[str]:
        """Which webhooks receive ``workspace_id``'s events, secrets left sealed."""
        names = []
        if await self._store.hexists(keyspace.webhook(workspace_id), "url"):
            names.append("workspace")
        if await self._store.hexists(keyspace.WEBHOOK, "url"):
            names.append("operator")
        return names

    async def targets(self, workspace_id: str) -> list[tuple[str, Webhook]]:
        """Where ``workspace_id``'s events go: its own webhook, then the operator's.

        Secrets are left sealed: :meth:`secret` opens each when it is needed,
        so one that does not open holds back only its own webhook.
        """
        found: list[tuple[str, Webhook]] = []
        own = await self.describe(workspace_id)
        if own is not None:
            found.append(("workspace", own))
        operator = await self.describe(None)
        if operator is not None:
            found.append(("operator", operator))
        return found

    async def secret(self, workspace_id: str | None) -> str | None:
        """The opened secret of a registration, ``None`` if it was removed.

        Raises :class:`~tenancy.errors.SealError` if the secret does not open.
        """
        hook = await self.get(workspace_id)
        return None if hook is None else hook.secret
