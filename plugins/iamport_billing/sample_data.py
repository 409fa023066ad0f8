"""Sample subscriptions for the demo, `make up` and the e2e tests: mostly paying cards, some
soft and hard declines, a few customers without a billing key and a few invalid rows."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from iamport_billing.emulator import (
    CARD_ALWAYS_PAID,
    CARD_HARD_DECLINE,
    CARD_SOFT_DECLINE,
    seed_customers,
)
from iamport_billing.warehouse.ledger import Ledger

PLANS = (("Basic monthly", 4_900), ("Standard monthly", 9_900), ("Premium monthly", 14_900))

# Rows the plan step must reject (the warehouse holds bad data too).
INVALID_ROWS = (
    ("bad-zero-amount", "cust-bad-1", 0, "KRW"),
    ("bad-negative", "cust-bad-2", -9_900, "KRW"),
    ("bad-no-customer", None, 9_900, "KRW"),
    ("bad-usd", "cust-bad-4", 9_900, "USD"),
    ("bad-over-cap", "cust-bad-5", 50_000_000, "KRW"),
    ("bad-fraction", "cust-bad-6", 9_900.5, "KRW"),
)


@dataclass
class SampleCounts:
    paying: int = 0
    soft_decline: int = 0
    hard_decline: int = 0
    no_billing_key: int = 0
    invalid: int = 0
    by_card: dict[str, int] = field(default_factory=dict)


def seed_sample(
    ledger: Ledger,
    emulator_db_path: str | Path,
    billing_date: date,
    n: int = 2000,
    seed: int = 42,
) -> SampleCounts:
    """Insert ``n`` subscriptions due on ``billing_date`` and their billing keys (idempotent)."""
    rng = random.Random(seed)
    ledger.init_schema()
    counts = SampleCounts()
    rows, cards = [], []
    for i in range(n):
        sub, customer = f"sub-{i:06d}", f"cust-{i:06d}"
        name, amount = rng.choice(PLANS)
        roll = rng.random()
        if roll < 0.04:
            cards.append((customer, CARD_SOFT_DECLINE))
            counts.soft_decline += 1
        elif roll < 0.06:
            cards.append((customer, CARD_HARD_DECLINE))
            counts.hard_decline += 1
        elif roll < 0.075:
            counts.no_billing_key += 1
        else:
            cards.append((customer, CARD_ALWAYS_PAID))
            counts.paying += 1
        rows.append((sub, customer, amount, "KRW", name, f"buyer{i}@example.com"))
    rows.extend((*bad, "Standard monthly", None) for bad in INVALID_ROWS)
    counts.invalid = len(INVALID_ROWS)
    cols = ("subscription_id", "customer_uid", "amount", "currency", "name", "buyer_email")
    ledger.add_subscriptions(
        [
            {**dict(zip(cols, r, strict=True)), "next_billing_date": billing_date,
             "billing_anchor_day": billing_date.day}
            for r in rows
        ]
    )  # fmt: skip
    seed_customers(str(emulator_db_path), cards)
    return counts
