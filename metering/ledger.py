"""Call records and usage counters in the store, written only through Lua scripts.

Every key a script touches belongs to one workspace, so each script runs in
that workspace's Redis Cluster slot. Periods are UTC calendar months and days.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from redis.commands.core import AsyncScript

from tenancy import keyspace
from tenancy.errors import NotFoundError
from tenancy.replies import HashFields, Store, text, text_map, text_or_none, texts


def month_of(epoch_ms: int) -> str:
    """The UTC month (``YYYY-MM``) that ``epoch_ms`` falls in."""
    return time.strftime("%Y-%m", time.gmtime(epoch_ms / 1000))


def day_of(epoch_ms: int) -> str:
    """The UTC day (``YYYY-MM-DD``) that ``epoch_ms`` falls in."""
    return time.strftime("%Y-%m-%d", time.gmtime(epoch_ms / 1000))


# Where a page of calls ends: (arrival ms, call sid).
Position = tuple[int, str]


def _scored(reply: Any) -> list[tuple[str, int]]:
    """A ``WITHSCORES`` reply as (member, integer score) pairs."""
    return [(text(item[0]), int(item[1])) for item in reply or []]


class CallNotFoundError(NotFoundError):
    """The workspace has no record of this call."""


@dataclass(frozen=True, slots=True)
class CallRecord:
    """What Callgate knows about one call; times in epoch milliseconds."""

    call_sid: str
    workspace_id: str
    agent_id: str
    from_number: str
    to_number: str
    status: str
    arrived_at_ms: int
    started_at_ms: int | None
    ended_at_ms: int | None
    metered_ms: int
    end_reason: str | None
    provider: str | None
    provider_call_id: str | None
    twilio_status: str | None
    twilio_call_duration_secs: int | None
    transferred_to: str | None = None
    agent_audio_ms: int = 0
    agent_played_ms: int = 0
    interruptions: int = 0
    dropped_frames: int = 0
    recording: str | None = None
    cost_micros: int = 0
    account_sid: str | None = None
    # The <Dial><Sip> leg of a Retell call, once Twilio reported it.
    sip_call_sid: str | None = None


@dataclass(frozen=True, slots=True)
class UsageLine:
    """Metered time and connected calls for one agent or number."""

    ms: int = 0
    calls: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    """A workspace's metered usage over one period."""

    workspace_id: str
    period: str
    ms: int
    calls: int
    cost_micros: int = 0
    agents: dict[str, UsageLine] = field(default_factory=dict)
    numbers: dict[str, UsageLine] = field(default_factory=dict)


def _script(store: Store, name: str) -> AsyncScript:
    source = files("metering").joinpath("lua", f"{name}.lua").read_text("utf-8")
    return store.register_script(source)


