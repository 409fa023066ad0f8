"""Helpers for the operations tests (dunning, backfill, reconciliation, alerts)."""

from __future__ import annotations

from datetime import date

from iamport_billing.charging import ChargeSettings
from iamport_billing.policy import ValidationLimits
from support import add_subscriptions, register_cards

RUN = {"dag_id": "test_ops", "run_id": "ops-1", "task_id": "t", "try_number": 1}
SETTINGS = ChargeSettings(max_concurrency=4, unknown_settle_seconds=0.1)
LIMITS = ValidationLimits()


def subscribe(ledger, emulator, sub: str, card: str, day: date, amount: int = 9900) -> None:
    """One subscription due on ``day`` whose customer holds ``card``."""
    add_subscriptions(ledger, [(sub, f"cust-{sub}", amount)], day)
    register_cards(emulator, [(f"cust-{sub}", card)])


def subscription(ledger, sub: str) -> tuple[str, str]:
    (row,) = ledger.query(
        "SELECT status, next_billing_date FROM billing_subscriptions WHERE subscription_id = %s",
        [sub],
    )
    return row[0], str(row[1])[:10]


def attempts_of(ledger, sub: str) -> list[tuple[str, str, str | None]]:
    """(merchant_uid, status, decline_kind) of a subscription's attempts, in order."""
    return [
        (r[0], r[1], r[2])
        for r in ledger.query(
            "SELECT merchant_uid, status, decline_kind FROM billing_charge_attempts "
            "WHERE subscription_id = %s AND status <> 'rejected' ORDER BY merchant_uid",
            [sub],
        )
    ]
