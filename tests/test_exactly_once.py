"""The charge state machine's promises, each through a DAG run, an operator or the CLI, on
SQLite, PostgreSQL and MariaDB. One test per finding of the ledger review (issue 10)."""

from __future__ import annotations

import json
import threading
from datetime import date, timedelta

import pytest
from chaos_support import load_dags, logical, run_dag
from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
from iamport_billing.policy import merchant_uid_for
from iamport_billing.states import (
    ACTIVE,
    AMOUNT_MISMATCH,
    FAILED,
    PAID,
    PAST_DUE,
    PAYMENT_METHOD_REQUIRED,
    PENDING,
    UNSETTLED,
)
from iamport_billing.warehouse.ledger import Ledger
from support import (
    HARD_DECLINE_CARD,
    PAYING_CARD,
    SOFT_DECLINE_CARD,
    add_subscriptions,
    crashed_pending_row,
    emulator_payments,
    faults,
    paid_at_gateway,
    register_cards,
    run_daily,
)

pytestmark = pytest.mark.airflow

DAY = date(2026, 11, 26)


@pytest.fixture
def world(dag_world):
    return dag_world


def daily(day: date = DAY, **params):
    return run_daily(day, **params)


# 1. A row that must be resent is resent, on every database (PostgreSQL crashed on it).
def test_a_pending_row_left_by_a_crash_is_resent_once(world):
    ledger, emulator, _ = world
    add_subscriptions(ledger, [("r1", "cust-r1", 9900)], DAY)
    register_cards(emulator, [("cust-r1", PAYING_CARD)])
    uid = crashed_pending_row(ledger, "r1", DAY)
    _, states = daily()
    assert states["reconcile"] == "success" and states["report"] == "success", states
    assert paid_at_gateway(emulator) == [uid]
    assert ledger.get_attempt(uid).status == PAID
    assert ledger.subscription_state("r1")["next_billing_date"] == date(2026, 12, 26)


# 2. A zombie try's paid answer is never dropped, and dunning asks before attempt 02.
def test_a_zombie_tries_paid_answer_wins_and_dunning_sends_nothing_more(world, monkeypatch):
    from iamport_billing.charging import ChargeEngine, ChargeSettings
    from iamport_billing.dunning import due_retries, send_retries
    from iamport_billing.hooks.iamport import IamportHook
    from iamport_billing.policy import ChargeCandidate, ValidationLimits

    ledger, emulator, _ = world
    add_subscriptions(ledger, [("z1", "cust-z1", 9900)], DAY)
    register_cards(emulator, [("cust-z1", SOFT_DECLINE_CARD)])
    run = {"dag_id": "iamport_billing_daily", "run_id": "r", "task_id": "charge[0]"}
    settings = ChargeSettings(unknown_settle_seconds=0.1)
    cand = ChargeCandidate("z1", "cust-z1", 9900, DAY, name="plan")
    stalled, release = threading.Event(), threading.Event()
    hook1 = IamportHook()
    real = hook1.charge_again

    def stalled_charge(*args, **kwargs):
        stalled.set()
        release.wait(30)  # try 1 hangs in the network...
        return real(*args, **kwargs)

    monkeypatch.setattr(hook1, "charge_again", stalled_charge)
    try1 = ChargeEngine(
        IamportV1Gateway(hook1), Ledger.from_conn_id("billing_warehouse"), settings,
        {**run, "try_number": 1},
    )  # fmt: skip
    worker = threading.Thread(target=try1.charge_batch, args=([cand],))
    worker.start()
    assert stalled.wait(30)
    # ...try 2 of the same task takes the row over and is declined...
    try2 = ChargeEngine(IamportV1Gateway(IamportHook()), ledger, settings, {**run, "try_number": 2})
    try2.charge_batch([cand])
    assert ledger.get_attempt(merchant_uid_for("z1", DAY, 1)).status == FAILED
    # ...then the card works, and try 1's request arrives and is paid.
    register_cards(emulator, [("cust-z1", PAYING_CARD)])
    release.set()
    worker.join(30)
    row = ledger.get_attempt(merchant_uid_for("z1", DAY, 1))
    assert (row.status, row.paid_amount) == (PAID, 9900)
    retries = due_retries(
        ledger, run_date=DAY + timedelta(days=3), max_attempts=5, limits=ValidationLimits(),
        subscriptions_table="billing_subscriptions",
    )  # fmt: skip
    send_retries(
        IamportV1Gateway(IamportHook()), ledger, retries, settings, {**run, "dag_id": "retry"}
    )
    assert paid_at_gateway(emulator) == [merchant_uid_for("z1", DAY, 1)]


