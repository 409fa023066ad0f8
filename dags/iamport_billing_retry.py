"""Dunning: retry soft-declined charges whose retry date has come; past_due after the last.

Wiring only: reconcile -> retry -> write back -> report. Retry date = the run's logical date in
Asia/Seoul. Each retry is a new attempt merchant_uid for the same subscription and billing date.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, CronTriggerTimetable, Param, task
from iamport_billing import alerts, ops_tasks, tasks
from iamport_billing.config import BillingConfig

cfg = BillingConfig.from_env()

with DAG(
    dag_id="iamport_billing_retry",
    description="Retry soft card declines on the dunning schedule",
    # 14:00 KST: after the 10:00 daily run, on a different hour than the first attempt.
    schedule=CronTriggerTimetable("0 14 * * *", timezone="Asia/Seoul"),
    start_date=pendulum.datetime(2026, 1, 1, tz="Asia/Seoul"),
    catchup=False,
    max_active_runs=1,
    tags=["billing", "iamport", "dunning"],
    params={
        "dry_run": Param(False, type="boolean", description="Print the retries, charge nothing"),
        "max_concurrency": Param(8, type="integer", minimum=1, maximum=256),
        "requests_per_second": Param(None, type=["null", "number"], minimum=0),
    },
    default_args={"retries": 0, "on_failure_callback": alerts.TaskFailureAlert(cfg)},
) as dag:

    @task
    def reconcile(**context):
        return tasks.reconcile_step(cfg, context)

    @task(pool=cfg.pool)
    def retry(**context):
        return ops_tasks.retry_step(cfg, context)

    @task(trigger_rule="all_done")
    def write_back(**context):
        return tasks.write_back_step(cfg, context)

    @task(trigger_rule="all_done")
    def report(**context):
        return tasks.report_step(cfg, context)

    reconcile() >> retry() >> write_back() >> report()
