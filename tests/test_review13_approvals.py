# ruff: noqa: F811 - pytest fixtures imported from the suites they come from
"""Review 13: an approval answers the plan it showed, not whatever the plan task pushed since."""

from __future__ import annotations

import threading
from datetime import date
from types import SimpleNamespace

import pytest
from chaos_support import logical, run_dag
from iamport_billing import tasks
from iamport_billing.config import BillingConfig
from iamport_billing.policy import merchant_uid_for
from support import PAYING_CARD, add_subscriptions, paid_at_gateway, register_cards

from tests.test_approvals import (  # noqa: F401 - fixtures
    DAG_ID,
    DAY,
    answer,
    api,
    daily,
    five_due,
    question,
)

pytestmark = pytest.mark.airflow
WAREHOUSES = ["sqlite"]


def _replan(run_id: str) -> str:
    """The plan task run again for the same run (ops cleared 'plan' alone while 'approve'
    waited): its XComs are replaced, as a real re-run of the task replaces them."""
    from airflow.models.xcom import XComModel

    def push(key: str, value) -> None:
        XComModel.set(key=key, value=value, dag_id=DAG_ID, task_id="plan", run_id=run_id)

    ti = SimpleNamespace(
        dag_id=DAG_ID, run_id=run_id, task_id="plan", map_index=-1, try_number=2,
        xcom_push=push,
    )  # fmt: skip
    context = {"ti": ti, "params": {"max_count": 3}, "logical_date": logical(DAY)}
    batches = tasks.plan_step(BillingConfig.from_env(), context)
    push("return_value", batches)
    return batches


def test_an_approval_applies_to_the_plan_shown_not_a_plan_pushed_since(
    daily, api, ledger, emulator
):
    shown = five_due(ledger, emulator)  # 5 due: over max_count 3, the question shows 5
    more = [(f"q{i}", f"cust-q{i}", 20_000 + i) for i in range(5)]
    client, headers = api
    seen: dict = {}

    def person_while_the_plan_is_run_again() -> None:
        detail = question(client, headers)
        seen["subject"] = detail["subject"]
        add_subscriptions(ledger, more, DAY)
        register_cards(emulator, [(c, PAYING_CARD) for _, c, _ in more])
        _replan(detail["task_instance"]["dag_run_id"])
        answer(client, headers, detail, "Approve")  # the person approves the 5 it was shown

    thread = threading.Thread(target=person_while_the_plan_is_run_again, daemon=True)
    thread.start()
    _, states = run_dag(daily, logical(DAY), max_count=3)
    thread.join(10)
    assert seen["subject"].startswith("Charge 5 subscriptions"), seen
    paid = paid_at_gateway(emulator)
    extra = sorted(set(paid) - set(shown))
    assert extra == [], f"approved 5, charged {len(paid)}: {extra} never shown; {states}"
    assert not any(merchant_uid_for(s, date(2026, 11, 26), 1) in paid for s, _, _ in more)
