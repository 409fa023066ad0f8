"""The ledger on real SQLite, PostgreSQL and MariaDB databases."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from iamport_billing.policy import RejectedRow
from iamport_billing.states import FAILED, PAID, PENDING
from iamport_billing.warehouse.ledger import DEFAULT_DUE_QUERY, Outcome, checked_identifier
from support import add_subscriptions

DAY = date(2026, 11, 26)
RUN = {"dag_id": "d", "run_id": "r1", "task_id": "charge[0]", "try_number": 1}


def attempt_row(uid="s1-20261126-01", sub="s1"):
    return {
        "merchant_uid": uid,
        "subscription_id": sub,
        "billing_date": DAY,
        "attempt_no": 1,
        "customer_uid": "c1",
        "amount": 1000,
        "currency": "KRW",
        **RUN,
    }


def test_schema_init_is_idempotent(ledger):
    ledger.init_schema()
    ledger.init_schema()
    assert ledger.query("SELECT COUNT(*) FROM billing_charge_attempts") == [(0,)]


def test_due_query_reads_by_keyset_in_order(ledger):
    add_subscriptions(ledger, [(f"s{i:04d}", f"c{i}", 1000 + i) for i in range(25)], DAY)
    rows = list(ledger.due_source().iter_due(DEFAULT_DUE_QUERY, DAY, page_size=7))
    assert [r["subscription_id"] for r in rows] == [f"s{i:04d}" for i in range(25)]


def test_due_query_range_is_after_exclusive_until_inclusive(ledger):
    add_subscriptions(ledger, [(f"s{i}", f"c{i}", 1000) for i in range(5)], DAY)
    rows = list(ledger.due_source().iter_due(DEFAULT_DUE_QUERY, DAY, after="s1", until="s3"))
    assert [r["subscription_id"] for r in rows] == ["s2", "s3"]


def test_due_query_binds_the_billing_date(ledger):
    add_subscriptions(ledger, [("early", "c1", 1000)], DAY)
    add_subscriptions(ledger, [("later", "c2", 1000)], date(2026, 11, 27))
    assert [r["subscription_id"] for r in ledger.due_source().iter_due(DEFAULT_DUE_QUERY, DAY)] == [
        "early"
    ]


def test_duplicate_keys_never_split_across_pages(ledger):
    add_subscriptions(ledger, [(f"s{i}", f"c{i}", 1000) for i in range(4)], DAY)
    union = (
        "SELECT subscription_id, customer_uid, amount, next_billing_date AS billing_date "
        "FROM billing_subscriptions WHERE next_billing_date <= :billing_date "
        "UNION ALL SELECT subscription_id, customer_uid, amount, next_billing_date "
        "FROM billing_subscriptions WHERE subscription_id = 's1'"
    )
    rows = [r["subscription_id"] for r in ledger.due_source().iter_due(union, DAY, page_size=2)]
    assert rows == ["s0", "s1", "s1", "s2", "s3"]


def test_claim_is_won_by_exactly_one_claimant(ledger):
    assert ledger.claim([attempt_row()], "token-a") == {"s1-20261126-01"}
    assert ledger.claim([attempt_row()], "token-b") == set()
    (row,) = ledger.attempts_for(["s1"])[("s1", DAY)]
    assert (row.status, row.claim_token) == (PENDING, "token-a")


def test_a_decline_only_lands_on_a_row_the_claim_owns(ledger):
    ledger.claim([attempt_row()], "token-a")
    refused = ledger.record_outcomes([Outcome("s1-20261126-01", FAILED)], "token-b")
    assert [r.current_status for r in refused] == [PENDING]
    assert ledger.get_attempt("s1-20261126-01").status == PENDING
    assert ledger.record_outcomes([Outcome("s1-20261126-01", FAILED)], "token-a") == []
    got = ledger.get_attempt("s1-20261126-01")
    assert got.status == FAILED and got.completed_at is not None


def test_a_paid_answer_lands_whoever_brings_it_and_beats_a_decline(ledger):
    ledger.claim([attempt_row()], "token-a")
    ledger.record_outcomes([Outcome("s1-20261126-01", FAILED)], "token-a")
    refused = ledger.record_outcomes(
        [Outcome("s1-20261126-01", PAID, imp_uid="imp_1", paid_amount=1000)], "token-b"
    )
    got = ledger.get_attempt("s1-20261126-01")
    assert refused == [] and (got.status, got.imp_uid, got.paid_amount) == (PAID, "imp_1", 1000)


def test_rejected_rows_are_upserted_once_per_reason(ledger):
    bad = RejectedRow("s9", "c9", 0, DAY, "non_positive_amount", "amount 0 is not positive")
    ledger.record_rejected([bad], RUN)
    ledger.record_rejected([bad], {**RUN, "run_id": "r2"})
    rows = ledger.query(
        "SELECT status, error_code, error_message, run_id FROM billing_charge_attempts"
    )
    assert rows == [("rejected", "non_positive_amount", "amount 0 is not positive", "r2")]


def test_release_drops_only_unsent_pending_rows_of_the_claim(ledger):
    ledger.claim([attempt_row(), attempt_row("s2-20261126-01", "s2")], "tok")
    ledger.release(["s1-20261126-01"], "other-token")
    ledger.release(["s2-20261126-01"], "tok")
    assert ledger.get_attempt("s1-20261126-01") is not None
    assert ledger.get_attempt("s2-20261126-01") is None


def test_advance_only_moves_a_subscription_still_on_that_date(ledger):
    add_subscriptions(ledger, [("s1", "c1", 1000)], DAY)
    ledger.advance_subscriptions([("s1", DAY, date(2026, 12, 26))])
    ledger.advance_subscriptions([("s1", DAY, date(2027, 1, 26))])
    (row,) = ledger.query("SELECT next_billing_date FROM billing_subscriptions")
    assert str(row[0])[:10] == "2026-12-26"


def test_table_names_must_be_plain_identifiers():
    assert checked_identifier("billing.subs") == "billing.subs"
    with pytest.raises(ValueError):
        checked_identifier("subs; DROP TABLE x")


def test_a_late_lookup_never_overwrites_a_settled_row(ledger):
    ledger.claim([attempt_row()], "tok")
    ledger.record_outcomes([Outcome("s1-20261126-01", PAID, imp_uid="imp_1")], "tok")
    refused = ledger.record_outcomes([Outcome("s1-20261126-01", PENDING)])
    assert [r.current_status for r in refused] == [PAID]
    assert ledger.get_attempt("s1-20261126-01").status == PAID


def test_the_owner_renews_the_lease_of_a_row_it_leaves_unsettled(ledger):
    ledger.claim([attempt_row()], "tok")
    ledger.execute(
        "UPDATE billing_charge_attempts SET requested_at = %s",
        [ledger.stamp(datetime(2000, 1, 1, tzinfo=UTC))],
    )
    ledger.record_outcomes([Outcome("s1-20261126-01", "unknown")], "tok")
    assert ledger.get_attempt("s1-20261126-01").requested_at.year > 2000


def test_a_rejected_row_with_an_absurd_amount_is_stored_without_it(ledger):
    huge = RejectedRow("s9", "c9", 10**20, DAY, "amount_over_cap", "amount over the cap")
    ledger.record_rejected([huge], RUN)
    assert ledger.query("SELECT amount, error_code FROM billing_charge_attempts") == [
        (None, "amount_over_cap")
    ]


def test_a_partly_refunded_payment_still_advances_its_subscription(ledger):
    add_subscriptions(ledger, [("s1", "c1", 1000)], DAY)
    ledger.claim([attempt_row()], "tok")
    ledger.record_outcomes([Outcome("s1-20261126-01", PAID, imp_uid="imp_1")], "tok")
    ledger.record_cancellation("s1-20261126-01", imp_uid="imp_1", cancel_amount=300)
    assert ledger.paid_not_advanced() == [("s1", DAY, DAY.day)]


def test_a_refunded_total_read_before_a_later_refund_never_lowers_the_ledgers(ledger):
    ledger.claim([attempt_row()], "tok")
    ledger.record_outcomes([Outcome("s1-20261126-01", PAID, imp_uid="imp_1")], "tok")
    assert ledger.record_cancellation("s1-20261126-01", imp_uid="imp_1", cancel_amount=500)
    assert not ledger.record_cancellation("s1-20261126-01", imp_uid="imp_1", cancel_amount=300)
    assert ledger.get_attempt("s1-20261126-01").cancel_amount == 500


def test_write_back_joins_a_custom_table_with_integer_ids(ledger):
    ledger.execute(
        "CREATE TABLE custom_subs (subscription_id INTEGER PRIMARY KEY, status TEXT, "
        "next_billing_date TEXT, billing_anchor_day INTEGER)"
    )
    ledger.execute("INSERT INTO custom_subs VALUES (7, 'active', %s, 26)", [DAY.isoformat()])
    ledger.claim([attempt_row("7-20261126-01", "7")], "tok")
    ledger.record_outcomes([Outcome("7-20261126-01", PAID, imp_uid="imp_7")], "tok")
    assert ledger.paid_not_advanced("custom_subs") == [("7", DAY, 26)]
