"""Offboarding a workspace: one resumable operation from suspension to certificate.

Steps, each idempotent, with the state kept outside the workspace (it is
deleted on the way):

1. suspend: new calls hear the workspace's goodbye; live calls get a grace
   period, then are hung up through Twilio;
2. export: one archive (calls.csv, usage.json, statement.json and .html,
   config.json without secrets, budget_events.json, audit.jsonl, recordings),
   its SHA-256 kept;
3. numbers: each released, transferred to an account the client names, or
   kept (for a port-out), through Twilio's REST API;
4. revoke: every workspace key, and the subaccount's stored credentials;
5. delete: every key of the workspace, its files, its index entries, then
   its Twilio subaccount if Callgate made it and no number is kept in it;
6. certificate: counts, times and the export's hash; no personal data.

Running it again after any interruption resumes at the first unfinished step.
One process runs it at a time, under a lease in ``cg:{offboarding}:leases``
(in the states' hash slot, so the fenced save works on a Redis Cluster);
every process looks every half lease for offboardings whose runner died.
Such a look carries on only a run still ``running`` once it holds the lease:
a paused or failed run waits for the operator, whose resume (``amend``) is
the one thing that sets it running again.
A number operation records its intent before Twilio is asked, and a resumed
run checks Twilio's state with a read before acting, so no irreversible
operation is sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import hashlib
import html
import io
import secrets
import shutil
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import redis.asyncio as redis

from metering.budget_events import all_events
from metering.ledger import Ledger
from metering.plans import period_of
from metering.quota import Quota
from tenancy import keyspace
from tenancy.api import (
    agent_document,
    call_document,
    number_document,
    usage_document,
    workspace_document,
)
from tenancy.audit import Audit
from tenancy.errors import (
    ConflictError,
    InvalidInputError,
    StoreError,
    TwilioActionError,
    UnknownNumberError,
    WorkspaceNotFoundError,
)
from tenancy.keys import Keys
from tenancy.logs import tenancy_logger
from tenancy.numbers import Numbers
from tenancy.replies import Store, text, text_map, text_or_none, texts
from tenancy.twilio_api import TwilioApi, TwilioApiError
from tenancy.workspaces import Workspaces, now_ms

STEPS = ("suspend", "export", "numbers", "revoke", "delete", "certificate")
Action = Literal["release", "transfer", "keep"]
# How often a grace period looks for calls still running.
_GRACE_CHECK_SECS = 0.5
# How long hung-up calls get to settle before the export goes ahead anyway.
_SETTLE_MS = 30_000


class Offboarding:
    """Runs and resumes workspace offboardings."""

    def __init__(
        self,
        store: Store,
        workspaces: Workspaces,
        numbers: Numbers,
        ledger: Ledger,
        quota: Quota,
        keys: Keys,
        audit: Audit,
        twilio: TwilioApi,
        data_dir: Path,
        lease_ms: int = 10_000,
        export_retention_days: int = 30,
    ) -> None:
        self._store = store
        self._workspaces = workspaces
        self._number_book = numbers
        self._ledger = ledger
        self._quota = quota
        self._keys = keys
        self._audit = audit
        self._twilio = twilio
        self._data_dir = data_dir
        self._tasks: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._lease_ms = lease_ms
        self._retention_ms = export_retention_days * 86_400_000
        # This process's name on the leases it holds.
        self._token = secrets.token_hex(8)
        self._take_lease = store.register_script(_TAKE_LEASE)
        self._drop_lease = store.register_script(_DROP_LEASE)
        self._save_fenced = store.register_script(_SAVE_FENCED)
        self._replace = store.register_script(_REPLACE)
        self._watcher: asyncio.Task[None] | None = None
        # Offboardings this process runs under its lease: their saves are fenced.
        self._leased: set[str] = set()

    def start(self, workspace_id: str) -> None:
        """Run the offboarding in the background unless it already runs here."""
        task = self._tasks.get(workspace_id)
        if task is not None and not task.done():
            return
        task = asyncio.create_task(self.run(workspace_id))
        self._tasks[workspace_id] = task
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[dict[str, Any]]) -> None:
        for workspace_id, running in list(self._tasks.items()):
            if running is task:
                del self._tasks[workspace_id]
                if not task.cancelled() and task.exception() is not None:
                    # The type only: a message could quote a credential.
                    tenancy_logger.error(
                        "offboarding %s stopped on %s; the watcher retries it",
                        workspace_id,
                        type(task.exception()).__name__,
                    )

    async def wait(self, workspace_id: str) -> None:
        """Wait for this process's run of an offboarding, if there is one."""
        task = self._tasks.get(workspace_id)
        if task is not None:
            await asyncio.shield(task)

    async def resume_interrupted(self) -> list[str]:
        """Restart every offboarding a stopped process left running.

        The state read here may be stale by the time the run holds the lease
        (its runner may have paused it meanwhile): the run reads it again
        under the lease and goes on only if it is still ``running``.
        """
        resumed = []
        for workspace_id, raw in text_map(
            await self._store.hgetall(keyspace.OFFBOARDINGS)
        ).items():
            if orjson.loads(raw).get("status") == "running":
                self.start(workspace_id)
                resumed.append(workspace_id)
        return resumed

    def watch(self) -> None:
        """Resume, every half lease, offboardings whose process stopped holding them.

        A process that dies mid-run leaves its lease to expire; the next look
        after that, by any process, carries the offboarding on.
        """
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="offboardings")

    @property
    def watching(self) -> bool:
        """Whether this process's watcher is running."""
        return self._watcher is not None and not self._watcher.done()

    async def _watch(self) -> None:
        # Nothing but a cancellation ends this loop: without it this process
        # would never again resume a run, prune an export or release a number.
        next_prune = 0.0
        while True:
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + _PRUNE_EVERY_SECS
                try:
                    self.prune_exports(now_ms())
                    await self.release_kept(now_ms())
                except (StoreError, redis.RedisError):
                    tenancy_logger.warning("could not release kept numbers; later")
                except Exception as exc:  # noqa: BLE001 (the watcher must go on)
                    tenancy_logger.error(
                        "offboarding watcher failed on %s; it goes on",
                        type(exc).__name__,
                    )
            await asyncio.sleep(self._lease_ms / 2000)
            try:
                await self.resume_interrupted()
            except (StoreError, redis.RedisError):
                tenancy_logger.warning("could not look for interrupted offboardings")
            except Exception as exc:  # noqa: BLE001 (the watcher must go on)
                tenancy_logger.error(
                    "offboarding watcher failed on %s; it goes on", type(exc).__name__
                )

    async def release_kept(self, at_ms: int) -> list[str]:
        """Release kept numbers whose port-out date is past; return which.

        A number kept ``until`` a date waits in its account to the end of that
        day (UTC). One still there afterwards was not ported out: it is
        released, so it stops costing its monthly fee, and when no kept number
        is left the subaccount Callgate made is closed and the certificate
        says so. Numbers gone by then were ported; that is recorded too.

        Each offboarding is handled on its own, oldest first, under its lease
        (renewed meanwhile): one that fails, Twilio refusing or its lease
        taken, is logged and left for the next look, and the others go on.
        """
        today = datetime.fromtimestamp(at_ms / 1000, UTC).date().isoformat()
        released: list[str] = []
        states = [
            orjson.loads(raw)
            for raw in text_map(
                await self._store.hgetall(keyspace.OFFBOARDINGS)
            ).values()
        ]
        states.sort(key=lambda state: (state["started_at_ms"], state["workspace_id"]))
        for state in states:
            if state.get("status") != "done" or not _due(state, today):
                continue
            workspace_id = state["workspace_id"]
            try:
                await self._release_leased(workspace_id, today, released)
            except LeaseLostError:
                tenancy_logger.warning(
                    "offboarding %s was taken over while releasing kept numbers",
                    workspace_id,
                )
            except Exception as exc:  # noqa: BLE001 (one workspace's error stays its own)
                # The type only: a message could quote a credential.
                tenancy_logger.warning(
                    "offboarding %s: could not release kept numbers (%s); later",
                    workspace_id,
                    type(exc).__name__,
                )
        return released

    async def _release_leased(
        self, workspace_id: str, today: str, released: list[str]
    ) -> None:
        """Release one offboarding's due numbers under its lease, if it is free."""
        # Under the offboarding's lease, so two processes never both act.
        if not await self._lease(workspace_id):
            return
        keeper = asyncio.create_task(self._keep_lease(workspace_id, None))
        self._leased.add(workspace_id)
        try:
            # Read again under the lease: another process may have done it.
            state = await self.state(workspace_id)
            if state is not None and state["status"] == "done":
                await self._release_due(workspace_id, state, today, released)
        finally:
            self._leased.discard(workspace_id)
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            try:
                await self._drop_lease(
                    keys=[keyspace.OFFBOARDING_LEASES], args=[workspace_id, self._token]
                )
            except (StoreError, redis.RedisError):
                tenancy_logger.warning("could not give back an offboarding lease")

    async def _release_due(
        self, workspace_id: str, state: dict[str, Any], today: str, released: list[str]
    ) -> None:
        """Release the due numbers of one offboarding, adding each to ``released``.

        Every save is fenced by the lease, and the intent to release is saved
        before Twilio is asked: after a crash, a number gone from its account
        is known to be our release, not a port-out.
        """
        count = len(released)
        accounts: dict[str, str | None] = state.get("kept_accounts", {})
        for e164, outcome in state["numbers"].items():
            if not _kept_past(outcome, today):
                continue
            account = accounts.get(e164) or state["subaccount"]
            number_sid = None
            if account:
                number_sid = await self._twilio.find_number(account, e164)
            if account and number_sid is not None:
                outcome["releasing"] = True
                await self._save(state)
                await self._twilio.release_number(account, number_sid)
                released.append(e164)
                expired = "released"
            else:
                # Gone from its account: our own release if we meant it.
                expired = "released" if outcome.get("releasing") else "ported"
            outcome.pop("releasing", None)
            outcome["expired"] = expired
            outcome["expired_at_ms"] = now_ms()
            await self._save(state)
        subaccount = state["subaccount"]
        still_kept = any(
            o["action"] == "keep" and "expired" not in o
            for o in state["numbers"].values()
        )
        if subaccount and not still_kept and state.get("subaccount_closed") is None:
            await self._twilio.close_account(subaccount)
            state["subaccount_closed"] = now_ms()
            await self._save(state)
            certificate = await self.certificate(workspace_id)
            if certificate is not None:
                certificate["subaccount_closed"] = True
                await self._store.hset(
                    keyspace.CERTIFICATES, workspace_id, orjson.dumps(certificate)
                )
        tenancy_logger.info(
            "offboarding %s: released %d kept number(s) past their date",
            workspace_id,
            len(released) - count,
        )

    def prune_exports(self, at_ms: int) -> list[str]:
        """Delete the export archives older than the retention; return whose."""
        if self._retention_ms == 0:
            return []
        pruned = []
        folder = self._data_dir / "exports"
        for path in sorted(folder.glob("*.zip")) if folder.is_dir() else []:
            try:
                written_ms = path.stat().st_mtime_ns // 1_000_000
                if at_ms - written_ms > self._retention_ms:
                    path.unlink()
                    pruned.append(path.stem)
            except OSError:
                tenancy_logger.warning("could not prune export %s", path.name)
        if pruned:
            tenancy_logger.info("deleted %d export(s) past retention", len(pruned))
        return pruned

    async def close(self) -> None:
        """Stop background runs; their state lets the next process resume them."""
        tasks: list[asyncio.Task[Any]] = [*self._tasks.values()]
        if self._watcher is not None:
            tasks.append(self._watcher)
            self._watcher = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _lease(self, workspace_id: str) -> bool:
        """Take or renew this process's lease on the offboarding; False if another's."""
        taken = await self._take_lease(
            keys=[keyspace.OFFBOARDING_LEASES],
            args=[workspace_id, self._token, now_ms(), self._lease_ms],
        )
        return bool(taken)

    async def _keep_lease(
        self, workspace_id: str, run: asyncio.Task[Any] | None
    ) -> None:
        """Renew the lease every third of its time; stop the run if it is lost."""
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                held = await self._lease(workspace_id)
            except (StoreError, redis.RedisError):
                continue  # renewed at the next try, unless another took it meanwhile
            if not held:
                tenancy_logger.warning(
                    "offboarding %s was taken over by another process", workspace_id
                )
                if run is not None:
                    run.cancel()
                return

    def export_path(self, workspace_id: str) -> Path:
        """Where a workspace's export archive is kept; it outlives the workspace."""
        keyspace.check(keyspace.WORKSPACE_ID, workspace_id, "workspace_id")
        return self._data_dir / "exports" / f"{workspace_id}.zip"

    async def state(self, workspace_id: str) -> dict[str, Any] | None:
        """The offboarding's state, or None if it never started."""
        raw = text_or_none(await self._store.hget(keyspace.OFFBOARDINGS, workspace_id))
        return None if raw is None else dict(orjson.loads(raw))

    async def certificate(self, workspace_id: str) -> dict[str, Any] | None:
        """The deletion certificate of an offboarded workspace."""
        raw = text_or_none(await self._store.hget(keyspace.CERTIFICATES, workspace_id))
        return None if raw is None else dict(orjson.loads(raw))

    async def begin(
        self,
        workspace_id: str,
        numbers: dict[str, dict[str, str]],
        grace_secs: int,
        pause_after: str | None = None,
    ) -> dict[str, Any]:
        """Start an offboarding, or return the one already under way.

        ``pause_after`` names a step after which the run stops, paused, until
        it is resumed: to review the export before anything is released, say.
        """
        existing = await self.state(workspace_id)
        if existing is not None:
            return existing
        workspace = await self._workspaces.get(workspace_id)
        check_targets(numbers, workspace.twilio_account_sid)
        state: dict[str, Any] = {
            "workspace_id": workspace_id,
            "status": "running",
            "started_at_ms": now_ms(),
            "grace_secs": grace_secs,
            "pause_after": pause_after,
            "subaccount": workspace.twilio_account_sid,
            "requested_numbers": numbers,
            "steps": {},
            "numbers": {},
        }
        await self._save(state)
        return state

    async def amend(
        self,
        workspace_id: str,
        numbers: dict[str, dict[str, str]],
        pause_after: str | None,
    ) -> dict[str, Any]:
        """An operator's resume of a paused or failed run; returns its state.

        Sets the next pause and the fate of numbers not handled yet, and marks
        the run ``running`` again: nothing else turns a stopped run back on.
        The state is written only if it is still the one read, so a resume
        that raced another's (or a run's save) reads again rather than
        overwrite it. A number whose Twilio operation already happened keeps
        its recorded fate; asking another for it is refused.
        """
        for _ in range(_AMEND_TRIES):
            raw = text_or_none(
                await self._store.hget(keyspace.OFFBOARDINGS, workspace_id)
            )
            if raw is None:
                raise WorkspaceNotFoundError(workspace_id)
            state: dict[str, Any] = orjson.loads(raw)
            if state["status"] not in ("paused", "failed"):
                return state  # resumed by someone else meanwhile, or done
            check_targets(numbers, state["subaccount"])
            changed = {
                e164: wish
                for e164, wish in numbers.items()
                if wish != state["requested_numbers"].get(e164, _DEFAULT_WISH)
            }
            for e164 in changed:
                if await self._handled(workspace_id, state, e164):
                    action = state["numbers"][e164]["action"]
                    raise ConflictError(
                        f"{e164}: its {action} has already happened and cannot change"
                    )
            for e164, wish in changed.items():
                state["requested_numbers"][e164] = wish
                state["numbers"].pop(e164, None)
                state.get("kept_accounts", {}).pop(e164, None)
            state["pause_after"] = pause_after
            state["status"] = "running"
            state.pop("error", None)
            if await self._replace(
                keys=[keyspace.OFFBOARDINGS],
                args=[workspace_id, raw, orjson.dumps(state)],
            ):
                return state
        raise ConflictError("the offboarding kept changing meanwhile; try again")

    async def _handled(
        self, workspace_id: str, state: dict[str, Any], e164: str
    ) -> bool:
        """Whether the number's recorded fate is final: Twilio has acted on it.

        A pending outcome is an intent saved before Twilio was asked, so
        Twilio is asked: a number still in its account was not acted on.
        """
        outcome = state["numbers"].get(e164)
        if outcome is None:
            return False
        if outcome["status"] == "done":
            return True
        accounts = {
            number.e164: number.twilio_account_sid
            for number in await self._number_book.of_workspace(workspace_id)
        }
        if e164 not in accounts:
            return True  # detached, which follows the Twilio operation
        account = accounts[e164]
        if outcome["action"] == "keep" or account is None:
            return False  # nothing is asked of Twilio for these
        try:
            return await self._twilio.find_number(account, e164) is None
        except TwilioApiError as exc:
            raise TwilioActionError(
                f"could not ask Twilio about {e164}: {exc}"
            ) from exc

    async def run(self, workspace_id: str) -> dict[str, Any]:
        """Run every unfinished step; on failure the state says where it stopped.

        Only the process holding the offboarding's lease runs it; another
        returns the state as it stands. The lease is renewed while the run
        goes on and given back when it ends, and every save of the run is
        refused once the lease is someone else's. A state not ``running``
        under the lease (paused, failed or done) is returned as it is: a
        stopped run goes on only after ``amend``.
        """
        if not await self._lease(workspace_id):
            tenancy_logger.info("offboarding %s runs in another process", workspace_id)
            state = await self.state(workspace_id)
            if state is None:
                raise WorkspaceNotFoundError(workspace_id)
            return state
        keeper = asyncio.create_task(
            self._keep_lease(workspace_id, asyncio.current_task())
        )
        self._leased.add(workspace_id)
        try:
            return await self._run_steps(workspace_id)
        except LeaseLostError:
            # Another process holds the lease now: this run must not go on.
            tenancy_logger.warning(
                "offboarding %s was taken over by another process", workspace_id
            )
            return await self.state(workspace_id) or {}
        finally:
            self._leased.discard(workspace_id)
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            try:
                await self._drop_lease(
                    keys=[keyspace.OFFBOARDING_LEASES], args=[workspace_id, self._token]
                )
            except (StoreError, redis.RedisError):
                tenancy_logger.warning("could not give back an offboarding lease")

    async def _run_steps(self, workspace_id: str) -> dict[str, Any]:
        # Read under the lease: another process may have moved it on, and a
        # run paused or failed since whoever started this looked stays so
        # until an operator resumes it (amend).
        state = await self.state(workspace_id)
        if state is None:
            raise WorkspaceNotFoundError(workspace_id)
        if state["status"] != "running":
            return state
        for step in STEPS:
            if state["steps"].get(step) == "done":
                continue
            try:
                await getattr(self, f"_step_{step}")(workspace_id, state)
            except (TwilioApiError, OSError, StoreError, redis.RedisError) as exc:
                state["status"] = "failed"
                state["error"] = f"{step}: {exc}"
                tenancy_logger.warning(
                    "offboarding %s stopped at %s", workspace_id, step
                )
                try:
                    await self._save(state, final=True)
                except (StoreError, redis.RedisError):
                    # Left "running" in the store: a restart resumes it.
                    tenancy_logger.warning("could not record where it stopped")
                return state
            state["steps"][step] = "done"
            if state.get("pause_after") == step and step != STEPS[-1]:
                state["status"] = "paused"
                await self._save(state, final=True)
                return state
            await self._save(state)
        state["status"] = "done"
        state["finished_at_ms"] = now_ms()
        await self._save(state, final=True)
        return state

    async def _step_suspend(self, workspace_id: str, state: dict[str, Any]) -> None:
        await self._workspaces.set_status(workspace_id, "suspended")
        # Suspended, the workspace admits no new call: only those open now can
        # be live, so the grace period watches them rather than every record.
        open_calls = []
        for call_sid in texts(
            await self._store.zrange(keyspace.calls(workspace_id), 0, -1)
        ):
            record = await self._ledger.get_call(workspace_id, call_sid)
            if record.ended_at_ms is None:
                open_calls.append(call_sid)
        deadline = state["started_at_ms"] + state["grace_secs"] * 1000
        await self._until_no_live_calls(workspace_id, open_calls, deadline)
        for call_sid, account_sid in await self._live_calls(workspace_id, open_calls):
            try:
                await self._twilio.complete(account_sid, call_sid)
            except TwilioApiError:
                tenancy_logger.warning("could not end call %s", call_sid)
        # The calls settle (their last writes land) before anything is exported.
        await self._until_no_live_calls(workspace_id, open_calls, now_ms() + _SETTLE_MS)

    async def _until_no_live_calls(
        self, workspace_id: str, among: list[str], deadline_ms: int
    ) -> None:
        while now_ms() < deadline_ms:
            if not await self._live_calls(workspace_id, among):
                return
            await asyncio.sleep(_GRACE_CHECK_SECS)

    async def _live_calls(
        self, workspace_id: str, among: list[str]
    ) -> list[tuple[str, str]]:
        """Calls of ``among`` that started and have not ended, with their account."""
        live = []
        for call_sid in among:
            record = await self._ledger.get_call(workspace_id, call_sid)
            if record.ended_at_ms is None and record.started_at_ms is not None:
                account = record.account_sid or self._twilio.main_account_sid or ""
                live.append((call_sid, account))
        return live

    async def _step_export(self, workspace_id: str, state: dict[str, Any]) -> None:
        path = self.export_path(workspace_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        documents = await self._documents(workspace_id)
        recordings = self._data_dir / "workspaces" / workspace_id / "recordings"
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, content in documents.items():
                archive.writestr(name, content)
            if recordings.is_dir():
                for recording in sorted(recordings.iterdir()):
                    archive.write(recording, f"recordings/{recording.name}")
        partial.replace(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        state["export"] = {"sha256": digest, "bytes": path.stat().st_size}

    async def _documents(self, workspace_id: str) -> dict[str, bytes]:
        """The archive's files, each in the same shape the API answers with."""
        workspace = await self._workspaces.get(workspace_id)
        sids = texts(await self._store.zrange(keyspace.calls(workspace_id), 0, -1))
        calls = [
            call_document(await self._ledger.get_call(workspace_id, sid))
            for sid in reversed(sids)
        ]
        table = io.StringIO()
        if calls:
            writer = csv.DictWriter(table, fieldnames=list(calls[0]))
            writer.writeheader()
            writer.writerows(calls)
        plan = await self._workspaces.plan(workspace_id)
        zone = plan.timezone if plan else "UTC"
        current = period_of(now_ms(), zone).label
        prefix = keyspace.workspace_prefix(workspace_id) + ":usage:"
        periods = {
            text(name).removeprefix(prefix)
            async for name in self._store.scan_iter(
                match=keyspace.workspace_pattern(workspace_id, "usage")
            )
        }
        usage = {}
        for period in sorted(periods | {current}):
            line = await self._ledger.usage(workspace_id, period)
            billed_ms = line.ms
            if plan is not None:
                billed_ms = (await self._quota.state(workspace_id, period)).used_ms
            usage[period] = usage_document(line, plan, billed_ms)
        final = usage[current]
        config = {
            "workspace": workspace_document(workspace),
            "agents": [
                agent_document(agent)
                for agent in await self._workspaces.list_agents(workspace_id)
            ],
            "numbers": [
                number_document(number)
                for number in await self._number_book.of_workspace(workspace_id)
            ],
            "plan": dataclasses.asdict(plan) if plan else None,
            # Where its budget events went; the signing secret stays behind.
            "budget_webhook": text_or_none(
                await self._store.hget(keyspace.webhook(workspace_id), "url")
            ),
        }
        events = [
            event.document() for event in await all_events(self._store, workspace_id)
        ]
        entries = await self._audit.entries(workspace_id, limit=100_000)
        audit_lines = b"".join(
            orjson.dumps(dataclasses.asdict(entry)) + b"\n" for entry in entries
        )
        return {
            "calls.csv": table.getvalue().encode(),
            "usage.json": orjson.dumps(usage, option=orjson.OPT_INDENT_2),
            "statement.json": orjson.dumps(final, option=orjson.OPT_INDENT_2),
            "statement.html": _statement_html(workspace.name, final).encode(),
            "config.json": orjson.dumps(config, option=orjson.OPT_INDENT_2),
            "budget_events.json": orjson.dumps(events, option=orjson.OPT_INDENT_2),
            "audit.jsonl": audit_lines,
        }

    async def _step_numbers(self, workspace_id: str, state: dict[str, Any]) -> None:
        requested = state["requested_numbers"]
        for number in await self._number_book.of_workspace(workspace_id):
            outcome = state["numbers"].get(number.e164)
            if outcome is not None and outcome["status"] == "done":
                continue
            wish = requested.get(number.e164, {})
            action: Action = wish.get("action", "release")
            account = number.twilio_account_sid
            outcome = {"action": action, "status": "pending"}
            if "until" in wish:
                outcome["until"] = wish["until"]
                # Where the number waits for its port-out, for release_kept.
                state.setdefault("kept_accounts", {})[number.e164] = account
            state["numbers"][number.e164] = outcome
            await self._save(state)
            if account is not None and action != "keep":
                number_sid = await self._twilio.find_number(account, number.e164)
                # None: a run before this one already did it.
                if number_sid is not None and action == "release":
                    await self._twilio.release_number(account, number_sid)
                elif number_sid is not None:
                    target = wish.get("to_account_sid", "")
                    await self._twilio.transfer_number(account, number_sid, target)
            with contextlib.suppress(UnknownNumberError):
                await self._number_book.detach(workspace_id, number.e164)
            outcome["status"] = "done"
            await self._save(state)

    async def _step_revoke(self, workspace_id: str, state: dict[str, Any]) -> None:
        for key in await self._keys.all(workspace_id):
            await self._keys.revoke(workspace_id, key.id)
        await self._store.hdel(keyspace.workspace(workspace_id), "twilio_token")
        if state["subaccount"]:
            await self._store.hdel(keyspace.TWILIO_ACCOUNTS, state["subaccount"])

    async def _step_delete(self, workspace_id: str, state: dict[str, Any]) -> None:
        # Taking the webhook delivery lock from whoever holds it stops their
        # writes (metering.delivery writes only under its own token), so no
        # delivery record outlives the deletion.
        await self._store.set(
            keyspace.delivery_lock(workspace_id), "offboarding", px=600_000
        )
        if "deleted" not in state:
            counts: dict[str, int] = {}
            prefix = keyspace.workspace_prefix(workspace_id) + ":"
            async for name in self._store.scan_iter(
                match=keyspace.workspace_pattern(workspace_id)
            ):
                kind = text(name).removeprefix(prefix).split(":", 1)[0]
                counts[kind] = counts.get(kind, 0) + 1
            state["deleted"] = counts
            await self._save(state)
        # The lock goes last: while it stands no delivery can start and
        # write a key the scan has passed.
        lock = keyspace.delivery_lock(workspace_id)
        async for name in self._store.scan_iter(
            match=keyspace.workspace_pattern(workspace_id)
        ):
            if text(name) != lock:
                await self._store.delete(name)
        await self._store.zrem(keyspace.WORKSPACES, workspace_id)
        await self._store.zrem(keyspace.WEBHOOKS_DUE, workspace_id)
        await self._store.delete(lock)
        owned = text_map(await self._store.hgetall(keyspace.NUMBERS))
        for e164, owner in owned.items():
            if owner == workspace_id:
                await self._store.hdel(keyspace.NUMBERS, e164)
        shutil.rmtree(self._data_dir / "workspaces" / workspace_id, ignore_errors=True)
        kept = any(o["action"] == "keep" for o in state["numbers"].values())
        subaccount = state["subaccount"]
        if subaccount and not kept and state.get("subaccount_closed") is None:
            await self._twilio.close_account(subaccount)
            state["subaccount_closed"] = now_ms()

    async def _step_certificate(self, workspace_id: str, state: dict[str, Any]) -> None:
        actions: dict[str, int] = {}
        for outcome in state["numbers"].values():
            actions[outcome["action"]] = actions.get(outcome["action"], 0) + 1
        certificate = {
            "workspace_id": workspace_id,
            "started_at_ms": state["started_at_ms"],
            "deleted_at_ms": now_ms(),
            "export_sha256": state["export"]["sha256"],
            "export_bytes": state["export"]["bytes"],
            "deleted_keys": state["deleted"],
            "numbers": actions,
            "subaccount_closed": state.get("subaccount_closed") is not None,
        }
        await self._store.hset(
            keyspace.CERTIFICATES, workspace_id, orjson.dumps(certificate)
        )

    async def _save(self, state: dict[str, Any], final: bool = False) -> None:
        """Save the state, fenced by this process's lease while it holds one.

        A ``final`` save (failed, paused or done) gives the lease back in the
        same script: whoever sees the run stopped can resume it at once, even
        if this process dies before its ``finally`` drops the lease.
        """
        workspace_id = state["workspace_id"]
        if workspace_id not in self._leased:
            await self._store.hset(
                keyspace.OFFBOARDINGS, workspace_id, orjson.dumps(state)
            )
            return
        saved = await self._save_fenced(
            keys=[keyspace.OFFBOARDINGS, keyspace.OFFBOARDING_LEASES],
            args=[workspace_id, orjson.dumps(state), self._token, int(final)],
        )
        if not saved:
            raise LeaseLostError(workspace_id)


# How often the exports folder is checked for archives past their retention,
# and kept numbers for a port-out date that has passed.
_PRUNE_EVERY_SECS = 600.0


def _kept_past(outcome: dict[str, Any], today: str) -> bool:
    """A kept number whose ``until`` day is over and that nothing acted on yet."""
    until = outcome.get("until")
    return (
        outcome["action"] == "keep"
        and until is not None
        and until < today
        and "expired" not in outcome
    )


def _due(state: dict[str, Any], today: str) -> bool:
    return any(_kept_past(o, today) for o in state["numbers"].values())


# What happens to a number the operator did not name.
_DEFAULT_WISH = {"action": "release"}
# How often a resume reads the state again when it changed under it.
_AMEND_TRIES = 3


def check_targets(numbers: dict[str, dict[str, str]], subaccount: str | None) -> None:
    """Refuse a transfer to the workspace's own subaccount.

    Offboarding closes that subaccount, and Twilio releases every number
    still in it: the number would be lost, not handed over.
    """
    for e164, wish in numbers.items():
        if subaccount is not None and wish.get("to_account_sid") == subaccount:
            raise InvalidInputError(
                f"{e164}: to_account_sid is the workspace's own subaccount, which "
                "is closed with it; name the client's account"
            )


class LeaseLostError(Exception):
    """This process's lease on an offboarding passed to another process."""


# KEYS[1] the lease hash; ARGV[1] workspace id, ARGV[2] process token,
# ARGV[3] now ms, ARGV[4] lease ms. Takes a free or expired lease, or renews
# this process's own; returns 1, or 0 while another process holds it.
_TAKE_LEASE = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then
  local owner, expires = string.match(held, '^(.-):(%d+)$')
  if owner ~= ARGV[2] and tonumber(expires) > tonumber(ARGV[3]) then
    return 0
  end
end
local expires = string.format('%d', tonumber(ARGV[3]) + tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. expires)
return 1
"""
# KEYS[1] the lease hash; ARGV[1] workspace id, ARGV[2] process token.
_DROP_LEASE = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held and string.match(held, '^(.-):') == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""
# KEYS[1] the offboardings hash, KEYS[2] the lease hash; ARGV[1] workspace
# id, ARGV[2] its state as JSON, ARGV[3] process token, ARGV[4] 1 to give the
# lease back with this save. Saves only for the lease's holder.
_SAVE_FENCED = """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held or string.match(held, '^(.-):') ~= ARGV[3] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[4] == '1' then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return 1
"""
# KEYS[1] the offboardings hash; ARGV[1] workspace id, ARGV[2] the state as
# it was read, ARGV[3] the new state. Writes only over the state read;
# returns 1, or 0 if it changed meanwhile.
_REPLACE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


def _statement_html(name: str, final: dict[str, Any]) -> str:
    """The final statement as a page a client can read and print."""
    facts: dict[str, Any] = {
        "Minutes": final["seconds"] / 60,
        "Calls": final["calls"],
        "Cost to serve": final["cost_micros"] / 1_000_000,
    }
    bill = final["statement"]
    if bill is not None:
        facts.update(
            {
                "Billed minutes": bill["billed_ms"] / 60_000,
                "Included minutes": bill["included_ms"] / 60_000,
                "Overage minutes": bill["overage_ms"] / 60_000,
                f"Amount due ({bill['currency']})": bill["price_micros"] / 1_000_000,
                "Cost to serve": bill["cost_micros"] / 1_000_000,
                "Margin": bill["margin_micros"] / 1_000_000,
            }
        )
    rows = "".join(
        f"<tr><th>{html.escape(label)}</th><td>{value:,.2f}</td></tr>"
        if isinstance(value, float)
        else f"<tr><th>{html.escape(label)}</th><td>{value}</td></tr>"
        for label, value in facts.items()
    )
    title = html.escape(f"Final statement: {name}, {final['period']}")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title></head><body><h1>{title}</h1>"
        f"<table>{rows}</table></body></html>\n"
    )
