"""Tests for plans, billing periods and the integer money arithmetic."""

from __future__ import annotations

from dataclasses import asdict, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from metering.plans import (
    MS_PER_MINUTE,
    BillingIncrement,
    CallCost,
    Period,
    Plan,
    PlanError,
    RateCard,
    Statement,
    bill_ms,
    call_cost_micros,
    day_of,
    hard_cap_ms,
    overrun_bound_ms,
    period_of,
    statement,
)
from tenancy.errors import CallgateError, InvalidInputError

HOUR_MS = 3_600_000

REDIRECT_PLAN = Plan(
    timezone="America/Los_Angeles",
    included_minutes=500,
    overage="minutes",
    overage_limit=120,
    overage_price_micros_per_minute=150_000,
    base_fee_micros=99_000_000,
    max_concurrent_calls=4,
    billing_increment="minute",
    on_exhausted="redirect",
    exhausted_redirect_number="+14155550100",
    reject_with="reject",
    currency="EUR",
)

MONEY_PLAN = Plan(
    timezone="Europe/Paris",
    included_minutes=100,
    overage="money",
    overage_limit=10_000_000,
    overage_price_micros_per_minute=70_000,
    base_fee_micros=49_000_000,
    billing_increment="six_seconds",
)


def utc_ms(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, ms: int = 0
) -> int:
    """Epoch milliseconds of a UTC wall-clock time."""
    moment = datetime(year, month, day, hour, minute, tzinfo=UTC)
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1) + ms


@pytest.mark.parametrize(
    ("duration_ms", "increment", "expected_ms"),
    [
        (0, "second", 0),
        (1, "second", 1_000),
        (999, "second", 1_000),
        (1_000, "second", 1_000),
        (1_001, "second", 2_000),
        (0, "six_seconds", 0),
        (1, "six_seconds", 6_000),
        (6_000, "six_seconds", 6_000),
        (6_001, "six_seconds", 12_000),
        (0, "minute", 0),
        (1, "minute", 60_000),
        (59_999, "minute", 60_000),
        (60_000, "minute", 60_000),
        (60_001, "minute", 120_000),
        (3_600_000, "minute", 3_600_000),
    ],
)
def test_bill_ms_rounds_up_to_increment(
    duration_ms: int, increment: BillingIncrement, expected_ms: int
) -> None:
    """A call's time rounds up to the next whole increment and zero stays zero."""
    assert bill_ms(duration_ms, increment) == expected_ms


def test_bill_ms_rejects_negative_duration() -> None:
    """A negative duration is a ValueError."""
    with pytest.raises(ValueError, match="negative"):
        bill_ms(-1, "second")


def test_bill_ms_rejects_unknown_increment() -> None:
    """An increment outside the three known ones is a ValueError."""
    increment: Any = "hour"
    with pytest.raises(ValueError, match="increment"):
        bill_ms(1_000, increment)


