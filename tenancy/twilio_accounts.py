"""The Twilio accounts Callgate serves: the main one, and a subaccount per workspace.

Twilio signs a subaccount's webhooks with that subaccount's token, so the
token that checks a request is chosen by its ``AccountSid``. A subaccount's
token is kept sealed in its workspace's record; a global index maps the
subaccount's sid to the workspace.
"""

from __future__ import annotations

from tenancy import keyspace
from tenancy.errors import SealError
from tenancy.replies import Store, text_or_none
from tenancy.vault import Vault


def _context(workspace_id: str, account_sid: str) -> str:
    return f"twilio-auth-token/{workspace_id}/{account_sid}"


class TwilioAccounts:
    """Finds the auth token of any account Callgate serves."""

    def __init__(
        self,
        store: Store,
        vault: Vault,
        main_sid: str | None = None,
        main_token: str | None = None,
    ) -> None:
        self._store = store
        self._vault = vault
        self._main_sid = main_sid
        self._main_token = main_token

    async def token(self, account_sid: str) -> str | None:
        """The auth token of ``account_sid``, or None if Callgate holds none."""
        if account_sid and account_sid == self._main_sid:
            return self._main_token
        if not keyspace.ACCOUNT_SID.fullmatch(account_sid):
            return None
        workspace_id = text_or_none(
            await self._store.hget(keyspace.TWILIO_ACCOUNTS, account_sid)
        )
        if workspace_id is None:
            return None
        sealed = text_or_none(
            await self._store.hget(keyspace.workspace(workspace_id), "twilio_token")
        )
        if sealed is None:
            return None
        try:
            return self._vault.open(sealed, _context(workspace_id, account_sid))
        except SealError:
            return None

    async def attach(self, workspace_id: str, account_sid: str, token: str) -> None:
        """Record ``account_sid`` as the workspace's own subaccount."""
        sealed = self._vault.seal(token, _context(workspace_id, account_sid))
        await self._store.hset(
            keyspace.workspace(workspace_id),
            mapping={"twilio_account_sid": account_sid, "twilio_token": sealed},
        )
        await self._store.hset(keyspace.TWILIO_ACCOUNTS, account_sid, workspace_id)
