"""Pre-charge billing-key check: customers without a key are marked before charge day."""

from __future__ import annotations

from datetime import date

import pendulum
import pytest
from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
from iamport_billing.hooks.iamport import IamportHook
from iamport_billing.precheck import check_billing_keys
from iamport_billing.warehouse.ledger import DEFAULT_DUE_QUERY, Ledger
from ops_support import LIMITS, subscribe, subscription
from support import PAYING_CARD, add_subscriptions, register_cards

TOMORROW = date(2026, 11, 27)


def check(ledger, day=TOMORROW):
    hook = IamportHook()
    try:
        return check_billing_keys(
            IamportV1Gateway(hook), ledger, due_query=DEFAULT_DUE_QUERY, billing_date=day,
            limits=LIMITS, subscriptions_table="billing_subscriptions",
        )  # fmt: skip
    finally:
        hook.close()


def test_customers_without_a_key_need_a_payment_method(ledger, emulator):
    subscribe(ledger, emulator, "k1", PAYING_CARD, TOMORROW)
    add_subscriptions(ledger, [("nokey", "cust-nokey", 5000)], TOMORROW)
    report = check(ledger)
    assert (report["checked"], report["missing_subscriptions"]) == (2, ["nokey"])
    assert subscription(ledger, "nokey") == ("payment_method_required", "2026-11-27")
    assert subscription(ledger, "k1") == ("active", "2026-11-27")


def test_only_subscriptions_due_by_that_date_are_checked(ledger, emulator):
    add_subscriptions(ledger, [("later", "cust-later", 5000)], date(2026, 12, 5))
    assert check(ledger)["checked"] == 0
    assert subscription(ledger, "later")[0] == "active"


def test_bulk_lookup_spans_many_requests(ledger, emulator):
    rows = [(f"b{i:03d}", f"cust-b{i:03d}", 1000) for i in range(250)]
    add_subscriptions(ledger, rows, TOMORROW)
    register_cards(emulator, [(c, PAYING_CARD) for _, c, _ in rows if not c.endswith("7")])
    report = check(ledger)
    assert (report["checked"], report["missing"]) == (250, 25)


@pytest.mark.airflow
def test_precheck_dag_marks_tomorrows_customers(airflow_db, warehouse, emulator):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag().get_dag("iamport_billing_precheck")
    with Ledger.from_conn_id("billing_warehouse") as led:
        led.init_schema()
        add_subscriptions(led, [("nokey", "cust-nokey", 5000)], TOMORROW)
    dr = dag.test(logical_date=pendulum.datetime(2026, 11, 26, 9, tz="Asia/Seoul"))
    assert [ti.state for ti in dr.get_task_instances()] == ["success"]
    with Ledger.from_conn_id("billing_warehouse") as led:
        assert subscription(led, "nokey")[0] == "payment_method_required"
