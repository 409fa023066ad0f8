"""Dunning: the next attempt for soft-declined charges, on the configured schedule.

A retry is a new attempt (``attempt_no + 1``, its own merchant_uid) for the same subscription and
billing date, built only from what the ledger says failed last and sent through the same
write-ahead claim path as the daily run. The manual backfill DAG reuses the same selection with
other filters (``backfill.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from iamport_billing.charging import ChargeEngine, ChargeSettings, PlannedCharge, iter_chunks
from iamport_billing.gateways.base import Gateway
from iamport_billing.policy import (
    RejectedRow,
    ValidationLimits,
    merchant_uid_for,
    to_date,
    validate_row,
)
from iamport_billing.states import (
    ACTIVE,
    PAID,
    SOFT,
)
from iamport_billing.warehouse.ledger import Ledger

log = logging.getLogger(__name__)
CHUNK = 200


@dataclass
class RetryPlan:
    """Next attempts to send, and due rows that failed validation (recorded as rejected)."""

    planned: list[PlannedCharge] = field(default_factory=list)
    rejected: list[RejectedRow] = field(default_factory=list)

    @property
    def total_amount(self) -> int:
        return sum(p.candidate.amount for p in self.planned)

    def lines(self) -> list[str]:
        """One human line per charge: what a dry run prints."""
        return [
            f"{p.candidate.subscription_id} billing_date={p.candidate.billing_date} "
            f"attempt={p.attempt_no} merchant_uid={p.merchant_uid} amount={p.candidate.amount:,}"
            for p in self.planned
        ]


def next_attempts(
    rows: Iterable[Mapping[str, Any]], *, run_date: date, limits: ValidationLimits
) -> RetryPlan:
    """Turn ledger rows from ``Ledger.retryable_failures`` into numbered next attempts.

    Each row is validated again like a due row (amount, customer_uid, overdue limit): a retry
    must be as safe to send as a first charge.
    """
    plan = RetryPlan()
    for row in rows:
        billing_date = to_date(row["billing_date"])
        assert billing_date is not None
        checked = validate_row(
            {**row, "billing_date": billing_date}, run_date=run_date, limits=limits
        )
        if isinstance(checked, RejectedRow):
            plan.rejected.append(checked)
            continue
        attempt_no = int(row["attempt_no"]) + 1
        plan.planned.append(
            PlannedCharge(
                checked,
                attempt_no,
                merchant_uid_for(checked.subscription_id, billing_date, attempt_no),
            )
        )
    return plan


def due_retries(
    ledger: Ledger,
    *,
    run_date: date,
    max_attempts: int,
    limits: ValidationLimits,
    subscriptions_table: str,
    run: Mapping[str, Any] | None = None,
) -> RetryPlan:
    """Soft declines whose next_retry_date has come, below ``max_attempts``, still owed (and
    not attempted by ``run`` itself)."""
    rows = ledger.retryable_failures(
        decline_kinds=(SOFT,),
        subscription_statuses=(ACTIVE,),
        subscriptions_table=subscriptions_table,
        retry_due_by=run_date,
        max_attempt_no=max_attempts,
        not_by_run=run,
    )
    return next_attempts(rows, run_date=run_date, limits=limits)


def send_retries(
    gateway: Gateway,
    ledger: Ledger,
    plan: RetryPlan,
    settings: ChargeSettings,
    run: Mapping[str, Any],
    *,
    logger: logging.Logger | None = None,
) -> dict[str, Any]:
    """Record rejected rows, then send the planned attempts through the claim/send path.

    Returns the engine's counts and amounts plus the subscriptions that got paid.
    """
    lg = logger or log
    if plan.rejected:
        ledger.record_rejected(plan.rejected, run)
    engine = ChargeEngine(gateway, ledger, settings, run, logger=lg)
    for chunk in iter_chunks(plan.planned, CHUNK):
        # Attempt NN may have been paid after all (a zombie try, a late answer): ask first.
        engine.charge_planned(engine.previous_unpaid(chunk))
    result = engine.result.as_dict()
    result["rejected"] = len(plan.rejected)
    result["paid_subscriptions"] = paid_subscriptions(ledger, plan.planned)
    # The ledger decides, as for the daily charge task: rows this run (any of its tries) left
    # pending/unknown.
    unsettled = sorted(
        {a.merchant_uid for a in ledger.unsettled_for_run(run)}
        | set(engine.result.unknown_merchant_uids)
    )
    result["unsettled"] = {"count": len(unsettled), "sample": unsettled[:10]}
    lg.info("retries sent: %s", result)
    return result


def paid_subscriptions(ledger: Ledger, planned: Sequence[PlannedCharge]) -> list[str]:
    """Subscriptions whose planned attempt ended paid (read back from the ledger)."""
    rows = ledger.attempts_by_merchant_uid(p.merchant_uid for p in planned)
    return sorted({a.subscription_id or "" for a in rows.values() if a.status == PAID})


def _sample(lines: Sequence[str], n: int = 50) -> list[str]:
    return list(lines[:n]) + ([f"... and {len(lines) - n} more"] if len(lines) > n else [])


def describe(plan: RetryPlan, *, heading: str) -> str:
    """The plan as the task log shows it: each charge and the total."""
    lines = [f"{heading}: {len(plan.planned)} charges, total {plan.total_amount:,} KRW"]
    lines += ["  " + line for line in _sample(plan.lines())]
    lines += [f"  rejected {r.subscription_id}: {r.reason}" for r in plan.rejected]
    return "\n".join(lines)
