"""The ``callgate`` operator subcommands against a running Callgate."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from metering.ledger import month_of
from router.cli import main
from tenancy import manage
from tenancy.workspaces import now_ms
from tests.harness import Harness

NUMBER = "+15005550101"
CALLER = "+14155550123"


@dataclass
class Run:
    """What one ``callgate`` invocation returned and printed."""

    status: int
    out: str
    err: str

    def json(self) -> Any:
        """Stdout decoded, for ``--json`` runs that must have succeeded."""
        assert self.status == 0, self.err
        return json.loads(self.out)


class Cli:
    """Runs ``callgate`` the way a shell would, against one server."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        self.printed: list[str] = []

    async def __call__(self, *argv: str) -> Run:
        """Run ``callgate *argv`` and capture what it printed."""
        # main() runs its own event loop, so it needs a thread of its own
        # while this loop keeps serving the API it talks to.
        status = await asyncio.to_thread(main, list(argv))
        captured = self._capsys.readouterr()
        self.printed += [captured.out, captured.err]
        return Run(status, captured.out, captured.err)

    async def ok(self, *argv: str) -> Run:
        """Run a command that must succeed."""
        run = await self(*argv)
        assert run.status == 0, run.err
        assert run.err == ""
        return run


@pytest.fixture
def cli(
    callgate: Harness,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Cli:
    """``callgate`` pointed at the harness through its environment variables."""
    monkeypatch.setenv("CALLGATE_URL", callgate.base_url)
    monkeypatch.setenv("CALLGATE_OPERATOR_KEY", callgate.settings.operator_key)
    monkeypatch.setenv("CALLGATE_DATA_DIR", str(tmp_path / "cli-data"))
    return Cli(capsys)


def table_rows(text: str) -> list[list[str]]:
    """A printed table split into cells, header first."""
    return [line.split("  ") for line in text.splitlines() if line]


def cells(text: str) -> list[list[str]]:
    """A printed table's cells with the padding removed."""
    return [[cell.strip() for cell in row if cell.strip()] for row in table_rows(text)]


def unused_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def new_workspace(cli: Cli, name: str) -> str:
    """Create a workspace through the command; return its id."""
    created = (await cli.ok("workspace", "create", name, "--json")).json()
    workspace_id: str = created["id"]
    return workspace_id


async def test_workspace_create_and_list_print_tables_and_json(
    cli: Cli, callgate: Harness
) -> None:
    """A created workspace is listed in a table, and --json is the API's answer."""
    created = await cli.ok("workspace", "create", "Smile Dental")
    header, row = cells(created.out)
    assert header == ["ID", "NAME", "STATUS", "CREATED"]
    workspace_id = row[0]
    assert row[1:3] == ["Smile Dental", "active"]

    listed = await cli.ok("workspace", "list")
    assert cells(listed.out) == [header, row]
    header_line = listed.out.splitlines()[0]
    assert header_line.index("NAME") == listed.out.splitlines()[1].index("Smile")

    status, expected = await callgate.api("GET", "/workspaces")
    assert status == 200
    assert (await cli.ok("workspace", "list", "--json")).json() == expected
    shown = (await cli.ok("workspace", "show", workspace_id, "--json")).json()
    assert shown == expected["items"][0]


async def test_workspace_suspend_and_resume_change_its_status(cli: Cli) -> None:
    """Suspend and resume print the workspace with its new status."""
    workspace_id = await new_workspace(cli, "Acme")

    suspended = await cli.ok("workspace", "suspend", workspace_id)
    assert cells(suspended.out)[1][2] == "suspended"
    resumed = await cli.ok("workspace", "resume", workspace_id)
    assert cells(resumed.out)[1][2] == "active"
    shown = await cli.ok("workspace", "show", workspace_id)
    assert "status" in shown.out
    assert "active" in shown.out


async def test_agent_and_number_add_route_a_call_shown_in_usage_and_calls(
    cli: Cli, callgate: Harness
) -> None:
    """Agent and number added by the command carry a call that usage and calls show."""
    workspace_id = await new_workspace(cli, "Clinic")
    callgate.vapi.add_key("vapi-key-clinic")
    agent = (
        await cli.ok(
            "agent",
            "add",
            workspace_id,
            "--name",
            "Front desk",
            "--provider",
            "vapi",
            "--assistant-id",
            "assistant-clinic",
            "--api-key",
            "vapi-key-clinic",
            "--json",
        )
    ).json()
    assert agent["audio_format"] == "mulaw"
    assert "vapi-key-clinic" not in json.dumps(agent)
    agents = await cli.ok("agent", "list", workspace_id)
    assert cells(agents.out)[1][:3] == [agent["id"], "Front desk", "vapi"]

    added = await cli.ok("number", "add", workspace_id, NUMBER, "--agent", agent["id"])
    assert cells(added.out)[1][:3] == [NUMBER, workspace_id, agent["id"]]
    numbers = await cli.ok("number", "list", workspace_id)
    assert cells(numbers.out)[1][:3] == [NUMBER, workspace_id, agent["id"]]

    call, vapi_call = await callgate.connected_call(NUMBER, CALLER)
    await call.hang_up()
    await vapi_call.wait_closed(timeout_secs=5)
    await callgate.calls_settled()

    usage = await cli.ok("usage", workspace_id, "--period", month_of(now_ms()))
    assert f"workspace  {workspace_id}" in usage.out
    assert "calls      1" in usage.out
    usage_rows = cells(usage.out)
    assert ["AGENT", "SECONDS", "CALLS"] in usage_rows
    assert [NUMBER, usage_rows[-1][1], "1"] == usage_rows[-1]

    calls = await cli.ok("calls", workspace_id, "--limit", "5")
    header, row = cells(calls.out)
    assert header[:4] == ["CALL SID", "ARRIVED", "FROM", "TO"]
    assert row[0] == call.sid
    assert row[2:4] == [CALLER, NUMBER]
    listed = (await cli.ok("calls", workspace_id, "--json")).json()
    assert [record["call_sid"] for record in listed["items"]] == [call.sid]


async def test_number_move_and_remove_change_its_owner(
    cli: Cli, callgate: Harness
) -> None:
    """A number moves to another workspace's agent, then leaves it."""
    source = await callgate.tenant("source", NUMBER)
    target = await callgate.tenant("target", "+15005550102")

    moved = await cli.ok(
        "number",
        "move",
        source.workspace_id,
        NUMBER,
        "--to",
        target.workspace_id,
        "--agent",
        target.agent_id,
    )
    assert cells(moved.out)[1][:3] == [NUMBER, target.workspace_id, target.agent_id]

    removed = await cli.ok("number", "remove", target.workspace_id, NUMBER)
    assert removed.out == "number remove: done\n"
    numbers = (await cli.ok("number", "list", target.workspace_id, "--json")).json()
    assert [item["number"] for item in numbers["items"]] == ["+15005550102"]


async def test_plan_set_and_show_print_the_plan(cli: Cli, callgate: Harness) -> None:
    """Plan set sends the given fields, and show prints the stored plan."""
    workspace_id = await new_workspace(cli, "Planned")

    put = await cli.ok(
        "plan",
        "set",
        workspace_id,
        "--included-minutes",
        "100",
        "--overage",
        "minutes",
        "--overage-limit",
        "20",
        "--max-concurrent",
        "3",
        "--timezone",
        "Europe/Paris",
        "--billing-increment",
        "six_seconds",
    )
    assert "included_minutes                 100" in put.out
    assert "hard_cap_ms                      7200000" in put.out

    shown = await cli.ok("plan", "show", workspace_id)
    assert shown.out == put.out
    plan = (await cli.ok("plan", "show", workspace_id, "--json")).json()
    assert plan == (await callgate.api("GET", f"/workspaces/{workspace_id}/plan"))[1]
    assert (plan["timezone"], plan["max_concurrent_calls"]) == ("Europe/Paris", 3)
    assert plan["billing_increment"] == "six_seconds"


async def test_keys_create_prints_a_token_that_opens_the_api(
    cli: Cli, callgate: Harness
) -> None:
    """The token printed once opens the API until the key is revoked."""
    workspace_id = await new_workspace(cli, "Keyed")

    created = await cli.ok(
        "keys", "create", workspace_id, "--role", "viewer", "--name", "dashboard"
    )
    lines = created.out.splitlines()
    token = lines[lines.index("token (shown only this once; store it now):") + 1]
    key_id = cells(created.out)[1][0]
    status, _ = await callgate.api("GET", f"/workspaces/{workspace_id}", key=token)
    assert status == 200

    listed = await cli.ok("keys", "list", workspace_id)
    assert cells(listed.out)[1][:3] == [key_id, "viewer", "dashboard"]
    assert token not in listed.out

    await cli.ok("keys", "revoke", workspace_id, key_id)
    status, _ = await callgate.api("GET", f"/workspaces/{workspace_id}", key=token)
    assert status == 401


async def test_invalid_number_exits_1_naming_the_field(cli: Cli) -> None:
    """A 422 problem is one line on stderr that names the field, and exit 1."""
    workspace_id = await new_workspace(cli, "Invalid")

    run = await cli(
        "number", "add", workspace_id, "555-0100", "--agent", "ag_" + "a" * 16
    )
    assert run.status == 1
    assert run.out == ""
    assert run.err.startswith("callgate: 422 invalid input: number: ")
    assert run.err.count("\n") == 1


async def test_unknown_workspace_exits_1_with_not_found(cli: Cli) -> None:
    """A 404 problem is reported with its status and title."""
    run = await cli("plan", "show", "ws_" + "a" * 16)
    assert (run.status, run.out) == (1, "")
    assert run.err == "callgate: 404 not found: no such resource\n"


async def test_unreachable_url_exits_1(cli: Cli) -> None:
    """A server that does not answer is named on stderr, and exit 1."""
    url = unused_url()
    run = await cli("workspace", "list", "--url", url)
    assert run.status == 1
    assert run.err.startswith(f"callgate: cannot reach {url}: ")


async def test_operator_key_is_read_from_the_data_dir(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, callgate: Harness
) -> None:
    """Without --key or the variable, the key comes from the data dir's file."""
    monkeypatch.delenv("CALLGATE_OPERATOR_KEY")
    missing = await cli("workspace", "list")
    assert missing.status == 2
    assert "no operator key" in missing.err

    data_dir = tmp_path / "cli-data"
    data_dir.mkdir()
    (data_dir / "operator_key").write_text(callgate.settings.operator_key + "\n")
    listed = await cli.ok("workspace", "list", "--json")
    assert listed.json() == {"items": []}


async def test_operator_key_never_appears_in_output(
    cli: Cli, callgate: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No output of any command, failed or not, carries the operator key."""
    key = callgate.settings.operator_key
    workspace_id = await new_workspace(cli, "Secretive")
    await cli.ok("workspace", "list")
    await cli.ok("workspace", "show", workspace_id, "--json")
    await cli.ok("keys", "create", workspace_id, "--role", "admin", "--name", "ops")
    await cli.ok("workspace", "list", "--key", key)
    await cli("number", "add", workspace_id, "bad", "--agent", "ag_x", "--key", key)
    await cli("workspace", "list", "--url", unused_url(), "--key", key)
    monkeypatch.setenv("CALLGATE_OPERATOR_KEY", key[::-1])
    refused = await cli("workspace", "list")
    assert refused.err.startswith("callgate: 401 unauthorized")

    assert len(cli.printed) == 16
    assert all(key not in text and key[::-1] not in text for text in cli.printed)


def test_plan_set_without_included_minutes_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A missing required option exits 2 with argparse's usage message."""
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "set", "ws_" + "a" * 16])
    assert exit_info.value.code == 2
    assert "--included-minutes" in capsys.readouterr().err


