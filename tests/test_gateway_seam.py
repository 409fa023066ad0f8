"""No "absent" without the gateway's own word: the DAGs against the emulator playing a foreign
or hostile server, on SQLite, PostgreSQL and MariaDB. One test per finding of the gateway
review (issue 11; refunds are in test_refunds.py)."""

from __future__ import annotations

import json
from datetime import date, timedelta

import pendulum
import pytest
import requests
from chaos_support import load_dags, logical, run_dag
from iamport_billing.policy import merchant_uid_for
from iamport_billing.states import FAILED, PAID, PAYMENT_METHOD_REQUIRED, REFUSED, UNSETTLED
from support import (
    PAYING_CARD,
    add_subscriptions,
    emulator_payments,
    faults,
    register_cards,
    run_daily,
)

pytestmark = pytest.mark.airflow

DAY = date(2026, 11, 26)


@pytest.fixture
def world(dag_world, monkeypatch):
    """Airflow retries on (a gateway that cannot be asked is retried), without waiting."""
    monkeypatch.setenv("IAMPORT_BILLING_PENDING_LEASE_SECONDS", "0")
    monkeypatch.setenv("IAMPORT_BILLING_TASK_RETRIES", "2")
    monkeypatch.setenv("IAMPORT_BILLING_TASK_RETRY_DELAY_SECONDS", "0")
    return dag_world


def daily(day: date = DAY, **params):
    return run_daily(day, **params)


def payments(emulator) -> list[tuple[str, str]]:
    return sorted(
        (p["merchant_uid"], p["status"]) for p in emulator_payments(emulator.config.db_path)
    )


def one_paying(ledger, emulator, sub: str = "f1", amount: int = 9900) -> str:
    add_subscriptions(ledger, [(sub, f"cust-{sub}", amount)], DAY)
    register_cards(emulator, [(f"cust-{sub}", PAYING_CARD)])
    return merchant_uid_for(sub, DAY, 1)


# 1. A dropped charge reply looked up through a proxy's 404 is never resent.
@pytest.mark.parametrize("switch", ["foreign_404_json", "foreign_404_html", "findall_bare_list"])
def test_a_dropped_reply_is_not_resent_when_the_lookup_gets_a_foreign_answer(world, switch):
    ledger, emulator, _ = world
    uid = one_paying(ledger, emulator)
    faults(emulator, drop_after_commit_rate=1.0, **{switch: True})
    _, states = daily()
    assert payments(emulator) == [(uid, PAID)]  # charged once, never twice
    stats = requests.get(f"{emulator.url}/__emulator__/stats", timeout=5).json()
    assert stats["requests"]["POST /subscribe/payments/again"] == 1  # and never resent
    assert ledger.get_attempt(uid).status in UNSETTLED
    assert states["charge[0]"] == "failed"
    faults(emulator, drop_after_commit_rate=0.0, **{switch: False})
    run_dag(load_dags().get_dag("iamport_billing_reconcile"), pendulum.now("UTC"))
    assert ledger.get_attempt(uid).status == PAID
    assert payments(emulator) == [(uid, PAID)]


def test_reconciliation_fails_instead_of_scanning_nothing_behind_a_proxy(world):
    ledger, emulator, receiver = world
    uid = one_paying(ledger, emulator)
    daily()
    faults(emulator, foreign_404_html=True)
    _, states = run_dag(load_dags().get_dag("iamport_billing_reconcile"), pendulum.now("UTC"))
    assert states["reconcile"] == "failed"
    assert ledger.get_attempt(uid).status == PAID
    failure = receiver.of_kind("task_failed")
    assert failure and "<" not in json.dumps(failure)


def test_precheck_marks_nobody_when_the_key_lookup_gets_a_foreign_answer(world):
    ledger, emulator, _ = world
    one_paying(ledger, emulator)
    ledger.execute(
        "UPDATE billing_subscriptions SET next_billing_date = %s",
        [(DAY + timedelta(1)).isoformat()],
    )
    faults(emulator, foreign_404_json=True)
    _, states = run_dag(load_dags().get_dag("iamport_billing_precheck"), logical(DAY))
    assert states["check_billing_keys"] == "failed"
    assert ledger.subscription_state("f1")["status"] != PAYMENT_METHOD_REQUIRED


