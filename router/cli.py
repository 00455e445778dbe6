"""The ``callgate`` command: ``callgate serve`` runs the server."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import uvloop
from aiohttp import web

from router.app import create_app, runner, shut_down
from router.settings import Settings, load
from tenancy import logs
from tenancy.errors import ConfigError, StoreError


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
    parser = argparse.ArgumentParser(
        prog="callgate", description="Call router and metering proxy."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the server (settings from CALLGATE_*)")
    parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