def test_plan_defaults_allow_nothing() -> None:
    """The all-default plan is valid, in UTC and USD, and caps the period at zero."""
    plan = Plan()
    assert (plan.timezone, plan.currency, plan.billing_increment) == (
        "UTC",
        "USD",
        "second",
    )
    assert hard_cap_ms(plan) == 0


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"included_minutes": -1}, "included_minutes"),
        ({"included_minutes": True}, "included_minutes"),
        ({"included_minutes": "5"}, "included_minutes"),
        ({"included_minutes": 2**53}, "included_minutes"),
        ({"included_minutes": 2**53 // MS_PER_MINUTE + 1}, "included_minutes"),
        ({"overage": "unlimited"}, "overage"),
        ({"overage_limit": 5}, "overage_limit"),
        ({"overage": "minutes", "overage_limit": -1}, "overage_limit"),
        (
            {
                "overage": "money",
                "overage_limit": 2**53 - 1,
                "overage_price_micros_per_minute": 1,
            },
            "overage_limit",
        ),
        (
            {"overage": "money", "overage_limit": 1_000_000},
            "overage_price_micros_per_minute",
        ),
        ({"overage_price_micros_per_minute": -1}, "overage_price_micros_per_minute"),
        ({"base_fee_micros": -1}, "base_fee_micros"),
        ({"base_fee_micros": 1.5}, "base_fee_micros"),
        ({"max_concurrent_calls": 0}, "max_concurrent_calls"),
        ({"billing_increment": "hour"}, "billing_increment"),
        ({"on_exhausted": "voicemail"}, "on_exhausted"),
        ({"on_exhausted": "redirect"}, "exhausted_redirect_number"),
        (
            {"on_exhausted": "redirect", "exhausted_redirect_number": "4155550100"},
            "exhausted_redirect_number",
        ),
        (
            {"on_exhausted": "redirect", "exhausted_redirect_number": "+04155550100"},
            "exhausted_redirect_number",
        ),
        (
            {"on_exhausted": "redirect", "exhausted_redirect_number": "+1415555010\n"},
            "exhausted_redirect_number",
        ),
        (
            {
                "on_exhausted": "redirect",
                "exhausted_redirect_number": "+1234567890123456",
            },
            "exhausted_redirect_number",
        ),
        ({"exhausted_redirect_number": "+14155550100"}, "exhausted_redirect_number"),
        ({"reject_with": "busy"}, "reject_with"),
        ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({"timezone": "localtime"}, "timezone"),
        ({"timezone": "../etc/passwd"}, "timezone"),
        ({"timezone": "zone.tab"}, "timezone"),
        ({"timezone": ""}, "timezone"),
        ({"currency": "usd"}, "currency"),
        ({"currency": "US"}, "currency"),
        ({"currency": "USDX"}, "currency"),
    ],
)
def test_plan_rejects_invalid_field(changes: dict[str, Any], field: str) -> None:
    """An invalid value raises PlanError naming the field in its attribute and text."""
    with pytest.raises(PlanError) as caught:
        Plan(**changes)
    assert caught.value.field == field
    assert field in str(caught.value)
    assert str(caught.value) == str(caught.value).lower()


def test_plan_error_is_an_invalid_input_error() -> None:
    """PlanError sits in Callgate's tree and is also a ValueError."""
    assert issubclass(PlanError, InvalidInputError)
    assert issubclass(PlanError, CallgateError)
    assert issubclass(PlanError, ValueError)


def test_plan_accepts_the_longest_e164_number() -> None:
    """A redirect number of fifteen digits is valid."""
    plan = Plan(on_exhausted="redirect", exhausted_redirect_number="+123456789012345")
    assert plan.exhausted_redirect_number == "+123456789012345"


@pytest.mark.parametrize("plan", [Plan(), REDIRECT_PLAN, MONEY_PLAN])
def test_plan_fields_round_trip(plan: Plan) -> None:
    """A plan written as string fields reads back equal, with every field present."""
    written = plan.to_fields()
    assert set(written) == {spec.name for spec in fields(Plan)}
    assert all(type(value) is str for value in written.values())
    assert Plan.from_fields(written) == plan


def test_plan_fields_write_no_redirect_as_empty() -> None:
    """A plan without a redirect number writes an empty string, not a missing key."""
    written = Plan().to_fields()
    assert written["exhausted_redirect_number"] == ""
    assert written["included_minutes"] == "0"


def test_plan_from_fields_fills_defaults_and_ignores_strangers() -> None:
    """Absent fields take their defaults and keys that are not fields are ignored."""
    assert Plan.from_fields({}) == Plan()
    read = Plan.from_fields({"included_minutes": "90", "updated_at_ms": "1"})
    assert read == Plan(included_minutes=90)


@pytest.mark.parametrize("text", ["1.5", " 12", "12 ", "+3", "1_000", "", "x", "١٢"])
def test_plan_from_fields_rejects_malformed_integer(text: str) -> None:
    """An integer field that is not plain ASCII decimal raises PlanError."""
    with pytest.raises(PlanError) as caught:
        Plan.from_fields({"max_concurrent_calls": text})
    assert caught.value.field == "max_concurrent_calls"


