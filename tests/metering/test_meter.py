"""Tests for the per-process meter, on a real Valkey."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as redis
from prometheus_client import CollectorRegistry

from metering.journal import Journal
from metering.ledger import Ledger, month_of
from metering.meter import CallSession, Meter
from metering.metrics import Metrics
from metering.quota import Quota
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
        self.read = asyncio.Event()

    def __call__(self) -> int:
        self.read.set()
        return self.now_ns

    def advance_ms(self, ms: int) -> None:
        self.now_ns += ms * 1_000_000


@dataclass
class Rig:
    """A meter on a store, with its clock, registry and one workspace."""

    store: redis.Redis
    clock: FakeClock = field(default_factory=FakeClock)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    workspace: str = field(default_factory=lambda: keyspace.new_id("ws"))
    agent: str = field(default_factory=lambda: keyspace.new_id("ag"))

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.store)
        self.meter = Meter(
            self.ledger,
            Quota(self.store),
            Metrics(self.registry),
            interval_ms=1000,
            clock=self.clock,
        )

    async def begin(self, call_sid: str = CALL) -> CallSession:
        """Route a call (its record) and start metering it."""
        await self.ledger.open_call(
            self.workspace,
            call_sid,
            agent_id=self.agent,
            from_number="+12125550123",
            to_number=NUMBER,
            arrived_at_ms=now_ms(),
        )
        session = await self.meter.begin(
            self.workspace,
            call_sid,
            agent_id=self.agent,
            number=NUMBER,
            stream_sid=STREAM,
        )
        assert session is not None
        return session

    def flushes(self, outcome: str) -> float | None:
        """How many batched writes ended with ``outcome``."""
        return self.registry.get_sample_value(
            "callgate_meter_flushes_total", {"outcome": outcome}
        )

    async def month_ms(self) -> int:
        """Metered milliseconds in the workspace's current month."""
        return (await self.ledger.usage(self.workspace, month_of(now_ms()))).ms


@asynccontextmanager
async def private_store(
    tmp_path: Path, timeout_secs: float
) -> AsyncIterator[tuple[EmbeddedValkey, Rig]]:
    """A Valkey of the test's own, which it may stop or freeze, and a rig on it."""
    server = EmbeddedValkey(tmp_path)
    await server.start()
    store = connect(server.url, timeout_secs=timeout_secs)
    try:
        yield server, Rig(store)
    finally:
        await store.aclose()
        await server.stop()


