"""PortOne V2 (``POST /payments/{paymentId}/billing-key``) behind the gateway interface.

The PortOneHook owns the connection and the exchange (Idempotency-Key resends, 409 waits);
this adapter names the requests and turns PortOne's error ``type``s and its ``Payment`` union
into the engine's neutral answers.

Ids: our merchant_uid is V2's ``paymentId`` (URL-escaped in paths), and the subscription's
customer_uid column carries the V2 billing key. The gateway payment id this adapter reports
(``Payment.imp_uid``, what the ledger stores and ``payment``/``cancel`` take) is the V2
paymentId for payments made through V2, and ``transactionId`` for payments made through V1
(PortOne gives them V1's imp_uid as transactionId, so ledger rows written through the
``iamport`` connection still match). ``payment`` and ``cancel`` address ``/payments/{id}``,
so a V1-era payment is refunded through its ``iamport`` connection: asked by its imp_uid, V2
answers PAYMENT_NOT_FOUND and nothing is sent.

Idempotency-Keys are derived, never random: a charge's from its merchant_uid (a resend by any
run replays the first answer for PortOne's 3-hour window), a cancel's from (payment id,
checksum, amount, reason): a resend of the same refund (the reason carries its refund marker)
replays, another refund is another request, even of the same amount at the same balance.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from iamport_billing import api_types as api
from iamport_billing.api_types import CancelEntry, Payment, ShapeError
from iamport_billing.gateways.base import (
    ABSENT,
    DECLINED,
    FOREIGN_REPLY,
    FOUND,
    NO_BILLING_KEY,
    NOT_SENT,
    PAID,
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
from iamport_billing.hooks.portone import (
    PortOneAuthError,
    PortOneError,
    PortOneHook,
    PortOneNotSent,
    PortOneOutcomeUnknown,
    PortOneRateLimited,
    Reply,
)

# payWithBillingKey's error types, by what they mean for the charge.
NO_KEY_TYPES = frozenset({"BILLING_KEY_NOT_FOUND", "BILLING_KEY_ALREADY_DELETED"})
REFUSAL_TYPES = frozenset(
    {
        "INVALID_REQUEST", "CHANNEL_NOT_FOUND", "DISCOUNT_AMOUNT_EXCEEDS_TOTAL_AMOUNT",
        "PAYMENT_SCHEDULE_ALREADY_EXISTS", "PROMOTION_PAY_METHOD_DOES_NOT_MATCH",
        "SUM_OF_PARTS_EXCEEDS_TOTAL_AMOUNT",
    }
)  # fmt: skip
# The V2 Payment union's statuses in api_types' words (PARTIAL_CANCELLED stays paid with a
# cancelled amount, as V1 reports it; READY and the pending ones are in progress).
STATUSES = {
    "PAID": api.PAID,
    "PARTIAL_CANCELLED": api.PAID,
    "CANCELLED": api.CANCELLED,
    "FAILED": api.FAILED,
    "READY": api.READY,
    "PAY_PENDING": api.READY,
    "VIRTUAL_ACCOUNT_ISSUED": api.READY,
}
PAGE_SIZE = 1000
# Billing-key lookups in flight at once (one GET per key).
KEY_LOOKUP_THREADS = 8
_KEY_SAFE = re.compile(r"[A-Za-z0-9_-]+")


def idempotency_key(kind: str, *parts: Any) -> str:
    """``{kind}-{uid}`` for one uid of 16-256 letters, digits, ``-`` or ``_`` in all; otherwise
    ``{kind}-`` and the SHA-256 of the parts (several parts are always hashed: joined, they
    could spell another request's). The same request always gets the same key."""
    plain = f"{kind}-{parts[0]}" if len(parts) == 1 else ""
    if 16 <= len(plain) <= 256 and _KEY_SAFE.fullmatch(plain):
        return plain
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return f"{kind}-{digest}"


def _path(template: str, value: str) -> str:
    return template.format(quote(value, safe=""))


class PortOneV2Gateway:
    """The Gateway interface over one ``portone`` connection."""

    def __init__(self, hook: PortOneHook):
        self.hook = hook

    @classmethod
    def from_conn_id(cls, conn_id: str, *, pool_maxsize: int = 16) -> PortOneV2Gateway:
        return cls(PortOneHook(conn_id, pool_maxsize=pool_maxsize))

    def close(self) -> None:
        self.hook.close()

    # -- charges --------------------------------------------------------------------------------

    def charge(self, request: ChargeRequest) -> ChargeResult:
        body: dict[str, Any] = {
            "billingKey": request.customer_uid,
            "orderName": request.name,
            "amount": {"total": request.amount},
            "currency": request.currency,
        }
        if self.hook.settings.channel_key:
            body["channelKey"] = self.hook.settings.channel_key
        customer = customer_of(request.buyer)
        if customer:
            body["customer"] = customer
        try:
            reply = self.hook.post(
                _path("/payments/{}/billing-key", request.merchant_uid), body,
                idempotency_key=idempotency_key("charge", request.merchant_uid),
            )  # fmt: skip
        except PortOneAuthError as e:
            raise CredentialsRefused(error_text(e)) from None
        except PortOneRateLimited as e:
            return ChargeResult(RATE_LIMITED, retry_after=e.retry_after, reason=error_text(e))
        except PortOneNotSent as e:
            return ChargeResult(NOT_SENT, code="connect_error", reason=error_text(e))
        except PortOneOutcomeUnknown as e:
            return ChargeResult(UNKNOWN, code="outcome_unknown", reason=error_text(e))
        except Exception as e:  # noqa: BLE001 - money may have moved: unknown, never lost
            return ChargeResult(UNKNOWN, code="client_error", reason=f"{type(e).__name__}: {e}")
        try:
            return self._charge_result(request, reply)
        except Exception as e:  # noqa: BLE001 - an answer we could not read: unknown, never lost
            return ChargeResult(UNKNOWN, code="client_error", reason=f"{type(e).__name__}: {e}")

    def _charge_result(self, request: ChargeRequest, reply: Reply) -> ChargeResult:
        kind = reply.error_type
        if reply.status == 200:
            return self._paid(request, reply)
        if kind == "PG_PROVIDER":
            return self._declined(request, reply)
        if (kind in NO_KEY_TYPES or kind == "MAX_TRANSACTION_COUNT_REACHED") and (
            request.resend or reply.resent
        ):
            # Said to a resend: the first send may have been paid (a replay missed, the key's
            # window over). Its record decides; PortOne's word that it has none lets the
            # refusal stand; a record that cannot be read leaves it unknown.
            found = self.look_up(request.merchant_uid)
            if found.kind == FOUND:
                return result_of(found.decisive)  # type: ignore[arg-type]
            if found.kind == UNREACHABLE:
                return ChargeResult(UNKNOWN, code=kind.lower(), reason=reply.message or kind)
        if kind in NO_KEY_TYPES:
            return ChargeResult(NO_BILLING_KEY, code=kind, reason=reply.message or kind)
        if kind == "MAX_TRANSACTION_COUNT_REACHED":
            return ChargeResult(REFUSED, code=kind, reason=reply.message or kind)
        if kind == "ALREADY_PAID":
            return self._decided_by_record(request, kind, reply, refusal=False)
        if kind in REFUSAL_TYPES:
            return self._decided_by_record(request, kind, reply, refusal=True)
        foreign = kind is None and 400 <= reply.status < 500
        return ChargeResult(
            UNKNOWN, code=FOREIGN_REPLY if foreign else f"unexpected_{kind or reply.status}",
            reason=f"HTTP {reply.status}: {reply.excerpt}",
        )  # fmt: skip

    def _paid(self, request: ChargeRequest, reply: Reply) -> ChargeResult:
        """200 is PortOne's word that it was paid; its body ({pgTxId, paidAt}) lacks the
        amount, so the record decides when it can be read."""
        found = self.look_up(request.merchant_uid)
        settled = found.decisive if found.kind == FOUND else None
        if settled is not None and settled.status in (api.PAID, api.CANCELLED):
            return result_of(settled)
        summary = reply.body.get("payment") if isinstance(reply.body, dict) else None
        if not isinstance(summary, dict) or not isinstance(summary.get("paidAt"), str):
            return ChargeResult(
                UNKNOWN, code="paid_reply_unreadable",
                reason=f"HTTP 200 without a payment summary, and no paid record: {reply.excerpt}",
            )  # fmt: skip
        payment = Payment(
            imp_uid=request.merchant_uid, merchant_uid=request.merchant_uid,
            amount=request.amount, currency=request.currency, status=api.PAID,
            customer_uid=request.customer_uid, name=request.name,
            pg_tid=summary.get("pgTxId") if isinstance(summary.get("pgTxId"), str) else None,
        )  # fmt: skip
        try:  # the moment is a detail; the 200 is what proves the charge
            payment = replace(payment, paid_at=_unix(summary["paidAt"]))
        except ShapeError:
            pass
        return ChargeResult(PAID, payment)

    def _declined(self, request: ChargeRequest, reply: Reply) -> ChargeResult:
        """502 PG_PROVIDER: the PG refused; pgCode/pgMessage feed the decline table (the code,
        and the message as a failed payment's fail_reason, as V1 reports a decline). A PG error
        is also how a PG timeout comes back, so a record still in progress or paid decides
        instead, and one that cannot be read leaves it unknown."""
        found = self.look_up(request.merchant_uid)
        if found.kind == UNREACHABLE:
            return ChargeResult(
                UNKNOWN, code="pg_provider_unconfirmed",
                reason=f"PG error, and the record could not be read: {reply.message}",
            )  # fmt: skip
        record = found.decisive if found.kind == FOUND else None
        if record is not None and record.status != api.FAILED:
            return result_of(record)
        body = reply.body
        code, message = str(body.get("pgCode") or ""), str(body.get("pgMessage") or "")
        reason = message or reply.message or "declined by the PG"
        payment = Payment(
            imp_uid=request.merchant_uid, merchant_uid=request.merchant_uid,
            amount=request.amount, currency=request.currency, status=api.FAILED,
            customer_uid=request.customer_uid, name=request.name, fail_reason=reason,
        )  # fmt: skip
        return ChargeResult(DECLINED, payment, code=code or None, reason=reason)

    def _decided_by_record(
        self, request: ChargeRequest, kind: str, reply: Reply, *, refusal: bool
    ) -> ChargeResult:
        """PortOne's record decides when it has one. Without one, a plain refusal of a first
        send is REFUSED; ALREADY_PAID or a resend's refusal may hide a charge: unknown."""
        unclear = ChargeResult(UNKNOWN, code=kind.lower(), reason=reply.message or kind)
        found = self.look_up(request.merchant_uid)
        if found.kind == FOUND:
            return result_of(found.decisive)  # type: ignore[arg-type]
        if found.kind == UNREACHABLE or not refusal or request.resend or reply.resent:
            return unclear
        return ChargeResult(REFUSED, code=kind, reason=reply.message or kind)

    # -- lookups --------------------------------------------------------------------------------

    def look_up(self, merchant_uid: str) -> Lookup:
        try:
            reply = self.hook.get(_path("/payments/{}", merchant_uid))
        except PortOneError as e:
            return Lookup(UNREACHABLE, reason=error_text(e))
        if reply.status == 404 and reply.error_type == "PAYMENT_NOT_FOUND":
            return Lookup(ABSENT)
        if reply.status != 200:
            return Lookup(UNREACHABLE, reason=f"HTTP {reply.status}: {reply.excerpt}")
        try:
            return Lookup(FOUND, (payment_of(reply.body),))
        except ShapeError as e:
            return Lookup(UNREACHABLE, reason=f"not a V2 payment ({e}): {reply.excerpt}")

    def payments_between(self, since: int, until: int) -> Iterator[Payment]:
        """GET /payments-by-cursor over [since, until) (creation time), every page."""
        window = {"from": _rfc3339(since), "until": _rfc3339(until), "size": PAGE_SIZE}
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            query = {**window, **({"cursor": cursor} if cursor else {})}
            try:
                reply = self.hook.get("/payments-by-cursor", query_body=query)
            except PortOneError as e:
                raise GatewayUnavailable(f"could not list payments: {error_text(e)}") from None
            items = reply.body.get("items") if isinstance(reply.body, dict) else None
            if reply.status != 200 or not isinstance(items, list):
                raise GatewayUnavailable(
                    f"could not list payments: HTTP {reply.status}: {reply.excerpt}"
                )
            if not items:
                return
            last = items[-1].get("cursor") if isinstance(items[-1], dict) else None
            if not isinstance(last, str) or not last or last in seen:
                # A cursor that does not advance, or comes back: a page read before; reading
                # on would never end.
                raise GatewayUnavailable("could not list payments: the cursor did not advance")
            seen.add(last)
            for item in items:
                try:
                    payment = payment_of(item.get("payment") if isinstance(item, dict) else None)
                except ShapeError as e:
                    raise GatewayUnavailable(f"could not list payments: {e}") from None
                if since <= payment.started_at < until:
                    yield payment
            cursor = last

    def missing_billing_keys(self, customer_uids: Sequence[str]) -> list[str]:
        """GET /billing-keys/{billingKey} each (V2 has no bulk lookup by key), a few at a
        time: missing on 404 BILLING_KEY_NOT_FOUND or a DELETED key; anything else that is
        not an issued key raises GatewayUnavailable (CredentialsRefused for the secret)."""
        wanted = list(dict.fromkeys(customer_uids))
        if not wanted:
            return []
        workers = max(1, min(KEY_LOOKUP_THREADS, self.hook.pool_maxsize, len(wanted)))
        with ThreadPoolExecutor(workers, thread_name_prefix="billing-key") as pool:
            gone = list(pool.map(self._billing_key_gone, wanted))
        return [key for key, missing in zip(wanted, gone, strict=True) if missing]

    def _billing_key_gone(self, key: str) -> bool:
        try:
            reply = self.hook.get(_path("/billing-keys/{}", key))
        except PortOneAuthError as e:
            raise CredentialsRefused(error_text(e)) from None
        except PortOneError as e:
            raise GatewayUnavailable(f"could not check billing keys: {error_text(e)}") from None
        status = reply.body.get("status") if isinstance(reply.body, dict) else None
        if reply.status == 404 and reply.error_type == "BILLING_KEY_NOT_FOUND":
            return True
        if reply.status == 200 and status in ("ISSUED", "DELETED"):
            return status == "DELETED"
        raise GatewayUnavailable(
            f"could not check billing keys: HTTP {reply.status}: {reply.excerpt}"
        )

    def payment(self, payment_id: str) -> tuple[Payment, list[CancelEntry]]:
        try:
            reply = self.hook.get(_path("/payments/{}", payment_id))
        except PortOneAuthError as e:
            raise CredentialsRefused(error_text(e)) from None
        except PortOneError as e:
            raise GatewayUnavailable(f"could not look {payment_id} up: {error_text(e)}") from None
        if reply.status == 404 and reply.error_type == "PAYMENT_NOT_FOUND":
            raise PaymentAbsent(f"PortOne has no payment {payment_id}")
        try:
            if reply.status != 200:
                raise ShapeError(f"HTTP {reply.status}")
            return payment_of(reply.body), cancel_history(reply.body)
        except ShapeError as e:
            raise GatewayUnavailable(
                f"could not look {payment_id} up: {e}: {reply.excerpt}"
            ) from None

    # -- refunds --------------------------------------------------------------------------------

    def cancel(self, payment_id: str, *, amount: int, reason: str, checksum: int) -> Payment:
        body = {"amount": amount, "reason": reason, "currentCancellableAmount": checksum}
        key = idempotency_key("cancel", payment_id, checksum, amount, reason)
        try:
            reply = self.hook.post(
                _path("/payments/{}/cancel", payment_id), body, idempotency_key=key
            )
        except PortOneAuthError as e:
            raise CredentialsRefused(error_text(e)) from None
        except (PortOneNotSent, PortOneRateLimited) as e:
            raise GatewayUnavailable(f"the cancel was not sent: {error_text(e)}") from None
        except Exception as e:  # noqa: BLE001 - it may have applied: unknown, never resent
            raise RefundOutcomeUnknown(f"{type(e).__name__}: {error_text(e)}") from None
        if reply.status == 200:
            cancellation = reply.body.get("cancellation") if isinstance(reply.body, dict) else None
            state = cancellation.get("status") if isinstance(cancellation, dict) else None
            if state == "FAILED":
                raise RefundRefused(f"the PG failed the cancel: {reply.excerpt}")
            if state != "SUCCEEDED":
                raise RefundOutcomeUnknown(f"cancel answered {state!r}: {reply.excerpt}")
            try:
                return self.payment(payment_id)[0]
            except (GatewayUnavailable, PaymentAbsent) as e:
                raise RefundOutcomeUnknown(
                    f"the cancel succeeded but the payment could not be read back: {e}"
                ) from None
        # Only a 4xx refuses; a 5xx, PortOne's shape or not (PG_PROVIDER: the PG may have
        # applied it), proves nothing: unknown, settled from the cancel history.
        if reply.error_type is not None and 400 <= reply.status < 500:
            refusal = f"{reply.error_type}: {reply.message or reply.excerpt}"
            if reply.resent:  # e.g. the balance moved because the first send applied
                raise RefundOutcomeUnknown(f"refused on a resend, the first may apply: {refusal}")
            raise RefundRefused(refusal)
        raise RefundOutcomeUnknown(f"HTTP {reply.status}: {reply.excerpt}")


# -- the V2 Payment union in api_types' words ---------------------------------------------------


def customer_of(buyer: Mapping[str, Any]) -> dict[str, Any]:
    """The V1-named buyer fields as a V2 ``CustomerInput``."""
    given = {k: v for k, v in buyer.items() if v not in (None, "")}
    customer: dict[str, Any] = {}
    if "buyer_name" in given:
        customer["name"] = {"full": str(given["buyer_name"])}
    if "buyer_email" in given:
        customer["email"] = str(given["buyer_email"])
    if "buyer_tel" in given:
        customer["phoneNumber"] = str(given["buyer_tel"])
    if "buyer_addr" in given:
        customer["address"] = {"addressLine1": str(given["buyer_addr"]), "addressLine2": ""}
    if "buyer_postcode" in given:
        customer["zipcode"] = str(given["buyer_postcode"])
    return customer


def payment_of(data: Any) -> Payment:
    """A V2 ``Payment`` as an api_types.Payment; ShapeError when it is not one."""
    if not isinstance(data, dict):
        raise ShapeError(f"payment is {type(data).__name__}, not an object")
    for name in ("id", "status"):
        if not isinstance(data.get(name), str) or not data[name]:
            raise ShapeError(f"payment has no {name}")
    amount = data.get("amount")
    total = amount.get("total") if isinstance(amount, dict) else None
    if not isinstance(total, int) or isinstance(total, bool):
        raise ShapeError("payment has no integer amount.total")
    cancelled = amount.get("cancelled") or 0
    if not isinstance(cancelled, int) or isinstance(cancelled, bool):
        raise ShapeError("payment.amount.cancelled is not an integer")
    failure = data.get("failure") if isinstance(data.get("failure"), dict) else {}
    channel = data.get("channel") if isinstance(data.get("channel"), dict) else {}
    transaction = data.get("transactionId")
    v1 = data.get("version") == "V1" and isinstance(transaction, str) and transaction
    succeeded = [c for c in _cancellations(data) if c.get("status") == "SUCCEEDED"]
    return Payment(
        imp_uid=transaction if v1 else data["id"],  # type: ignore[arg-type]
        merchant_uid=data["id"],
        amount=total,
        cancel_amount=cancelled,
        currency=_str(data.get("currency")) or "KRW",
        status=STATUSES.get(data["status"], data["status"].lower()),
        customer_uid=_str(data.get("billingKey")),
        name=_str(data.get("orderName")),
        fail_reason=_str(failure.get("pgMessage")) or _str(failure.get("reason")),
        cancel_reason=_str(succeeded[-1].get("reason")) if succeeded else None,
        pg_provider=_str(channel.get("pgProvider")),
        pg_tid=_str(data.get("pgTxId")),
        receipt_url=_str(data.get("receiptUrl")),
        started_at=_unix(data.get("requestedAt")),
        paid_at=_unix(data.get("paidAt")),
        failed_at=_unix(data.get("failedAt")),
        cancelled_at=_unix(data.get("cancelledAt")),
        custom_data=_str(data.get("customData")),
    )


def cancel_history(data: Any) -> list[CancelEntry]:
    """The payment's SUCCEEDED cancellations (what refunds settle from)."""
    entries = []
    for item in _cancellations(data):
        if item.get("status") != "SUCCEEDED":
            continue
        total = item.get("totalAmount")
        if not isinstance(total, int) or isinstance(total, bool):
            raise ShapeError("a cancellation has no integer totalAmount")
        entries.append(CancelEntry(total, _str(item.get("reason")) or ""))
    return entries


def _cancellations(data: dict[str, Any]) -> list[dict[str, Any]]:
    items = data.get("cancellations")
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ShapeError("payment.cancellations is not a list of objects")
    return items


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _unix(value: Any) -> int:
    """An RFC 3339 date-time as unix seconds (0 when absent)."""
    if not isinstance(value, str) or not value:
        return 0
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ShapeError(f"{value[:40]!r} is not an RFC 3339 date-time") from None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


def _rfc3339(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
