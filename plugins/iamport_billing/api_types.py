"""Typed results of the Iamport V1 API. Unknown fields are ignored, missing ones default.

``from_api`` is lenient (it builds from whatever it is given); ``parse`` checks the shape the
official spec gives first and raises :class:`ShapeError` on a reply of the wrong shape, which
the hook turns into a typed "could not ask" (or, after a charge or cancel, "outcome unknown").
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Self

PAID = "paid"
FAILED = "failed"
CANCELLED = "cancelled"
READY = "ready"


class ShapeError(ValueError):
    """A reply whose ``response`` does not have the shape the spec gives (short reason)."""


def _from_mapping(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_dict(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ShapeError(f"{what} is {type(data).__name__}, not an object")
    return data


def _require_str(data: dict[str, Any], name: str, what: str) -> None:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise ShapeError(
            f"{what} has no {name}" if value is None else f"{what}.{name} not a string"
        )


def _require_int(data: dict[str, Any], name: str, what: str) -> int:
    value = data.get(name)
    if value is None:
        raise ShapeError(f"{what} has no {name}")
    if not _is_number(value) or int(value) != value:
        raise ShapeError(f"{what}.{name} is not an integer")
    return int(value)


@dataclass(frozen=True)
class AccessToken:
    """A token with its expiry; the token itself never shows in repr or logs."""

    token: str = field(repr=False)
    expired_at: int
    server_now: int

    @property
    def already_expired(self) -> bool:
        """Expired by the server's own clock when issued (``expired_at`` not after ``now``)."""
        return self.expired_at <= self.server_now


@dataclass(frozen=True)
class Payment:
    imp_uid: str
    merchant_uid: str
    amount: int | float = 0
    cancel_amount: int | float = 0
    currency: str = "KRW"
    status: str = ""
    customer_uid: str | None = None
    name: str | None = None
    fail_reason: str | None = None
    cancel_reason: str | None = None
    pay_method: str | None = None
    pg_provider: str | None = None
    pg_tid: str | None = None
    apply_num: str | None = None
    card_name: str | None = None
    card_number: str | None = None
    receipt_url: str | None = None
    started_at: int = 0
    paid_at: int = 0
    failed_at: int = 0
    cancelled_at: int = 0
    sandbox: bool = False
    custom_data: str | None = None

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Self:
        return _from_mapping(cls, data)

    @classmethod
    def parse(cls, data: Any) -> Self:
        """A PaymentAnnotation: imp_uid, merchant_uid and status strings, numeric amounts."""
        data = _require_dict(data, "payment")
        for name in ("imp_uid", "merchant_uid", "status"):
            _require_str(data, name, "payment")
        if not _is_number(data.get("amount")):
            raise ShapeError("payment has no numeric amount")
        cancel = data.get("cancel_amount")
        if cancel is not None and not _is_number(cancel):
            raise ShapeError("payment.cancel_amount is not a number")
        return cls.from_api({**data, "cancel_amount": cancel or 0})

    @property
    def is_paid(self) -> bool:
        return self.status == PAID

    @property
    def is_failed(self) -> bool:
        return self.status == FAILED

    @property
    def net_amount(self) -> int | float:
        return (self.amount or 0) - (self.cancel_amount or 0)


@dataclass(frozen=True)
class CancelEntry:
    """One entry of a payment's ``cancel_history`` (PaymentCancelAnnotation)."""

    amount: int | float
    reason: str = ""

    @classmethod
    def parse_history(cls, data: Any) -> list[CancelEntry]:
        """The ``cancel_history`` of a payment object; ShapeError when it is malformed."""
        data = _require_dict(data, "payment")
        items = data.get("cancel_history")
        if items is None:
            if data.get("cancel_amount"):
                raise ShapeError("payment has a cancel_amount but no cancel_history")
            return []
        if not isinstance(items, list):
            raise ShapeError("payment.cancel_history is not a list")
        entries = []
        for item in items:
            amount = item.get("amount") if isinstance(item, dict) else None
            if not _is_number(amount):
                raise ShapeError("a cancel_history entry has no numeric amount")
            reason = item.get("reason")
            if reason is not None and not isinstance(reason, str):
                raise ShapeError("a cancel_history entry's reason is not a string")
            entries.append(cls(amount, reason or ""))
        return entries


@dataclass(frozen=True)
class PaymentPage:
    total: int
    previous: int
    next: int
    payments: list[Payment]

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Self:
        return cls(
            total=int(data.get("total") or 0),
            previous=int(data.get("previous") or 0),
            next=int(data.get("next") or 0),
            payments=[Payment.from_api(p) for p in data.get("list") or []],
        )

    @classmethod
    def parse(cls, data: Any) -> Self:
        """A PagedPaymentAnnotation: integer total/previous/next and a list of payments."""
        data = _require_dict(data, "payment page")
        total, previous, next_page = (
            _require_int(data, name, "payment page") for name in ("total", "previous", "next")
        )
        items = data.get("list")
        if items is None and total == 0:
            items = []
        if not isinstance(items, list):
            raise ShapeError("payment page has no list of payments")
        return cls(total, previous, next_page, [Payment.parse(p) for p in items])


@dataclass(frozen=True)
class BillingKey:
    """A stored billing key (``Customer``); the card number is masked by Iamport."""

    customer_uid: str
    pg_provider: str | None = None
    pg_id: str | None = None
    card_name: str | None = None
    card_number: str | None = None
    card_type: int | None = None
    customer_name: str | None = None
    customer_email: str | None = None
    inserted: int = 0
    updated: int = 0
    sandbox: bool = False

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Self:
        return _from_mapping(cls, data)

    @classmethod
    def parse(cls, data: Any) -> Self:
        """A CustomerAnnotation: at least a customer_uid string."""
        data = _require_dict(data, "billing key")
        _require_str(data, "customer_uid", "billing key")
        return cls.from_api(data)


@dataclass(frozen=True)
class BillingKeyLookup:
    """Result of a bulk billing-key lookup: what was found and which customer_uids were not."""

    found: list[BillingKey]
    missing: list[str]
