"""Budget events as the quota scripts record them and as webhooks carry them.

The admit, report and cut-off scripts append an entry to a workspace's event
stream the moment its period's use reaches 50, 80 or 100% of the allowance
(the hard cap), and when the budget first refuses or ends a call; a marker
in the period's quota hash makes each happen at most once per period. This
module reads the stream and turns an entry into the JSON document a webhook
receives. The document is a function of the entry alone, so every retry of a
delivery sends the same bytes under the same id.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import orjson

from tenancy import keyspace
from tenancy.replies import Store, text, text_map

EventType = Literal["budget.threshold_reached", "budget.cut_off"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
THRESHOLDS: Final = (50, 80, 100)


def iso_ms(epoch_ms: int) -> str:
    """An instant as RFC 3339 UTC with milliseconds, such as ``…T19:40:00.123Z``."""
    moment = _EPOCH + timedelta(milliseconds=epoch_ms)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class BudgetEvent:
    """One entry of a workspace's budget event stream.

    ``kind`` is ``"50"``, ``"80"``, ``"100"`` or ``"cutoff"``; ``reason`` is
    set for a cut-off: ``"call_refused"`` (admission found no budget) or
    ``"call_ended"`` (a call's final units ran out).
    """

    stream_id: str
    workspace_id: str
    kind: str
    period: str
    used_ms: int
    allowance_ms: int
    at_ms: int
    reason: str | None = None

    @property
    def id(self) -> str:
        """The idempotency id: the same for every delivery of this event."""
        return f"bev_{self.workspace_id}_{self.period}_{self.kind}"

    @property
    def type(self) -> EventType:
        """``budget.threshold_reached`` or ``budget.cut_off``."""
        return "budget.cut_off" if self.kind == "cutoff" else "budget.threshold_reached"

    def document(self) -> dict[str, Any]:
        """The event as JSON: id, type, timestamp and data."""
        data: dict[str, Any] = {
            "workspace_id": self.workspace_id,
            "period": self.period,
            "used_ms": self.used_ms,
            "allowance_ms": self.allowance_ms,
        }
        if self.kind == "cutoff":
            data["reason"] = self.reason
        else:
            data["threshold_percent"] = int(self.kind)
        return {
            "id": self.id,
            "type": self.type,
            "timestamp": iso_ms(self.at_ms),
            "data": data,
        }

    def body(self) -> bytes:
        """The exact bytes a webhook delivery sends (and signs)."""
        return orjson.dumps(self.document(), option=orjson.OPT_SORT_KEYS)


def parse(workspace_id: str, stream_id: str, fields: dict[str, str]) -> BudgetEvent:
    """The event a stream entry holds."""
    return BudgetEvent(
        stream_id=stream_id,
        workspace_id=workspace_id,
        kind=fields["kind"],
        period=fields["period"],
        used_ms=int(fields["used_ms"]),
        allowance_ms=int(fields["allowance_ms"]),
        at_ms=int(fields["at_ms"]),
        reason=fields.get("reason"),
    )


def stream_position(stream_id: str) -> tuple[int, int]:
    """A stream id as a pair that sorts as the stream does."""
    millis, _, seq = stream_id.partition("-")
    return int(millis), int(seq or 0)


async def events_after(
    store: Store, workspace_id: str, after: str, count: int
) -> list[BudgetEvent]:
    """Up to ``count`` events recorded after the stream id ``after``, oldest first."""
    entries = await store.xrange(
        keyspace.budget_events(workspace_id), min=f"({after}", count=count
    )
    return _parse_all(workspace_id, entries)


async def all_events(store: Store, workspace_id: str) -> list[BudgetEvent]:
    """Every event the workspace's stream holds, oldest first."""
    entries = await store.xrange(keyspace.budget_events(workspace_id))
    return _parse_all(workspace_id, entries)


def _parse_all(workspace_id: str, entries: Any) -> list[BudgetEvent]:
    return [
        parse(workspace_id, text(sid), text_map(raw or {}))
        for sid, raw in entries or []
    ]


async def last_id(store: Store, workspace_id: str) -> str:
    """The id of the newest event, or ``0-0`` when there is none."""
    newest = await store.xrevrange(keyspace.budget_events(workspace_id), count=1)
    return text(newest[0][0]) if newest else "0-0"
