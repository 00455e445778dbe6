"""Delivers budget events to webhooks: signed, in order, retried until received.

Each workspace's events go to each of its targets (its own webhook and the
operator's) in the order the stream holds them. A target gets the next event
only once it has answered 2xx to the one before; a failure (any other status,
a timeout, a refused connection) is retried after a delay that doubles from
``retry_secs`` up to ``retry_max_secs``, with jitter, for as long as it takes.
Every attempt carries the event's id, so a receiver that saw an event but
whose answer was lost can recognise the retry.

Signing follows Standard Webhooks: ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` keyed
with the base64-decoded bytes of the registration's ``whsec_`` secret.

Any number of processes may run a dispatcher. A workspace is delivered by one
of them at a time, under a lock with a TTL, and what is due when is shared
through the ``cg:webhooks_due`` sorted set: the quota engine wakes the
dispatcher when a script appends an event, a periodic sweep finds events a
crashed process appended but never announced, and a failed delivery puts its
retry time there for whichever process looks next.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
import secrets
import time
from base64 import b64decode, b64encode
from dataclasses import dataclass
from typing import Final

import aiohttp
import redis.asyncio as redis
from yarl import URL

from metering.budget_events import BudgetEvent, events_after, last_id, stream_position
from metering.metrics import Metrics
from tenancy import keyspace
from tenancy.errors import SealError
from tenancy.hooks import RELEASE_LOCK, SECRET_PREFIX, Webhook, Webhooks
from tenancy.logs import metering_logger
from tenancy.replies import Store, text_map, texts
from tenancy.workspaces import now_ms

# Events read from a stream per round; a workspace has at most four a period.
_BATCH: Final = 50
_USER_AGENT: Final = "Callgate-Webhooks/1"
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Writes delivery state only while the lock is still this process's and the
# workspace still exists: once the lock has lapsed, or offboarding has taken
# it (or deleted it) to delete the workspace, a late write could bring back a
# key nobody owns.
_RECORD = """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 2))
  return 1
end
return 0
"""
# Workspaces drained at once by one process, so that a slow receiver holds up
# only its own workspaces.
_PARALLEL: Final = 16
_UNREADABLE: Final = "secret does not open"


def signature(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one delivery (Standard Webhooks v1)."""
    key = b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + b64encode(digest).decode("ascii")


