"""Composes Callgate: the store, the services on top of it, and every route.

The application's state lives under typed ``web.AppKey``s. Start-up order is
store, then services; shutdown ends live calls first (each records its end
reason and settles its meter), then flushes, then stops the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import redis.asyncio as redis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from media.retell import RetellClient
from media.vapi import VapiClient
from metering.budget_gauges import BudgetGauges
from metering.delivery import Dispatcher
from metering.journal import Journal
from metering.ledger import Ledger
from metering.meter import Meter
from metering.metrics import Metrics
from metering.quota import Quota
from router import budget, sip, stream, webhooks
from router.access import AccessLogger
from router.reconcile import Reconciler
from router.settings import Settings
from router.signatures import TwilioSigner
from router.store import EmbeddedValkey, connect, connect_cluster
from router.tokens import StreamTokens
from tenancy import access, api, hook_api, manage, openapi
from tenancy.audit import Audit
from tenancy.errors import StoreError
from tenancy.hooks import Webhooks
from tenancy.keys import Keys
from tenancy.logs import access_logger, router_logger
from tenancy.numbers import Numbers
from tenancy.offboarding import Offboarding
from tenancy.problems import problem
from tenancy.replies import Store
from tenancy.subjects import Subjects
from tenancy.twilio_accounts import TwilioAccounts
from tenancy.twilio_api import TwilioApi
from tenancy.vault import Vault
from tenancy.workspaces import Workspaces

STORE: web.AppKey[Store] = web.AppKey("store")
BUDGET_GAUGES = web.AppKey("budget_gauges", BudgetGauges)
HTTP = web.AppKey("http", aiohttp.ClientSession)
EMBEDDED = web.AppKey("embedded", EmbeddedValkey)
RECONCILER = web.AppKey("reconciler", Reconciler)

_MAX_BODY_BYTES = 256 * 1024
# Imported for the operator API endpoints they declare (tenancy.access).
ENDPOINT_MODULES = (api, manage, hook_api, openapi)


async def _store(app: web.Application) -> AsyncIterator[None]:
    settings = app[webhooks.SETTINGS]
    embedded: EmbeddedValkey | None = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedValkey(settings.data_dir)
        await embedded.start()
        app[EMBEDDED] = embedded
        url = embedded.url
    store: Store
    if settings.redis_cluster:
        store = connect_cluster(url, settings.store_timeout_secs)
    else:
        store = connect(url, settings.store_timeout_secs)
    app[STORE] = store
    try:
        yield
    finally:
        await store.aclose()
        if embedded is not None:
            await embedded.stop()


async def _services(app: web.Application) -> AsyncIterator[None]:
    settings = app[webhooks.SETTINGS]
    store = app[STORE]
    vault = Vault(settings.secret_key)
    workspaces = Workspaces(store, vault)
    numbers = Numbers(store, workspaces)
    ledger = Ledger(store)
    quota = Quota(store)
    meter = Meter(
        ledger,
        quota,
        app[webhooks.METRICS],
        settings.flush_interval_ms,
        journal=Journal(settings.data_dir / "journal"),
        rates=settings.rates,
        lease_ms=settings.lease_ms,
    )
    http = aiohttp.ClientSession()

    accounts = TwilioAccounts(
        store, vault, settings.twilio_account_sid, settings.twilio_auth_token
    )
    app[api.TWILIO_ACCOUNTS] = accounts
    app[webhooks.SIGNER] = TwilioSigner(
        accounts.token, enabled=settings.verify_signatures
    )
    app[api.PUBLIC_URL] = settings.public_url
    app[manage.SUBJECTS] = Subjects(store, settings.secret_key, settings.data_dir)
    app[access.OPERATOR_KEY] = settings.operator_key
    app[access.KEYS] = Keys(store, settings.secret_key)
    app[access.AUDIT] = Audit(store)
    app[api.WORKSPACES] = workspaces
    app[api.NUMBERS] = numbers
    app[api.LEDGER] = ledger
    app[webhooks.TOKENS] = StreamTokens(
        settings.secret_key, store, settings.stream_token_ttl_secs
    )
    app[webhooks.METER] = meter
    app[api.QUOTA] = quota
    app[stream.VAPI] = VapiClient(
        http, settings.vapi_api_url, settings.upstream_timeout_secs
    )
    app[webhooks.RETELL] = RetellClient(
        http, settings.retell_api_url, settings.upstream_timeout_secs
    )
    app[stream.TWILIO_API] = TwilioApi(
        http,
        settings.twilio_api_url,
        twilio_tokens(settings),
        main_account_sid=settings.twilio_account_sid,
    )
    app[HTTP] = http
    sweeper = budget.Sweeper(
        store,
        workspaces,
        quota,
        meter,
        app[stream.TWILIO_API],
        app[webhooks.METRICS],
        lease_ms=settings.lease_ms,
        adopt=sip.SipAdopter(app).adopt,
    )
    app[budget.SWEEPER] = sweeper
    reconciler = Reconciler(
        store,
        ledger,
        app[stream.TWILIO_API],
        app[webhooks.METRICS],
        after_secs=settings.reconcile_after_secs,
        meter=meter,
        workspaces=workspaces,
        sip_check_secs=settings.sip_check_secs,
    )
    app[RECONCILER] = reconciler
    app[BUDGET_GAUGES] = BudgetGauges(
        app[webhooks.METRICS],
        workspaces,
        quota,
        ledger,
        tick_ms=settings.flush_interval_ms,
        lease_ms=settings.lease_ms,
    )
    offboarding = Offboarding(
        store,
        workspaces,
        numbers,
        ledger,
        quota,
        app[access.KEYS],
        app[access.AUDIT],
        app[stream.TWILIO_API],
        settings.data_dir,
        lease_ms=settings.lease_ms,
        export_retention_days=settings.export_retention_days,
    )
    app[manage.OFFBOARDING] = offboarding
    webhooks_registry = Webhooks(store, vault)
    app[hook_api.WEBHOOKS] = webhooks_registry
    # Its own client session: a slow receiver never holds a connection that a
    # call to an agent platform is waiting for.
    hook_http = aiohttp.ClientSession()
    dispatcher = Dispatcher(
        store,
        webhooks_registry,
        app[webhooks.METRICS],
        hook_http,
        retry_secs=settings.webhook_retry_secs,
        retry_max_secs=settings.webhook_retry_max_secs,
        timeout_secs=settings.webhook_timeout_secs,
    )
    quota.on_events = dispatcher.wake
    meter.start()
    sweeper.start()
    reconciler.start()
    dispatcher.start()
    await offboarding.resume_interrupted()
    offboarding.watch()
    try:
        yield
    finally:
        await dispatcher.close()
        await hook_http.close()
        await offboarding.close()
        await reconciler.close()
        await sweeper.close()
        await meter.close()
        await http.close()


async def _end_live_calls(app: web.Application) -> None:
    """Cancel every live call so each hangs up both sides and settles."""
    live = app[stream.LIVE_CALLS]
    calls = list(live)
    for task in calls:
        task.cancel()
    if calls:
        router_logger.info("ending %d live calls for shutdown", len(calls))
        await asyncio.gather(*calls, return_exceptions=True)


def twilio_tokens(settings: Settings) -> dict[str, str]:
    """Auth token by Twilio account sid, for every account Callgate serves."""
    if settings.twilio_account_sid and settings.twilio_auth_token:
        return {settings.twilio_account_sid: settings.twilio_auth_token}
    return {}


def runner(app: web.Application) -> web.AppRunner:
    """The runner Callgate serves ``app`` with: redacted access log, 5 s grace."""
    return web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=access_logger,
        shutdown_timeout=5.0,
    )


async def shut_down(runner: web.AppRunner) -> None:
    """Stop taking requests, end live calls, then tear everything down.

    Calls are ended before aiohttp closes its connections: once it has, a
    stream's closing handshake can no longer complete and each hang-up would
    wait out its close timeout.
    """
    for site in list(runner.sites):
        await site.stop()
    await _end_live_calls(runner.app)
    await runner.cleanup()


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: the process is up and serving."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: the store answers, so calls can be routed and metered."""
    try:
        async with asyncio.timeout(1.0):
            await request.app[STORE].ping()
    except (TimeoutError, redis.RedisError, OSError):
        return problem(503, "store-unavailable", "Store Unavailable")
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text exposition."""
    try:
        await request.app[BUDGET_GAUGES].refresh()
    except (StoreError, redis.RedisError):
        # Still answer: the process's own counters matter most in an outage.
        router_logger.warning("could not read budgets for /metrics")
    body = generate_latest(request.app[webhooks.METRICS].registry)
    response = web.Response(body=body)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.charset = "utf-8"
    return response


def create_app(
    settings: Settings, registry: CollectorRegistry | None = None
) -> web.Application:
    """The whole Callgate application; the store starts when the app does."""
    app = web.Application(
        middlewares=[access.api_middleware], client_max_size=_MAX_BODY_BYTES
    )
    app[webhooks.SETTINGS] = settings
    app[webhooks.METRICS] = Metrics(registry or CollectorRegistry())

    live_calls: set[asyncio.Task[object]] = set()
    app[stream.LIVE_CALLS] = live_calls

    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_services)
    # A backstop for runners stopped without shut_down().
    app.on_shutdown.append(_end_live_calls)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/twilio/voice", webhooks.voice)
    app.router.add_post("/twilio/status", webhooks.status)
    app.router.add_get(webhooks.STREAM_PATH + "{token}", stream.stream)
    app.router.add_post(webhooks.SIP_STATUS_PATH + "{workspace_id}", sip.sip_status)
    app.router.add_post(webhooks.DIAL_ACTION_PATH + "{workspace_id}", sip.dial_action)
    access.add_routes(app)
    return app
