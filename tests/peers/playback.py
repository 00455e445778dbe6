"""Twilio's outbound playback clock, so the fake echoes marks when real Twilio would."""

from collections import deque
from dataclasses import dataclass

__all__ = ["PlaybackClock"]


@dataclass(frozen=True, slots=True)
class _PendingMark:
    name: str
    due_at: float


class PlaybackClock:
    """Queue of outbound audio that plays in real time, with marks pinned into it.

    Times are event-loop seconds supplied by the caller; nothing here reads a clock
    or touches a socket. Audio starts playing the moment it arrives, after whatever
    is already queued (Media Streams §2.3: Twilio buffers and plays in real time).
    """

    def __init__(self, bytes_per_sec: int = 8000) -> None:
        if bytes_per_sec <= 0:
            raise ValueError("bytes_per_sec must be positive")
        self._bytes_per_sec = bytes_per_sec
        self._queue_ends_at = float("-inf")
        self._marks: deque[_PendingMark] = deque()

    def add_audio(self, nbytes: int, now: float) -> None:
        """Queue nbytes of µ-law behind what is already playing."""
        starts_at = max(self._queue_ends_at, now)
        self._queue_ends_at = starts_at + nbytes / self._bytes_per_sec

    def add_mark(self, name: str, now: float) -> None:
        """Pin a mark to the end of the queued audio (now, if nothing is queued)."""
        self._marks.append(_PendingMark(name, max(self._queue_ends_at, now)))

    def next_due_at(self) -> float | None:
        """Return when the oldest pending mark is reached, or None without marks."""
        return self._marks[0].due_at if self._marks else None

    def pop_due(self, now: float) -> list[str]:
        """Remove and return, in order, the marks playback has reached by now."""
        names = []
        while self._marks and self._marks[0].due_at <= now:
            names.append(self._marks.popleft().name)
        return names

    def clear(self, now: float) -> list[str]:
        """Drop the queued audio and return every pending mark, for immediate echo."""
        self._queue_ends_at = now
        names = [mark.name for mark in self._marks]
        self._marks.clear()
        return names

    def queued_secs(self, now: float) -> float:
        """Return how much audio is still waiting to play."""
        return max(0.0, self._queue_ends_at - now)
