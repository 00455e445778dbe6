"""The media stream endpoint: authenticate the upgrade, then run the call.

Before upgrading, the stream token is verified (signature and expiry, no store
access), then Twilio's signature over the exact ``wss://`` URL with the token
of the account the token names, and only then is the single-use token
consumed. After the upgrade: ``connected`` and ``start``, the agent's call,
metering, the bridge, and exactly one end reason.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as redis
from aiohttp import WSMsgType, web

from media import frames
from media.bridge import Bridge, BridgeResult, EndReason
from media.recording import Recorder
from media.vapi import VapiClient
from metering.meter import Budget, CallSession
from metering.plans import Plan, period_of
from router.budget import Cutoff, budget
from router.control import TwilioCallControl
from router.tokens import StreamClaims
from router.webhooks import METER, METRICS, SETTINGS, SIGNER, TOKENS
from tenancy import api
from tenancy.errors import (
    SealError,
    SignatureError,
    StoreError,
    StreamTokenError,
    UpstreamError,
)
from tenancy.logs import CallLog, call_logger, media_logger
from tenancy.problems import problem
from tenancy.workspaces import now_ms

VAPI = web.AppKey("vapi", VapiClient)
LIVE_CALLS: web.AppKey[set[asyncio.Task[object]]] = web.AppKey("live_calls")
TWILIO_API = api.TWILIO

HANDSHAKE_TIMEOUT_SECS = 10.0
# How long a hang-up waits for Twilio to answer our close frame; it bounds
# the hang-up latency when the far side has gone quiet.
CLOSE_TIMEOUT_SECS = 2.0
_MAX_FRAME_BYTES = 64 * 1024


def _refuse(request: web.Request, outcome: str, detail: str) -> web.Response:
    request.app[METRICS].stream_upgrades.labels(outcome).inc()
    media_logger.warning("refused stream upgrade: %s", detail)
    return problem(403, outcome.replace("_", "-"), "Forbidden", detail)


async def call_budget_of(
    app: web.Application, workspace_id: str, call_sid: str
) -> tuple[Plan | None, Budget | None]:
    """The workspace's plan and a call's budget under it (None without a plan).

    The budget draws on the period the call's grant was taken from, so a
    call admitted just before a month's end stays in that month.
    """
    plan = await app[api.WORKSPACES].plan(workspace_id)
    if plan is None:
        return None, None
    period = await app[api.LEDGER].grant_period(workspace_id, call_sid)
    policy = (await app[api.WORKSPACES].get(workspace_id)).policy
    return plan, budget(
        plan,
        policy,
        period or period_of(now_ms(), plan.timezone).label,
        app[SETTINGS],
    )


async def stream(request: web.Request) -> web.StreamResponse:
    """``GET /twilio/stream/{token}``: one call's Twilio Media Stream."""
    app = request.app
    try:
        claims = app[TOKENS].verify(request.match_info["token"])
    except StreamTokenError as exc:
        return _refuse(request, "bad_token", str(exc))
    url = app[SETTINGS].stream_base_url + request.raw_path
    try:
        await app[SIGNER].verify(
            claims.account_sid, url, {}, request.headers.get("X-Twilio-Signature")
        )
    except SignatureError as exc:
        return _refuse(request, "bad_signature", str(exc))

    socket = web.WebSocketResponse(
        max_msg_size=_MAX_FRAME_BYTES, autoping=True, timeout=CLOSE_TIMEOUT_SECS
    )
    if not socket.can_prepare(request).ok:
        return problem(400, "not-websocket", "Bad Request", "expected an upgrade")
    try:
        await app[TOKENS].consume(claims)
    except StreamTokenError as exc:
        return _refuse(request, "token_reused", str(exc))
    except (StoreError, redis.RedisError):
        media_logger.error("cannot check stream token: store down", exc_info=True)
        return problem(503, "store-unavailable", "Store Unavailable")
    await socket.prepare(request)
    app[METRICS].stream_upgrades.labels("accepted").inc()

    log = CallLog(
        media_logger, {"workspace": claims.workspace_id, "call": claims.call_sid}
    )
    live = app[LIVE_CALLS]
    task = asyncio.current_task()
    assert task is not None
    live.add(task)
    try:
        await _run_call(app, socket, claims, log)
    finally:
        live.discard(task)
    return socket


