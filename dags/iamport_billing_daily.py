"""Daily recurring billing through Iamport.

reconcile -> plan -> approve -> charge (mapped per batch) -> write back -> report.

``approve`` passes straight on when the plan is within its guardrails; over them, the run waits
for a person (Airflow's Required Actions, or the HITL REST API) and charges exactly the plan
shown only when approved.

Wiring only: every step lives in the ``iamport_billing`` package. Billing date = the run's
logical date in Asia/Seoul (``run_after`` for manual runs without one).
"""

from __future__ import annotations

from datetime import time, timedelta

import pendulum
from airflow.sdk import DAG, CronTriggerTimetable, Param, task
from iamport_billing import alerts, tasks
from iamport_billing.config import BillingConfig
from iamport_billing.operators.approval import GuardrailApprovalOperator
from iamport_billing.operators.charge import ChargeAgainOperator

cfg = BillingConfig.from_env()

with DAG(
    dag_id="iamport_billing_daily",
    description="Charge due subscriptions through Iamport, exactly once each",
    # 10:00 KST: well clear of Korean card companies' midnight maintenance window.
    schedule=CronTriggerTimetable("0 10 * * *", timezone="Asia/Seoul"),
    start_date=pendulum.datetime(2026, 1, 1, tz="Asia/Seoul"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["billing", "iamport"],
    params={
        "dry_run": Param(False, type="boolean", description="Print the plan, charge nothing"),
        "batch_size": Param(500, type="integer", minimum=1, maximum=5000),
        "max_concurrency": Param(8, type="integer", minimum=1, maximum=256),
        "requests_per_second": Param(None, type=["null", "number"], minimum=0),
        "max_count": Param(None, type=["null", "integer"], minimum=0),
        "max_total_amount": Param(None, type=["null", "integer"], minimum=0),
        "max_total_multiple_of_previous": Param(
            None,
            type=["null", "number"],
            minimum=0,
            description="Hold the plan for approval above N x the previous run's total (default: "
            "config; 0: not for this run, e.g. after a person checked a month-end or catch-up day)",
        ),
        "max_rejected_share": Param(
            None,
            type=["null", "number"],
            minimum=0,
            maximum=1,
            description="Hold the plan for approval above this share of rejected due rows "
            "(default: config)",
        ),
    },
    default_args={"retries": 0, "on_failure_callback": alerts.TaskFailureAlert(cfg)},
    deadline=alerts.deadline_alerts(cfg, starts_at=time(10, 0)),
) as dag:

    @task
    def reconcile(**context):
        return tasks.reconcile_step(cfg, context)

    @task
    def plan(**context):
        return tasks.plan_step(cfg, context)

    @task(trigger_rule="all_done")
    def write_back(**context):
        return tasks.write_back_step(cfg, context)

    @task(trigger_rule="all_done")
    def report(**context):
        return tasks.report_step(cfg, context)

    batches = plan()
    approve = GuardrailApprovalOperator(
        task_id="approve",
        warehouse_conn_id=cfg.warehouse_conn_id,
        response_timeout=cfg.approval_timeout,
    )
    charge = ChargeAgainOperator.partial(
        task_id="charge",
        pool=cfg.pool,
        iamport_conn_id=cfg.iamport_conn_id,
        warehouse_conn_id=cfg.warehouse_conn_id,
        source_conn_id=cfg.source_conn_id,
        due_query=cfg.due_query,
        validation=cfg.validation,
        decline_table=cfg.decline_table,
        retry_schedule_days=cfg.retry_schedule_days,
        pending_lease_seconds=cfg.pending_lease_seconds,
        unknown_settle_seconds=cfg.unknown_settle_seconds,
        subscriptions_table=cfg.subscriptions_table if cfg.write_back else None,
        max_concurrency="{{ params.max_concurrency }}",
        requests_per_second="{{ params.requests_per_second }}",
        retries=cfg.task_retries,
        retry_delay=timedelta(seconds=cfg.task_retry_delay_seconds),
        retry_exponential_backoff=2.0,
        max_retry_delay=timedelta(minutes=30),
    ).expand(batch=batches)

    reconcile() >> batches >> approve >> charge
    charge >> write_back() >> report()
