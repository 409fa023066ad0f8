"""The webhook receiver: a FastAPI app Airflow mounts under ``/billing-hooks`` (see plugin.py).

Not behind Airflow's login (a gateway cannot log in). ``POST /portone`` takes PortOne V2
webhooks (Standard Webhooks, signature verified, 5-minute tolerance, deduplicated by
``webhook-id``); ``POST /iamport`` takes Iamport V1 webhooks (unsigned: only ever a reason to
look the payment up). Either way the answer is one lookup of one payment and, if the ledger
holds that charge unsettled, its settlement (``settle.settle_hint``); nothing is charged,
refunded or resent.

Answers: 2xx when the event is handled or ignored; 401 unverified; 400 malformed; 413 too
large; 409 while another handler has the same event; 503 when the gateway could not be asked
or the secrets are not configured (the event is not marked done, so PortOne redelivers it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from iamport_billing.config import BillingConfig
from iamport_billing.gateways import gateway_for
from iamport_billing.gateways.base import Gateway, GatewayUnavailable
from iamport_billing.warehouse.ledger import Ledger, lease_cutoff, new_claim_token
from iamport_billing.warehouse.webhook_events import BUSY, DONE, WebhookEvents
from iamport_billing.webhooks.settle import needs_lookup, settle_hint
from iamport_billing.webhooks.signature import verified, webhook_secrets

log = logging.getLogger(__name__)

URL_PREFIX = "/billing-hooks"
MAX_BODY_BYTES = 64 * 1024  # PortOne's and Iamport's bodies are a few hundred bytes
MAX_ID_LENGTH = 64  # merchant_uid and webhook-id: the ledger's key length
# A handler that died mid-lookup holds its event this long; then a redelivery takes it over.
CLAIM_LEASE = timedelta(minutes=2)
# An unsigned V1 webhook buys at most one lookup of its merchant_uid per this long.
V1_COOLDOWN = timedelta(seconds=60)
TRANSACTION_EVENT = "Transaction."  # V2 event types about a payment

LedgerFactory = Callable[[BillingConfig], Ledger]
GatewayFactory = Callable[[BillingConfig], Gateway]


def default_ledger(cfg: BillingConfig) -> Ledger:
    return Ledger.from_conn_id(cfg.warehouse_conn_id)


def default_gateway(cfg: BillingConfig) -> Gateway:
    return gateway_for(cfg.iamport_conn_id)


def _answer(status: int, **body: Any) -> JSONResponse:
    return JSONResponse(body, status_code=status)


async def _body(request: Request) -> bytes:
    """The request body, refused (413) past ``MAX_BODY_BYTES`` before more is read."""
    declared = request.headers.get("content-length", "")
    if declared and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise HTTPException(413, "body too large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, "body too large")
    return bytes(body)


def _iamport_fields(body: bytes, content_type: str) -> dict[str, Any]:
    """imp_uid / merchant_uid / status of a V1 webhook, sent as JSON or as a form."""
    if content_type.startswith("application/json"):
        data = json.loads(body)
        return data if isinstance(data, dict) else {}
    form = parse_qs(body.decode(), max_num_fields=20)
    return {k: v[0] for k, v in form.items()}


def _id(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH else None


def create_app(
    ledger_factory: LedgerFactory = default_ledger,
    gateway_factory: GatewayFactory = default_gateway,
) -> FastAPI:
    app = FastAPI(title="Billing webhooks", docs_url=None, redoc_url=None, openapi_url=None)
    schema_ready: set[str] = set()

    def open_ledger(cfg: BillingConfig) -> Ledger:
        ledger = ledger_factory(cfg)
        if cfg.warehouse_conn_id not in schema_ready:
            ledger.init_schema()
            schema_ready.add(cfg.warehouse_conn_id)
        return ledger

    def handle(
        cfg: BillingConfig, event_key: str, merchant_uid: str, *, signed: bool
    ) -> JSONResponse:
        """Settle ``merchant_uid`` under the claim of ``event_key``: one handler at a time.
        A signed event stays done (a redelivery does nothing); an unsigned one is done for
        ``V1_COOLDOWN`` after its lookup (a flood buys one lookup per cool-down)."""
        from iamport_billing.tasks import charge_settings

        with open_ledger(cfg) as ledger:
            if not needs_lookup(ledger.get_attempt(merchant_uid)):
                # Not ours, or already settled: the reconcile compares settled rows.
                return _answer(200, result="nothing_to_settle")
            events = WebhookEvents(ledger)
            token = new_claim_token()
            stale_before = lease_cutoff(CLAIM_LEASE.total_seconds())
            reopen = None if signed else lease_cutoff(V1_COOLDOWN.total_seconds())
            claimed = events.claim(event_key, token, stale_before=stale_before,
                                   reopen_before=reopen)  # fmt: skip
            if claimed == DONE:
                return _answer(200, result="duplicate" if signed else "looked_up_recently")
            if claimed == BUSY and not signed:
                return _answer(200, result="lookup_in_flight")  # that lookup answers this one
            if claimed == BUSY:
                return _answer(409, detail="this event is being handled; deliver it later")
            try:
                gateway = gateway_factory(cfg)
                try:
                    result = settle_hint(gateway, ledger, merchant_uid, charge_settings(cfg))
                finally:
                    gateway.close()
            except GatewayUnavailable as e:
                events.release(event_key, token)
                log.warning("webhook %s: %s", event_key, e)
                return _answer(503, detail="the gateway could not be asked; deliver it again")
            except BaseException:
                events.release(event_key, token)
                raise
            events.finish(event_key, token, result)
            log.info("webhook %s for %s: %s", event_key, merchant_uid, result)
            return _answer(200, result=result)

    @app.post("/portone")
    async def portone(request: Request) -> JSONResponse:
        """A PortOne V2 webhook (2024-04-25): {type, timestamp, data: {paymentId, ...}}."""
        body = await _body(request)
        cfg = BillingConfig.from_env()
        secrets = await run_in_threadpool(webhook_secrets, cfg.portone_webhook_conn_id)
        if not secrets:
            log.error("PortOne webhook refused: connection %r has no secret",
                      cfg.portone_webhook_conn_id)  # fmt: skip
            return _answer(503, detail="webhook secrets are not configured")
        if not verified(body, request.headers, secrets):
            return _answer(401, detail="signature not verified")
        webhook_id = request.headers["webhook-id"]
        try:
            event = json.loads(body)
        except ValueError:
            return _answer(400, detail="body is not JSON")
        kind = event.get("type") if isinstance(event, dict) else None
        if not isinstance(kind, str) or len(webhook_id) > MAX_ID_LENGTH:
            return _answer(400, detail="not a PortOne webhook")
        if not kind.startswith(TRANSACTION_EVENT):
            log.info("PortOne webhook %s of type %r ignored", webhook_id, kind[:64])
            return _answer(200, result="ignored")
        data = event.get("data")
        payment_id = _id(data.get("paymentId") if isinstance(data, dict) else None)
        if payment_id is None:
            return _answer(400, detail="data.paymentId is missing or too long")
        return await run_in_threadpool(
            handle, cfg, f"portone:{webhook_id}", payment_id, signed=True
        )

    @app.post("/iamport")
    async def iamport(request: Request) -> JSONResponse:
        """An Iamport V1 webhook (imp_uid, merchant_uid, status): a reason to look, no more."""
        body = await _body(request)
        try:
            fields = _iamport_fields(body, request.headers.get("content-type", ""))
        except ValueError:
            return _answer(400, detail="body is neither JSON nor a form")
        merchant_uid = _id(fields.get("merchant_uid"))
        if merchant_uid is None:
            return _answer(400, detail="merchant_uid is missing or too long")
        cfg = BillingConfig.from_env()
        # One lookup per merchant_uid per cool-down, however many deliveries arrive.
        return await run_in_threadpool(
            handle, cfg, f"iamport:{merchant_uid}", merchant_uid, signed=False
        )

    return app
