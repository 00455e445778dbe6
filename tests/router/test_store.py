"""Tests for the embedded Valkey server Callgate runs without CALLGATE_REDIS_URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.store import EmbeddedValkey, connect
from tenancy.errors import StoreError


async def test_embedded_valkey_persists_across_restarts(tmp_path: Path) -> None:
    """Data written before a stop is there after the next start (AOF)."""
    server = EmbeddedValkey(tmp_path)
    await server.start()
    client = connect(server.url)
    await client.set("probe", "kept")
    await client.aclose()
    await server.stop()
    assert (tmp_path / "valkey" / "appendonlydir").is_dir()

    again = EmbeddedValkey(tmp_path)
    await again.start()
    client = connect(again.url)
    try:
        assert await client.get("probe") == "kept"
    finally:
        await client.aclose()
        await again.stop()


async def test_embedded_valkey_refuses_a_data_dir_in_use(tmp_path: Path) -> None:
    """A second server on the same data directory is refused, not started."""
    first = EmbeddedValkey(tmp_path)
    await first.start()
    try:
        with pytest.raises(StoreError, match="in use"):
            await EmbeddedValkey(tmp_path).start()
    finally:
        await first.stop()


async def test_embedded_valkey_handles_deep_data_dirs(tmp_path: Path) -> None:
    """A data dir too deep for a unix socket path still works."""
    deep = tmp_path.joinpath(*(["d" * 20] * 6))
    server = EmbeddedValkey(deep)
    assert len(str(server.socket_path)) <= 100
    await server.start()
    client = connect(server.url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
        await server.stop()
