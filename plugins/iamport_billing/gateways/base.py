"""The gateway interface: what the engine, reconciliation, precheck and refunds may ask a
payment gateway, and the neutral answers they get back.

Everything a gateway says in its own words (envelopes, codes, decline markers, token styles)
stays in its implementation; callers see ``ChargeResult`` kinds and three-way ``Lookup``s.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from iamport_billing import api_types as api
from iamport_billing.api_types import CancelEntry, Payment

# ChargeResult kinds: what one charge request ended as, in the engine's words.
PAID = "paid"  # the gateway took money (see payment: it may be another amount)
DECLINED = "declined"  # the card was declined (payment.fail_reason / code say why)
NO_BILLING_KEY = "no_billing_key"  # the customer has no stored card at the gateway
REFUSED = "refused"  # the request itself was refused; no money moved, never retried as is
UNKNOWN = "unknown"  # sent, and nothing says what happened: look it up before anything else
NOT_SENT = "not_sent"  # provably never reached the gateway (no token, connection refused)
RATE_LIMITED = "rate_limited"  # refused unprocessed for load: safe to send again later

# ChargeResult code of an UNKNOWN answered in a shape that is not the gateway's (a proxy's
# page, a wrong base path): once the gateway's own word says it has no such payment, the
# request is settled as refused for a person to look at, never sent again in a loop.
FOREIGN_REPLY = "foreign_reply"

# Lookup kinds.
FOUND, ABSENT, UNREACHABLE = "found", "absent", "unreachable"


class GatewayError(Exception):
    """The gateway could not be asked, or refused our credentials; the message is clean text
    (status and a short excerpt, no markup, no secret)."""


class CredentialsRefused(GatewayError):
    """The gateway refused the API key/secret: nothing was sent, retrying cannot help."""


class GatewayUnavailable(GatewayError):
    """The gateway could not be asked (down, proxy, wrong shape): it proves nothing."""


class PaymentAbsent(GatewayError):
    """The gateway's own word: it has no such payment."""


class RefundOutcomeUnknown(GatewayError):
    """A cancel was sent and no usable answer came back: it may have applied."""


class RefundRefused(GatewayError):
    """The gateway refused the cancel (e.g. the balance is not the checksum): not applied."""


@dataclass(frozen=True)
class ChargeRequest:
    merchant_uid: str
    customer_uid: str
    amount: int
    name: str
    currency: str = "KRW"
    # Sent before under this merchant_uid: a refusal now may hide the first request's charge.
    resend: bool = False
    buyer: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChargeResult:
    kind: str
    payment: Payment | None = None
    code: str | None = None
    reason: str | None = None
    retry_after: float | None = None


@dataclass(frozen=True)
class Lookup:
    """found (with the gateway's records), absent (its own word), or unreachable (anything
    else). Only ``absent`` ever allows sending the same merchant_uid again."""

    kind: str
    payments: tuple[Payment, ...] = ()
    reason: str | None = None

    @property
    def decisive(self) -> Payment | None:
        """Of a merchant_uid's records, the one that decides: paid/cancelled if any, else one
        still in progress ('ready': money may yet move), else the latest failure."""
        if not self.payments:
            return None
        settled = [p for p in self.payments if p.status in (api.PAID, api.CANCELLED)]
        if settled:
            return settled[0]
        open_ = [p for p in self.payments if p.status != api.FAILED]
        return max(open_ or self.payments, key=lambda p: (p.started_at or 0, p.failed_at or 0))


class Gateway(Protocol):
    """One gateway connection. Implementations: ``iamport_v1.IamportV1Gateway``,
    ``portone_v2.PortOneV2Gateway``."""

    def charge(self, request: ChargeRequest) -> ChargeResult: ...

    def look_up(self, merchant_uid: str) -> Lookup: ...

    def payments_between(self, since: int, until: int) -> Iterator[Payment]:
        """Every payment started in [since, until) (unix seconds); raises GatewayUnavailable
        rather than end early."""
        ...

    def missing_billing_keys(self, customer_uids: Sequence[str]) -> list[str]:
        """customer_uids the gateway says have no billing key; raises GatewayUnavailable."""
        ...

    def payment(self, payment_id: str) -> tuple[Payment, list[CancelEntry]]:
        """A payment by the gateway's id with its cancel history; raises PaymentAbsent or
        GatewayUnavailable."""
        ...

    def cancel(self, payment_id: str, *, amount: int, reason: str, checksum: int) -> Payment:
        """Refund ``amount`` once (never resent); raises RefundOutcomeUnknown, RefundRefused,
        GatewayUnavailable (provably not sent) or CredentialsRefused."""
        ...

    def close(self) -> None: ...


def result_of(payment: Payment) -> ChargeResult:
    """A payment record as a charge result: paid/cancelled, failed (declined), or unknown."""
    if payment.status in (api.PAID, api.CANCELLED):
        return ChargeResult(PAID, payment)
    if payment.status == api.FAILED:
        return ChargeResult(DECLINED, payment, reason=payment.fail_reason)
    return ChargeResult(
        UNKNOWN, payment, code=f"status_{payment.status or 'empty'}",
        reason=f"the gateway reports status {payment.status!r}",
    )  # fmt: skip


def error_text(error: Exception) -> str:
    """An error's message cut to a size that fits a ledger row or a result's reason."""
    return str(error)[:300]
