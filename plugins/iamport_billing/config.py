"""Deployment configuration of the billing DAGs, read from the environment.

Per-run knobs (dry_run, batch size, concurrency, limits) are DAG params; what an operator of
the deployment sets once (connection ids, the due query, the decline table, the dunning
schedule) lives here, with documented defaults.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from iamport_billing.policy import DEFAULT_RETRY_SCHEDULE_DAYS, DeclineTable, ValidationLimits
from iamport_billing.warehouse.ledger import DEFAULT_DUE_QUERY, SUBSCRIPTIONS

PREFIX = "IAMPORT_BILLING_"


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(PREFIX + name)
    return value if value not in (None, "") else default


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value not in (None, "", "none", "None") else None


def _share(value: str | None) -> float | None:
    if value in (None, "", "none", "None"):
        return None
    share = float(value)  # type: ignore[arg-type]
    if not 0 <= share <= 1:
        raise ValueError(f"IAMPORT_BILLING_MAX_REJECTED_SHARE must be 0..1, got {value}")
    return share


@dataclass(frozen=True)
class BillingConfig:
    iamport_conn_id: str = "iamport_default"
    warehouse_conn_id: str = "billing_warehouse"
    # Where the due query runs (None: the ledger's connection). Any common.sql connection;
    # a read-only warehouse needs write_back off, and results are read from the ledger.
    source_conn_id: str | None = None
    write_back: bool = True
    pool: str = "iamport_api"
    due_query: str = DEFAULT_DUE_QUERY
    subscriptions_table: str = SUBSCRIPTIONS
    retry_schedule_days: tuple[int, ...] = DEFAULT_RETRY_SCHEDULE_DAYS
    decline_table: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    max_total_multiple_of_previous: float | None = 3.0
    max_rejected_share: float | None = 0.2
    pending_lease_seconds: float = 300.0
    unknown_settle_seconds: float = 2.0
    task_retries: int = 3
    task_retry_delay_seconds: float = 60.0
    # Dunning: attempts per billing date including the first charge (retry schedule + 1).
    max_attempts: int = len(DEFAULT_RETRY_SCHEDULE_DAYS) + 1
    # Alerting: ids of the channels' slackwebhook, smtp and http connections (unset = off).
    alert_slack_conn_id: str | None = None
    alert_email_conn_id: str | None = None
    alert_webhook_conn_id: str | None = None
    alert_decline_rate: float = 0.2
    alert_decline_min_attempts: int = 20
    daily_deadline: str = "12:00"
    airflow_base_url: str | None = None
    reconcile_window_hours: int = 48
    precheck_days_ahead: int = 1
    # How long a plan over its guardrails waits for a person (Airflow's approval task) before
    # it is rejected by default; 0: no approvals, a tripped guardrail fails the plan.
    approval_timeout_minutes: float = 240.0
    # PortOne V2 webhook secrets: password = the current one, extra previous_secret = the one
    # being rotated out (see docs/operations.md).
    portone_webhook_conn_id: str = "portone_webhook"

    @classmethod
    def from_env(cls) -> BillingConfig:
        """Every field can be set with ``IAMPORT_BILLING_<FIELD>`` (see README)."""
        due_query = _env("DUE_QUERY")
        if due_query is None and (path := _env("DUE_QUERY_FILE")):
            due_query = Path(path).read_text()
        decline = _env("DECLINE_TABLE")
        validation = _env("VALIDATION")
        multiple = _env("MAX_TOTAL_MULTIPLE_OF_PREVIOUS", "3")
        schedule = _env("RETRY_SCHEDULE_DAYS")
        days = (
            tuple(int(x) for x in schedule.split(",")) if schedule else DEFAULT_RETRY_SCHEDULE_DAYS
        )
        max_attempts = int(_env("MAX_ATTEMPTS", str(len(days) + 1)))  # type: ignore[arg-type]
        if max_attempts < 1:
            raise ValueError("IAMPORT_BILLING_MAX_ATTEMPTS must be at least 1")
        return cls(
            iamport_conn_id=_env("IAMPORT_CONN_ID", cls.iamport_conn_id),  # type: ignore[arg-type]
            warehouse_conn_id=_env("WAREHOUSE_CONN_ID", cls.warehouse_conn_id),  # type: ignore[arg-type]
            source_conn_id=_env("SOURCE_CONN_ID"),
            write_back=_env("WRITE_BACK", "true").lower() not in ("0", "false", "no", "off"),  # type: ignore[union-attr]
            pool=_env("POOL", cls.pool),  # type: ignore[arg-type]
            due_query=due_query or DEFAULT_DUE_QUERY,
            subscriptions_table=_env("SUBSCRIPTIONS_TABLE", SUBSCRIPTIONS),  # type: ignore[arg-type]
            # One schedule serves every caller of policy.next_retry_date: cut to max_attempts.
            retry_schedule_days=days[: max_attempts - 1],
            max_attempts=min(max_attempts, len(days) + 1),
            decline_table=json.loads(decline) if decline else {},
            validation=json.loads(validation) if validation else {},
            max_total_multiple_of_previous=(
                float(multiple) if multiple not in (None, "none", "None", "0") else None
            ),
            max_rejected_share=_share(_env("MAX_REJECTED_SHARE", "0.2")),
            pending_lease_seconds=float(_env("PENDING_LEASE_SECONDS", "300")),  # type: ignore[arg-type]
            unknown_settle_seconds=float(_env("UNKNOWN_SETTLE_SECONDS", "2")),  # type: ignore[arg-type]
            task_retries=int(_env("TASK_RETRIES", "3")),  # type: ignore[arg-type]
            task_retry_delay_seconds=float(_env("TASK_RETRY_DELAY_SECONDS", "60")),  # type: ignore[arg-type]
            alert_slack_conn_id=_env("ALERT_SLACK_CONN_ID"),
            alert_email_conn_id=_env("ALERT_EMAIL_CONN_ID"),
            alert_webhook_conn_id=_env("ALERT_WEBHOOK_CONN_ID"),
            alert_decline_rate=float(_env("ALERT_DECLINE_RATE", "0.2")),  # type: ignore[arg-type]
            alert_decline_min_attempts=int(_env("ALERT_DECLINE_MIN_ATTEMPTS", "20")),  # type: ignore[arg-type]
            daily_deadline=_env("DAILY_DEADLINE", "12:00"),  # type: ignore[arg-type]
            airflow_base_url=_env("AIRFLOW_BASE_URL"),
            reconcile_window_hours=int(_env("RECONCILE_WINDOW_HOURS", "48")),  # type: ignore[arg-type]
            precheck_days_ahead=int(_env("PRECHECK_DAYS_AHEAD", "1")),  # type: ignore[arg-type]
            approval_timeout_minutes=float(_env("APPROVAL_TIMEOUT_MINUTES", "240")),  # type: ignore[arg-type]
            portone_webhook_conn_id=_env("PORTONE_WEBHOOK_CONN_ID", cls.portone_webhook_conn_id),  # type: ignore[arg-type]
        )

    @property
    def approval_timeout(self) -> timedelta | None:
        """How long the approval task waits (None: approvals are off)."""
        return (
            timedelta(minutes=self.approval_timeout_minutes)
            if self.approval_timeout_minutes
            else None
        )

    @property
    def limits(self) -> ValidationLimits:
        return ValidationLimits(**self.validation)

    @property
    def declines(self) -> DeclineTable:
        return DeclineTable.from_config(self.decline_table)
