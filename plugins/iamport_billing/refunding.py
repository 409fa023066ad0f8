"""What a refund's marker proves, and the sweep that settles refunds their task could not.

Our cancels carry ``[refund:<refund_id>]`` at the start of their reason, so the payment's
cancel history says which of its cancels are ours. A refund whose answer was lost is settled by
its task's retry; when every retry failed too (the gateway down a few minutes after the lost
answer), the ledger would say "paid" while the gateway has refunded. The reconcile DAG sweeps
those: it records the ones the history proves, and never sends anything.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from iamport_billing.api_types import CancelEntry
from iamport_billing.gateways.base import Gateway, GatewayUnavailable, PaymentAbsent
from iamport_billing.states import REFUND_DONE
from iamport_billing.warehouse.ledger import Ledger
from iamport_billing.warehouse.refunds import Refunds

# Our cancels' reasons start with the marker; one quoted later in a person's reason is not ours.
_MARKER_RE = re.compile(r"^\[refund:([A-Za-z0-9._:-]{1,64})\]")

log = logging.getLogger(__name__)


def refund_marker(refund_id: str) -> str:
    """What the cancel ``reason`` carries so Iamport's cancel history names the refund."""
    return f"[refund:{refund_id}]"


def refund_id_in(entry: CancelEntry) -> str | None:
    """The refund id our marker puts at the start of a cancel's reason (None: not ours)."""
    found = _MARKER_RE.match(entry.reason or "")
    return found.group(1) if found else None


def applied_total(history: Sequence[CancelEntry], refund_id: str) -> int | None:
    """Iamport's total cancel_amount right after the cancel carrying ``refund_id``; None when
    no cancel in the history carries it."""
    total = 0
    for entry in history:
        total += int(entry.amount)
        if refund_id_in(entry) == refund_id:
            return total
    return None


def settle_open_refunds(
    gateway: Gateway, ledger: Ledger, *, idle_since: datetime,
    logger: logging.Logger | None = None,
) -> tuple[dict[str, int], list[dict[str, Any]]]:  # fmt: skip
    """Refunds whose task did not finish: counts, and those that need a person.

    An open refund untouched since ``idle_since`` whose payment's cancel history carries its
    marker is recorded in the ledger, then ``done``. A ``done`` refund the ledger's refunded
    total does not yet include (its recorder died between the two writes) is recorded. Never
    sends anything: an open refund not in the history waits for its task, or a run with the
    same request_id, since only those may send it again; it is listed for a person.
    """
    lg = logger or log
    refunds = Refunds(ledger)
    counts: Counter[str] = Counter()
    stuck: list[dict[str, Any]] = []
    for row in refunds.done_not_in_ledger():
        if ledger.record_cancellation(
            row.merchant_uid, imp_uid=row.imp_uid, cancel_amount=int(row.cancel_amount_after or 0)
        ):
            counts["recorded"] += 1
    for row in refunds.open_refunds(idle_since=idle_since):
        try:
            payment, history = gateway.payment(row.imp_uid)
        except (GatewayUnavailable, PaymentAbsent) as e:
            lg.warning("could not read refund %s's payment %s: %s", row.refund_id, row.imp_uid, e)
            counts["unreachable"] += 1
            continue
        after = applied_total(history, row.refund_id)
        if after is None:
            counts["not_applied"] += 1
            stuck.append({
                "merchant_uid": row.merchant_uid, "refund_id": row.refund_id,
                "iamport_amount": row.amount,
                "problem": f"refund {row.refund_id} of {row.amount} KRW is open and not in "
                "Iamport's cancel history: re-run its task, or trigger the refund again with "
                "the same request_id (either settles it and sends it only if it never applied)",
            })  # fmt: skip
            continue
        # The ledger first: a death between the two writes leaves the refund open, and the
        # next sweep records it again (the ledger's total only goes up).
        ledger.record_cancellation(
            payment.merchant_uid, imp_uid=payment.imp_uid, cancel_amount=int(payment.cancel_amount)
        )
        if refunds.move(row.refund_id, REFUND_DONE, cancel_amount_after=after):
            lg.info("refund %s found in the cancel history: done", row.refund_id)
            counts[REFUND_DONE] += 1
    return dict(counts), stuck