def test_plan_from_fields_validates_values() -> None:
    """A well-formed but invalid value in the hash raises PlanError."""
    with pytest.raises(PlanError) as caught:
        Plan.from_fields({"included_minutes": "-1"})
    assert caught.value.field == "included_minutes"


def test_plan_to_json_keeps_types() -> None:
    """The API form has integers as integers, null for no number, and round-trips."""
    assert REDIRECT_PLAN.to_json() == {
        "timezone": "America/Los_Angeles",
        "included_minutes": 500,
        "overage": "minutes",
        "overage_limit": 120,
        "overage_price_micros_per_minute": 150_000,
        "base_fee_micros": 99_000_000,
        "max_concurrent_calls": 4,
        "billing_increment": "minute",
        "on_exhausted": "redirect",
        "exhausted_redirect_number": "+14155550100",
        "reject_with": "reject",
        "currency": "EUR",
    }
    assert Plan().to_json()["exhausted_redirect_number"] is None
    as_json: dict[str, Any] = MONEY_PLAN.to_json()
    assert Plan(**as_json) == MONEY_PLAN


def test_hard_cap_ms_without_overage_is_included_minutes() -> None:
    """With no overage the cap is the included minutes."""
    assert hard_cap_ms(Plan(included_minutes=100)) == 6_000_000


def test_hard_cap_ms_adds_overage_minutes() -> None:
    """With minutes overage the cap is included plus overage minutes."""
    plan = Plan(included_minutes=100, overage="minutes", overage_limit=50)
    assert hard_cap_ms(plan) == 9_000_000


def test_hard_cap_ms_buys_whole_milliseconds_with_money() -> None:
    """With money overage the limit buys floor(limit * 60000 / price) ms."""
    # $10 at $0.07/min: 600_000_000_000 / 70_000 = 8_571_428.57… ms.
    assert hard_cap_ms(MONEY_PLAN) == 6_000_000 + 8_571_428
    # $10 at $0.12/min is exactly 83 min 20 s.
    even = Plan(
        included_minutes=100,
        overage="money",
        overage_limit=10_000_000,
        overage_price_micros_per_minute=120_000,
    )
    assert hard_cap_ms(even) == 6_000_000 + 5_000_000


def test_hard_cap_ms_money_cap_keeps_charge_within_limit() -> None:
    """A period stopped exactly at a money cap is charged no more than the limit."""
    cap_ms = hard_cap_ms(MONEY_PLAN)
    # 8_571_428 ms * 70_000 / 60_000 = 9_999_999.33… micros, half up 9_999_999.
    charged = statement(MONEY_PLAN, cap_ms, 0)
    assert charged.price_micros == 49_000_000 + 9_999_999


def test_overrun_bound_ms_takes_the_worst_case_per_call() -> None:
    """Each concurrent call adds its longest run-on, a hang-up and one increment."""
    plan = Plan(included_minutes=10, max_concurrent_calls=3, billing_increment="minute")
    # The lease (10 s) outlasts the tick and, under terminate, the outage case.
    bound = overrun_bound_ms(
        plan, tick_ms=1_000, lease_ms=10_000, emergency_grant_ms=0, hangup_ms=1_000
    )
    assert bound == 3 * (10_000 + 1_000 + 60_000)
    # Under continue, a 60 s emergency grant is the longest a call runs on.
    bound = overrun_bound_ms(
        plan, tick_ms=1_000, lease_ms=10_000, emergency_grant_ms=60_000, hangup_ms=0
    )
    assert bound == 3 * (60_000 + 60_000)


def test_period_of_utc_instant_still_november_in_los_angeles() -> None:
    """Early on 1 December UTC is still November in Los Angeles, a 721-hour month."""
    period = period_of(utc_ms(2026, 12, 1, 5), "America/Los_Angeles")
    # November opens on PDT (UTC-7) and closes on PST (UTC-8).
    assert period == Period(
        label="2026-11",
        start_ms=utc_ms(2026, 11, 1, 7),
        end_ms=utc_ms(2026, 12, 1, 8),
    )
    assert period.end_ms - period.start_ms == 721 * HOUR_MS
    assert period_of(utc_ms(2026, 12, 1, 5), "UTC").label == "2026-12"


