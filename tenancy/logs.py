"""Every logger Callgate writes to, declared once, with the meaning of each level.

Levels: DEBUG is per frame or per request detail (guard hot paths with
``isEnabledFor``); INFO is once per call or per operator change; WARNING is a
caller- or peer-visible problem Callgate recovered from; ERROR is a failure
that lost work or needs an operator. No secret, token or audio is ever logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

router_logger = logging.getLogger("callgate.router")
media_logger = logging.getLogger("callgate.media")
metering_logger = logging.getLogger("callgate.metering")
tenancy_logger = logging.getLogger("callgate.tenancy")
store_logger = logging.getLogger("callgate.store")
# One line per finished call, in a stable key=value shape for log pipelines.
call_logger = logging.getLogger("callgate.calls")
# One line per HTTP request, stream tokens redacted (router.access).
access_logger = logging.getLogger("callgate.access")


class CallLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes messages with the call's identity: workspace, call and stream ids."""

    def __init__(self, logger: logging.Logger, ids: Mapping[str, str]) -> None:
        super().__init__(logger, dict(ids))

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        prefix = " ".join(f"{key}={value}" for key, value in extra.items())
        return f"[{prefix}] {msg}", kwargs


def configure(level: str) -> None:
    """Send Callgate's logs to stderr at ``level`` (a stdlib level name)."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
