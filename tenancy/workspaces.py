"""Workspaces and their agents as stored records: one client's world each.

An agent's provider API key is sealed with the vault, bound to its workspace
and agent ids, and never leaves this module except to open an upstream call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from metering.plans import Plan
from tenancy import keyspace
from tenancy.errors import AgentNotFoundError, WorkspaceNotFoundError
from tenancy.replies import HashFields, Store, text_map, texts
from tenancy.vault import Vault

Provider = Literal["vapi", "retell"]
PROVIDERS: tuple[Provider, ...] = ("vapi", "retell")
# What the agent platform is sent: Twilio's µ-law 8 kHz as is, or PCM16 16 kHz.
AudioFormat = Literal["mulaw", "pcm16"]


def now_ms() -> int:
    """Wall-clock time in integer milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


DEFAULT_FALLBACK_MESSAGE = (
    "Sorry, we can't take your call right now. Please try again later. Goodbye."
)


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """How a workspace's calls behave when something other than talking happens.

    ``fallback_number`` (E.164), when set, is dialled if the agent platform
    fails; otherwise the caller hears ``fallback_message``. The agent may only
    transfer calls to ``transfer_numbers``.
    """

    fallback_message: str = DEFAULT_FALLBACK_MESSAGE
    fallback_number: str | None = None
    transfer_numbers: tuple[str, ...] = ()
    recording: bool = False
    outage: Literal["continue", "terminate"] = "continue"
    emergency_grant_ms: int = 60_000


@dataclass(frozen=True, slots=True)
class Workspace:
    """One client of the agency."""

    id: str
    name: str
    status: Literal["active", "suspended"]
    created_at_ms: int
    policy: CallPolicy = CallPolicy()
    twilio_account_sid: str | None = None


@dataclass(frozen=True, slots=True)
class Agent:
    """An agent on a provider platform that a workspace's numbers route to.

    ``assistant_id`` is the platform's own id: a Vapi assistant id, or a
    Retell agent id. ``audio_format`` applies to media-path (Vapi) agents.
    """

    id: str
    workspace_id: str
    name: str
    provider: Provider
    assistant_id: str
    created_at_ms: int
    audio_format: AudioFormat = "mulaw"


def _api_key_context(workspace_id: str, agent_id: str) -> str:
    return f"agent-api-key/{workspace_id}/{agent_id}"


