"""The shapes of the operator API's answers, declared once for the OpenAPI document.

Each endpoint names the model of its successful answer; schemathesis then
checks every answer the server gives against it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

Stamp = str | None


class WorkspaceOut(BaseModel):
    """A workspace and its call policy."""

    id: str
    name: str
    status: Literal["active", "suspended"]
    created_at: str
    twilio_account_sid: str | None
    fallback_message: str
    fallback_number: str | None
    transfer_numbers: list[str]
    recording: bool
    outage: Literal["continue", "terminate"]
    emergency_grant_ms: int


class WorkspaceList(BaseModel):
    """Workspaces, oldest first."""

    items: list[WorkspaceOut]


class AgentOut(BaseModel):
    """An agent; its API key is never returned."""

    id: str
    workspace_id: str
    name: str
    provider: Literal["vapi", "retell"]
    assistant_id: str
    audio_format: Literal["mulaw", "pcm16"]
    created_at: str


class AgentList(BaseModel):
    """Agents, oldest first."""

    items: list[AgentOut]


class NumberOut(BaseModel):
    """A number the workspace owns and the agent it routes to."""

    number: str
    workspace_id: str
    agent_id: str
    twilio_account_sid: str | None
    attached_at: str


class NumberList(BaseModel):
    """Numbers, in E.164 order."""

    items: list[NumberOut]


class KeyOut(BaseModel):
    """A workspace key, without its secret."""

    id: str
    workspace_id: str
    role: Literal["admin", "viewer"]
    name: str
    created_at: str
    revoked_at: Stamp
    last_used_at: Stamp


class KeyCreated(KeyOut):
    """A new key with its token, shown this once."""

    token: str


class KeyList(BaseModel):
    """Keys, oldest first, revoked ones included."""

    items: list[KeyOut]


class CallOut(BaseModel):
    """One call record; times are ISO 8601, money in micro-units."""

    call_sid: str
    workspace_id: str
    agent_id: str
    from_number: str
    to_number: str
    status: str
    arrived_at: str
    started_at: Stamp
    ended_at: Stamp
    metered_ms: int
    metered_secs: float
    end_reason: str | None
    provider: str | None
    provider_call_id: str | None
    twilio_status: str | None
    twilio_call_duration_secs: int | None
    transferred_to: str | None
    agent_audio_ms: int
    agent_played_ms: int
    interruptions: int
    dropped_frames: int
    recording: str | None
    cost_micros: int
    account_sid: str | None
    sip_call_sid: str | None


class CallList(BaseModel):
    """A page of calls, newest first."""

    items: list[CallOut]
    next_cursor: str | None


class UsageLineOut(BaseModel):
    """Metered time and calls for one agent or number."""

    seconds: float
    ms: int
    calls: int


class StatementOut(BaseModel):
    """A billing period's statement, in integer ms and micro-units."""

    currency: str
    billed_ms: int
    billed_minutes_milli: int
    included_ms: int
    overage_ms: int
    allowance_ms: int
    price_micros: int
    cost_micros: int
    margin_micros: int


class UsageOut(BaseModel):
    """A workspace's usage for a month or a day."""

    workspace_id: str
    period: str
    seconds: float
    ms: int
    calls: int
    cost_micros: int
    agents: dict[str, UsageLineOut]
    numbers: dict[str, UsageLineOut]
    statement: StatementOut | None


class PlanOut(BaseModel):
    """A workspace's plan and the hard cap it makes."""

    timezone: str
    included_minutes: int
    overage: Literal["none", "minutes", "money"]
    overage_limit: int
    overage_price_micros_per_minute: int
    base_fee_micros: int
    max_concurrent_calls: int
    billing_increment: Literal["second", "six_seconds", "minute"]
    on_exhausted: Literal["goodbye", "redirect"]
    exhausted_redirect_number: str | None
    reject_with: Literal["message", "reject"]
    currency: str
    hard_cap_ms: int


class AuditEntryOut(BaseModel):
    """One audit entry."""

    at: str
    actor: str
    action: str
    target: str
    detail: str


class AuditList(BaseModel):
    """The workspace's latest audit entries, newest first."""

    items: list[AuditEntryOut]


class CertificateOut(BaseModel):
    """A data-subject request's certificate; the caller only as a keyed hash."""

    id: str
    kind: Literal["export", "erase"]
    subject_digest: str
    at: str
    call_records: int
    recordings: int


class CertificateList(BaseModel):
    """The workspace's data-subject certificates, newest first."""

    items: list[CertificateOut]


class SubjectExport(BaseModel):
    """Everything the workspace holds about one caller."""

    certificate: CertificateOut
    calls: list[CallOut]


class NumberOutcome(BaseModel):
    """What offboarding does, or did, with one number."""

    action: Literal["release", "transfer", "keep"]
    status: Literal["pending", "done"]
    until: str | None = None
    # A kept number once its date passed: released by Callgate, or gone (ported).
    expired: Literal["released", "ported"] | None = None
    expired_at: Stamp = None


class ExportOut(BaseModel):
    """The offboarding export archive: its size and SHA-256."""

    sha256: str
    bytes: int


class OffboardingOut(BaseModel):
    """Where a workspace's offboarding stands."""

    workspace_id: str
    status: Literal["running", "paused", "failed", "done"]
    started_at: str
    finished_at: Stamp
    grace_secs: int
    pause_after: str | None
    steps: dict[str, Literal["done"]]
    numbers: dict[str, NumberOutcome]
    export: ExportOut | None
    error: str | None


class DeletionCertificate(BaseModel):
    """Proof a workspace was deleted: counts, times, the export's hash; no data."""

    workspace_id: str
    started_at: str
    deleted_at: str
    export_sha256: str
    export_bytes: int
    deleted_keys: dict[str, int]
    numbers: dict[str, int]
    subaccount_closed: bool


class WebhookDeliveryOut(BaseModel):
    """How delivery of a workspace's budget events to one webhook stands."""

    delivered: int
    pending: int
    attempts: int
    last_status: int | None
    last_error: str | None
    next_attempt_at: Stamp
    last_delivered_at: Stamp


class WebhookOut(BaseModel):
    """A budget webhook; ``secret`` is shown only when it is new."""

    scope: Literal["workspace", "operator"]
    workspace_id: str | None
    url: str
    created_at: str
    updated_at: str
    secret: str | None
    delivery: WebhookDeliveryOut | None


class BudgetEventData(BaseModel):
    """What a budget event says about the workspace's period."""

    workspace_id: str
    period: str
    used_ms: int
    allowance_ms: int
    threshold_percent: Literal[50, 80, 100] | None = None
    reason: Literal["call_refused", "call_ended"] | None = None


class BudgetEventOut(BaseModel):
    """A budget event as webhooks receive it, with where it has been delivered."""

    id: str
    type: Literal["budget.threshold_reached", "budget.cut_off"]
    timestamp: str
    data: BudgetEventData
    delivered_to: list[Literal["workspace", "operator"]]


class BudgetEventList(BaseModel):
    """A workspace's budget events, oldest first."""

    items: list[BudgetEventOut]
