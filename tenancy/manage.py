"""Operator API endpoints that manage a workspace: keys, audit, status, agents, numbers.

The resource basics (create, list, read) live in tenancy.api; what is here
changes a workspace's access or moves what it owns, and every change is
written to the workspace's audit log.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field

from tenancy import keyspace
from tenancy.access import AUDIT, KEYS, endpoint
from tenancy.api import (
    LEDGER,
    NUMBERS,
    PUBLIC_URL,
    TWILIO,
    WORKSPACES,
    Body,
    Phone,
    agent_document,
    audit,
    call_document,
    iso,
    json_response,
    number_document,
    read_body,
    workspace_document,
)
from tenancy.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    TwilioActionError,
)
from tenancy.keys import ApiKey
from tenancy.offboarding import Offboarding, check_targets
from tenancy.schemas import (
    AgentOut,
    AuditList,
    CertificateList,
    CertificateOut,
    DeletionCertificate,
    KeyCreated,
    KeyList,
    KeyOut,
    NumberOut,
    OffboardingOut,
    SubjectExport,
    WorkspaceOut,
)
from tenancy.subjects import Certificate, Subjects
from tenancy.twilio_api import TwilioApiError


class CreateKey(Body):
    """Body of ``POST /workspaces/{id}/keys``."""

    role: Literal["admin", "viewer"]
    name: Annotated[str, Field(min_length=1, max_length=100)]


class UpdateAgent(Body):
    """Body of ``PATCH /workspaces/{id}/agents/{agent_id}``."""

    name: Annotated[str | None, Field(min_length=1, max_length=100)] = None
    assistant_id: Annotated[str | None, Field(min_length=1, max_length=200)] = None
    api_key: Annotated[str | None, Field(min_length=1, max_length=500)] = None
    audio_format: Literal["mulaw", "pcm16"] | None = None


class RouteNumber(Body):
    """Body of ``PATCH /workspaces/{id}/numbers/{number}``."""

    agent_id: Annotated[str, Field(pattern=r"^ag_[a-z2-7]{16}$")]


class BuyNumber(Body):
    """Body of ``POST /workspaces/{id}/numbers/buy``."""

    area_code: Annotated[str, Field(pattern=r"^[2-9][0-9]{2}$")]
    agent_id: Annotated[str, Field(pattern=r"^ag_[a-z2-7]{16}$")]


class MoveNumber(Body):
    """Body of ``POST /workspaces/{id}/numbers/{number}/move``."""

    workspace_id: Annotated[str, Field(pattern=r"^ws_[a-z2-7]{16}$")]
    agent_id: Annotated[str, Field(pattern=r"^ag_[a-z2-7]{16}$")]


def _key(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "workspace_id": key.workspace_id,
        "role": key.role,
        "name": key.name,
        "created_at": iso(key.created_at_ms),
        "revoked_at": iso(key.revoked_at_ms),
        "last_used_at": iso(key.last_used_at_ms),
    }


@endpoint(
    "POST",
    "/workspaces/{workspace_id}/keys",
    "admin",
    "Create a workspace key; its token is shown only in this answer",
    body=CreateKey,
    created=True,
    response=KeyCreated,
)
async def create_key(request: web.Request) -> web.Response:
    """``POST /workspaces/{workspace_id}/keys``."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    body = await read_body(request, CreateKey)
    key, token = await request.app[KEYS].create(workspace.id, body.role, body.name)
    await audit(request, workspace.id, "key.create", key.id, key.role)
    return json_response({**_key(key), "token": token}, status=201)


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/keys",
    "admin",
    "List workspace keys",
    response=KeyList,
)
async def list_keys(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}/keys``: never the tokens."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    keys = await request.app[KEYS].all(workspace.id)
    return json_response({"items": [_key(key) for key in keys]})


