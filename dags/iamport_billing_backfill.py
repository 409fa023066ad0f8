"""Manual backfill: re-charge failed charges of past billing dates (e.g. after a PG outage).

Wiring only. Trigger by hand with a date range; dry_run is on by default and prints every
charge it would make and the total. See docs/operations.md.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param, task
from iamport_billing import alerts, ops_tasks, tasks
from iamport_billing.config import BillingConfig

cfg = BillingConfig.from_env()

with DAG(
    dag_id="iamport_billing_backfill",
    description="Re-charge failed charges of a billing-date range (dry run by default)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="Asia/Seoul"),
    catchup=False,
    max_active_runs=1,
    tags=["billing", "iamport", "backfill"],
    params={
        "from_date": Param(type="string", format="date", description="First billing date"),
        "to_date": Param(type="string", format="date", description="Last billing date"),
        "subscription_ids": Param(
            None,
            type=["null", "array"],
            items={"type": "string"},
            description="Only these subscriptions (empty: all)",
        ),
        "include_hard_declines": Param(
            False, type="boolean", description="Also re-charge hard declines (new card on file)"
        ),
        "dry_run": Param(True, type="boolean", description="Print what would be charged"),
        "max_count": Param(None, type=["null", "integer"], minimum=0),
        "max_total_amount": Param(None, type=["null", "integer"], minimum=0),
        "max_concurrency": Param(8, type="integer", minimum=1, maximum=256),
        "requests_per_second": Param(None, type=["null", "number"], minimum=0),
    },
    default_args={"retries": 0, "on_failure_callback": alerts.TaskFailureAlert(cfg)},
) as dag:

    @task
    def reconcile(**context):
        return tasks.reconcile_step(cfg, context)

    @task(pool=cfg.pool)
    def backfill(**context):
        return ops_tasks.backfill_step(cfg, context)

    @task(trigger_rule="all_done")
    def write_back(**context):
        return tasks.write_back_step(cfg, context)

    @task(trigger_rule="all_done")
    def report(**context):
        return tasks.report_step(cfg, context)

    reconcile() >> backfill() >> write_back() >> report()
