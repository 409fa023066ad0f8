"""iamport_billing_daily end to end through Airflow (dag.test()) against the emulator, on a
SQLite and on a PostgreSQL warehouse."""

from __future__ import annotations

import json
import os
from datetime import date

import pendulum
import pytest
from iamport_billing.policy import merchant_uid_for
from support import (
    HARD_DECLINE_CARD,
    PAYING_CARD,
    SOFT_DECLINE_CARD,
    add_subscriptions,
    emulator_payments,
    register_cards,
)

pytestmark = pytest.mark.airflow

DAY = date(2026, 11, 26)


def logical(day: date):
    return pendulum.datetime(day.year, day.month, day.day, 10, tz="Asia/Seoul")


@pytest.fixture
def daily_dag(airflow_db, monkeypatch):
    monkeypatch.setenv("IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS", "0.1")
    monkeypatch.setenv("IAMPORT_BILLING_TASK_RETRY_DELAY_SECONDS", "1")
    bag = daily_dag_bag()
    assert bag.import_errors == {}
    return bag.get_dag("iamport_billing_daily")


def daily_dag_bag():
    """Parse the DAGs now, so they see the environment the test has set up."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag()


def run_dag(dag, day: date, **params):
    dr = dag.test(logical_date=logical(day), run_conf=params or None)
    return dr, {
        ti.task_id + (f"[{ti.map_index}]" if ti.map_index >= 0 else ""): ti.state
        for ti in dr.get_task_instances()
    }


def seed(ledger, emulator, n_paying=20):
    paying = [(f"p{i:03d}", f"cust-p{i:03d}", 10_000 + i) for i in range(n_paying)]
    add_subscriptions(ledger, paying, DAY)
    add_subscriptions(ledger, [("soft1", "cust-soft1", 5000), ("hard1", "cust-hard1", 7000)], DAY)
    add_subscriptions(ledger, [("zero1", "cust-zero1", 0), ("nokey1", "cust-nokey1", 3000)], DAY)
    register_cards(emulator, [(c, PAYING_CARD) for _, c, _ in paying])
    register_cards(emulator, [("cust-soft1", SOFT_DECLINE_CARD), ("cust-hard1", HARD_DECLINE_CARD)])
    return paying


def attempts(ledger):
    return {
        r[0]: r[1:]
        for r in ledger.query(
            "SELECT merchant_uid, subscription_id, status, amount, imp_uid, error_code "
            "FROM billing_charge_attempts"
        )
    }


def subscription(ledger, sub):
    (row,) = ledger.query(
        "SELECT status, next_billing_date FROM billing_subscriptions WHERE subscription_id = %s",
        [sub],
    )
    return row[0], str(row[1])[:10]


def test_daily_run_charges_every_due_subscription_exactly_once(daily_dag, ledger, emulator):
    paying = seed(ledger, emulator)
    dr, states = run_dag(daily_dag, DAY, batch_size=7)
    assert states["report"] == "failed" or states["report"] == "success"
    paid_at_emulator = [
        p for p in emulator_payments(emulator.config.db_path) if p["status"] == "paid"
    ]
    assert sorted(p["merchant_uid"] for p in paid_at_emulator) == sorted(
        merchant_uid_for(s, DAY, 1) for s, _, _ in paying
    )
    rows = attempts(ledger)
    for p in paid_at_emulator:
        sub, status, amount, imp_uid, _ = rows[p["merchant_uid"]]
        assert (status, amount, imp_uid) == ("paid", int(p["amount"]), p["imp_uid"])
    assert sum(1 for k in states if k.startswith("charge[")) == 4
    assert all(states[k] == "success" for k in states if k.startswith("charge["))


def test_settled_outcomes_are_written_back(daily_dag, ledger, emulator):
    seed(ledger, emulator, n_paying=3)
    run_dag(daily_dag, DAY)
    assert subscription(ledger, "p000") == ("active", "2026-12-26")
    assert subscription(ledger, "soft1") == ("active", "2026-11-26")
    assert subscription(ledger, "hard1") == ("payment_method_required", "2026-11-26")
    assert subscription(ledger, "nokey1") == ("payment_method_required", "2026-11-26")
    rows = attempts(ledger)
    zero = [v for v in rows.values() if v[0] == "zero1"]
    assert [(v[1], v[4]) for v in zero] == [("rejected", "non_positive_amount")]


def test_same_date_run_again_charges_nothing(daily_dag, ledger, emulator):
    seed(ledger, emulator, n_paying=5)
    run_dag(daily_dag, DAY)
    before = len(emulator_payments(emulator.config.db_path))
    dr, states = run_dag(daily_dag, DAY)
    assert len(emulator_payments(emulator.config.db_path)) == before
    assert states["report"] == "success"


def test_next_cycle_charges_again_with_a_new_merchant_uid(daily_dag, ledger, emulator):
    seed(ledger, emulator, n_paying=2)
    run_dag(daily_dag, DAY)
    run_dag(daily_dag, date(2026, 12, 26))
    paid = sorted(
        p["merchant_uid"]
        for p in emulator_payments(emulator.config.db_path)
        if p["status"] == "paid" and p["merchant_uid"].startswith("p000")
    )
    assert paid == ["p000-20261126-01", "p000-20261226-01"]


def test_clean_run_reports_success(daily_dag, ledger, emulator):
    add_subscriptions(ledger, [("ok1", "cust-ok1", 1000)], DAY)
    register_cards(emulator, [("cust-ok1", PAYING_CARD)])
    dr, states = run_dag(daily_dag, DAY)
    assert states == {
        "reconcile": "success",
        "plan": "success",
        "approve": "success",  # within its guardrails: nothing to ask
        "charge[0]": "success",
        "write_back": "success",
        "report": "success",
    }
    assert dr.state == "success"


def test_guardrail_stops_the_run_before_any_charge(daily_dag, ledger, emulator):
    seed(ledger, emulator, n_paying=5)
    dr, states = run_dag(daily_dag, DAY, max_count=3)
    assert states["plan"] == "failed"
    assert dr.state == "failed"
    assert emulator_payments(emulator.config.db_path) == []
    assert [a for a in attempts(ledger).values() if a[1] != "rejected"] == []


def test_total_amount_guardrail(daily_dag, ledger, emulator):
    seed(ledger, emulator, n_paying=5)
    dr, states = run_dag(daily_dag, DAY, max_total_amount=10_000)
    assert states["plan"] == "failed"
    assert emulator_payments(emulator.config.db_path) == []


def test_a_tripped_multiple_of_the_previous_run_is_passed_by_the_runs_param(
    daily_dag, ledger, emulator
):
    from datetime import timedelta

    big = [(f"b{i}", f"cust-b{i}", 600_000) for i in range(12)]
    register_cards(emulator, [(c, PAYING_CARD) for _, c, _ in big])
    add_subscriptions(ledger, big[:2], DAY)  # 1,200,000 KRW
    add_subscriptions(ledger, big[2:], DAY + timedelta(days=1))  # 6,000,000 KRW: over 3x
    run_dag(daily_dag, DAY)
    _, tripped = run_dag(daily_dag, DAY + timedelta(days=1))
    assert tripped["plan"] == "failed"
    assert len(emulator_payments(emulator.config.db_path)) == 2
    _, states = run_dag(daily_dag, DAY + timedelta(days=1), max_total_multiple_of_previous=0)
    assert states["plan"] == "success"
    assert len(emulator_payments(emulator.config.db_path)) == 12


def test_dry_run_charges_nothing(daily_dag, ledger, emulator):
    seed(ledger, emulator, n_paying=5)
    dr, states = run_dag(daily_dag, DAY, dry_run=True)
    assert states["plan"] == "success"
    assert emulator_payments(emulator.config.db_path) == []
    assert attempts(ledger) == {}


def test_month_end_anchor_is_kept(daily_dag, ledger, emulator):
    jan31 = date(2026, 1, 31)
    add_subscriptions(ledger, [("m1", "cust-m1", 1000)], jan31, anchor_day=31)
    register_cards(emulator, [("cust-m1", PAYING_CARD)])
    run_dag(daily_dag, jan31)
    assert subscription(ledger, "m1")[1] == "2026-02-28"
    run_dag(daily_dag, date(2026, 2, 28))
    assert subscription(ledger, "m1")[1] == "2026-03-31"


def test_a_failed_charge_task_fails_the_run(airflow_db, monkeypatch, ledger, emulator):
    monkeypatch.setenv("IAMPORT_BILLING_TASK_RETRIES", "0")
    add_subscriptions(ledger, [("ok1", "cust-ok1", 1000)], DAY)
    register_cards(emulator, [("cust-ok1", PAYING_CARD)])
    conn = json.loads(os.environ["AIRFLOW_CONN_IAMPORT_DEFAULT"])
    conn["password"] = "not-the-secret"
    monkeypatch.setenv("AIRFLOW_CONN_IAMPORT_DEFAULT", json.dumps(conn))
    dr, states = run_dag(daily_dag_bag().get_dag("iamport_billing_daily"), DAY)
    assert states["charge[0]"] == "failed"
    assert states["write_back"] == "success"
    assert states["report"] == "failed"
    assert dr.state == "failed"
    assert emulator_payments(emulator.config.db_path) == []
