"""Refund one charge, in full or in part, by hand. Wiring only; see operators/cancel.py.

Trigger with config, e.g. ``{"merchant_uid": "sub-1-20261126-01", "amount": 3000,
"reason": "customer asked", "request_id": "ticket-4711"}``; leave ``amount`` null for a full
refund. With ``request_id``, triggering it again (a double click, a re-run after a failure)
settles the first refund instead of making a second one.

Retries are safe: the refund is written ahead (keyed by this task instance), sent once, and a
retry settles it from Iamport's cancel history instead of sending it again. ``checksum`` is for
a person: the refundable balance to refund against when the ledger and Iamport disagree.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param
from iamport_billing import alerts
from iamport_billing.config import BillingConfig
from iamport_billing.operators.cancel import CancelPaymentOperator

cfg = BillingConfig.from_env()

with DAG(
    dag_id="iamport_billing_refund",
    description="Cancel (refund) one charge: written ahead, sent once, settled from Iamport",
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
        "request_id": Param(
            None,
            type=["null", "string"],
            # "None" would render as no key at all: every run its own refund.
            pattern="^(?!None$)[A-Za-z0-9._:-]{1,40}$",
            description="Your key for this refund (e.g. the ticket): a later run with the same "
            "key settles it from the cancel history instead of refunding again",
        ),
        "checksum": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            description="null: Iamport's balance, checked against the ledger",
        ),  # fmt: skip
    },
    default_args={
        # A retry settles a lost answer from the cancel history; it never resends blindly.
        "retries": cfg.task_retries,
        "retry_delay": timedelta(minutes=1),
        "on_failure_callback": alerts.TaskFailureAlert(cfg),
    },
) as dag:
    CancelPaymentOperator(
        task_id="cancel",
        iamport_conn_id=cfg.iamport_conn_id,
        warehouse_conn_id=cfg.warehouse_conn_id,
        merchant_uid="{{ params.merchant_uid }}",
        imp_uid="{{ params.imp_uid }}",
        amount="{{ params.amount }}",
        reason="{{ params.reason }}",
        checksum="{{ params.checksum }}",
        request_id="{{ params.request_id }}",
    )
