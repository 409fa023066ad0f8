"""The iamport-billing console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from iamport_billing.warehouse.ledger import Ledger

CLI = str(Path(sys.executable).parent / "iamport-billing")


def test_warehouse_init_creates_the_tables_idempotently(warehouse):
    for _ in range(2):
        out = subprocess.run(
            [CLI, "warehouse", "init", "--conn-id", "billing_warehouse"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert "warehouse tables ready" in out.stdout
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        assert ledger.query("SELECT COUNT(*) FROM billing_charge_attempts") == [(0,)]
        assert ledger.query("SELECT COUNT(*) FROM billing_subscriptions") == [(0,)]


def test_ledger_summary_prints_outcomes_of_a_date(sqlite_warehouse):
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        ledger.init_schema()
        ledger.execute(
            "INSERT INTO billing_charge_attempts (merchant_uid, subscription_id, billing_date, "
            "attempt_no, amount, status) VALUES ('s-20261126-01', 's', '2026-11-26', 1, 9900, "
            "'paid')"
        )
    out = subprocess.run(
        [CLI, "ledger", "summary", "--billing-date", "2026-11-26"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "paid" in out.stdout and "9,900" in out.stdout