def test_dunning_looks_attempt_nn_up_before_it_claims_the_next(world):
    ledger, emulator, _ = world
    add_subscriptions(ledger, [("d1", "cust-d1", 9900)], DAY)
    register_cards(emulator, [("cust-d1", SOFT_DECLINE_CARD)])
    daily()
    uid = merchant_uid_for("d1", DAY, 1)
    assert ledger.get_attempt(uid).status == FAILED
    # Iamport took attempt 01 after all (a late answer the ledger never heard of).
    register_cards(emulator, [("cust-d1", PAYING_CARD)])
    from iamport_billing.hooks.iamport import IamportHook

    IamportHook().charge_again("cust-d1", uid, 9900, "plan")
    dag = load_dags().get_dag("iamport_billing_retry")
    run_dag(dag, logical(DAY + timedelta(days=1)))
    assert paid_at_gateway(emulator) == [uid]
    assert ledger.get_attempt(uid).status == PAID
    assert ledger.get_attempt(merchant_uid_for("d1", DAY, 2)) is None


# 3. Putting a subscription back after a new card leads to one more attempt, once.
def test_a_subscription_put_back_after_a_hard_decline_is_charged_once_more(world):
    from iamport_billing.cli import main as cli

    ledger, emulator, _ = world
    add_subscriptions(ledger, [("h1", "cust-h1", 9900)], DAY)
    register_cards(emulator, [("cust-h1", HARD_DECLINE_CARD)])
    daily()
    assert ledger.subscription_state("h1")["status"] == PAYMENT_METHOD_REQUIRED
    register_cards(emulator, [("cust-h1", PAYING_CARD)])  # the customer's new card
    assert cli(["subscriptions", "put-back", "h1"]) == 0
    daily(DAY + timedelta(days=1))
    daily(DAY + timedelta(days=2))
    assert paid_at_gateway(emulator) == [merchant_uid_for("h1", DAY, 2)]
    state = ledger.subscription_state("h1")
    assert (state["status"], state["next_billing_date"]) == (ACTIVE, date(2026, 12, 26))


# Found by the simulation: a put-back after a price change charged the period the new price.
def test_a_put_back_charges_the_periods_amount_not_a_later_price(world):
    from iamport_billing.cli import main as cli

    ledger, emulator, _ = world
    add_subscriptions(ledger, [("r1", "cust-r1", 9900)], DAY)
    register_cards(emulator, [("cust-r1", HARD_DECLINE_CARD)])
    daily()
    ledger.set_subscription_amounts([("r1", 10900)])  # the plan's price rises
    register_cards(emulator, [("cust-r1", PAYING_CARD)])
    assert cli(["subscriptions", "put-back", "r1"]) == 0
    daily(DAY + timedelta(days=1))
    paid = [p for p in emulator_payments(emulator.config.db_path) if p["status"] == "paid"]
    assert [(p["merchant_uid"], p["amount"]) for p in paid] == [
        (merchant_uid_for("r1", DAY, 2), 9900)
    ]
    assert ledger.get_attempt(merchant_uid_for("r1", DAY, 2)).status == PAID


def test_a_put_back_period_counts_at_its_own_amount_for_the_guardrails(world):
    from iamport_billing.cli import main as cli

    ledger, emulator, _ = world
    add_subscriptions(ledger, [("r2", "cust-r2", 10900)], DAY)
    register_cards(emulator, [("cust-r2", HARD_DECLINE_CARD)])
    daily()
    ledger.set_subscription_amounts([("r2", 9900)])  # the price falls under the limit
    register_cards(emulator, [("cust-r2", PAYING_CARD)])
    assert cli(["subscriptions", "put-back", "r2"]) == 0
    _, states = daily(DAY + timedelta(days=1), max_total_amount=10_000)
    assert states["plan"] == "failed"  # 10,900 is what this period would charge
    assert paid_at_gateway(emulator) == []


# 4. Paid with another amount: kept apart, alerted, subscription not advanced.
def test_paid_with_another_amount_is_a_mismatch_that_needs_a_person(world):
    ledger, emulator, receiver = world
    add_subscriptions(ledger, [("m1", "cust-m1", 9900)], DAY)
    register_cards(emulator, [("cust-m1", PAYING_CARD)])
    faults(emulator, paid_amount_multiplier=10)
    _, states = daily()
    row = ledger.get_attempt(merchant_uid_for("m1", DAY, 1))
    assert (row.status, row.amount, row.paid_amount) == (AMOUNT_MISMATCH, 9900, 99_000)
    assert ledger.subscription_state("m1")["next_billing_date"] == DAY
    assert states["report"] == "failed"
    assert receiver.of_kind("amount_mismatch")


