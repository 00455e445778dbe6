"""What a plan allows and what calls cost, in integers so that every cent reconciles.

Durations are integer milliseconds and money is integer micro-units (millionths)
of the plan's currency; no float enters any of the arithmetic here. Rounding
happens in three named places: :func:`bill_ms` rounds one call's time for the
client, :func:`call_cost_micros` rounds it as each provider does, and division
of money rounds half up to a whole micro-unit.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tenancy.errors import InvalidInputError

BillingIncrement = Literal["second", "six_seconds", "minute"]
Overage = Literal["none", "minutes", "money"]
OnExhausted = Literal["goodbye", "redirect"]
RejectWith = Literal["message", "reject"]
Provider = Literal["vapi", "retell"]

MS_PER_SECOND: Final = 1_000
MS_PER_MINUTE: Final = 60_000

# Counters are updated by Lua scripts, whose numbers are doubles: an integer
# above 2**53 would silently lose its last digits there.
MAX_EXACT_INT: Final = 2**53 - 1

INCREMENT_MS: Final[dict[BillingIncrement, int]] = {
    "second": 1_000,
    "six_seconds": 6_000,
    "minute": 60_000,
}

_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_DECIMAL = re.compile(r"-?[0-9]+")

# These names load with ZoneInfo but mean "whatever this machine is set to".
_MACHINE_ZONES: Final = frozenset({"localtime", "posixrules"})

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)


class PlanError(InvalidInputError):
    """A plan field holds a value the plan cannot use; ``field`` names it."""


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _div_half_up(numerator: int, denominator: int) -> int:
    # For a non-negative numerator: floor(n / d + 1/2), kept in integers.
    return (2 * numerator + denominator) // (2 * denominator)


def bill_ms(duration_ms: int, increment: BillingIncrement) -> int:
    """One call's billable milliseconds: ``duration_ms`` rounded up to the increment.

    The increment is 1 s, 6 s or 60 s and applies per call, so a 61 s call on a
    per-minute plan bills 120 000 ms. Round each call, then add calls up; never
    round a period's total. Zero stays zero.
    """
    if duration_ms < 0:
        raise ValueError("duration_ms must not be negative")
    step_ms = INCREMENT_MS.get(increment)
    if step_ms is None:
        raise ValueError("unknown billing increment")
    return _ceil_div(duration_ms, step_ms) * step_ms


def _zone(name: str) -> ZoneInfo:
    if name in _MACHINE_ZONES:
        raise PlanError("timezone must be an iana zone name", "timezone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise PlanError("timezone is not a known iana zone", "timezone") from exc


_INT_FIELDS: Final = (
    "included_minutes",
    "overage_limit",
    "overage_price_micros_per_minute",
    "base_fee_micros",
    "max_concurrent_calls",
)

_CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "overage": get_args(Overage),
    "billing_increment": get_args(BillingIncrement),
    "on_exhausted": get_args(OnExhausted),
    "reject_with": get_args(RejectWith),
}


@dataclass(frozen=True, slots=True)
class Plan:
    """What a workspace may use in a billing period and what it pays for it.

    - ``timezone``: IANA name; periods are calendar months in this zone.
    - ``included_minutes``: minutes covered by the base fee.
    - ``overage``: what is allowed past the included minutes: nothing, up to
      ``overage_limit`` minutes, or up to ``overage_limit`` micro-units of money.
      ``overage_limit`` is 0 when ``overage`` is ``"none"``.
    - ``overage_price_micros_per_minute``: charged to the client per overage
      minute, pro rata to the millisecond; must be positive for money overage.
    - ``base_fee_micros``: charged once per period.
    - ``max_concurrent_calls``: calls in progress at once; at least 1.
    - ``billing_increment``: how each call is rounded up (see :func:`bill_ms`).
    - ``on_exhausted``: say goodbye and hang up, or redirect to
      ``exhausted_redirect_number`` (E.164, given exactly when redirecting).
    - ``reject_with``: refuse an over-budget or over-concurrency call with a
      spoken message and hang-up, or with TwiML ``<Reject>`` (which Twilio does
      not bill, protocols §4).
    - ``currency``: ISO 4217 code of every ``*_micros`` amount.

    Every field has a default; the all-default plan allows no time at all.
    """

    timezone: str = "UTC"
    included_minutes: int = 0
    overage: Overage = "none"
    overage_limit: int = 0
    overage_price_micros_per_minute: int = 0
    base_fee_micros: int = 0
    max_concurrent_calls: int = 1
    billing_increment: BillingIncrement = "second"
    on_exhausted: OnExhausted = "goodbye"
    exhausted_redirect_number: str | None = None
    reject_with: RejectWith = "message"
    currency: str = "USD"

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if type(value) is not int:
                raise PlanError(f"{name} must be an integer", name)
            if value > MAX_EXACT_INT:
                raise PlanError(f"{name} is too large", name)
        for name in ("included_minutes", "overage_limit", "base_fee_micros"):
            if getattr(self, name) < 0:
                raise PlanError(f"{name} must not be negative", name)
        if self.overage_price_micros_per_minute < 0:
            raise PlanError(
                "overage_price_micros_per_minute must not be negative",
                "overage_price_micros_per_minute",
            )
        if self.max_concurrent_calls < 1:
            raise PlanError(
                "max_concurrent_calls must be at least 1", "max_concurrent_calls"
            )
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise PlanError(f"{name} must be one of {', '.join(choices)}", name)

        if self.overage == "none" and self.overage_limit != 0:
            raise PlanError("overage_limit must be 0 without overage", "overage_limit")
        if self.overage == "money" and self.overage_price_micros_per_minute == 0:
            # A free minute makes any money limit an unlimited number of minutes.
            raise PlanError(
                "overage_price_micros_per_minute must be positive for money overage",
                "overage_price_micros_per_minute",
            )

        redirect_to = self.exhausted_redirect_number
        if self.on_exhausted == "redirect":
            if not isinstance(redirect_to, str) or not _E164.fullmatch(redirect_to):
                raise PlanError(
                    "exhausted_redirect_number must be an e.164 number",
                    "exhausted_redirect_number",
                )
        elif redirect_to is not None:
            raise PlanError(
                "exhausted_redirect_number is only for redirect",
                "exhausted_redirect_number",
            )

        if not isinstance(self.timezone, str):
            raise PlanError("timezone must be a string", "timezone")
        _zone(self.timezone)
        if not isinstance(self.currency, str) or not _CURRENCY.fullmatch(self.currency):
            raise PlanError("currency must be three uppercase letters", "currency")

        if self.included_minutes * MS_PER_MINUTE > MAX_EXACT_INT:
            raise PlanError("included_minutes is too large", "included_minutes")
        if hard_cap_ms(self) > MAX_EXACT_INT:
            raise PlanError("overage_limit is too large", "overage_limit")

    def to_fields(self) -> dict[str, str]:
        """Every field as a string, for one Redis hash.

        All fields are always present (a missing redirect number is ``""``), so
        writing the whole mapping overwrites any value a previous plan left.
        """
        return {
            name: "" if value is None else str(value)
            for name, value in self.to_json().items()
        }

    @classmethod
    def from_fields(cls, mapping: dict[str, str]) -> Plan:
        """The plan a Redis hash holds; absent fields take their defaults.

        Keys that are not plan fields are ignored, so other data may share the
        hash and a newer release may add fields. Raises :class:`PlanError`.
        """
        values: dict[str, Any] = {}
        for spec in fields(cls):
            text = mapping.get(spec.name)
            if text is None:
                continue
            if spec.name in _INT_FIELDS:
                if not _DECIMAL.fullmatch(text):
                    raise PlanError(f"{spec.name} must be an integer", spec.name)
                values[spec.name] = int(text)
            elif spec.name == "exhausted_redirect_number":
                values[spec.name] = text or None
            else:
                values[spec.name] = text
        return cls(**values)

    def to_json(self) -> dict[str, str | int | None]:
        """The fields for the operator API: amounts as integers, no redirect as null."""
        return asdict(self)


def hard_cap_ms(plan: Plan) -> int:
    """The most billable milliseconds the plan allows in one period.

    The included minutes, plus for ``"minutes"`` overage the overage minutes,
    or for ``"money"`` overage as many whole milliseconds as the money limit
    buys at the overage price: ``floor(limit_micros * 60000 / price_per_minute)``.
    Rounding down keeps the overage charge of a period that stops exactly at the
    cap within the money limit. Compare it with time already rounded by
    :func:`bill_ms`.
    """
    included_ms = plan.included_minutes * MS_PER_MINUTE
    if plan.overage == "minutes":
        return included_ms + plan.overage_limit * MS_PER_MINUTE
    if plan.overage == "money":
        bought_ms = plan.overage_limit * MS_PER_MINUTE
        return included_ms + bought_ms // plan.overage_price_micros_per_minute
    return included_ms


def overrun_bound_ms(
    plan: Plan,
    *,
    tick_ms: int,
    lease_ms: int,
    emergency_grant_ms: int,
    hangup_ms: int,
) -> int:
    """How far a period's billed time may pass :func:`hard_cap_ms` by design.

    This is the README's published bound, the worst of its three cases: each of
    the ``max_concurrent_calls`` calls live at the cap runs on for a report
    tick (normal running), a lease (its process died) or the emergency grant
    (a store outage under ``continue``; pass 0 under ``terminate``), then takes
    ``hangup_ms`` to end, and its settlement rounds up by one billing increment.
    Billed time beyond the cap plus this means enforcement failed.
    """
    run_on_ms = max(tick_ms, lease_ms, emergency_grant_ms)
    per_call_ms = run_on_ms + hangup_ms + INCREMENT_MS[plan.billing_increment]
    return plan.max_concurrent_calls * per_call_ms


@dataclass(frozen=True, slots=True)
class Period:
    """A billing period: one calendar month in the plan's zone.

    ``start_ms`` and ``end_ms`` are epoch milliseconds of local midnight on the
    first of this month and of the next; the period is ``[start_ms, end_ms)``,
    so its length follows the zone's daylight-saving changes. ``label`` is the
    local month, ``YYYY-MM``.
    """

    label: str
    start_ms: int
    end_ms: int


def _local(epoch_ms: int, zone: ZoneInfo) -> datetime:
    # Adding a timedelta keeps milliseconds exact where fromtimestamp would
    # pass through a float of seconds.
    return (_EPOCH + timedelta(milliseconds=epoch_ms)).astimezone(zone)


def _epoch_ms(moment: datetime) -> int:
    return (moment - _EPOCH) // _ONE_MS


def period_of(epoch_ms: int, timezone: str) -> Period:
    """The calendar month in ``timezone`` that contains the instant ``epoch_ms``.

    Raises :class:`PlanError` for a zone name that does not load.
    """
    zone = _zone(timezone)
    local = _local(epoch_ms, zone)
    if local.month == 12:
        next_year, next_month = local.year + 1, 1
    else:
        next_year, next_month = local.year, local.month + 1
    # A local midnight skipped by a clock change (fold=0 then takes the offset
    # in force before it) resolves to the instant of the change, which is
    # where that day begins.
    start = datetime(local.year, local.month, 1, tzinfo=zone)
    end = datetime(next_year, next_month, 1, tzinfo=zone)
    return Period(
        label=f"{local.year:04d}-{local.month:02d}",
        start_ms=_epoch_ms(start),
        end_ms=_epoch_ms(end),
    )


def day_of(epoch_ms: int, timezone: str) -> str:
    """The date (``YYYY-MM-DD``) in ``timezone`` of the instant ``epoch_ms``."""
    return _local(epoch_ms, _zone(timezone)).date().isoformat()


@dataclass(frozen=True, slots=True)
class RateCard:
    """What serving one minute costs the agency, per provider, in micro-units.

    The defaults are published list prices when this was written (Twilio inbound voice
    $0.0085/min, Twilio's outbound SIP interface $0.004/min, Vapi's platform fee
    $0.05/min, Retell from $0.07/min), here so that a fresh install shows
    plausible margins. They are not quotes: override them with the agency's
    contracted rates.
    """

    twilio_micros_per_minute: int = 8_500
    twilio_sip_micros_per_minute: int = 4_000
    vapi_micros_per_minute: int = 50_000
    retell_micros_per_minute: int = 70_000

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if type(value) is not int or not 0 <= value <= MAX_EXACT_INT:
                raise InvalidInputError(
                    f"{spec.name} must be a non-negative integer", spec.name
                )


@dataclass(frozen=True, slots=True)
class CallCost:
    """What one call cost the agency, in micro-units; ``total_micros`` is the sum.

    ``caller_leg_micros`` is the part of ``twilio_micros`` that the caller's
    own leg costs: the part Twilio's reported duration reprices.
    """

    twilio_micros: int
    platform_micros: int
    total_micros: int
    caller_leg_micros: int = 0


def call_cost_micros(duration_ms: int, provider: Provider, card: RateCard) -> CallCost:
    """The cost to serve one call of ``duration_ms`` through ``provider``.

    Twilio bills every started minute of each call leg, so any call longer
    than 0 ms costs at least a minute (protocols §4). A Retell call has two
    legs, the caller's and the ``<Dial><Sip>`` leg to Retell, each billed
    apart; both are priced on ``duration_ms``, the SIP leg's connected time.
    Vapi and Retell bill per second (§5.5, §6.4): the duration is rounded up
    to whole seconds and priced at a sixtieth of the per-minute rate, half up
    to a whole micro-unit. Retell's 10 s minimum for short calls that open
    with a dynamic greeting is not modelled.
    """
    if duration_ms < 0:
        raise ValueError("duration_ms must not be negative")
    twilio_per_minute = card.twilio_micros_per_minute
    if provider == "vapi":
        platform_per_minute = card.vapi_micros_per_minute
    elif provider == "retell":
        platform_per_minute = card.retell_micros_per_minute
        twilio_per_minute += card.twilio_sip_micros_per_minute
    else:
        raise ValueError("unknown provider")

    twilio_minutes = _ceil_div(duration_ms, MS_PER_MINUTE)
    twilio_micros = twilio_minutes * twilio_per_minute
    platform_secs = _ceil_div(duration_ms, MS_PER_SECOND)
    platform_micros = _div_half_up(platform_secs * platform_per_minute, 60)
    return CallCost(
        twilio_micros=twilio_micros,
        platform_micros=platform_micros,
        total_micros=twilio_micros + platform_micros,
        caller_leg_micros=twilio_minutes * card.twilio_micros_per_minute,
    )


@dataclass(frozen=True, slots=True)
class Statement:
    """One period of one workspace, as the client is charged for it.

    Durations are milliseconds, money is micro-units of the plan's currency.
    ``billed_minutes_milli`` is ``billed_ms`` in thousandths of a minute,
    rounded half up, for display only: all arithmetic uses ``billed_ms``.
    ``price_micros`` is the base fee plus the overage priced per minute pro
    rata to the millisecond; ``margin_micros`` is price minus cost and is
    negative when the period lost money. ``allowance_ms`` is
    :func:`hard_cap_ms`; usage may pass it by the enforcement overrun, and
    that overrun is priced like any other overage.
    """

    billed_ms: int
    billed_minutes_milli: int
    included_ms: int
    overage_ms: int
    allowance_ms: int
    price_micros: int
    cost_micros: int
    margin_micros: int


def statement(plan: Plan, billed_ms: int, cost_micros: int) -> Statement:
    """The statement for a period with ``billed_ms`` of billable time.

    ``billed_ms`` is the sum of :func:`bill_ms` over the period's calls and
    ``cost_micros`` the sum of their :func:`call_cost_micros` totals.
    """
    if billed_ms < 0:
        raise ValueError("billed_ms must not be negative")
    if cost_micros < 0:
        raise ValueError("cost_micros must not be negative")
    included_ms = plan.included_minutes * MS_PER_MINUTE
    overage_ms = max(0, billed_ms - included_ms)
    overage_micros = _div_half_up(
        overage_ms * plan.overage_price_micros_per_minute, MS_PER_MINUTE
    )
    price_micros = plan.base_fee_micros + overage_micros
    return Statement(
        billed_ms=billed_ms,
        billed_minutes_milli=_div_half_up(billed_ms, 60),
        included_ms=included_ms,
        overage_ms=overage_ms,
        allowance_ms=hard_cap_ms(plan),
        price_micros=price_micros,
        cost_micros=cost_micros,
        margin_micros=price_micros - cost_micros,
    )
