"""Scrape cost: how long ``GET /metrics`` takes when every workspace has a plan.

Budget and money gauges are read from the store on a scrape (at most every
5 s), one workspace after another, so their cost grows with the number of
workspaces. This creates that many through the operator API on a real
``callgate serve`` and times scrapes that read the store and scrapes served
from the cached values.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import psutil

from tests.harness import CallgateProcess, callgate_process

# The budget gauges' cache lifetime, plus a margin.
_CACHE_SECS = 5.2
_PLAN = {"included_minutes": 100, "overage": "minutes", "overage_limit": 20}


async def _with_plan(callgate: CallgateProcess, index: int) -> None:
    status, workspace = await callgate.api(
        "POST", "/workspaces", {"name": f"client {index}", "twilio_subaccount": False}
    )
    assert status == 201, workspace
    await callgate.put_plan(workspace["id"], _PLAN)


async def _scrape(callgate: CallgateProcess) -> tuple[float, int]:
    started = time.perf_counter()
    async with callgate.http.get(f"{callgate.base_url}/metrics") as response:
        assert response.status == 200
        body = await response.read()
    return time.perf_counter() - started, len(body)


def _cpu_secs(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def run_scrape(workspaces: int, rounds: int = 3) -> None:
    """Create ``workspaces`` with plans and print what scraping them costs."""
    data_dir = Path(tempfile.mkdtemp(prefix="callgate-bench-"))
    async with callgate_process(data_dir) as callgate:
        probe = psutil.Process(callgate.pid)
        for first in range(0, workspaces, 50):
            batch = range(first, min(first + 50, workspaces))
            await asyncio.gather(*(_with_plan(callgate, i) for i in batch))

        cold: list[tuple[float, float]] = []
        warm: list[float] = []
        size = 0
        for _ in range(rounds):
            await asyncio.sleep(_CACHE_SECS)
            before = _cpu_secs(probe)
            wall_secs, size = await _scrape(callgate)
            cold.append((wall_secs, _cpu_secs(probe) - before))
            warm.append((await _scrape(callgate))[0])

    best_wall, best_cpu = min(cold)
    print(f"scrape: {workspaces} workspaces with a plan, {rounds} rounds")
    print(f"  /metrics size:           {size / 1024:.0f} KiB")
    print(f"  reading the store:       {best_wall * 1e3:.0f} ms wall (best)")
    print(f"  callgate CPU for it:     {best_cpu * 1e3:.0f} ms")
    print(f"  per workspace:           {best_wall / workspaces * 1e6:.0f} us wall")
    print(f"  from the cache:          {min(warm) * 1e3:.1f} ms wall (best)")
