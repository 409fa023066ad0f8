"""Plan-side rules of a billing run that need no database: grouping and batching."""

from __future__ import annotations

from datetime import date

from iamport_billing.billing_run import MAX_MAP_LENGTH, _fit_map_length, validated
from iamport_billing.policy import ChargeCandidate, RejectedRow, ValidationLimits

DAY = date(2026, 11, 26)


def row(sub, amount=1000):
    return {
        "subscription_id": sub,
        "customer_uid": f"c{sub}",
        "amount": amount,
        "billing_date": DAY,
    }


def test_a_subscription_listed_twice_is_rejected_whole():
    out = list(validated([row("a"), row("b"), row("b", 2000), row("c")], run_date=DAY,
                         limits=ValidationLimits()))  # fmt: skip
    assert [type(o).__name__ for o in out] == ["ChargeCandidate", "RejectedRow", "ChargeCandidate"]
    assert isinstance(out[1], RejectedRow) and out[1].code == "duplicate_in_due_query"


def test_the_same_id_as_number_and_text_is_one_subscription():
    out = list(validated([row(1), row("1")], run_date=DAY, limits=ValidationLimits()))
    assert len(out) == 1 and out[0].code == "duplicate_in_due_query"


def test_rows_without_an_id_are_rejected_one_by_one():
    out = list(validated([row(None), row(None), row("a")], run_date=DAY, limits=ValidationLimits()))
    assert [getattr(o, "code", None) for o in out[:2]] == ["missing_subscription_id"] * 2
    assert isinstance(out[2], ChargeCandidate)


def test_batches_are_merged_until_airflow_can_map_them():
    batches = [
        {"after": str(i - 1) if i else None, "until": str(i), "count": 1} for i in range(3000)
    ]
    fitted = _fit_map_length(batches)
    assert len(fitted) <= MAX_MAP_LENGTH
    assert sum(b["count"] for b in fitted) == 3000
    assert fitted[0]["after"] is None and fitted[-1]["until"] == "2999"
    assert all(a["until"] == b["after"] for a, b in zip(fitted, fitted[1:], strict=False))