async def _handshake(
    socket: web.WebSocketResponse, state: frames.StreamState
) -> frames.Start:
    """Read ``connected`` then ``start``; raise on anything else."""
    while state.start is None:
        message = await socket.receive(timeout=HANDSHAKE_TIMEOUT_SECS)
        if message.type is not WSMsgType.TEXT:
            raise frames.StreamFrameError(
                "stream closed or sent binary before start",
                frames.CLOSE_UNSUPPORTED_DATA,
            )
        state.receive(message.data)
    return state.start


async def _checked_start(
    app: web.Application,
    socket: web.WebSocketResponse,
    state: frames.StreamState,
    claims: StreamClaims,
    log: CallLog,
) -> frames.Start | None:
    """The stream's ``start``, if it arrives in time and names the token's call.

    On any failure the stream is closed with a specific code and ``None`` is
    returned.
    """
    metrics = app[METRICS]
    try:
        start = await _handshake(socket, state)
    except frames.StreamFrameError as exc:
        metrics.frames_malformed.labels("twilio").inc()
        log.warning("stream handshake failed: %s", exc)
        await socket.close(code=exc.close_code, message=str(exc)[:120].encode())
        return None
    except TimeoutError:
        log.warning("no start message within %ss", HANDSHAKE_TIMEOUT_SECS)
        await socket.close(code=frames.CLOSE_POLICY_VIOLATION, message=b"no start")
        return None
    if start.call_sid != claims.call_sid or start.account_sid != claims.account_sid:
        metrics.frames_malformed.labels("twilio").inc()
        log.warning("start message names another call")
        await socket.close(
            code=frames.CLOSE_POLICY_VIOLATION, message=b"stream is for another call"
        )
        return None
    return start


async def _run_call(
    app: web.Application,
    socket: web.WebSocketResponse,
    claims: StreamClaims,
    log: CallLog,
) -> None:
    workspace_id = claims.workspace_id
    calls_log = CallLog(
        call_logger, {"workspace": workspace_id, "call": claims.call_sid}
    )
    state = frames.StreamState()
    start = await _checked_start(app, socket, state, claims, log)
    if start is None:
        reason = EndReason.PROTOCOL_ERROR
        try:
            await app[METER].close_unstarted(
                workspace_id,
                claims.call_sid,
                agent_id=claims.agent_id,
                number=claims.number,
                reason=reason.value,
            )
        except redis.RedisError:
            log.warning("could not close the call record", exc_info=True)
        calls_log.info("call ended reason=%s metered_ms=0", reason.value)
        return

    cutoff = Cutoff()
    try:
        plan, call_budget = await call_budget_of(app, workspace_id, claims.call_sid)
        session = await app[METER].begin(
            workspace_id,
            claims.call_sid,
            agent_id=claims.agent_id,
            number=claims.number,
            stream_sid=start.stream_sid,
            budget=call_budget,
            on_exhausted=cutoff.fire,
        )
    except (StoreError, redis.RedisError, LookupError):
        session = None
    if session is None:
        # Without a meter the call cannot be billed, so it is not carried.
        log.error("cannot start metering; ending the call", exc_info=True)
        await socket.close(code=frames.CLOSE_NORMAL)
        return
    reason = EndReason.UPSTREAM_FAILED
    try:
        result = await _bridge(app, socket, state, session, claims, plan, cutoff, log)
        reason = result.reason
        await _record(app, session, result, log)
    except asyncio.CancelledError:
        reason = EndReason.SHUTDOWN
        raise
    finally:
        await app[METER].end(session, reason.value)
        calls_log.info(
            "call ended reason=%s metered_ms=%d agent=%s",
            reason.value,
            app[METER].metered_ms(session),
            claims.agent_id,
        )


