"""A running Callgate with its protocol peers, for end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from router import stream
from router.app import create_app, runner, shut_down
from router.settings import Settings, load
from tests.peers.retell import FakeRetell
from tests.peers.twilio import (
    FakeTwilioRest,
    SimulatedCall,
    TwilioAccount,
    TwilioSimulator,
    new_account,
)
from tests.peers.vapi import FakeVapi, FakeVapiCall

OPERATOR_KEY = "operator-" + "o" * 32
SECRET_KEY = "secret-" + "s" * 32


@dataclass
class Tenant:
    """A workspace created through the API, with its agent and number."""

    workspace_id: str
    agent_id: str
    number: str
    api_key: str
    assistant_id: str


@dataclass
class Harness:
    """Callgate on a loopback port, the Twilio and Vapi peers, and an API client."""

    app: web.Application
    settings: Settings
    base_url: str
    http: aiohttp.ClientSession
    account: TwilioAccount
    twilio: TwilioSimulator
    twilio_rest: FakeTwilioRest
    vapi: FakeVapi
    registry: CollectorRegistry
    runner: web.AppRunner
    retell: FakeRetell

    async def api(
        self, method: str, path: str, body: Any = None, key: str = OPERATOR_KEY
    ) -> tuple[int, Any]:
        """Call the operator API; returns the status and the decoded JSON."""
        async with self.http.request(
            method,
            f"{self.base_url}/api/v1{path}",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            return response.status, await response.json(content_type=None)

    async def tenant(
        self,
        name: str,
        number: str,
        audio_format: str = "mulaw",
        provider: str = "vapi",
    ) -> Tenant:
        """Create a workspace with an agent of its own and attach ``number``."""
        status, workspace = await self.api("POST", "/workspaces", {"name": name})
        assert status == 201, workspace
        api_key = f"{provider}-key-{name}-" + workspace["id"][-6:]
        assistant_id = f"{provider}-agent-{name}"
        platform = self.retell if provider == "retell" else self.vapi
        platform.add_key(api_key)
        status, agent = await self.api(
            "POST",
            f"/workspaces/{workspace['id']}/agents",
            {
                "name": f"{name} receptionist",
                "provider": provider,
                "assistant_id": assistant_id,
                "api_key": api_key,
                "audio_format": audio_format,
            },
        )
        assert status == 201, agent
        status, attached = await self.api(
            "POST",
            f"/workspaces/{workspace['id']}/numbers",
            {"number": number, "agent_id": agent["id"]},
        )
        assert status == 201, attached
        return Tenant(workspace["id"], agent["id"], number, api_key, assistant_id)

    async def place(self, to: str, from_: str) -> SimulatedCall:
        """Place a call that Twilio's REST API (the fake) can act on."""
        call = await self.twilio.place_call(to, from_)
        self.twilio_rest.register_call(call)
        return call

    async def connected_call(
        self, to: str, from_: str, timeout_secs: float = 5.0
    ) -> tuple[SimulatedCall, FakeVapiCall]:
        """Place a call to ``to`` and return once its Vapi transport is open."""
        call = await self.place(to, from_)
        await call.open_stream()
        vapi_call = await self.vapi.wait_for_call(timeout_secs)
        await vapi_call.wait_connected(timeout_secs)
        return call, vapi_call

    async def set_policy(self, workspace_id: str, **policy: Any) -> None:
        """Change a workspace's call policy through the API."""
        status, body = await self.api("PATCH", f"/workspaces/{workspace_id}", policy)
        assert status == 200, body

    def rest_forms(self, call_sid: str) -> list[Mapping[str, str]]:
        """Forms POSTed to Twilio's REST API for one call, oldest first."""
        return [
            request.form
            for request in self.twilio_rest.requests
            if request.method == "POST" and call_sid in request.path
        ]

    async def call_record(self, workspace_id: str, call_sid: str) -> dict[str, Any]:
        """A call record read through the operator API (it must exist)."""
        status, record = await self.api(
            "GET", f"/workspaces/{workspace_id}/calls/{call_sid}"
        )
        assert status == 200, record
        result: dict[str, Any] = record
        return result

    async def calls_settled(self, timeout_secs: float = 10.0) -> None:
        """Wait until every call this server is carrying has ended and settled."""
        tasks = self.app[stream.LIVE_CALLS]
        live = list(tasks)
        if live:
            await asyncio.wait_for(
                asyncio.gather(*live, return_exceptions=True), timeout_secs
            )

    async def shut_down(self) -> None:
        """Stop the server the way SIGTERM does: live calls end, then the store."""
        await shut_down(self.runner)

    def metric(self, name: str, labels: dict[str, str]) -> float | None:
        """A sample from this server's Prometheus registry."""
        return self.registry.get_sample_value(name, labels)


