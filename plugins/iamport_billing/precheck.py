"""Pre-charge billing-key check: find customers without a billing key before charge day.

The day before a billing date, the due customers' keys are looked up in bulk
(``GET /subscribe/customers?customer_uid[]=...``, 100 per request, partial answers allowed).
Subscriptions whose customer has no key become ``payment_method_required`` and are reported,
instead of showing up as failed charges tomorrow.
"""

from __future__ import annotations

import logging
from datetime import date
from typing import Any

from iamport_billing.billing_run import validated
from iamport_billing.charging import iter_chunks
from iamport_billing.gateways.base import Gateway
from iamport_billing.policy import ChargeCandidate, ValidationLimits
from iamport_billing.states import PAYMENT_METHOD_REQUIRED
from iamport_billing.warehouse.ledger import Ledger
from iamport_billing.warehouse.source import DueSource

log = logging.getLogger(__name__)
LOOKUP_CHUNK = 1000


def check_billing_keys(
    gateway: Gateway,
    ledger: Ledger,
    *,
    due_query: str,
    billing_date: date,
    limits: ValidationLimits,
    subscriptions_table: str | None,
    source: DueSource | None = None,
    logger: logging.Logger | None = None,
) -> dict[str, Any]:
    """Look up the billing key of every subscription due by ``billing_date``.

    Rows the charge run would reject anyway are skipped (the charge run records them). Returns
    counts and the subscription ids marked ``payment_method_required``.
    """
    lg = logger or log
    checked = 0
    missing_subs: list[str] = []
    candidates = (
        c
        for c in validated(
            (source or ledger.due_source()).iter_due(due_query, billing_date),
            run_date=billing_date,
            limits=limits,
        )
        if isinstance(c, ChargeCandidate)
    )
    for chunk in iter_chunks(candidates, LOOKUP_CHUNK):
        # Only the gateway's own word marks a key missing; "could not ask" raises.
        missing = set(gateway.missing_billing_keys([c.customer_uid for c in chunk]))
        checked += len(chunk)
        missing_subs += [c.subscription_id for c in chunk if c.customer_uid in missing]
    if subscriptions_table is not None:
        ledger.set_subscription_status(
            missing_subs, PAYMENT_METHOD_REQUIRED, subscriptions_table=subscriptions_table
        )
    report = {
        "billing_date": billing_date.isoformat(),
        "checked": checked,
        "missing": len(missing_subs),
        "missing_subscriptions": missing_subs[:100],
    }
    lg.info(
        "billing-key check for %s: %d checked, %d without a billing key%s",
        billing_date, checked, len(missing_subs),
        f" (marked {PAYMENT_METHOD_REQUIRED}: {', '.join(missing_subs[:20])}"
        f"{' ...' if len(missing_subs) > 20 else ''})" if missing_subs else "",
    )  # fmt: skip
    return report
