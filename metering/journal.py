"""A local, append-only journal of reports the store could not take.

While the store is unreachable, every report the meter fails to deliver is
appended here (one JSON line each, fsynced per batch) and replayed, in order,
once the store answers again, or when Callgate next starts after a crash.
Reports carry cumulative totals and sequence numbers, so replaying one that
did reach the store, or replaying twice, changes nothing.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import orjson

from metering.quota import Report

_JOURNAL = "meter.jsonl"
_REPLAYING = "meter.replaying.jsonl"


class Journal:
    """The journal file of one Callgate process, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._path = directory / _JOURNAL
        self._replaying = directory / _REPLAYING
        self.depth = self._count(self._path) + self._count(self._replaying)

    def append(self, reports: list[Report]) -> None:
        """Write ``reports`` to the end of the journal and make them durable."""
        if not reports:
            return
        lines = b"".join(
            orjson.dumps(dataclasses.asdict(report)) + b"\n" for report in reports
        )
        with self._path.open("ab") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())
        self.depth += len(reports)

    def take(self) -> list[Report]:
        """Every journaled report, oldest first, set aside until :meth:`done`.

        A replay that a crash interrupted is taken again first.
        """
        if self._path.exists():
            with self._path.open("rb") as new, self._replaying.open("ab") as old:
                old.write(new.read())
                old.flush()
                os.fsync(old.fileno())
            self._path.unlink()
        if not self._replaying.exists():
            return []
        with self._replaying.open("rb") as handle:
            return [Report(**orjson.loads(line)) for line in handle if line.strip()]

    def done(self) -> None:
        """The reports from :meth:`take` reached the store: forget them."""
        self._replaying.unlink(missing_ok=True)
        self.depth = self._count(self._path)

    @staticmethod
    def _count(path: Path) -> int:
        if not path.exists():
            return 0
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
