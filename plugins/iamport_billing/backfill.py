"""Manual backfill: re-charge failed charges of past billing dates (e.g. after a PG outage).

Same selection and send path as dunning (``dunning.py``), with the ops' filters: a billing-date
range, optional subscription ids, hard declines only when asked, and a dry run by default that
prints every charge it would make and the total.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from iamport_billing.charging import ChargeSettings
from iamport_billing.dunning import RetryPlan, describe, next_attempts, send_retries
from iamport_billing.gateways.base import Gateway
from iamport_billing.policy import (
    Guardrails,
    PlanTotals,
    ValidationLimits,
    guardrail_violations,
    to_date,
)
from iamport_billing.states import (
    ACTIVE,
    HARD,
    PAST_DUE,
    PAYMENT_METHOD_REQUIRED,
    REACTIVATED_BY_PAYMENT,
    SOFT,
)
from iamport_billing.warehouse.ledger import Ledger

log = logging.getLogger(__name__)


class BackfillRefused(ValueError):
    """The request is malformed or breaks a limit: nothing was charged."""


@dataclass(frozen=True)
class BackfillRequest:
    from_date: date
    to_date: date
    subscription_ids: tuple[str, ...] | None = None
    include_hard_declines: bool = False
    dry_run: bool = True
    max_count: int | None = None
    max_total_amount: int | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, today: date) -> BackfillRequest:
        """Read the DAG params; refuse ranges that are empty or reach past ``today``."""
        try:
            start, end = to_date(params.get("from_date")), to_date(params.get("to_date"))
        except ValueError as e:
            raise BackfillRefused(f"bad date: {e}") from None
        if start is None or end is None:
            raise BackfillRefused("from_date and to_date are required (YYYY-MM-DD)")
        if start > end:
            raise BackfillRefused(f"from_date {start} is after to_date {end}")
        if end > today:
            raise BackfillRefused(f"to_date {end} is in the future (today is {today})")
        ids = params.get("subscription_ids")
        if isinstance(ids, str):
            ids = [i for i in ids.replace(",", " ").split() if i]
        return cls(
            from_date=start,
            to_date=end,
            subscription_ids=tuple(str(i) for i in ids) if ids else None,
            include_hard_declines=bool(params.get("include_hard_declines", False)),
            dry_run=bool(params.get("dry_run", True)),
            max_count=_opt_int(params.get("max_count")),
            max_total_amount=_opt_int(params.get("max_total_amount")),
        )


def _opt_int(value: Any) -> int | None:
    return None if value in (None, "", "None") else int(value)


def plan_backfill(
    ledger: Ledger,
    request: BackfillRequest,
    *,
    run_date: date,
    limits: ValidationLimits,
    subscriptions_table: str,
    run: Mapping[str, Any] | None = None,
) -> RetryPlan:
    """Failed charges in the range that are still owed (and not attempted by ``run`` itself),
    as numbered next attempts."""
    hard = request.include_hard_declines
    rows = ledger.retryable_failures(
        decline_kinds=(SOFT, HARD) if hard else (SOFT,),
        subscription_statuses=(
            ACTIVE,
            PAST_DUE,
            *((PAYMENT_METHOD_REQUIRED,) if hard else ()),
        ),
        subscriptions_table=subscriptions_table,
        billing_from=request.from_date,
        billing_to=request.to_date,
        subscription_ids=request.subscription_ids,
        not_by_run=run,
    )
    return next_attempts(rows, run_date=run_date, limits=limits)


def run_backfill(
    gateway: Gateway,
    ledger: Ledger,
    request: BackfillRequest,
    *,
    run_date: date,
    limits: ValidationLimits,
    settings: ChargeSettings,
    subscriptions_table: str,
    run: Mapping[str, Any],
    logger: logging.Logger | None = None,
) -> dict[str, Any]:
    """Plan, print, check the limits, and (unless dry run) charge; returns a small summary."""
    lg = logger or log
    plan = plan_backfill(
        ledger, request, run_date=run_date, limits=limits,
        subscriptions_table=subscriptions_table, run=run,
    )  # fmt: skip
    heading = f"backfill {request.from_date}..{request.to_date}" + (
        " DRY RUN, nothing will be charged; would charge" if request.dry_run else ""
    )
    lg.info("\n%s", describe(plan, heading=heading))
    summary: dict[str, Any] = {
        "from_date": request.from_date.isoformat(),
        "to_date": request.to_date.isoformat(),
        "dry_run": request.dry_run,
        "count": len(plan.planned),
        "total_amount": plan.total_amount,
        "rejected": len(plan.rejected),
    }
    violations = guardrail_violations(
        PlanTotals(count=len(plan.planned), total_amount=plan.total_amount),
        Guardrails(
            max_count=request.max_count,
            max_total_amount=request.max_total_amount,
            max_total_multiple_of_previous=None,
        ),
        None,
    )
    if violations:
        raise BackfillRefused("guardrail tripped, nothing charged: " + "; ".join(violations))
    if request.dry_run:
        summary["charges"] = plan.lines()[:100]
        return summary
    result = send_retries(gateway, ledger, plan, settings, run, logger=lg)
    ledger.set_subscription_status(
        result["paid_subscriptions"], ACTIVE, only_from=REACTIVATED_BY_PAYMENT,
        subscriptions_table=subscriptions_table,
    )  # fmt: skip
    summary.update(result)
    return summary
