"""Bounded audio backlogs, so a slow side drops stale audio instead of stalling.

Each direction of a call has one: the reader appends frames as they arrive and
the writer takes everything queued at once. When the writer falls more than the
limit behind, the oldest audio is dropped and counted; old audio is worth less
than fresh audio in a live conversation, and memory never grows without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class Backlog:
    """A FIFO of audio frames holding at most ``limit_bytes`` (bar the newest)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.generation = 0
        self.dropped_frames = 0
        self._frames: deque[bytes] = deque()
        self._size = 0
        self._ready = asyncio.Event()
        self._closed = False
        # When the oldest queued frame arrived, and for the last batch taken.
        self._oldest_at = 0.0
        self.taken_since = 0.0

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def size_bytes(self) -> int:
        """Bytes of audio waiting to be written."""
        return self._size

    def put(self, frame: bytes) -> int:
        """Queue ``frame``; return how many old frames were dropped to fit it."""
        if not self._frames:
            self._oldest_at = time.monotonic()
        self._frames.append(frame)
        self._size += len(frame)
        dropped = 0
        # The newest frame always stays, even if it alone exceeds the limit.
        while self._size > self.limit_bytes and len(self._frames) > 1:
            self._size -= len(self._frames.popleft())
            dropped += 1
        self.dropped_frames += dropped
        self._ready.set()
        return dropped

    def clear(self) -> int:
        """Discard everything queued (barge-in); return how many frames went.

        The generation advances, so a writer holding frames taken before the
        clear can tell they are stale and stop sending them.
        """
        discarded = len(self._frames)
        self._frames.clear()
        self._size = 0
        self.generation += 1
        return discarded

    def close(self) -> None:
        """Wake the writer for the last time; :meth:`take` then returns empty."""
        self._closed = True
        self._ready.set()

    async def take(self) -> tuple[int, list[bytes]]:
        """Wait for frames; return the generation and every frame queued.

        Returns an empty list once the backlog is closed and drained.
        ``taken_since`` is then when the batch's first frame was queued (or,
        after drops, an earlier frame that was dropped).
        """
        while not self._frames and not self._closed:
            self._ready.clear()
            await self._ready.wait()
        frames = list(self._frames)
        self.taken_since = self._oldest_at
        self._frames.clear()
        self._size = 0
        return self.generation, frames
