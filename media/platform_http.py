"""The one HTTP exchange agent platforms share: a JSON POST with a bearer key.

Vapi's call creation and Retell's call registration both answer 200 or 201
with a JSON object; every other outcome is an :class:`UpstreamError` naming the
platform, never an aiohttp exception.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from tenancy.errors import UpstreamError


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    *,
    api_key: str,
    body: dict[str, Any],
    limits: aiohttp.ClientTimeout,
    platform: str,
) -> dict[str, Any]:
    """POST ``body`` to ``url`` and return the JSON object the platform answered."""
    try:
        async with session.post(
            url,
            data=orjson.dumps(body),
            headers={
                "Authorization": f"Bearer {api_key}",
                "Content-Type": "application/json",
            },
            timeout=limits,
        ) as response:
            status = response.status
            raw = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UpstreamError(f"{platform} unreachable: {type(exc).__name__}") from exc
    if status not in (200, 201):
        raise UpstreamError(f"{platform} refused the call with {status}", status)
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"{platform} answered with invalid JSON", status) from None
    if not isinstance(answer, dict):
        raise UpstreamError(f"{platform} answered with a non-object", status)
    return answer
