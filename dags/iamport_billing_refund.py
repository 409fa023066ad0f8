"""Refund one charge, in full or in part, by hand. Wiring only; see operators/cancel.py.

Trigger with config, e.g. ``{"merchant_uid": "sub-1-20261126-01", "amount": 3000,
"reason": "customer asked"}``; leave ``amount`` null for a full refund.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param
from iamport_billing import alerts
from iamport_billing.config import BillingConfig
from iamport_billing.operators.cancel import CancelPaymentOperator

cfg = BillingConfig.from_env()

with DAG(
    dag_id="iamport_billing_refund",
    description="Cancel (refund) one charge with a checksum; the ledger records it",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="Asia/Seoul"),
    catchup=False,
    render_template_as_native_obj=True,
    tags=["billing", "iamport", "refund"],
    params={
        "merchant_uid": Param(None, type=["null", "string"], maxLength=40),
        "imp_uid": Param(None, type=["null", "string"]),
        "amount": Param(None, type=["null", "integer"], minimum=1, description="null: full"),
        "reason": Param("refund", type="string", minLength=1),
    },
    default_args={"retries": 0, "on_failure_callback": alerts.TaskFailureAlert(cfg)},
) as dag:
    CancelPaymentOperator(
        task_id="cancel",
        iamport_conn_id=cfg.iamport_conn_id,
        warehouse_conn_id=cfg.warehouse_conn_id,
        merchant_uid="{{ params.merchant_uid }}",
        imp_uid="{{ params.imp_uid }}",
        amount="{{ params.amount }}",
        reason="{{ params.reason }}",
    )
