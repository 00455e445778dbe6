"""A pager: receives Alertmanager's webhook notifications and records each alert.

Alertmanager posts its version 4 webhook document to a receiver's URL; this
one keeps every alert it was told about, so a test can wait until a given
alert has paged and check its labels and annotations.
"""

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .serving import serve_on_loopback
from .waiting import Changes

__all__ = ["Page", "Pager"]


@dataclass(frozen=True, slots=True)
class Page:
    """One alert of one notification, as Alertmanager sent it."""

    status: str
    labels: dict[str, str]
    annotations: dict[str, str]

    @property
    def name(self) -> str:
        """The alert's name."""
        return self.labels.get("alertname", "")


@dataclass
class Pager:
    """Serves ``POST /alerts`` on a loopback port."""

    pages: list[Page] = field(default_factory=list)
    notifications: int = 0
    changes: Changes = field(default_factory=Changes)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_post("/alerts", self._receive)
        self._runner, base_url = await serve_on_loopback(app)
        self.url = f"{base_url}/alerts"

    async def close(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    def paged(self, name: str, **labels: str) -> list[Page]:
        """The pages for alert ``name`` whose labels include ``labels``."""
        return [
            page
            for page in self.pages
            if page.name == name
            and all(page.labels.get(k) == v for k, v in labels.items())
        ]

    async def wait_paged(self, name: str, timeout_secs: float, **labels: str) -> Page:
        """The first page for ``name`` with ``labels``, once it has arrived."""
        await self.changes.wait_until(
            lambda: bool(self.paged(name, **labels)),
            f"a page for {name} {labels}",
            timeout_secs,
        )
        return self.paged(name, **labels)[0]

    async def _receive(self, request: web.Request) -> web.Response:
        document: dict[str, Any] = orjson.loads(await request.read())
        # Version 4 is the only webhook format Alertmanager has sent so far.
        if document.get("version") != "4":
            return web.Response(status=400, text="unknown webhook version")
        self.notifications += 1
        for alert in document.get("alerts", []):
            self.pages.append(
                Page(
                    status=str(alert.get("status", "")),
                    labels=dict(alert.get("labels", {})),
                    annotations=dict(alert.get("annotations", {})),
                )
            )
        self.changes.notify()
        return web.Response(status=200)
