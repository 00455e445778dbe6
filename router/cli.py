"""The ``callgate`` command: ``callgate serve`` runs the server, the rest drive its API.

Every operator subcommand is one request of the operator API under ``/api/v1``
(see router.operator_client), printed as a table, or with ``--json`` exactly
as the server sent it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import uvloop
from aiohttp import web

from router.app import create_app, runner, shut_down
from router.operator_client import (
    AGENT_COLUMNS,
    AUDIT_COLUMNS,
    BUDGET_EVENT_COLUMNS,
    CALL_COLUMNS,
    KEY_COLUMNS,
    NUMBER_COLUMNS,
    WORKSPACE_COLUMNS,
    OperatorClientError,
    Render,
    Reply,
    Request,
    api_path,
    connection,
    new_key,
    record,
    row,
    rows,
    send,
    usage,
)
from router.settings import Settings, load
from tenancy import logs
from tenancy.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from typing import TypeAlias

    Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

Build = Callable[[argparse.Namespace], Request]


async def serve(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    app_runner = runner(create_app(settings))
    await app_runner.setup()
    try:
        site = web.TCPSite(app_runner, settings.host, settings.port)
        await site.start()
        print(
            f"callgate: serving on http://{settings.host}:{settings.port} "
            f"(public URL {settings.public_url})",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
    finally:
        await shut_down(app_runner)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``callgate`` console script."""
    args = parser().parse_args(argv)
    if args.command == "serve":
        return run_server()
    return run_operator_command(args)


