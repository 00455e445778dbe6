"""One access-log line per HTTP request, with the stream token cut from the path.

A stream URL is a capability, so the token never reaches a log line; query
strings are left out for the same reason.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from router.webhooks import STREAM_PATH


def loggable_path(path: str) -> str:
    """``path`` with any stream token replaced by a placeholder."""
    if path.startswith(STREAM_PATH):
        return STREAM_PATH + "{token}"
    return path


class AccessLogger(AbstractAccessLogger):
    """Writes ``METHOD path status duration`` to ``callgate.access`` at INFO."""

    def log(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float
    ) -> None:
        self.logger.info(
            "%s %s %d %.1fms",
            request.method,
            loggable_path(request.path),
            response.status,
            time * 1000,
        )
