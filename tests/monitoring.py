"""A real Prometheus and Alertmanager on loopback, for the monitoring tests.

Both are the Debian packages' servers (``make test`` installs them). Neither
can announce that it is ready or that it has scraped, evaluated or notified,
so :func:`until` polls their HTTP APIs against a deadline.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

DEADLINE_SECS = 60.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _write_config(path: Path, config: dict[str, Any]) -> Path:
    # YAML is a superset of JSON, so both servers read this as written.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECS
    while True:
        if await check():
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.25)


@asynccontextmanager
async def _server(
    http: aiohttp.ClientSession, name: str, ready_url: str, *argv: str
) -> AsyncIterator[None]:
    binary = shutil.which(name)
    assert binary is not None, f"{name} is missing: `make test` installs it"
    process = await asyncio.create_subprocess_exec(
        binary,
        *argv,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        async def ready() -> bool:
            assert process.returncode is None, f"{name} exited"
            try:
                async with http.get(ready_url) as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await until(ready, f"{name} ready")
        yield
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


@dataclass
class Prometheus:
    """A running Prometheus and a client of its query API."""

    url: str
    http: aiohttp.ClientSession

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector; fails unless the query succeeded."""
        async with self.http.get(
            f"{self.url}/api/v1/query", params={"query": expr}
        ) as response:
            body = await response.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


@asynccontextmanager
async def running_prometheus(
    http: aiohttp.ClientSession,
    workdir: Path,
    targets: list[str],
    rule_files: Sequence[Path] = (),
    alertmanager: str | None = None,
) -> AsyncIterator[Prometheus]:
    """Prometheus scraping ``targets`` (host:port) every second.

    With ``rule_files`` it evaluates them every second, and sends alerts to
    ``alertmanager`` (host:port) when one is given.
    """
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "callgate", "static_configs": [{"targets": targets}]}
        ],
        "rule_files": [str(path) for path in rule_files],
    }
    if alertmanager is not None:
        config["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]
        }
    config_file = _write_config(workdir / "prometheus.yml", config)
    url = f"http://127.0.0.1:{_free_port()}"
    async with _server(
        http,
        "prometheus",
        f"{url}/-/ready",
        f"--config.file={config_file}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address={url.removeprefix('http://')}",
    ):
        yield Prometheus(url, http)


@asynccontextmanager
async def running_alertmanager(
    http: aiohttp.ClientSession,
    workdir: Path,
    receiver_url: str,
    inhibit_rules: Sequence[Any] = (),
) -> AsyncIterator[str]:
    """Alertmanager paging ``receiver_url``; yields its host:port.

    Alerts are grouped per alert and workspace and sent a second after they
    first arrive, time for alerts of one evaluation to inhibit each other.
    """
    config = {
        "route": {
            "receiver": "pager",
            "group_by": ["alertname", "workspace"],
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [{"name": "pager", "webhook_configs": [{"url": receiver_url}]}],
        "inhibit_rules": list(inhibit_rules),
    }
    config_file = _write_config(workdir / "alertmanager.yml", config)
    address = f"127.0.0.1:{_free_port()}"
    async with _server(
        http,
        "prometheus-alertmanager",
        f"http://{address}/-/ready",
        f"--config.file={config_file}",
        f"--storage.path={workdir / 'data'}",
        f"--web.listen-address={address}",
        # An empty address turns clustering off: no gossip port is opened.
        "--cluster.listen-address=",
    ):
        yield address
