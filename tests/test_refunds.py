"""Refunds written ahead, sent once and settled from Iamport's cancel history.

Through CancelPaymentOperator, against the emulator over HTTP, on every ledger database. A
"try" is an execute() with a task instance identity; the same (dag, run, task) is the same
refund request, as for Airflow's retries and clears.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import date
from types import SimpleNamespace

import pytest
import requests
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from iamport_billing.charging import ChargeEngine
from iamport_billing.errors import IamportCancelOutcomeUnknown
from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
from iamport_billing.hooks.iamport import IamportHook
from iamport_billing.operators.cancel import CancelPaymentOperator, refund_identity
from iamport_billing.policy import ChargeCandidate, merchant_uid_for
from iamport_billing.states import PAID, REFUND_DONE, REFUND_REFUSED, REFUND_UNKNOWN
from iamport_billing.warehouse.refunds import Refunds
from ops_support import RUN, SETTINGS, subscribe
from support import PAYING_CARD, emulator_payments

DAY = date(2026, 11, 26)
UID = merchant_uid_for("c1", DAY, 1)


@pytest.fixture
def paid(ledger, emulator) -> str:
    """c1 charged 10,000 KRW through the engine (ledger row paid); returns its imp_uid."""
    subscribe(ledger, emulator, "c1", PAYING_CARD, DAY, amount=10_000)
    hook = IamportHook()
    ChargeEngine(IamportV1Gateway(hook), ledger, SETTINGS, RUN).charge_batch(
        [ChargeCandidate("c1", "cust-c1", 10_000, DAY, name="plan")]
    )
    hook.close()
    return ledger.get_attempt(UID).imp_uid


def try_of(run_id: str = "manual__1", try_number: int = 1) -> dict:
    """The Airflow context of one try of the refund DAG's task."""
    ti = SimpleNamespace(
        dag_id="iamport_billing_refund", run_id=run_id, task_id="cancel", map_index=-1,
        try_number=try_number,
    )  # fmt: skip
    return {"ti": ti}


def refund(context: dict, amount: int | None = 3000, **kwargs) -> dict:
    op = CancelPaymentOperator(
        task_id="cancel", merchant_uid=UID, amount=amount, reason="customer asked", **kwargs
    )
    return op.execute(context)


def refund_row(ledger, context: dict):
    return Refunds(ledger).get(refund_identity(context).refund_id)


def set_faults(emulator, **faults) -> None:
    requests.post(f"{emulator.url}/__emulator__/faults", json=faults, timeout=5).raise_for_status()


def cancel_posts(emulator) -> int:
    stats = requests.get(f"{emulator.url}/__emulator__/stats", timeout=5).json()
    return stats["requests"].get("POST /payments/cancel", 0)


def at_iamport(emulator) -> tuple[str, int, list[tuple[int, str]]]:
    """(status, cancel_amount, [(amount, reason) of each cancel]) of the only payment."""
    (p,) = emulator_payments(emulator.config.db_path)
    history = [(int(h["amount"]), h["reason"]) for h in json.loads(p["cancel_history"])]
    return p["status"], int(p["cancel_amount"]), history


def in_ledger(ledger) -> tuple[str, int]:
    a = ledger.get_attempt(UID)
    return a.status, a.cancel_amount


@contextmanager
def cancel_lost_before_iamport(monkeypatch, emulator):
    """The next cancel POST gets a 5xx from in front of Iamport: sent, never applied."""
    real = IamportHook.cancel_payment

    def lost(self, **kwargs):
        set_faults(emulator, error_rate=1.0)
        try:
            return real(self, **kwargs)
        finally:
            set_faults(emulator, error_rate=0.0)

    with monkeypatch.context() as m:
        m.setattr(IamportHook, "cancel_payment", lost)
        yield


