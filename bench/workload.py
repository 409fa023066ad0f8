"""The data a scenario charges: N due subscriptions on paying cards.

Billing keys are seeded once straight into the emulator's database (``seed_customers``); each
scenario gets its own warehouse file and its own subscription ids, so its merchant_uids are new
to the emulator and no scenario sees another's ledger.
"""

from __future__ import annotations

import sqlite3
from datetime import date
from pathlib import Path

from iamport_billing.emulator import CARD_ALWAYS_PAID, seed_customers
from iamport_billing.warehouse.ledger import SUBSCRIPTIONS, Ledger

AMOUNT = 9_900


def customer_uid(i: int) -> str:
    return f"cust-{i:06d}"


def seed_billing_keys(emulator_db: Path, n: int) -> int:
    """Billing keys on the always-paid test card for customers 0..n-1."""
    return seed_customers(emulator_db, ((customer_uid(i), CARD_ALWAYS_PAID) for i in range(n)))


def make_warehouse(path: Path, tag: str, n: int, billing_date: date) -> None:
    """A fresh SQLite warehouse holding ``n`` active subscriptions due on ``billing_date``."""
    path.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    ledger = Ledger(SqliteFile(path))
    try:
        ledger.init_schema()
    finally:
        ledger.close()
    stamp = ledger.stamp()
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            f"INSERT INTO {SUBSCRIPTIONS} (subscription_id, customer_uid, amount, currency, name, "
            "status, next_billing_date, billing_anchor_day, updated_at) "
            "VALUES (?, ?, ?, 'KRW', 'Monthly plan', 'active', ?, ?, ?)",
            (
                (f"{tag}-{i:06d}", customer_uid(i), AMOUNT, billing_date.isoformat(),
                 billing_date.day, stamp)
                for i in range(n)
            ),
        )  # fmt: skip
    conn.close()


class SqliteFile:
    """The part of a DbApiHook the Ledger uses, on a file path without a connection."""

    dialect_name = "sqlite"

    def __init__(self, path: Path):
        self.path = path

    def get_conn(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path)
