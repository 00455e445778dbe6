"""A budget webhook receiver: verifies each request and records what it saw.

Signatures are checked with the Standard Webhooks reference library, not with
Callgate's signing code. The receiver can be told to fail its next requests,
to show that deliveries are retried, and to take its time answering.
"""

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from .serving import serve_on_loopback
from .waiting import Changes

__all__ = ["BudgetHookReceiver", "HookRequest"]


@dataclass(frozen=True, slots=True)
class HookRequest:
    """One request as the receiver got it, and what it answered."""

    endpoint: str
    webhook_id: str
    body: bytes
    verified: bool
    answered: int
    at: float

    @property
    def event(self) -> dict[str, Any]:
        """The JSON document the request carried."""
        parsed: dict[str, Any] = orjson.loads(self.body)
        return parsed


@dataclass
class BudgetHookReceiver:
    """Serves ``/hooks/{endpoint}`` on a loopback port."""

    secrets: dict[str, str] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    # Seconds an endpoint waits before it answers.
    delays: dict[str, float] = field(default_factory=dict)
    # Endpoints in the order requests reached them, before any answer.
    arrivals: list[str] = field(default_factory=list)
    requests: list[HookRequest] = field(default_factory=list)
    changes: Changes = field(default_factory=Changes)
    _runner: web.AppRunner | None = None
    base_url: str = ""

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_post("/hooks/{endpoint}", self._receive)
        self._runner, self.base_url = await serve_on_loopback(app)

    async def close(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, endpoint: str) -> str:
        """The URL of one endpoint of this receiver."""
        return f"{self.base_url}/hooks/{endpoint}"

    def accepted(self, endpoint: str) -> list[HookRequest]:
        """The requests ``endpoint`` answered 2xx, in arrival order."""
        return [
            r
            for r in self.requests
            if r.endpoint == endpoint and 200 <= r.answered < 300
        ]

    async def wait_accepted(
        self, endpoint: str, count: int, timeout_secs: float = 15.0
    ) -> list[HookRequest]:
        """Wait until ``endpoint`` has accepted ``count`` requests."""
        await self.changes.wait_until(
            lambda: len(self.accepted(endpoint)) >= count,
            f"{count} budget events at {endpoint}",
            timeout_secs,
        )
        return self.accepted(endpoint)

    async def _receive(self, request: web.Request) -> web.Response:
        endpoint = request.match_info["endpoint"]
        body = await request.read()
        self.arrivals.append(endpoint)
        self.changes.notify()
        if self.delays.get(endpoint):
            await asyncio.sleep(self.delays[endpoint])
        secret = self.secrets.get(endpoint)
        verified = False
        if secret is not None:
            try:
                Webhook(secret).verify(body, dict(request.headers))
                verified = True
            except WebhookVerificationError:
                verified = False
        if not verified:
            answer = 401
        elif self.failures.get(endpoint, 0) > 0:
            self.failures[endpoint] -= 1
            answer = 500
        else:
            answer = 204
        self.requests.append(
            HookRequest(
                endpoint=endpoint,
                webhook_id=request.headers.get("webhook-id", ""),
                body=body,
                verified=verified,
                answered=answer,
                at=asyncio.get_running_loop().time(),
            )
        )
        self.changes.notify()
        return web.Response(status=answer)