class Workspaces:
    """Creates and reads workspaces and agents in the store."""

    def __init__(self, store: Store, vault: Vault) -> None:
        self._store = store
        self._vault = vault

    async def create(self, name: str, policy: CallPolicy | None = None) -> Workspace:
        """Create an active workspace with a fresh id."""
        workspace = Workspace(
            id=keyspace.new_id("ws"),
            name=name,
            status="active",
            created_at_ms=now_ms(),
            policy=policy or CallPolicy(),
        )
        # The record goes first: an id listed in the index always has one.
        await self._store.hset(
            keyspace.workspace(workspace.id),
            mapping={
                "id": workspace.id,
                "name": workspace.name,
                "status": workspace.status,
                "created_at_ms": workspace.created_at_ms,
                **_policy_fields(workspace.policy),
            },
        )
        await self._store.zadd(
            keyspace.WORKSPACES, {workspace.id: workspace.created_at_ms}
        )
        return workspace

    async def get(self, workspace_id: str) -> Workspace:
        """The workspace, or :class:`WorkspaceNotFoundError`."""
        if not keyspace.WORKSPACE_ID.fullmatch(workspace_id):
            raise WorkspaceNotFoundError(workspace_id)
        fields = text_map(await self._store.hgetall(keyspace.workspace(workspace_id)))
        if not fields:
            raise WorkspaceNotFoundError(workspace_id)
        return _workspace(fields)

    async def update(
        self,
        workspace_id: str,
        *,
        name: str | None = None,
        policy: CallPolicy | None = None,
    ) -> Workspace:
        """Change the workspace's name or call policy; the rest stays."""
        current = await self.get(workspace_id)
        fields: HashFields = {}
        if name is not None:
            fields["name"] = name
        if policy is not None:
            fields.update(_policy_fields(policy))
        if fields:
            await self._store.hset(keyspace.workspace(current.id), mapping=fields)
        return await self.get(workspace_id)

    async def set_status(
        self, workspace_id: str, status: Literal["active", "suspended"]
    ) -> Workspace:
        """Suspend the workspace (its numbers refuse calls) or make it active."""
        await self.get(workspace_id)
        await self._store.hset(keyspace.workspace(workspace_id), "status", status)
        return await self.get(workspace_id)

    async def update_agent(
        self,
        workspace_id: str,
        agent_id: str,
        *,
        name: str | None = None,
        assistant_id: str | None = None,
        api_key: str | None = None,
        audio_format: AudioFormat | None = None,
    ) -> Agent:
        """Change an agent; a new ``api_key`` is sealed like the first."""
        await self.get_agent(workspace_id, agent_id)
        fields: HashFields = {}
        if name is not None:
            fields["name"] = name
        if assistant_id is not None:
            fields["assistant_id"] = assistant_id
        if audio_format is not None:
            fields["audio_format"] = audio_format
        if api_key is not None:
            context = _api_key_context(workspace_id, agent_id)
            fields["api_key_sealed"] = self._vault.seal(api_key, context)
        if fields:
            await self._store.hset(
                keyspace.agent(workspace_id, agent_id), mapping=fields
            )
        return await self.get_agent(workspace_id, agent_id)

    async def delete_agent(self, workspace_id: str, agent_id: str) -> None:
        """Remove an agent; its sealed key goes with it."""
        await self.get_agent(workspace_id, agent_id)
        async with self._store.pipeline(transaction=True) as pipe:
            pipe.delete(keyspace.agent(workspace_id, agent_id))
            pipe.srem(keyspace.agents(workspace_id), agent_id)
            await pipe.execute()

    async def plan(self, workspace_id: str) -> Plan | None:
        """The workspace's plan, or ``None`` when no budget is enforced."""
        fields = text_map(await self._store.hgetall(keyspace.plan(workspace_id)))
        return Plan.from_fields(fields) if fields else None

    async def plans(self, workspace_ids: Sequence[str]) -> dict[str, Plan]:
        """The plans of those of ``workspace_ids`` that have one, in one round trip."""
        async with self._store.pipeline(transaction=False) as pipe:
            for workspace_id in workspace_ids:
                pipe.hgetall(keyspace.plan(workspace_id))
            replies = await pipe.execute()
        return {
            workspace_id: Plan.from_fields(text_map(fields))
            for workspace_id, fields in zip(workspace_ids, replies, strict=True)
            if fields
        }

    async def set_plan(self, workspace_id: str, plan: Plan) -> None:
        """Replace the workspace's plan; running calls follow it within a grant."""
        await self.get(workspace_id)
        mapping: HashFields = plan.to_fields()
        await self._store.hset(keyspace.plan(workspace_id), mapping=mapping)

    async def all(self) -> list[Workspace]:
        """Every workspace, oldest first."""
        ids = texts(await self._store.zrange(keyspace.WORKSPACES, 0, -1))
        async with self._store.pipeline(transaction=False) as pipe:
            for workspace_id in ids:
                pipe.hgetall(keyspace.workspace(workspace_id))
            records = await pipe.execute()
        return [_workspace(text_map(fields)) for fields in records if fields]

    async def create_agent(
        self,
        workspace_id: str,
        *,
        name: str,
        provider: Provider,
        assistant_id: str,
        api_key: str,
        audio_format: AudioFormat = "mulaw",
    ) -> Agent:
        """Create an agent; its ``api_key`` is stored sealed, never in clear."""
        await self.get(workspace_id)
        agent = Agent(
            id=keyspace.new_id("ag"),
            workspace_id=workspace_id,
            name=name,
            provider=provider,
            assistant_id=assistant_id,
            created_at_ms=now_ms(),
            audio_format=audio_format,
        )
        sealed = self._vault.seal(api_key, _api_key_context(workspace_id, agent.id))
        async with self._store.pipeline(transaction=True) as pipe:
            pipe.hset(
                keyspace.agent(workspace_id, agent.id),
                mapping={
                    "id": agent.id,
                    "workspace_id": workspace_id,
                    "name": agent.name,
                    "provider": agent.provider,
                    "assistant_id": agent.assistant_id,
                    "api_key_sealed": sealed,
                    "created_at_ms": agent.created_at_ms,
                    "audio_format": agent.audio_format,
                },
            )
            pipe.sadd(keyspace.agents(workspace_id), agent.id)
            await pipe.execute()
        return agent

    async def get_agent(self, workspace_id: str, agent_id: str) -> Agent:
        """The workspace's agent, or :class:`AgentNotFoundError`."""
        fields = await self._agent_fields(workspace_id, agent_id)
        return _agent(fields)

    async def list_agents(self, workspace_id: str) -> list[Agent]:
        """The workspace's agents, oldest first."""
        await self.get(workspace_id)
        ids = sorted(texts(await self._store.smembers(keyspace.agents(workspace_id))))
        async with self._store.pipeline(transaction=False) as pipe:
            for agent_id in ids:
                pipe.hgetall(keyspace.agent(workspace_id, agent_id))
            records = await pipe.execute()
        agents = [_agent(text_map(fields)) for fields in records if fields]
        return sorted(agents, key=lambda agent: agent.created_at_ms)

    async def agent_api_key(self, workspace_id: str, agent_id: str) -> str:
        """Open the agent's sealed provider API key, for an upstream request."""
        fields = await self._agent_fields(workspace_id, agent_id)
        return self._vault.open(
            fields["api_key_sealed"], _api_key_context(workspace_id, agent_id)
        )

    async def _agent_fields(self, workspace_id: str, agent_id: str) -> dict[str, str]:
        if not keyspace.AGENT_ID.fullmatch(agent_id):
            raise AgentNotFoundError(agent_id)
        fields = text_map(
            await self._store.hgetall(keyspace.agent(workspace_id, agent_id))
        )
        if not fields:
            raise AgentNotFoundError(agent_id)
        return fields