@endpoint(
    "DELETE",
    "/workspaces/{workspace_id}/keys/{key_id}",
    "admin",
    "Revoke a key",
    response=KeyOut,
)
async def revoke_key(request: web.Request) -> web.Response:
    """``DELETE /workspaces/{workspace_id}/keys/{key_id}``: revoked at once."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    key = await request.app[KEYS].revoke(workspace.id, request.match_info["key_id"])
    if key is None:
        raise NotFoundError("no such key")
    await audit(request, workspace.id, "key.revoke", key.id)
    return json_response(_key(key))


@endpoint(
    "POST",
    "/workspaces/{workspace_id}/keys/{key_id}/rotate",
    "admin",
    "Replace a key with a new token of the same role",
    created=True,
    response=KeyCreated,
)
async def rotate_key(request: web.Request) -> web.Response:
    """``POST /workspaces/{workspace_id}/keys/{key_id}/rotate``."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    rotated = await request.app[KEYS].rotate(workspace.id, request.match_info["key_id"])
    if rotated is None:
        raise NotFoundError("no such key")
    key, token = rotated
    await audit(
        request, workspace.id, "key.rotate", key.id, request.match_info["key_id"]
    )
    return json_response({**_key(key), "token": token}, status=201)


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/audit",
    "admin",
    "Read the audit log",
    response=AuditList,
)
async def read_audit(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}/audit``: newest first."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    entries = await request.app[AUDIT].entries(workspace.id)
    return json_response(
        {
            "items": [
                {
                    "at": iso(entry.at_ms),
                    "actor": entry.actor,
                    "action": entry.action,
                    "target": entry.target,
                    "detail": entry.detail,
                }
                for entry in entries
            ]
        }
    )


@endpoint(
    "POST",
    "/workspaces/{workspace_id}/suspend",
    "operator",
    "Suspend a workspace",
    response=WorkspaceOut,
)
async def suspend(request: web.Request) -> web.Response:
    """``POST /workspaces/{workspace_id}/suspend``: its numbers refuse calls."""
    return await _set_status(request, "suspended")


@endpoint(
    "POST",
    "/workspaces/{workspace_id}/resume",
    "operator",
    "Resume a workspace",
    response=WorkspaceOut,
)
async def resume(request: web.Request) -> web.Response:
    """``POST /workspaces/{workspace_id}/resume``."""
    return await _set_status(request, "active")


