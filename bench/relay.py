"""Relay cost: CPU and memory of a real ``callgate serve`` carrying N calls.

Callgate runs as its own process on the embedded store, as ``make run`` starts
it; the Twilio and Vapi peers run in this process. Figures are the server's
own CPU time (its Valkey child counted apart) and resident memory, read from
/proc through psutil, so the peers' cost never mixes in.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

import aiohttp
import psutil

from tests.peers.audio import split_frames, tone_mulaw
from tests.peers.twilio import FakeTwilioRest, TwilioSimulator, new_account
from tests.peers.vapi import FakeVapi

OPERATOR_KEY = "bench-operator-" + "k" * 32
NUMBER = "+15005550100"
CALLER = "+14155550100"
FRAME_MS = 20


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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _start_server(env: dict[str, str]) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router.cli",
        "serve",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    async with asyncio.timeout(30):
        while b"serving on" not in await process.stderr.readline():
            if process.returncode is not None:
                raise RuntimeError("callgate exited during start-up")
    # Keep reading its log so the pipe never fills and blocks the server.
    asyncio.get_running_loop().create_task(process.stderr.read())
    return process


async def _api(
    http: aiohttp.ClientSession, base: str, path: str, body: object
) -> dict[str, str]:
    async with http.post(
        f"{base}/api/v1{path}",
        json=body,
        headers={"Authorization": f"Bearer {OPERATOR_KEY}"},
    ) as response:
        response.raise_for_status()
        result: dict[str, str] = await response.json()
        return result


async def _one_call(simulator: TwilioSimulator, frames: list[bytes]) -> bool:
    call = await simulator.place_call(NUMBER, CALLER)
    await call.open_stream()
    await call.send_audio(frames)
    expected = sum(len(frame) for frame in frames)
    await call.wait_for_audio(expected, timeout_secs=10)
    intact = bytes(call.received_audio) == b"".join(frames)
    await call.hang_up()
    return intact


async def run_relay(calls: int, call_secs: int) -> None:
    """Carry ``calls`` simultaneous calls of ``call_secs`` and print the cost."""
    vapi = FakeVapi()
    await vapi.start()
    rest = FakeTwilioRest()
    await rest.start()
    account = new_account()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    data_dir = tempfile.mkdtemp(prefix="callgate-bench-")
    env = {
        **os.environ,
        "CALLGATE_PORT": str(port),
        "CALLGATE_DATA_DIR": data_dir,
        "CALLGATE_OPERATOR_KEY": OPERATOR_KEY,
        "CALLGATE_TWILIO_ACCOUNT_SID": account.sid,
        "CALLGATE_TWILIO_AUTH_TOKEN": account.auth_token,
        "CALLGATE_TWILIO_API_URL": rest.url,
        "CALLGATE_VAPI_API_URL": vapi.api_url,
        "CALLGATE_LOG_LEVEL": "WARNING",
    }
    server = await _start_server(env)
    probe = psutil.Process(server.pid)
    http = aiohttp.ClientSession()
    try:
        workspace = await _api(http, base, "/workspaces", {"name": "bench"})
        vapi.add_key("bench-vapi-key")
        agent = await _api(
            http,
            base,
            f"/workspaces/{workspace['id']}/agents",
            {
                "name": "bench",
                "provider": "vapi",
                "assistant_id": "bench-assistant",
                "api_key": "bench-vapi-key",
            },
        )
        await _api(
            http,
            base,
            f"/workspaces/{workspace['id']}/numbers",
            {"number": NUMBER, "agent_id": agent["id"]},
        )
        simulator = TwilioSimulator(
            http, account, f"{base}/twilio/voice", f"{base}/twilio/status"
        )
        frames = split_frames(tone_mulaw(440, duration_ms=call_secs * 1000))

        idle = _usage(probe)
        started = time.monotonic()
        results = await asyncio.gather(
            *(_one_call(simulator, frames) for _ in range(calls))
        )
        wall_secs = time.monotonic() - started
        busy = _usage(probe)
        await simulator.close()
    finally:
        await http.close()
        server.terminate()
        await server.wait()
        await rest.close()
        await vapi.close()

    relayed = calls * len(frames) * 2
    cpu_secs = busy.cpu_secs - idle.cpu_secs
    call_secs_total = calls * call_secs
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
    idle_mib, busy_mib = idle.rss_bytes >> 20, busy.rss_bytes >> 20
    print(f"  RSS idle / loaded:       {idle_mib} / {busy_mib} MiB")
    print(
        "  RSS per call (est.):     "
        f"{(busy.rss_bytes - idle.rss_bytes) / calls / 1024:.0f} KiB"
    )