def test_dropped_cancel_reply_is_settled_from_the_cancel_history_not_resent(ledger, emulator, paid):
    set_faults(emulator, drop_cancel_reply=True)
    with pytest.raises(AirflowException, match="cancel history") as lost:
        refund(try_of(try_number=1))
    assert not isinstance(lost.value, AirflowFailException)  # Airflow may retry it
    assert refund_row(ledger, try_of()).status == REFUND_UNKNOWN

    summary = refund(try_of(try_number=2))  # the switch is still on: a POST would be lost

    assert (summary["refund_status"], summary["sent"], summary["cancel_amount"]) == (
        REFUND_DONE, False, 3000,
    )  # fmt: skip
    status, total, history = at_iamport(emulator)
    assert (status, total, [a for a, _ in history]) == ("cancelled", 3000, [3000])
    assert cancel_posts(emulator) == 1
    assert in_ledger(ledger) == ("cancelled", 3000)
    row = refund_row(ledger, try_of())
    assert (row.status, row.amount, row.checksum, row.cancel_amount_after, row.send_count) == (
        REFUND_DONE, 3000, 10_000, 3000, 1,
    )  # fmt: skip


def test_retry_of_a_refunded_try_with_no_ledger_row_refunds_once(ledger, emulator):
    subscribe(ledger, emulator, "c1", PAYING_CARD, DAY, amount=10_000)
    hook = IamportHook()
    hook.charge_again("cust-c1", UID, 10_000, "plan")  # charged outside: no ledger row
    hook.close()

    first = refund(try_of(try_number=1))
    again = refund(try_of(try_number=2))

    assert (first["sent"], again["sent"]) == (True, False)
    assert again["cancel_amount"] == 3000 and again["ledger_updated"] is False
    status, total, history = at_iamport(emulator)
    assert (status, total, [a for a, _ in history]) == ("cancelled", 3000, [3000])
    assert ledger.get_attempt(UID) is None
    row = refund_row(ledger, try_of())
    assert (row.status, row.cancel_amount_after, row.send_count) == (REFUND_DONE, 3000, 1)


def test_console_refund_between_a_lost_try_and_the_rerun_fails_the_task(
    ledger, emulator, paid, monkeypatch
):
    with cancel_lost_before_iamport(monkeypatch, emulator):
        with pytest.raises(AirflowException, match="cancel history"):
            refund(try_of(try_number=1))
    hook = IamportHook()
    hook.cancel_payment(imp_uid=paid, amount=3000, reason="console: customer called")
    hook.close()

    with pytest.raises(AirflowFailException, match="someone else refunded 3000 KRW"):
        refund(try_of(try_number=2))

    status, total, history = at_iamport(emulator)
    assert (status, total, history) == ("cancelled", 3000, [(3000, "console: customer called")])
    assert cancel_posts(emulator) == 2  # ours (lost before Iamport) and the console's
    assert in_ledger(ledger) == (PAID, 0)  # not reported as our refund
    row = refund_row(ledger, try_of())
    assert (row.status, row.cancel_amount_after) == (REFUND_REFUSED, None)
    assert "console" in row.error_message


def test_a_try_lost_before_iamport_is_sent_again_with_the_same_checksum(
    ledger, emulator, paid, monkeypatch
):
    with cancel_lost_before_iamport(monkeypatch, emulator):
        with pytest.raises(AirflowException, match="cancel history"):
            refund(try_of(try_number=1))

    summary = refund(try_of(try_number=2), resend_after_seconds=0)

    assert (summary["sent"], summary["cancel_amount"]) == (True, 3000)
    status, total, history = at_iamport(emulator)
    assert (status, total, [a for a, _ in history]) == ("cancelled", 3000, [3000])
    assert in_ledger(ledger) == ("cancelled", 3000)
    row = refund_row(ledger, try_of())
    assert (row.status, row.checksum, row.send_count, row.try_number) == (
        REFUND_DONE, 10_000, 2, 2,
    )  # fmt: skip


def test_a_try_lost_moments_ago_is_not_sent_again_yet(ledger, emulator, paid, monkeypatch):
    with cancel_lost_before_iamport(monkeypatch, emulator):
        with pytest.raises(AirflowException, match="cancel history"):
            refund(try_of(try_number=1))

    with pytest.raises(AirflowException, match="may still come"):
        refund(try_of(try_number=2))  # its answer may still be on the way: wait

    assert cancel_posts(emulator) == 1 and at_iamport(emulator)[1] == 0
    assert refund_row(ledger, try_of()).send_count == 1


