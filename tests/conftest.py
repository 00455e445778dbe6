"""Fixtures shared by every test: a real Valkey server, started once per session."""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

from router.store import connect, valkey_binary
from tenancy import keyspace
from tenancy.replies import text_map, texts
from tests.cluster import running_cluster
from tests.harness import Harness, running_callgate

_READY = b"Ready to accept connections"


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``unix://`` URL of a Valkey server that lives for the whole session."""
    directory = tmp_path_factory.mktemp("valkey")
    socket_path = directory / "valkey.sock"
    process = subprocess.Popen(
        [
            str(valkey_binary()),
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    log: list[bytes] = []
    for line in process.stdout:
        log.append(line)
        if _READY in line:
            break
    else:
        raise RuntimeError(b"valkey did not start: " + b"".join(log[-5:]))
    # Keep draining the server's output so a full pipe never blocks it.
    stdout = process.stdout
    drain = threading.Thread(target=lambda: stdout.read(), daemon=True)
    drain.start()
    try:
        yield f"unix://{socket_path}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        drain.join(timeout=5)
        stdout.close()


_WORKSPACE_KEY = re.compile(r"cg:\{ws:(ws_[a-z2-7]{16})\}:")
_WORKSPACE_ID = re.compile(r"ws_[a-z2-7]{16}")


async def _values(client: redis.Redis, name: str) -> list[str]:
    kind = await client.type(name)
    if kind == "hash":
        return list(text_map(await client.hgetall(name)).values())
    if kind == "string":
        return [str(await client.get(name))]
    if kind == "set":
        return texts(await client.smembers(name))
    if kind == "zset":
        return texts(await client.zrange(name, 0, -1))
    if kind == "stream":
        entries = await client.xrange(name) or []
        return [str(text_map(fields or {})) for _, fields in entries]
    return [str(await client.dump(name))]


async def audit_store(client: redis.Redis) -> None:
    """Every key is one workspace's or a documented global, and no workspace's
    data names another workspace."""
    async for name in client.scan_iter(count=1000):
        if name in keyspace.GLOBAL_KEYS:
            continue
        owner = _WORKSPACE_KEY.match(name)
        assert owner is not None, f"key outside any workspace namespace: {name}"
        for value in await _values(client, name):
            for mentioned in _WORKSPACE_ID.findall(value):
                assert mentioned == owner.group(1), f"{name} names {mentioned}"


@pytest.fixture
async def store(valkey_url: str) -> AsyncIterator[redis.Redis]:
    """A client of the session's Valkey, emptied before each test.

    After each test the store is audited: whatever the test made Callgate
    write must sit in one workspace's namespace or be a documented global.
    """
    client = connect(valkey_url)
    await client.flushall()
    try:
        yield client
        await audit_store(client)
    finally:
        await client.aclose()


@pytest.fixture
async def callgate(
    store: redis.Redis, valkey_url: str, tmp_path: Path
) -> AsyncIterator[Harness]:
    """Callgate with its protocol peers, on an empty store."""
    async with running_callgate(valkey_url, tmp_path) as harness:
        yield harness


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[str]:
    """A ``redis://`` URL of a three-primary Valkey Cluster for the session.

    It starts only when a test asks for it, and costs about two seconds.
    """
    with running_cluster(primaries=3) as cluster:
        yield cluster.url


@pytest.fixture
async def cluster_store(redis_cluster: str) -> AsyncIterator[RedisCluster]:
    """A client of the session's cluster, every primary emptied before each test."""
    client = RedisCluster.from_url(redis_cluster, decode_responses=True)
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    try:
        yield client
    finally:
        await client.aclose()
