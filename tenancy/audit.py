"""Each workspace's audit log: who changed what, and when; never secrets or audio.

Entries live in a capped Redis stream in the workspace's namespace, so the log
is exported and deleted with the workspace.
"""

from __future__ import annotations

from dataclasses import dataclass

from tenancy import keyspace
from tenancy.keys import Principal
from tenancy.replies import Store, text, text_map
from tenancy.workspaces import now_ms

# Entries kept per workspace; older ones are trimmed.
MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class Entry:
    """One change: when, by whom, what was done to what."""

    at_ms: int
    actor: str
    action: str
    target: str
    detail: str


class Audit:
    """Writes and reads workspaces' audit logs."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def record(
        self,
        workspace_id: str,
        principal: Principal,
        action: str,
        target: str,
        detail: str = "",
    ) -> None:
        """Append an entry; ``detail`` must never carry a secret."""
        await self._store.xadd(
            keyspace.audit(workspace_id),
            {
                "at_ms": now_ms(),
                "actor": principal.label,
                "action": action,
                "target": target,
                "detail": detail,
            },
            maxlen=MAX_ENTRIES,
            approximate=True,
        )

    async def exists(self, workspace_id: str) -> bool:
        """Whether the workspace exists, so a log written for it has an owner."""
        return await self._store.zscore(keyspace.WORKSPACES, workspace_id) is not None

    async def entries(self, workspace_id: str, limit: int = 100) -> list[Entry]:
        """The workspace's latest entries, newest first."""
        raw = await self._store.xrevrange(keyspace.audit(workspace_id), count=limit)
        entries = []
        for _, fields in raw or []:
            values = text_map(fields or {})
            entries.append(
                Entry(
                    at_ms=int(values["at_ms"]),
                    actor=text(values["actor"]),
                    action=values["action"],
                    target=values["target"],
                    detail=values.get("detail", ""),
                )
            )
        return entries