def test_period_of_paris_spring_month_loses_an_hour() -> None:
    """March in Paris runs from CET midnight to CEST midnight: 743 hours."""
    period = period_of(utc_ms(2026, 3, 15), "Europe/Paris")
    assert period == Period(
        label="2026-03",
        start_ms=utc_ms(2026, 2, 28, 23),
        end_ms=utc_ms(2026, 3, 31, 22),
    )
    assert period.end_ms - period.start_ms == 743 * HOUR_MS


def test_period_of_paris_autumn_month_gains_an_hour() -> None:
    """October in Paris runs from CEST midnight to CET midnight: 745 hours."""
    period = period_of(utc_ms(2026, 10, 25, 12), "Europe/Paris")
    assert period == Period(
        label="2026-10",
        start_ms=utc_ms(2026, 9, 30, 22),
        end_ms=utc_ms(2026, 10, 31, 23),
    )
    assert period.end_ms - period.start_ms == 745 * HOUR_MS


def test_period_of_rolls_over_the_year_at_local_midnight() -> None:
    """The new year starts at each zone's own midnight, to the millisecond."""
    new_year_utc = utc_ms(2027, 1, 1)
    assert period_of(new_year_utc - 1, "UTC") == Period(
        "2026-12", utc_ms(2026, 12, 1), new_year_utc
    )
    assert period_of(new_year_utc, "UTC") == Period(
        "2027-01", new_year_utc, utc_ms(2027, 2, 1)
    )

    new_year_tokyo = utc_ms(2026, 12, 31, 15)
    assert period_of(new_year_tokyo - 1, "Asia/Tokyo").label == "2026-12"
    assert period_of(new_year_tokyo, "Asia/Tokyo").start_ms == new_year_tokyo

    new_year_la = utc_ms(2027, 1, 1, 8)
    assert period_of(new_year_la - 1, "America/Los_Angeles").end_ms == new_year_la
    assert period_of(new_year_la, "America/Los_Angeles").label == "2027-01"


def test_period_of_half_hour_zone_starts_at_local_midnight() -> None:
    """In Kolkata (UTC+5:30) March starts at 18:30 UTC on the last day of February."""
    period = period_of(utc_ms(2026, 3, 10), "Asia/Kolkata")
    assert (period.label, period.start_ms) == ("2026-03", utc_ms(2026, 2, 28, 18, 30))


def test_period_of_skipped_midnight_starts_at_the_clock_change() -> None:
    """When clocks jump from midnight on the 1st, the month starts at the jump."""
    # Asunción moved from UTC-4 to UTC-3 at 00:00 local on 1 October 2023.
    period = period_of(utc_ms(2023, 10, 15), "America/Asuncion")
    assert period == Period(
        label="2023-10",
        start_ms=utc_ms(2023, 10, 1, 4),
        end_ms=utc_ms(2023, 11, 1, 3),
    )
    assert period.end_ms - period.start_ms == 743 * HOUR_MS
    assert period_of(period.start_ms - 1, "America/Asuncion").label == "2023-09"


@pytest.mark.parametrize(
    "timezone",
    [
        "UTC",
        "America/Los_Angeles",
        "Europe/Paris",
        "Asia/Tokyo",
        "Asia/Kolkata",
        "America/Asuncion",
        "Australia/Lord_Howe",
    ],
)
def test_period_of_contains_its_instant_and_tiles_time(timezone: str) -> None:
    """Every instant lies in its period, and each period ends where the next begins."""
    step_ms = 17 * HOUR_MS + 13 * 60_000 + 7
    for epoch_ms in range(utc_ms(2025, 12, 1), utc_ms(2027, 2, 1), step_ms):
        period = period_of(epoch_ms, timezone)
        assert period.start_ms <= epoch_ms < period.end_ms
        assert period_of(period.end_ms - 1, timezone) == period
        assert period_of(period.end_ms, timezone).start_ms == period.end_ms


