"""``iamport-billing``: warehouse set-up and ledger summaries from the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import date

from iamport_billing.billing_run import format_report
from iamport_billing.ledger import Ledger
from iamport_billing.policy import UNSETTLED


def _ledger(conn_id: str) -> Ledger:
    return Ledger.from_conn_id(conn_id)


def warehouse_init(args: argparse.Namespace) -> int:
    """Create the subscriptions, ledger and runs tables (idempotent)."""
    with _ledger(args.conn_id) as ledger:
        ledger.init_schema()
        print(f"warehouse tables ready on connection {args.conn_id!r} ({ledger.dialect})")
    return 0


def ledger_summary(args: argparse.Namespace) -> int:
    """Counts and amounts by status for one billing date, and what is unsettled."""
    day = date.fromisoformat(args.billing_date)
    with _ledger(args.conn_id) as ledger:
        by_status = ledger.summary("billing_date = %s", [day.isoformat()])
        unsettled = ledger.summary("status IN (%s, %s)", list(UNSETTLED))
        reasons = ledger.query(
            "SELECT COALESCE(fail_reason, error_message), COUNT(*) FROM billing_charge_attempts "
            "WHERE billing_date = %s AND status IN ('failed', 'rejected') "
            "GROUP BY COALESCE(fail_reason, error_message) ORDER BY COUNT(*) DESC LIMIT 10",
            [day.isoformat()],
        )
    print(
        format_report(
            {
                "billing_date": day.isoformat(),
                "by_status": by_status,
                "unsettled": unsettled,
                "top_reasons": [{"reason": r[0], "count": int(r[1])} for r in reasons],
            }
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iamport-billing", description=__doc__)
    groups = parser.add_subparsers(dest="group", required=True)

    warehouse = groups.add_parser("warehouse", help="warehouse tables")
    wh = warehouse.add_subparsers(dest="command", required=True)
    init = wh.add_parser("init", help="create the tables if missing")
    init.add_argument("--conn-id", default="billing_warehouse")
    init.set_defaults(func=warehouse_init)

    ledger = groups.add_parser("ledger", help="read the charge ledger")
    lg = ledger.add_subparsers(dest="command", required=True)
    summary = lg.add_parser("summary", help="outcomes of one billing date")
    summary.add_argument("--conn-id", default="billing_warehouse")
    summary.add_argument("--billing-date", required=True, help="YYYY-MM-DD")
    summary.set_defaults(func=ledger_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
