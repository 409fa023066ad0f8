"""Hourly reconciliation of the ledger against Iamport. Wiring only; see reconciliation.py."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, CronTriggerTimetable, task
from iamport_billing import alerts, ops_tasks
from iamport_billing.config import BillingConfig

cfg = BillingConfig.from_env()

with DAG(
    dag_id="iamport_billing_reconcile",
    description="Resolve unknown outcomes, record missing payments, flag mismatches",
    schedule=CronTriggerTimetable("25 * * * *", timezone="Asia/Seoul"),
    start_date=pendulum.datetime(2026, 1, 1, tz="Asia/Seoul"),
    catchup=False,
    max_active_runs=1,
    tags=["billing", "iamport", "reconciliation"],
    default_args={
        "retries": cfg.task_retries,
        "retry_delay": timedelta(seconds=cfg.task_retry_delay_seconds),
        "on_failure_callback": alerts.TaskFailureAlert(cfg),
    },
) as dag:

    @task
    def reconcile(**context):
        return ops_tasks.reconcile_step(cfg, context)

    reconcile()