def backoff_secs(attempts: int, base_secs: float, max_secs: float) -> float:
    """How long to wait after the ``attempts``-th failure in a row.

    Doubles from ``base_secs``, capped at ``max_secs``, then loses up to a
    quarter at random so that many failing targets do not retry in step.
    """
    delay = min(max_secs, base_secs * 2.0 ** min(attempts - 1, 40))
    return delay * (0.75 + 0.25 * random.random())  # noqa: S311 (jitter, not a secret)


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one delivery attempt got: a status, or why there was none."""

    status: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        """True for a 2xx answer."""
        return self.status is not None and 200 <= self.status < 300


class Dispatcher:
    """Sends each workspace's budget events to its webhooks."""

    def __init__(
        self,
        store: Store,
        webhooks: Webhooks,
        metrics: Metrics,
        http: aiohttp.ClientSession,
        *,
        retry_secs: float,
        retry_max_secs: float,
        timeout_secs: float,
        poll_secs: float = 1.0,
        sweep_secs: float = 300.0,
        lock_ms: int = 60_000,
    ) -> None:
        self._store = store
        self._webhooks = webhooks
        self._metrics = metrics
        self._http = http
        self._retry_secs = retry_secs
        self._retry_max_secs = retry_max_secs
        self._timeout = aiohttp.ClientTimeout(total=timeout_secs)
        self._poll_secs = poll_secs
        self._sweep_secs = sweep_secs
        self._lock_ms = max(lock_ms, int(timeout_secs * 3000))
        self._release = store.register_script(RELEASE_LOCK)
        self._extend = store.register_script(_EXTEND)
        self._record = store.register_script(_RECORD)
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    async def wake(self, workspace_id: str) -> None:
        """Mark the workspace due now: a script just appended events to it."""
        try:
            await self._store.zadd(
                keyspace.WEBHOOKS_DUE, {workspace_id: now_ms()}, lt=True
            )
        except redis.RedisError:
            # The sweep finds the events even if nobody announced them.
            metering_logger.warning("could not announce budget events")
        self._wakeup.set()

    def start(self) -> None:
        """Deliver in the background until closed."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    async def close(self) -> None:
        """Stop delivering; an attempt in flight is abandoned and retried later."""
        if self._task is not None:
            # The flag ends the loop even if a store call swallowed the cancel.
            self._closing = True
            self._wakeup.set()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        next_sweep = 0.0
        while not self._closing:
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self._sweep_secs
                    await self.sweep()
                await self.deliver_due()
            except redis.RedisError:
                metering_logger.warning("webhook delivery could not reach the store")
            except Exception as exc:  # noqa: BLE001 (the loop must outlive any one error)
                # The type only: a message could quote a URL with credentials.
                metering_logger.error("webhook delivery failed: %s", type(exc).__name__)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that lands as the wait ends, and close() would hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_secs):
                    await self._wakeup.wait()
            self._wakeup.clear()

    async def sweep(self) -> int:
        """Mark due every workspace with undelivered events; return how many."""
        marked = 0
        for workspace_id in texts(await self._store.zrange(keyspace.WORKSPACES, 0, -1)):
            if await self._has_pending(workspace_id):
                await self._store.zadd(
                    keyspace.WEBHOOKS_DUE, {workspace_id: now_ms()}, nx=True
                )
                marked += 1
        return marked

    async def deliver_due(self) -> None:
        """Deliver for every workspace whose turn has come, several at once."""
        due = texts(
            await self._store.zrangebyscore(
                keyspace.WEBHOOKS_DUE, "-inf", now_ms(), start=0, num=100
            )
        )
        room = asyncio.Semaphore(_PARALLEL)

        async def drain(workspace_id: str) -> None:
            async with room:
                try:
                    await self._drain(workspace_id)
                except redis.RedisError:
                    metering_logger.warning(
                        "webhook delivery could not reach the store"
                    )
                except Exception as exc:  # noqa: BLE001 (one workspace's error stays its own)
                    metering_logger.error(
                        "webhook delivery for workspace %s failed: %s",
                        workspace_id,
                        type(exc).__name__,
                    )
                    # Not at once again: the others come first.
                    later = now_ms() + int(self._retry_secs * 1000)
                    with contextlib.suppress(redis.RedisError):
                        await self._store.zadd(
                            keyspace.WEBHOOKS_DUE, {workspace_id: later}
                        )

        await asyncio.gather(*(drain(workspace_id) for workspace_id in due))

    async def _drain(self, workspace_id: str) -> None:
        lock = keyspace.delivery_lock(workspace_id)
        token = secrets.token_hex(16)
        if not await self._store.set(lock, token, nx=True, px=self._lock_ms):
            return  # another process is delivering this workspace's events
        try:
            if not await self._store.exists(keyspace.workspace(workspace_id)):
                await self._store.zrem(keyspace.WEBHOOKS_DUE, workspace_id)
                return
            newest = await last_id(self._store, workspace_id)
            come_back: int | None = None
            for target, hook in await self._webhooks.targets(workspace_id):
                when = await self._deliver(workspace_id, target, hook, lock, token)
                if when is not None:
                    come_back = when if come_back is None else min(come_back, when)
            if come_back is not None:
                await self._store.zadd(keyspace.WEBHOOKS_DUE, {workspace_id: come_back})
                # An event appended while this drain ran must not wait for
                # the target in backoff: whatever announced it may have been
                # overwritten by the line above, so look for it.
                if await last_id(self._store, workspace_id) != newest:
                    await self._store.zadd(
                        keyspace.WEBHOOKS_DUE, {workspace_id: now_ms()}
                    )
                    self._wakeup.set()
                return
            await self._store.zrem(keyspace.WEBHOOKS_DUE, workspace_id)
            # An event appended and announced between the reads above and this
            # removal would otherwise wait for the sweep.
            if await self._has_pending(workspace_id):
                await self._store.zadd(keyspace.WEBHOOKS_DUE, {workspace_id: now_ms()})
                self._wakeup.set()
        finally:
            await self._release(keys=[lock], args=[token])

    async def _deliver(
        self, workspace_id: str, target: str, hook: Webhook, lock: str, token: str
    ) -> int | None:
        """Send the target its pending events in order.

        Returns when to come back (epoch ms) if something is left, else ``None``.
        """
        state_key = keyspace.webhook_delivery(workspace_id, target)
        state = text_map(await self._store.hgetall(state_key))
        retry_at = int(state.get("next_attempt_ms", "0"))
        if retry_at > now_ms():
            return retry_at
        cursor = state.get("cursor", "0-0")
        events = await events_after(self._store, workspace_id, cursor, _BATCH)
        delivered = int(state.get("delivered", "0"))
        attempts = int(state.get("attempts", "0"))
        secret: str | None = None
        # A secret sealed under another CALLGATE_SECRET_KEY stays None: this
        # webhook backs off like a failing one until its secret is rotated.
        if events:
            with contextlib.suppress(SealError):
                secret = await self._webhooks.secret(
                    workspace_id if target == "workspace" else None
                )
        for event in events:
            if not await self._extend(keys=[lock], args=[token, self._lock_ms]):
                return now_ms()  # the lock lapsed; whoever holds it carries on
            if secret is None:
                attempt = Attempt(None, _UNREADABLE)
            else:
                attempt = await self._send(hook.url, secret, event)
            if attempt.delivered:
                delivered += 1
                attempts = 0
                fields: dict[str, str | int] = {
                    "cursor": event.stream_id,
                    "delivered": delivered,
                    "attempts": 0,
                    "next_attempt_ms": 0,
                    "last_status": attempt.status or 0,
                    "last_error": "",
                    "delivered_at_ms": now_ms(),
                }
                if not await self._write(workspace_id, lock, token, state_key, fields):
                    return None
                self._metrics.webhook_deliveries.labels(
                    workspace_id, target, "delivered"
                ).inc()
                continue
            attempts += 1
            delay = backoff_secs(attempts, self._retry_secs, self._retry_max_secs)
            retry_at = now_ms() + max(1, int(delay * 1000))
            failure = attempt.error or f"HTTP {attempt.status}"
            fields = {
                "attempts": attempts,
                "next_attempt_ms": retry_at,
                "last_status": attempt.status or 0,
                "last_error": failure,
            }
            self._metrics.webhook_deliveries.labels(
                workspace_id, target, "failed"
            ).inc()
            metering_logger.warning(
                "budget webhook to %s failed (%s) for workspace %s; retry %d in %.1fs",
                URL(hook.url).host,
                failure,
                workspace_id,
                attempts,
                delay,
            )
            if not await self._write(workspace_id, lock, token, state_key, fields):
                return None
            return retry_at
        return now_ms() if len(events) == _BATCH else None

    async def _write(
        self,
        workspace_id: str,
        lock: str,
        token: str,
        state_key: str,
        fields: dict[str, str | int],
    ) -> bool:
        """Record delivery state if the lock is still held; False if it is not."""
        pairs: list[str | int] = [token]
        for name, value in fields.items():
            pairs += [name, value]
        keys = [lock, state_key, keyspace.workspace(workspace_id)]
        return bool(await self._record(keys=keys, args=pairs))

    async def _send(self, url: str, secret: str, event: BudgetEvent) -> Attempt:
        body = event.body()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": _USER_AGENT,
            "webhook-id": event.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secret, event.id, timestamp, body),
        }
        try:
            # The answer's body is not read: only its status counts.
            async with self._http.post(
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
            ) as response:
                return Attempt(response.status, None)
        except TimeoutError:
            return Attempt(None, "timed out")
        except Exception as exc:  # noqa: BLE001 (any failure is a failed attempt)
            return Attempt(None, type(exc).__name__)

    async def _has_pending(self, workspace_id: str) -> bool:
        newest = await last_id(self._store, workspace_id)
        if newest == "0-0":
            return False
        for target in await self._webhooks.target_names(workspace_id):
            cursor = await self._store.hget(
                keyspace.webhook_delivery(workspace_id, target), "cursor"
            )
            done = "0-0" if cursor is None else texts([cursor])[0]
            if stream_position(newest) > stream_position(done):
                return True
        return False