def run_server() -> int:
    """``callgate serve``: settings from CALLGATE_*, then serve until signalled."""
    try:
        settings = load()
    except ConfigError as exc:
        print(f"callgate: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    for path in settings.generated_key_files:
        print(
            f"callgate: generated a new {path.name.replace('_', ' ')} in {path}",
            file=sys.stderr,
        )
    if not settings.twilio_auth_token and settings.verify_signatures:
        print(
            "callgate: CALLGATE_TWILIO_AUTH_TOKEN is not set; Twilio webhooks "
            "will be refused until it is",
            file=sys.stderr,
        )
    try:
        uvloop.run(serve(settings))
    except StoreError as exc:
        print(f"callgate: store failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"callgate: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


def run_operator_command(args: argparse.Namespace) -> int:
    """Send the subcommand's request and print the answer; 1 when it fails.

    Exits 2, like a usage error, when there is no operator key to send.
    """
    try:
        target = connection(args.url, args.key, os.environ)
    except OperatorClientError as exc:
        print(f"callgate: {exc}", file=sys.stderr)
        return 2
    build: Build = args.build
    try:
        reply = asyncio.run(send(target, build(args)))
    except OperatorClientError as exc:
        print(f"callgate: {exc}", file=sys.stderr)
        return 1

    output = shown(args, reply)
    if output:
        print(output)
    return 0


def shown(args: argparse.Namespace, reply: Reply) -> str:
    """What to print of a successful answer: its JSON, or the subcommand's view."""
    if args.json:
        return reply.text
    document = reply.document
    if document is None:
        # 204 No Content: the server says nothing, so say that it worked.
        return f"{args.command} {args.action}: done"
    render: Render = args.render
    return render(document)


def parser() -> argparse.ArgumentParser:
    """The ``callgate`` argument parser, every subcommand included."""
    top = argparse.ArgumentParser(
        prog="callgate", description="Call router and metering proxy."
    )
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the server (settings from CALLGATE_*)")
    common = connection_options()
    add_workspace_commands(commands, common)
    add_agent_commands(commands, common)
    add_offboard_command(commands, common)
    add_number_commands(commands, common)
    add_plan_commands(commands, common)
    add_key_commands(commands, common)
    add_webhook_commands(commands, common)

    usage_command = leaf(commands, "usage", "metered time of a period", common)
    usage_command.add_argument(
        "--period", metavar="PERIOD", help="YYYY-MM or YYYY-MM-DD (default: this month)"
    )
    usage_command.set_defaults(build=usage_request, render=usage)

    calls = leaf(commands, "calls", "call records, newest first", common)
    calls.add_argument(
        "--limit", type=int, metavar="N", help="how many, 1 to 500 (default 50)"
    )
    calls.set_defaults(build=calls_request, render=rows(CALL_COLUMNS))

    audit = leaf(commands, "audit", "a workspace's audit log, newest first", common)
    audit.set_defaults(
        build=lambda args: Request("GET", workspace_path(args, "audit")),
        render=rows(AUDIT_COLUMNS),
    )
    return top


def connection_options() -> argparse.ArgumentParser:
    """Options every operator subcommand takes, after its own arguments."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--url", help="the server (default: CALLGATE_URL, else http://127.0.0.1:8080)"
    )
    # No default shown: the help text must never print the key.
    options.add_argument(
        "--key",
        help="operator key (default: CALLGATE_OPERATOR_KEY, else operator_key in "
        "CALLGATE_DATA_DIR or .data); prefer those, as arguments show in ps",
    )
    options.add_argument(
        "--json", action="store_true", help="print the API's JSON as it came"
    )
    return options


def group(commands: Commands, name: str, summary: str) -> Commands:
    """A subcommand that only holds subcommands, like ``workspace``."""
    holder = commands.add_parser(name, help=summary, description=summary)
    return holder.add_subparsers(dest="action", required=True)


def leaf(
    commands: Commands,
    name: str,
    summary: str,
    common: argparse.ArgumentParser,
    workspace: str | None = "workspace",
) -> argparse.ArgumentParser:
    """A subcommand that sends one request, about the workspace named first.

    ``workspace`` is how usage shows that first argument; None leaves it out.
    """
    command = commands.add_parser(
        name, help=summary, description=summary, parents=[common]
    )
    if workspace is not None:
        command.add_argument("workspace", metavar=workspace)
    return command


def add_workspace_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    """``callgate workspace create|list|show|suspend|resume``."""
    workspace = group(commands, "workspace", "create, list and suspend workspaces")

    create = leaf(workspace, "create", "create a workspace", common, None)
    create.add_argument("name")
    create.set_defaults(
        build=lambda args: Request("POST", "/workspaces", {"name": args.name}),
        render=row(WORKSPACE_COLUMNS),
    )

    listing = leaf(workspace, "list", "list every workspace", common, None)
    listing.set_defaults(
        build=lambda _args: Request("GET", "/workspaces"),
        render=rows(WORKSPACE_COLUMNS),
    )

    show = leaf(workspace, "show", "show a workspace and its call policy", common, "id")
    show.set_defaults(
        build=lambda args: Request("GET", workspace_path(args)),
        render=record,
    )

    for action, summary in (
        ("suspend", "suspend a workspace: its numbers refuse calls"),
        ("resume", "resume a suspended workspace"),
    ):
        status = leaf(workspace, action, summary, common, "id")
        status.set_defaults(build=status_request, render=row(WORKSPACE_COLUMNS))

    policy = leaf(
        workspace,
        "policy",
        "change a workspace's name or call policy; options left out stay",
        common,
        "id",
    )
    policy.add_argument("--name")
    policy.add_argument(
        "--fallback-message", help="what callers hear when no agent can"
    )
    policy.add_argument(
        "--fallback-number",
        metavar="E164",
        help="forward there instead when the agent is down ('none' clears it)",
    )
    policy.add_argument(
        "--transfer-number",
        dest="transfer_numbers",
        action="append",
        metavar="E164",
        help="a number agents may transfer to (repeat; replaces the list)",
    )
    policy.add_argument(
        "--recording", action=argparse.BooleanOptionalAction, help="record calls"
    )
    policy.add_argument(
        "--outage",
        choices=("continue", "terminate"),
        help="what budgeted calls do while the store is unreachable",
    )
    policy.add_argument(
        "--emergency-grant-ms", type=int, metavar="MS", help="G under 'continue'"
    )
    policy.set_defaults(build=policy_request, render=record)

    state = leaf(
        workspace, "offboarding", "where a workspace's offboarding stands", common, "id"
    )
    state.set_defaults(
        build=lambda args: Request("GET", workspace_path(args, "offboarding")),
        render=record,
    )


def workspace_path(args: argparse.Namespace, *segments: str) -> str:
    """The path of the subcommand's workspace, or of ``segments`` below it."""
    return api_path("workspaces", args.workspace, *segments)


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The named options that were given, as a JSON body."""
    values = {name: getattr(args, name) for name in names}
    return {name: value for name, value in values.items() if value is not None}


def policy_request(args: argparse.Namespace) -> Request:
    """``PATCH /workspaces/{id}`` with the name and policy fields given."""
    body = given(
        args,
        "name",
        "fallback_message",
        "fallback_number",
        "transfer_numbers",
        "recording",
        "outage",
        "emergency_grant_ms",
    )
    if body.get("fallback_number") == "none":
        body["fallback_number"] = None
    return Request("PATCH", workspace_path(args), body)


def status_request(args: argparse.Namespace) -> Request:
    """``POST /workspaces/{id}/suspend`` or ``.../resume``."""
    return Request("POST", workspace_path(args, args.action))


def add_offboard_command(commands: Commands, common: argparse.ArgumentParser) -> None:
    """``callgate offboard WORKSPACE``: the status is ``workspace offboarding``."""
    offboard = leaf(
        commands,
        "offboard",
        "offboard a workspace: export, numbers, keys, deletion; again to resume",
        common,
        "id",
    )
    offboard.add_argument(
        "--grace", type=int, default=60, help="seconds live calls get (default 60)"
    )
    offboard.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="NUMBER[=YYYY-MM-DD]",
        help="keep a number, until its port-out date if given",
    )
    offboard.add_argument(
        "--pause-after",
        choices=("suspend", "export", "numbers", "revoke", "delete"),
        help="stop after this step (to review the export, say); run again to go on",
    )
    offboard.add_argument(
        "--transfer",
        action="append",
        default=[],
        metavar="NUMBER=ACCOUNT_SID",
        help="transfer a number to a Twilio account; the others are released",
    )
    offboard.set_defaults(build=offboard_request, render=record)


def offboard_request(args: argparse.Namespace) -> Request:
    """``POST /workspaces/{id}/offboarding`` with what to do with each number."""
    numbers: dict[str, dict[str, str]] = {}
    for pair in args.keep:
        number, _, until = pair.partition("=")
        numbers[number] = {"action": "keep", **({"until": until} if until else {})}
    for pair in args.transfer:
        number, _, account = pair.partition("=")
        numbers[number] = {"action": "transfer", "to_account_sid": account}
    body: dict[str, Any] = {"grace_secs": args.grace, "numbers": numbers}
    if args.pause_after is not None:
        body["pause_after"] = args.pause_after
    return Request("POST", workspace_path(args, "offboarding"), body)


def add_agent_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    """``callgate agent add|list``."""
    agent = group(commands, "agent", "add and list a workspace's agents")

    add = leaf(agent, "add", "add an agent on Vapi or Retell", common)
    add.add_argument("--name", required=True)
    add.add_argument("--provider", required=True, choices=("vapi", "retell"))
    add.add_argument(
        "--assistant-id", required=True, help="the platform's assistant or agent id"
    )
    add.add_argument(
        "--api-key", required=True, help="the workspace's own key on the platform"
    )
    add.add_argument("--audio-format", choices=("mulaw", "pcm16"))
    add.set_defaults(build=agent_request, render=row(AGENT_COLUMNS))

    listing = leaf(agent, "list", "list a workspace's agents", common)
    listing.set_defaults(
        build=lambda args: Request("GET", workspace_path(args, "agents")),
        render=rows(AGENT_COLUMNS),
    )

    update = leaf(agent, "update", "change an agent; options left out stay", common)
    update.add_argument("agent_id", metavar="AGENT")
    update.add_argument("--name")
    update.add_argument("--assistant-id", help="the platform's assistant or agent id")
    update.add_argument("--api-key", help="the workspace's own key on the platform")
    update.add_argument("--audio-format", choices=("mulaw", "pcm16"))
    update.set_defaults(
        build=lambda args: Request(
            "PATCH",
            workspace_path(args, "agents", args.agent_id),
            given(args, "name", "assistant_id", "api_key", "audio_format"),
        ),
        render=row(AGENT_COLUMNS),
    )


def agent_request(args: argparse.Namespace) -> Request:
    """``POST /workspaces/{id}/agents``; the server picks the default audio format."""
    body = {
        "name": args.name,
        "provider": args.provider,
        "assistant_id": args.assistant_id,
        "api_key": args.api_key,
    }
    if args.audio_format is not None:
        body["audio_format"] = args.audio_format
    return Request("POST", workspace_path(args, "agents"), body)


def add_number_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    """``callgate number add|list|move|remove``."""
    number = group(commands, "number", "attach, list, move and remove numbers")

    add = leaf(number, "add", "attach an E.164 number to an agent", common)
    add.add_argument("number")
    add.add_argument("--agent", required=True, metavar="AGENT", help="the agent's id")
    add.set_defaults(
        build=lambda args: Request(
            "POST",
            workspace_path(args, "numbers"),
            {"number": args.number, "agent_id": args.agent},
        ),
        render=row(NUMBER_COLUMNS),
    )

    listing = leaf(number, "list", "list a workspace's numbers", common)
    listing.set_defaults(
        build=lambda args: Request("GET", workspace_path(args, "numbers")),
        render=rows(NUMBER_COLUMNS),
    )

    route = leaf(number, "route", "send a number's calls to another agent", common)
    route.add_argument("number")
    route.add_argument("--agent", required=True, metavar="AGENT", help="the agent's id")
    route.set_defaults(
        build=lambda args: Request(
            "PATCH",
            workspace_path(args, "numbers", args.number),
            {"agent_id": args.agent},
        ),
        render=row(NUMBER_COLUMNS),
    )

    move = leaf(number, "move", "move a number to another workspace", common)
    move.add_argument("number")
    move.add_argument(
        "--to", required=True, metavar="WORKSPACE", help="the workspace to move it to"
    )
    move.add_argument(
        "--agent", required=True, metavar="AGENT", help="its agent in that workspace"
    )
    move.set_defaults(
        build=lambda args: Request(
            "POST",
            workspace_path(args, "numbers", args.number, "move"),
            {"workspace_id": args.to, "agent_id": args.agent},
        ),
        render=row(NUMBER_COLUMNS),
    )

    remove = leaf(number, "remove", "detach a number from its workspace", common)
    remove.add_argument("number")
    remove.set_defaults(
        build=lambda args: Request(
            "DELETE", workspace_path(args, "numbers", args.number)
        ),
        render=None,
    )


def add_plan_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    """``callgate plan set|show``."""
    plan = group(commands, "plan", "set and show a workspace's plan")

    put = leaf(
        plan,
        "set",
        "replace a workspace's plan; options left out take the plan's defaults",
        common,
    )
    _plan_options(put, included_required=True)
    put.set_defaults(build=plan_request, render=record)

    patch = leaf(
        plan, "update", "change only the given options of a workspace's plan", common
    )
    _plan_options(patch, included_required=False)
    patch.set_defaults(build=plan_patch_request, render=record)

    show = leaf(plan, "show", "show a workspace's plan", common)
    show.set_defaults(
        build=lambda args: Request("GET", workspace_path(args, "plan")),
        render=record,
    )


def _plan_options(command: argparse.ArgumentParser, included_required: bool) -> None:
    command.add_argument(
        "--included-minutes", type=int, required=included_required, metavar="N"
    )
    command.add_argument("--overage", choices=("none", "minutes", "money"))
    command.add_argument(
        "--overage-limit",
        type=int,
        metavar="N",
        help="minutes, or micro-units for money overage",
    )
    command.add_argument(
        "--overage-price-micros",
        type=int,
        metavar="N",
        help="price of an overage minute",
    )
    command.add_argument(
        "--max-concurrent", type=int, metavar="N", help="calls in progress at once"
    )
    command.add_argument(
        "--timezone", metavar="TZ", help="IANA name; periods are its calendar months"
    )
    command.add_argument(
        "--billing-increment", choices=("second", "six_seconds", "minute")
    )


def plan_patch_request(args: argparse.Namespace) -> Request:
    """``PATCH /workspaces/{id}/plan``: the given options change, the rest stay."""
    replace = plan_request(args)
    return Request("PATCH", replace.path, replace.body)


def plan_request(args: argparse.Namespace) -> Request:
    """``PUT /workspaces/{id}/plan`` with only the fields given on the command line."""
    given = {
        "included_minutes": args.included_minutes,
        "overage": args.overage,
        "overage_limit": args.overage_limit,
        "overage_price_micros_per_minute": args.overage_price_micros,
        "max_concurrent_calls": args.max_concurrent,
        "timezone": args.timezone,
        "billing_increment": args.billing_increment,
    }
    body = {name: value for name, value in given.items() if value is not None}
    return Request("PUT", workspace_path(args, "plan"), body)


def add_key_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    """``callgate keys create|list|revoke``."""
    keys = group(commands, "keys", "create, list and revoke workspace keys")

    create = leaf(keys, "create", "create a key; its token is shown once", common)
    create.add_argument("--role", required=True, choices=("admin", "viewer"))
    create.add_argument("--name", required=True)
    create.set_defaults(
        build=lambda args: Request(
            "POST",
            workspace_path(args, "keys"),
            {"role": args.role, "name": args.name},
        ),
        render=new_key,
    )

    listing = leaf(keys, "list", "list a workspace's keys (never their tokens)", common)
    listing.set_defaults(
        build=lambda args: Request("GET", workspace_path(args, "keys")),
        render=rows(KEY_COLUMNS),
    )

    rotate = leaf(
        keys, "rotate", "replace a key with a new token; the old one stops", common
    )
    rotate.add_argument("key_id")
    rotate.set_defaults(
        build=lambda args: Request(
            "POST", workspace_path(args, "keys", args.key_id, "rotate")
        ),
        render=new_key,
    )

    revoke = leaf(keys, "revoke", "revoke a key at once", common)
    revoke.add_argument("key_id")
    revoke.set_defaults(
        build=lambda args: Request("DELETE", workspace_path(args, "keys", args.key_id)),
        render=row(KEY_COLUMNS),
    )


def add_webhook_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    """``callgate webhook set|show|remove`` and ``callgate budget-events``."""
    hooks = group(
        commands, "webhook", "budget webhooks: one per workspace, or one for all"
    )
    scope = argparse.ArgumentParser(add_help=False)
    scope.add_argument(
        "--workspace",
        metavar="ID",
        help="the workspace's own webhook (default: the one for every workspace)",
    )

    def path(args: argparse.Namespace) -> str:
        if args.workspace:
            return workspace_path(args, "webhook")
        return api_path("webhook")

    put = hooks.add_parser(
        "set",
        help="register or replace a webhook; a new secret is shown once",
        parents=[scope, common],
    )
    # Not "url": that is the server's address, from the connection options.
    put.add_argument("webhook_url", metavar="URL")
    put.add_argument(
        "--rotate-secret", action="store_true", help="replace the signing secret"
    )
    put.set_defaults(
        build=lambda args: Request(
            "PUT",
            path(args),
            {"url": args.webhook_url, "rotate_secret": args.rotate_secret},
        ),
        render=record,
    )
    show = hooks.add_parser(
        "show", help="a webhook and its deliveries", parents=[scope, common]
    )
    show.set_defaults(build=lambda args: Request("GET", path(args)), render=record)
    remove = hooks.add_parser(
        "remove", help="stop sending events to a webhook", parents=[scope, common]
    )
    remove.set_defaults(build=lambda args: Request("DELETE", path(args)), render=record)

    events = leaf(commands, "budget-events", "a workspace's budget events", common)
    events.set_defaults(
        build=lambda args: Request("GET", workspace_path(args, "budget-events")),
        render=rows(BUDGET_EVENT_COLUMNS),
    )


def usage_request(args: argparse.Namespace) -> Request:
    """``GET /workspaces/{id}/usage``, for this month unless ``--period`` says."""
    query = {"period": args.period} if args.period else None
    return Request("GET", workspace_path(args, "usage"), query=query)


def calls_request(args: argparse.Namespace) -> Request:
    """``GET /workspaces/{id}/calls``, the server's default count unless ``--limit``."""
    query = {"limit": str(args.limit)} if args.limit is not None else None
    return Request("GET", workspace_path(args, "calls"), query=query)


if __name__ == "__main__":
    sys.exit(main())
