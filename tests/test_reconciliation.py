"""Reconciliation against Iamport: unknowns resolved, missing payments recorded, mismatches
fixed when Iamport settles them and flagged for a person when it does not."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from iamport_billing.charging import ChargeEngine
from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
from iamport_billing.policy import ChargeCandidate
from iamport_billing.reconciliation import reconcile
from iamport_billing.refunding import refund_marker
from iamport_billing.states import REFUND_DONE, REFUND_PENDING
from iamport_billing.warehouse.refunds import Refunds
from ops_support import RUN, SETTINGS, subscribe
from support import PAYING_CARD, SOFT_DECLINE_CARD, emulator_payments, requests_received

DAY = date(2026, 11, 26)
WINDOW = timedelta(hours=48)
CANCEL = "POST /payments/cancel"


def run_reconcile(hook, ledger):
    return reconcile(
        IamportV1Gateway(hook), ledger, SETTINGS, until=datetime.now(UTC) + timedelta(minutes=1),
        window=WINDOW, run=RUN,
    )  # fmt: skip


def left_by_a_crash(ledger, sub: str) -> None:
    """A pending attempt 01 claimed an hour ago by a worker that then died."""
    ledger.claim(
        [{"merchant_uid": f"{sub}-20261126-01", "subscription_id": sub, "billing_date": DAY,
          "attempt_no": 1, "customer_uid": f"cust-{sub}", "amount": 9900, "currency": "KRW"}],
        "crashed-worker",
    )  # fmt: skip
    an_hour_ago = ledger.stamp(datetime.now(UTC) - timedelta(hours=1))
    ledger.execute(
        "UPDATE billing_charge_attempts SET requested_at = %s WHERE subscription_id = %s",
        [an_hour_ago, sub],
    )


def row(ledger, merchant_uid):
    a = ledger.get_attempt(merchant_uid)
    return None if a is None else (a.status, a.amount, a.cancel_amount, a.imp_uid is not None)


def charge(hook, ledger, sub, amount=9900):
    ChargeEngine(IamportV1Gateway(hook), ledger, SETTINGS, RUN).charge_batch(
        [ChargeCandidate(sub, f"cust-{sub}", amount, DAY, name="plan")]
    )


def test_pending_row_is_resolved_from_iamport(hook, ledger, emulator):
    subscribe(ledger, emulator, "p1", PAYING_CARD, DAY)
    left_by_a_crash(ledger, "p1")
    hook.charge_again("cust-p1", "p1-20261126-01", 9900, "plan")  # sent, then the worker died
    report = run_reconcile(hook, ledger)
    assert report.resolved == {"resolved_paid": 1}
    assert row(ledger, "p1-20261126-01") == ("paid", 9900, 0, True)
    assert report.unsettled_count == 0


def test_payment_missing_from_the_ledger_is_recorded(hook, ledger, emulator):
    subscribe(ledger, emulator, "m1", PAYING_CARD, DAY)
    hook.charge_again("cust-m1", "m1-20261126-01", 9900, "plan")
    report = run_reconcile(hook, ledger)
    assert report.recorded_missing == ["m1-20261126-01"]
    assert row(ledger, "m1-20261126-01") == ("paid", 9900, 0, True)
    assert ledger.get_attempt("m1-20261126-01").billing_date == DAY


def test_recorded_soft_decline_gets_a_retry_date(hook, ledger, emulator):
    subscribe(ledger, emulator, "d1", SOFT_DECLINE_CARD, DAY)
    hook.charge_again("cust-d1", "d1-20261126-01", 9900, "plan")
    run_reconcile(hook, ledger)
    a = ledger.get_attempt("d1-20261126-01")
    assert (a.status, a.decline_kind, a.next_retry_date) == ("failed", "soft", DAY + timedelta(1))


def test_payments_that_are_not_ours_are_ignored(hook, ledger, emulator):
    subscribe(ledger, emulator, "x1", PAYING_CARD, DAY)
    hook.charge_again("cust-x1", "order_12345", 500, "one-off")
    report = run_reconcile(hook, ledger)
    assert (report.scanned, report.recorded_missing, row(ledger, "order_12345")) == (1, [], None)


def test_refund_made_outside_is_recorded(hook, ledger, emulator):
    subscribe(ledger, emulator, "c1", PAYING_CARD, DAY)
    charge(hook, ledger, "c1")
    hook.cancel_payment(merchant_uid="c1-20261126-01", amount=4000, reason="console refund")
    report = run_reconcile(hook, ledger)
    assert [f["merchant_uid"] for f in report.fixed] == ["c1-20261126-01"]
    assert row(ledger, "c1-20261126-01") == ("cancelled", 9900, 4000, True)


def test_amount_mismatch_needs_a_person(hook, ledger, emulator):
    subscribe(ledger, emulator, "a1", PAYING_CARD, DAY)
    charge(hook, ledger, "a1")
    ledger.execute("UPDATE billing_charge_attempts SET amount = 1000 WHERE subscription_id = 'a1'")
    report = run_reconcile(hook, ledger)
    assert [(i["merchant_uid"], i["problem"]) for i in report.needs_person] == [
        ("a1-20261126-01", "amount differs from the ledger")
    ]
    assert row(ledger, "a1-20261126-01")[1] == 1000  # left for the person to decide


def test_ledger_decline_that_iamport_paid_is_fixed(hook, ledger, emulator):
    subscribe(ledger, emulator, "f1", PAYING_CARD, DAY)
    charge(hook, ledger, "f1")
    ledger.execute(
        "UPDATE billing_charge_attempts SET status = 'failed', decline_kind = 'soft', "
        "next_retry_date = '2026-11-27' WHERE subscription_id = 'f1'"
    )
    report = run_reconcile(hook, ledger)
    assert report.fixed[0]["fix"] == "ledger set to paid as Iamport reports"
    assert row(ledger, "f1-20261126-01")[0] == "paid"


def test_a_row_iamport_never_saw_is_resent_once_under_its_merchant_uid(hook, ledger, emulator):
    subscribe(ledger, emulator, "u1", PAYING_CARD, DAY)
    left_by_a_crash(ledger, "u1")  # it died before sending
    report = run_reconcile(hook, ledger)
    assert report.unsettled_count == 0
    assert row(ledger, "u1-20261126-01") == ("paid", 9900, 0, True)
    sent = [p["merchant_uid"] for p in emulator_payments(emulator.config.db_path)]
    assert sent == ["u1-20261126-01"]


def test_reconcile_twice_changes_nothing_more(hook, ledger, emulator):
    subscribe(ledger, emulator, "m1", PAYING_CARD, DAY)
    hook.charge_again("cust-m1", "m1-20261126-01", 9900, "plan")
    run_reconcile(hook, ledger)
    again = run_reconcile(hook, ledger)
    assert (again.recorded_missing, again.fixed, again.needs_person) == ([], [], [])


def reconcile_days_later(hook, ledger):
    """Three days on, the charge is outside the listing window: only the sweeps see it."""
    return reconcile(
        IamportV1Gateway(hook), ledger, SETTINGS, until=datetime.now(UTC) + timedelta(days=3),
        window=WINDOW, run=RUN,
    )  # fmt: skip


def refund_intent(ledger, merchant_uid: str, refund_id: str, amount: int, checksum: int) -> None:
    """A refund task wrote its intent (and maybe sent it), then died."""
    imp_uid = ledger.get_attempt(merchant_uid).imp_uid
    Refunds(ledger).write_intent(
        {"refund_id": refund_id, "merchant_uid": merchant_uid, "imp_uid": imp_uid,
         "amount_requested": amount, "amount": amount, "checksum": checksum,
         "reason": f"{refund_marker(refund_id)} customer asked", "claim_token": "died"}
    )  # fmt: skip


def test_a_refund_its_task_recorded_done_but_not_in_the_ledger_is_recorded(hook, ledger, emulator):
    subscribe(ledger, emulator, "d1", PAYING_CARD, DAY)
    charge(hook, ledger, "d1")
    refund_intent(ledger, "d1-20261126-01", "t-d1", 3000, 9900)
    hook.cancel_payment(merchant_uid="d1-20261126-01", amount=3000, reason="[refund:t-d1] asked")
    Refunds(ledger).move("t-d1", REFUND_DONE, cancel_amount_after=3000)  # then it died
    sent = requests_received(emulator, CANCEL)

    reconcile_days_later(hook, ledger)

    assert row(ledger, "d1-20261126-01") == ("cancelled", 9900, 3000, True)
    assert requests_received(emulator, CANCEL) == sent


def test_an_open_refund_missing_from_the_cancel_history_is_for_a_person(hook, ledger, emulator):
    subscribe(ledger, emulator, "o1", PAYING_CARD, DAY)
    charge(hook, ledger, "o1")
    refund_intent(ledger, "o1-20261126-01", "t-o1", 3000, 9900)  # never left
    an_hour_ago = ledger.stamp(datetime.now(UTC) - timedelta(hours=1))
    ledger.execute("UPDATE billing_refunds SET updated_at = %s", [an_hour_ago])

    report = reconcile_days_later(hook, ledger)

    assert [(i["merchant_uid"], i["refund_id"]) for i in report.needs_person] == [
        ("o1-20261126-01", "t-o1")
    ]
    assert (report.refunds, requests_received(emulator, CANCEL)) == ({"not_applied": 1}, 0)
    assert Refunds(ledger).get("t-o1").status == REFUND_PENDING
    assert row(ledger, "o1-20261126-01") == ("paid", 9900, 0, True)


def test_a_ledger_refunded_above_iamport_is_flagged_not_lowered(hook, ledger, emulator):
    subscribe(ledger, emulator, "h1", PAYING_CARD, DAY)
    charge(hook, ledger, "h1")
    hook.cancel_payment(merchant_uid="h1-20261126-01", amount=3000, reason="console refund")
    ledger.execute(
        "UPDATE billing_charge_attempts SET status = 'cancelled', cancel_amount = 5000 "
        "WHERE subscription_id = 'h1'"
    )

    report = run_reconcile(hook, ledger)

    assert report.fixed == []
    assert [i["merchant_uid"] for i in report.needs_person] == ["h1-20261126-01"]
    assert row(ledger, "h1-20261126-01") == ("cancelled", 9900, 5000, True)
