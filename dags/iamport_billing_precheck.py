"""The day before charge day: check due customers' billing keys in bulk. Wiring only."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, CronTriggerTimetable, task
from iamport_billing import alerts, ops_tasks
from iamport_billing.config import BillingConfig

cfg = BillingConfig.from_env()

with DAG(
    dag_id="iamport_billing_precheck",
    description="Mark subscriptions without a billing key before their billing date",
    schedule=CronTriggerTimetable("0 9 * * *", timezone="Asia/Seoul"),
    start_date=pendulum.datetime(2026, 1, 1, tz="Asia/Seoul"),
    catchup=False,
    max_active_runs=1,
    tags=["billing", "iamport"],
    default_args={
        "retries": cfg.task_retries,
        "retry_delay": timedelta(seconds=cfg.task_retry_delay_seconds),
        "on_failure_callback": alerts.TaskFailureAlert(cfg),
    },
) as dag:

    @task
    def check_billing_keys(**context):
        return ops_tasks.precheck_step(cfg, context)

    check_billing_keys()
