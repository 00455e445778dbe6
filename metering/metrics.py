"""Every Prometheus metric Callgate exports, registered on an injected registry.

Labels are bounded: per workspace, provider, direction or reason, never per
call. Counters are per process and sum across processes in PromQL.
"""

from __future__ import annotations

from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from metering.plans import Provider

_NAMESPACE = "callgate"


class Metrics:
    """The metric families of one Callgate process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.call_seconds = Counter(
            "call_seconds",
            "Connected call time metered into the store, in seconds.",
            ["workspace"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.calls_active = Gauge(
            "calls_active",
            "Calls with a live media stream in this process.",
            ["workspace"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.calls_started = Counter(
            "calls_started",
            "Calls whose media stream started.",
            ["workspace"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.calls_ended = Counter(
            "calls_ended",
            "Calls that ended, by end reason.",
            ["workspace", "reason"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.budget_cutoffs = Counter(
            "budget_cutoffs",
            "Calls ended because their workspace's budget ran out mid-call.",
            ["workspace"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.grants_reclaimed = Counter(
            "grants_reclaimed",
            "Grants taken back from calls whose process stopped renewing them.",
            ["workspace"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.admissions_rejected = Counter(
            "admissions_rejected",
            "Calls refused at admission, by reason (budget, concurrency).",
            ["workspace", "reason"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.budget_included = Gauge(
            "budget_included_seconds",
            "The plan's included time this period, read from the store.",
            ["workspace"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.budget_allowance = Gauge(
            "budget_allowance_seconds",
            "The plan's hard cap this period (included plus allowed overage).",
            ["workspace"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.budget_used = Gauge(
            "budget_used_seconds",
            "Billed time used this period, read from the store.",
            ["workspace"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.budget_remaining = Gauge(
            "budget_remaining_seconds",
            "Time left under the hard cap this period (0 once past it).",
            ["workspace"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.budget_overrun_bound = Gauge(
            "budget_overrun_bound_seconds",
            "How far billed time may pass the hard cap by design (the published "
            "overrun bound, hang-up latency taken as 1 s).",
            ["workspace"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        money = "in the currency label's units, read from the store"
        self.period_price = Gauge(
            "period_price",
            f"Charged to the client this period (base fee and overage), {money}.",
            ["workspace", "currency"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.period_cost = Gauge(
            "period_cost",
            f"Cost to serve this period's settled calls, by the rate card, {money}.",
            ["workspace", "currency"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.period_margin = Gauge(
            "period_margin",
            f"Price less cost this period (negative when losing money), {money}.",
            ["workspace", "currency"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.webhook_deliveries = Counter(
            "budget_webhook_deliveries",
            "Budget event deliveries to webhooks, by target (workspace, operator) "
            "and outcome (delivered, failed).",
            ["workspace", "target", "outcome"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.hangup_latency = Histogram(
            "hangup_latency_seconds",
            "From a call's budget running out to the call being over (D).",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0),
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.grant_renewals = Counter(
            "grant_renewals",
            "Grant renewals of live calls, by outcome: full, partial, denied, "
            "reclaimed.",
            ["workspace", "outcome"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.upstream_connect = Histogram(
            "upstream_connect_seconds",
            "Time to open a call on an agent platform (Vapi's call and socket, "
            "Retell's registration), failures included.",
            ["provider"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0),
            namespace=_NAMESPACE,
            registry=registry,
        )
        # Both providers' series exist from the start, so the upstream error
        # alert divides by a zero rate, not by a missing series, while every
        # call fails before its first attempt.
        for provider in get_args(Provider):
            self.upstream_connect.labels(provider)
        self.relay_latency = Histogram(
            "relay_latency_seconds",
            "Per batch written, how long its oldest frame waited in Callgate "
            "from being read on one side to being written on the other.",
            ["direction"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.store_up = Gauge(
            "store_up",
            "1 while this process's last report reached the store, else 0.",
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.store_up.set(1)
        self.journal_depth = Gauge(
            "journal_depth",
            "Reports journaled locally while the store was unreachable.",
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.reconciled = Counter(
            "reconciled_calls",
            "Calls whose Twilio duration was recorded, by source (callback, api).",
            ["workspace", "source"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.reconciliation_drift = Histogram(
            "reconciliation_drift_seconds",
            "Per call, how far Twilio's duration is from Callgate's metered time.",
            ["workspace"],
            buckets=(0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.webhooks = Counter(
            "webhooks",
            "Twilio webhook requests, by endpoint and outcome.",
            ["endpoint", "outcome"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.stream_upgrades = Counter(
            "stream_upgrades",
            "Media stream WebSocket upgrades, by outcome.",
            ["outcome"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.frames_relayed = Counter(
            "frames_relayed",
            "Audio frames relayed, by direction.",
            ["direction"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.frames_dropped = Counter(
            "frames_dropped",
            "Audio frames dropped because the far side fell a second behind.",
            ["direction"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.barge_ins = Counter(
            "barge_ins",
            "Times the caller interrupted the agent and its audio was cleared.",
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.transfers = Counter(
            "transfers",
            "Transfers the agent asked for, by outcome (done, refused, failed).",
            ["outcome"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.fallbacks = Counter(
            "fallbacks",
            "Calls sent to the workspace's fallback, by outcome.",
            ["outcome"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.frames_malformed = Counter(
            "frames_malformed",
            "Malformed frames received from Twilio or a provider.",
            ["source"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "upstream_errors",
            "Failures reaching or talking to an agent platform.",
            ["provider", "kind"],
            namespace=_NAMESPACE,
            registry=registry,
        )
        self.meter_flushes = Counter(
            "meter_flushes",
            "Batched writes of metered time to the store, by outcome.",
            ["outcome"],
            namespace=_NAMESPACE,
            registry=registry,
        )
