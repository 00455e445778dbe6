"""The operator API under ``/api/v1``: workspaces, agents, numbers, usage, calls.

Bearer-authenticated with the operator key. Bodies are validated by pydantic
models and every error is an RFC 9457 problem document.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from dataclasses import asdict
from typing import Annotated, Any, Literal, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metering.budget_events import iso_ms
from metering.ledger import CallRecord, Ledger, Usage
from metering.plans import Plan, hard_cap_ms, period_of, statement
from metering.quota import Quota
from tenancy import keyspace
from tenancy.access import AUDIT, endpoint, principal
from tenancy.errors import (
    InvalidInputError,
    NotFoundError,
    TwilioActionError,
)
from tenancy.logs import tenancy_logger
from tenancy.numbers import Number, Numbers
from tenancy.schemas import (
    AgentList,
    AgentOut,
    CallList,
    CallOut,
    NumberList,
    NumberOut,
    PlanOut,
    UsageOut,
    WorkspaceList,
    WorkspaceOut,
)
from tenancy.twilio_accounts import TwilioAccounts
from tenancy.twilio_api import TwilioApi, TwilioApiError
from tenancy.workspaces import Agent, CallPolicy, Workspace, Workspaces, now_ms

WORKSPACES = web.AppKey("workspaces", Workspaces)
NUMBERS = web.AppKey("numbers", Numbers)
LEDGER = web.AppKey("ledger", Ledger)
QUOTA = web.AppKey("quota", Quota)
TWILIO = web.AppKey("twilio_api", TwilioApi)
TWILIO_ACCOUNTS = web.AppKey("twilio_accounts", TwilioAccounts)
PUBLIC_URL = web.AppKey("public_url", str)

M = TypeVar("M", bound=BaseModel)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


E164_PATTERN = r"^\+[1-9][0-9]{1,14}$"
Phone = Annotated[str, Field(pattern=E164_PATTERN)]


class PolicyFields(Body):
    """Call policy fields shared by creating and updating a workspace."""

    fallback_message: Annotated[str | None, Field(min_length=1, max_length=300)] = None
    fallback_number: Phone | None = None
    transfer_numbers: Annotated[list[Phone] | None, Field(max_length=50)] = None
    recording: bool | None = None
    outage: Literal["continue", "terminate"] | None = None
    emergency_grant_ms: Annotated[int | None, Field(ge=0, le=3_600_000)] = None

    def merged(self, current: CallPolicy) -> CallPolicy:
        """``current`` with every field given in this body replaced."""
        given = self.model_fields_set
        return CallPolicy(
            fallback_message=self.fallback_message
            if self.fallback_message is not None
            else current.fallback_message,
            fallback_number=self.fallback_number
            if "fallback_number" in given
            else current.fallback_number,
            transfer_numbers=tuple(self.transfer_numbers)
            if self.transfer_numbers is not None
            else current.transfer_numbers,
            recording=self.recording
            if self.recording is not None
            else current.recording,
            outage=self.outage or current.outage,
            emergency_grant_ms=self.emergency_grant_ms
            if self.emergency_grant_ms is not None
            else current.emergency_grant_ms,
        )


class CreateWorkspace(PolicyFields):
    """Body of ``POST /workspaces``.

    ``twilio_subaccount`` (default: yes when Callgate holds main-account
    credentials) gives the workspace a Twilio subaccount of its own.
    """

    name: Annotated[str, Field(min_length=1, max_length=100)]
    twilio_subaccount: bool | None = None


class UpdateWorkspace(PolicyFields):
    """Body of ``PATCH /workspaces/{id}``: only the fields given change."""

    name: Annotated[str | None, Field(min_length=1, max_length=100)] = None


class CreateAgent(Body):
    """Body of ``POST /workspaces/{id}/agents``; ``api_key`` is write-only."""

    name: Annotated[str, Field(min_length=1, max_length=100)]
    provider: Literal["vapi", "retell"]
    assistant_id: Annotated[str, Field(min_length=1, max_length=200)]
    api_key: Annotated[str, Field(min_length=1, max_length=500)]
    audio_format: Literal["mulaw", "pcm16"] = "mulaw"


class AttachNumber(Body):
    """Body of ``POST /workspaces/{id}/numbers``."""

    number: Phone
    agent_id: Annotated[str, Field(pattern=r"^ag_[a-z2-7]{16}$")]
    twilio_account_sid: Annotated[
        str | None, Field(default=None, pattern=r"^AC[0-9a-f]{32}$")
    ]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json"
    )


def iso(epoch_ms: int | None) -> str | None:
    return None if epoch_ms is None else iso_ms(epoch_ms)


def workspace_document(workspace: Workspace) -> dict[str, Any]:
    policy = workspace.policy
    return {
        "id": workspace.id,
        "name": workspace.name,
        "status": workspace.status,
        "created_at": iso(workspace.created_at_ms),
        "twilio_account_sid": workspace.twilio_account_sid,
        "fallback_message": policy.fallback_message,
        "fallback_number": policy.fallback_number,
        "transfer_numbers": list(policy.transfer_numbers),
        "recording": policy.recording,
        "outage": policy.outage,
        "emergency_grant_ms": policy.emergency_grant_ms,
    }


def agent_document(agent: Agent) -> dict[str, Any]:
    return {
        "id": agent.id,
        "workspace_id": agent.workspace_id,
        "name": agent.name,
        "provider": agent.provider,
        "assistant_id": agent.assistant_id,
        "audio_format": agent.audio_format,
        "created_at": iso(agent.created_at_ms),
    }


def number_document(number: Number) -> dict[str, Any]:
    return {
        "number": number.e164,
        "workspace_id": number.workspace_id,
        "agent_id": number.agent_id,
        "twilio_account_sid": number.twilio_account_sid,
        "attached_at": iso(number.attached_at_ms),
    }


def call_document(record: CallRecord) -> dict[str, Any]:
    document = asdict(record)
    document["metered_secs"] = record.metered_ms / 1000
    for name in ("arrived_at", "started_at", "ended_at"):
        document[name] = iso(document.pop(f"{name}_ms"))
    return document


def usage_document(usage: Usage, plan: Plan | None, billed_ms: int) -> dict[str, Any]:
    def lines(table: dict[str, Any]) -> dict[str, Any]:
        return {
            owner: {"seconds": line.ms / 1000, "ms": line.ms, "calls": line.calls}
            for owner, line in sorted(table.items())
        }

    document: dict[str, Any] = {
        "workspace_id": usage.workspace_id,
        "period": usage.period,
        "seconds": usage.ms / 1000,
        "ms": usage.ms,
        "calls": usage.calls,
        "cost_micros": usage.cost_micros,
        "agents": lines(usage.agents),
        "numbers": lines(usage.numbers),
        "statement": None,
    }
    if plan is not None and len(usage.period) == len("YYYY-MM"):
        bill = statement(plan, billed_ms, usage.cost_micros)
        document["statement"] = {
            "currency": plan.currency,
            "billed_ms": bill.billed_ms,
            "billed_minutes_milli": bill.billed_minutes_milli,
            "included_ms": bill.included_ms,
            "overage_ms": bill.overage_ms,
            "allowance_ms": bill.allowance_ms,
            "price_micros": bill.price_micros,
            "cost_micros": bill.cost_micros,
            "margin_micros": bill.margin_micros,
        }
    return document


async def audit(
    request: web.Request, workspace_id: str, action: str, target: str, detail: str = ""
) -> None:
    await request.app[AUDIT].record(
        workspace_id, principal(request), action, target, detail
    )


async def read_body(request: web.Request, model: type[M]) -> M:
    raw = await request.read()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidInputError("request body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidInputError(first["msg"], field=field) from None


@endpoint(
    "POST",
    "/workspaces",
    "operator",
    "Create a workspace",
    body=CreateWorkspace,
    created=True,
    response=WorkspaceOut,
)
async def create_workspace(request: web.Request) -> web.Response:
    """``POST /workspaces``: a new, empty, active workspace."""
    body = await read_body(request, CreateWorkspace)
    twilio = request.app[TWILIO]
    wants_subaccount = body.twilio_subaccount
    if wants_subaccount is None:
        wants_subaccount = twilio.main_account_sid is not None
    if wants_subaccount and twilio.main_account_sid is None:
        raise InvalidInputError(
            "no main Twilio account is configured", field="twilio_subaccount"
        )
    workspace = await request.app[WORKSPACES].create(
        body.name, body.merged(CallPolicy())
    )
    tenancy_logger.info("created workspace %s", workspace.id)
    await audit(request, workspace.id, "workspace.create", workspace.id)
    if wants_subaccount:
        try:
            sid, token = await twilio.create_subaccount(f"Callgate {workspace.id}")
        except TwilioApiError as exc:
            raise TwilioActionError(f"twilio refused the subaccount: {exc}") from exc
        await request.app[TWILIO_ACCOUNTS].attach(workspace.id, sid, token)
        await audit(request, workspace.id, "twilio.subaccount", sid)
        workspace = await request.app[WORKSPACES].get(workspace.id)
    return json_response(workspace_document(workspace), status=201)


@endpoint(
    "GET",
    "/workspaces",
    "viewer",
    "List workspaces (a workspace key sees its own)",
    response=WorkspaceList,
)
async def list_workspaces(request: web.Request) -> web.Response:
    """``GET /workspaces``: every workspace, oldest first."""
    caller = principal(request)
    workspaces = await request.app[WORKSPACES].all()
    if not caller.is_operator:
        workspaces = [w for w in workspaces if w.id == caller.workspace_id]
    return json_response({"items": [workspace_document(w) for w in workspaces]})


@endpoint(
    "GET",
    "/workspaces/{workspace_id}",
    "viewer",
    "Read a workspace",
    response=WorkspaceOut,
)
async def get_workspace(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}``."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    return json_response(workspace_document(workspace))


@endpoint(
    "PATCH",
    "/workspaces/{workspace_id}",
    "admin",
    "Rename a workspace or change its call policy",
    body=UpdateWorkspace,
    response=WorkspaceOut,
)
async def update_workspace(request: web.Request) -> web.Response:
    """``PATCH /workspaces/{workspace_id}``: rename, or change the call policy."""
    workspaces = request.app[WORKSPACES]
    current = await workspaces.get(request.match_info["workspace_id"])
    body = await read_body(request, UpdateWorkspace)
    workspace = await workspaces.update(
        current.id, name=body.name, policy=body.merged(current.policy)
    )
    tenancy_logger.info("updated workspace %s", workspace.id)
    changed = ",".join(sorted(body.model_fields_set))
    await audit(request, workspace.id, "workspace.update", workspace.id, changed)
    return json_response(workspace_document(workspace))


@endpoint(
    "PUT",
    "/workspaces/{workspace_id}/plan",
    "operator",
    "Set the workspace's plan",
    body=Plan,
    response=PlanOut,
)
async def put_plan(request: web.Request) -> web.Response:
    """``PUT /workspaces/{workspace_id}/plan``: set the workspace's plan.

    Fields left out take their defaults, whatever the plan had before.
    """
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    body = await _plan_fields(request)
    return await _set_plan(request, workspace.id, body, "plan.set", Plan())


@endpoint(
    "PATCH",
    "/workspaces/{workspace_id}/plan",
    "operator",
    "Change some fields of the workspace's plan",
    body=Plan,
    response=PlanOut,
)
async def patch_plan(request: web.Request) -> web.Response:
    """``PATCH /workspaces/{workspace_id}/plan``: only the fields given change.

    Without a plan yet, the fields given are changed from the defaults.
    """
    workspaces = request.app[WORKSPACES]
    workspace = await workspaces.get(request.match_info["workspace_id"])
    body = await _plan_fields(request)
    current = await workspaces.plan(workspace.id) or Plan()
    return await _set_plan(request, workspace.id, body, "plan.update", current)


async def _plan_fields(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise InvalidInputError("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidInputError("request body must be a JSON object")
    known = {field.name for field in dataclasses.fields(Plan)}
    for name in body:
        if name not in known:
            raise InvalidInputError("unknown plan field", field=str(name))
    return body


async def _set_plan(
    request: web.Request,
    workspace_id: str,
    body: dict[str, Any],
    action: str,
    base: Plan,
) -> web.Response:
    try:
        plan = dataclasses.replace(base, **body)
    except TypeError as exc:
        raise InvalidInputError(f"plan field has the wrong type: {exc}") from None
    await request.app[WORKSPACES].set_plan(workspace_id, plan)
    # Running calls read the period's cap from the quota, not from the plan
    # they started under, so they follow the change at their next report.
    period = period_of(now_ms(), plan.timezone).label
    await request.app[QUOTA].set_limit(workspace_id, period, hard_cap_ms(plan))
    tenancy_logger.info("set the plan of workspace %s", workspace_id)
    await audit(request, workspace_id, action, workspace_id, ",".join(sorted(body)))
    return json_response(plan_document(plan))


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/plan",
    "admin",
    "Read the workspace's plan",
    response=PlanOut,
)
async def get_plan(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}/plan``: 404 when no budget is enforced."""
    workspaces = request.app[WORKSPACES]
    workspace = await workspaces.get(request.match_info["workspace_id"])
    plan = await workspaces.plan(workspace.id)
    if plan is None:
        raise NotFoundError("no plan")
    return json_response(plan_document(plan))


