"""Manual backfill DAG logic: re-charge failed charges of a billing-date range, dry run first."""

from __future__ import annotations

from datetime import date

import pendulum
import pytest
from iamport_billing.backfill import BackfillRefused, BackfillRequest, run_backfill
from iamport_billing.charging import ChargeEngine
from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
from iamport_billing.hooks.iamport import IamportHook
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
TODAY = date(2026, 11, 28)


@pytest.fixture
def failed_day(hook, ledger, emulator):
    """soft1 and hard1 declined on DAY; ok1 paid. Then both cards are fixed."""
    for sub, card in (
        ("soft1", SOFT_DECLINE_CARD),
        ("hard1", HARD_DECLINE_CARD),
        ("ok1", PAYING_CARD),
    ):
        subscribe(ledger, emulator, sub, card, DAY, amount=10_000)
    cands = [
        ChargeCandidate(s, f"cust-{s}", 10_000, DAY, name="plan") for s in ("soft1", "hard1", "ok1")
    ]
    ChargeEngine(IamportV1Gateway(hook), ledger, SETTINGS, RUN).charge_batch(cands)
    register_cards(emulator, [("cust-soft1", PAYING_CARD), ("cust-hard1", PAYING_CARD)])


BACKFILL_RUN = {**RUN, "dag_id": "iamport_billing_backfill", "run_id": "backfill-1"}


def backfill(hook, ledger, *, run=BACKFILL_RUN, **params):
    request = BackfillRequest.from_params(
        {"from_date": "2026-11-20", "to_date": "2026-11-27", **params}, today=TODAY
    )
    return run_backfill(
        IamportV1Gateway(hook), ledger, request, run_date=TODAY, limits=LIMITS, settings=SETTINGS,
        subscriptions_table="billing_subscriptions", run=run,
    )  # fmt: skip


def paid_uids(emulator) -> list[str]:
    return sorted(
        p["merchant_uid"]
        for p in emulator_payments(emulator.config.db_path)
        if p["status"] == "paid"
    )


def test_dry_run_is_the_default_and_charges_nothing(hook, ledger, emulator, failed_day, caplog):
    before = len(emulator_payments(emulator.config.db_path))
    summary = backfill(hook, ledger)
    assert (summary["dry_run"], summary["count"], summary["total_amount"]) == (True, 1, 10_000)
    assert summary["charges"] == [
        "soft1 billing_date=2026-11-26 attempt=2 merchant_uid=soft1-20261126-02 amount=10,000"
    ]
    assert "total 10,000 KRW" in caplog.text
    assert len(emulator_payments(emulator.config.db_path)) == before


def test_backfill_recharges_soft_declines_with_the_next_attempt(hook, ledger, emulator, failed_day):
    summary = backfill(hook, ledger, dry_run=False)
    assert summary["counts"] == {"paid": 1}
    assert paid_uids(emulator) == ["ok1-20261126-01", "soft1-20261126-02"]


def test_hard_declines_only_when_asked(hook, ledger, emulator, failed_day):
    ledger.set_subscription_status(["hard1"], "payment_method_required")
    backfill(hook, ledger, dry_run=False, include_hard_declines=True)
    assert attempts_of(ledger, "hard1")[-1] == ("hard1-20261126-02", "paid", None)
    assert subscription(ledger, "hard1") == ("active", "2026-11-26")  # reactivated


def test_subscription_filter_limits_the_backfill(hook, ledger, emulator, failed_day):
    summary = backfill(hook, ledger, include_hard_declines=True, subscription_ids=["hard1"])
    assert [line.split()[0] for line in summary["charges"]] == ["hard1"]


def test_backfill_run_again_charges_nothing_more(hook, ledger, emulator, failed_day):
    backfill(hook, ledger, dry_run=False, include_hard_declines=True)
    again = backfill(
        hook,
        ledger,
        run={**BACKFILL_RUN, "run_id": "backfill-2"},
        dry_run=False,
        include_hard_declines=True,
    )
    assert again["count"] == 0
    assert paid_uids(emulator) == ["hard1-20261126-02", "ok1-20261126-01", "soft1-20261126-02"]


def test_out_of_range_dates_are_not_touched(hook, ledger, emulator, failed_day):
    request = {"from_date": "2026-11-27", "to_date": "2026-11-28"}
    summary = backfill(hook, ledger, **request)
    assert summary["count"] == 0


@pytest.mark.parametrize(
    "params, message",
    [
        ({"from_date": "2026-11-27", "to_date": "2026-11-20"}, "after to_date"),
        ({"from_date": "2026-11-20", "to_date": "2026-12-20"}, "in the future"),
        ({"from_date": None, "to_date": "2026-11-20"}, "required"),
    ],
)
def test_bad_ranges_are_refused(params, message):
    with pytest.raises(BackfillRefused, match=message):
        BackfillRequest.from_params(params, today=TODAY)


def test_guardrail_stops_a_backfill_before_any_charge(hook, ledger, emulator, failed_day):
    before = len(emulator_payments(emulator.config.db_path))
    with pytest.raises(BackfillRefused, match="max_total_amount"):
        backfill(hook, ledger, dry_run=False, max_total_amount=5_000)
    assert len(emulator_payments(emulator.config.db_path)) == before


@pytest.mark.airflow
def test_backfill_dag_dry_run_then_real_run(airflow_db, warehouse, emulator, monkeypatch):
    monkeypatch.setenv("IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS", "0.1")
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag().get_dag("iamport_billing_backfill")
    hook = IamportHook()
    with Ledger.from_conn_id("billing_warehouse") as led:
        led.init_schema()
        subscribe(led, emulator, "soft1", SOFT_DECLINE_CARD, DAY)
        ChargeEngine(IamportV1Gateway(hook), led, SETTINGS, RUN).charge_batch(
            [ChargeCandidate("soft1", "cust-soft1", 9900, DAY, name="plan")]
        )
    register_cards(emulator, [("cust-soft1", PAYING_CARD)])
    when = pendulum.datetime(2026, 11, 28, 15, tz="Asia/Seoul")
    conf = {"from_date": "2026-11-26", "to_date": "2026-11-26"}
    dry = dag.test(logical_date=when, run_conf=conf)
    assert {ti.task_id: ti.state for ti in dry.get_task_instances()}["backfill"] == "success"
    assert paid_uids(emulator) == []
    real = dag.test(logical_date=when.add(minutes=1), run_conf={**conf, "dry_run": False})
    states = {ti.task_id: ti.state for ti in real.get_task_instances()}
    assert states == dict.fromkeys(("reconcile", "backfill", "write_back", "report"), "success")
    assert paid_uids(emulator) == ["soft1-20261126-02"]
    with Ledger.from_conn_id("billing_warehouse") as led:
        assert subscription(led, "soft1") == ("active", "2026-12-26")
    hook.close()
