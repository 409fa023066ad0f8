"""Findings of the adversarial review of the state machine (commit 5132432): each test failed
there and passes now; the docstring of each says what broke and the sequence that broke it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from datetime import UTC, date, datetime, timedelta

import pytest
from chaos_support import load_dags, logical, run_dag
from conftest import conn_env
from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
from iamport_billing.policy import ChargeCandidate, merchant_uid_for
from iamport_billing.states import ABANDONED, FAILED, PAYMENT_METHOD_REQUIRED
from support import (
    HARD_DECLINE_CARD,
    PAYING_CARD,
    SOFT_DECLINE_CARD,
    add_subscriptions,
    crashed_pending_row,
    faults,
    paid_at_gateway,
    register_cards,
    run_daily,
)

DAY = date(2026, 11, 26)
RUN = {"dag_id": "review", "run_id": "r-1", "task_id": "charge[0]", "try_number": 1}


def gw(hook):
    """What the engine talks to: the gateway over the hook."""
    return IamportV1Gateway(hook)


def age(ledger, merchant_uid: str, seconds: float = 3600) -> None:
    ledger.execute(
        "UPDATE billing_charge_attempts SET requested_at = %s WHERE merchant_uid = %s",
        [ledger.stamp(datetime.now(UTC) - timedelta(seconds=seconds)), merchant_uid],
    )


@pytest.fixture
def world(dag_world):
    return dag_world


def daily(day: date = DAY, **params):
    return run_daily(day, **params)


# -- 1. a put-back is silently undone by the next write-back ------------------------------------
@pytest.mark.airflow
def test_a_put_back_survives_the_dunning_dags_write_back(world):
    """Daily 10:00 hard-declines h1 -> payment_method_required. Ops put it back at 12:00
    (new card). The retry DAG at 14:00 runs write_back, whose latest_failed_subscriptions(hard)
    still sees 'active + latest attempt hard-failed on its billing date' and sets
    payment_method_required again. The next daily run never charges h1: the put-back is lost
    and the subscription is stuck."""
    from iamport_billing.cli import main as cli

    ledger, emulator, _ = world
    add_subscriptions(ledger, [("h1", "cust-h1", 9900)], DAY)
    register_cards(emulator, [("cust-h1", HARD_DECLINE_CARD)])
    daily()
    assert ledger.subscription_state("h1")["status"] == PAYMENT_METHOD_REQUIRED
    register_cards(emulator, [("cust-h1", PAYING_CARD)])
    assert cli(["subscriptions", "put-back", "h1"]) == 0
    run_dag(load_dags().get_dag("iamport_billing_retry"), logical(DAY, "14:00"))
    daily(DAY + timedelta(days=1))
    assert paid_at_gateway(emulator) == [merchant_uid_for("h1", DAY, 2)]


# -- 2. the put-back path sends NN+1 without asking about NN ------------------------------------
@pytest.mark.airflow
def test_a_put_back_attempt_asks_the_gateway_about_attempt_nn_first(world):
    """Dunning now looks NN up before NN+1 (previous_unpaid), the put-back path in
    ChargeEngine.plan does not: attempt 01 is FAILED(hard) in the ledger but was paid at the
    gateway after all (the zombie/late answer of test_exactly_once #2); ops put the
    subscription back; the next daily run sends 02 -> the period is paid twice."""
    from iamport_billing.cli import main as cli
    from iamport_billing.hooks.iamport import IamportHook

    ledger, emulator, _ = world
    add_subscriptions(ledger, [("h2", "cust-h2", 9900)], DAY)
    register_cards(emulator, [("cust-h2", HARD_DECLINE_CARD)])
    daily()
    uid1 = merchant_uid_for("h2", DAY, 1)
    assert ledger.get_attempt(uid1).status == FAILED
    register_cards(emulator, [("cust-h2", PAYING_CARD)])
    IamportHook().charge_again("cust-h2", uid1, 9900, "plan")  # the late, paid attempt 01
    assert cli(["subscriptions", "put-back", "h2"]) == 0
    daily(DAY + timedelta(days=1))
    assert paid_at_gateway(emulator) == [uid1]


# -- 3. reclaim ignores the lease: a resend while the owner's POST is in flight ----------------
@pytest.mark.parametrize(
    "other", [{"dag_id": "reconcile"}, {"try_number": 2}], ids=["reconcile", "a_later_try"]
)
def test_reconcile_never_resends_a_row_whose_owner_is_posting_it(
    ledger, emulator, monkeypatch, other
):
    """Engine A claimed f1-..-01 in a chunk; the chunk took longer than the lease to reach it
    (slow gateway / low requests_per_second), so requested_at is old. Reconcile (B) reads the
    row, looks it up (not found), and meanwhile A's confirm_send succeeds and A POSTs. B's
    reclaim() compares only status and claim_token, not the lease A just renewed, so it wins
    and B POSTs the same merchant_uid while A's POST is in flight. Only the gateway's
    duplicate check stands between this and a double charge. A later try of the same task
    skips the lease (the earlier try is taken for dead): only the send count guards it."""
    from iamport_billing.charging import (
        ChargeEngine,
        ChargeSettings,
        PlannedCharge,
        resolve_unsettled,
    )
    from iamport_billing.hooks.iamport import IamportHook
    from iamport_billing.warehouse.ledger import Ledger

    register_cards(emulator, [("cust-f1", PAYING_CARD)])
    settings = ChargeSettings(unknown_settle_seconds=0.1)
    uid = merchant_uid_for("f1", DAY, 1)
    planned = PlannedCharge(ChargeCandidate("f1", "cust-f1", 9900, DAY, name="plan"), 1, uid)
    hook_a, hook_b = IamportHook(), IamportHook()
    engine_a = ChargeEngine(gw(hook_a), Ledger.from_conn_id("billing_warehouse"), settings, RUN)
    # A's write-ahead (its own ledger connection is opened in A's thread: SQLite needs that)
    assert ledger.claim([planned.ledger_row(RUN)], engine_a.claim_token) == {uid}
    owned = [planned]
    age(ledger, uid)

    posting, release = threading.Event(), threading.Event()
    real_a, real_b, real_lookup = hook_a.charge_again, hook_b.charge_again, hook_b.find_all_payments
    b_posts_during_a: list[bool] = []

    def a_charge(*args, **kwargs):
        posting.set()
        release.wait(30)  # A's request is on the wire
        return real_a(*args, **kwargs)

    def b_charge(*args, **kwargs):
        b_posts_during_a.append(posting.is_set() and not release.is_set())
        return real_b(*args, **kwargs)

    worker = threading.Thread(target=engine_a.send_all, args=(owned, []))

    def b_lookup(merchant_uid, *args, **kwargs):
        found = real_lookup(merchant_uid, *args, **kwargs)
        if merchant_uid == uid and not worker.is_alive():
            worker.start()  # A reaches the row between B's lookup and B's reclaim
            assert posting.wait(30)
        return found

    monkeypatch.setattr(hook_a, "charge_again", a_charge)
    monkeypatch.setattr(hook_b, "charge_again", b_charge)
    monkeypatch.setattr(hook_b, "find_all_payments", b_lookup)
    try:
        resolve_unsettled(gw(hook_b), ledger, settings, {**RUN, **other})
    finally:
        release.set()
        worker.join(30)
    assert b_posts_during_a == [], "reconcile POSTed while the owner's POST was in flight"
    assert paid_at_gateway(emulator) == [uid]


def test_rate_limit_waits_keep_the_lease(ledger, emulator, monkeypatch):
    """_charge_one sleeps e.retry_after (uncapped; the hook caps its own waits at 60 s) up to
    rate_limit_retries times after one confirm_send: the lease is not renewed while it waits,
    so reconcile takes the row over and POSTs it, and then A POSTs it again. Scaled down here:
    lease 0.5 s, Retry-After 2 s (in production: Retry-After 120 s x 5 > 300 s lease)."""
    from iamport_billing.charging import (
        ChargeEngine,
        ChargeSettings,
        PlannedCharge,
        resolve_unsettled,
    )
    from iamport_billing.errors import IamportRateLimited
    from iamport_billing.hooks.iamport import IamportHook
    from iamport_billing.warehouse.ledger import Ledger

    register_cards(emulator, [("cust-q1", PAYING_CARD)])
    settings = ChargeSettings(unknown_settle_seconds=0.1, pending_lease_seconds=0.5,
                              rate_limit_retries=1)  # fmt: skip
    uid = merchant_uid_for("q1", DAY, 1)
    planned = PlannedCharge(ChargeCandidate("q1", "cust-q1", 9900, DAY, name="plan"), 1, uid)
    hook_a, hook_b = IamportHook(), IamportHook()
    real_a, real_b = hook_a.charge_again, hook_b.charge_again
    limited = threading.Event()
    a_waiting = threading.Event()
    b_posts_while_a_waits: list[bool] = []

    def a_charge(*args, **kwargs):
        if not limited.is_set():
            limited.set()
            a_waiting.set()
            raise IamportRateLimited("rate limited", retry_after=2.0, http_status=429)
        a_waiting.clear()
        return real_a(*args, **kwargs)

    def b_charge(*args, **kwargs):
        b_posts_while_a_waits.append(a_waiting.is_set())
        return real_b(*args, **kwargs)

    monkeypatch.setattr(hook_a, "charge_again", a_charge)
    monkeypatch.setattr(hook_b, "charge_again", b_charge)
    engine_a = ChargeEngine(gw(hook_a), Ledger.from_conn_id("billing_warehouse"), settings, RUN)
    worker = threading.Thread(target=engine_a.send_all, args=([], [planned]))
    worker.start()
    assert limited.wait(30)
    time.sleep(0.8)  # A is still waiting out Retry-After; its lease has run out
    resolve_unsettled(gw(hook_b), ledger, settings, {**RUN, "dag_id": "reconcile"})
    worker.join(30)
    assert b_posts_while_a_waits == [], "reconcile POSTed while the owner was going to resend"


# -- 4. reconcile resends rows whose subscription was cancelled since --------------------------
@pytest.mark.airflow
def test_reconcile_does_not_charge_a_subscription_cancelled_before_the_resend(world):
    """A daily charge task died after its write-ahead and before the POST (send_count 0). The
    customer cancels the subscription. resolve_unsettled (reconcile DAG, or the next daily/
    retry reconcile step) finds 'not at the gateway' and resends the stale request under the
    same merchant_uid, without checking the subscription, the plan or the overdue limit: a
    cancelled subscription ('never charged' per states.py) is charged."""
    ledger, emulator, _ = world
    add_subscriptions(ledger, [("x1", "cust-x1", 9900)], DAY)
    register_cards(emulator, [("cust-x1", PAYING_CARD)])
    uid = crashed_pending_row(ledger, "x1", DAY)
    ledger.execute(
        "UPDATE billing_subscriptions SET status = 'cancelled' WHERE subscription_id = 'x1'"
    )
    run_dag(load_dags().get_dag("iamport_billing_reconcile"), logical(DAY, "11:25"))
    assert paid_at_gateway(emulator) == []
    assert ledger.get_attempt(uid).status == ABANDONED


# -- 5. MariaDB compares keys case-insensitively ------------------------------------------------
def test_subscriptions_differing_only_in_case_are_both_charged(hook, ledger, emulator):
    """On MariaDB/MySQL the ledger's VARCHAR keys use the database's default collation
    (utf8mb4_general_ci / 0900_ai_ci): 'AB1-20261126-01' and 'ab1-20261126-01' are the same
    PRIMARY KEY, and subscription_id IN ('ab1') finds AB1's attempts. With a due source whose
    ids are case-sensitive (a separate warehouse, or a binary-collated table), 'ab1' is
    silently counted 'claimed_elsewhere' and never charged (and write-back would advance it on
    AB1's payment). SQLite and PostgreSQL charge both."""
    from iamport_billing.charging import ChargeEngine, ChargeSettings

    register_cards(emulator, [("cust-AB1", PAYING_CARD), ("cust-ab1", PAYING_CARD)])
    result = ChargeEngine(
        gw(hook), ledger, ChargeSettings(unknown_settle_seconds=0.1), RUN
    ).charge_batch([
        ChargeCandidate("AB1", "cust-AB1", 1000, DAY, name="plan"),
        ChargeCandidate("ab1", "cust-ab1", 2000, DAY, name="plan"),
    ])  # fmt: skip
    assert paid_at_gateway(emulator) == ["AB1-20261126-01", "ab1-20261126-01"], result.counts


# -- 6. the per-batch write-back swallows the daily run's past_due alert ------------------------
@pytest.mark.airflow
def test_a_soft_decline_with_no_retry_left_alerts_past_due_from_the_daily_run(world, monkeypatch):
    """The charge operator now writes its batch back (past_due included) before the DAG's
    write_back step, which computes going_past_due = active + exhausted BEFORE writing back:
    it is always empty now, so the past_due alert never fires from the daily DAG (e.g. with
    IAMPORT_BILLING_MAX_ATTEMPTS=1, or an exhausted put-back attempt)."""
    monkeypatch.setenv("IAMPORT_BILLING_MAX_ATTEMPTS", "1")
    ledger, emulator, receiver = world
    add_subscriptions(ledger, [("s1", "cust-s1", 9900)], DAY)
    register_cards(emulator, [("cust-s1", SOFT_DECLINE_CARD)])
    daily()
    assert ledger.subscription_state("s1")["status"] == "past_due"
    assert receiver.of_kind("past_due"), [a.get("kind") for a in receiver.alerts]


# -- 7. dunning sends NN+1 while NN is still in progress at the gateway -------------------------
@pytest.mark.airflow
def test_dunning_does_not_send_nn_plus_1_while_nn_is_still_ready_at_the_gateway(world):
    """previous_unpaid() lets NN+1 go unless NN's lookup says money moved; a 'ready' record
    (the PG is still working on a late request of attempt NN) maps to UNKNOWN and is let
    through. 02 is charged, then 01 completes: the period is paid twice."""
    from iamport_billing.hooks.iamport import IamportHook

    ledger, emulator, _ = world
    add_subscriptions(ledger, [("d7", "cust-d7", 9900)], DAY)
    register_cards(emulator, [("cust-d7", SOFT_DECLINE_CARD)])
    daily()
    uid1 = merchant_uid_for("d7", DAY, 1)
    assert ledger.get_attempt(uid1).status == FAILED
    register_cards(emulator, [("cust-d7", PAYING_CARD)])
    faults(emulator, charge_status_ready=True)
    IamportHook().charge_again("cust-d7", uid1, 9900, "plan")  # a late request of 01: 'ready'
    faults(emulator, charge_status_ready=False)
    run_dag(load_dags().get_dag("iamport_billing_retry"), logical(DAY + timedelta(days=1), "14:00"))
    conn = sqlite3.connect(emulator.config.db_path)
    with conn:  # ...and the PG completes 01
        conn.execute("UPDATE payments SET status = 'paid' WHERE merchant_uid = ? "
                     "AND status = 'ready'", (uid1,))  # fmt: skip
    conn.close()
    assert paid_at_gateway(emulator) == [uid1]


# -- 8. write-back off: any updated_at touch is taken for a put-back ----------------------------
@pytest.mark.airflow
def test_with_write_back_off_a_profile_update_is_not_a_put_back(world, monkeypatch):
    """With IAMPORT_BILLING_WRITE_BACK=false (the documented mode for a read-only warehouse)
    a hard-declined subscription stays 'active'. _put_back_after only asks 'updated_at after
    the last failure': an ordinary edit (buyer_email, a nightly ETL touching updated_at) makes
    the next daily run send attempt 02 to the same hard-declined card, and so on daily up to
    attempt 99, past max_attempts."""
    monkeypatch.setenv("IAMPORT_BILLING_WRITE_BACK", "false")
    ledger, emulator, _ = world
    add_subscriptions(ledger, [("w1", "cust-w1", 9900)], DAY)
    register_cards(emulator, [("cust-w1", HARD_DECLINE_CARD)])
    daily()
    assert ledger.get_attempt(merchant_uid_for("w1", DAY, 1)).decline_kind == "hard"
    ledger.execute(
        "UPDATE billing_subscriptions SET buyer_email = %s, updated_at = %s "
        "WHERE subscription_id = 'w1'",
        ["new@example.com", ledger.stamp()],
    )
    daily(DAY + timedelta(days=1))
    assert ledger.get_attempt(merchant_uid_for("w1", DAY, 2)) is None


def test_a_case_sensitive_due_source_can_be_planned_on_any_ledger(ledger, tmp_path, monkeypatch):
    """Same root cause, at plan time: a due source (here a SQLite warehouse; PostgreSQL or
    BigQuery alike) holding 'AB1' and 'ab1' freezes both into billing_plan_items, whose
    PRIMARY KEY on MariaDB is case-insensitive: the INSERT fails and the whole day's plan
    step crashes (every subscription goes uncharged)."""
    from iamport_billing.billing_run import plan_run
    from iamport_billing.policy import Guardrails, ValidationLimits
    from iamport_billing.warehouse.source import DueSource

    path = tmp_path / "source.db"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE subs (subscription_id TEXT, customer_uid TEXT, amount INT, "
                     "next_billing_date TEXT, updated_at TEXT)")  # fmt: skip
        conn.executemany(
            "INSERT INTO subs VALUES (?, ?, ?, ?, NULL)",
            [(s, f"cust-{s}", 1000, DAY.isoformat()) for s in ("AB1", "ab1")],
        )
    conn.close()
    monkeypatch.setenv(conn_env("review_source"),
                       json.dumps({"conn_type": "sqlite", "host": str(path)}))  # fmt: skip
    with DueSource.from_conn_id("review_source") as source:
        plan = plan_run(
            ledger, source=source, batch_size=10, limits=ValidationLimits(),
            due_query="SELECT subscription_id, customer_uid, amount, next_billing_date AS "
                      "billing_date, updated_at FROM subs WHERE next_billing_date <= :billing_date",
            billing_date=DAY, guardrails=Guardrails(), dry_run=False, run=RUN,
        )  # fmt: skip
    assert plan.count == 2


# -- round 2: a period abandoned while the subscription was cancelled ------------------------
@pytest.mark.airflow
def test_a_period_abandoned_then_owed_again_is_billed_not_skipped_forever(dag_world):
    """A daily charge task dies after its write-ahead, before the POST (x1-..-01 pending,
    send_count 0). The customer cancels; the hourly reconcile asks Iamport (absent) and closes
    the row `abandoned` (no longer owed). The customer comes back the same day: support sets
    the subscription active again, still due on 11-26. Every later daily run plans x1 for
    11-26, sees attempt 01 `abandoned` and counts it `already_settled`: x1 is never charged
    and never advanced, silently, for ever; `subscriptions put-back` refuses too ("its latest
    attempt ... is abandoned, not failed"). Fix: treat an abandoned attempt like no attempt
    when its period is owed again (send attempt NN+1, or resend NN once the gateway confirms
    it never saw it), or let put-back follow an abandoned attempt."""
    ledger, emulator, _ = dag_world
    add_subscriptions(ledger, [("x1", "cust-x1", 9900)], DAY)
    register_cards(emulator, [("cust-x1", PAYING_CARD)])
    uid = crashed_pending_row(ledger, "x1", DAY)
    ledger.execute(
        "UPDATE billing_subscriptions SET status = 'cancelled' WHERE subscription_id = 'x1'"
    )
    run_dag(load_dags().get_dag("iamport_billing_reconcile"), logical(DAY, "11:25"))
    assert ledger.get_attempt(uid).status == "abandoned"

    ledger.execute(
        "UPDATE billing_subscriptions SET status = 'active' WHERE subscription_id = 'x1'"
    )
    put_back = ledger.put_back("x1")  # what ops would try next
    run_daily(DAY)  # the daily run of the same day, cleared and run again by ops

    assert [u for u in paid_at_gateway(emulator) if u.startswith("x1-")], (
        f"x1 owes 11-26 again and is active, but no run will ever charge it (put-back: {put_back})"
    )
