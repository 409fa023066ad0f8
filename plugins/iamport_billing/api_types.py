"""Typed results of the Iamport V1 API. Unknown fields are ignored, missing ones default."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Self

PAID = "paid"
FAILED = "failed"
CANCELLED = "cancelled"
READY = "ready"


def _from_mapping(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class AccessToken:
    """A token with its expiry; the token itself never shows in repr or logs."""

    token: str = field(repr=False)
    expired_at: int
    server_now: int


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


@dataclass(frozen=True)
class BillingKeyLookup:
    """Result of a bulk billing-key lookup: what was found and which customer_uids were not."""

    found: list[BillingKey]
    missing: list[str]
