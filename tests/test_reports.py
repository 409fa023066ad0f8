"""The Billing page's read queries on every ledger database: the per-customer figures and the
refunds fold many attempts in SQL (derived tables, CASE sums), where dialects differ."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from iamport_billing.warehouse.reports import BillingQueries
from support import attempt_row

DAY = date(2026, 11, 24)


def seed(ledger, rows) -> BillingQueries:
    for row in rows:
        assert ledger.insert_attempt(row)
    return BillingQueries(ledger)


def soft(uid: str, **fields) -> dict:
    return attempt_row(
        uid, "failed", DAY, decline_kind="soft", fail_reason="[잔액부족] insufficient funds",
        **fields,
    )  # fmt: skip


@pytest.fixture
def queries(ledger) -> BillingQueries:
    """One billing date, one customer per way a period can end, and a rejected row."""
    return seed(
        ledger,
        [
            attempt_row("a-20261124-01", "paid", DAY),
            attempt_row("b-20261124-01", "cancelled", DAY, amount=30_000, paid_amount=30_000,
                        cancel_amount=10_000),
            soft("c-20261124-01", next_retry_date=DAY + timedelta(days=1)),
            attempt_row("c-20261124-02", "paid", DAY, attempt_no=2,
                        completed_at=datetime(2026, 11, 27, 0, 30, tzinfo=UTC)),
            soft("d-20261124-01", next_retry_date=DAY + timedelta(days=3)),
            soft("e-20261124-01", amount=5_000),
            attempt_row("f-20261124-01", "failed", DAY, decline_kind="hard", amount=7_000,
                        error_code="missing_billing_key"),
            attempt_row("g-20261124-01", "unknown", DAY),
            attempt_row("h-rejected", "rejected", DAY, attempt_no=0, amount=-5),
        ],
    )  # fmt: skip


def test_each_customer_is_counted_once_by_how_its_period_ended(queries):
    figures = queries.customer_figures([DAY])[DAY]
    assert (figures.customers, figures.paid_first, figures.recovered) == (7, 2, 1)
    assert (figures.in_dunning, figures.lost, figures.no_billing_key) == (1, 1, 1)
    assert (figures.unsettled, figures.other) == (1, 0)


def test_recovery_is_measured_against_failed_first_attempts_in_count_and_krw(queries):
    figures = queries.customer_figures([DAY])[DAY]
    # failed first: c (recovered), d (in dunning), e (lost), f (no billing key)
    assert (figures.failed_first, figures.failed_first_krw) == (4, 9_900 * 2 + 5_000 + 7_000)
    assert (figures.recovered, figures.recovered_krw) == (1, 9_900)
    assert figures.days_to_recover == [3]  # paid 2026-11-27 09:30 in Seoul
    assert (figures.lost_krw, figures.no_billing_key_krw) == (5_000, 7_000)


def test_refunds_and_net_count_what_the_gateway_took_and_gave_back(queries):
    outcomes = queries.outcomes_by_date([DAY])[DAY]
    # taken: a 9,900 + b 30,000 + c 9,900; given back 10,000 of b
    assert (outcomes.collected, outcomes.refunded, outcomes.net) == (49_800, 10_000, 39_800)