class Ledger:
    """Reads and writes call records and usage counters for every workspace."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._start = _script(store, "start")
        self._twilio_status = _script(store, "twilio_status")

    async def open_call(
        self,
        workspace_id: str,
        call_sid: str,
        *,
        agent_id: str,
        from_number: str,
        to_number: str,
        arrived_at_ms: int,
        account_sid: str = "",
    ) -> None:
        """Create the record of a call that was just routed to an agent.

        ``account_sid`` is the Twilio account that owns the call, which
        reconciliation asks about it.
        """
        key = keyspace.call(workspace_id, call_sid)
        async with self._store.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, "arrived_at_ms", arrived_at_ms)
            pipe.hset(
                key,
                mapping={
                    "call_sid": call_sid,
                    "workspace_id": workspace_id,
                    "agent_id": agent_id,
                    "from": from_number,
                    "to": to_number,
                    "status": "routed",
                    "account_sid": account_sid,
                },
            )
            pipe.zadd(keyspace.calls(workspace_id), {call_sid: arrived_at_ms}, nx=True)
            await pipe.execute()

    async def start_call(
        self,
        workspace_id: str,
        call_sid: str,
        *,
        agent_id: str,
        number: str,
        stream_sid: str,
        started_at_ms: int,
        period: str,
        day: str,
        lease_until_ms: int = 0,
    ) -> bool:
        """Mark the call connected and count it in ``period`` and ``day``.

        A non-zero ``lease_until_ms`` gives a call that holds no grant its
        first lease. Returns False if it had started before.
        """
        result = await self._start(
            keys=[
                keyspace.call(workspace_id, call_sid),
                keyspace.usage(workspace_id, period),
                keyspace.usage(workspace_id, day),
                keyspace.leases(workspace_id),
            ],
            args=[
                started_at_ms,
                agent_id,
                number,
                stream_sid,
                lease_until_ms,
                call_sid,
                period,
                day,
            ],
        )
        if result == -1:
            raise CallNotFoundError(call_sid)
        return bool(result == 1)

    async def counted_in(
        self, workspace_id: str, call_sid: str
    ) -> tuple[str, str] | None:
        """The period and day a started call is counted in, as it started."""
        period, day = (
            text_or_none(value)
            for value in await self._store.hmget(
                keyspace.call(workspace_id, call_sid), ["usage_period", "usage_day"]
            )
        )
        return None if period is None or day is None else (period, day)

    async def grant_period(self, workspace_id: str, call_sid: str) -> str | None:
        """The billing period a call's grant was taken from, if it has one."""
        return text_or_none(
            await self._store.hget(keyspace.grant(workspace_id, call_sid), "period")
        )

    async def set_fields(
        self, workspace_id: str, call_sid: str, fields: dict[str, str]
    ) -> None:
        """Add informational fields (such as the provider's call id) to a record."""
        mapping: HashFields = dict(fields)
        await self._store.hset(keyspace.call(workspace_id, call_sid), mapping=mapping)

    async def record_twilio_status(
        self,
        workspace_id: str,
        call_sid: str,
        *,
        status: str,
        call_duration_secs: int | None,
        sequence: int,
    ) -> bool:
        """Store Twilio's view of the call; False when this callback is stale.

        A duration reprices the caller's leg of a settled call by Twilio's own
        billing; the script names the usage hashes its cost went into, which
        are read first (and again if the call settles in between).
        """
        record = keyspace.call(workspace_id, call_sid)
        while True:
            counted = await self.counted_in(workspace_id, call_sid)
            period, day = counted or ("", "")
            # Before the call starts the script touches no usage hash: the
            # record stands in for both.
            usage = [
                keyspace.usage(workspace_id, label) if label else record
                for label in (period, day)
            ]
            result = await self._twilio_status(
                keys=[record, keyspace.unreconciled(workspace_id), *usage],
                args=[
                    status,
                    "" if call_duration_secs is None else call_duration_secs,
                    sequence,
                    call_sid,
                    period,
                    day,
                ],
            )
            if result != -2:
                break
        if result == -1:
            raise CallNotFoundError(call_sid)
        return bool(result == 1)

    async def unreconciled(
        self, workspace_id: str, ended_before_ms: int, limit: int = 100
    ) -> list[str]:
        """Settled calls Twilio has not reported, that ended before the given time."""
        sids = await self._store.zrangebyscore(
            keyspace.unreconciled(workspace_id),
            "-inf",
            ended_before_ms,
            start=0,
            num=limit,
        )
        return texts(sids)

    async def forget_unreconciled(self, workspace_id: str, call_sid: str) -> None:
        """Stop asking Twilio about a call (it does not know it)."""
        await self._store.zrem(keyspace.unreconciled(workspace_id), call_sid)

    async def get_call(self, workspace_id: str, call_sid: str) -> CallRecord:
        """One call record, or :class:`CallNotFoundError`."""
        if not keyspace.CALL_SID.fullmatch(call_sid):
            raise CallNotFoundError(call_sid)
        fields = text_map(
            await self._store.hgetall(keyspace.call(workspace_id, call_sid))
        )
        if not fields:
            raise CallNotFoundError(call_sid)
        return _record(fields)

    async def recent_calls(
        self,
        workspace_id: str,
        limit: int = 50,
        *,
        before_ms: int | None = None,
        after: Position | None = None,
        since_ms: int | None = None,
        caller: str | None = None,
    ) -> tuple[list[CallRecord], Position | None]:
        """Calls newest first: arrived in [``since_ms``, ``before_ms``), past the
        position ``after`` (the cursor a previous page returned), and from
        ``caller`` if given; also the position of the next page (None at the end).

        A position is (arrival ms, call sid): calls that arrived in the same
        millisecond are ordered by sid, so a page boundary between them loses
        none. A caller filter reads further pages until it fills ``limit``, at
        most ten pages of ``limit`` calls, so an unlikely caller cannot make
        one request scan a whole history.
        """
        start: tuple[int, str | None] | None = after
        if before_ms is not None and (start is None or before_ms <= start[0]):
            start = (before_ms, None)
        found: list[CallRecord] = []
        cursor: Position | None = None
        for _ in range(10 if caller else 1):
            pairs = await self._page(workspace_id, start, since_ms, limit)
            if not pairs:
                return found, None
            async with self._store.pipeline(transaction=False) as pipe:
                for call_sid, _ in pairs:
                    pipe.hgetall(keyspace.call(workspace_id, call_sid))
                replies: list[Any] = await pipe.execute()
            for (call_sid, arrived), fields in zip(pairs, replies, strict=True):
                if len(found) == limit:
                    return found, cursor
                cursor = (arrived, call_sid)
                if not fields:
                    continue
                record = _record(text_map(fields))
                if caller is None or record.from_number == caller:
                    found.append(record)
            if len(pairs) < limit:
                return found, None
            start = cursor
            if len(found) == limit:
                break
        return found, cursor

    async def _page(
        self,
        workspace_id: str,
        start: tuple[int, str | None] | None,
        since_ms: int | None,
        count: int,
    ) -> list[tuple[str, int]]:
        """Up to ``count`` (sid, arrival ms) pairs below ``start``, newest first."""
        index = keyspace.calls(workspace_id)
        lower: int | str = since_ms if since_ms is not None else "-inf"
        upper: int | str = "+inf"
        pairs: list[tuple[str, int]] = []
        if start is not None:
            score, member = start
            upper = f"({score}"
            if member is not None and (since_ms is None or score >= since_ms):
                # The rest of the cursor's millisecond: equal scores come in
                # descending sid order, so what is left sorts below the cursor.
                same = await self._store.zrevrangebyscore(
                    index, score, score, withscores=True
                )
                pairs = [pair for pair in _scored(same) if pair[0] < member]
        if len(pairs) < count:
            rest = await self._store.zrevrangebyscore(
                index, upper, lower, start=0, num=count - len(pairs), withscores=True
            )
            pairs += _scored(rest)
        return pairs[:count]

    async def costs_micros(self, periods: Sequence[tuple[str, str]]) -> list[int]:
        """The cost to serve of each (workspace id, period), in one round trip."""
        async with self._store.pipeline(transaction=False) as pipe:
            for workspace_id, period in periods:
                pipe.hget(keyspace.usage(workspace_id, period), "cost_micros")
            replies: list[Any] = await pipe.execute()
        return [int(text(raw)) if raw is not None else 0 for raw in replies]

    async def usage(self, workspace_id: str, period: str) -> Usage:
        """Usage for a month (``YYYY-MM``) or a day (``YYYY-MM-DD``)."""
        fields = text_map(
            await self._store.hgetall(keyspace.usage(workspace_id, period))
        )
        agents: dict[str, UsageLine] = {}
        numbers: dict[str, UsageLine] = {}
        for name, value in fields.items():
            kind, _, rest = name.partition(":")
            owner, _, measure = rest.rpartition(":")
            table = {"agent": agents, "number": numbers}.get(kind)
            if table is None or measure not in {"ms", "calls"}:
                continue
            line = table.get(owner, UsageLine())
            if measure == "ms":
                table[owner] = UsageLine(ms=int(value), calls=line.calls)
            else:
                table[owner] = UsageLine(ms=line.ms, calls=int(value))
        return Usage(
            workspace_id=workspace_id,
            period=period,
            ms=int(fields.get("ms", 0)),
            calls=int(fields.get("calls", 0)),
            cost_micros=int(fields.get("cost_micros", 0)),
            agents=agents,
            numbers=numbers,
        )


