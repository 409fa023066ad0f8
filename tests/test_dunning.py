"""Dunning: soft declines retried on the schedule with new attempt merchant_uids, never while
anything for the period is paid or in flight; hard declines never; past_due after the last."""

from __future__ import annotations

from datetime import date, timedelta

import pendulum
import pytest
from iamport_billing.billing_run import write_back
from iamport_billing.charging import ChargeEngine
from iamport_billing.dunning import due_retries, send_retries
from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
from iamport_billing.policy import ChargeCandidate
from iamport_billing.warehouse.ledger import Ledger
from ops_support import LIMITS, RUN, SETTINGS, attempts_of, subscribe, subscription
from support import (
    HARD_DECLINE_CARD,
    PAYING_CARD,
    SOFT_DECLINE_CARD,
    emulator_payments,
    register_cards,
)

DAY = date(2026, 11, 26)


def first_charge(hook, ledger, *subs: str, amount: int = 9900) -> None:
    """The daily run's first attempt, through the real engine."""
    cands = [ChargeCandidate(s, f"cust-{s}", amount, DAY, name="plan") for s in subs]
    ChargeEngine(IamportV1Gateway(hook), ledger, SETTINGS, RUN).charge_batch(cands)


def dunning_day(hook, ledger, day: date, max_attempts: int = 5) -> dict:
    plan = due_retries(
        ledger, run_date=day, max_attempts=max_attempts, limits=LIMITS,
        subscriptions_table="billing_subscriptions",
    )  # fmt: skip
    result = send_retries(IamportV1Gateway(hook), ledger, plan, SETTINGS, RUN)
    write_back(ledger, subscriptions_table="billing_subscriptions")
    return result


def test_soft_decline_is_not_retried_before_its_retry_date(hook, ledger, emulator):
    subscribe(ledger, emulator, "soft1", SOFT_DECLINE_CARD, DAY)
    first_charge(hook, ledger, "soft1")
    dunning_day(hook, ledger, DAY)
    assert [a[0] for a in attempts_of(ledger, "soft1")] == ["soft1-20261126-01"]


def test_retry_uses_the_next_attempt_merchant_uid_and_advances_when_paid(hook, ledger, emulator):
    subscribe(ledger, emulator, "soft1", SOFT_DECLINE_CARD, DAY)
    first_charge(hook, ledger, "soft1")
    register_cards(emulator, [("cust-soft1", PAYING_CARD)])  # the customer topped up the card
    dunning_day(hook, ledger, DAY + timedelta(days=1))
    assert attempts_of(ledger, "soft1") == [
        ("soft1-20261126-01", "failed", "soft"),
        ("soft1-20261126-02", "paid", None),
    ]
    assert subscription(ledger, "soft1") == ("active", "2026-12-26")


def test_schedule_runs_out_at_max_attempts_and_subscription_goes_past_due(hook, ledger, emulator):
    subscribe(ledger, emulator, "soft1", SOFT_DECLINE_CARD, DAY)
    first_charge(hook, ledger, "soft1")
    for offset in (1, 3, 5, 7, 9, 30):
        dunning_day(hook, ledger, DAY + timedelta(days=offset))
    assert [a[0][-2:] for a in attempts_of(ledger, "soft1")] == ["01", "02", "03", "04", "05"]
    assert subscription(ledger, "soft1") == ("past_due", "2026-11-26")
    assert len(emulator_payments(emulator.config.db_path)) == 5


def test_max_attempts_is_configuration(hook, ledger, emulator):
    subscribe(ledger, emulator, "soft1", SOFT_DECLINE_CARD, DAY)
    first_charge(hook, ledger, "soft1")
    for offset in (1, 3, 5, 7):
        dunning_day(hook, ledger, DAY + timedelta(days=offset), max_attempts=2)
    assert len(attempts_of(ledger, "soft1")) == 2


def test_hard_decline_is_never_retried(hook, ledger, emulator):
    subscribe(ledger, emulator, "hard1", HARD_DECLINE_CARD, DAY)
    first_charge(hook, ledger, "hard1")
    for offset in (1, 3, 5, 7):
        dunning_day(hook, ledger, DAY + timedelta(days=offset))
    assert attempts_of(ledger, "hard1") == [("hard1-20261126-01", "failed", "hard")]
    assert subscription(ledger, "hard1")[0] == "payment_method_required"


def test_no_retry_while_an_attempt_for_the_period_is_in_flight(hook, ledger, emulator):
    subscribe(ledger, emulator, "soft1", SOFT_DECLINE_CARD, DAY)
    first_charge(hook, ledger, "soft1")
    ledger.claim(
        [{"merchant_uid": "soft1-20261126-02", "subscription_id": "soft1", "billing_date": DAY,
          "attempt_no": 2, "customer_uid": "cust-soft1", "amount": 9900, "currency": "KRW"}],
        "someone-else",
    )  # fmt: skip
    plan = due_retries(
        ledger, run_date=DAY + timedelta(days=9), max_attempts=5, limits=LIMITS,
        subscriptions_table="billing_subscriptions",
    )  # fmt: skip
    assert plan.planned == []


def test_retry_run_twice_charges_once(hook, ledger, emulator):
    subscribe(ledger, emulator, "soft1", SOFT_DECLINE_CARD, DAY)
    first_charge(hook, ledger, "soft1")
    register_cards(emulator, [("cust-soft1", PAYING_CARD)])
    day = DAY + timedelta(days=1)
    stale = due_retries(
        ledger, run_date=day, max_attempts=5, limits=LIMITS,
        subscriptions_table="billing_subscriptions",
    )  # fmt: skip
    dunning_day(hook, ledger, day)
    dunning_day(hook, ledger, day)
    result = send_retries(
        IamportV1Gateway(hook), ledger, stale, SETTINGS, RUN
    )  # a racing run with an old plan
    assert result["counts"] == {"claimed_elsewhere": 1}
    paid = [p for p in emulator_payments(emulator.config.db_path) if p["status"] == "paid"]
    assert [p["merchant_uid"] for p in paid] == ["soft1-20261126-02"]


@pytest.mark.airflow
def test_retry_dag_charges_due_soft_declines_end_to_end(
    airflow_db, warehouse, emulator, monkeypatch
):
    monkeypatch.setenv("IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS", "0.1")
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag()
    daily, retry = bag.get_dag("iamport_billing_daily"), bag.get_dag("iamport_billing_retry")
    with Ledger.from_conn_id("billing_warehouse") as led:
        led.init_schema()
        subscribe(led, emulator, "soft1", SOFT_DECLINE_CARD, DAY)
        subscribe(led, emulator, "ok1", PAYING_CARD, DAY)
    daily.test(logical_date=pendulum.datetime(2026, 11, 26, 10, tz="Asia/Seoul"))
    register_cards(emulator, [("cust-soft1", PAYING_CARD)])
    dr = retry.test(logical_date=pendulum.datetime(2026, 11, 27, 14, tz="Asia/Seoul"))
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert states == dict.fromkeys(("reconcile", "retry", "write_back", "report"), "success")
    with Ledger.from_conn_id("billing_warehouse") as led:
        assert [a[1] for a in attempts_of(led, "soft1")] == ["failed", "paid"]
        assert subscription(led, "soft1") == ("active", "2026-12-26")
    paid = sorted(p["merchant_uid"] for p in emulator_payments(emulator.config.db_path)
                  if p["status"] == "paid")  # fmt: skip
    assert paid == ["ok1-20261126-01", "soft1-20261126-02"]