@dataclass
class CallgateProcess:
    """``callgate serve`` in a process of its own, with its peers in this one."""

    base_url: str
    pid: int
    process: asyncio.subprocess.Process
    http: aiohttp.ClientSession
    account: TwilioAccount
    twilio: TwilioSimulator
    twilio_rest: FakeTwilioRest
    vapi: FakeVapi
    retell: FakeRetell

    async def tenant(self, name: str, number: str, provider: str = "vapi") -> str:
        """Create a workspace with an agent and ``number``; return its id."""
        headers = {"Authorization": f"Bearer {OPERATOR_KEY}"}
        api = f"{self.base_url}/api/v1"
        api_key = f"{provider}-key-{name}"
        (self.retell if provider == "retell" else self.vapi).add_key(api_key)
        async with self.http.post(
            f"{api}/workspaces", json={"name": name}, headers=headers
        ) as response:
            workspace: dict[str, str] = await response.json()
        async with self.http.post(
            f"{api}/workspaces/{workspace['id']}/agents",
            json={
                "name": name,
                "provider": provider,
                "assistant_id": f"assistant-{name}",
                "api_key": api_key,
            },
            headers=headers,
        ) as response:
            agent: dict[str, str] = await response.json()
        async with self.http.post(
            f"{api}/workspaces/{workspace['id']}/numbers",
            json={"number": number, "agent_id": agent["id"]},
            headers=headers,
        ) as response:
            response.raise_for_status()
        return workspace["id"]

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Call the operator API; returns the status and the decoded JSON."""
        async with self.http.request(
            method,
            f"{self.base_url}/api/v1{path}",
            json=body,
            headers={"Authorization": f"Bearer {OPERATOR_KEY}"},
        ) as response:
            return response.status, await response.json(content_type=None)

    async def put_plan(self, workspace_id: str, plan: dict[str, Any]) -> None:
        """Set the workspace's plan through the API."""
        async with self.http.put(
            f"{self.base_url}/api/v1/workspaces/{workspace_id}/plan",
            json=plan,
            headers={"Authorization": f"Bearer {OPERATOR_KEY}"},
        ) as response:
            assert response.status == 200, await response.text()

    async def call_record(self, workspace_id: str, call_sid: str) -> dict[str, Any]:
        """One call record, read through the API."""
        async with self.http.get(
            f"{self.base_url}/api/v1/workspaces/{workspace_id}/calls/{call_sid}",
            headers={"Authorization": f"Bearer {OPERATOR_KEY}"},
        ) as response:
            assert response.status == 200, await response.text()
            record: dict[str, Any] = await response.json()
            return record

    async def usage(self, workspace_id: str) -> dict[str, Any]:
        """This month's usage of a workspace, read through the API."""
        async with self.http.get(
            f"{self.base_url}/api/v1/workspaces/{workspace_id}/usage",
            headers={"Authorization": f"Bearer {OPERATOR_KEY}"},
        ) as response:
            usage: dict[str, Any] = await response.json()
            return usage


@dataclass
class Peers:
    """The platforms Callgate talks to, played on loopback."""

    vapi: FakeVapi
    retell: FakeRetell
    twilio_rest: FakeTwilioRest
    account: TwilioAccount

    def env(self) -> dict[str, str]:
        """The CALLGATE_* settings that point Callgate at these peers."""
        return {
            "CALLGATE_TWILIO_ACCOUNT_SID": self.account.sid,
            "CALLGATE_TWILIO_AUTH_TOKEN": self.account.auth_token,
            "CALLGATE_TWILIO_API_URL": self.twilio_rest.url,
            "CALLGATE_VAPI_API_URL": self.vapi.api_url,
            "CALLGATE_RETELL_API_URL": self.retell.api_url,
        }

    def simulator(self, http: aiohttp.ClientSession, base_url: str) -> TwilioSimulator:
        """A Twilio simulator whose numbers point at Callgate on ``base_url``."""
        return TwilioSimulator(
            http,
            self.account,
            f"{base_url}/twilio/voice",
            f"{base_url}/twilio/status",
            sip_endpoint=self.retell,
            rest=self.twilio_rest,
        )


