"""Operator API endpoints for budget webhooks and the events they carry.

Only the operator registers webhooks: a URL is where Callgate will send
requests, which is not a choice to hand to a client's key. A workspace's
keys may read its budget events.
"""

from __future__ import annotations

from typing import Annotated, Any

from aiohttp import web
from pydantic import Field
from yarl import URL

from metering.budget_events import all_events, events_after, stream_position
from tenancy import keyspace
from tenancy.access import endpoint
from tenancy.api import WORKSPACES, Body, audit, iso, json_response, read_body
from tenancy.errors import NotFoundError
from tenancy.hooks import MAX_URL_LENGTH, Webhook, Webhooks
from tenancy.logs import tenancy_logger
from tenancy.replies import text_map
from tenancy.schemas import BudgetEventList, WebhookOut

WEBHOOKS = web.AppKey("webhooks", Webhooks)


class SetWebhook(Body):
    """Body of ``PUT …/webhook``."""

    url: Annotated[str, Field(min_length=1, max_length=MAX_URL_LENGTH)]
    rotate_secret: bool = False


async def _delivery(request: web.Request, workspace_id: str) -> dict[str, Any]:
    store = request.app[WEBHOOKS].store
    state = text_map(
        await store.hgetall(keyspace.webhook_delivery(workspace_id, "workspace"))
    )
    pending = await events_after(store, workspace_id, state.get("cursor", "0-0"), 1000)
    next_attempt = int(state.get("next_attempt_ms", "0"))
    delivered_at = int(state.get("delivered_at_ms", "0"))
    return {
        "delivered": int(state.get("delivered", "0")),
        "pending": len(pending),
        "attempts": int(state.get("attempts", "0")),
        "last_status": int(state["last_status"]) if state.get("last_status") else None,
        "last_error": state.get("last_error") or None,
        "next_attempt_at": iso(next_attempt) if pending and next_attempt else None,
        "last_delivered_at": iso(delivered_at) if delivered_at else None,
    }


def _document(
    hook: Webhook,
    workspace_id: str | None,
    new_secret: bool,
    delivery: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "scope": "workspace" if workspace_id else "operator",
        "workspace_id": workspace_id,
        "url": hook.url,
        "created_at": iso(hook.created_at_ms),
        "updated_at": iso(hook.updated_at_ms),
        "secret": hook.secret if new_secret else None,  # shown once, when made
        "delivery": delivery,
    }


@endpoint(
    "PUT",
    "/webhook",
    "operator",
    "Register the budget webhook for every workspace; a new secret is shown once",
    body=SetWebhook,
    response=WebhookOut,
)
async def put_operator_webhook(request: web.Request) -> web.Response:
    """``PUT /webhook``: create or replace the operator's webhook."""
    body = await read_body(request, SetWebhook)
    hook, new_secret = await request.app[WEBHOOKS].register(
        None, body.url, body.rotate_secret
    )
    tenancy_logger.info("operator budget webhook set to host %s", URL(hook.url).host)
    return json_response(_document(hook, None, new_secret, None))


@endpoint(
    "GET",
    "/webhook",
    "operator",
    "The budget webhook for every workspace",
    response=WebhookOut,
)
async def get_operator_webhook(request: web.Request) -> web.Response:
    """``GET /webhook``: never the secret."""
    hook = await request.app[WEBHOOKS].describe(None)
    if hook is None:
        raise NotFoundError("no operator webhook")
    return json_response(_document(hook, None, False, None))


@endpoint(
    "DELETE",
    "/webhook",
    "operator",
    "Remove the budget webhook for every workspace",
    empty=True,
)
async def delete_operator_webhook(request: web.Request) -> web.Response:
    """``DELETE /webhook``: events are no longer sent to it."""
    if not await request.app[WEBHOOKS].remove(None):
        raise NotFoundError("no operator webhook")
    tenancy_logger.info("operator budget webhook removed")
    return web.Response(status=204)


@endpoint(
    "PUT",
    "/workspaces/{workspace_id}/webhook",
    "operator",
    "Register the workspace's budget webhook; a new secret is shown once",
    body=SetWebhook,
    response=WebhookOut,
)
async def put_webhook(request: web.Request) -> web.Response:
    """``PUT /workspaces/{workspace_id}/webhook``: create or replace."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    body = await read_body(request, SetWebhook)
    hook, new_secret = await request.app[WEBHOOKS].register(
        workspace.id, body.url, body.rotate_secret
    )
    detail = f"host {URL(hook.url).host}" + (", new secret" if new_secret else "")
    await audit(request, workspace.id, "webhook.set", "budget", detail)
    delivery = await _delivery(request, workspace.id)
    return json_response(_document(hook, workspace.id, new_secret, delivery))


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/webhook",
    "operator",
    "The workspace's budget webhook and how its deliveries stand",
    response=WebhookOut,
)
async def get_webhook(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}/webhook``: never the secret."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    hook = await request.app[WEBHOOKS].describe(workspace.id)
    if hook is None:
        raise NotFoundError("the workspace has no webhook")
    delivery = await _delivery(request, workspace.id)
    return json_response(_document(hook, workspace.id, False, delivery))


@endpoint(
    "DELETE",
    "/workspaces/{workspace_id}/webhook",
    "operator",
    "Remove the workspace's budget webhook",
    empty=True,
)
async def delete_webhook(request: web.Request) -> web.Response:
    """``DELETE /workspaces/{workspace_id}/webhook``."""
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    if not await request.app[WEBHOOKS].remove(workspace.id):
        raise NotFoundError("the workspace has no webhook")
    await audit(request, workspace.id, "webhook.remove", "budget")
    return web.Response(status=204)


@endpoint(
    "GET",
    "/workspaces/{workspace_id}/budget-events",
    "viewer",
    "Budget events of the workspace (50/80/100% and cut-off), oldest first",
    response=BudgetEventList,
)
async def list_budget_events(request: web.Request) -> web.Response:
    """``GET /workspaces/{workspace_id}/budget-events``.

    Each event says which webhooks have received it.
    """
    workspace = await request.app[WORKSPACES].get(request.match_info["workspace_id"])
    webhooks = request.app[WEBHOOKS]
    spans: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
    for target in await webhooks.target_names(workspace.id):
        state = text_map(
            await webhooks.store.hgetall(
                keyspace.webhook_delivery(workspace.id, target)
            )
        )
        # Events up to "since" came before the webhook was registered.
        spans[target] = (
            stream_position(state.get("since", "0-0")),
            stream_position(state.get("cursor", "0-0")),
        )
    items = []
    for event in await all_events(webhooks.store, workspace.id):
        position = stream_position(event.stream_id)
        delivered_to = [
            target
            for target, (since, cursor) in spans.items()
            if since < position <= cursor
        ]
        items.append({**event.document(), "delivered_to": delivered_to})
    return json_response({"items": items})
