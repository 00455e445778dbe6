"""A Valkey Cluster on loopback, so keyspace rules meet real hash slots in tests.

``running_cluster()`` starts one ``valkey-server`` per primary in cluster mode,
joins them with ``valkey-cli --cluster create`` (which assigns all 16384
slots), and waits until every node reports ``cluster_state:ok``. Leaving the
block stops the servers and removes their directory.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import redis

from router.store import valkey_binary

HOST = "127.0.0.1"
_READY = b"Ready to accept connections"
_STATE_OK = b"Cluster state changed: ok"
_MARKERS = (_READY, _STATE_OK)
# Each node also listens on its port plus 10000 for the cluster bus, and the
# bus port must fit below 65536 too.
_BUS_OFFSET = 10000
_HIGHEST_PORT = 65535 - _BUS_OFFSET
_PORT_PROBES = 200
_TAIL_LINES = 6


class ClusterError(RuntimeError):
    """The cluster could not be started; the message carries the log's tail."""


@dataclass(frozen=True, slots=True)
class ValkeyCluster:
    """The primaries of a running cluster, as ``host:port`` addresses."""

    addresses: tuple[str, ...]

    @property
    def url(self) -> str:
        """A ``redis://`` URL of one primary; a cluster client finds the rest."""
        return f"redis://{self.addresses[0]}"


class _Log:
    """Reads one server's output on a thread, so a full pipe never blocks it.

    Callers wait for a marker line on a condition the reader notifies; the
    last lines are kept for error messages.
    """

    def __init__(self, output: IO[bytes]) -> None:
        self._output = output
        self._tail: deque[bytes] = deque(maxlen=_TAIL_LINES)
        self._seen: set[bytes] = set()
        self._ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def wait_for(self, marker: bytes, timeout_secs: float) -> bool:
        """Whether ``marker`` was logged within ``timeout_secs`` (false at EOF)."""
        with self._changed:
            self._changed.wait_for(
                lambda: marker in self._seen or self._ended, max(timeout_secs, 0.0)
            )
            return marker in self._seen

    def tail(self) -> str:
        """The last lines logged, joined on one line for an error message."""
        with self._changed:
            lines = list(self._tail)
        return " | ".join(line.decode("utf-8", "replace") for line in lines)

    def close(self, timeout_secs: float) -> None:
        """Wait for EOF (the server has exited), then close the pipe."""
        self._reader.join(timeout_secs)
        self._output.close()

    def _read(self) -> None:
        for line in self._output:
            with self._changed:
                self._tail.append(line.strip())
                self._seen.update(m for m in _MARKERS if m in line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()


@dataclass(slots=True)
class _Node:
    """One ``valkey-server`` process and the reader of its log."""

    port: int
    process: subprocess.Popen[bytes]
    log: _Log

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def await_log(self, marker: bytes, deadline: float) -> None:
        """Return once ``marker`` is logged; raise at ``deadline`` or on exit."""
        if not self.log.wait_for(marker, deadline - time.monotonic()):
            raise ClusterError(
                f"valkey on port {self.port} logged no {marker.decode()!r}: "
                f"{self.log.tail()}"
            )

    def reap(self, timeout_secs: float) -> None:
        """Wait for the server to exit (killing it if it will not), close the pipe."""
        try:
            self.process.wait(timeout_secs)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close(timeout_secs)


@contextlib.contextmanager
def running_cluster(
    primaries: int = 3, timeout_secs: float = 30.0
) -> Iterator[ValkeyCluster]:
    """A cluster of ``primaries`` nodes (three at least) with no replicas.

    Start-up, joining included, must finish within ``timeout_secs``.
    """
    if primaries < 3:
        raise ClusterError("valkey-cli builds a cluster of three primaries at least")
    deadline = time.monotonic() + timeout_secs
    directory = Path(tempfile.mkdtemp(prefix="callgate-cluster-"))
    nodes: list[_Node] = []
    try:
        # Start every server before waiting on any, so they boot in parallel.
        for port in _free_ports(primaries):
            nodes.append(_start_node(port, directory))
        for node in nodes:
            node.await_log(_READY, deadline)

        _create(nodes, deadline)
        # The CLI returns once the nodes agree on the slots; each node marks
        # itself ok a moment later, on its next cluster tick.
        for node in nodes:
            node.await_log(_STATE_OK, deadline)
        for node in nodes:
            _check_state(node)

        yield ValkeyCluster(tuple(node.address for node in nodes))
    finally:
        # Signal every node first, so they shut down in parallel.
        for node in nodes:
            node.process.terminate()
        for node in nodes:
            node.reap(timeout_secs=10.0)
        shutil.rmtree(directory, ignore_errors=True)


def _free_ports(count: int) -> list[int]:
    """Loopback ports that are free now, each with its bus port free too.

    Every probe stays bound until all ports are chosen, so no two choices
    (client or bus port) collide. A port is free only until the server binds
    it; another process taking it meanwhile shows as "Address already in use"
    in the start-up error.
    """
    probes: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count and len(probes) < _PORT_PROBES:
            probe = _bind(0)
            probes.append(probe)
            port: int = probe.getsockname()[1]
            if port > _HIGHEST_PORT:
                continue
            try:
                probes.append(_bind(port + _BUS_OFFSET))
            except OSError:
                continue
            ports.append(port)
    finally:
        for probe in probes:
            probe.close()
    if len(ports) < count:
        raise ClusterError(f"found {len(ports)} of {count} free port pairs")
    return ports


def _bind(port: int) -> socket.socket:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind((HOST, port))
    except OSError:
        probe.close()
        raise
    return probe


def _start_node(port: int, directory: Path) -> _Node:
    process = subprocess.Popen(
        [
            str(valkey_binary()),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(directory / f"nodes-{port}.conf"),
            "--port",
            str(port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    return _Node(port, process, _Log(process.stdout))


def _create(nodes: list[_Node], deadline: float) -> None:
    """Join the nodes into one cluster; the CLI spreads the slots evenly."""
    cli = valkey_binary().with_name("valkey-cli")
    addresses = [node.address for node in nodes]
    try:
        result = subprocess.run(
            [str(cli), "--cluster", "create", *addresses, "--cluster-yes"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=max(deadline - time.monotonic(), 0.0),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ClusterError(
            f"valkey-cli --cluster create timed out: {_tails(nodes)}"
        ) from None
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode("utf-8", "replace")
        last_lines = " | ".join(output.strip().splitlines()[-_TAIL_LINES:])
        raise ClusterError(
            f"valkey-cli --cluster create exited with {result.returncode}: {last_lines}"
        )


def _check_state(node: _Node) -> None:
    """Ask the node itself, not its log, whether it serves all slots."""
    with redis.Redis(
        HOST, node.port, socket_timeout=5.0, decode_responses=True
    ) as client:
        info = str(client.execute_command("CLUSTER", "INFO"))
    if "cluster_state:ok" not in info.split():
        raise ClusterError(f"valkey on port {node.port} is not ok: {info.strip()}")


def _tails(nodes: list[_Node]) -> str:
    return "; ".join(f"{node.port}: {node.log.tail()}" for node in nodes)