def test_period_of_rejects_unknown_zone() -> None:
    """An unknown zone name raises PlanError naming the timezone."""
    with pytest.raises(PlanError) as caught:
        period_of(0, "Europe/Atlantis")
    assert caught.value.field == "timezone"


def test_day_of_uses_the_local_date() -> None:
    """The same instant is a different date in different zones."""
    instant = utc_ms(2026, 12, 3, 7)
    assert day_of(instant, "UTC") == "2026-12-03"
    assert day_of(instant, "America/Los_Angeles") == "2026-12-02"
    assert day_of(utc_ms(2026, 12, 3, 15), "Asia/Tokyo") == "2026-12-04"
    assert day_of(utc_ms(2026, 3, 28, 23), "Europe/Paris") == "2026-03-29"


@pytest.mark.parametrize(
    ("duration_ms", "twilio_micros"),
    [
        (0, 0),
        (1, 8_500),
        (60_000, 8_500),
        (60_001, 17_000),
        # protocols §4: a 1:20 call bills 2 minutes.
        (80_000, 17_000),
        (3_600_000, 510_000),
    ],
)
def test_call_cost_micros_rounds_twilio_up_to_the_minute(
    duration_ms: int, twilio_micros: int
) -> None:
    """Twilio's share is every started minute at the Twilio rate."""
    assert call_cost_micros(duration_ms, "vapi", RateCard()).twilio_micros == (
        twilio_micros
    )


@pytest.mark.parametrize(
    ("duration_ms", "provider", "platform_micros"),
    [
        (0, "vapi", 0),
        # 1 s of $0.05/min: 833.33… micros.
        (1, "vapi", 833),
        (1_000, "vapi", 833),
        (1_001, "vapi", 1_667),
        (60_000, "vapi", 50_000),
        # 61 s: 50_833.33… micros.
        (60_001, "vapi", 50_833),
        # 1 s of $0.07/min: 1_166.66… micros.
        (1, "retell", 1_167),
        # 91 s: 106_166.66… micros.
        (90_500, "retell", 106_167),
    ],
)
def test_call_cost_micros_prorates_platform_per_second(
    duration_ms: int, provider: Any, platform_micros: int
) -> None:
    """The platform share is whole seconds at a sixtieth of the minute rate."""
    cost = call_cost_micros(duration_ms, provider, RateCard())
    assert cost.platform_micros == platform_micros


def test_call_cost_micros_rounds_half_up() -> None:
    """A half micro-unit rounds up and less than half rounds down."""
    assert call_cost_micros(1_000, "vapi", RateCard(vapi_micros_per_minute=30)) == (
        CallCost(
            twilio_micros=8_500,
            platform_micros=1,
            total_micros=8_501,
            caller_leg_micros=8_500,
        )
    )
    assert call_cost_micros(1_000, "vapi", RateCard(vapi_micros_per_minute=29)) == (
        CallCost(
            twilio_micros=8_500,
            platform_micros=0,
            total_micros=8_500,
            caller_leg_micros=8_500,
        )
    )


def test_call_cost_micros_totals_both_parties() -> None:
    """The total is the Twilio share plus the platform share."""
    assert call_cost_micros(90_500, "vapi", RateCard()) == CallCost(
        twilio_micros=17_000,
        platform_micros=75_833,
        total_micros=92_833,
        caller_leg_micros=17_000,
    )


def test_call_cost_micros_bills_both_twilio_legs_of_a_retell_call() -> None:
    """A Retell call pays Twilio for the caller's leg and for the SIP leg."""
    # Two started minutes on each leg, 2 * (8_500 + 4_000); 91 s of Retell.
    # The caller's leg is the part Twilio's duration for the call reprices.
    assert call_cost_micros(90_500, "retell", RateCard()) == CallCost(
        twilio_micros=25_000,
        platform_micros=106_167,
        total_micros=131_167,
        caller_leg_micros=17_000,
    )
    free_sip = RateCard(twilio_sip_micros_per_minute=0)
    assert call_cost_micros(90_500, "retell", free_sip).twilio_micros == 17_000