async def test_error_that_is_not_a_problem_reports_its_status(
    cli: Cli, callgate: Harness
) -> None:
    """An error page that is no problem document still gives one line and exit 1."""
    run = await cli("workspace", "list", "--url", f"{callgate.base_url}/elsewhere")
    assert (run.status, run.out) == (1, "")
    assert run.err == "callgate: 404 not found\n"


async def test_workspace_offboard_keeps_a_number_and_deletes_the_rest(
    cli: Cli, callgate: Harness
) -> None:
    """Offboard sends what to do with each number; offboarding shows the result."""
    tenant = await callgate.tenant("leaving", NUMBER)
    _, workspace = await callgate.api("GET", f"/workspaces/{tenant.workspace_id}")

    started = await cli.ok(
        "offboard",
        tenant.workspace_id,
        "--grace",
        "0",
        "--keep",
        f"{NUMBER}=2027-01-31",
    )
    assert "running" in started.out
    await callgate.app[manage.OFFBOARDING].wait(tenant.workspace_id)
    state = (
        await cli.ok("workspace", "offboarding", tenant.workspace_id, "--json")
    ).json()
    assert state["status"] == "done", state
    assert state["numbers"] == {
        NUMBER: {"action": "keep", "status": "done", "until": "2027-01-31"}
    }
    status, _ = await callgate.api("GET", f"/workspaces/{tenant.workspace_id}")
    assert status == 404
    # A kept number stays in the subaccount, which stays open for the port-out.
    subaccount = workspace["twilio_account_sid"]
    assert callgate.twilio_rest.account_status(subaccount) == "active"


