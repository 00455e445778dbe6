"""Store replies as text: the client decodes them, but its types say bytes or str."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

# A store client: one server, or a Redis Cluster (every workspace's keys share a
# hash slot, so the scripts and single-slot transactions work on either).
Store = redis.Redis | RedisCluster

# A hash mapping as redis-py's types accept it: its key type is invariant, so a
# precise dict[str, str] does not fit; values are str or int in practice.
HashFields = dict[Any, Any]


def text(value: Any) -> str:
    """One reply as ``str``."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def text_or_none(value: Any) -> str | None:
    """One reply as ``str``, keeping ``None`` (a missing key or field)."""
    return None if value is None else text(value)


def texts(values: Iterable[Any]) -> list[str]:
    """A multi-bulk reply as a list of ``str``."""
    return [text(value) for value in values]


def text_map(fields: Mapping[Any, Any]) -> dict[str, str]:
    """A hash reply (``HGETALL``) as ``dict[str, str]``."""
    return {text(key): text(value) for key, value in fields.items()}
