"""The vocabulary of the ledger: attempt states, subscription statuses and allowed moves.

Every other module names states through this one; the warehouse enforces ``ATTEMPT_MOVES``
in SQL (compare-and-set) on every write, so a move the table does not allow cannot happen.
"""

from __future__ import annotations

# -- attempt states (billing_charge_attempts.status) -------------------------------------------
PENDING = "pending"  # written ahead: about to be sent, or sent and not answered yet
UNKNOWN = "unknown"  # sent, and the answer did not say what happened: look it up first
PAID = "paid"  # the gateway says paid, for the amount we asked
AMOUNT_MISMATCH = "amount_mismatch"  # paid, but not the amount we asked: a person decides
FAILED = "failed"  # declined (see decline_kind) or refused before money moved
CANCELLED = "cancelled"  # paid, then refunded in full or in part (see cancel_amount)
REJECTED = "rejected"  # bad input: never sent to the gateway
ABANDONED = "abandoned"  # never reached the gateway and no longer owed: closed, not charged

ATTEMPT_STATES = (
    PENDING, UNKNOWN, PAID, AMOUNT_MISMATCH, FAILED, CANCELLED, REJECTED, ABANDONED,
)  # fmt: skip
UNSETTLED = (PENDING, UNKNOWN)  # money may be moving: nothing else may touch the period
MONEY_MOVED = (PAID, AMOUNT_MISMATCH, CANCELLED)  # the gateway took money for this uid
SETTLED = (PAID, AMOUNT_MISMATCH, FAILED, CANCELLED, REJECTED, ABANDONED)

# target state -> states it may be reached from. A gateway's word that money moved (paid,
# amount mismatch, cancelled) wins over any state but rejected, whoever brings it; every
# other move needs the row to be unsettled (and, for its owner, still claimed by it).
ATTEMPT_MOVES: dict[str, tuple[str, ...]] = {
    PENDING: (PENDING, UNKNOWN),
    UNKNOWN: (PENDING, UNKNOWN),
    FAILED: (PENDING, UNKNOWN),
    ABANDONED: (PENDING, UNKNOWN),
    PAID: (PENDING, UNKNOWN, FAILED, ABANDONED, PAID, AMOUNT_MISMATCH),
    AMOUNT_MISMATCH: (PENDING, UNKNOWN, FAILED, ABANDONED),
    CANCELLED: (PENDING, UNKNOWN, FAILED, ABANDONED, PAID, AMOUNT_MISMATCH, CANCELLED),
}

MEANING = {
    PENDING: "written ahead of the request; sent or about to be",
    UNKNOWN: "sent, answer unclear; looked up before anything else",
    PAID: "paid the requested amount",
    AMOUNT_MISMATCH: "paid a different amount than requested; needs a person",
    FAILED: "declined or refused; dunning decides what comes next",
    CANCELLED: "refunded (cancel_amount says how much)",
    REJECTED: "bad input, never sent",
    ABANDONED: "the gateway never saw it and the period is no longer owed: closed",
}

# Decline kinds (billing_charge_attempts.decline_kind) of a failed attempt.
HARD = "hard"  # the card cannot be charged again: a new card is needed
SOFT = "soft"  # try again on the dunning schedule
REFUSED = "refused"  # the gateway refused the request itself: never dunned, a person looks
# error_code of a failed attempt whose customer has no card at the gateway: not a decline.
MISSING_BILLING_KEY = "missing_billing_key"

# -- subscription statuses (billing_subscriptions.status) --------------------------------------
ACTIVE = "active"  # billed on next_billing_date
PAYMENT_METHOD_REQUIRED = "payment_method_required"  # hard decline / no billing key
PAST_DUE = "past_due"  # soft declines and every retry used up
SUB_CANCELLED = "cancelled"  # ended by the customer or the merchant: never charged

SUBSCRIPTION_STATUSES = (ACTIVE, PAYMENT_METHOD_REQUIRED, PAST_DUE, SUB_CANCELLED)
# A paid period makes these active again (a backfill, or a late answer found by a lookup).
REACTIVATED_BY_PAYMENT = (PAST_DUE, PAYMENT_METHOD_REQUIRED)
# status -> statuses write-back may move a subscription from (a person moves it back).
SUBSCRIPTION_MOVES: dict[str, tuple[str, ...]] = {
    PAYMENT_METHOD_REQUIRED: (ACTIVE,),
    PAST_DUE: (ACTIVE,),
    ACTIVE: (PAST_DUE, PAYMENT_METHOD_REQUIRED),  # a backfill that got paid
}


def may_move(source: str, target: str) -> bool:
    """True when ``ATTEMPT_MOVES`` allows ``source`` -> ``target``."""
    return source in ATTEMPT_MOVES.get(target, ())


# -- plan approvals (billing_runs.approval) ----------------------------------------------------
# A plan over its guardrails is frozen, then waits for a person; its charges go out only once
# the ledger says approved (compare-and-set against the plan's digest: the plan shown).
APPROVAL_AWAITING = "awaiting"
APPROVAL_APPROVED = "approved"
APPROVAL_REJECTED = "rejected"  # by a person, or by the timeout's default


# -- refund states (billing_refunds.status) ----------------------------------------------------
REFUND_PENDING = "pending"  # written ahead of the cancel POST; sent or about to be
REFUND_UNKNOWN = "unknown"  # sent, no usable answer: settled from the cancel history, not resent
REFUND_DONE = "done"  # Iamport's cancel history holds this refund (our marker in its reason)
REFUND_REFUSED = "refused"  # not applied: Iamport refused it, or the balance moved under it

REFUND_STATES = (REFUND_PENDING, REFUND_UNKNOWN, REFUND_DONE, REFUND_REFUSED)
REFUND_OPEN = (REFUND_PENDING, REFUND_UNKNOWN)  # a re-run must settle these before anything

# target state -> states a refund may be moved from (compare-and-set in SQL). Iamport's cancel
# history showing our refund wins over any state; every other move needs the refund open.
REFUND_MOVES: dict[str, tuple[str, ...]] = {
    REFUND_PENDING: (REFUND_PENDING, REFUND_UNKNOWN),
    REFUND_UNKNOWN: (REFUND_PENDING, REFUND_UNKNOWN),
    REFUND_DONE: (REFUND_PENDING, REFUND_UNKNOWN, REFUND_REFUSED),
    REFUND_REFUSED: (REFUND_PENDING, REFUND_UNKNOWN),
}

REFUND_MEANING = {
    REFUND_PENDING: "written ahead of the cancel request; sent or about to be",
    REFUND_UNKNOWN: "sent, answer lost; a re-run settles it from Iamport's cancel history",
    REFUND_DONE: "refunded: Iamport's cancel history carries this refund's marker",
    REFUND_REFUSED: "not refunded: refused, or the balance moved under it; a person decides",
}

# -- webhook deliveries (billing_webhook_events.status) ----------------------------------------
WEBHOOK_PROCESSING = "processing"  # a handler holds it (its lookup is under way)
WEBHOOK_DONE = "done"  # handled: a redelivery of the same event id does nothing