async def test_webhook_set_show_and_remove_for_one_workspace_and_for_all(
    cli: Cli,
) -> None:
    """The secret is printed once; show never prints it; remove ends it."""
    workspace_id = await new_workspace(cli, "Hooked")
    url = "https://hooks.example.com/budget"
    created = await cli.ok("webhook", "set", url, "--workspace", workspace_id)
    secret = dict(line.split(None, 1) for line in created.out.splitlines())["secret"]
    assert secret.startswith("whsec_")
    shown = (
        await cli.ok("webhook", "show", "--workspace", workspace_id, "--json")
    ).json()
    assert (shown["scope"], shown["url"], shown["secret"]) == ("workspace", url, None)
    assert shown["delivery"]["pending"] == 0
    assert (
        secret not in (await cli.ok("webhook", "show", "--workspace", workspace_id)).out
    )

    everyone = (await cli.ok("webhook", "set", url + "/all", "--json")).json()
    assert (everyone["scope"], everyone["workspace_id"]) == ("operator", None)
    assert everyone["secret"].startswith("whsec_")
    rotated = (
        await cli.ok("webhook", "set", url + "/all", "--rotate-secret", "--json")
    ).json()
    assert rotated["secret"] not in (None, everyone["secret"])

    events = await cli.ok("budget-events", workspace_id)
    assert cells(events.out) == [["ID", "TYPE", "AT", "USED MS", "DELIVERED TO"]]

    removed = await cli.ok("webhook", "remove", "--workspace", workspace_id)
    assert removed.out.strip() == "webhook remove: done"
    gone = await cli("webhook", "show", "--workspace", workspace_id)
    assert gone.status == 1
    await cli.ok("webhook", "remove")


