"""The refund and reconcile DAGs through Airflow (dag.test()) on both warehouses."""

from __future__ import annotations

import json
from datetime import date, timedelta
from types import SimpleNamespace

import pendulum
import pytest
from iamport_billing.charging import ChargeEngine
from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
from iamport_billing.hooks.iamport import IamportHook
from iamport_billing.operators.cancel import refund_identity
from iamport_billing.policy import ChargeCandidate, merchant_uid_for
from iamport_billing.states import REFUND_DONE
from iamport_billing.warehouse.refunds import Refunds
from ops_support import RUN, SETTINGS, subscribe
from support import PAYING_CARD, emulator_payments, faults, requests_received

pytestmark = pytest.mark.airflow

DAY = date(2026, 11, 26)
CANCEL = "POST /payments/cancel"


def dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag()
    assert bag.import_errors == {}
    return bag.get_dag(dag_id)


def states(dr) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dr.get_task_instances()}


def charge(ledger, sub: str, amount: int = 10_000) -> str:
    hook = IamportHook()
    ChargeEngine(IamportV1Gateway(hook), ledger, SETTINGS, RUN).charge_batch(
        [ChargeCandidate(sub, f"cust-{sub}", amount, DAY, name="plan")]
    )
    hook.close()
    return merchant_uid_for(sub, DAY, 1)


def test_refund_dag_cancels_part_of_a_charge_and_records_it(airflow_db, ledger, emulator):
    subscribe(ledger, emulator, "r1", PAYING_CARD, DAY, amount=10_000)
    uid = charge(ledger, "r1")
    dr = dag("iamport_billing_refund").test(
        run_conf={"merchant_uid": uid, "amount": 3000, "reason": "customer asked"}
    )
    assert states(dr) == {"cancel": "success"}
    (payment,) = emulator_payments(emulator.config.db_path)
    assert (payment["status"], int(payment["cancel_amount"])) == ("cancelled", 3000)
    row = ledger.get_attempt(uid)
    assert (row.status, row.cancel_amount) == ("cancelled", 3000)


def charged_with_cancel_replies_dropped(ledger, emulator, sub: str) -> str:
    """A 10,000 KRW charge; from now on Iamport commits each cancel and drops its reply."""
    subscribe(ledger, emulator, sub, PAYING_CARD, DAY, amount=10_000)
    uid = charge(ledger, sub)
    faults(emulator, drop_cancel_reply=True)
    return uid


def test_refund_dag_retry_settles_a_dropped_cancel_reply_without_resending(
    airflow_db, ledger, emulator
):
    uid = charged_with_cancel_replies_dropped(ledger, emulator, "r2")
    refund = dag("iamport_billing_refund")
    refund.task_dict["cancel"].retry_delay = timedelta(seconds=1)

    dr = refund.test(run_conf={"merchant_uid": uid, "amount": 3000, "reason": "customer asked"})

    (ti,) = dr.get_task_instances()
    assert (ti.state, ti.try_number) == ("success", 2)  # try 1: answer lost; try 2 settled it
    (payment,) = emulator_payments(emulator.config.db_path)
    cancels = [int(h["amount"]) for h in json.loads(payment["cancel_history"])]
    assert (payment["status"], int(payment["cancel_amount"]), cancels) == (
        "cancelled",
        3000,
        [3000],
    )
    assert requests_received(emulator, CANCEL) == 1
    row = ledger.get_attempt(uid)
    assert (row.status, row.cancel_amount) == ("cancelled", 3000)
    task = SimpleNamespace(dag_id=dr.dag_id, run_id=dr.run_id, task_id="cancel", map_index=-1)
    intent = Refunds(ledger).get(refund_identity({"ti": task}).refund_id)
    assert (intent.status, intent.cancel_amount_after, intent.send_count) == (REFUND_DONE, 3000, 1)


def test_a_second_refund_run_with_the_same_request_id_settles_the_first_without_resending(
    airflow_db, ledger, emulator
):
    uid = charged_with_cancel_replies_dropped(ledger, emulator, "r3")
    refund = dag("iamport_billing_refund")
    refund.task_dict["cancel"].retries = 0
    conf = {"merchant_uid": uid, "amount": 3000, "reason": "ticket", "request_id": "ticket-4711"}

    first = refund.test(run_conf=conf)
    second = refund.test(run_conf=conf)

    assert (states(first), states(second)) == ({"cancel": "failed"}, {"cancel": "success"})
    assert first.run_id != second.run_id
    (payment,) = emulator_payments(emulator.config.db_path)
    cancels = [int(h["amount"]) for h in json.loads(payment["cancel_history"])]
    assert (int(payment["cancel_amount"]), cancels) == (3000, [3000])
    assert requests_received(emulator, CANCEL) == 1
    row = ledger.get_attempt(uid)
    assert (row.status, row.cancel_amount) == ("cancelled", 3000)


