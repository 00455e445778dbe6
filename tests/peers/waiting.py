"""Bounded, event-driven waits on a peer's recorded state, so tests never poll."""

import asyncio
from collections.abc import Callable

from .errors import PeerTimeoutError

__all__ = ["Changes", "wait_for_event"]


class Changes:
    """Wakes every waiter each time a peer's recorded state changes."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake everyone waiting now; later waiters wait for the next change."""
        # Waiters keep the event they saw; setting it wakes them and the fresh
        # one catches the next change, so no notification is ever lost.
        self._event.set()
        self._event = asyncio.Event()

    async def wait_until(
        self, predicate: Callable[[], bool], waiting_for: str, timeout_secs: float
    ) -> None:
        """Return once predicate() holds, checking after every change.

        Raises PeerTimeoutError naming waiting_for after timeout_secs.
        """
        try:
            async with asyncio.timeout(timeout_secs):
                while True:
                    event = self._event
                    if predicate():
                        return
                    await event.wait()
        except TimeoutError as exc:
            raise PeerTimeoutError(waiting_for, timeout_secs) from exc


async def wait_for_event(
    event: asyncio.Event, waiting_for: str, timeout_secs: float
) -> None:
    """Wait for event to be set; raise PeerTimeoutError after timeout_secs."""
    try:
        async with asyncio.timeout(timeout_secs):
            await event.wait()
    except TimeoutError as exc:
        raise PeerTimeoutError(waiting_for, timeout_secs) from exc