async def _set_status(
    request: web.Request, status: Literal["active", "suspended"]
) -> web.Response:
    workspaces = request.app[WORKSPACES]
    workspace = await workspaces.set_status(request.match_info["workspace_id"], status)
    await audit(request, workspace.id, f"workspace.{status}", workspace.id)
    return json_response(workspace_document(workspace))


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/agents/{agent_id}",
    "admin",
    "Read an agent",
    response=AgentOut,
)
async def get_agent(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}/agents/{agent_id}``."""
    agent = await request.app[WORKSPACES].get_agent(
        request.match_info["workspace_id"], request.match_info["agent_id"]
    )
    return json_response(agent_document(agent))


@endpoint(
    "PATCH",
    "/workspaces/{workspace_id}/agents/{agent_id}",
    "admin",
    "Change an agent (a new API key is write-only)",
    body=UpdateAgent,
    response=AgentOut,
)
async def update_agent(request: web.Request) -> web.Response:
    """``PATCH /workspaces/{workspace_id}/agents/{agent_id}``."""
    workspace_id = request.match_info["workspace_id"]
    body = await read_body(request, UpdateAgent)
    agent = await request.app[WORKSPACES].update_agent(
        workspace_id,
        request.match_info["agent_id"],
        name=body.name,
        assistant_id=body.assistant_id,
        api_key=body.api_key,
        audio_format=body.audio_format,
    )
    changed = ",".join(sorted(body.model_fields_set))
    await audit(request, workspace_id, "agent.update", agent.id, changed)
    return json_response(agent_document(agent))


@endpoint(
    "DELETE",
    "/workspaces/{workspace_id}/agents/{agent_id}",
    "admin",
    "Delete an agent no number routes to",
    empty=True,
)
async def delete_agent(request: web.Request) -> web.Response:
    """``DELETE /workspaces/{workspace_id}/agents/{agent_id}``."""
    workspace_id = request.match_info["workspace_id"]
    agent_id = request.match_info["agent_id"]
    await request.app[WORKSPACES].get_agent(workspace_id, agent_id)
    numbers = await request.app[NUMBERS].of_workspace(workspace_id)
    if any(number.agent_id == agent_id for number in numbers):
        raise ConflictError("a number still routes to this agent")
    await request.app[WORKSPACES].delete_agent(workspace_id, agent_id)
    await audit(request, workspace_id, "agent.delete", agent_id)
    return web.Response(status=204)


def _e164(request: web.Request) -> str:
    number = request.match_info["number"]
    if not keyspace.E164.fullmatch(number):
        raise NotFoundError(number)
    return number


@endpoint(
    "PATCH",
    "/workspaces/{workspace_id}/numbers/{number}",
    "admin",
    "Route a number to another of the workspace's agents",
    body=RouteNumber,
    response=NumberOut,
)
async def route_number(request: web.Request) -> web.Response:
    """``PATCH /workspaces/{workspace_id}/numbers/{number}``."""
    workspace_id = request.match_info["workspace_id"]
    e164 = _e164(request)
    body = await read_body(request, RouteNumber)
    numbers = request.app[NUMBERS]
    if await numbers.owner(e164) != workspace_id:
        raise NotFoundError(e164)
    current = await numbers.resolve(e164)
    number = await numbers.attach(
        workspace_id, e164, body.agent_id, current.number.twilio_account_sid
    )
    await audit(request, workspace_id, "number.route", e164, body.agent_id)
    return json_response(number_document(number))


@endpoint(
    "DELETE",
    "/workspaces/{workspace_id}/numbers/{number}",
    "admin",
    "Detach a number from the workspace",
    empty=True,
)
async def detach_number(request: web.Request) -> web.Response:
    """``DELETE /workspaces/{workspace_id}/numbers/{number}``."""
    workspace_id = request.match_info["workspace_id"]
    e164 = _e164(request)
    await request.app[NUMBERS].detach(workspace_id, e164)
    await audit(request, workspace_id, "number.detach", e164)
    return web.Response(status=204)


@endpoint(
    "POST",
    "/workspaces/{workspace_id}/numbers/{number}/move",
    "operator",
    "Move a number to another workspace",
    body=MoveNumber,
    response=NumberOut,
)
async def move_number(request: web.Request) -> web.Response:
    """``POST /workspaces/{workspace_id}/numbers/{number}/move``: operator only."""
    workspace_id = request.match_info["workspace_id"]
    e164 = _e164(request)
    body = await read_body(request, MoveNumber)
    target = await request.app[WORKSPACES].get(body.workspace_id)
    number = await request.app[NUMBERS].move(
        workspace_id, e164, target.id, body.agent_id
    )
    # Neither log names the other workspace: no workspace's data may hold
    # another's id (it would outlive an offboarding).
    await audit(request, workspace_id, "number.move_out", e164, "to another workspace")
    await audit(request, target.id, "number.move_in", e164, "from another workspace")
    return json_response(number_document(number))


@endpoint(
    "POST",
    "/workspaces/{workspace_id}/numbers/buy",
    "operator",
    "Buy a number into the workspace's Twilio subaccount and route it",
    body=BuyNumber,
    created=True,
    response=NumberOut,
)
async def buy_number(request: web.Request) -> web.Response:
    """``POST /workspaces/{workspace_id}/numbers/buy``: search, buy, attach."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    body = await read_body(request, BuyNumber)
    await request.app[WORKSPACES].get_agent(workspace.id, body.agent_id)
    account = workspace.twilio_account_sid
    if account is None:
        raise ConflictError("the workspace has no Twilio subaccount")
    twilio = request.app[TWILIO]
    base = request.app[PUBLIC_URL]
    try:
        choices = await twilio.available_numbers(account, body.area_code)
        if not choices:
            raise ConflictError(f"no numbers for sale in area code {body.area_code}")
        bought = choices[0]
        await twilio.buy_number(
            account, bought, base + "/twilio/voice", base + "/twilio/status"
        )
    except TwilioApiError as exc:
        raise TwilioActionError(f"twilio refused: {exc}") from exc
    number = await request.app[NUMBERS].attach(
        workspace.id, bought, body.agent_id, account
    )
    await audit(request, workspace.id, "number.buy", bought, body.agent_id)
    return json_response(number_document(number), status=201)


