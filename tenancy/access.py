"""Who may call which operator endpoint, decided in one place for all of them.

Every endpoint is declared once, with the least privilege it needs:
``operator`` (the agency's key), ``admin`` (a workspace's admin key, or the
operator) or ``viewer`` (any key of the workspace, or the operator). A
workspace key that reaches for another workspace gets 404, never 403, so it
cannot even learn the other workspace exists. The same declarations build
the OpenAPI document.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as redis
from aiohttp import web

from tenancy import keyspace
from tenancy.audit import Audit
from tenancy.errors import (
    CallgateError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    NumberOwnedError,
    StoreError,
    TwilioActionError,
)
from tenancy.keys import OPERATOR, Keys, Principal
from tenancy.logs import tenancy_logger
from tenancy.problems import problem

PREFIX = "/api/v1"
Access = Literal["public", "operator", "admin", "viewer"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPERATOR_KEY = web.AppKey("operator_key", str)
KEYS = web.AppKey("keys", Keys)
AUDIT = web.AppKey("audit", Audit)
PRINCIPAL = web.RequestKey("principal", Principal)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One operation of the API: where it is, who may call it, what it takes."""

    method: str
    path: str
    handler: Handler
    access: Access
    summary: str
    body: type[Any] | None = None
    created: bool = False
    empty: bool = False
    query: tuple[tuple[str, str], ...] = ()
    response: type[Any] | None = None
    accepted: bool = False
    media: str = "application/json"

    @property
    def success(self) -> int:
        """The status a successful call answers with."""
        if self.accepted:
            return 202
        return 204 if self.empty else 201 if self.created else 200


ENDPOINTS: list[Endpoint] = []


def endpoint(
    method: str,
    path: str,
    access: Access,
    summary: str,
    body: type[Any] | None = None,
    created: bool = False,
    empty: bool = False,
    query: tuple[tuple[str, str], ...] = (),
    response: type[Any] | None = None,
    accepted: bool = False,
    media: str = "application/json",
) -> Callable[[Handler], Handler]:
    """Declare a handler as the endpoint ``method`` ``path`` (under /api/v1).

    ``body`` is the request model (pydantic, or a dataclass pydantic can
    describe), ``response`` the model of a successful answer; ``query`` lists
    (name, description) of optional parameters; ``accepted`` marks work that
    goes on after the answer (202); ``media`` is the answer's type when it is
    a file rather than JSON.
    """

    def register(handler: Handler) -> Handler:
        ENDPOINTS.append(
            Endpoint(
                method,
                PREFIX + path,
                handler,
                access,
                summary,
                body,
                created,
                empty,
                query,
                response,
                accepted,
                media,
            )
        )
        return handler

    return register


def principal(request: web.Request) -> Principal:
    """Who is calling: set by the middleware before any handler runs."""
    return request[PRINCIPAL]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


async def _authenticate(request: web.Request) -> Principal | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    operator = _digest(request.app[OPERATOR_KEY])
    if hmac.compare_digest(_digest(token), operator):
        return OPERATOR
    return await request.app[KEYS].authenticate(token)


def _access_of(request: web.Request) -> Access | None:
    handler = request.match_info.route.handler
    for declared in ENDPOINTS:
        if declared.handler is handler:
            return declared.access
    return None


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate, authorise, and turn failures into problem documents."""
    if not request.path.startswith(PREFIX + "/") and request.path != PREFIX:
        return await handler(request)
    access = _access_of(request)
    if access == "public":
        return await handler(request)
    try:
        caller = await _authenticate(request)
    except (StoreError, redis.RedisError):
        tenancy_logger.error("store failed during authentication", exc_info=True)
        return problem(503, "store-unavailable", "Store Unavailable")
    if caller is None:
        return problem(
            401,
            "unauthorized",
            "Unauthorized",
            "a valid bearer key is required",
            headers={"WWW-Authenticate": 'Bearer realm="callgate"'},
        )
    request[PRINCIPAL] = caller
    refusal = _refusal(request, caller, access)
    response = refusal or await _guarded(request, handler)
    await _attribute(request, caller, response.status)
    return response


async def _attribute(request: web.Request, caller: Principal, status: int) -> None:
    """Log the request in the audit log of the workspace it concerns.

    A key's requests go to its own workspace's log, refused ones included, so
    every use of a key is attributable; the route's template is logged, never
    the ids in the path, so no other workspace's id lands in this log.
    """
    workspace_id = caller.workspace_id or request.match_info.get("workspace_id")
    if workspace_id is None or not keyspace.WORKSPACE_ID.fullmatch(workspace_id):
        return
    route = request.match_info.route.resource
    template = route.canonical if route is not None else "unmatched"
    try:
        # An operator may name a workspace that does not, or no longer, exist:
        # writing its log would bring back a key of a deleted workspace.
        if caller.workspace_id is None and not await request.app[AUDIT].exists(
            workspace_id
        ):
            return
        await request.app[AUDIT].record(
            workspace_id,
            caller,
            "api.request",
            f"{request.method} {template}",
            str(status),
        )
    except (StoreError, redis.RedisError):
        tenancy_logger.warning("could not log a request in the audit log")


def _refusal(
    request: web.Request, caller: Principal, access: Access | None
) -> web.Response | None:
    if caller.is_operator:
        return None
    workspace_id = request.match_info.get("workspace_id")
    # Another workspace's resources do not exist for this key.
    if workspace_id is not None and workspace_id != caller.workspace_id:
        return problem(404, "not-found", "Not Found", "no such resource")
    if access == "operator" or (access == "admin" and caller.role != "admin"):
        return problem(403, "forbidden", "Forbidden", "this key may not do that")
    return None


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except NotFoundError:
        return problem(404, "not-found", "Not Found", "no such resource")
    except NumberOwnedError:
        detail = "the number belongs to another workspace"
        return problem(409, "number-owned", "Number Owned", detail)
    except ConflictError as exc:
        return problem(409, "conflict", "Conflict", str(exc) or None)
    except InvalidInputError as exc:
        return problem(
            422,
            "invalid-input",
            "Invalid Input",
            f"{exc.field}: {exc}" if exc.field else str(exc),
            field=exc.field,
        )
    except (StoreError, redis.RedisError):
        tenancy_logger.error("store failed during %s", request.path, exc_info=True)
        return problem(503, "store-unavailable", "Store Unavailable")
    except TwilioActionError as exc:
        tenancy_logger.warning("twilio failed during %s: %s", request.path, exc)
        return problem(502, "twilio-failed", "Bad Gateway", str(exc))
    except web.HTTPException as exc:
        return problem(exc.status, exc.reason.lower().replace(" ", "-"), exc.reason)
    except CallgateError:
        tenancy_logger.error("unexpected error on %s", request.path, exc_info=True)
        return problem(500, "internal", "Internal Error")


def add_routes(app: web.Application) -> None:
    """Register every declared endpoint on ``app``."""
    for declared in ENDPOINTS:
        app.router.add_route(declared.method, declared.path, declared.handler)