# 4. Credentials refused: fail at once, say so, leave nothing pending or unknown.
def test_refused_credentials_fail_the_charge_at_once_and_say_so(world):
    ledger, emulator, receiver = world
    one_paying(ledger, emulator)
    faults(emulator, token_status=403)
    dr, states = daily()
    assert states["charge[0]"] == "failed"
    (charge,) = [ti for ti in dr.get_task_instances() if ti.task_id == "charge"]
    assert charge.try_number == 1  # no retries: they cannot help
    assert ledger.unsettled_summary() == {} and payments(emulator) == []
    texts = json.dumps(receiver.of_kind("task_failed"))
    assert "credentials" in texts and "imp_secret" in texts


def test_no_token_means_nothing_sent_and_no_row_unknown(world):
    ledger, emulator, _ = world
    uid = one_paying(ledger, emulator)
    faults(emulator, token_status=502)
    _, states = daily()
    assert states["charge[0]"] == "failed"
    assert ledger.get_attempt(uid) is None  # withdrawn: it never left
    assert payments(emulator) == []
    faults(emulator, token_status=None)
    daily()
    assert payments(emulator) == [(uid, PAID)]


# 6. Spec limits before sending; a refused first send is not a decline and is never dunned.
def test_a_long_buyer_name_is_trimmed_and_the_charge_goes_through(world):
    ledger, emulator, _ = world
    uid = one_paying(ledger, emulator)
    ledger.execute("UPDATE billing_subscriptions SET buyer_name = %s", ["김" * 30])
    daily()
    assert payments(emulator) == [(uid, PAID)]
    (sent,) = emulator_payments(emulator.config.db_path)
    assert sent["buyer_name"] == "김" * 16


def test_a_refused_request_is_alerted_and_never_dunned(world, monkeypatch):
    from iamport_billing.errors import IamportRequestRejected
    from iamport_billing.hooks.iamport import IamportHook

    ledger, emulator, receiver = world
    uid = one_paying(ledger, emulator)

    def refuse(self, *args, **kwargs):  # what Iamport says to a request it will not take
        raise IamportRequestRejected(1, "유효하지 않은 요청입니다.")

    monkeypatch.setattr(IamportHook, "charge_again", refuse)
    daily()
    row = ledger.get_attempt(uid)
    assert (row.status, row.decline_kind, row.next_retry_date) == (FAILED, REFUSED, None)
    assert receiver.of_kind("refused_requests")
    monkeypatch.undo()
    monkeypatch.setattr("iamport_billing.alerts.deadline_alerts", lambda cfg, *, starts_at: [])
    run_dag(load_dags().get_dag("iamport_billing_retry"), logical(DAY + timedelta(days=1)))
    assert ledger.get_attempt(merchant_uid_for("f1", DAY, 2)) is None
    assert payments(emulator) == []


# 5. A token already expired when issued: detected, and not re-fetched on every call.
def test_an_already_expired_token_does_not_cost_a_get_token_per_charge(world):
    ledger, emulator, _ = world
    subs = [(f"t{i}", f"cust-t{i}", 1000 + i) for i in range(20)]
    add_subscriptions(ledger, subs, DAY)
    register_cards(emulator, [(c, PAYING_CARD) for _, c, _ in subs])
    faults(emulator, token_already_expired=True)
    daily()
    assert len([p for p in payments(emulator) if p[1] == PAID]) == 20
    stats = requests.get(f"{emulator.url}/__emulator__/stats", timeout=5).json()
    assert stats["requests"].get("POST /users/getToken", 0) <= 3


# 7. A charge answered with a foreign 404 is asked about once, then settled, not resent.
def test_a_charge_answered_by_a_foreign_404_is_settled_by_lookup_not_resent(world):
    ledger, emulator, receiver = world
    uid = one_paying(ledger, emulator)
    faults(emulator, charge_foreign_404=True)
    daily()
    row = ledger.get_attempt(uid)
    assert (row.status, row.decline_kind, row.error_code) == (FAILED, REFUSED, "foreign_reply")
    assert "<" not in (row.error_message or "")
    stats = requests.get(f"{emulator.url}/__emulator__/stats", timeout=5).json()
    assert stats["requests"]["POST /subscribe/payments/again"] == 1
    assert receiver.of_kind("refused_requests")
    daily(DAY + timedelta(days=1))  # the next run does not send it again
    stats = requests.get(f"{emulator.url}/__emulator__/stats", timeout=5).json()
    assert stats["requests"]["POST /subscribe/payments/again"] == 1
