"""A plan over its guardrails waits for a person: the daily DAG through dag.test(), answered
through Airflow's HITL REST API (the api-server app in-process, on the same metadata DB), on
every ledger database."""

from __future__ import annotations

import threading
import time
from datetime import date

import pytest
from chaos_support import load_dags, logical, run_dag
from iamport_billing.operators.charge import ChargeAgainOperator
from iamport_billing.policy import merchant_uid_for
from support import (
    PAYING_CARD,
    add_subscriptions,
    airflow_api,
    bearer,
    paid_at_gateway,
    register_cards,
)

pytestmark = pytest.mark.airflow

DAY = date(2026, 11, 26)
DAG_ID = "iamport_billing_daily"
OPS, PASSWORD = "ops", "ops-password"
HITL = f"/api/v2/dags/{DAG_ID}/dagRuns"


@pytest.fixture
def api(airflow_db, tmp_path):
    with airflow_api(tmp_path, {OPS: ("admin", PASSWORD)}) as client:
        yield client, bearer(client, OPS, PASSWORD)


@pytest.fixture
def daily(monkeypatch, api):
    """The daily DAG as a deployment with approvals on (a 1-minute timeout) would parse it."""
    monkeypatch.setenv("IAMPORT_BILLING_APPROVAL_TIMEOUT_MINUTES", "1")
    monkeypatch.setenv("IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS", "0.1")
    # dag.test() cannot finish a run with deadline alerts (see RELIABILITY.md).
    monkeypatch.setattr("iamport_billing.alerts.deadline_alerts", lambda cfg, *, starts_at: [])
    return load_dags().get_dag(DAG_ID)


def five_due(ledger, emulator) -> list[str]:
    subs = [(f"p{i}", f"cust-p{i}", 10_000 + i) for i in range(5)]
    add_subscriptions(ledger, subs, DAY)
    register_cards(emulator, [(c, PAYING_CARD) for _, c, _ in subs])
    return sorted(merchant_uid_for(s, DAY, 1) for s, _, _ in subs)


def question(client, headers, timeout: float = 120.0) -> dict:
    """The open approval request of the daily DAG, as the REST API lists it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"{HITL}/~/hitlDetails", headers=headers)
        assert r.status_code == 200, r.text
        open_ = [d for d in r.json()["hitl_details"] if not d["response_received"]]
        if open_:
            return open_[0]
        time.sleep(0.5)
    raise TimeoutError("the approve task never asked")


def answer(client, headers, detail: dict, option: str) -> None:
    ti = detail["task_instance"]
    r = client.patch(
        f"{HITL}/{ti['dag_run_id']}/taskInstances/{ti['task_id']}/{ti['map_index']}/hitlDetails",
        headers=headers,
        json={"chosen_options": [option]},
    )
    assert r.status_code == 200, r.text


def run_answered(dag, api, option: str, **params):
    """One daily run (dag.test() in this thread: task runners want the main thread's signals);
    a second thread answers its approval request with ``option`` through the REST API."""
    client, headers = api
    asked: dict = {}

    def person() -> None:
        asked["detail"] = detail = question(client, headers)
        answer(client, headers, detail, option)

    thread = threading.Thread(target=person, daemon=True)
    thread.start()
    dr, states = run_dag(dag, logical(DAY), **params)
    thread.join(10)
    return asked["detail"], dr, states


def test_a_plan_over_its_guardrails_asks_with_its_counts_totals_and_what_broke(
    daily, api, ledger, emulator
):
    five_due(ledger, emulator)
    detail, dr, _ = run_answered(daily, api, "Reject", max_count=3)
    assert detail["subject"].startswith("Charge 5 subscriptions (50,010 KRW) for 2026-11-26?")
    assert "5 charges planned, over max_count 3" in detail["body"]
    assert detail["options"] == ["Approve", "Reject"] and detail["defaults"] == ["Reject"]


def test_approve_charges_exactly_the_plan_shown(daily, api, ledger, emulator):
    planned = five_due(ledger, emulator)
    _, dr, states = run_answered(daily, api, "Approve", max_count=3)
    assert paid_at_gateway(emulator) == planned
    assert states["approve"] == "success" and states["report"] == "success", states
    assert dr.state == "success"
    (decision,) = ledger.query("SELECT approval, approved_by FROM billing_runs")
    assert tuple(decision) == ("approved", OPS)


def test_reject_charges_nothing_and_fails_the_report(daily, api, ledger, emulator):
    five_due(ledger, emulator)
    _, dr, states = run_answered(daily, api, "Reject", max_count=3)
    assert paid_at_gateway(emulator) == []
    assert states["approve"] == "success"
    assert all(v == "skipped" for k, v in states.items() if k.startswith("charge")), states
    assert states["report"] == "failed" and dr.state == "failed"
    (decision,) = ledger.query("SELECT approval, approved_by FROM billing_runs")
    assert tuple(decision) == ("rejected", OPS)


def test_a_charge_task_run_while_the_plan_waits_charges_nothing(daily, api, ledger, emulator):
    """Clearing or running a charge task by hand cannot skip the question: the ledger holds
    a plan over its guardrails until a person approves it."""
    five_due(ledger, emulator)
    client, headers = api
    tried: dict = {}

    def person_who_runs_a_charge_task_instead() -> None:
        detail = question(client, headers)
        ti = type("TI", (), {"dag_id": DAG_ID, "run_id": detail["task_instance"]["dag_run_id"],
                             "task_id": "charge", "map_index": 0, "try_number": 1})()  # fmt: skip
        batch = {"billing_date": DAY.isoformat(), "after": None, "until": "p4"}
        ChargeAgainOperator(task_id="charge", batch=batch, unknown_settle_seconds=0.1).execute(
            {"ti": ti, "params": {}}
        )
        tried["paid"] = paid_at_gateway(emulator)
        answer(client, headers, detail, "Reject")

    thread = threading.Thread(target=person_who_runs_a_charge_task_instead, daemon=True)
    thread.start()
    run_dag(daily, logical(DAY), max_count=3)
    thread.join(10)
    assert tried["paid"] == [] and paid_at_gateway(emulator) == []


def test_an_approval_of_a_plan_made_again_since_does_not_apply(ledger):
    run = {"dag_id": DAG_ID, "run_id": "r1"}
    ledger.record_run(run, DAY, 5, 50_000, 0, False, "over max_count", plan_digest="first")
    ledger.record_run(run, DAY, 6, 60_000, 0, False, "over max_count", plan_digest="second")
    assert not ledger.decide_plan(run, approve=True, by=OPS, plan_digest="first")
    assert ledger.run_record(run).held
    assert ledger.decide_plan(run, approve=True, by=OPS, plan_digest="second")
    assert not ledger.decide_plan(run, approve=False, by="late", plan_digest="second")
    assert not ledger.run_record(run).held
