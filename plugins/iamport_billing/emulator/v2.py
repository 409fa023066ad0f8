"""FastAPI app emulating the PortOne V2 endpoints a billing backend uses (``--api v2``).

Same store, test cards, charge rules, faults and admin as V1: a V2 paymentId is a payment row's
merchant_uid, its transactionId the row's imp_uid, a billing key a ``customers`` row. What is
V2's own: ``Authorization: PortOne <secret>``, errors as ``{type, message}`` with the spec's
statuses (a decline is 502 PG_PROVIDER), Idempotency-Key on POST/DELETE, signed webhooks.

Idempotency-Key must be an RFC 8941 string (``"..."``) of 16-256 characters; anything else is
400 INVALID_REQUEST, as is a key reused for another request (method, path or body differ). The
key is claimed before the latency fault and any hold, so a retry meets it in flight (409
IDEMPOTENCY_OUTSTANDING_REQUEST); an answer from the API (not a 401, not an emulated 429/5xx)
is recorded and replayed as it was for ``IDEMPOTENCY_WINDOW_S`` of the emulator's clock.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import uuid
from datetime import datetime
from typing import Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Scope, Send

from iamport_billing.emulator import webhooks
from iamport_billing.emulator.config import DECLINE_PG_CODES, EmulatorConfig, card_digits
from iamport_billing.emulator.core import (
    ADMIN_PREFIX,
    DROP,
    Admission,
    Dialect,
    EmulatorApp,
    EmulatorState,
    add_admin_routes,
    add_receipt_route,
)
from iamport_billing.emulator.rules import apply_cancel, build_payment
from iamport_billing.emulator.store import CancelRefused, Store, customer_row, new_imp_uid
from iamport_billing.emulator.webhooks import WebhookSender, iso, webhook_body

MERCHANT_ID = "merchant-00000000-0000-0000-0000-000000000000"
CHANNEL_KEY = "channel-key-emulator"
# One paymentId admits this many attempts (failed ones count); then MAX_TRANSACTION_COUNT_REACHED.
MAX_ATTEMPTS_PER_PAYMENT = 5
IDEMPOTENCY_WINDOW_S = 3 * 3600
IDEMPOTENT_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# RFC 8941 sf-string: printable ASCII, with " and \ escaped by a backslash.
SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
KEY_LENGTHS = range(16, 257)
DEFAULT_WINDOW_S = 90 * 86400
DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 1000
# PgProvider of V1's pg_provider names (the spec's enum); others answer as NICE_V2.
PG_PROVIDERS = {"nice": "NICE_V2", "kcp": "KCP_V2", "inicis": "INICIS_V2", "kicc": "KICC_V2"}
MSG_UNAUTHORIZED = "Authorization: PortOne <API secret> 헤더가 올바르지 않습니다."

V2_DIALECT = Dialect(
    error_body=lambda status, message: {
        "type": "TOO_MANY_REQUESTS" if status == 429 else "INTERNAL_SERVER_ERROR",
        "message": message,
    },
    lookup_prefixes=("/payments/", "/payments-by-cursor", "/billing-keys/"),
    payment_lookup_prefixes=("/payments/", "/payments-by-cursor"),
    charge_route="POST /payments/{payment_id}/billing-key",
)


class V2Error(Exception):
    """An answer in V2's error shape: ``{type, message, ...}`` with the spec's status."""

    def __init__(self, status: int, type_: str, message: str, **extra: str) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.extra = status, type_, message, extra

    def response(self) -> Response:
        return error_response(self.status, self.type, self.message, **self.extra)


def error_response(status: int, type_: str, message: str, **extra: str) -> Response:
    return JSONResponse({"type": type_, "message": message, **extra}, status)


def invalid(message: str) -> V2Error:
    return V2Error(400, "INVALID_REQUEST", message)


# -- Idempotency-Key ----------------------------------------------------------------------------


def parse_idempotency_key(header: str) -> str:
    """The key inside an RFC 8941 string of 16-256 characters; V2Error(400) otherwise."""
    m = SF_STRING.fullmatch(header.strip())
    key = re.sub(r"\\(.)", r"\1", m.group(1)) if m else ""
    if not m or len(key) not in KEY_LENGTHS:
        raise invalid(
            "Idempotency-Key must be an RFC 8941 string (in double quotes) of 16-256 characters"
        )
    return key


class IdempotentAdmission(Admission):
    """A request holding an Idempotency-Key: records the API's answer, else frees the key."""

    def __init__(self, store: Store, key: str) -> None:
        self.store, self.key = store, key
        self.recorded = False
        self.status = 0
        self.content_type = "application/json"
        self.chunks: list[bytes] = []

    def wrap(self, send: Send) -> Send:
        async def recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                headers = dict(message.get("headers", []))
                self.content_type = headers.get(b"content-type", b"").decode() or "text/plain"
            elif message["type"] == "http.response.body":
                self.chunks.append(message.get("body", b""))
                if not message.get("more_body") and self.status != 401:
                    await run_in_threadpool(
                        self.store.record_idempotent_answer,
                        self.key, self.status, self.content_type, b"".join(self.chunks),
                    )  # fmt: skip
                    self.recorded = True
            await send(message)

        return recording

    async def close(self) -> None:
        if not self.recorded:
            await run_in_threadpool(self.store.release_idempotency_key, self.key)


