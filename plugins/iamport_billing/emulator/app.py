"""FastAPI app emulating the Iamport (PortOne V1) endpoints this project uses, with faults.

The fault layer and the admin endpoints are shared with V2 (``core``), the charge and cancel
rules too (``rules``). Foreign and hostile switches (see ``config.SWITCH_FIELDS``) imitate what
stands in front of, or goes wrong inside, a real gateway: a proxy's 404 on lookups, a
wrong-shaped findAll, a cancel whose answer is lost, a getToken that fails or hands out an
expired token, a server refusing the Bearer header style, charges stuck in 'ready' or paid with
another amount.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from iamport_billing.emulator.config import EmulatorConfig, card_digits
from iamport_billing.emulator.core import (
    DROP,
    Dialect,
    EmulatorApp,
    EmulatorState,
    add_admin_routes,
    add_receipt_route,
    html_error_page,
    phrase,
)
from iamport_billing.emulator.rules import (
    apply_cancel,
    build_payment,
    num,
)
from iamport_billing.emulator.store import SORTINGS, CancelRefused, Store, customer_row

MSG_BAD_CREDENTIALS = "imp_key, imp_secret 인증에 실패하였습니다."
MSG_UNAUTHORIZED = "Unauthorized"
MSG_CUSTOMER_NOT_FOUND = "요청하신 customer_uid({})로 등록된 정보를 찾을 수 없습니다."
MSG_UNKNOWN_BUYER = "등록되지 않은 구매자입니다."
MSG_DUPLICATE = (
    "이미 주문이 이루어진 건입니다. (동일한 merchant_uid로 결제 또는 취소된 기록이 있습니다)"
)
MSG_PAYMENT_NOT_FOUND = "존재하지 않는 결제정보입니다."
MSG_BAD_STATUS = "지원되지 않는 상태값입니다."
MSG_INVALID_CARD = "유효하지않은 카드번호를 입력하셨습니다."

PAYMENT_STATUSES = ("ready", "paid", "cancelled", "failed")
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
DEFAULT_WINDOW_S = 90 * 86400

# Spec maxLength of request strings that end up in responses.
STRING_LIMITS = {
    "customer_uid": 80, "merchant_uid": 40, "name": 40, "buyer_name": 16, "buyer_email": 64,
    "buyer_tel": 16, "buyer_addr": 128, "buyer_postcode": 8, "channel_key": 55,
    "customer_name": 20, "customer_tel": 20, "customer_email": 200, "customer_addr": 200,
    "customer_postcode": 8,
}  # fmt: skip
CHARGE_REQUIRED = ("customer_uid", "merchant_uid", "amount", "name")
CHARGE_OPTIONAL_STRINGS = (
    "currency", "buyer_name", "buyer_email", "buyer_tel", "buyer_addr", "buyer_postcode",
    "notice_url", "browser_ip", "product_type", "cash_receipt_type", "bypass", "promotion_id",
    "channel_key",
)  # fmt: skip
CHARGE_OPTIONAL_NUMBERS = ("tax_free", "vat_amount", "vat")
CUSTOMER_FIELDS = (
    "customer_name", "customer_tel", "customer_email", "customer_addr", "customer_postcode",
    "customer_id", "channel_key", "pg",
)  # fmt: skip
V1_DIALECT = Dialect(
    error_body=lambda status, message: {"code": -1, "message": message, "response": None},
    lookup_prefixes=("/payments/", "/subscribe/customers"),
    payment_lookup_prefixes=("/payments/",),
    charge_route="POST /subscribe/payments/again",
)


class ApiError(Exception):
    """An early answer in the V1 envelope: ``{code, message, response: null}``."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def envelope(
    response: Any, status: int = 200, code: int = 0, message: str | None = None
) -> Response:
    return JSONResponse({"code": code, "message": message, "response": response}, status)


# -- request parsing --------------------------------------------------------------------------


async def read_body(request: Request) -> dict[str, Any]:
    """JSON or form body (both are accepted by every V1 POST); form brackets become nesting."""
    raw = await request.body()
    if not raw.strip():
        return {}
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return _form_to_dict(parse_qsl(raw.decode(), keep_blank_values=True))
    try:
        data = json.loads(raw)
    except ValueError:
        raise ApiError(400, -1, "요청 본문을 해석할 수 없습니다. (invalid JSON)") from None
    if not isinstance(data, dict):
        raise ApiError(400, -1, "요청 본문은 JSON 객체여야 합니다.")
    return data