def plan_document(plan: Plan) -> dict[str, Any]:
    return {**plan.to_json(), "hard_cap_ms": hard_cap_ms(plan)}


@endpoint(
    "POST",
    "/workspaces/{workspace_id}/agents",
    "admin",
    "Create an agent",
    body=CreateAgent,
    created=True,
    response=AgentOut,
)
async def create_agent(request: web.Request) -> web.Response:
    """``POST /workspaces/{workspace_id}/agents``; the API key is never returned."""
    workspace_id = request.match_info["workspace_id"]
    body = await read_body(request, CreateAgent)
    agent = await request.app[WORKSPACES].create_agent(
        workspace_id,
        name=body.name,
        provider=body.provider,
        assistant_id=body.assistant_id,
        api_key=body.api_key,
        audio_format=body.audio_format,
    )
    tenancy_logger.info("created agent %s in workspace %s", agent.id, workspace_id)
    await audit(request, workspace_id, "agent.create", agent.id, agent.provider)
    return json_response(agent_document(agent), status=201)


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/agents",
    "admin",
    "List agents",
    response=AgentList,
)
async def list_agents(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}/agents``."""
    agents = await request.app[WORKSPACES].list_agents(
        request.match_info["workspace_id"]
    )
    return json_response({"items": [agent_document(agent) for agent in agents]})


@endpoint(
    "POST",
    "/workspaces/{workspace_id}/numbers",
    "admin",
    "Attach a number to an agent",
    body=AttachNumber,
    created=True,
    response=NumberOut,
)
async def attach_number(request: web.Request) -> web.Response:
    """``POST /workspaces/{workspace_id}/numbers``: claim and route a number."""
    workspace_id = request.match_info["workspace_id"]
    body = await read_body(request, AttachNumber)
    number = await request.app[NUMBERS].attach(
        workspace_id, body.number, body.agent_id, body.twilio_account_sid
    )
    tenancy_logger.info("attached a number to workspace %s", workspace_id)
    await audit(request, workspace_id, "number.attach", number.e164, number.agent_id)
    return json_response(number_document(number), status=201)


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/numbers",
    "admin",
    "List numbers",
    response=NumberList,
)
async def list_numbers(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}/numbers``."""
    numbers = await request.app[NUMBERS].of_workspace(
        request.match_info["workspace_id"]
    )
    return json_response({"items": [number_document(number) for number in numbers]})


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/usage",
    "viewer",
    "Usage and statement for a period",
    query=(("period", "YYYY-MM or YYYY-MM-DD, in the plan's time zone"),),
    response=UsageOut,
)
async def get_usage(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}/usage?period=YYYY-MM[-DD]``.

    Periods are in the plan's time zone (UTC without a plan). With a plan, a
    month's usage carries its statement: billed, included and overage time,
    price to the client, cost to serve and margin, in micro-units.
    """
    workspaces = request.app[WORKSPACES]
    workspace = await workspaces.get(request.match_info["workspace_id"])
    plan = await workspaces.plan(workspace.id)
    zone = plan.timezone if plan else "UTC"
    period = request.query.get("period") or period_of(now_ms(), zone).label
    try:
        keyspace.usage(workspace.id, period)
    except InvalidInputError as exc:
        raise InvalidInputError(str(exc), field="period") from None
    usage = await request.app[LEDGER].usage(workspace.id, period)
    billed_ms = usage.ms
    if plan is not None:
        billed_ms = (await request.app[QUOTA].state(workspace.id, period)).used_ms
    return json_response(usage_document(usage, plan, billed_ms))


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/calls",
    "viewer",
    "List calls, newest first, a page at a time",
    query=(
        ("limit", "how many, 1 to 500 (default 50)"),
        ("cursor", "next_cursor of the previous page"),
        ("since", "only calls that arrived at or after this ISO 8601 time"),
        ("until", "only calls that arrived before this ISO 8601 time"),
        ("caller", "only calls from this E.164 number"),
    ),
    response=CallList,
)
async def list_calls(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}/calls``: paged, filtered by time and caller."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    query = request.query
    raw_limit = query.get("limit", "50")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 500:
        raise InvalidInputError("limit must be an integer from 1 to 500", "limit")
    after = None
    cursor = query.get("cursor")
    if cursor is not None:
        matched = _CURSOR.fullmatch(cursor)
        if matched is None:
            raise InvalidInputError("cursor is not one this API gave", "cursor")
        after = (int(matched[1]), matched[2])
    caller = query.get("caller")
    if caller is not None and not keyspace.E164.fullmatch(caller):
        raise InvalidInputError("caller must be an E.164 number", "caller")
    records, next_cursor = await request.app[LEDGER].recent_calls(
        workspace.id,
        int(raw_limit),
        before_ms=_instant(query.get("until"), "until"),
        after=after,
        since_ms=_instant(query.get("since"), "since"),
        caller=caller,
    )
    return json_response(
        {
            "items": [call_document(record) for record in records],
            "next_cursor": None
            if next_cursor is None
            else "_".join(map(str, next_cursor)),
        }
    )


# A page's cursor: the arrival time (ms) and sid of the last call it covered.
_CURSOR = re.compile(r"([0-9]{1,15})_(CA[0-9a-f]{32})")


def _instant(value: str | None, field: str) -> int | None:
    """An ISO 8601 instant as epoch milliseconds (naive times are UTC)."""
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInputError("not an ISO 8601 time", field) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/calls/{call_sid}",
    "viewer",
    "Read a call record",
    response=CallOut,
)
async def get_call(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}/calls/{call_sid}``."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    record = await request.app[LEDGER].get_call(
        workspace.id, request.match_info["call_sid"]
    )
    return json_response(call_document(record))