class V2App(EmulatorApp):
    """The fault layer plus Idempotency-Key, which must see a request before its latency."""

    in_flight: dict[str, dict[str, Any]]  # paymentId -> the READY payment being charged

    async def admit(self, scope: Scope, body: bytes, send: Send) -> Admission | None:
        header = dict(scope["headers"]).get(b"idempotency-key")
        if header is None or scope["method"] not in IDEMPOTENT_METHODS:
            return Admission()
        em = self.emulator
        try:
            key = parse_idempotency_key(header.decode("latin-1"))
        except V2Error as e:
            await e.response()(scope, _no_body, send)
            return None
        target = f"{scope['method']} {scope['path']}?{scope['query_string'].decode()}"
        fingerprint = hashlib.sha256(target.encode() + b"\n" + body).hexdigest()
        outcome, row = await run_in_threadpool(
            em.store.claim_idempotency_key, key, fingerprint, em.config.now(),
            IDEMPOTENCY_WINDOW_S,
        )  # fmt: skip
        em.count("idempotency", outcome)
        if outcome == "claimed":
            return IdempotentAdmission(em.store, key)
        if outcome == "replay":
            assert row is not None
            reply = Response(row["body"], row["status"], media_type=row["content_type"])
        elif outcome == "outstanding":
            reply = error_response(
                409, "IDEMPOTENCY_OUTSTANDING_REQUEST",
                "같은 Idempotency-Key의 요청이 아직 처리 중입니다. 잠시 후 다시 시도하세요.",
            )  # fmt: skip
        else:
            reply = invalid("Idempotency-Key was already used for a different request").response()
        await reply(scope, _no_body, send)
        return None


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


# -- request parsing ----------------------------------------------------------------------------


async def read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise invalid("요청 본문을 해석할 수 없습니다. (invalid JSON)") from None
    if not isinstance(data, dict):
        raise invalid("요청 본문은 JSON 객체여야 합니다.")
    return data


