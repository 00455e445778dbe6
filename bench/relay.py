"""Relay cost: CPU and memory of a real ``callgate serve`` carrying N calls.

Callgate runs as its own process on the embedded store, as ``make run`` starts
it; the Twilio and Vapi peers run in this process. Figures are the server's
own CPU time (its Valkey child counted apart) and resident memory, read from
/proc through psutil, so the peers' cost never mixes in.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.harness import CallgateProcess, callgate_process
from tests.peers.audio import split_frames, tone_mulaw

NUMBER = "+15005550100"
CALLER = "+14155550100"


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU seconds of a process and its children, and its resident memory."""

    cpu_secs: float
    store_cpu_secs: float
    rss_bytes: int


def _usage(process: psutil.Process) -> Usage:
    own = process.cpu_times()
    store = sum(
        child.cpu_times().user + child.cpu_times().system
        for child in process.children()
    )
    return Usage(own.user + own.system, store, process.memory_info().rss)


async def _one_call(callgate: CallgateProcess, frames: list[bytes]) -> bool:
    call = await callgate.twilio.place_call(NUMBER, CALLER)
    await call.open_stream()
    await call.send_audio(frames)
    expected = sum(len(frame) for frame in frames)
    await call.wait_for_audio(expected, timeout_secs=10)
    intact = bytes(call.received_audio) == b"".join(frames)
    await call.hang_up()
    return intact


async def run_relay(calls: int, call_secs: int) -> None:
    """Carry ``calls`` simultaneous calls of ``call_secs`` and print the cost."""
    data_dir = Path(tempfile.mkdtemp(prefix="callgate-bench-"))
    async with callgate_process(data_dir) as callgate:
        await callgate.tenant("bench", NUMBER)
        probe = psutil.Process(callgate.pid)
        frames = split_frames(tone_mulaw(440, duration_ms=call_secs * 1000))
        idle = _usage(probe)
        started = time.monotonic()
        results = await asyncio.gather(
            *(_one_call(callgate, frames) for _ in range(calls))
        )
        wall_secs = time.monotonic() - started
        busy = _usage(probe)

    relayed = calls * len(frames) * 2
    cpu_secs = busy.cpu_secs - idle.cpu_secs
    call_secs_total = calls * call_secs
    idle_mib, busy_mib = idle.rss_bytes >> 20, busy.rss_bytes >> 20
    print(f"relay: {calls} calls x {call_secs} s, wall {wall_secs:.1f} s")
    print(f"  audio intact:            {sum(results)}/{calls} calls")
    print(f"  frames relayed:          {relayed} (both directions)")
    print(f"  callgate CPU:            {cpu_secs:.2f} s")
    print(f"  CPU per relayed frame:   {cpu_secs / relayed * 1e6:.1f} us")
    print(f"  CPU per call-second:     {cpu_secs / call_secs_total * 1e3:.2f} ms")
    print(f"  calls per core (est.):   {call_secs_total / cpu_secs:.0f}")
    print(
        f"  store CPU (valkey):      {busy.store_cpu_secs - idle.store_cpu_secs:.2f} s"
    )
    print(f"  RSS idle / loaded:       {idle_mib} / {busy_mib} MiB")
    print(
        "  RSS per call (est.):     "
        f"{(busy.rss_bytes - idle.rss_bytes) / calls / 1024:.0f} KiB"
    )
