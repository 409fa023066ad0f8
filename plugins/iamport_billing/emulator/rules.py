"""Charge and cancel rules shared by V1 and V2: the card decides, the row records.

A payment is one row of the store's ``payments`` table whichever API made it (V2's paymentId is
the row's merchant_uid and its transactionId the imp_uid), so a V1 -> V2 switch keeps history.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from iamport_billing.emulator.config import (
    BEHAVIOR_HARD_DECLINE,
    BEHAVIOR_SHORT_PAID,
    BEHAVIOR_SOFT_DECLINE,
    HARD_DECLINE_REASON,
    SHORT_PAID_SHARE,
    SOFT_DECLINE_REASON,
)
from iamport_billing.emulator.store import CancelRefused

RECEIPT_PREFIX = "/receipts/"
MSG_NOTHING_TO_CANCEL = "취소할 결제건이 존재하지 않습니다."


def num(value: float) -> int | float:
    """JSON number as Iamport writes it: integral amounts as integers."""
    return int(value) if float(value).is_integer() else float(value)


def build_payment(
    charge: dict[str, Any],
    customer: dict[str, Any],
    imp_uid: str,
    base_url: str,
    *,
    ready: bool = False,
    amount_multiplier: float = 1.0,
    now: int | None = None,
) -> dict[str, Any]:
    """The payment row for a charge; the billing key's card class decides paid or failed.

    ``ready`` leaves it in status 'ready' (neither paid nor failed); ``amount_multiplier``
    records a paid charge with amount * N (the switches of the same names); ``now`` is the
    emulator's clock (machine time unless the clock is moved).
    """
    now = int(time.time()) if now is None else now
    behavior = customer["card_behavior"]
    declined = behavior in (BEHAVIOR_SOFT_DECLINE, BEHAVIOR_HARD_DECLINE)
    reason = SOFT_DECLINE_REASON if behavior == BEHAVIOR_SOFT_DECLINE else HARD_DECLINE_REASON
    buyer = ("buyer_name", "buyer_email", "buyer_tel", "buyer_addr", "buyer_postcode")
    request_fields = {
        k: v
        for k, v in charge.items()
        if v is not None
        and k not in ("customer_uid", "merchant_uid", "amount", "name")
        and k not in buyer
    }
    amount = charge["amount"]
    if behavior == BEHAVIOR_SHORT_PAID:
        amount_multiplier *= SHORT_PAID_SHARE
    if not declined and not ready and amount_multiplier != 1:
        amount = num(amount * amount_multiplier)
    payment = {
        "imp_uid": imp_uid,
        "merchant_uid": charge["merchant_uid"],
        "customer_uid": customer["customer_uid"],
        "status": "failed" if declined else "paid",
        "amount": amount,
        "cancel_amount": 0,
        "currency": charge["currency"] or "KRW",
        "name": charge["name"],
        "pay_method": "card",
        "channel": "api",
        "pg_provider": customer["pg_provider"],
        "pg_id": customer["pg_id"],
        "pg_tid": f"{customer['pg_id']}{now}{imp_uid[4:]}",
        "apply_num": None if declined else f"{secrets.randbelow(10**8):08d}",
        "card_code": customer["card_code"],
        "card_name": customer["card_name"],
        "card_number": customer["card_number"],
        "card_type": customer["card_type"],
        "card_quota": charge["card_quota"],
        **{k: charge[k] for k in buyer},
        "custom_data": charge["custom_data"],
        "customer_uid_usage": "payment",
        "started_at": now,
        "paid_at": 0 if declined else now,
        "failed_at": now if declined else 0,
        "cancelled_at": 0,
        "updated_at": now,
        "fail_reason": reason if declined else None,
        "cancel_reason": None,
        "receipt_url": None if declined else f"{base_url}{RECEIPT_PREFIX}{imp_uid}",
        "cancel_history": [],
        "request": request_fields,
    }
    if ready:
        payment.update(
            status="ready", paid_at=0, failed_at=0, apply_num=None, fail_reason=None,
            receipt_url=None,
        )  # fmt: skip
    return payment


def apply_cancel(
    payment: dict[str, Any],
    amount: int | float | None,
    checksum: int | float | None,
    reason: str | None,
    base_url: str,
    now: int | None = None,
) -> dict[str, Any]:
    """Full (amount None/0) or partial cancel; status becomes ``cancelled`` either way.

    ``checksum`` is V1's name for V2's ``currentCancellableAmount``: the balance the caller
    believes is left; a mismatch refuses the cancel.
    """
    if payment["status"] not in ("paid", "cancelled"):
        raise CancelRefused(MSG_NOTHING_TO_CANCEL, CancelRefused.NOT_PAID)
    remaining = num(payment["amount"] - payment["cancel_amount"])
    if remaining <= 0:
        raise CancelRefused(MSG_NOTHING_TO_CANCEL, CancelRefused.ALREADY_CANCELLED)
    if checksum is not None and checksum != remaining:
        raise CancelRefused(
            f"[checksum 불일치] 요청하신 checksum({checksum})이 취소가능잔액({remaining})과 "
            "일치하지 않습니다.",
            CancelRefused.CHECKSUM,
        )
    cancel = amount or remaining
    if cancel > remaining:
        raise CancelRefused(
            f"취소요청금액({cancel})이 취소가능잔액({remaining})보다 큽니다.", CancelRefused.EXCEEDS
        )
    now = int(time.time()) if now is None else now
    history = payment["cancel_history"]
    entry = {
        "pg_tid": f"{payment['pg_tid']}C{len(history) + 1}",
        "amount": cancel,
        "cancelled_at": now,
        "reason": reason or "",
        "cancellation_id": secrets.token_hex(12),
        "receipt_url": f"{base_url}{RECEIPT_PREFIX}{payment['imp_uid']}",
    }
    return {
        **payment,
        "status": "cancelled",
        "cancel_amount": num(payment["cancel_amount"] + cancel),
        "cancelled_at": now,
        "updated_at": now,
        "cancel_reason": reason,
        "cancel_history": [*history, entry],
    }