def _optional_int(value: str | None) -> int | None:
    return None if value in (None, "") else int(value)


def _record(fields: dict[str, str]) -> CallRecord:
    return CallRecord(
        call_sid=fields["call_sid"],
        workspace_id=fields["workspace_id"],
        agent_id=fields["agent_id"],
        from_number=fields["from"],
        to_number=fields["to"],
        status=fields["status"],
        arrived_at_ms=int(fields["arrived_at_ms"]),
        started_at_ms=_optional_int(fields.get("started_at_ms")),
        ended_at_ms=_optional_int(fields.get("ended_at_ms")),
        metered_ms=int(fields.get("metered_ms", 0)),
        end_reason=fields.get("end_reason") or None,
        provider=fields.get("provider") or None,
        provider_call_id=fields.get("provider_call_id") or None,
        twilio_status=fields.get("twilio_status") or None,
        twilio_call_duration_secs=_optional_int(
            fields.get("twilio_call_duration_secs")
        ),
        transferred_to=fields.get("transferred_to") or None,
        agent_audio_ms=int(fields.get("agent_audio_ms", 0)),
        agent_played_ms=int(fields.get("agent_played_ms", 0)),
        interruptions=int(fields.get("interruptions", 0)),
        dropped_frames=int(fields.get("dropped_frames", 0)),
        recording=fields.get("recording") or None,
        cost_micros=int(fields.get("cost_micros", 0)),
        account_sid=fields.get("account_sid") or None,
        sip_call_sid=fields.get("sip_call_sid") or None,
    )
