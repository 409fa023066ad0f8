"""The attempts view as CSV, for a spreadsheet: what ops hand to finance or a card company.

UTF-8 with a byte-order mark, so Excel shows the Korean decline reasons; a cell that a
spreadsheet would read as a formula (a gateway's message starting with ``=``, ``+``, ``-`` or
``@``) is written with a leading apostrophe. The claim token (internal) is left out.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

from iamport_billing.warehouse.ledger import Attempt

COLUMNS = (
    "merchant_uid", "subscription_id", "billing_date", "attempt_no", "customer_uid", "name",
    "amount", "paid_amount", "cancel_amount", "currency", "status", "decline_kind",
    "fail_reason", "error_code", "error_message", "next_retry_date", "imp_uid", "receipt_url",
    "requested_at", "completed_at", "dag_id", "run_id", "task_id", "try_number",
)  # fmt: skip
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def attempts_csv(attempts: Iterable[Attempt]) -> str:
    out = io.StringIO()
    out.write("\ufeff")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for a in attempts:
        writer.writerow([_cell(getattr(a, c)) for c in COLUMNS])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, int | float):
        return str(value)  # a negative number stays a number
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text
