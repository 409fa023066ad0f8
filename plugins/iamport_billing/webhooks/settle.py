"""A webhook's hint, acted on: look that one payment up at the gateway and, if the ledger holds
the charge unsettled, record what the gateway's records prove.

The outcome comes from ``charging.settle_by_lookup`` and is written through
``Ledger.record_outcomes`` (the state table's compare-and-set), exactly as a retry or the
hourly reconcile would. Nothing here charges, refunds or resends: a payment the gateway never
saw is left to the engine or the reconcile, which may resend it.
"""

from __future__ import annotations

import logging

from iamport_billing.charging import ChargeSettings, settle_by_lookup
from iamport_billing.gateways.base import ABSENT, Gateway, GatewayUnavailable
from iamport_billing.states import MONEY_MOVED, PENDING, UNSETTLED
from iamport_billing.warehouse.ledger import Attempt, Ledger, lease_cutoff

log = logging.getLogger(__name__)

# What a hint came to (the webhook event's recorded result).
NOT_OURS = "not_ours"  # no ledger row has this merchant_uid: nothing looked up
ALREADY_SETTLED = "already_settled"  # the row is settled: the reconcile compares those
SETTLED = "settled"  # the lookup settled the row
ABSENT_AT_GATEWAY = "absent"  # the gateway has no such payment: left to the engine/reconcile
STILL_OPEN = "still_open"  # the gateway's payment is not final yet ('ready')
LEFT_TO_OWNER = "left_to_owner"  # a decline for a row its engine is sending: the engine records it


def needs_lookup(attempt: Attempt | None) -> bool:
    """Only a ledger row that exists and is unsettled is worth a lookup."""
    return attempt is not None and attempt.status in UNSETTLED


def settle_hint(
    gateway: Gateway, ledger: Ledger, merchant_uid: str, settings: ChargeSettings
) -> str:
    """Settle the ledger's unsettled row of ``merchant_uid`` from the gateway's records.

    Rows that do not exist or are settled cost no lookup. Raises ``GatewayUnavailable`` when
    the gateway could not be asked (nothing was written)."""
    attempt = ledger.get_attempt(merchant_uid)
    if attempt is None:
        return NOT_OURS
    if not needs_lookup(attempt):
        return ALREADY_SETTLED
    found, outcome = settle_by_lookup(
        gateway, merchant_uid, attempt.amount, attempt.billing_date, attempt.attempt_no, settings
    )
    if outcome is None:
        if found.kind == ABSENT:
            return ABSENT_AT_GATEWAY
        raise GatewayUnavailable(f"could not look {merchant_uid} up: {found.reason}")
    if outcome.status in UNSETTLED:
        return STILL_OPEN
    in_flight = (
        attempt.status == PENDING
        and attempt.requested_at is not None
        and attempt.requested_at >= lease_cutoff(settings.pending_lease_seconds)
    )
    if in_flight and outcome.status not in MONEY_MOVED:
        # Its engine is sending it now and records the answer under its claim.
        return LEFT_TO_OWNER
    refused = ledger.record_outcomes([outcome])
    if refused:
        return ALREADY_SETTLED  # someone settled it between the read and the write
    log.info(
        "webhook settled %s (was %s): %s imp_uid=%s",
        merchant_uid, attempt.status, outcome.status, outcome.imp_uid,
    )  # fmt: skip
    return SETTLED