# 5. A charge task charges exactly what its plan approved.
def test_rows_added_or_repriced_after_the_plan_are_not_charged(world, monkeypatch):
    from iamport_billing import tasks

    ledger, emulator, _ = world
    add_subscriptions(ledger, [("g1", "cust-g1", 9900), ("g2", "cust-g2", 9900)], DAY)
    register_cards(emulator, [(f"cust-g{i}", PAYING_CARD) for i in (1, 2, 3)])
    real_plan = tasks.plan_step

    def plan_then_a_late_writer(cfg, context):
        batches = real_plan(cfg, context)
        add_subscriptions(ledger, [("g3", "cust-g3", 150_000)], DAY)  # after the plan
        ledger.execute(
            "UPDATE billing_subscriptions SET amount = 99000 WHERE subscription_id = 'g2'"
        )
        return batches

    monkeypatch.setattr(tasks, "plan_step", plan_then_a_late_writer)
    daily(max_total_amount=20_000)
    assert paid_at_gateway(emulator) == [merchant_uid_for("g1", DAY, 1)]


# 6. An unknown left by any DAG on a past_due subscription is driven to a final state.
def test_an_unsettled_row_of_a_past_due_subscription_is_settled_by_reconcile(world):
    ledger, emulator, _ = world
    add_subscriptions(ledger, [("p1", "cust-p1", 9900)], DAY, status=PAST_DUE)
    register_cards(emulator, [("cust-p1", PAYING_CARD)])
    uid = crashed_pending_row(ledger, "p1", DAY, attempt_no=3, dag_id="iamport_billing_backfill")
    _, states = run_dag(load_dags().get_dag("iamport_billing_reconcile"), logical(DAY))
    assert states["reconcile"] == "success", states
    assert ledger.get_attempt(uid).status == PAID
    assert paid_at_gateway(emulator) == [uid]
    assert ledger.unsettled_summary() == {}


def past_due_period_paid_late(ledger, emulator, sub: str) -> str:
    """A past_due subscription whose backfill attempt 06 never reached Iamport; the reconcile
    DAG resends it and it is paid. Returns its merchant_uid."""
    add_subscriptions(ledger, [(sub, f"cust-{sub}", 9900)], DAY, status=PAST_DUE)
    register_cards(emulator, [(f"cust-{sub}", PAYING_CARD)])
    uid = crashed_pending_row(ledger, sub, DAY, attempt_no=6, dag_id="iamport_billing_backfill")
    run_dag(load_dags().get_dag("iamport_billing_reconcile"), logical(DAY))
    assert ledger.get_attempt(uid).status == PAID
    return uid


def test_a_past_due_subscription_whose_period_is_paid_later_is_billed_again(world):
    ledger, emulator, _ = world
    past_due_period_paid_late(ledger, emulator, "p2")
    daily(DAY + timedelta(days=1))  # its write-back
    state = ledger.subscription_state("p2")
    assert (state["status"], state["next_billing_date"]) == (ACTIVE, date(2026, 12, 26))


def test_a_past_due_period_paid_late_then_refunded_in_full_stays_past_due(world):
    ledger, emulator, _ = world
    uid = past_due_period_paid_late(ledger, emulator, "p3")
    load_dags().get_dag("iamport_billing_refund").test(
        run_conf={"merchant_uid": uid, "reason": "lapsed customer, full refund"}
    )
    daily(DAY + timedelta(days=1))  # its write-back
    daily(date(2026, 12, 26))
    state = ledger.subscription_state("p3")
    assert (state["status"], state["next_billing_date"]) == (PAST_DUE, date(2026, 12, 26))
    charged = [p["merchant_uid"] for p in emulator_payments(emulator.config.db_path)]
    assert charged == [uid]  # nothing charged for December


