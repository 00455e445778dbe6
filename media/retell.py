"""Retell over SIP: register each call, then Twilio dials Retell's SIP URI.

Retell's supported custom telephony is SIP (its audio WebSocket is
deprecated): ``POST {api}/v2/register-phone-call`` returns a ``call_id``, and
the call is dialled to ``sip:{call_id}@sip.retellai.com`` within five minutes
(protocols.md 6.1). No audio passes through Callgate on this path.
"""

from __future__ import annotations

import aiohttp

from media.platform_http import post_json
from tenancy.errors import UpstreamError

PROVIDER = "retell"
SIP_DOMAIN = "sip.retellai.com"


def sip_uri(call_id: str) -> str:
    """The SIP URI Twilio dials for a registered call (TCP, as Retell advises)."""
    return f"sip:{call_id}@{SIP_DOMAIN};transport=tcp"


class RetellClient:
    """Registers inbound phone calls with Retell for a workspace's agent."""

    def __init__(
        self, session: aiohttp.ClientSession, api_url: str, timeout_secs: float
    ) -> None:
        self._session = session
        self._api_url = api_url
        self._timeout = aiohttp.ClientTimeout(total=timeout_secs)

    async def register(
        self,
        *,
        api_key: str,
        agent_id: str,
        from_number: str,
        to_number: str,
        metadata: dict[str, str],
    ) -> str:
        """Register the call and return Retell's ``call_id``.

        Raises :class:`UpstreamError` if Retell cannot be reached, refuses, or
        answers without a call id.
        """
        body = {
            "agent_id": agent_id,
            "direction": "inbound",
            "from_number": from_number,
            "to_number": to_number,
            "metadata": metadata,
        }
        registered = await post_json(
            self._session,
            f"{self._api_url}/v2/register-phone-call",
            api_key=api_key,
            body=body,
            limits=self._timeout,
            platform=PROVIDER,
        )
        call_id = registered.get("call_id")
        if not isinstance(call_id, str) or not call_id.isalnum():
            raise UpstreamError("retell answered without a usable call_id")
        return call_id