@contextmanager
def frozen(server: EmbeddedValkey) -> Iterator[None]:
    """Suspend the server process (SIGSTOP) for the duration of the block."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


async def test_end_settles_the_exact_duration(store: redis.Redis) -> None:
    """Ending a session writes its exact duration, its reason and the metric."""
    rig = Rig(store)
    session = await rig.begin()
    rig.clock.advance_ms(1200)
    await rig.meter.flush()
    assert (await rig.ledger.get_call(rig.workspace, CALL)).metered_ms == 1200
    rig.clock.advance_ms(1300)
    assert rig.meter.active == 1
    await rig.meter.end(session, "caller_hung_up")
    assert rig.meter.active == 0

    record = await rig.ledger.get_call(rig.workspace, CALL)
    assert record.metered_ms == 2500
    assert record.end_reason == "caller_hung_up"
    assert await rig.month_ms() == 2500
    seconds = rig.registry.get_sample_value(
        "callgate_call_seconds_total", {"workspace": rig.workspace}
    )
    assert seconds == 2.5


async def test_one_flush_writes_every_live_call_in_one_batch(
    store: redis.Redis,
) -> None:
    """Live calls are reported together in one pipeline per flush."""
    rig = Rig(store)
    sids = [f"CA{index:032x}" for index in range(5)]
    for sid in sids:
        await rig.begin(sid)
    rig.clock.advance_ms(1000)

    await rig.meter.flush()
    await rig.meter.flush()  # nothing new: no write at all
    assert rig.flushes("ok") == 1
    records = [await rig.ledger.get_call(rig.workspace, sid) for sid in sids]
    assert [record.metered_ms for record in records] == [1000] * 5
    assert await rig.month_ms() == 5000


async def test_flush_survives_a_store_outage_without_loss(tmp_path: Path) -> None:
    """A settlement that fails while the store is down lands once it is back."""
    async with private_store(tmp_path, timeout_secs=1.0) as (server, rig):
        session = await rig.begin()
        rig.clock.advance_ms(4000)

        await server.stop()
        await rig.meter.end(session, "caller_hung_up")
        assert rig.flushes("error") == 1

        await server.start()
        rig.clock.advance_ms(9000)  # time after the hang-up must not count
        await rig.meter.flush()
        record = await rig.ledger.get_call(rig.workspace, CALL)
        assert record.metered_ms == 4000
        assert record.end_reason == "caller_hung_up"
        await rig.meter.flush()
        assert await rig.month_ms() == 4000


async def test_flush_fails_fast_on_a_hung_store_and_recovers(tmp_path: Path) -> None:
    """A frozen store fails the flush within the timeout; the retry later lands."""
    async with private_store(tmp_path, timeout_secs=0.2) as (server, rig):
        session = await rig.begin()
        rig.clock.advance_ms(3000)

        loop = asyncio.get_running_loop()
        started = loop.time()
        with frozen(server):
            await rig.meter.end(session, "caller_hung_up")
        assert loop.time() - started < 1.5
        assert rig.flushes("error") == 1

        await rig.meter.flush()
        assert (await rig.ledger.get_call(rig.workspace, CALL)).metered_ms == 3000


async def test_call_ending_during_a_flush_is_still_settled(tmp_path: Path) -> None:
    """A call that ends while a periodic flush is in flight still gets its end."""
    async with private_store(tmp_path, timeout_secs=5.0) as (server, rig):
        session = await rig.begin()
        rig.clock.advance_ms(2000)

        with frozen(server):
            rig.clock.read.clear()
            periodic = asyncio.create_task(rig.meter.flush())
            await rig.clock.read.wait()  # the flush has taken its snapshot
            rig.clock.advance_ms(500)
            ending = asyncio.create_task(rig.meter.end(session, "caller_hung_up"))
        await asyncio.gather(periodic, ending)

        record = await rig.ledger.get_call(rig.workspace, CALL)
        assert record.end_reason == "caller_hung_up"
        assert record.metered_ms == 2500
        assert rig.meter.active == 0


async def test_the_store_is_back_once_the_journal_replays(tmp_path: Path) -> None:
    """With no call left to report, a replay that lands says the store is back."""
    async with private_store(tmp_path, timeout_secs=1.0) as (server, rig):
        journal = Journal(tmp_path / "journal")
        rig.registry = CollectorRegistry()
        meter = rig.meter = Meter(
            rig.ledger,
            Quota(rig.store),
            Metrics(rig.registry),
            interval_ms=1000,
            clock=rig.clock,
            journal=journal,
        )
        session = await rig.begin()
        rig.clock.advance_ms(2000)
        await server.stop()
        await meter.end(session, "caller_hung_up")  # journaled: no call is left
        assert (meter.store_up, journal.depth) == (False, 1)
        assert rig.registry.get_sample_value("callgate_store_up") == 0

        await server.start()
        assert await meter.replay()
        assert meter.store_up
        assert rig.registry.get_sample_value("callgate_store_up") == 1
        assert (await rig.ledger.get_call(rig.workspace, CALL)).metered_ms == 2000
        await meter.close()


async def test_a_call_settled_elsewhere_counts_in_the_day_it_started(
    store: redis.Redis,
) -> None:
    """Settled by a process without its session, a call stays in its plan's day.

    The call started on 3 December in its plan's time zone while it was
    already 4 December in UTC; its time and cost go to the 3rd.
    """
    rig = Rig(store)
    started_at_ms = now_ms() - 5_000
    await rig.ledger.open_call(
        rig.workspace,
        CALL,
        agent_id=rig.agent,
        from_number="+12125550123",
        to_number=NUMBER,
        arrived_at_ms=started_at_ms,
    )
    await rig.ledger.start_call(
        rig.workspace,
        CALL,
        agent_id=rig.agent,
        number=NUMBER,
        stream_sid="",
        started_at_ms=started_at_ms,
        period="2026-12",
        day="2026-12-03",
    )
    await rig.meter.end_call(rig.workspace, CALL, "completed")
    local = await rig.ledger.usage(rig.workspace, "2026-12-03")
    assert local.ms >= 5_000
    assert local.cost_micros > 0
    assert (await rig.ledger.usage(rig.workspace, "2026-12")).ms == local.ms