def test_a_cleared_backfill_task_tries_no_card_its_first_try_tried(world, monkeypatch):
    from types import SimpleNamespace

    from iamport_billing import ops_tasks
    from iamport_billing.config import BillingConfig

    ledger, emulator, _ = world
    add_subscriptions(ledger, [("ba", "cust-ba", 9900), ("bb", "cust-bb", 9900)], DAY)
    register_cards(emulator, [("cust-ba", SOFT_DECLINE_CARD), ("cust-bb", SOFT_DECLINE_CARD)])
    daily()
    register_cards(emulator, [("cust-bb", PAYING_CARD)])
    real = IamportV1Gateway.charge

    def bb_left_ready(self, request):  # bb's retry ends 'ready': the run leaves it unknown
        faults(emulator, charge_status_ready=request.customer_uid == "cust-bb")
        try:
            return real(self, request)
        finally:
            faults(emulator, charge_status_ready=False)

    monkeypatch.setattr(IamportV1Gateway, "charge", bb_left_ready)
    when = logical(DAY + timedelta(1))
    params = {"from_date": DAY.isoformat(), "to_date": DAY.isoformat(), "dry_run": False,
              "max_concurrency": 1}  # fmt: skip
    _, states = run_dag(load_dags().get_dag("iamport_billing_backfill"), when, **params)
    assert states["backfill"] == "failed"
    tried = {a.merchant_uid for attempts in ledger.attempts_for(["ba", "bb"]).values()
             for a in attempts}  # fmt: skip
    run_id = ledger.get_attempt(merchant_uid_for("ba", DAY, 2)).run_id
    # The person clears the failed task: try 2 of the same run.
    ti = SimpleNamespace(dag_id="iamport_billing_backfill", run_id=run_id, task_id="backfill",
                         map_index=-1, try_number=2)  # fmt: skip
    context = {"ti": ti, "params": params, "logical_date": when,
               "dag_run": SimpleNamespace(run_after=when)}  # fmt: skip
    with pytest.raises(Exception, match="still unknown"):
        ops_tasks.backfill_step(BillingConfig.from_env(), context)
    now = {a.merchant_uid for attempts in ledger.attempts_for(["ba", "bb"]).values()
           for a in attempts}  # fmt: skip
    assert now == tried  # no third attempt for ba's card


# 7. An empty anchor day is taken from the first billing date: month ends do not drift.
def test_an_empty_anchor_day_keeps_the_month_end(world):
    ledger, emulator, _ = world
    jan31 = date(2027, 1, 31)
    add_subscriptions(ledger, [("a1", "cust-a1", 9900)], jan31)
    ledger.execute("UPDATE billing_subscriptions SET billing_anchor_day = NULL")
    register_cards(emulator, [("cust-a1", PAYING_CARD)])
    seen = []
    for day in (jan31, date(2027, 2, 28), date(2027, 3, 31)):
        daily(day)
        seen.append(ledger.subscription_state("a1")["next_billing_date"])
    assert seen == [date(2027, 2, 28), date(2027, 3, 31), date(2027, 4, 30)]
    assert ledger.subscription_state("a1")["billing_anchor_day"] == 31


# 8. An outcome still unsettled at the end of a charge task fails the task.
def test_a_charge_left_ready_fails_the_charge_task_and_alerts(world):
    ledger, emulator, receiver = world
    add_subscriptions(ledger, [("y1", "cust-y1", 9900)], DAY)
    register_cards(emulator, [("cust-y1", PAYING_CARD)])
    faults(emulator, charge_status_ready=True)
    _, states = daily()
    assert states["charge[0]"] == "failed"
    assert ledger.get_attempt(merchant_uid_for("y1", DAY, 1)).status in UNSETTLED
    assert receiver.alerts


def test_a_row_an_earlier_run_left_that_the_gateway_holds_ready_fails_the_charge_task(world):
    """A crashed try's row, looked up by the next run: the gateway has the payment 'ready'
    (in progress). The row stays unsettled, and the task that found it fails for it."""
    from iamport_billing.hooks.iamport import IamportHook

    ledger, emulator, _ = world
    add_subscriptions(ledger, [("y3", "cust-y3", 9900)], DAY)
    register_cards(emulator, [("cust-y3", PAYING_CARD)])
    uid = crashed_pending_row(ledger, "y3", DAY)
    faults(emulator, charge_status_ready=True)
    IamportHook().charge_again("cust-y3", uid, 9900, "plan")  # the crashed try's request
    _, states = daily()
    assert states["charge[0]"] == "failed", states
    assert ledger.get_attempt(uid).status in UNSETTLED
    assert paid_at_gateway(emulator) == []


def test_a_retry_left_ready_fails_the_retry_task(world):
    ledger, emulator, _ = world
    add_subscriptions(ledger, [("y2", "cust-y2", 9900)], DAY)
    register_cards(emulator, [("cust-y2", SOFT_DECLINE_CARD)])
    daily()
    register_cards(emulator, [("cust-y2", PAYING_CARD)])
    faults(emulator, charge_status_ready=True)
    _, states = run_dag(load_dags().get_dag("iamport_billing_retry"), logical(DAY + timedelta(1)))
    assert states["retry"] == "failed"
    assert ledger.get_attempt(merchant_uid_for("y2", DAY, 2)).status in UNSETTLED