def _string(data: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise invalid(f"{name} is required")
        return None
    if not isinstance(value, str) or (required and not value):
        raise invalid(f"{name} must be a non-empty string")
    return value


def _integer(data: dict[str, Any], name: str, *, minimum: int = 0) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise invalid(f"{name} must be an integer >= {minimum}")
    return value


def _object(data: dict[str, Any], name: str, *, required: bool = False) -> dict[str, Any]:
    value = data.get(name)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{name} must be an object")
    return value


def _customer_input(body: dict[str, Any]) -> dict[str, str | None]:
    """CustomerInput -> the store's customer_* / buyer_* words."""
    customer = _object(body, "customer")
    name = _object(customer, "name")
    return {
        "id": _string(customer, "id"),
        "name": _string(name, "full"),
        "email": _string(customer, "email"),
        "tel": _string(customer, "phoneNumber"),
        "zipcode": _string(customer, "zipcode"),
    }


def _time(value: Any, name: str) -> int:
    if not isinstance(value, str):
        raise invalid(f"{name} must be an RFC 3339 date-time")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise invalid(f"{name} must be an RFC 3339 date-time") from None
    if moment.tzinfo is None:
        raise invalid(f"{name} needs a time zone")
    return int(moment.timestamp())


# -- response shapes ----------------------------------------------------------------------------


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI 3.0 fields here are not nullable: an unknown one is left out."""
    return {k: v for k, v in data.items() if v is not None}


def channel_json(pg_provider: str | None, pg_id: str | None) -> dict[str, Any]:
    return {
        "type": "TEST",
        "id": "channel-emulator",
        "key": CHANNEL_KEY,
        "name": "emulator",
        "pgProvider": PG_PROVIDERS.get(pg_provider or "", "NICE_V2"),
        "pgMerchantId": pg_id or "",
    }


def card_json(row: dict[str, Any]) -> dict[str, Any]:
    number = row["card_number"] or ""
    return _drop_none(
        {
            "issuer": row["card_code"],
            "name": row["card_name"],
            "number": number,
            "bin": card_digits(number)[:6] or None,
        }
    )


def billing_key_json(row: dict[str, Any], config: EmulatorConfig) -> dict[str, Any]:
    """IssuedBillingKeyInfo, or DeletedBillingKeyInfo when ``deleted_at`` is set."""
    info = {
        "status": "DELETED" if row.get("deleted_at") else "ISSUED",
        "billingKey": row["customer_uid"],
        "merchantId": MERCHANT_ID,
        "storeId": config.store_id,
        "methods": [{"type": "BillingKeyPaymentMethodCard", "card": card_json(row)}],
        "channels": [channel_json(row["pg_provider"], row["pg_id"])],
        "customer": _drop_none(
            {
                "id": row["customer_id"],
                "name": row["customer_name"],
                "email": row["customer_email"],
                "phoneNumber": row["customer_tel"],
                "zipcode": row["customer_postcode"],
            }
        ),
        "requestedAt": iso(row["inserted"]),
        "issuedAt": iso(row["inserted"]),
    }
    if row.get("deleted_at"):
        info["deletedAt"] = iso(row["deleted_at"])
    return info


def payment_status(p: dict[str, Any]) -> str:
    if p["status"] == "cancelled":
        return "CANCELLED" if p["cancel_amount"] >= p["amount"] else "PARTIAL_CANCELLED"
    return p["status"].upper()


def cancellation_json(entry: dict[str, Any]) -> dict[str, Any]:
    """SucceededPaymentCancellation of a V1 cancel_history entry."""
    amount = int(entry["amount"])
    return {
        "status": "SUCCEEDED",
        "id": entry["cancellation_id"],
        "pgCancellationId": entry["pg_tid"],
        "totalAmount": amount,
        "taxFreeAmount": 0,
        "vatAmount": amount // 11,
        "reason": entry["reason"],
        "cancelledAt": iso(entry["cancelled_at"]),
        "requestedAt": iso(entry["cancelled_at"]),
        "receiptUrl": entry["receipt_url"],
        "trigger": "API",
    }


def payment_json(p: dict[str, Any], config: EmulatorConfig) -> dict[str, Any]:
    """The spec's Payment union member for a payment row (V1's or V2's)."""
    status = payment_status(p)
    amount, cancelled = int(p["amount"]), int(p["cancel_amount"])
    tax_free = int(p["request"].get("tax_free") or 0)
    changed = {
        "PAID": p["paid_at"],
        "FAILED": p["failed_at"],
        "CANCELLED": p["cancelled_at"],
        "PARTIAL_CANCELLED": p["cancelled_at"],
    }.get(status, p["started_at"])
    card = {
        "type": "PaymentMethodCard",
        "card": card_json(p),
        "installment": {"month": p["card_quota"], "isInterestFree": False},
    }
    if p["apply_num"]:
        card["approvalNumber"] = p["apply_num"]
    out: dict[str, Any] = {
        "status": status,
        "id": p["merchant_uid"],
        "transactionId": p["imp_uid"],
        "merchantId": MERCHANT_ID,
        "storeId": config.store_id,
        "method": card,
        "channel": channel_json(p["pg_provider"], p["pg_id"]),
        "version": "V2",
        "requestedAt": iso(p["started_at"]),
        "updatedAt": iso(p["updated_at"]),
        "statusChangedAt": iso(changed),
        "orderName": p["name"] or "",
        "amount": {
            "total": amount,
            "taxFree": tax_free,
            "vat": (amount - tax_free) // 11,
            "supply": amount - tax_free - (amount - tax_free) // 11,
            "discount": 0,
            "paid": amount if status != "FAILED" and status != "READY" else 0,
            "cancelled": cancelled,
            "cancelledTaxFree": 0,
        },
        "currency": p["currency"],
        "customer": _drop_none(
            {
                "name": p["buyer_name"],
                "email": p["buyer_email"],
                "phoneNumber": p["buyer_tel"],
                "zipcode": p["buyer_postcode"],
            }
        ),
        "origin": {"platformType": "API", "ipAddress": "127.0.0.1"},
        "customData": p["custom_data"],
    }
    if p["customer_uid"]:
        out["billingKey"] = p["customer_uid"]
    if status == "FAILED":
        reason = p["fail_reason"] or ""
        out["failedAt"] = iso(p["failed_at"])
        out["failure"] = {
            "reason": reason,
            "pgCode": DECLINE_PG_CODES.get(reason, "99"),
            "pgMessage": reason,
        }
    if status in ("PAID", "CANCELLED", "PARTIAL_CANCELLED"):
        out["paidAt"] = iso(p["paid_at"])
        out["pgTxId"] = p["pg_tid"]
        out["receiptUrl"] = p["receipt_url"]
        out["cancellations"] = [cancellation_json(h) for h in p["cancel_history"]]
    if status == "PAID":
        out["disputes"] = []
    if status in ("CANCELLED", "PARTIAL_CANCELLED"):
        out["cancelledAt"] = iso(p["cancelled_at"])
    return _drop_none(out)


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode()


def _decode_cursor(cursor: str) -> int:
    try:
        kind, _, seq = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        if kind == "seq":
            return int(seq)
    except ValueError:
        pass
    raise invalid("cursor is not one this API gave")


# -- the app ------------------------------------------------------------------------------------


def create_v2_app(config: EmulatorConfig, store: Store | None = None) -> V2App:
    """Build the V2 emulator app; it opens ``config.db_path`` unless a Store is given."""
    app = V2App(title="PortOne V2 emulator", docs_url=None, redoc_url=None, openapi_url=None)
    em = EmulatorState(config, store or Store(config.db_path))
    app.emulator = em
    app.dialect = V2_DIALECT
    app.in_flight = {}
    db = em.store
    db.forget_unfinished_idempotency_keys()
    if config.webhook_url and config.webhook_secret:
        em.webhooks = WebhookSender(db, config.webhook_url, config.webhook_secret, em.count)

    async def publish(type_: str, p: dict[str, Any], **extra: str) -> None:
        """Queue a webhook for a change that has committed (never on the request path)."""
        if em.webhooks is None:
            return
        now = config.now()
        body = webhook_body(type_, now, p["merchant_uid"], config.store_id, p["imp_uid"], **extra)
        await run_in_threadpool(em.webhooks.publish, type_, p["merchant_uid"], body, int(now))

    @app.exception_handler(V2Error)
    async def _v2_error(request: Request, exc: V2Error) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "NOT_FOUND" if exc.status_code == 404 else "INVALID_REQUEST"
        return error_response(exc.status_code, kind, str(exc.detail))

    async def authorized(request: Request) -> None:
        scheme, _, secret = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "portone" or not secrets.compare_digest(
            secret.strip().encode(), config.api_secret.encode()
        ):
            raise V2Error(401, "UNAUTHORIZED", MSG_UNAUTHORIZED)

    auth = [Depends(authorized)]

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    # -- billing keys

    @app.post("/billing-keys", dependencies=auth)
    async def issue_billing_key(request: Request) -> Response:
        body = await read_json(request)
        method = _object(body, "method", required=True)
        credential = _object(_object(method, "card", required=True), "credential", required=True)
        number = _string(credential, "number", required=True) or ""
        year = _string(credential, "expiryYear", required=True) or ""
        month = _string(credential, "expiryMonth", required=True) or ""
        if not number.isdigit() or not 13 <= len(number) <= 19:
            raise invalid("card number must be 13-19 digits")
        if not (re.fullmatch(r"\d{2}", year) and re.fullmatch(r"0[1-9]|1[0-2]", month)):
            raise invalid("expiryYear and expiryMonth must be two digits each")
        customer = _customer_input(body)
        billing_key = f"billing-key-{uuid.uuid4()}"
        row = customer_row(
            billing_key, number, int(config.now()),
            customer_id=customer["id"], customer_name=customer["name"],
            customer_email=customer["email"], customer_tel=customer["tel"],
            customer_postcode=customer["zipcode"], channel_key=_string(body, "channelKey"),
        )  # fmt: skip
        await run_in_threadpool(db.save_customers, [row])
        info = billing_key_json(row, config)
        summary = {k: info[k] for k in ("billingKey", "channels", "issuedAt")}
        return JSONResponse({"billingKeyInfo": summary})

    @app.get("/billing-keys/{billing_key}", dependencies=auth)
    async def get_billing_key(billing_key: str) -> Response:
        row = await run_in_threadpool(db.get_customer, billing_key)
        if row is None:
            row = await run_in_threadpool(db.get_deleted_billing_key, billing_key)
        if row is None:
            raise V2Error(404, "BILLING_KEY_NOT_FOUND", "빌링키가 존재하지 않습니다.")
        return JSONResponse(billing_key_json(row, config))

    @app.delete("/billing-keys/{billing_key}", dependencies=auth)
    async def delete_billing_key(billing_key: str) -> Response:
        row = await run_in_threadpool(db.delete_billing_key, billing_key, int(config.now()))
        if row is None:
            if await run_in_threadpool(db.get_deleted_billing_key, billing_key):
                raise V2Error(409, "BILLING_KEY_ALREADY_DELETED", "이미 삭제된 빌링키입니다.")
            raise V2Error(404, "BILLING_KEY_NOT_FOUND", "빌링키가 존재하지 않습니다.")
        return JSONResponse({"deletedAt": iso(row["deleted_at"])})

    # -- charges

    def parse_charge(payment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """BillingKeyPaymentInput -> the shared charge words (``rules.build_payment``)."""
        amount = _object(body, "amount", required=True)
        total = _integer(amount, "total", minimum=1)
        if total is None:
            raise invalid("amount.total is required")
        tax_free = _integer(amount, "taxFree")
        if (tax_free or 0) > total:
            raise invalid("amount.taxFree must not exceed amount.total")
        currency = _string(body, "currency", required=True) or ""
        if not re.fullmatch(r"[A-Z]{3}", currency):
            raise invalid("currency must be an ISO 4217 code")
        skip = body.get("skipWebhook")
        if skip is not None and not isinstance(skip, bool):
            raise invalid("skipWebhook must be a boolean")
        customer = _customer_input(body)
        return {
            "customer_uid": _string(body, "billingKey", required=True),
            "merchant_uid": payment_id,
            "name": _string(body, "orderName", required=True),
            "amount": total,
            "currency": currency,
            "tax_free": tax_free,
            "vat": _integer(amount, "vat"),
            "card_quota": _integer(body, "installmentMonth") or 0,
            "custom_data": _string(body, "customData"),
            "channel_key": _string(body, "channelKey"),
            "buyer_name": customer["name"],
            "buyer_email": customer["email"],
            "buyer_tel": customer["tel"],
            "buyer_addr": None,
            "buyer_postcode": customer["zipcode"],
            "skip_webhook": bool(skip),
        }

    @app.post("/payments/{payment_id}/billing-key", dependencies=auth)
    async def pay_with_billing_key(payment_id: str, request: Request) -> Response:
        try:
            charge = parse_charge(payment_id, await read_json(request))
        except V2Error:
            em.count("charges", "invalid")
            raise
        billing_key = charge["customer_uid"]
        base = base_url(request)
        transaction_id = new_imp_uid()

        def build(customer: dict[str, Any], imp_uid: str, ready: bool = False) -> dict[str, Any]:
            return build_payment(
                charge, customer, imp_uid, base, ready=ready or config.charge_status_ready,
                amount_multiplier=config.paid_amount_multiplier, now=int(config.now()),
            )  # fmt: skip

        customer = await run_in_threadpool(db.get_customer, billing_key)
        if customer is not None:  # seen as READY while the request is on its way
            app.in_flight[payment_id] = build(customer, transaction_id, ready=True)
        try:
            await em.held_in_the_network(payment_id, billing_key)
            outcome, payment = await run_in_threadpool(
                db.charge, billing_key, payment_id, build, MAX_ATTEMPTS_PER_PAYMENT,
                transaction_id,
            )  # fmt: skip
        finally:
            app.in_flight.pop(payment_id, None)
        em.count("charges", outcome)
        if outcome == "unknown_customer":
            if await run_in_threadpool(db.get_deleted_billing_key, billing_key):
                raise V2Error(409, "BILLING_KEY_ALREADY_DELETED", "이미 삭제된 빌링키입니다.")
            raise V2Error(404, "BILLING_KEY_NOT_FOUND", "빌링키가 존재하지 않습니다.")
        if outcome == "duplicate":
            raise V2Error(409, "ALREADY_PAID", "이미 결제가 완료된 paymentId입니다.")
        if outcome == "max_attempts":
            raise V2Error(
                400, "MAX_TRANSACTION_COUNT_REACHED",
                f"paymentId 하나의 결제 시도 한도({MAX_ATTEMPTS_PER_PAYMENT}회)를 넘었습니다.",
            )  # fmt: skip
        assert payment is not None
        if config.drop_after_commit_rate and em.rng.random() < config.drop_after_commit_rate:
            em.count("faults", "drop_after_commit")
            request.scope["state"][DROP] = True
        if payment["status"] == "paid":
            if not charge["skip_webhook"]:
                await publish(webhooks.PAID, payment)
            return JSONResponse(
                {"payment": {"pgTxId": payment["pg_tid"], "paidAt": iso(payment["paid_at"])}}
            )
        if payment["status"] == "failed":
            await publish(webhooks.FAILED, payment)
            reason = payment["fail_reason"] or ""
            raise V2Error(
                502, "PG_PROVIDER", reason, pgCode=DECLINE_PG_CODES.get(reason, "99"),
                pgMessage=reason,
            )  # fmt: skip
        em.count("faults", "charge_status_ready")
        raise V2Error(
            502, "PG_PROVIDER", "PG사 응답 지연 (emulated): the payment stays READY",
            pgCode="TIMEOUT", pgMessage="PG사 응답 지연",
        )  # fmt: skip

    # -- lookups

    @app.get("/payments/{payment_id}", dependencies=auth)
    async def get_payment(payment_id: str) -> Response:
        payment = app.in_flight.get(payment_id) or await run_in_threadpool(
            db.find_payment, payment_id, None, "-started"
        )
        if payment is None:
            raise V2Error(404, "PAYMENT_NOT_FOUND", "결제 건이 존재하지 않습니다.")
        return JSONResponse(payment_json(payment, config))

    @app.get("/payments-by-cursor", dependencies=auth)
    async def payments_by_cursor(request: Request) -> Response:
        """Query ``requestBody`` (JSON), a JSON body, or plain query parameters."""
        raw = request.query_params.get("requestBody")
        if raw is not None:
            try:
                params = json.loads(raw)
            except ValueError:
                raise invalid("requestBody is not JSON") from None
            if not isinstance(params, dict):
                raise invalid("requestBody must be a JSON object")
        else:
            params = await read_json(request) or dict(request.query_params)
        if isinstance(params.get("size"), str) and params["size"].isdigit():
            params["size"] = int(params["size"])
        size = _integer(params, "size", minimum=1) or DEFAULT_PAGE_SIZE
        if size > MAX_PAGE_SIZE:
            raise invalid(f"size must be at most {MAX_PAGE_SIZE}")
        # [from, until): by default up to now, this second included
        until = _time(params["until"], "until") if params.get("until") else int(config.now()) + 1
        since = _time(params["from"], "from") if params.get("from") else until - DEFAULT_WINDOW_S
        cursor = _string(params, "cursor")
        after = _decode_cursor(cursor) if cursor else 0
        rows = await run_in_threadpool(db.payments_by_cursor, since, until, after, size)
        items = [{"payment": payment_json(p, config), "cursor": _encode_cursor(s)} for s, p in rows]
        return JSONResponse({"items": items})

    # -- refunds

    @app.post("/payments/{payment_id}/cancel", dependencies=auth)
    async def cancel_payment(payment_id: str, request: Request) -> Response:
        body = await read_json(request)
        reason = _string(body, "reason", required=True)
        amount = _integer(body, "amount", minimum=1)
        checksum = _integer(body, "currentCancellableAmount")
        base = base_url(request)
        try:
            payment = await run_in_threadpool(
                db.cancel, None, payment_id,
                lambda p: apply_cancel(p, amount, checksum, reason, base, int(config.now())),
            )  # fmt: skip
        except CancelRefused as e:
            raise await cancel_error(payment_id, e) from None
        cancelled = payment_status(payment)
        entry = payment["cancel_history"][-1]
        type_ = webhooks.CANCELLED if cancelled == "CANCELLED" else webhooks.PARTIAL_CANCELLED
        await publish(type_, payment, cancellationId=entry["cancellation_id"])
        if config.drop_cancel_reply:
            em.count("faults", "drop_cancel_reply")
            request.scope["state"][DROP] = True
        return JSONResponse({"cancellation": cancellation_json(entry)})

    async def cancel_error(payment_id: str, e: CancelRefused) -> V2Error:
        kind = e.kind
        if kind == CancelRefused.NOT_FOUND and await run_in_threadpool(
            db.find_payment, payment_id, None, "-started"
        ):
            kind = CancelRefused.NOT_PAID  # attempts exist, none paid
        errors: dict[str, tuple[int, str]] = {
            CancelRefused.NOT_FOUND: (404, "PAYMENT_NOT_FOUND"),
            CancelRefused.NOT_PAID: (409, "PAYMENT_NOT_PAID"),
            CancelRefused.ALREADY_CANCELLED: (409, "PAYMENT_ALREADY_CANCELLED"),
            CancelRefused.CHECKSUM: (409, "CANCELLABLE_AMOUNT_CONSISTENCY_BROKEN"),
            CancelRefused.EXCEEDS: (409, "CANCEL_AMOUNT_EXCEEDS_CANCELLABLE_AMOUNT"),
        }
        status, type_ = errors[kind]
        return V2Error(status, type_, str(e))

    # -- admin: webhooks (the rest is shared with V1)

    if config.admin_enabled:

        @app.get(ADMIN_PREFIX + "/webhooks")
        async def list_webhooks() -> dict[str, Any]:
            """Every webhook recorded, oldest first, with its tries and last receiver status."""
            return {"webhooks": await run_in_threadpool(db.webhooks)}

        @app.post(ADMIN_PREFIX + "/webhooks/{webhook_id}/redeliver")
        async def redeliver(webhook_id: str) -> Response:
            """Send a recorded webhook again: same webhook-id, same body, a new signature."""
            if em.webhooks is None:
                return JSONResponse({"error": "no --webhook-url configured"}, 409)
            if await run_in_threadpool(db.get_webhook, webhook_id) is None:
                return JSONResponse({"error": "no such webhook"}, 404)
            em.webhooks.redeliver(webhook_id)
            return JSONResponse({"redelivering": webhook_id})

    add_receipt_route(app)
    add_admin_routes(app)
    return app
