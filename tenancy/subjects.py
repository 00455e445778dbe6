"""Data-subject requests: export or erase everything a workspace holds about a caller.

A caller's number appears in a workspace only on its call records (and in the
recordings of those calls). Export returns those records; erasure deletes them
and their recordings, leaving the usage counters as the anonymous totals they
always were. Each request leaves a certificate in the workspace that names the
caller only by a keyed hash of the number, so it holds no personal data; no
other workspace is read or touched.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tenancy import keyspace
from tenancy.errors import ConflictError
from tenancy.replies import Store, text, text_map, texts
from tenancy.vault import derive_key
from tenancy.workspaces import now_ms

Kind = Literal["export", "erase"]


@dataclass(frozen=True, slots=True)
class Certificate:
    """What a data-subject request did, without saying about whom."""

    id: str
    kind: Kind
    subject_digest: str
    at_ms: int
    call_records: int
    recordings: int


class Subjects:
    """Exports and erases one caller's records inside one workspace."""

    def __init__(self, store: Store, secret_key: str, data_dir: Path) -> None:
        self._store = store
        self._digest_key = derive_key(secret_key, "data subjects")
        self._data_dir = data_dir

    def digest(self, number: str) -> str:
        """The keyed hash a certificate names a caller by."""
        return hmac.new(self._digest_key, number.encode(), hashlib.sha256).hexdigest()

    async def records(self, workspace_id: str, number: str) -> list[dict[str, str]]:
        """Every call record of the workspace whose caller is ``number``."""
        found = []
        sids = texts(await self._store.zrange(keyspace.calls(workspace_id), 0, -1))
        for call_sid in sids:
            fields = text_map(
                await self._store.hgetall(keyspace.call(workspace_id, call_sid))
            )
            if fields.get("from") == number:
                found.append(fields)
        return found

    async def export(
        self, workspace_id: str, number: str
    ) -> tuple[list[dict[str, str]], Certificate]:
        """The caller's call records, and the certificate of the export."""
        found = await self.records(workspace_id, number)
        recordings = sum(1 for record in found if record.get("recording"))
        certificate = await self._certify(
            workspace_id, "export", number, len(found), recordings
        )
        return found, certificate

    async def erase(self, workspace_id: str, number: str) -> Certificate:
        """Delete the caller's call records and recordings; keep the totals."""
        found = await self.records(workspace_id, number)
        if any(record.get("status") != "completed" for record in found):
            # Its meter and its recorder still write to it: erased now, the
            # rest of the call would go unbilled and its recording would stay.
            raise ConflictError(
                "a call from this number is still live; erase it once it has ended"
            )
        recordings = 0
        for record in found:
            call_sid = record["call_sid"]
            if record.get("recording"):
                path = self._recording(workspace_id, record["recording"])
                if path is not None and path.exists():
                    path.unlink()
                    recordings += 1
            async with self._store.pipeline(transaction=True) as pipe:
                pipe.delete(keyspace.call(workspace_id, call_sid))
                pipe.zrem(keyspace.calls(workspace_id), call_sid)
                pipe.zrem(keyspace.unreconciled(workspace_id), call_sid)
                await pipe.execute()
        return await self._certify(
            workspace_id, "erase", number, len(found), recordings
        )

    async def certificates(self, workspace_id: str) -> list[Certificate]:
        """The workspace's data-subject certificates, newest first."""
        raw = await self._store.xrevrange(keyspace.subject_certificates(workspace_id))
        return [
            _certificate(text(entry_id), text_map(fields or {}))
            for entry_id, fields in raw or []
        ]

    def _recording(self, workspace_id: str, relative: str) -> Path | None:
        directory = (self._data_dir / "workspaces" / workspace_id).resolve()
        path = (directory / relative).resolve()
        # A record names its recording relative to its own workspace only.
        return path if path.is_relative_to(directory) else None

    async def _certify(
        self, workspace_id: str, kind: Kind, number: str, records: int, recordings: int
    ) -> Certificate:
        at_ms = now_ms()
        fields: dict[Any, Any] = {
            "kind": kind,
            "subject_digest": self.digest(number),
            "at_ms": at_ms,
            "call_records": records,
            "recordings": recordings,
        }
        entry_id = await self._store.xadd(
            keyspace.subject_certificates(workspace_id), fields
        )
        return _certificate(text(entry_id), text_map(fields))


def _certificate(entry_id: str, fields: dict[str, str]) -> Certificate:
    return Certificate(
        id=entry_id,
        kind="erase" if fields["kind"] == "erase" else "export",
        subject_digest=fields["subject_digest"],
        at_ms=int(fields["at_ms"]),
        call_records=int(fields["call_records"]),
        recordings=int(fields["recordings"]),
    )