async def test_plan_update_changes_only_the_options_given(
    cli: Cli, callgate: Harness
) -> None:
    """``plan update`` keeps what it is not told; ``plan set`` resets it."""
    workspace_id = await new_workspace(cli, "Patched")
    await cli.ok(
        "plan",
        "set",
        workspace_id,
        "--included-minutes",
        "100",
        "--max-concurrent",
        "3",
    )
    updated = (
        await cli.ok(
            "plan", "update", workspace_id, "--timezone", "Asia/Tokyo", "--json"
        )
    ).json()
    assert (updated["included_minutes"], updated["max_concurrent_calls"]) == (100, 3)
    assert updated["timezone"] == "Asia/Tokyo"
    # A change the plan rejects names its field and leaves the plan as it was.
    run = await cli("plan", "update", workspace_id, "--overage-limit", "5")
    assert run.status == 1
    assert "overage_limit" in run.err
    shown = (await cli.ok("plan", "show", workspace_id, "--json")).json()
    assert shown == updated
    replaced = (
        await cli.ok("plan", "set", workspace_id, "--included-minutes", "50", "--json")
    ).json()
    assert (replaced["max_concurrent_calls"], replaced["timezone"]) == (1, "UTC")
    _, entries = await callgate.api("GET", f"/workspaces/{workspace_id}/audit")
    assert "plan.update" in [entry["action"] for entry in entries["items"]]


