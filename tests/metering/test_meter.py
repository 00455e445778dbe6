"""Tests for the per-process meter, on a real Valkey."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import redis.asyncio as redis
from prometheus_client import CollectorRegistry

from metering.ledger import Ledger, month_of
from metering.meter import Meter
from metering.metrics import Metrics
from router.store import EmbeddedValkey, connect
from tenancy import keyspace
from tenancy.workspaces import now_ms

CALL = "CA" + "c" * 32
NUMBER = "+14155550111"
STREAM = "MZ" + "d" * 32


class FakeClock:
    """A monotonic clock in nanoseconds that moves only when told to."""

    def __init__(self) -> None:
        self.now_ns = 1_000_000_000

    def __call__(self) -> int:
        return self.now_ns

    def advance_ms(self, ms: int) -> None:
        self.now_ns += ms * 1_000_000


async def _open(ledger: Ledger, workspace: str, agent: str) -> None:
    await ledger.open_call(
        workspace,
        CALL,
        agent_id=agent,
        from_number="+12125550123",
        to_number=NUMBER,
        arrived_at_ms=now_ms(),
    )


async def test_end_settles_the_exact_duration(store: redis.Redis) -> None:
    """Ending a session writes its exact duration, its reason and the metric."""
    registry = CollectorRegistry()
    clock = FakeClock()
    ledger = Ledger(store)
    meter = Meter(ledger, Metrics(registry), interval_ms=1000, clock=clock)
    workspace, agent = keyspace.new_id("ws"), keyspace.new_id("ag")
    await _open(ledger, workspace, agent)

    session = await meter.begin(
        workspace, CALL, agent_id=agent, number=NUMBER, stream_sid=STREAM
    )
    clock.advance_ms(1200)
    await meter.flush()
    assert (await ledger.get_call(workspace, CALL)).metered_ms == 1200
    clock.advance_ms(1300)
    assert meter.active == 1
    await meter.end(session, "caller_hung_up")
    assert meter.active == 0

    record = await ledger.get_call(workspace, CALL)
    assert record.metered_ms == 2500
    assert record.end_reason == "caller_hung_up"
    assert (await ledger.usage(workspace, month_of(now_ms()))).ms == 2500
    seconds = registry.get_sample_value(
        "callgate_call_seconds_total", {"workspace": workspace}
    )
    assert seconds == 2.5


async def test_flush_survives_a_store_outage_without_loss(tmp_path: Path) -> None:
    """A settlement that fails while the store is down lands once it is back."""
    server = EmbeddedValkey(tmp_path)
    await server.start()
    store = connect(server.url)
    clock = FakeClock()
    registry = CollectorRegistry()
    ledger = Ledger(store)
    meter = Meter(ledger, Metrics(registry), interval_ms=1000, clock=clock)
    workspace, agent = keyspace.new_id("ws"), keyspace.new_id("ag")
    try:
        await _open(ledger, workspace, agent)
        session = await meter.begin(
            workspace, CALL, agent_id=agent, number=NUMBER, stream_sid=STREAM
        )
        clock.advance_ms(4000)

        await server.stop()
        await meter.end(session, "caller_hung_up")
        failures = registry.get_sample_value(
            "callgate_meter_flushes_total", {"outcome": "error"}
        )
        assert failures == 1

        await server.start()
        clock.advance_ms(9000)  # time after the hang-up must not count
        await meter.flush()
        record = await ledger.get_call(workspace, CALL)
        assert record.metered_ms == 4000
        assert record.end_reason == "caller_hung_up"
        await meter.flush()
        assert (await ledger.usage(workspace, month_of(now_ms()))).ms == 4000
    finally:
        await store.aclose()
        await server.stop()


async def test_one_flush_writes_every_live_call_in_one_batch(
    store: redis.Redis,
) -> None:
    """Live calls are reported together in one pipeline per flush."""
    registry = CollectorRegistry()
    clock = FakeClock()
    ledger = Ledger(store)
    meter = Meter(ledger, Metrics(registry), interval_ms=1000, clock=clock)
    workspace, agent = keyspace.new_id("ws"), keyspace.new_id("ag")
    sids = [f"CA{index:032x}" for index in range(5)]
    for sid in sids:
        await ledger.open_call(
            workspace,
            sid,
            agent_id=agent,
            from_number="+12125550123",
            to_number=NUMBER,
            arrived_at_ms=now_ms(),
        )
        await meter.begin(
            workspace, sid, agent_id=agent, number=NUMBER, stream_sid=STREAM
        )
    clock.advance_ms(1000)

    await meter.flush()
    await meter.flush()  # nothing new: no write at all
    batches = registry.get_sample_value(
        "callgate_meter_flushes_total", {"outcome": "ok"}
    )
    assert batches == 1
    records = [await ledger.get_call(workspace, sid) for sid in sids]
    assert [record.metered_ms for record in records] == [1000] * 5
    assert (await ledger.usage(workspace, month_of(now_ms()))).ms == 5000


async def test_flush_fails_fast_on_a_hung_store_and_recovers(tmp_path: Path) -> None:
    """A frozen store fails the flush within the timeout; the retry later lands."""
    server = EmbeddedValkey(tmp_path)
    await server.start()
    store = connect(server.url, timeout_secs=0.2)
    clock = FakeClock()
    registry = CollectorRegistry()
    ledger = Ledger(store)
    meter = Meter(ledger, Metrics(registry), interval_ms=1000, clock=clock)
    workspace, agent = keyspace.new_id("ws"), keyspace.new_id("ag")
    assert server.pid is not None
    try:
        await _open(ledger, workspace, agent)
        session = await meter.begin(
            workspace, CALL, agent_id=agent, number=NUMBER, stream_sid=STREAM
        )
        clock.advance_ms(3000)

        os.kill(server.pid, signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await meter.end(session, "caller_hung_up")
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert loop.time() - started < 1.5
        assert (
            registry.get_sample_value(
                "callgate_meter_flushes_total", {"outcome": "error"}
            )
            == 1
        )

        await meter.flush()
        assert (await ledger.get_call(workspace, CALL)).metered_ms == 3000
    finally:
        await store.aclose()
        await server.stop()


class WatchedClock(FakeClock):
    """A fake clock that reports when a flush reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.read = asyncio.Event()

    def __call__(self) -> int:
        self.read.set()
        return super().__call__()