def _policy_fields(policy: CallPolicy) -> HashFields:
    return {
        "fallback_message": policy.fallback_message,
        "fallback_number": policy.fallback_number or "",
        "transfer_numbers": ",".join(policy.transfer_numbers),
        "recording": int(policy.recording),
        "outage": policy.outage,
        "emergency_grant_ms": policy.emergency_grant_ms,
    }


def _workspace(fields: dict[str, str]) -> Workspace:
    status = fields["status"]
    numbers = fields.get("transfer_numbers", "")
    return Workspace(
        id=fields["id"],
        name=fields["name"],
        status="suspended" if status == "suspended" else "active",
        created_at_ms=int(fields["created_at_ms"]),
        twilio_account_sid=fields.get("twilio_account_sid") or None,
        policy=CallPolicy(
            fallback_message=fields.get("fallback_message") or DEFAULT_FALLBACK_MESSAGE,
            fallback_number=fields.get("fallback_number") or None,
            transfer_numbers=tuple(numbers.split(",")) if numbers else (),
            recording=fields.get("recording") == "1",
            outage="terminate" if fields.get("outage") == "terminate" else "continue",
            emergency_grant_ms=int(fields.get("emergency_grant_ms", 60_000)),
        ),
    )


def _agent(fields: dict[str, str]) -> Agent:
    return Agent(
        id=fields["id"],
        workspace_id=fields["workspace_id"],
        name=fields["name"],
        provider="retell" if fields["provider"] == "retell" else "vapi",
        assistant_id=fields["assistant_id"],
        created_at_ms=int(fields["created_at_ms"]),
        audio_format="pcm16" if fields.get("audio_format") == "pcm16" else "mulaw",
    )
