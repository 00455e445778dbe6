"""RFC 9457 problem documents: every operator API error has this one shape.

Each problem ``type`` is a stable URN (``urn:callgate:problem:<slug>``) that
clients can match on; ``detail`` is for people and may change.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:callgate:problem:"


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> web.Response:
    """A problem response; ``extensions`` become extra members of the document."""
    document: dict[str, Any] = {"type": TYPE_PREFIX + slug, "title": title}
    document["status"] = status
    if detail:
        document["detail"] = detail
    document.update(extensions)
    return web.Response(
        status=status,
        body=orjson.dumps(document),
        content_type=MEDIA_TYPE,
        headers=headers,
    )
