"""Tests for the bounded audio backlog."""

from __future__ import annotations

import asyncio

from media.backlog import Backlog


def test_put_drops_the_oldest_frames_past_the_limit() -> None:
    """Past the limit the oldest frames go and are counted."""
    backlog = Backlog(limit_bytes=480)
    for index in range(5):
        backlog.put(bytes([index]) * 160)
    assert backlog.size_bytes == 480
    assert backlog.dropped_frames == 2
    assert len(backlog) == 3


def test_put_keeps_a_single_frame_larger_than_the_limit() -> None:
    """One oversized frame is kept rather than dropped on arrival."""
    backlog = Backlog(limit_bytes=100)
    assert backlog.put(b"x" * 400) == 0
    assert backlog.put(b"y" * 10) == 1
    assert backlog.size_bytes == 10


async def test_take_returns_frames_in_order_and_waits_when_empty() -> None:
    """take() hands over every queued frame in order, waiting if none are there."""
    backlog = Backlog(limit_bytes=1000)
    waiter = asyncio.create_task(backlog.take())
    await asyncio.sleep(0)
    assert not waiter.done()
    backlog.put(b"a")
    backlog.put(b"b")
    generation, frames = await waiter
    assert (generation, frames) == (0, [b"a", b"b"])
    assert backlog.size_bytes == 0


async def test_clear_discards_and_advances_the_generation() -> None:
    """A clear empties the backlog and marks earlier takes as stale."""
    backlog = Backlog(limit_bytes=1000)
    backlog.put(b"a")
    before, _ = await backlog.take()
    backlog.put(b"b")
    assert backlog.clear() == 1
    assert backlog.generation == before + 1
    backlog.put(b"c")
    generation, frames = await backlog.take()
    assert (generation, frames) == (before + 1, [b"c"])


async def test_close_releases_a_waiting_writer() -> None:
    """Closing wakes a writer with an empty batch."""
    backlog = Backlog(limit_bytes=1000)
    waiter = asyncio.create_task(backlog.take())
    await asyncio.sleep(0)
    backlog.close()
    assert (await waiter)[1] == []
