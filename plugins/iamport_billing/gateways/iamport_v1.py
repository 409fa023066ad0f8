"""Iamport V1 (``POST /subscribe/payments/again``) behind the gateway interface.

The IamportHook owns the connection and speaks the API; this adapter turns its typed errors
and Iamport's own words (codes, duplicate-uid markers) into the engine's neutral answers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from iamport_billing.api_types import CancelEntry, Payment
from iamport_billing.errors import (
    IamportAuthError,
    IamportBillingKeyMissing,
    IamportCancelOutcomeUnknown,
    IamportError,
    IamportNotFound,
    IamportOutcomeUnknown,
    IamportRateLimited,
    IamportRequestRejected,
    IamportTokenUnavailable,
    IamportTransportError,
)
from iamport_billing.gateways.base import (
    ABSENT,
    FOREIGN_REPLY,
    FOUND,
    NO_BILLING_KEY,
    NOT_SENT,
    RATE_LIMITED,
    REFUSED,
    UNKNOWN,
    UNREACHABLE,
    ChargeRequest,
    ChargeResult,
    CredentialsRefused,
    GatewayUnavailable,
    Lookup,
    PaymentAbsent,
    RefundOutcomeUnknown,
    RefundRefused,
    error_text,
    result_of,
)
from iamport_billing.hooks.iamport import IamportHook

# Iamport's refusal of a merchant_uid that already has a paid or cancelled payment.
DUPLICATE_MARKERS = ("이미 주문이 이루어진", "동일한 merchant_uid")
# The optional charge fields this product sends (the spec's names).
BUYER_FIELDS = ("buyer_name", "buyer_email", "buyer_tel", "buyer_addr", "buyer_postcode")


class IamportV1Gateway:
    """The Gateway interface over one ``iamport`` connection."""

    def __init__(self, hook: IamportHook):
        self.hook = hook

    @classmethod
    def from_conn_id(cls, conn_id: str, *, pool_maxsize: int = 16) -> IamportV1Gateway:
        return cls(IamportHook(conn_id, pool_maxsize=pool_maxsize))

    def close(self) -> None:
        self.hook.close()

    # -- charges --------------------------------------------------------------------------------

    def charge(self, request: ChargeRequest) -> ChargeResult:
        optional = {k: v for k, v in request.buyer.items() if v not in (None, "")}
        if request.currency != "KRW":
            optional["currency"] = request.currency
        try:
            payment = self.hook.charge_again(
                request.customer_uid, request.merchant_uid, request.amount, request.name,
                **optional,
            )  # fmt: skip
        except IamportRateLimited as e:
            return ChargeResult(RATE_LIMITED, retry_after=e.retry_after, reason=error_text(e))
        except IamportAuthError as e:
            raise CredentialsRefused(error_text(e)) from None
        except IamportTokenUnavailable as e:
            return ChargeResult(NOT_SENT, code="token_unavailable", reason=error_text(e))
        except IamportBillingKeyMissing as e:
            return ChargeResult(NO_BILLING_KEY, code=str(e.code), reason=e.api_message)
        except IamportRequestRejected as e:
            return self._refused(request, e)
        except IamportOutcomeUnknown as e:
            # A 4xx in a shape that is not Iamport's (a proxy, a wrong base path) most likely
            # never reached it: unknown until looked up, but not worth sending again.
            foreign = e.http_status is not None and 400 <= e.http_status < 500
            code = FOREIGN_REPLY if foreign else "outcome_unknown"
            return ChargeResult(UNKNOWN, code=code, reason=error_text(e))
        except IamportTransportError as e:
            # The hook raises this on the charge POST only when the request never left.
            return ChargeResult(NOT_SENT, code="connect_error", reason=error_text(e))
        except Exception as e:  # noqa: BLE001 - money may have moved: unknown, never lost
            return ChargeResult(UNKNOWN, code="client_error", reason=f"{type(e).__name__}: {e}")
        return result_of(payment)

    def _refused(self, request: ChargeRequest, error: IamportRequestRejected) -> ChargeResult:
        """A non-zero code. Iamport's own record decides when it has one; without one it is a
        refused request only for a first send with a plain refusal: a resend, a duplicate-uid
        refusal or code -1 (PG communication trouble) may hide a charge still in progress."""
        unclear = ChargeResult(UNKNOWN, code=f"rejected_{error.code}", reason=error.api_message)
        found = self.look_up(request.merchant_uid)
        if found.kind == FOUND:
            return result_of(found.decisive)  # type: ignore[arg-type]
        if found.kind == UNREACHABLE:
            return unclear
        if request.resend or error.code == -1:
            return unclear
        if any(m in error.api_message for m in DUPLICATE_MARKERS):
            return unclear
        return ChargeResult(REFUSED, code=str(error.code), reason=error.api_message)

    # -- lookups --------------------------------------------------------------------------------

    def look_up(self, merchant_uid: str) -> Lookup:
        try:
            payments = self.hook.find_all_payments(merchant_uid)
        except IamportError as e:
            return Lookup(UNREACHABLE, reason=error_text(e))
        return Lookup(FOUND, tuple(payments)) if payments else Lookup(ABSENT)

    def payments_between(self, since: int, until: int) -> Iterator[Payment]:
        try:
            yield from self.hook.list_payments("all", since, until)
        except IamportError as e:
            raise GatewayUnavailable(f"could not list payments: {error_text(e)}") from None

    def payment(self, payment_id: str) -> tuple[Payment, list[CancelEntry]]:
        try:
            return self.hook.get_payment_with_history(payment_id)
        except IamportNotFound:
            raise PaymentAbsent(f"Iamport has no payment {payment_id}") from None
        except IamportAuthError as e:
            raise CredentialsRefused(error_text(e)) from None
        except IamportError as e:
            raise GatewayUnavailable(f"could not look {payment_id} up: {error_text(e)}") from None

    def cancel(self, payment_id: str, *, amount: int, reason: str, checksum: int) -> Payment:
        try:
            return self.hook.cancel_payment(
                imp_uid=payment_id, amount=amount, reason=reason, checksum=checksum
            )
        except IamportCancelOutcomeUnknown as e:
            raise RefundOutcomeUnknown(error_text(e)) from None
        except IamportRequestRejected as e:
            raise RefundRefused(e.api_message or error_text(e)) from None
        except IamportAuthError as e:
            raise CredentialsRefused(error_text(e)) from None
        except IamportError as e:  # the hook resends nothing: only "never sent" gets here
            raise GatewayUnavailable(f"the cancel was not sent: {error_text(e)}") from None

    def missing_billing_keys(self, customer_uids: Sequence[str]) -> list[str]:
        try:
            return list(self.hook.get_billing_keys(list(customer_uids)).missing)
        except IamportAuthError as e:
            raise CredentialsRefused(error_text(e)) from None
        except IamportError as e:
            raise GatewayUnavailable(f"could not check billing keys: {error_text(e)}") from None
