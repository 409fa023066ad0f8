"""Deployment configuration of the billing DAGs, read from the environment.

Per-run knobs (dry_run, batch size, concurrency, limits) are DAG params; what an operator of
the deployment sets once (connection ids, the due query, the decline table, the dunning
schedule) lives here, with documented defaults.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iamport_billing.ledger import DEFAULT_DUE_QUERY, SUBSCRIPTIONS
from iamport_billing.policy import DEFAULT_RETRY_SCHEDULE_DAYS, DeclineTable, ValidationLimits

PREFIX = "IAMPORT_BILLING_"


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(PREFIX + name)
    return value if value not in (None, "") else default


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value not in (None, "", "none", "None") else None


@dataclass(frozen=True)
class BillingConfig:
    iamport_conn_id: str = "iamport_default"
    warehouse_conn_id: str = "billing_warehouse"
    pool: str = "iamport_api"
    due_query: str = DEFAULT_DUE_QUERY
    subscriptions_table: str = SUBSCRIPTIONS
    retry_schedule_days: tuple[int, ...] = DEFAULT_RETRY_SCHEDULE_DAYS
    decline_table: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    max_total_multiple_of_previous: float | None = 3.0
    pending_lease_seconds: float = 300.0
    unknown_settle_seconds: float = 2.0
    task_retries: int = 3
    task_retry_delay_seconds: float = 60.0

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
        return cls(
            iamport_conn_id=_env("IAMPORT_CONN_ID", cls.iamport_conn_id),  # type: ignore[arg-type]
            warehouse_conn_id=_env("WAREHOUSE_CONN_ID", cls.warehouse_conn_id),  # type: ignore[arg-type]
            pool=_env("POOL", cls.pool),  # type: ignore[arg-type]
            due_query=due_query or DEFAULT_DUE_QUERY,
            subscriptions_table=_env("SUBSCRIPTIONS_TABLE", SUBSCRIPTIONS),  # type: ignore[arg-type]
            retry_schedule_days=(
                tuple(int(x) for x in schedule.split(","))
                if schedule
                else DEFAULT_RETRY_SCHEDULE_DAYS
            ),
            decline_table=json.loads(decline) if decline else {},
            validation=json.loads(validation) if validation else {},
            max_total_multiple_of_previous=(
                float(multiple) if multiple not in (None, "none", "None", "0") else None
            ),
            pending_lease_seconds=float(_env("PENDING_LEASE_SECONDS", "300")),  # type: ignore[arg-type]
            unknown_settle_seconds=float(_env("UNKNOWN_SETTLE_SECONDS", "2")),  # type: ignore[arg-type]
            task_retries=int(_env("TASK_RETRIES", "3")),  # type: ignore[arg-type]
            task_retry_delay_seconds=float(_env("TASK_RETRY_DELAY_SECONDS", "60")),  # type: ignore[arg-type]
        )

    @property
    def limits(self) -> ValidationLimits:
        return ValidationLimits(**self.validation)

    @property
    def declines(self) -> DeclineTable:
        return DeclineTable.from_config(self.decline_table)