_BRACKET = re.compile(r"^([^\[\]]+)\[([^\[\]]*)\]$")


def _form_to_dict(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        m = _BRACKET.match(key)
        if not m:
            data[key] = value
        elif m.group(2) == "":
            data.setdefault(m.group(1), []).append(value)
        else:
            data.setdefault(m.group(1), {})[m.group(2)] = value
    return data


def _string(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise ApiError(200, 1, f"{name} 파라미터가 누락되었습니다.")
        return None
    if not isinstance(value, str):
        raise ApiError(200, 1, f"{name} 파라미터는 문자열이어야 합니다.")
    limit = STRING_LIMITS.get(name)
    if limit is not None and len(value) > limit:
        raise ApiError(200, 1, f"{name}은(는) 최대 {limit}자까지 허용됩니다.")
    return value


def _number(body: dict[str, Any], name: str, *, positive: bool = False) -> int | float | None:
    value = body.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ApiError(200, 1, f"{name} 파라미터는 숫자여야 합니다.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ApiError(200, 1, f"{name} 파라미터는 숫자여야 합니다.") from None
    if not math.isfinite(number) or number < 0 or (positive and number <= 0):
        raise ApiError(200, 1, f"{name} 파라미터의 값이 올바르지 않습니다. ({value})")
    return num(number)


def _query_int(request: Request, name: str, default: int, minimum: int = 1) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, 1, f"{name} 파라미터가 올바르지 않습니다.") from None
    if value < minimum:
        raise ApiError(400, 1, f"{name} 파라미터가 올바르지 않습니다.")
    return value


def _paging(request: Request) -> tuple[int, int, str]:
    page = _query_int(request, "page", 1)
    limit = min(_query_int(request, "limit", DEFAULT_LIMIT), MAX_LIMIT)
    return page, limit, _sorting(request)


def _sorting(request: Request) -> str:
    sorting = request.query_params.get("sorting") or "-started"
    if sorting not in SORTINGS:
        raise ApiError(400, 1, f"지원되지 않는 정렬값입니다. ({sorting})")
    return sorting


def _check_status(status: str | None, allowed: tuple[str, ...]) -> None:
    if status is not None and status not in allowed:
        raise ApiError(400, 1, MSG_BAD_STATUS)


# -- response shapes ---------------------------------------------------------------------------


def customer_json(row: dict[str, Any]) -> dict[str, Any]:
    """CustomerAnnotation: every spec field, nulls where this PG would not report one."""
    return {
        "customer_uid": row["customer_uid"],
        "pg_provider": row["pg_provider"],
        "pg_id": row["pg_id"],
        "sandbox": False,
        "customer_id": row["customer_id"],
        "card_name": row["card_name"],
        "card_code": row["card_code"],
        "card_issuer_code": None,
        "card_issuer_name": None,
        "card_publisher_code": None,
        "card_publisher_name": None,
        "card_number": row["card_number"],
        "card_type": row["card_type"],
        "customer_name": row["customer_name"],
        "customer_tel": row["customer_tel"],
        "customer_email": row["customer_email"],
        "customer_addr": row["customer_addr"],
        "customer_postcode": row["customer_postcode"],
        "inserted": row["inserted"],
        "updated": row["updated"],
    }


def payment_json(p: dict[str, Any]) -> dict[str, Any]:
    """PaymentAnnotation with every spec field, as the real API sends them."""
    history = p["cancel_history"]
    return {
        "imp_uid": p["imp_uid"],
        "merchant_uid": p["merchant_uid"],
        "pay_method": p["pay_method"],
        "channel": p["channel"],
        "pg_provider": p["pg_provider"],
        "emb_pg_provider": None,
        "pg_tid": p["pg_tid"],
        "pg_id": p["pg_id"],
        "sandbox": False,
        "escrow": False,
        "apply_num": p["apply_num"],
        "bank_code": None,
        "bank_name": None,
        "card_code": p["card_code"],
        "card_name": p["card_name"],
        "card_issuer_code": None,
        "card_issuer_name": None,
        "card_publisher_code": None,
        "card_publisher_name": None,
        "card_quota": p["card_quota"],
        "card_number": p["card_number"],
        "card_type": p["card_type"],
        "vbank_code": None,
        "vbank_name": None,
        "vbank_num": None,
        "vbank_holder": None,
        "vbank_date": 0,
        "vbank_issued_at": 0,
        "name": p["name"],
        "amount": num(p["amount"]),
        "cancel_amount": num(p["cancel_amount"]),
        "currency": p["currency"],
        "buyer_name": p["buyer_name"],
        "buyer_email": p["buyer_email"],
        "buyer_tel": p["buyer_tel"],
        "buyer_addr": p["buyer_addr"],
        "buyer_postcode": p["buyer_postcode"],
        "custom_data": p["custom_data"],
        "user_agent": "sorry_not_supported_anymore",
        "status": p["status"],
        "started_at": p["started_at"],
        "paid_at": p["paid_at"],
        "failed_at": p["failed_at"],
        "cancelled_at": p["cancelled_at"],
        "fail_reason": p["fail_reason"],
        "cancel_reason": p["cancel_reason"],
        "receipt_url": p["receipt_url"],
        "cancel_history": history,
        "cancel_receipt_urls": [h["receipt_url"] for h in history],
        "deposit_history": [],
        "cash_receipt_issued": False,
        "customer_uid": p["customer_uid"],
        "customer_uid_usage": p["customer_uid_usage"],
        "promotion": None,
    }


def page_json(total: int, page: int, limit: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "total": total,
        "previous": page - 1 if page > 1 else 0,
        "next": page + 1 if page * limit < total else 0,
        "list": [payment_json(p) for p in rows],
    }


def receipt_base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


# -- charge and cancel rules -------------------------------------------------------------------


def parse_charge(body: dict[str, Any]) -> dict[str, Any]:
    """Validate an ``again`` body; raises ApiError (HTTP 200, code 1) before anything is charged."""
    charge: dict[str, Any] = {
        "customer_uid": _string(body, "customer_uid", required=True),
        "merchant_uid": _string(body, "merchant_uid", required=True),
        "name": _string(body, "name", required=True),
        "amount": _number(body, "amount", positive=True),
    }
    if charge["amount"] is None:
        raise ApiError(200, 1, "amount 파라미터가 누락되었습니다.")
    for name in CHARGE_OPTIONAL_STRINGS:
        charge[name] = _string(body, name)
    for name in CHARGE_OPTIONAL_NUMBERS:
        charge[name] = _number(body, name)
    if (charge["tax_free"] or 0) > charge["amount"]:
        raise ApiError(200, 1, "tax_free는 amount보다 클 수 없습니다.")
    quota = _number(body, "card_quota")
    if quota is not None and not isinstance(quota, int):
        raise ApiError(200, 1, "card_quota 파라미터는 정수여야 합니다.")
    charge["card_quota"] = quota or 0
    custom = body.get("custom_data")
    if custom is not None and not isinstance(custom, str):
        custom = json.dumps(custom, ensure_ascii=False)
    charge["custom_data"] = custom
    charge["extra"] = body.get("extra")
    charge["product_count"] = body.get("product_count")
    charge["interest_free_by_merchant"] = body.get("interest_free_by_merchant")
    charge["use_card_point"] = body.get("use_card_point")
    return charge


# -- the app ------------------------------------------------------------------------------------


def create_v1_app(config: EmulatorConfig, store: Store | None = None) -> EmulatorApp:
    """Build the V1 emulator app; it opens ``config.db_path`` unless a Store is given."""
    app = EmulatorApp(title="Iamport V1 emulator", docs_url=None, redoc_url=None, openapi_url=None)
    em = EmulatorState(config, store or Store(config.db_path))
    app.emulator = em
    app.dialect = V1_DIALECT
    db = em.store

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return envelope(None, exc.status, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return envelope(None, exc.status_code, -1, str(exc.detail))

    async def authorized(request: Request) -> None:
        """Accept ``Authorization: Bearer <token>`` and the raw token (both exist in the wild);
        with ``bearer_refused`` only the raw token."""
        value = request.headers.get("authorization", "").strip()
        if value[:7].lower() == "bearer ":
            if config.bearer_refused:
                em.count("faults", "bearer_refused")
                raise ApiError(401, -1, MSG_UNAUTHORIZED)
            value = value[7:].strip()
        if not value or not db.token_valid(value, config.now()):
            raise ApiError(401, -1, MSG_UNAUTHORIZED)

    auth = [Depends(authorized)]

    @app.post("/users/getToken")
    async def get_token(request: Request) -> Response:
        if config.token_status:
            em.count("faults", "token_status")
            status = config.token_status
            if status >= 500:
                return HTMLResponse(html_error_page(status), status)
            if status in (401, 403):
                return envelope(None, status, -1, MSG_BAD_CREDENTIALS)
            return envelope(None, status, -1, f"{phrase(status)} (emulated)")
        body = await read_body(request)
        key, secret = str(body.get("imp_key") or ""), str(body.get("imp_secret") or "")
        if not (
            secrets.compare_digest(key.encode(), config.imp_key.encode())
            and secrets.compare_digest(secret.encode(), config.imp_secret.encode())
        ):
            raise ApiError(401, -1, MSG_BAD_CREDENTIALS)
        now = int(config.now())
        token, expired_at, action = await run_in_threadpool(
            db.issue_token, key, now, config.token_ttl_s, config.extend_window_s,
            config.extend_by_s,
        )  # fmt: skip
        em.count("tokens", action)
        if config.token_already_expired:
            # The reply misreports the expiry; the token itself stays valid for its TTL.
            em.count("faults", "token_already_expired")
            expired_at = now
        return envelope({"access_token": token, "now": now, "expired_at": expired_at})

    # -- billing keys

    @app.post("/subscribe/customers/{customer_uid}", dependencies=auth)
    async def register_customer(customer_uid: str, request: Request) -> Response:
        body = await read_body(request)
        _string({"customer_uid": customer_uid}, "customer_uid", required=True)
        card_number = _string(body, "card_number", required=True) or ""
        expiry = _string(body, "expiry", required=True) or ""
        if not 13 <= len(card_digits(card_number)) <= 19:
            raise ApiError(200, -1, MSG_INVALID_CARD)
        if not re.fullmatch(r"\d{4}-?\d{2}", expiry):
            raise ApiError(200, -1, "카드 유효기간(expiry)은 YYYY-MM 형식이어야 합니다.")
        fields = {name: _string(body, name) for name in CUSTOMER_FIELDS}
        row = customer_row(customer_uid, card_number, int(config.now()), **fields)
        await run_in_threadpool(db.save_customers, [row])
        saved = await run_in_threadpool(db.get_customer, customer_uid)
        return envelope(customer_json(saved or row))

    @app.get("/subscribe/customers/{customer_uid}", dependencies=auth)
    async def get_customer(customer_uid: str) -> Response:
        row = await run_in_threadpool(db.get_customer, customer_uid)
        if row is None:
            raise ApiError(404, 1, MSG_CUSTOMER_NOT_FOUND.format(customer_uid))
        return envelope(customer_json(row))

    @app.delete("/subscribe/customers/{customer_uid}", dependencies=auth)
    async def delete_customer(customer_uid: str) -> Response:
        row = await run_in_threadpool(db.delete_customer, customer_uid)
        if row is None:
            raise ApiError(404, 1, MSG_CUSTOMER_NOT_FOUND.format(customer_uid))
        return envelope(customer_json(row))

    @app.get("/subscribe/customers", dependencies=auth)
    async def get_customers(request: Request) -> Response:
        """200 when all are found, 207 when some are, 404 when none are."""
        wanted = request.query_params.getlist("customer_uid[]")
        if not wanted:
            raise ApiError(400, 1, "customer_uid[] 파라미터가 누락되었습니다.")
        rows = await run_in_threadpool(db.get_customers, wanted)
        if not rows:
            raise ApiError(404, 1, MSG_CUSTOMER_NOT_FOUND.format(", ".join(wanted)))
        status = 200 if len(rows) == len(set(wanted)) else 207
        return envelope([customer_json(r) for r in rows], status)

    # -- charges

    @app.post("/subscribe/payments/again", dependencies=auth)
    async def charge_again(request: Request) -> Response:
        try:
            charge = parse_charge(await read_body(request))
        except ApiError:
            em.count("charges", "invalid")
            raise
        await em.held_in_the_network(charge["merchant_uid"], charge["customer_uid"])
        base = receipt_base(request)
        outcome, payment = await run_in_threadpool(
            db.charge,
            charge["customer_uid"],
            charge["merchant_uid"],
            lambda customer, imp_uid: build_payment(
                charge, customer, imp_uid, base, ready=config.charge_status_ready,
                amount_multiplier=config.paid_amount_multiplier, now=int(config.now()),
            ),
        )  # fmt: skip
        em.count("charges", outcome)
        if outcome == "unknown_customer":
            raise ApiError(200, 1, MSG_UNKNOWN_BUYER)
        if outcome == "duplicate":
            raise ApiError(200, 1, MSG_DUPLICATE)
        assert payment is not None
        rate = config.drop_after_commit_rate
        if rate and em.rng.random() < rate:
            em.count("faults", "drop_after_commit")
            request.scope["state"][DROP] = True
        return envelope(payment_json(payment))

    # -- lookups

    @app.get("/payments/find/{merchant_uid}", dependencies=auth)
    @app.get("/payments/find/{merchant_uid}/{payment_status}", dependencies=auth)
    async def find_payment(
        merchant_uid: str, request: Request, payment_status: str | None = None
    ) -> Response:
        _check_status(payment_status, PAYMENT_STATUSES)
        sorting = _sorting(request)
        payment = await run_in_threadpool(db.find_payment, merchant_uid, payment_status, sorting)
        if payment is None:
            raise ApiError(404, 1, MSG_PAYMENT_NOT_FOUND)
        return envelope(payment_json(payment))

    @app.get("/payments/findAll/{merchant_uid}", dependencies=auth)
    @app.get("/payments/findAll/{merchant_uid}/{payment_status}", dependencies=auth)
    async def find_all_payments(
        merchant_uid: str, request: Request, payment_status: str | None = None
    ) -> Response:
        _check_status(payment_status, PAYMENT_STATUSES)
        page, limit, sorting = _paging(request)
        total, rows = await run_in_threadpool(
            db.page_by_merchant, merchant_uid, payment_status, sorting, page, limit
        )
        if total == 0:
            raise ApiError(404, 1, MSG_PAYMENT_NOT_FOUND)
        if config.findall_bare_list:
            em.count("faults", "findall_bare_list")
            _, everything = await run_in_threadpool(
                db.page_by_merchant, merchant_uid, payment_status, sorting, 1, total
            )
            return envelope([payment_json(p) for p in everything])
        return envelope(page_json(total, page, limit, rows))

    @app.get("/payments/status/{payment_status}", dependencies=auth)
    async def payments_by_status(payment_status: str, request: Request) -> Response:
        _check_status(payment_status, ("all", *PAYMENT_STATUSES))
        page, limit, sorting = _paging(request)
        until = _query_int(request, "to", int(config.now()), minimum=0)
        since = _query_int(request, "from", until - DEFAULT_WINDOW_S, minimum=0)
        if since > until or until - since > DEFAULT_WINDOW_S:
            raise ApiError(400, 1, "조회기간(from ~ to)은 최대 90일입니다.")
        total, rows = await run_in_threadpool(
            db.page_by_status, payment_status, since, until, sorting, page, limit
        )
        if page > 1 and (page - 1) * limit >= total:
            raise ApiError(400, 1, "데이터 범위를 넘어선 page입니다.")
        return envelope(page_json(total, page, limit, rows))

    @app.post("/payments/cancel", dependencies=auth)
    async def cancel_payment(request: Request) -> Response:
        body = await read_body(request)
        imp_uid = _string(body, "imp_uid")
        merchant_uid = _string(body, "merchant_uid")
        if not imp_uid and not merchant_uid:
            raise ApiError(200, 1, "imp_uid 또는 merchant_uid를 지정해주셔야합니다.")
        amount = _number(body, "amount")
        checksum = _number(body, "checksum")
        reason = _string(body, "reason")
        base = receipt_base(request)
        try:
            payment = await run_in_threadpool(
                db.cancel,
                imp_uid,
                merchant_uid,
                lambda p: apply_cancel(p, amount, checksum, reason, base, int(config.now())),
            )
        except CancelRefused as e:
            raise ApiError(200, 1, str(e)) from None
        if config.drop_cancel_reply:
            em.count("faults", "drop_cancel_reply")
            request.scope["state"][DROP] = True
        return envelope(payment_json(payment))

    @app.get("/payments/{imp_uid}", dependencies=auth)
    async def get_payment(imp_uid: str) -> Response:
        payment = await run_in_threadpool(db.get_payment, imp_uid)
        if payment is None:
            raise ApiError(404, 1, MSG_PAYMENT_NOT_FOUND)
        return envelope(payment_json(payment))

    add_receipt_route(app)
    add_admin_routes(app)
    return app
