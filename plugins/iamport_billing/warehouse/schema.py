"""The tables the product owns, written once for every dialect.

Keys and indexed columns are VARCHAR (MySQL cannot index TEXT); dates and timestamps take the
dialect's types. ``expected_columns`` lets ``Ledger.init_schema`` add columns that newer
versions introduced to tables an older version created.
"""

from __future__ import annotations

from iamport_billing.states import ACTIVE
from iamport_billing.warehouse.dialects import Dialect

SUBSCRIPTIONS = "billing_subscriptions"
ATTEMPTS = "billing_charge_attempts"
RUNS = "billing_runs"
PLAN_ITEMS = "billing_plan_items"
PUT_BACKS = "billing_put_backs"
REFUNDS = "billing_refunds"
WEBHOOK_EVENTS = "billing_webhook_events"

ATTEMPT_COLUMNS = (
    "merchant_uid", "subscription_id", "billing_date", "attempt_no", "customer_uid", "amount",
    "currency", "status", "imp_uid", "fail_reason", "error_code", "error_message",
    "decline_kind", "next_retry_date", "requested_at", "completed_at", "dag_id", "run_id",
    "task_id", "try_number", "claim_token", "cancel_amount", "receipt_url", "latency_ms",
    "updated_at", "paid_amount", "name", "send_count",
)  # fmt: skip


def _attempt_types(d: Dialect) -> dict[str, str]:
    return {
        "merchant_uid": f"{d.key_type(64)} PRIMARY KEY",
        "subscription_id": d.key_type(64),
        "billing_date": f"{d.date_type} NOT NULL",
        "attempt_no": "INTEGER NOT NULL",
        "customer_uid": d.key_type(200),
        "amount": "BIGINT",
        "currency": "VARCHAR(10)",
        "status": "VARCHAR(32) NOT NULL",
        "imp_uid": "VARCHAR(100)",
        "fail_reason": "TEXT",
        "error_code": "VARCHAR(100)",
        "error_message": "TEXT",
        "decline_kind": "VARCHAR(16)",
        "next_retry_date": d.date_type,
        "requested_at": d.timestamp_type,
        "completed_at": d.timestamp_type,
        "dag_id": "VARCHAR(250)",
        "run_id": "VARCHAR(250)",
        "task_id": "VARCHAR(250)",
        "try_number": "INTEGER",
        "claim_token": d.key_type(64),
        "cancel_amount": "BIGINT DEFAULT 0",
        "receipt_url": "TEXT",
        "latency_ms": "INTEGER",
        "updated_at": d.timestamp_type,
        # What the gateway says it took; ``amount`` stays what we asked for.
        "paid_amount": "BIGINT",
        # The order name sent, so a resend from reconciliation sends the same request.
        "name": "VARCHAR(200)",
        # POSTs made under this merchant_uid (audit: a resend shows as 2).
        "send_count": "INTEGER DEFAULT 0",
    }


REFUND_COLUMNS = (
    "refund_id", "merchant_uid", "imp_uid", "amount_requested", "amount", "checksum", "reason",
    "status", "cancel_amount_after", "requested_at", "completed_at", "updated_at", "dag_id",
    "run_id", "task_id", "map_index", "try_number", "send_count", "claim_token", "error_message",
)  # fmt: skip


def _refund_types(d: Dialect) -> dict[str, str]:
    return {
        # The request's key: from (dag_id, run_id, task_id, map_index), or given outside Airflow.
        "refund_id": f"{d.key_type(64)} PRIMARY KEY",
        "merchant_uid": d.key_type(64),
        "imp_uid": "VARCHAR(100) NOT NULL",
        # As asked (NULL: the whole balance), and resolved to KRW at intent time (what is sent).
        "amount_requested": "BIGINT",
        "amount": "BIGINT NOT NULL",
        # The refundable balance before this refund (sent as ``checksum``).
        "checksum": "BIGINT NOT NULL",
        # The reason as sent, with the refund's marker (how the cancel history names it).
        "reason": "TEXT",
        "status": "VARCHAR(32) NOT NULL",
        # Iamport's total cancel_amount once this refund applied.
        "cancel_amount_after": "BIGINT",
        "requested_at": d.timestamp_type,
        "completed_at": d.timestamp_type,
        "updated_at": d.timestamp_type,
        "dag_id": "VARCHAR(250)",
        "run_id": "VARCHAR(250)",
        "task_id": "VARCHAR(250)",
        "map_index": "INTEGER",
        "try_number": "INTEGER",
        # POSTs made for this refund (audit: a resend after "never applied" shows as 2).
        "send_count": "INTEGER DEFAULT 0",
        # The try that may send it now (compare-and-set before every POST).
        "claim_token": d.key_type(64),
        "error_message": "TEXT",
    }


