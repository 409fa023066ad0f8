"""Billing policy: merchant_uid scheme, validation, declines, dunning, dates, guardrails."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import pendulum
import pytest
from iamport_billing.policy import (
    ChargeCandidate,
    DeclineTable,
    Guardrails,
    PlanTotals,
    RejectedRow,
    ValidationLimits,
    add_month_anchored,
    billing_date_of_run,
    guardrail_violations,
    merchant_uid_for,
    next_retry_date,
    parse_merchant_uid,
    rejected_key,
    validate_row,
)
from iamport_billing.states import (
    HARD,
    SOFT,
)

RUN = date(2026, 11, 26)
LIMITS = ValidationLimits(max_amount=1_000_000)


def row(**over):
    base = {
        "subscription_id": "sub_1",
        "customer_uid": "cust_1",
        "amount": 9900,
        "currency": "KRW",
        "name": "Monthly plan",
        "billing_date": RUN,
    }
    base.update(over)
    return base


def test_merchant_uid_is_deterministic_and_parseable():
    uid = merchant_uid_for("sub_1", RUN, 1)
    assert uid == "sub_1-20261126-01"
    assert merchant_uid_for("sub_1", RUN, 1) == uid
    assert parse_merchant_uid(uid) == ("sub_1", RUN, 1)


def test_merchant_uid_differs_per_attempt_and_date():
    uids = {
        merchant_uid_for("sub_1", RUN, 1),
        merchant_uid_for("sub_1", RUN, 2),
        merchant_uid_for("sub_1", date(2026, 12, 26), 1),
    }
    assert len(uids) == 3


def test_merchant_uid_never_exceeds_40_characters():
    assert len(merchant_uid_for("s" * 28, RUN, 99)) == 40
    with pytest.raises(ValueError, match="40"):
        merchant_uid_for("s" * 29, RUN, 1)


def test_foreign_merchant_uids_are_not_ours():
    assert parse_merchant_uid("order_id_8237352") is None
    assert parse_merchant_uid("sub-20261399-01") is None


def test_rejected_keys_never_collide_with_merchant_uids():
    key = rejected_key(RUN, "sub_1", "invalid_amount")
    assert parse_merchant_uid(key) is None
    assert key == rejected_key(RUN, "sub_1", "invalid_amount")
    assert len(key) <= 40


def test_valid_row_becomes_a_candidate():
    c = validate_row(row(amount="9900"), run_date=RUN, limits=LIMITS)
    assert isinstance(c, ChargeCandidate)
    assert (c.subscription_id, c.customer_uid, c.amount, c.billing_date) == (
        "sub_1",
        "cust_1",
        9900,
        RUN,
    )


@pytest.mark.parametrize(
    ("override", "code"),
    [
        ({"customer_uid": None}, "missing_customer_uid"),
        ({"customer_uid": ""}, "missing_customer_uid"),
        ({"customer_uid": "c" * 81}, "customer_uid_too_long"),
        ({"customer_uid": "cust\x00"}, "invalid_customer_uid"),
        ({"amount": 0}, "non_positive_amount"),
        ({"amount": -100}, "non_positive_amount"),
        ({"amount": 99.5}, "invalid_amount"),
        ({"amount": "ten thousand"}, "invalid_amount"),
        ({"amount": None}, "invalid_amount"),
        ({"amount": True}, "invalid_amount"),
        ({"amount": 1_000_001}, "amount_over_cap"),
        ({"currency": "USD"}, "unsupported_currency"),
        ({"subscription_id": None}, "missing_subscription_id"),
        ({"subscription_id": "has space"}, "invalid_subscription_id"),
        ({"subscription_id": "s" * 29}, "merchant_uid_too_long"),
        ({"billing_date": date(2027, 1, 1)}, "billing_date_in_future"),
        ({"billing_date": date(1999, 1, 1)}, "billing_date_too_old"),
        ({"billing_date": "not a date"}, "invalid_billing_date"),
        ({"name": "a" * 41}, "name_too_long"),
        ({"name": "bad\nname"}, "invalid_name"),
        ({"buyer_email": "x\x07@y"}, "invalid_buyer"),
    ],
)
def test_bad_rows_are_rejected_with_a_reason(override, code):
    r = validate_row(row(**override), run_date=RUN, limits=LIMITS)
    assert isinstance(r, RejectedRow)
    assert r.code == code
    assert r.reason


def test_integral_decimal_amounts_are_accepted():
    c = validate_row(row(amount=Decimal("9900.00")), run_date=RUN, limits=LIMITS)
    assert isinstance(c, ChargeCandidate) and c.amount == 9900


def test_sql_in_a_name_is_just_text():
    c = validate_row(row(name="'); DROP TABLE x;--"), run_date=RUN, limits=LIMITS)
    assert isinstance(c, ChargeCandidate) and c.name == "'); DROP TABLE x;--"


def test_missing_name_gets_the_default():
    c = validate_row(row(name=None), run_date=RUN, limits=LIMITS)
    assert isinstance(c, ChargeCandidate) and c.name == LIMITS.default_name


def test_single_charge_may_bring_its_own_merchant_uid():
    c = validate_row(
        row(subscription_id="order_id_8237352"),
        run_date=RUN,
        limits=LIMITS,
        merchant_uid="order_id_8237352",
    )
    assert isinstance(c, ChargeCandidate)
    r = validate_row(row(), run_date=RUN, limits=LIMITS, merchant_uid="m" * 41)
    assert isinstance(r, RejectedRow) and r.code == "merchant_uid_too_long"


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("[분실도난] 분실 또는 도난 카드입니다 (lost or stolen card)", HARD),
        ("유효기간 만료 카드", HARD),
        ("[잔액부족] 카드 잔액이 부족합니다 (insufficient funds)", SOFT),
        ("한도초과", SOFT),
        (None, SOFT),
    ],
)
def test_default_decline_table(reason, kind):
    assert DeclineTable().classify(reason) == kind


def test_decline_table_is_configuration():
    table = DeclineTable.from_config({"hard_patterns": ["한도초과"], "hard_codes": ["-1"]})
    assert table.classify("한도초과") == HARD
    assert table.classify("분실") == SOFT
    assert table.classify("anything", code=-1) == HARD


def test_dunning_schedule_counts_days_after_the_first_decline():
    first = date(2026, 11, 1)
    assert [next_retry_date(first, n) for n in range(1, 6)] == [
        date(2026, 11, 2),
        date(2026, 11, 4),
        date(2026, 11, 6),
        date(2026, 11, 8),
        None,
    ]
    assert next_retry_date(first, 1, schedule=(2,)) == date(2026, 11, 3)
    assert next_retry_date(first, 2, schedule=(2,)) is None


@pytest.mark.parametrize(
    ("day", "anchor", "expected"),
    [
        (date(2026, 1, 31), 31, date(2026, 2, 28)),
        (date(2026, 2, 28), 31, date(2026, 3, 31)),
        (date(2028, 1, 31), 31, date(2028, 2, 29)),
        (date(2026, 12, 15), 15, date(2027, 1, 15)),
        (date(2026, 4, 30), None, date(2026, 5, 30)),
        (date(2026, 2, 28), 30, date(2026, 3, 30)),
    ],
)
def test_month_end_anchor_dates(day, anchor, expected):
    assert add_month_anchored(day, anchor) == expected


def test_billing_date_is_the_logical_date_in_seoul():
    # 2026-11-26 01:00 UTC is 10:00 in Seoul on the 26th; 16:00 UTC is already the 27th there.
    assert billing_date_of_run(pendulum.datetime(2026, 11, 26, 1, tz="UTC"), None) == RUN
    assert billing_date_of_run(pendulum.datetime(2026, 11, 26, 16, tz="UTC"), None) == date(
        2026, 11, 27
    )


def test_manual_runs_without_logical_date_use_run_after():
    run_after = datetime(2026, 11, 26, 3, 0, tzinfo=pendulum.timezone("UTC"))
    assert billing_date_of_run(None, run_after) == RUN


def test_guardrails_name_every_broken_limit():
    totals = PlanTotals(count=11, total_amount=5_000_000)
    problems = guardrail_violations(
        totals, Guardrails(max_count=10, max_total_amount=1_000_000), previous_total=1_000_000
    )
    assert len(problems) == 3
    assert any("max_count" in p for p in problems)
    assert any("previous run" in p for p in problems)


def test_guardrails_pass_within_limits():
    totals = PlanTotals(count=10, total_amount=1_000_000)
    assert guardrail_violations(totals, Guardrails(max_count=10), previous_total=900_000) == []


def test_a_row_without_its_billing_date_is_rejected_not_charged_for_the_run_date():
    r = validate_row(row(billing_date=None), run_date=RUN, limits=LIMITS)
    assert isinstance(r, RejectedRow) and r.code == "missing_billing_date"
