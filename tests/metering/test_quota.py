"""Tests for the quota engine's scripts: admit, report, settle, reclaim."""

from __future__ import annotations

from dataclasses import replace

import pytest

from metering.budget_events import all_events
from metering.ledger import Ledger
from metering.quota import Quota, Reclaimed, Report
from tenancy import keyspace
from tenancy.replies import Store

PERIOD = "2026-12"
DAY = "2026-12-03"
NOW = 1_796_256_000_000
ACCOUNT = "AC" + "0" * 32
NUMBER = "+15005550001"


def _sid(index: int) -> str:
    return f"CA{index:032x}"


@pytest.fixture(params=["server", "cluster"])
def engine_store(request: pytest.FixtureRequest) -> Store:
    """The engine's store: one Valkey server, or a real three-primary cluster."""
    fixture = "store" if request.param == "server" else "cluster_store"
    chosen: Store = request.getfixturevalue(fixture)
    return chosen


class Workspace:
    """One workspace's quota, with helpers to admit and report its calls."""

    def __init__(self, store: Store, limit_ms: int, max_concurrent: int) -> None:
        self.quota = Quota(store)
        self.ledger = Ledger(store)
        self.id = keyspace.new_id("ws")
        self.agent = keyspace.new_id("ag")
        self.limit_ms = limit_ms
        self.max_concurrent = max_concurrent

    async def admit(self, index: int, grant_ms: int = 30_000, now: int = NOW) -> int:
        await self.ledger.open_call(
            self.id,
            _sid(index),
            agent_id=self.agent,
            from_number="+14155550000",
            to_number=NUMBER,
            arrived_at_ms=now,
        )
        admission = await self.quota.admit(
            self.id,
            _sid(index),
            period=PERIOD,
            limit_ms=self.limit_ms,
            max_concurrent=self.max_concurrent,
            grant_ms=grant_ms,
            min_grant_ms=1000,
            lease_ms=10_000,
            account_sid=ACCOUNT,
            now_ms=now,
        )
        return admission.granted_ms if admission.admitted else -1

    def report(self, index: int, seq: int, used_ms: int, **changes: object) -> Report:
        base = Report(
            workspace_id=self.id,
            call_sid=_sid(index),
            period=PERIOD,
            day=DAY,
            seq=seq,
            used_ms=used_ms,
            want_ms=30_000,
            now_ms=NOW + used_ms,
            lease_ms=10_000,
            limit_ms=self.limit_ms,
            agent_id=self.agent,
            number=NUMBER,
        )
        return replace(base, **changes)  # type: ignore[arg-type]


async def test_admit_caps_concurrency_by_live_leases(engine_store: Store) -> None:
    """Past the cap a call is refused for concurrency; expired leases free room."""
    workspace = Workspace(engine_store, limit_ms=3_600_000, max_concurrent=2)
    assert await workspace.admit(1) == 30_000
    assert await workspace.admit(2) == 30_000
    refused = await workspace.quota.admit(
        workspace.id,
        _sid(3),
        period=PERIOD,
        limit_ms=workspace.limit_ms,
        max_concurrent=2,
        grant_ms=30_000,
        min_grant_ms=1000,
        lease_ms=10_000,
        account_sid=ACCOUNT,
        now_ms=NOW,
    )
    assert refused.refused == "concurrency"
    # Eleven seconds later both leases have lapsed: the cap has room again.
    assert await workspace.admit(3, now=NOW + 11_000) == 30_000


async def test_admit_grants_only_what_the_budget_has_left(engine_store: Store) -> None:
    """A grant is cut to the remaining budget; an empty budget refuses."""
    workspace = Workspace(engine_store, limit_ms=45_000, max_concurrent=10)
    assert await workspace.admit(1) == 30_000
    assert await workspace.admit(2) == 15_000
    assert await workspace.admit(3) == -1
    state = await workspace.quota.state(workspace.id, PERIOD)
    assert (state.limit_ms, state.reserved_ms, state.remaining_ms) == (
        45_000,
        45_000,
        0,
    )


