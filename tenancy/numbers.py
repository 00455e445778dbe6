"""Phone numbers: each owned by exactly one workspace and routed to one agent.

Ownership lives in the global ``cg:numbers`` hash, claimed with ``HSETNX`` so
two workspaces racing for a number cannot both win. The number's routing record
lives inside the owning workspace's namespace.
"""

from __future__ import annotations

from dataclasses import dataclass

from tenancy import keyspace
from tenancy.errors import NumberOwnedError, UnknownNumberError
from tenancy.replies import Store, text_map, text_or_none, texts
from tenancy.workspaces import Agent, Workspace, Workspaces, now_ms


@dataclass(frozen=True, slots=True)
class Number:
    """An E.164 number owned by a workspace and routed to one of its agents."""

    e164: str
    workspace_id: str
    agent_id: str
    twilio_account_sid: str | None
    attached_at_ms: int


@dataclass(frozen=True, slots=True)
class Route:
    """Where an inbound call to ``number`` goes."""

    workspace: Workspace
    agent: Agent
    number: Number


class Numbers:
    """Attaches numbers to workspaces and resolves inbound calls to routes."""

    def __init__(self, store: Store, workspaces: Workspaces) -> None:
        self._store = store
        self._workspaces = workspaces

    async def attach(
        self,
        workspace_id: str,
        e164: str,
        agent_id: str,
        twilio_account_sid: str | None = None,
    ) -> Number:
        """Claim ``e164`` for the workspace and route it to ``agent_id``.

        Attaching a number the workspace already owns re-routes it; a number
        owned by another workspace raises :class:`NumberOwnedError`.
        """
        keyspace.check(keyspace.E164, e164, "number")
        await self._workspaces.get_agent(workspace_id, agent_id)

        claimed = await self._store.hsetnx(keyspace.NUMBERS, e164, workspace_id)
        if not claimed:
            owner = text_or_none(await self._store.hget(keyspace.NUMBERS, e164))
            if owner != workspace_id:
                raise NumberOwnedError(e164)

        number = Number(
            e164=e164,
            workspace_id=workspace_id,
            agent_id=agent_id,
            twilio_account_sid=twilio_account_sid,
            attached_at_ms=now_ms(),
        )
        async with self._store.pipeline(transaction=True) as pipe:
            pipe.hset(
                keyspace.number(workspace_id, e164),
                mapping={
                    "e164": e164,
                    "workspace_id": workspace_id,
                    "agent_id": agent_id,
                    "twilio_account_sid": twilio_account_sid or "",
                    "attached_at_ms": number.attached_at_ms,
                },
            )
            pipe.sadd(keyspace.numbers(workspace_id), e164)
            await pipe.execute()
        return number

    async def of_workspace(self, workspace_id: str) -> list[Number]:
        """The workspace's numbers, in E.164 order."""
        await self._workspaces.get(workspace_id)
        owned = sorted(
            texts(await self._store.smembers(keyspace.numbers(workspace_id)))
        )
        async with self._store.pipeline(transaction=False) as pipe:
            for e164 in owned:
                pipe.hgetall(keyspace.number(workspace_id, e164))
            records = await pipe.execute()
        return [_number(text_map(fields)) for fields in records if fields]

    async def detach(self, workspace_id: str, e164: str) -> None:
        """Release the workspace's claim on ``e164``; calls to it are rejected."""
        if not keyspace.E164.fullmatch(e164):
            raise UnknownNumberError(e164)
        owner = text_or_none(await self._store.hget(keyspace.NUMBERS, e164))
        if owner != workspace_id:
            raise UnknownNumberError(e164)
        async with self._store.pipeline(transaction=True) as pipe:
            pipe.delete(keyspace.number(workspace_id, e164))
            pipe.srem(keyspace.numbers(workspace_id), e164)
            await pipe.execute()
        # The claim goes last: until then the number still routes here.
        await self._store.hdel(keyspace.NUMBERS, e164)

    async def move(
        self, workspace_id: str, e164: str, target_id: str, agent_id: str
    ) -> Number:
        """Hand ``e164`` to another workspace, routed to its ``agent_id``."""
        await self._workspaces.get_agent(target_id, agent_id)
        current = await self.resolve(e164)
        if current.workspace.id != workspace_id:
            raise UnknownNumberError(e164)
        async with self._store.pipeline(transaction=True) as pipe:
            pipe.delete(keyspace.number(workspace_id, e164))
            pipe.srem(keyspace.numbers(workspace_id), e164)
            await pipe.execute()
        await self._store.hset(keyspace.NUMBERS, e164, target_id)
        return await self.attach(
            target_id, e164, agent_id, current.number.twilio_account_sid
        )

    async def owner(self, e164: str) -> str | None:
        """The id of the workspace that owns ``e164``, if any."""
        if not keyspace.E164.fullmatch(e164):
            return None
        return text_or_none(await self._store.hget(keyspace.NUMBERS, e164))

    async def resolve(self, e164: str) -> Route:
        """The route for a call to ``e164``, or :class:`UnknownNumberError`."""
        if not keyspace.E164.fullmatch(e164):
            raise UnknownNumberError(e164)
        workspace_id = text_or_none(await self._store.hget(keyspace.NUMBERS, e164))
        if workspace_id is None:
            raise UnknownNumberError(e164)
        fields = text_map(
            await self._store.hgetall(keyspace.number(workspace_id, e164))
        )
        # A claim whose record was never written (a crash between the two
        # writes) routes nowhere until the number is attached again.
        if not fields:
            raise UnknownNumberError(e164)
        number = _number(fields)
        workspace = await self._workspaces.get(workspace_id)
        agent = await self._workspaces.get_agent(workspace_id, number.agent_id)
        return Route(workspace=workspace, agent=agent, number=number)


def _number(fields: dict[str, str]) -> Number:
    return Number(
        e164=fields["e164"],
        workspace_id=fields["workspace_id"],
        agent_id=fields["agent_id"],
        twilio_account_sid=fields["twilio_account_sid"] or None,
        attached_at_ms=int(fields["attached_at_ms"]),
    )