def test_reconcile_dag_settles_pending_rows_and_records_missing_payments(
    airflow_db, ledger, emulator, monkeypatch
):
    monkeypatch.setenv("IAMPORT_BILLING_PENDING_LEASE_SECONDS", "0")
    subscribe(ledger, emulator, "a", PAYING_CARD, DAY)
    subscribe(ledger, emulator, "b", PAYING_CARD, DAY)
    hook = IamportHook()
    crashed = ChargeEngine(hook, ledger, SETTINGS, RUN)
    crashed.claim(crashed.plan([ChargeCandidate("a", "cust-a", 9900, DAY, name="plan")])[0])
    hook.charge_again("cust-a", merchant_uid_for("a", DAY, 1), 9900, "plan")
    hook.charge_again("cust-b", merchant_uid_for("b", DAY, 1), 9900, "plan")  # no ledger row
    hook.close()
    dr = dag("iamport_billing_reconcile").test(logical_date=pendulum.now("UTC").add(minutes=1))
    assert states(dr) == {"reconcile": "success"}
    paid = {p["merchant_uid"]: p["imp_uid"] for p in emulator_payments(emulator.config.db_path)}
    for uid, imp_uid in paid.items():
        row = ledger.get_attempt(uid)
        assert (row.status, row.imp_uid) == ("paid", imp_uid)


def test_a_refund_request_id_that_would_render_as_no_key_is_refused(airflow_db):
    from airflow.sdk.exceptions import ParamValidationError

    conf = {"merchant_uid": "x-20261126-01", "reason": "r", "request_id": "None"}
    with pytest.raises(ParamValidationError):
        dag("iamport_billing_refund").test(run_conf=conf)


def lost_refund(ledger, emulator, sub: str) -> str:
    """A 3,000 KRW refund of a 10,000 charge, committed by the gateway, whose answer was lost
    and whose task failed for good (no retries left)."""
    uid = charged_with_cancel_replies_dropped(ledger, emulator, sub)
    refund = dag("iamport_billing_refund")
    refund.task_dict["cancel"].retries = 0
    dr = refund.test(run_conf={"merchant_uid": uid, "amount": 3000, "reason": "customer asked"})
    assert states(dr) == {"cancel": "failed"}
    faults(emulator, drop_cancel_reply=False)
    return uid


def reconcile_days_later(monkeypatch) -> dict[str, str]:
    """The reconcile DAG three days on: the charge is outside its listing window."""
    monkeypatch.setenv("IAMPORT_BILLING_PENDING_LEASE_SECONDS", "0")
    dr = dag("iamport_billing_reconcile").test(logical_date=pendulum.now("UTC").add(days=3))
    return states(dr)


def test_reconcile_records_a_refund_whose_task_ran_out_of_retries(
    airflow_db, ledger, emulator, monkeypatch
):
    uid = lost_refund(ledger, emulator, "r4")
    assert ledger.get_attempt(uid).cancel_amount in (None, 0)  # the answer was lost

    assert reconcile_days_later(monkeypatch) == {"reconcile": "success"}

    row = ledger.get_attempt(uid)
    assert (row.status, row.cancel_amount) == ("cancelled", 3000)
    (payment,) = emulator_payments(emulator.config.db_path)
    assert int(payment["cancel_amount"]) == 3000
    assert requests_received(emulator, CANCEL) == 1


def test_reconcile_never_sends_a_refund_the_cancel_history_lacks(
    airflow_db, ledger, emulator, monkeypatch
):
    subscribe(ledger, emulator, "r5", PAYING_CARD, DAY, amount=10_000)
    uid = charge(ledger, "r5")
    (payment,) = emulator_payments(emulator.config.db_path)
    # A refund task that wrote its intent and died before its cancel left.
    Refunds(ledger).write_intent(
        {"refund_id": "ticket-5", "merchant_uid": uid, "imp_uid": payment["imp_uid"],
         "amount_requested": 3000, "amount": 3000, "checksum": 10_000,
         "reason": "[refund:ticket-5] customer asked", "claim_token": "died"}
    )  # fmt: skip

    assert reconcile_days_later(monkeypatch) == {"reconcile": "success"}

    assert requests_received(emulator, CANCEL) == 0  # left open for its task: nothing sent
    assert Refunds(ledger).get("ticket-5").status == "pending"
    row = ledger.get_attempt(uid)
    assert (row.status, row.cancel_amount or 0) == ("paid", 0)