@asynccontextmanager
async def running_peers() -> AsyncIterator[Peers]:
    """Start the Vapi, Retell and Twilio REST peers; stop them afterwards."""
    vapi = FakeVapi()
    await vapi.start()
    retell = FakeRetell()
    await retell.start()
    rest = FakeTwilioRest()
    await rest.start()
    account = new_account()
    rest.add_account(account)
    try:
        yield Peers(vapi=vapi, retell=retell, twilio_rest=rest, account=account)
    finally:
        await rest.close()
        await retell.close()
        await vapi.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def callgate_process(
    data_dir: Path, peers: Peers | None = None, **env: str
) -> AsyncIterator[CallgateProcess]:
    """Run ``python -m router.cli serve`` until the block ends.

    The server runs in its own process so it has a core to itself while the
    peers, which cost as much CPU as Callgate, run in this one. Several
    processes may share ``peers``, as they share one Twilio account in
    production; without it each gets peers of its own.
    """
    async with contextlib.AsyncExitStack() as stack:
        if peers is None:
            peers = await stack.enter_async_context(running_peers())
        port = _free_port()
        base_url = f"http://127.0.0.1:{port}"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router.cli",
            "serve",
            env={
                **os.environ,
                "CALLGATE_PORT": str(port),
                "CALLGATE_DATA_DIR": str(data_dir),
                "CALLGATE_OPERATOR_KEY": OPERATOR_KEY,
                "CALLGATE_SECRET_KEY": SECRET_KEY,
                "CALLGATE_LOG_LEVEL": "WARNING",
                **peers.env(),
                **env,
            },
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        log: list[bytes] = []
        async with asyncio.timeout(30):
            while b"serving on" not in (line := await process.stderr.readline()):
                log.append(line)
                if not line:
                    raise RuntimeError(b"callgate did not start: " + b"".join(log))
        # Keep reading its log so a full pipe never blocks the server.
        drain = asyncio.create_task(process.stderr.read())
        http = aiohttp.ClientSession()
        twilio = peers.simulator(http, base_url)
        try:
            yield CallgateProcess(
                base_url=base_url,
                pid=process.pid,
                process=process,
                http=http,
                account=peers.account,
                twilio=twilio,
                twilio_rest=peers.twilio_rest,
                vapi=peers.vapi,
                retell=peers.retell,
            )
        finally:
            await twilio.close()
            await http.close()
            if process.returncode is None:
                process.terminate()
            await process.wait()
            await drain


@asynccontextmanager
async def running_callgate(
    valkey_url: str, data_dir: Path, **env: str
) -> AsyncIterator[Harness]:
    """Start Callgate and its peers; stop them all afterwards."""
    async with running_peers() as peers:
        # Bind first so the public URL can name the port with no race for it.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        base_url = f"http://127.0.0.1:{port}"
        settings = load(
            {
                "CALLGATE_REDIS_URL": valkey_url,
                "CALLGATE_DATA_DIR": str(data_dir),
                "CALLGATE_PORT": str(port),
                "CALLGATE_PUBLIC_URL": base_url,
                "CALLGATE_OPERATOR_KEY": OPERATOR_KEY,
                "CALLGATE_SECRET_KEY": SECRET_KEY,
                **peers.env(),
                **env,
            }
        )
        registry = CollectorRegistry()
        app = create_app(settings, registry)
        app_runner = runner(app)
        await app_runner.setup()
        await web.SockSite(app_runner, listener).start()
        http = aiohttp.ClientSession()
        twilio = peers.simulator(http, base_url)
        try:
            yield Harness(
                app=app,
                settings=settings,
                base_url=base_url,
                http=http,
                account=peers.account,
                twilio=twilio,
                twilio_rest=peers.twilio_rest,
                vapi=peers.vapi,
                registry=registry,
                runner=app_runner,
                retell=peers.retell,
            )
        finally:
            await twilio.close()
            await http.close()
            await shut_down(app_runner)
