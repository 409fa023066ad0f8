"""Hourly reconciliation of the ledger against Iamport, the source of truth for money.

1. pending/unknown rows older than the lease are looked up (``charging.resolve_unsettled``),
   and open refunds the cancel history proves are recorded (``refunding.settle_open_refunds``);
2. Iamport's payments in the window (``GET /payments/status/all``) whose merchant_uid is ours
   but has no ledger row are recorded;
3. rows whose status or amount disagrees with Iamport are fixed when Iamport's answer settles
   it (a refund made in the PortOne console, a decline that was in fact paid) and flagged for a
   person when it does not (amounts differ, money we recorded that Iamport does not have, a
   period paid twice, outcomes still unknown).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from iamport_billing.api_types import Payment
from iamport_billing.charging import (
    ChargeSettings,
    outcome_from_payment,
    resolve_unsettled,
    settle_by_lookup,
)
from iamport_billing.gateways.base import FOUND, Gateway, Lookup
from iamport_billing.policy import SEOUL, parse_merchant_uid
from iamport_billing.refunding import settle_open_refunds
from iamport_billing.states import CANCELLED, FAILED, MONEY_MOVED, PAID, UNSETTLED
from iamport_billing.warehouse.ledger import Attempt, Ledger, lease_cutoff

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    """What was fixed automatically and what needs a person (ids and amounts, no card data)."""

    window: tuple[int, int]
    scanned: int = 0
    resolved: dict[str, int] = field(default_factory=dict)
    refunds: dict[str, int] = field(default_factory=dict)
    recorded_missing: list[str] = field(default_factory=list)
    fixed: list[dict[str, Any]] = field(default_factory=list)
    needs_person: list[dict[str, Any]] = field(default_factory=list)
    still_unsettled: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def unsettled_count(self) -> int:
        return sum(v["count"] for v in self.still_unsettled.values())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["window"] = list(self.window)
        data["needs_person"] = self.needs_person[:100]
        data["fixed"] = self.fixed[:100]
        data["recorded_missing"] = self.recorded_missing[:100]
        return data


def reconcile(
    gateway: Gateway,
    ledger: Ledger,
    settings: ChargeSettings,
    *,
    until: datetime,
    window: timedelta,
    run: Mapping[str, Any],
    subscriptions_table: str | None = None,
    max_overdue_days: int = 45,
    logger: logging.Logger | None = None,
) -> ReconcileReport:
    lg = logger or log
    since_ts, until_ts = int((until - window).timestamp()), int(until.timestamp())
    report = ReconcileReport(window=(since_ts, until_ts))
    report.resolved = resolve_unsettled(
        gateway, ledger, settings, run, logger=lg, subscriptions_table=subscriptions_table,
        max_overdue_days=max_overdue_days, today=until.astimezone(SEOUL).date(),
    )  # fmt: skip
    report.refunds, stuck = settle_open_refunds(
        gateway, ledger, idle_since=lease_cutoff(settings.pending_lease_seconds), logger=lg
    )
    report.needs_person.extend(stuck)

    ours: dict[str, list[Payment]] = {}
    # A listing the gateway could not give fails the run (GatewayUnavailable): never "0 scanned".
    for payment in gateway.payments_between(since_ts, until_ts):
        report.scanned += 1
        if parse_merchant_uid(payment.merchant_uid) is not None:
            ours.setdefault(payment.merchant_uid, []).append(payment)
    rows = ledger.attempts_by_merchant_uid(ours)
    for merchant_uid, payments in sorted(ours.items()):
        row = rows.get(merchant_uid)
        if row is None:
            _record_missing(gateway, ledger, settings, merchant_uid, run, report, lg)
        elif row.status not in UNSETTLED:  # unsettled ones are in flight or left to step 1
            decisive = Lookup(FOUND, tuple(payments)).decisive
            _compare(ledger, settings, row, decisive, report, lg)  # type: ignore[arg-type]

    first_day = datetime.fromtimestamp(since_ts, SEOUL).date() - timedelta(days=1)
    for sub, day, n in ledger.double_paid(first_day):
        report.needs_person.append(
            {"subscription_id": sub, "billing_date": day.isoformat(), "problem":
             f"{n} paid attempts for one billing date: refund all but one"}
        )  # fmt: skip
    report.still_unsettled = ledger.unsettled_summary()
    lg.info(
        "reconciliation: %d payments scanned, resolved %s, refunds %s, %d recorded, %d fixed, "
        "%d need a person, %d still unsettled",
        report.scanned, report.resolved or "none", report.refunds or "none",
        len(report.recorded_missing),
        len(report.fixed), len(report.needs_person), report.unsettled_count,
    )  # fmt: skip
    for item in report.needs_person:
        lg.warning("needs a person: %s", item)
    return report


def _record_missing(
    gateway: Gateway, ledger: Ledger, settings: ChargeSettings, merchant_uid: str,
    run: Mapping[str, Any], report: ReconcileReport, lg: logging.Logger,
) -> None:  # fmt: skip
    """Insert the ledger row Iamport proves we should have (its full history decides)."""
    parsed = parse_merchant_uid(merchant_uid)
    assert parsed is not None
    sub, billing_date, attempt_no = parsed
    found, outcome = settle_by_lookup(
        gateway, merchant_uid, None, billing_date, attempt_no, settings
    )
    if outcome is None or found.decisive is None:
        return
    payment = found.decisive
    row = {
        **asdict(outcome),
        "subscription_id": sub,
        "billing_date": billing_date,
        "attempt_no": attempt_no,
        "customer_uid": payment.customer_uid,
        "amount": int(payment.amount),
        "currency": payment.currency,
        "cancel_amount": int(payment.cancel_amount or 0),
        "error_code": outcome.error_code or "found_by_reconciliation",
        "error_message": outcome.error_message
        or "Iamport had this payment but the ledger did not: recorded by reconciliation",
        **run,
    }
    if ledger.insert_attempt(row):
        report.recorded_missing.append(merchant_uid)
        lg.warning(
            "recorded %s (%s, %s KRW) missing from the ledger",
            merchant_uid, outcome.status, row["amount"],
        )  # fmt: skip


def _compare(
    ledger: Ledger, settings: ChargeSettings, row: Attempt, payment: Payment,
    report: ReconcileReport, lg: logging.Logger,
) -> None:  # fmt: skip
    """Fix what Iamport's record settles; flag what it does not."""
    item = {
        "merchant_uid": row.merchant_uid,
        "ledger_status": row.status,
        "ledger_amount": row.amount,
        "iamport_status": payment.status,
        "iamport_amount": int(payment.amount),
        "imp_uid": payment.imp_uid,
    }
    money_moved = payment.is_paid or payment.status == CANCELLED
    if money_moved and row.amount is not None and int(payment.amount) != row.amount:
        if row.status in (*UNSETTLED, FAILED, PAID):
            ledger.record_outcomes(
                [outcome_from_payment(payment, row.amount, row.billing_date, row.attempt_no,
                                      settings)]
            )  # fmt: skip
        flagged = {**item, "problem": "amount differs from the ledger"}
    elif not money_moved and row.status in MONEY_MOVED:
        flagged = {**item, "problem": "ledger records money Iamport does not have"}
    elif payment.status == CANCELLED and (
        row.status != CANCELLED or (row.cancel_amount or 0) != int(payment.cancel_amount)
    ):
        refunded = int(payment.cancel_amount)
        if ledger.record_cancellation(row.merchant_uid, imp_uid=payment.imp_uid,
                                      cancel_amount=refunded):  # fmt: skip
            report.fixed.append({**item, "fix": f"recorded cancel of {refunded}"})
            lg.warning("fixed %s", report.fixed[-1])
            return
        flagged = {
            **item,
            "problem": f"the ledger's refunded total {row.cancel_amount} is above Iamport's "
            f"{refunded} (refunds only add up)",
        }
    elif payment.is_paid and row.status != PAID:
        outcome = outcome_from_payment(
            payment, row.amount, row.billing_date, row.attempt_no, settings
        )
        ledger.record_outcomes([outcome])
        report.fixed.append({**item, "fix": "ledger set to paid as Iamport reports"})
        lg.warning("fixed %s", report.fixed[-1])
        return
    else:
        return
    report.needs_person.append(flagged)
