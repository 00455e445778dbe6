"""A local, append-only journal of reports the store could not take.

While the store is unreachable, every report the meter fails to deliver is
appended here (one JSON line each, fsynced per batch) and replayed, in order,
once the store answers again, or when Callgate next starts after a crash.
Reports carry cumulative totals and sequence numbers, so replaying one that
did reach the store, or replaying twice, changes nothing. For the same reason
only each call's latest report per period and day needs keeping: the journal
drops the older ones as it grows, so a long outage costs a line or so per
live call, not one per call per tick.

Processes may share a data directory. Each takes the first free slot of the
journal directory, held by an exclusive ``flock`` on the slot's lock file
for as long as it lives, and writes only that slot's files. A process that
dies frees its slot; the next to start there takes it, and its journal.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
from pathlib import Path

import orjson

from metering.quota import Report

# Slots a journal directory offers; more processes than this on one data
# directory is a configuration mistake worth stopping at.
_SLOTS = 256
# Lines appended past twice the last compaction's size before the next one.
_SLACK_LINES = 1024


def latest(reports: list[Report]) -> list[Report]:
    """Each call's last report for each period and day, in the order they came.

    The last of a call's reports carries its highest cumulative total (and,
    if it ended, its settlement), so replaying it alone counts what replaying
    all of them would. Period and day stay apart: each counts its own time.
    """
    last: dict[tuple[str, str, str, str], int] = {}
    for index, report in enumerate(reports):
        key = (report.workspace_id, report.call_sid, report.period, report.day)
        last[key] = index
    return [reports[index] for index in sorted(last.values())]


def _read(path: Path) -> list[Report]:
    with path.open("rb") as handle:
        return [Report(**orjson.loads(line)) for line in handle if line.strip()]


def _write(path: Path, reports: list[Report], mode: str) -> None:
    lines = b"".join(
        orjson.dumps(dataclasses.asdict(report)) + b"\n" for report in reports
    )
    with path.open(mode) as handle:
        handle.write(lines)
        handle.flush()
        os.fsync(handle.fileno())


class Journal:
    """The journal file of one Callgate process, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._lock, slot = _take_slot(directory)
        stem = "meter" if slot == 0 else f"meter-{slot}"
        self.slot = slot
        self._path = directory / f"{stem}.jsonl"
        self._replaying = directory / f"{stem}.replaying.jsonl"
        self._compacting = directory / f"{stem}.compacting.jsonl"
        self._lines = self._count(self._path)
        self._compacted_lines = 0
        self.depth = self._lines + self._count(self._replaying)

    def append(self, reports: list[Report]) -> None:
        """Write ``reports`` to the end of the journal and make them durable."""
        if not reports:
            return
        _write(self._path, reports, "ab")
        self.depth += len(reports)
        self._lines += len(reports)
        if self._lines > 2 * self._compacted_lines + _SLACK_LINES:
            self._compact()

    def close(self) -> None:
        """Give the slot up (a process that dies gives it up all the same)."""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def _compact(self) -> None:
        """Rewrite the journal with only the reports :func:`latest` keeps."""
        kept = self._rewrite(self._path)
        self.depth -= self._lines - kept
        self._lines = self._compacted_lines = kept

    def _rewrite(self, path: Path) -> int:
        """Rewrite ``path`` with what :func:`latest` keeps; return how many."""
        kept = latest(_read(path))
        # Written aside and renamed over: a crash leaves one whole file.
        _write(self._compacting, kept, "wb")
        self._compacting.replace(path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return len(kept)

    def take(self) -> list[Report]:
        """Every journaled report, oldest first, set aside until :meth:`done`.

        A replay that a crash (or a store still down) interrupted is taken
        again first. What is set aside is kept compacted, so replays tried
        on every tick of a long outage stay a line or so per call.
        """
        if self._path.exists():
            with self._path.open("rb") as new, self._replaying.open("ab") as old:
                old.write(new.read())
                old.flush()
                os.fsync(old.fileno())
            self._path.unlink()
            self._lines = self._compacted_lines = 0
            self.depth = self._rewrite(self._replaying)
        if not self._replaying.exists():
            return []
        return latest(_read(self._replaying))

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


def _take_slot(directory: Path) -> tuple[int, int]:
    """Lock the first free slot of ``directory``: its lock's descriptor and number."""
    for slot in range(_SLOTS):
        descriptor = os.open(directory / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            continue
        return descriptor, slot
    raise RuntimeError(f"every journal slot in {directory} is taken")