# 9. A failed charge task run again alone (what clearing it does) leaves the day right.
def test_a_cleared_charge_task_writes_its_batch_back_by_itself(world):
    from types import SimpleNamespace

    from iamport_billing.operators.charge import ChargeAgainOperator

    ledger, emulator, _ = world
    add_subscriptions(ledger, [("c1", "cust-c1", 9900)], DAY)
    register_cards(emulator, [("cust-c1", PAYING_CARD)])
    faults(emulator, error_rate=1.0)  # the gateway is down for the whole run
    dr, states = daily()
    assert states["charge[0]"] == "failed", states
    faults(emulator, error_rate=0.0)
    ti = SimpleNamespace(dag_id=dr.dag_id, run_id=dr.run_id, task_id="charge", map_index=0,
                         try_number=2)  # fmt: skip
    ChargeAgainOperator(
        task_id="charge", batch={"billing_date": DAY.isoformat(), "after": None, "until": "c1"},
        subscriptions_table="billing_subscriptions", unknown_settle_seconds=0.1,
    ).execute({"ti": ti, "params": {}})  # fmt: skip
    assert paid_at_gateway(emulator) == [merchant_uid_for("c1", DAY, 1)]
    assert ledger.subscription_state("c1")["next_billing_date"] == date(2026, 12, 26)


# 10. A due query that rejects (nearly) every row fails the plan before any charge.
def test_a_due_query_that_rejects_every_row_fails_the_plan(world):
    ledger, emulator, receiver = world
    add_subscriptions(ledger, [(f"b{i}", f"cust-b{i}", 0) for i in range(3)], DAY)
    _, states = daily()
    assert states["plan"] == "failed"
    assert paid_at_gateway(emulator) == []
    assert receiver.of_kind("guardrail") or receiver.alerts


def test_the_pending_state_is_never_left_behind_by_a_normal_run(world):
    ledger, emulator, _ = world
    add_subscriptions(ledger, [(f"n{i}", f"cust-n{i}", 1000 + i) for i in range(5)], DAY)
    register_cards(emulator, [(f"cust-n{i}", PAYING_CARD) for i in range(5)])
    daily()
    assert ledger.unsettled_summary() == {}
    assert PENDING not in ledger.date_summary(DAY)


# The redesign: the due query may read a separate, read-only source; the ledger is the result.
def test_a_read_only_source_feeds_the_ledger_on_another_connection(world, tmp_path, monkeypatch):
    import sqlite3

    ledger, emulator, _ = world
    source = tmp_path / "source.db"
    with sqlite3.connect(source) as conn:
        conn.execute("CREATE TABLE plans (id TEXT, card TEXT, price INTEGER, due TEXT)")
        conn.executemany(
            "INSERT INTO plans VALUES (?, ?, ?, ?)",
            [(f"w{i}", f"cust-w{i}", 1000 * (i + 1), DAY.isoformat()) for i in range(3)],
        )
    before = source.read_bytes()
    register_cards(emulator, [(f"cust-w{i}", PAYING_CARD) for i in range(3)])
    monkeypatch.setenv(
        "AIRFLOW_CONN_BILLING_SOURCE", json.dumps({"conn_type": "sqlite", "host": str(source)})
    )
    monkeypatch.setenv("IAMPORT_BILLING_SOURCE_CONN_ID", "billing_source")
    monkeypatch.setenv("IAMPORT_BILLING_WRITE_BACK", "false")
    monkeypatch.setenv(
        "IAMPORT_BILLING_DUE_QUERY",
        "SELECT id AS subscription_id, card AS customer_uid, price AS amount, 'KRW' AS currency, "
        "'plan' AS name, due AS billing_date FROM plans WHERE due <= :billing_date",
    )
    _, states = daily()
    assert states["report"] == "success", states
    assert paid_at_gateway(emulator) == [merchant_uid_for(f"w{i}", DAY, 1) for i in range(3)]
    assert {s: v["count"] for s, v in ledger.date_summary(DAY).items()} == {PAID: 3}
    assert source.read_bytes() == before  # nothing written to the source


def test_an_unsupported_ledger_database_fails_at_start_with_a_clear_message():
    from types import SimpleNamespace

    from iamport_billing.warehouse.dialects import UnsupportedDatabase

    hook = SimpleNamespace(dialect_name="oracle", get_conn_id=lambda: "billing_warehouse")
    with pytest.raises(UnsupportedDatabase, match="sqlite, postgresql or mysql"):
        Ledger(hook)