async def test_the_cut_off_is_recorded_when_use_spends_the_budget(
    engine_store: Store,
) -> None:
    """Refused while running calls hold the rest: no cut-off yet, it may come back.

    The period's one cut-off event waits for a refusal with the budget used
    up, or for the final report of a call the budget ended, which records it
    after the thresholds that report crosses.
    """
    workspace = Workspace(engine_store, limit_ms=60_000, max_concurrent=5)
    assert await workspace.admit(1) == 30_000
    assert await workspace.admit(2) == 30_000
    assert await workspace.admit(3) == -1  # held, not used
    stream = keyspace.budget_events(workspace.id)
    assert await engine_store.xlen(stream) == 0

    quota = workspace.quota
    await quota.report(workspace.report(1, 1, 30_000, end_reason="completed"))
    await quota.report(
        workspace.report(2, 1, 30_000, end_reason="budget", cut_off=True)
    )
    kinds = [(e.kind, e.reason) for e in await all_events(engine_store, workspace.id)]
    assert kinds == [
        ("50", None),
        ("80", None),
        ("100", None),
        ("cutoff", "call_ended"),
    ]
    assert await workspace.admit(4) == -1  # once per period
    assert await engine_store.xlen(stream) == 4


async def test_report_debits_renews_and_ignores_retries(engine_store: Store) -> None:
    """A report debits use and tops the grant up; the same report again does nothing."""
    workspace = Workspace(engine_store, limit_ms=3_600_000, max_concurrent=10)
    await workspace.admit(1)
    first = await workspace.quota.report(workspace.report(1, seq=1, used_ms=10_000))
    assert (first.granted_ms, first.held_ms, first.state, first.added_ms) == (
        10_000,
        30_000,
        "ok",
        10_000,
    )
    again = await workspace.quota.report(workspace.report(1, seq=1, used_ms=10_000))
    assert (again.granted_ms, again.added_ms) == (0, 0)
    state = await workspace.quota.state(workspace.id, PERIOD)
    assert (state.used_ms, state.reserved_ms) == (10_000, 30_000)


async def test_report_counts_overrun_past_the_grant(engine_store: Store) -> None:
    """Use beyond the grant is still debited; the budget can go negative only so."""
    workspace = Workspace(engine_store, limit_ms=20_000, max_concurrent=10)
    assert await workspace.admit(1) == 20_000
    answer = await workspace.quota.report(workspace.report(1, seq=1, used_ms=21_500))
    assert (answer.held_ms, answer.granted_ms) == (0, 0)
    state = await workspace.quota.state(workspace.id, PERIOD)
    assert (state.used_ms, state.reserved_ms) == (21_500, 0)


async def test_final_report_settles_and_returns_the_rest(engine_store: Store) -> None:
    """Settlement debits the exact use, returns the reservation, frees the lease."""
    workspace = Workspace(engine_store, limit_ms=3_600_000, max_concurrent=1)
    await workspace.admit(1)
    settled = await workspace.quota.report(
        workspace.report(
            1, seq=1, used_ms=7_250, end_reason="caller_hung_up", billable_extra_ms=750
        )
    )
    assert settled.state == "settled"
    state = await workspace.quota.state(workspace.id, PERIOD)
    assert (state.used_ms, state.reserved_ms) == (8_000, 0)
    assert await workspace.quota.live_calls(workspace.id, NOW) == 0
    record = await workspace.ledger.get_call(workspace.id, _sid(1))
    assert (record.status, record.end_reason, record.metered_ms) == (
        "completed",
        "caller_hung_up",
        7_250,
    )
    late = await workspace.quota.report(workspace.report(1, seq=2, used_ms=9_000))
    assert late.state == "closed"
    assert (await workspace.quota.state(workspace.id, PERIOD)).used_ms == 8_000
    assert await workspace.admit(2) == 30_000  # the lease is free again