def test_call_cost_micros_rejects_bad_input() -> None:
    """A negative duration or an unknown provider is a ValueError."""
    with pytest.raises(ValueError, match="negative"):
        call_cost_micros(-1, "vapi", RateCard())
    provider: Any = "bland"
    with pytest.raises(ValueError, match="provider"):
        call_cost_micros(1_000, provider, RateCard())


def test_rate_card_rejects_negative_price() -> None:
    """A negative rate raises InvalidInputError naming the rate."""
    with pytest.raises(InvalidInputError) as caught:
        RateCard(twilio_micros_per_minute=-1)
    assert caught.value.field == "twilio_micros_per_minute"


def test_statement_prices_overage_per_millisecond() -> None:
    """Overage is charged pro rata on top of the base fee, and margin is the rest."""
    plan = Plan(
        included_minutes=100,
        overage="minutes",
        overage_limit=50,
        overage_price_micros_per_minute=120_000,
        base_fee_micros=49_000_000,
    )
    # 112 min 30.5 s: 100 included, 750_500 ms over at 2 micros per ms.
    assert statement(plan, 6_750_500, 3_000_000) == Statement(
        billed_ms=6_750_500,
        billed_minutes_milli=112_508,
        included_ms=6_000_000,
        overage_ms=750_500,
        allowance_ms=9_000_000,
        price_micros=50_501_000,
        cost_micros=3_000_000,
        margin_micros=47_501_000,
    )


def test_statement_within_included_minutes_charges_the_base_fee() -> None:
    """Use under the included minutes costs the base fee and margin may be negative."""
    plan = Plan(
        included_minutes=1,
        overage_price_micros_per_minute=120_000,
        base_fee_micros=5_000_000,
    )
    assert statement(plan, 60_000, 6_000_000) == Statement(
        billed_ms=60_000,
        billed_minutes_milli=1_000,
        included_ms=60_000,
        overage_ms=0,
        allowance_ms=60_000,
        price_micros=5_000_000,
        cost_micros=6_000_000,
        margin_micros=-1_000_000,
    )


def test_statement_rounds_half_up() -> None:
    """Half a micro-unit and half a milli-minute round up; less rounds down."""
    plan = Plan(overage_price_micros_per_minute=10_000)
    # 3 ms at 10_000 micros/min is 0.5 micros; 30 ms is 0.5 milli-minutes.
    assert statement(plan, 3, 0).price_micros == 1
    assert statement(plan, 2, 0).price_micros == 0
    assert statement(plan, 30, 0).billed_minutes_milli == 1
    assert statement(plan, 29, 0).billed_minutes_milli == 0


def test_statement_rejects_negative_input() -> None:
    """Negative billed time or cost is a ValueError."""
    with pytest.raises(ValueError, match="billed_ms"):
        statement(Plan(), -1, 0)
    with pytest.raises(ValueError, match="cost_micros"):
        statement(Plan(), 0, -1)


def test_results_are_never_floats() -> None:
    """Every number the module returns is an int."""
    numbers: list[object] = [
        bill_ms(1_234, "six_seconds"),
        hard_cap_ms(MONEY_PLAN),
        *asdict(period_of(utc_ms(2026, 3, 15), "Europe/Paris")).values(),
        *asdict(call_cost_micros(61_234, "vapi", RateCard())).values(),
        *asdict(call_cost_micros(61_234, "retell", RateCard())).values(),
        *asdict(statement(MONEY_PLAN, 7_777_777, 1_234_567)).values(),
        *MONEY_PLAN.to_json().values(),
    ]
    assert not [value for value in numbers if isinstance(value, float)]
    assert all(type(value) in (int, str, type(None)) for value in numbers)
