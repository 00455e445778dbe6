"""The small interface every agent platform's live call implements.

The bridge talks only to :class:`UpstreamCall`, so another platform that takes
audio over a WebSocket is one new adapter module, not a change to the bridge.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class AgentAudio:
    """Audio from the agent, already in the caller's format (µ-law 8 kHz)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class AgentInterrupted:
    """The platform heard the caller talk over the agent: stop playing now."""


@dataclass(frozen=True, slots=True)
class TransferRequested:
    """The agent asks for the call to be transferred to an E.164 ``number``."""

    number: str


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """Any other JSON message from the platform (speech updates, transcripts)."""

    message: dict[str, Any]


UpstreamEvent = AgentAudio | AgentInterrupted | TransferRequested | AgentEvent


class UpstreamCall(Protocol):
    """One live call on an agent platform."""

    provider: str
    call_id: str

    async def send_audio(self, payload: bytes) -> None:
        """Send caller audio (µ-law 8 kHz) to the agent."""

    def events(self) -> AsyncIterator[UpstreamEvent]:
        """What the agent sends; the iterator ends when the agent hangs up."""

    async def send_dtmf(self, digit: str) -> None:
        """Tell the agent the caller pressed a keypad ``digit``."""

    async def hang_up(self) -> None:
        """End the call on the platform; safe to call more than once."""