def test_two_partial_refunds_in_two_runs_both_go_through(ledger, emulator, paid):
    first = refund(try_of(run_id="manual__1"), amount=3000)
    second = refund(try_of(run_id="manual__2"), amount=2000)

    assert (first["sent"], second["sent"], second["remaining"]) == (True, True, 5000)
    status, total, history = at_iamport(emulator)
    assert (status, total, [a for a, _ in history]) == ("cancelled", 5000, [3000, 2000])
    assert in_ledger(ledger) == ("cancelled", 5000)
    rows = [refund_row(ledger, try_of(run_id=r)) for r in ("manual__1", "manual__2")]
    assert [(r.status, r.checksum, r.cancel_amount_after) for r in rows] == [
        (REFUND_DONE, 10_000, 3000),
        (REFUND_DONE, 7000, 5000),
    ]
    markers = [reason.split()[0] for _, reason in history]
    assert markers == [f"[refund:{r.refund_id}]" for r in rows]


def test_a_rerun_asking_another_amount_is_not_the_same_refund(ledger, emulator, paid):
    refund(try_of(try_number=1), amount=3000)
    with pytest.raises(AirflowFailException, match="written for 3000 KRW"):
        refund(try_of(try_number=2), amount=5000)
    _, total, history = at_iamport(emulator)
    assert (total, len(history)) == (3000, 1)
    assert in_ledger(ledger) == ("cancelled", 3000)


def test_a_resend_refused_because_the_lost_send_landed_late_is_not_recorded_refused(
    ledger, emulator, paid, monkeypatch
):
    """Try 1 writes the refund (3000 of 10000, checksum 10000) and POSTs it; the reply never
    comes (read timeout) and the request is still on its way through Iamport/the PG. Try 2
    (Airflow retry one minute later, or a second try started while try 1 still runs) looks
    the payment up: no marker, balance still 10000 == checksum, so it claims the row and
    POSTs again at once (a refund row has no lease, unlike a charge row). Try 1's cancel then
    lands; Iamport refuses try 2's cancel (checksum 10000 != 7000). _send moves the row to
    `refused` ("not refunded") and fails the task for good, though Iamport's cancel history
    holds this very refund with its marker. A person reading "refused" re-triggers the refund
    (the ledger still says 0 refunded, so the ledger check asks for checksum=7000): refunded
    twice. Fix: do not resend an open refund within a lease of its last send, and when a
    resend is refused, read the cancel history for the marker before calling it refused."""
    real = IamportHook.cancel_payment
    on_the_wire: dict = {}

    def timed_out(self, **kwargs):
        on_the_wire.update(kwargs)  # sent; Iamport has not processed it yet
        raise IamportCancelOutcomeUnknown("ReadTimeoutError", imp_uid=kwargs.get("imp_uid"))

    with monkeypatch.context() as m:
        m.setattr(IamportHook, "cancel_payment", timed_out)
        with pytest.raises(AirflowException, match="cancel history"):
            refund(try_of(try_number=1))

    def first_lands_then_resend(self, **kwargs):
        real(self, **on_the_wire)  # try 1's request reaches Iamport now
        return real(self, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(IamportHook, "cancel_payment", first_lands_then_resend)
        try:
            refund(try_of(try_number=2), resend_after_seconds=0)  # a retry after the wait
        except AirflowException:
            pass

    status, total, history = at_iamport(emulator)
    refund_id = refund_identity(try_of()).refund_id
    assert total == 3000 and [a for a, _ in history] == [3000]  # refunded once, with our marker
    assert f"[refund:{refund_id}]" in history[0][1]
    row = Refunds(ledger).get(refund_id)
    assert row.status == REFUND_DONE, (
        f"Iamport holds refund {refund_id}, the refund log says {row.status!r}: {row.error_message}"
    )
