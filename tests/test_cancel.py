"""CancelPaymentOperator: full and partial refunds with checksum, recorded in the ledger.

Outside Airflow each call names its refund (``request_id``); retries and lost answers are in
test_refunds.py.
"""

from __future__ import annotations

import uuid
from datetime import date

import pytest
from airflow.sdk.exceptions import AirflowFailException
from iamport_billing.charging import ChargeEngine
from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
from iamport_billing.hooks.iamport import IamportHook
from iamport_billing.operators.cancel import CancelPaymentOperator
from iamport_billing.policy import ChargeCandidate
from iamport_billing.states import REFUND_DONE, REFUND_REFUSED
from iamport_billing.warehouse.refunds import Refunds
from ops_support import RUN, SETTINGS, subscribe
from support import PAYING_CARD, emulator_payments

DAY = date(2026, 11, 26)
UID = "c1-20261126-01"


@pytest.fixture
def paid(ledger, emulator):
    """c1 charged 10,000 KRW through the engine; returns its imp_uid."""
    subscribe(ledger, emulator, "c1", PAYING_CARD, DAY, amount=10_000)
    hook = IamportHook()
    ChargeEngine(IamportV1Gateway(hook), ledger, SETTINGS, RUN).charge_batch(
        [ChargeCandidate("c1", "cust-c1", 10_000, DAY, name="plan")]
    )
    hook.close()
    return ledger.get_attempt(UID).imp_uid


def cancel(request_id: str | None = None, **kwargs):
    return CancelPaymentOperator(
        task_id="cancel",
        reason="customer asked",
        request_id=request_id or f"rq-{uuid.uuid4().hex[:12]}",
        **kwargs,
    ).execute({})


def at_iamport(emulator):
    (p,) = emulator_payments(emulator.config.db_path)
    return p["status"], p["cancel_amount"]


def in_ledger(ledger):
    a = ledger.get_attempt(UID)
    return a.status, a.amount, a.cancel_amount


def test_full_cancel_by_merchant_uid(ledger, emulator, paid):
    summary = cancel(merchant_uid=UID)
    assert (summary["cancel_amount"], summary["remaining"]) == (10_000, 0)
    assert at_iamport(emulator) == ("cancelled", 10_000)
    assert in_ledger(ledger) == ("cancelled", 10_000, 10_000)


def test_partial_cancels_by_imp_uid_add_up(ledger, emulator, paid):
    cancel(imp_uid=paid, amount=3000)
    summary = cancel(imp_uid=paid, amount=2000)
    assert summary["remaining"] == 5000
    assert at_iamport(emulator) == ("cancelled", 5000)
    assert in_ledger(ledger) == ("cancelled", 10_000, 5000)


def test_a_refund_made_outside_is_not_taken_for_ours(ledger, emulator, paid):
    hook = IamportHook()
    hook.cancel_payment(imp_uid=paid, amount=3000, reason="console")  # the ledger never knew
    hook.close()
    with pytest.raises(AirflowFailException, match="ledger expects 10000 KRW"):
        cancel(imp_uid=paid, amount=3000)
    assert at_iamport(emulator) == ("cancelled", 3000)
    assert in_ledger(ledger) == ("paid", 10_000, 0)


def test_a_person_refunds_anyway_by_giving_the_balance_as_checksum(ledger, emulator, paid):
    hook = IamportHook()
    hook.cancel_payment(imp_uid=paid, amount=3000, reason="console")
    hook.close()
    summary = cancel(request_id="ops-ticket-42", imp_uid=paid, amount=2000, checksum=7000)
    assert (summary["cancel_amount"], summary["refund_status"]) == (5000, REFUND_DONE)
    assert at_iamport(emulator) == ("cancelled", 5000)
    assert in_ledger(ledger) == ("cancelled", 10_000, 5000)


def test_wrong_checksum_is_refused(ledger, emulator, paid):
    with pytest.raises(AirflowFailException, match="checksum"):
        cancel(request_id="rq-wrong", imp_uid=paid, amount=1000, checksum=9000)
    assert at_iamport(emulator) == ("paid", 0)
    assert Refunds(ledger).get("rq-wrong").status == REFUND_REFUSED


def test_outside_airflow_a_refund_needs_a_request_id(ledger, emulator, paid):
    op = CancelPaymentOperator(task_id="cancel", reason="r", imp_uid=paid, amount=1000)
    with pytest.raises(AirflowFailException, match="request_id"):
        op.execute({})
    assert at_iamport(emulator) == ("paid", 0)


def test_nothing_to_cancel_fails_without_calling_cancel(ledger, emulator, paid):
    with pytest.raises(AirflowFailException, match="no paid payment"):
        cancel(merchant_uid="c1-20261126-02")
    assert at_iamport(emulator) == ("paid", 0)