def _run_types(d: Dialect) -> dict[str, str]:
    return {
        "dag_id": "VARCHAR(250) NOT NULL",
        "run_id": "VARCHAR(250) NOT NULL",
        "billing_date": f"{d.date_type} NOT NULL",
        "planned_count": "INTEGER NOT NULL",
        "planned_total": "BIGINT NOT NULL",
        "rejected_count": "INTEGER NOT NULL",
        "dry_run": "INTEGER NOT NULL",
        "guardrail": "TEXT",
        "created_at": d.timestamp_type,
        # A plan over its guardrails waits for a person (states.APPROVAL_*); NULL: not needed.
        "approval": "VARCHAR(16)",
        "approved_by": "VARCHAR(250)",
        "approved_at": d.timestamp_type,
        # sha256 of the frozen plan's items: an approval names the plan it was shown.
        "plan_digest": "VARCHAR(64)",
    }


def expected_columns(table: str, d: Dialect) -> dict[str, str]:
    """Columns (name -> type without constraints) that ``init_schema`` adds when missing."""
    types = {ATTEMPTS: _attempt_types, RUNS: _run_types}.get(table)
    if types is None:
        return {}
    return {
        name: kind.replace(" PRIMARY KEY", "").replace(" NOT NULL", "")
        for name, kind in types(d).items()
    }


def ddl(d: Dialect) -> list[str]:
    attempt_cols = ",\n            ".join(f"{c} {t}" for c, t in _attempt_types(d).items())
    refund_cols = ",\n            ".join(f"{c} {t}" for c, t in _refund_types(d).items())
    run_cols = ",\n            ".join(f"{c} {t}" for c, t in _run_types(d).items())
    statements = [
        f"""CREATE TABLE IF NOT EXISTS {SUBSCRIPTIONS} (
            subscription_id {d.key_type(64)} PRIMARY KEY,
            customer_uid {d.key_type(200)},
            amount BIGINT,
            currency VARCHAR(10) DEFAULT 'KRW',
            name VARCHAR(200),
            status VARCHAR(32) NOT NULL DEFAULT '{ACTIVE}',
            next_billing_date {d.date_type},
            billing_anchor_day INTEGER,
            buyer_name VARCHAR(200),
            buyer_email VARCHAR(200),
            buyer_tel VARCHAR(50),
            updated_at {d.timestamp_type}
        )""",
        f"CREATE TABLE IF NOT EXISTS {ATTEMPTS} (\n            {attempt_cols}\n        )",
        f"""CREATE TABLE IF NOT EXISTS {RUNS} (
            {run_cols},
            PRIMARY KEY (dag_id, run_id)
        )""",
        # What a plan approved, frozen: a charge task sends these rows at these amounts only.
        f"""CREATE TABLE IF NOT EXISTS {PLAN_ITEMS} (
            dag_id VARCHAR(250) NOT NULL,
            run_id VARCHAR(250) NOT NULL,
            subscription_id {d.key_type(64)} NOT NULL,
            billing_date {d.date_type} NOT NULL,
            amount BIGINT NOT NULL,
            PRIMARY KEY (dag_id, run_id, subscription_id)
        )""",
        # Refunds, written ahead of the cancel POST (see warehouse/refunds.py).
        f"CREATE TABLE IF NOT EXISTS {REFUNDS} (\n            {refund_cols}\n        )",
    ]
    statements.append(
        # A person's word that a subscription may be charged once more for a billing date
        # after attempt ``after_attempt_no`` failed for good (a new card, say).
        f"""CREATE TABLE IF NOT EXISTS {PUT_BACKS} (
            subscription_id {d.key_type(64)} NOT NULL,
            billing_date {d.date_type} NOT NULL,
            after_attempt_no INTEGER NOT NULL,
            created_at {d.timestamp_type},
            PRIMARY KEY (subscription_id, billing_date, after_attempt_no)
        )"""
    )
    # Webhook deliveries being handled or done (see warehouse/webhook_events.py).
    statements.append(
        f"""CREATE TABLE IF NOT EXISTS {WEBHOOK_EVENTS} (
            event_key {d.key_type(200)} PRIMARY KEY,
            status VARCHAR(16) NOT NULL,
            claim_token {d.key_type(64)},
            claimed_at {d.timestamp_type},
            result VARCHAR(32)
        )"""
    )
    indexes = [
        (f"ix_{SUBSCRIPTIONS}_due", SUBSCRIPTIONS, "status, next_billing_date"),
        # The keyset pages of the default due query walk this in subscription_id order.
        (f"ix_{SUBSCRIPTIONS}_keyset", SUBSCRIPTIONS, "status, subscription_id, next_billing_date"),
        (f"ix_{ATTEMPTS}_sub", ATTEMPTS, "subscription_id, billing_date"),
        (f"ix_{ATTEMPTS}_status", ATTEMPTS, "status"),
        (f"ix_{ATTEMPTS}_run", ATTEMPTS, "run_id"),
        (f"ix_{ATTEMPTS}_date", ATTEMPTS, "billing_date"),
        (f"ix_{REFUNDS}_imp_uid", REFUNDS, "imp_uid"),
    ]
    for name, table, cols in indexes:
        statements += d.create_index(name, table, cols)
    return statements