async def test_policy_agent_route_rotate_and_audit_commands(
    cli: Cli, callgate: Harness
) -> None:
    """The workspace policy, an agent, a number's route and a key, from the shell."""
    tenant = await callgate.tenant("alpha", NUMBER)
    workspace_id = tenant.workspace_id

    policy = (
        await cli.ok(
            "workspace",
            "policy",
            workspace_id,
            "--fallback-number",
            "+15005550199",
            "--transfer-number",
            "+15005550198",
            "--transfer-number",
            "+15005550197",
            "--no-recording",
            "--outage",
            "terminate",
            "--json",
        )
    ).json()
    assert policy["fallback_number"] == "+15005550199"
    assert policy["transfer_numbers"] == ["+15005550198", "+15005550197"]
    assert (policy["recording"], policy["outage"]) == (False, "terminate")
    assert policy["name"] == "alpha"
    cleared = await cli.ok(
        "workspace", "policy", workspace_id, "--fallback-number", "none", "--json"
    )
    assert cleared.json()["fallback_number"] is None
    assert cleared.json()["outage"] == "terminate"

    callgate.vapi.add_key("vapi-key-second")
    second = (
        await cli.ok(
            "agent",
            "add",
            workspace_id,
            "--name",
            "Night desk",
            "--provider",
            "vapi",
            "--assistant-id",
            "assistant-night",
            "--api-key",
            "vapi-key-second",
            "--json",
        )
    ).json()
    renamed = await cli.ok(
        "agent", "update", workspace_id, second["id"], "--name", "Late desk"
    )
    assert cells(renamed.out)[1][:3] == [second["id"], "Late desk", "vapi"]

    routed = await cli.ok(
        "number", "route", workspace_id, NUMBER, "--agent", second["id"]
    )
    assert cells(routed.out)[1][:3] == [NUMBER, workspace_id, second["id"]]
    call, vapi_call = await callgate.connected_call(NUMBER, CALLER)
    assert vapi_call.request_json["assistantId"] == "assistant-night"
    assert vapi_call.api_key == "vapi-key-second"
    await call.hang_up()
    await callgate.calls_settled()

    created = (
        await cli.ok(
            "keys",
            "create",
            workspace_id,
            "--role",
            "viewer",
            "--name",
            "dash",
            "--json",
        )
    ).json()
    rotated = await cli.ok("keys", "rotate", workspace_id, created["id"])
    lines = rotated.out.splitlines()
    token = lines[lines.index("token (shown only this once; store it now):") + 1]
    status, _ = await callgate.api("GET", f"/workspaces/{workspace_id}", key=token)
    assert status == 200
    status, _ = await callgate.api(
        "GET", f"/workspaces/{workspace_id}", key=created["token"]
    )
    assert status == 401

    audit = await cli.ok("audit", workspace_id)
    header, *rows = cells(audit.out)
    assert header == ["AT", "ACTOR", "ACTION", "TARGET", "DETAIL"]
    actions = [row[2] for row in rows]
    for action in ("key.rotate", "number.route", "agent.update", "workspace.update"):
        assert action in actions, (action, actions)
    assert token not in audit.out