async def test_call_ending_during_a_flush_is_still_settled(tmp_path: Path) -> None:
    """A call that ends while a periodic flush is in flight still gets its end."""
    server = EmbeddedValkey(tmp_path)
    await server.start()
    store = connect(server.url, timeout_secs=5.0)
    clock = WatchedClock()
    ledger = Ledger(store)
    meter = Meter(ledger, Metrics(CollectorRegistry()), interval_ms=1000, clock=clock)
    workspace, agent = keyspace.new_id("ws"), keyspace.new_id("ag")
    assert server.pid is not None
    try:
        await _open(ledger, workspace, agent)
        session = await meter.begin(
            workspace, CALL, agent_id=agent, number=NUMBER, stream_sid=STREAM
        )
        clock.advance_ms(2000)

        os.kill(server.pid, signal.SIGSTOP)
        try:
            clock.read.clear()
            periodic = asyncio.create_task(meter.flush())
            await clock.read.wait()  # the flush has taken its snapshot
            clock.advance_ms(500)
            ending = asyncio.create_task(meter.end(session, "caller_hung_up"))
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await asyncio.gather(periodic, ending)

        record = await ledger.get_call(workspace, CALL)
        assert record.end_reason == "caller_hung_up"
        assert record.metered_ms == 2500
        assert meter.active == 0
    finally:
        await store.aclose()
        await server.stop()