SUBJECTS = web.AppKey("subjects", Subjects)


class SubjectBody(Body):
    """Body of a data-subject request: the caller's number."""

    number: Phone


def _certificate(certificate: Certificate) -> dict[str, Any]:
    return {
        "id": certificate.id,
        "kind": certificate.kind,
        "subject_digest": certificate.subject_digest,
        "at": iso(certificate.at_ms),
        "call_records": certificate.call_records,
        "recordings": certificate.recordings,
    }


@endpoint(
    "POST",
    "/workspaces/{workspace_id}/subjects/export",
    "admin",
    "Export every call record of one caller",
    body=SubjectBody,
    response=SubjectExport,
)
async def export_subject(request: web.Request) -> web.Response:
    """``POST /workspaces/{workspace_id}/subjects/export``."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    body = await read_body(request, SubjectBody)
    found, certificate = await request.app[SUBJECTS].export(workspace.id, body.number)
    ledger = request.app[LEDGER]
    calls = [await ledger.get_call(workspace.id, f["call_sid"]) for f in found]
    await audit(request, workspace.id, "subject.export", certificate.id)
    return json_response(
        {
            "certificate": _certificate(certificate),
            "calls": [call_document(call) for call in calls],
        }
    )


@endpoint(
    "POST",
    "/workspaces/{workspace_id}/subjects/erase",
    "admin",
    "Erase every call record and recording of one caller",
    body=SubjectBody,
    response=CertificateOut,
)
async def erase_subject(request: web.Request) -> web.Response:
    """``POST /workspaces/{workspace_id}/subjects/erase``: totals stay, anonymous."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    body = await read_body(request, SubjectBody)
    certificate = await request.app[SUBJECTS].erase(workspace.id, body.number)
    await audit(request, workspace.id, "subject.erase", certificate.id)
    return json_response(_certificate(certificate))


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/subjects/certificates",
    "admin",
    "List data-subject certificates",
    response=CertificateList,
)
async def subject_certificates(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}/subjects/certificates``: newest first."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    certificates = await request.app[SUBJECTS].certificates(workspace.id)
    return json_response({"items": [_certificate(c) for c in certificates]})


OFFBOARDING = web.AppKey("offboarding", Offboarding)


class NumberWish(Body):
    """What to do with one number when its workspace is offboarded."""

    action: Literal["release", "transfer", "keep"]
    to_account_sid: Annotated[str | None, Field(pattern=r"^AC[0-9a-f]{32}$")] = None
    until: dt.date | None = None


class BeginOffboarding(Body):
    """Body of ``POST /workspaces/{id}/offboarding``; numbers not named are released."""

    grace_secs: Annotated[int, Field(ge=0, le=3600)] = 60
    numbers: dict[Phone, NumberWish] = Field(default_factory=dict)
    pause_after: Literal["suspend", "export", "numbers", "revoke", "delete"] | None = (
        None
    )


def _outcome(outcome: dict[str, Any]) -> dict[str, Any]:
    # "releasing" is the run's own note of an intent, not part of the answer.
    hidden = ("expired_at_ms", "releasing")
    shown = {k: v for k, v in outcome.items() if k not in hidden}
    if "expired_at_ms" in outcome:
        shown["expired_at"] = iso(outcome["expired_at_ms"])
    return shown


def _offboarding(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "workspace_id": state["workspace_id"],
        "status": state["status"],
        "started_at": iso(state["started_at_ms"]),
        "finished_at": iso(state.get("finished_at_ms")),
        "grace_secs": state["grace_secs"],
        "pause_after": state.get("pause_after"),
        "steps": state["steps"],
        "numbers": {e164: _outcome(o) for e164, o in state["numbers"].items()},
        "export": state.get("export"),
        "error": state.get("error"),
    }


