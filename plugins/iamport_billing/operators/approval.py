"""GuardrailApprovalOperator: a plan over its guardrails waits for a person, in Airflow.

Airflow's own human-in-the-loop ``ApprovalOperator`` (standard provider) does the waiting, the
Required Actions page and the REST API (``PATCH .../taskInstances/approve/-1/hitlDetails``).
What this adds is billing's side: the question names the plan (counts, totals, the difference
from the previous run, what broke), and the answer goes to the ledger, compare-and-set against
the digest of the plan that was shown. The charge tasks send nothing of a plan over its
guardrails until the ledger says approved, so clearing a charge task cannot skip the question.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk.exceptions import AirflowFailException

from iamport_billing import alerts
from iamport_billing.billing_run import run_info
from iamport_billing.config import BillingConfig
from iamport_billing.notifiers import CRITICAL, Alert
from iamport_billing.ui.links import airflow_base_url, billing_url
from iamport_billing.warehouse.ledger import Ledger

SHOWN_DIGEST = "shown_plan_digest"  # XCom of the approve task: the plan the person was shown


class GuardrailApprovalOperator(ApprovalOperator):
    """Pass straight on when the run's plan is within its guardrails; otherwise ask a person.

    Approve: the ledger records the approval of exactly the plan shown, and the charge tasks
    charge it. Reject, or no answer within ``response_timeout`` (the default answer is Reject):
    the charge tasks are skipped, the ledger records the rejection, and the run's report fails
    and alerts with it.
    """

    def __init__(
        self,
        *,
        warehouse_conn_id: str = "billing_warehouse",
        plan_task_id: str = "plan",
        response_timeout: timedelta | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            subject="A billing plan over its guardrails waits for approval",
            defaults=[self.REJECT],
            response_timeout=response_timeout,
            **kwargs,
        )
        self.warehouse_conn_id = warehouse_conn_id
        self.plan_task_id = plan_task_id

    def _plan(self, context: Any) -> dict[str, Any] | None:
        return context["ti"].xcom_pull(task_ids=self.plan_task_id, key="plan")

    def execute(self, context: Any) -> Any:
        plan = self._plan(context)
        if not plan or not plan.get("violations") or plan.get("dry_run"):
            self.log.info("the plan is within its guardrails: nothing to approve")
            return None
        cfg = BillingConfig.from_env()
        # The answer is to this plan: the digest shown, not whatever the plan task holds when
        # the answer comes (it may have been planned again in between).
        context["ti"].xcom_push(key=SHOWN_DIGEST, value=plan.get("plan_digest"))
        self.subject = question(plan)
        self.body = explanation(plan, self.response_timeout, airflow_base_url())
        alerts.send([approval_requested(plan, cfg, run_info(context))], cfg, self.log)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        # Recorded before the provider's part: on Reject it skips the charge tasks by raising.
        if "error" not in event:
            self._record(context, event)
        return super().execute_complete(context, event)

    def _record(self, context: Any, event: dict[str, Any]) -> None:
        shown = context["ti"].xcom_pull(task_ids=self.task_id, key=SHOWN_DIGEST)
        approved = event["chosen_options"] == [self.APPROVE]
        user = event.get("responded_by_user") or {}
        by = str(user.get("name") or user.get("id") or "the timeout's default (Reject)")
        with Ledger.from_conn_id(self.warehouse_conn_id) as ledger:
            applied = ledger.decide_plan(
                run_info(context), approve=approved, by=by, plan_digest=str(shown),
            )  # fmt: skip
        if approved and not applied:
            raise AirflowFailException(
                "the approval did not apply: the run was planned again after the plan shown "
                "(or answered already); nothing of the new plan is charged without a new answer"
            )
        self.log.info("plan %s by %s", "approved" if approved else "rejected", by)


def question(plan: dict[str, Any]) -> str:
    return (
        f"Charge {plan['count']:,} subscriptions ({plan['total_amount']:,} KRW) for "
        f"{plan['billing_date']}? The plan is over its guardrails."
    )


def explanation(plan: dict[str, Any], timeout: timedelta | None, base_url: str) -> str:
    """The body a person reads before answering (Markdown, as Airflow renders it)."""
    previous = plan.get("previous_total")
    if previous:
        change = plan["total_amount"] - previous
        versus = f"{previous:,} KRW ({change:+,} KRW, {plan['total_amount'] / previous:.1f}x)"
    else:
        versus = "none (no earlier run to compare with)"
    waits = f"{timeout.total_seconds() / 60:g} minutes" if timeout else "no time limit"
    broken = "\n".join(f"- {v}" for v in plan["violations"])
    return "\n\n".join([
        f"**Billing date:** {plan['billing_date']}",
        f"**Planned charges:** {plan['count']:,} subscriptions, {plan['total_amount']:,} KRW",
        f"**Previous run's total:** {versus}",
        f"**Rejected due rows:** {plan.get('rejected_count', 0):,}",
        f"**Broken guardrails:**\n{broken}",
        f"**Approve** charges exactly this plan (digest `{str(plan.get('plan_digest'))[:12]}`). "
        f"**Reject** charges nothing; so does no answer within {waits}. Either way the run's "
        "report says who decided.",
        f"Billing page: {billing_url('/dates/' + plan['billing_date'], base_url)}",
    ])  # fmt: skip


def approval_requested(plan: dict[str, Any], cfg: BillingConfig, run: dict[str, Any]) -> Alert:
    """Someone must answer: the alert names the plan and what broke."""
    return Alert(
        kind="approval_requested", severity=CRITICAL,
        title="guardrail tripped: the plan waits for a person's approval in Airflow "
        "(Required Actions); nothing is charged until then",
        counts={"planned": plan["count"]}, amounts={"planned": plan["total_amount"]},
        details=tuple(plan["violations"]),
        **alerts.alert_fields(cfg, run, plan["billing_date"]),
    )  # fmt: skip