async def test_plan_change_applies_at_the_next_renewal(engine_store: Store) -> None:
    """Lowering the limit stops further grants; the grant already held stays."""
    workspace = Workspace(engine_store, limit_ms=3_600_000, max_concurrent=10)
    await workspace.admit(1)
    await workspace.quota.set_limit(workspace.id, PERIOD, 20_000)
    # The call still carries the limit it started under: the quota's wins.
    answer = await workspace.quota.report(
        workspace.report(1, seq=1, used_ms=5_000, limit_ms=3_600_000)
    )
    assert (answer.granted_ms, answer.held_ms) == (0, 25_000)
    state = await workspace.quota.state(workspace.id, PERIOD)
    assert state.limit_ms == 20_000


async def test_reclaim_returns_an_expired_calls_reservation(
    engine_store: Store,
) -> None:
    """A lease past expiry gives its grant back; its late report is refused."""
    workspace = Workspace(engine_store, limit_ms=60_000, max_concurrent=10)
    await workspace.admit(1)
    await workspace.admit(2)
    await workspace.quota.report(workspace.report(2, seq=1, used_ms=9_000))
    reclaimed = await workspace.quota.reclaim_expired(
        workspace.id, NOW + 10_001, 10_000
    )
    assert [(r.call_sid, r.returned_ms, r.account_sid) for r in reclaimed] == [
        (_sid(1), 30_000, ACCOUNT)
    ]
    state = await workspace.quota.state(workspace.id, PERIOD)
    # Call 2 renewed in time and keeps its own 21 s (the full budget left it
    # no top-up); call 1's 30 s came back.
    assert state.reserved_ms == 21_000
    late = await workspace.quota.report(workspace.report(1, seq=1, used_ms=12_000))
    assert (late.state, late.granted_ms, late.added_ms) == ("reclaimed", 0, 12_000)
    assert (await workspace.quota.state(workspace.id, PERIOD)).reserved_ms == 21_000

    # Call 1 was never settled (its sweeper failed): a lease later the next
    # sweep takes it again, with nothing more to give back; once it settles,
    # no sweep sees it.
    def call_1(found: list[Reclaimed]) -> list[tuple[int, bool]]:
        return [(r.returned_ms, r.again) for r in found if r.call_sid == _sid(1)]

    quota = workspace.quota
    assert call_1(await quota.reclaim_expired(workspace.id, NOW + 15_000, 10_000)) == []
    assert call_1(await quota.reclaim_expired(workspace.id, NOW + 20_002, 10_000)) == [
        (0, True)
    ]
    await quota.report(
        workspace.report(1, seq=2, used_ms=12_000, end_reason="owner_lost")
    )
    assert call_1(await quota.reclaim_expired(workspace.id, NOW + 60_000, 10_000)) == []


@pytest.mark.parametrize("seq", [0, 1])
async def test_report_without_a_grant_still_counts_usage(
    engine_store: Store, seq: int
) -> None:
    """A call admitted before budgets existed is metered all the same."""
    workspace = Workspace(engine_store, limit_ms=60_000, max_concurrent=10)
    await workspace.ledger.open_call(
        workspace.id,
        _sid(9),
        agent_id=workspace.agent,
        from_number="+14155550000",
        to_number=NUMBER,
        arrived_at_ms=NOW,
    )
    answer = await workspace.quota.report(
        workspace.report(9, seq=seq + 1, used_ms=4_000)
    )
    assert (answer.added_ms, answer.state) == (4_000, "ok")
    assert (await workspace.ledger.usage(workspace.id, PERIOD)).ms == 4_000


async def test_many_reports_go_at_once_and_each_is_answered(
    engine_store: Store,
) -> None:
    """A batch of reports (one pipeline, or concurrent on a cluster) all land."""
    workspace = Workspace(engine_store, limit_ms=3_600_000, max_concurrent=10)
    for index in range(1, 6):
        await workspace.admit(index)
    answers = await workspace.quota.report_many(
        [workspace.report(index, seq=1, used_ms=1_000 * index) for index in range(1, 6)]
    )
    assert [a.added_ms for a in answers if not isinstance(a, BaseException)] == [
        1_000,
        2_000,
        3_000,
        4_000,
        5_000,
    ]
    state = await workspace.quota.state(workspace.id, PERIOD)
    assert state.used_ms == 15_000