@endpoint(
    "POST",
    "/workspaces/{workspace_id}/offboarding",
    "operator",
    "Offboard a workspace: export, numbers, keys, statement, deletion",
    body=BeginOffboarding,
    response=OffboardingOut,
    accepted=True,
)
async def begin_offboarding(request: web.Request) -> web.Response:
    """``POST /workspaces/{workspace_id}/offboarding``: starts, or resumes.

    Resuming a failed or paused offboarding may change where it pauses next
    and what happens to the numbers it has not handled yet; anything already
    done stays done, and asking to change a number Twilio has already acted
    on is refused (409). A transfer to the workspace's own subaccount, which
    offboarding closes, is refused (422).
    """
    offboarding = request.app[OFFBOARDING]
    workspace_id = request.match_info["workspace_id"]
    body = await read_body(request, BeginOffboarding)
    for e164, wish in body.numbers.items():
        if (wish.action == "transfer") != (wish.to_account_sid is not None):
            raise InvalidInputError(
                f"{e164}: to_account_sid goes with, and only with, a transfer"
            )
        if wish.until is not None and wish.action != "keep":
            raise InvalidInputError(f"{e164}: until (the port-out date) is for keep")
    wishes = {
        e164: wish.model_dump(mode="json", exclude_none=True)
        for e164, wish in body.numbers.items()
    }
    state = await offboarding.state(workspace_id)
    if state is None:
        workspace = await request.app[WORKSPACES].get(workspace_id)
        owned = {n.e164 for n in await request.app[NUMBERS].of_workspace(workspace.id)}
        for e164 in body.numbers:
            if e164 not in owned:
                raise InvalidInputError(f"{e164} is not a number of this workspace")
        check_targets(wishes, workspace.twilio_account_sid)
        await audit(request, workspace.id, "workspace.offboard", workspace.id)
        state = await offboarding.begin(
            workspace.id, wishes, body.grace_secs, body.pause_after
        )
    elif state["status"] in ("failed", "paused"):
        state = await offboarding.amend(workspace_id, wishes, body.pause_after)
    if state["status"] != "done":
        offboarding.start(workspace_id)
        state = {**state, "status": "running", "error": None}
    return json_response(_offboarding(state), status=202)


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/offboarding",
    "operator",
    "Where a workspace's offboarding stands",
    response=OffboardingOut,
)
async def get_offboarding(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}/offboarding``: outlives the workspace."""
    workspace_id = request.match_info["workspace_id"]
    state = await request.app[OFFBOARDING].state(workspace_id)
    if state is None:
        raise NotFoundError(f"workspace {workspace_id} is not being offboarded")
    return json_response(_offboarding(state))


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/offboarding/export",
    "operator",
    "Download the offboarding export archive",
    media="application/zip",
)
async def download_export(request: web.Request) -> web.StreamResponse:
    """``GET /workspaces/{workspace_id}/offboarding/export``: a zip file."""
    workspace_id = request.match_info["workspace_id"]
    state = await request.app[OFFBOARDING].state(workspace_id)
    if state is None or "export" not in state:
        raise NotFoundError(f"workspace {workspace_id} has no export yet")
    path = request.app[OFFBOARDING].export_path(workspace_id)
    if not path.is_file():
        raise web.HTTPGone(
            text=f"the export of {workspace_id} was deleted after its retention"
        )
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="{workspace_id}.zip"',
        },
    )


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/offboarding/certificate",
    "operator",
    "The deletion certificate of an offboarded workspace",
    response=DeletionCertificate,
)
async def deletion_certificate(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}/offboarding/certificate``."""
    workspace_id = request.match_info["workspace_id"]
    certificate = await request.app[OFFBOARDING].certificate(workspace_id)
    if certificate is None:
        raise NotFoundError(f"workspace {workspace_id} has not been deleted")
    return json_response(
        {
            **{k: v for k, v in certificate.items() if not k.endswith("_at_ms")},
            "started_at": iso(certificate["started_at_ms"]),
            "deleted_at": iso(certificate["deleted_at_ms"]),
        }
    )