async def _record(
    app: web.Application, session: CallSession, result: BridgeResult, log: CallLog
) -> None:
    """Note on the call record what the bridge saw."""
    fields = {
        "agent_audio_ms": str(result.agent_audio_ms),
        "agent_played_ms": str(result.agent_played_ms),
        "interruptions": str(result.interruptions),
        "dropped_frames": str(result.dropped_frames),
    }
    if result.transferred_to:
        fields["transferred_to"] = result.transferred_to
    try:
        await app[api.LEDGER].set_fields(session.workspace_id, session.call_sid, fields)
    except redis.RedisError:
        log.warning("could not record the bridge's figures", exc_info=True)


async def _bridge(
    app: web.Application,
    socket: web.WebSocketResponse,
    state: frames.StreamState,
    session: CallSession,
    claims: StreamClaims,
    plan: Plan | None,
    cutoff: Cutoff,
    log: CallLog,
) -> BridgeResult:
    """Open the agent's call and relay audio until one side ends."""
    workspaces = app[api.WORKSPACES]
    metrics = app[METRICS]
    workspace = await workspaces.get(session.workspace_id)
    control = TwilioCallControl(
        app[TWILIO_API],
        claims.account_sid,
        session.call_sid,
        workspace.policy,
        metrics,
        log,
        plan,
    )
    try:
        agent = await workspaces.get_agent(session.workspace_id, session.agent_id)
        api_key = await workspaces.agent_api_key(session.workspace_id, agent.id)
        with metrics.upstream_connect.labels("vapi").time():
            upstream = await app[VAPI].connect(
                api_key=api_key,
                assistant_id=agent.assistant_id,
                metadata={
                    "callgate_workspace_id": session.workspace_id,
                    "twilio_call_sid": session.call_sid,
                },
                pcm16=agent.audio_format == "pcm16",
            )
    except UpstreamError as exc:
        metrics.upstream_errors.labels("vapi", "connect").inc()
        log.warning("agent platform unavailable: %s", exc)
        return await _fall_back(socket, control)
    except (SealError, StoreError, redis.RedisError, LookupError):
        metrics.upstream_errors.labels("vapi", "config").inc()
        log.error("cannot open the agent's call", exc_info=True)
        return await _fall_back(socket, control)

    try:
        await app[api.LEDGER].set_fields(
            session.workspace_id,
            session.call_sid,
            {"provider": upstream.provider, "provider_call_id": upstream.call_id},
        )
    except redis.RedisError:
        log.warning("could not record the provider call id", exc_info=True)
    recorder = None
    if workspace.policy.recording:
        recorder = Recorder(recording_path(app, session.workspace_id, session.call_sid))
    bridge = Bridge(
        socket,
        state,
        upstream,
        control,
        frozenset(workspace.policy.transfer_numbers),
        metrics,
        log,
        recorder,
    )
    await cutoff.attach(bridge.cut_off)
    try:
        return await bridge.run()
    finally:
        if recorder is not None:
            await _finish_recording(app, session, recorder, log)


def recording_path(app: web.Application, workspace_id: str, call_sid: str) -> Path:
    """Where a call's recording lives: under its workspace's own directory."""
    directory = app[SETTINGS].data_dir / "workspaces" / workspace_id / "recordings"
    return directory / f"{call_sid}.wav"


async def _finish_recording(
    app: web.Application, session: CallSession, recorder: Recorder, log: CallLog
) -> None:
    try:
        path = await recorder.close()
        await app[api.LEDGER].set_fields(
            session.workspace_id,
            session.call_sid,
            {"recording": f"recordings/{path.name}"},
        )
    except (OSError, redis.RedisError):
        log.error("could not finish the call's recording", exc_info=True)


async def _fall_back(
    socket: web.WebSocketResponse, control: TwilioCallControl
) -> BridgeResult:
    """Send the caller to the fallback, then let the stream go."""
    # Redirect first: closing the stream first would end the call.
    await control.fall_back()
    await socket.close(code=frames.CLOSE_NORMAL)
    return BridgeResult(
        reason=EndReason.UPSTREAM_FAILED,
        transferred_to=None,
        agent_audio_ms=0,
        agent_played_ms=0,
        interruptions=0,
        dropped_frames=0,
    )
