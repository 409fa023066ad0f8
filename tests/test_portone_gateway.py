"""The PortOne V2 gateway through the gateway interface, against a spec-shaped loopback server:
status and body per route, a reply dropped after the request was read, a slow reply, and the
Idempotency-Key headers it saw."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from iamport_billing import api_types as api
from iamport_billing.gateways import gateway_for
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
    CredentialsRefused,
    GatewayUnavailable,
    PaymentAbsent,
    RefundOutcomeUnknown,
    RefundRefused,
)
from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
from iamport_billing.gateways.portone_v2 import PortOneV2Gateway
from iamport_billing.hooks.portone import PortOneHook, settings_from_connection

# The one DAG test here checks the gateway, not the ledger: SQLite is enough.
WAREHOUSES = ["sqlite"]
SECRET = "portone-v2-secret-DO-NOT-LEAK-1234567890"
CONN_ID = "portone_test"
UID = "sub1-20261201-01"
BILLING_KEY = "billing-key-abc"


@dataclass
class Act:
    """One answer: a status and body, or a dropped reply, optionally after a delay."""

    status: int = 200
    body: Any = None
    content_type: str = "application/json"
    drop: bool = False
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


class V2Server:
    """Routes ``(method, raw path)`` to answers, consumed in order (the last one repeats)."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Act]] = {}
        self.seen: list[Seen] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                server.seen.append(
                    Seen(
                        self.command, parts.path, parse_qs(parts.query), dict(self.headers),
                        json.loads(raw) if raw else None,
                    )
                )  # fmt: skip
                acts = server.routes.get((self.command, parts.path))
                act = (acts.pop(0) if len(acts) > 1 else acts[0]) if acts else None
                if act is None:
                    act = Act(404, "<html><body>404 Not Found nginx</body></html>", "text/html")
                if act.delay:
                    time.sleep(act.delay)
                if act.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = act.body if isinstance(act.body, str) else json.dumps(act.body)
                data = body.encode() if act.body is not None else b""
                self.send_response(act.status)
                self.send_header("Content-Type", act.content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in act.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def on(self, method: str, path: str, *acts: Act) -> None:
        self.routes[(method, path)] = list(acts)

    def requests(self, method: str, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path == path]

    def keys(self, method: str, path: str) -> list[str | None]:
        return [s.headers.get("Idempotency-Key") for s in self.requests(method, path)]


def error(status: int, type_: str, message: str = "", **extra: Any) -> Act:
    return Act(status, {"type": type_, "message": message or type_.lower(), **extra})


def v2_payment(
    payment_id: str = UID, status: str = "PAID", total: int = 9900, **over: Any
) -> dict[str, Any]:
    """A spec-shaped V2 Payment (the required fields of its status's variant)."""
    doc: dict[str, Any] = {
        "status": status, "id": payment_id, "transactionId": f"tx-{payment_id}",
        "merchantId": "merchant-1", "storeId": "store-1", "version": "V2",
        "requestedAt": "2026-12-01T00:00:05Z", "updatedAt": "2026-12-01T00:00:07Z",
        "statusChangedAt": "2026-12-01T00:00:07Z", "orderName": "Monthly plan",
        "amount": {"total": total, "taxFree": 0, "discount": 0, "paid": total, "cancelled": 0,
                   "cancelledTaxFree": 0},
        "currency": "KRW", "customer": {}, "billingKey": BILLING_KEY,
        "channel": {"type": "LIVE", "pgProvider": "NICEPAY_V2", "pgMerchantId": "nice-1"},
        "origin": {"type": "API"},
    }  # fmt: skip
    if status in ("PAID", "PARTIAL_CANCELLED", "CANCELLED"):
        doc |= {"paidAt": "2026-12-01T00:00:07Z", "pgTxId": "pg-tx-1", "disputes": []}
    if status == "FAILED":
        failure = {"reason": "declined", "pgCode": "51", "pgMessage": "잔액 부족"}
        doc |= {"failedAt": "2026-12-01T00:00:07Z", "failure": failure}
    return doc | over


def cancellation(total: int, reason: str, status: str = "SUCCEEDED") -> dict[str, Any]:
    return {
        "status": status, "id": f"c-{total}-{len(reason)}", "totalAmount": total,
        "taxFreeAmount": 0, "vatAmount": 0, "reason": reason,
        "requestedAt": "2026-12-02T00:00:00Z", "cancelledAt": "2026-12-02T00:00:01Z",
    }  # fmt: skip


@pytest.fixture
def server(monkeypatch):
    s = V2Server()
    threading.Thread(target=s.httpd.serve_forever, args=(0.05,), daemon=True).start()
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", _conn_json(s.url))
    monkeypatch.setattr("iamport_billing.hooks.portone.OUTSTANDING_WAIT_S", 0.05)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _conn_json(url: str, **extra: Any) -> str:
    return json.dumps(
        {
            "conn_type": "portone",
            "host": url,
            "password": SECRET,
            "extra": {
                "store_id": "store-1",
                "channel_key": "channel-1",
                "read_timeout": 0.5,
                "connect_timeout": 1,
                "max_retries": 2,
                **extra,
            },
        }  # fmt: skip
    )


@pytest.fixture
def gateway(server):
    g = gateway_for(CONN_ID)
    yield g
    g.close()


def charge_path(uid: str = UID) -> str:
    return f"/payments/{uid}/billing-key"


def request(uid: str = UID, **over: Any) -> ChargeRequest:
    return ChargeRequest(
        **{
            "merchant_uid": uid,
            "customer_uid": BILLING_KEY,
            "amount": 9900,
            "name": "Monthly plan",
            **over,
        }  # fmt: skip
    )


# -- choosing the gateway, the connection ------------------------------------------------------


def test_gateway_for_picks_v2_for_a_portone_connection_and_v1_otherwise(server, monkeypatch):
    assert isinstance(gateway_for(CONN_ID), PortOneV2Gateway)
    monkeypatch.setenv(
        "AIRFLOW_CONN_IAMPORT_OTHER",
        json.dumps({"conn_type": "iamport", "host": server.url, "login": "k", "password": "s"}),
    )
    assert isinstance(gateway_for("iamport_other"), IamportV1Gateway)


def test_connection_defaults_read_timeout_60s_and_refuses_remote_plain_http():
    from airflow.sdk import Connection

    s = settings_from_connection(Connection(conn_id="x", conn_type="portone", password="p"))
    assert (s.base_url, s.read_timeout, s.verify_tls) == ("https://api.portone.io", 60.0, True)
    remote = Connection(conn_id="x", conn_type="portone", host="http://pay.example", password="p")
    with pytest.raises(ValueError, match="plain http"):
        settings_from_connection(remote)


def test_provider_declares_the_portone_connection_form():
    from iamport_billing.provider_info import get_provider_info

    types = {t["connection-type"]: t for t in get_provider_info()["connection-types"]}
    portone = types["portone"]
    assert portone["hook-class-name"] == "iamport_billing.hooks.portone.PortOneHook"
    fields = portone["conn-fields"]
    assert {"store_id", "channel_key", "read_timeout", "verify_tls"} <= fields.keys()
    assert fields["read_timeout"]["schema"]["default"] >= 60


def test_the_test_button_reads_with_the_secret(server):
    server.on("GET", "/payments-by-cursor", Act(200, {"items": []}))
    ok, message = PortOneHook(CONN_ID).test_connection()
    assert ok, message
    seen = server.requests("GET", "/payments-by-cursor")[0]
    assert seen.headers["Authorization"] == f"PortOne {SECRET}"


def test_the_test_button_says_the_secret_was_refused(server):
    server.on("GET", "/payments-by-cursor", error(401, "UNAUTHORIZED", "bad secret"))
    ok, message = PortOneHook(CONN_ID).test_connection()
    assert not ok and "secret was refused" in message
    assert SECRET not in message


# -- charges ----------------------------------------------------------------------------------


def test_a_200_charge_is_paid_with_the_record_and_sends_the_v2_request(server, gateway):
    server.on("POST", charge_path(), Act(200, {"payment": {"pgTxId": "pg-1", "paidAt": "x"}}))
    server.on("GET", f"/payments/{UID}", Act(200, v2_payment(total=9900)))
    buyer = {"buyer_name": "Kim", "buyer_email": "k@example.com", "buyer_tel": ""}
    result = gateway.charge(request(buyer=buyer))
    assert result.kind == PAID
    assert (result.payment.imp_uid, result.payment.amount) == (UID, 9900)
    assert result.payment.paid_at == 1796083207
    sent = server.requests("POST", charge_path())[0]
    assert sent.body == {
        "billingKey": BILLING_KEY, "orderName": "Monthly plan", "amount": {"total": 9900},
        "currency": "KRW", "channelKey": "channel-1", "storeId": "store-1",
        "customer": {"name": {"full": "Kim"}, "email": "k@example.com"},
    }  # fmt: skip
    assert sent.headers["Authorization"] == f"PortOne {SECRET}"
    assert sent.headers["Idempotency-Key"] == f'"charge-{UID}"'


def test_a_200_charge_whose_record_cannot_be_read_is_paid_from_the_reply(server, gateway):
    summary = {"pgTxId": "pg-1", "paidAt": "2026-12-01T00:00:07Z"}
    server.on("POST", charge_path(), Act(200, {"payment": summary}))
    server.on("GET", f"/payments/{UID}", Act(503, "<html>busy</html>", "text/html"))
    result = gateway.charge(request())
    assert result.kind == PAID
    assert (result.payment.status, result.payment.amount, result.payment.pg_tid) == (
        api.PAID, 9900, "pg-1",
    )  # fmt: skip


def test_a_200_charge_with_an_odd_paid_at_and_no_record_is_still_paid(server, gateway):
    server.on("POST", charge_path(), Act(200, {"payment": {"pgTxId": "p", "paidAt": "soon"}}))
    server.on("GET", f"/payments/{UID}", Act(404, "<html>x</html>", "text/html"))
    result = gateway.charge(request())
    assert (result.kind, result.payment.paid_at) == (PAID, 0)


def test_a_paid_record_of_another_amount_is_reported_as_it_is(server, gateway):
    server.on("POST", charge_path(), Act(200, {"payment": {"pgTxId": "p", "paidAt": "x"}}))
    server.on("GET", f"/payments/{UID}", Act(200, v2_payment(total=5000)))
    assert gateway.charge(request()).payment.amount == 5000


def test_the_payment_id_is_url_escaped(server, gateway):
    uid = "sub/1 x-20261201-01"
    server.on("POST", "/payments/sub%2F1%20x-20261201-01/billing-key",
              error(409, "BILLING_KEY_ALREADY_DELETED"))  # fmt: skip
    assert gateway.charge(request(uid)).kind == NO_BILLING_KEY


def test_a_pg_decline_is_declined_with_pg_code_and_message(server, gateway):
    server.on("POST", charge_path(), error(502, "PG_PROVIDER", pgCode="51", pgMessage="잔액 부족"))
    server.on("GET", f"/payments/{UID}", Act(200, v2_payment(status="FAILED")))
    result = gateway.charge(request())
    assert (result.kind, result.code, result.reason) == (DECLINED, "51", "잔액 부족")
    assert result.payment.status == api.FAILED and result.payment.fail_reason == "잔액 부족"
    assert len(server.requests("POST", charge_path())) == 1  # an answer: never resent


def test_a_pg_error_whose_payment_is_still_in_progress_is_unknown(server, gateway):
    server.on("POST", charge_path(), error(502, "PG_PROVIDER", pgCode="TIMEOUT", pgMessage="지연"))
    server.on("GET", f"/payments/{UID}", Act(200, v2_payment(status="READY")))
    assert gateway.charge(request()).kind == UNKNOWN


def test_a_pg_error_whose_record_cannot_be_read_is_unknown_not_declined(server, gateway):
    server.on("POST", charge_path(), error(502, "PG_PROVIDER", pgCode="51", pgMessage="잔액 부족"))
    server.on("GET", f"/payments/{UID}", Act(502, "<html>bad gateway</html>", "text/html"))
    result = gateway.charge(request())
    assert (result.kind, result.code) == (UNKNOWN, "pg_provider_unconfirmed")


def test_a_missing_billing_key_answered_to_a_resend_stands_when_portone_has_no_payment(
    server, gateway
):
    """A resend (the first reply lost) told BILLING_KEY_NOT_FOUND, and PortOne's own word that
    it has no payment under the id: no billing key, not an unknown that is resent for ever."""
    server.on("POST", charge_path(), Act(drop=True), error(404, "BILLING_KEY_NOT_FOUND"))
    server.on("GET", f"/payments/{UID}", error(404, "PAYMENT_NOT_FOUND"))
    assert gateway.charge(request()).kind == NO_BILLING_KEY


def test_the_pg_code_reaches_the_decline_table(server, gateway):
    """A decline table that names PortOne's pgCode as hard makes that decline hard."""
    from datetime import date

    from iamport_billing.charging import ChargeSettings, PlannedCharge, outcome_from_result
    from iamport_billing.policy import ChargeCandidate, DeclineTable

    server.on("POST", charge_path(), error(502, "PG_PROVIDER", pgCode="14", pgMessage="거절"))
    server.on("GET", f"/payments/{UID}", Act(200, v2_payment(status="FAILED")))
    planned = PlannedCharge(ChargeCandidate("s1", "key-s1", 9900, date(2026, 11, 26)), 1, UID)
    by_code = ChargeSettings(decline_table=DeclineTable(hard_codes=("14",)))
    result = gateway.charge(request())
    assert outcome_from_result(result, planned, by_code, 5).decline_kind == "hard"
    assert outcome_from_result(result, planned, ChargeSettings(), 5).decline_kind == "soft"


@pytest.mark.parametrize(
    "status, type_", [(404, "BILLING_KEY_NOT_FOUND"), (409, "BILLING_KEY_ALREADY_DELETED")]
)
def test_a_missing_or_deleted_billing_key_is_no_billing_key(server, gateway, status, type_):
    server.on("POST", charge_path(), error(status, type_))
    assert gateway.charge(request()).kind == NO_BILLING_KEY


def test_already_paid_reports_what_the_record_says(server, gateway):
    server.on("POST", charge_path(), error(409, "ALREADY_PAID"))
    server.on("GET", f"/payments/{UID}", Act(200, v2_payment()))
    result = gateway.charge(request())
    assert result.kind == PAID and result.payment.merchant_uid == UID


def test_already_paid_without_a_readable_record_is_unknown(server, gateway):
    server.on("POST", charge_path(), error(409, "ALREADY_PAID"))
    server.on("GET", f"/payments/{UID}", error(404, "PAYMENT_NOT_FOUND"))
    assert gateway.charge(request()).kind == UNKNOWN


def test_max_transaction_count_is_refused(server, gateway):
    server.on("POST", charge_path(), error(400, "MAX_TRANSACTION_COUNT_REACHED"))
    assert gateway.charge(request()).kind == REFUSED


def test_an_invalid_request_is_refused_on_a_first_send_and_unknown_on_a_resend(server, gateway):
    server.on("POST", charge_path(), error(400, "INVALID_REQUEST", "bad orderName"))
    server.on("GET", f"/payments/{UID}", error(404, "PAYMENT_NOT_FOUND"))
    assert gateway.charge(request()).kind == REFUSED
    assert gateway.charge(request(resend=True)).kind == UNKNOWN


def test_a_refusal_after_a_resend_is_unknown(server, gateway):
    server.on("POST", charge_path(), Act(drop=True), error(400, "INVALID_REQUEST"))
    server.on("GET", f"/payments/{UID}", error(404, "PAYMENT_NOT_FOUND"))
    assert gateway.charge(request()).kind == UNKNOWN


@pytest.mark.parametrize("refusal", [error(401, "UNAUTHORIZED"), Act(429, {"type": "X"})])
def test_a_refused_or_rate_limited_resend_is_unknown(server, gateway, refusal):
    server.on("POST", charge_path(), Act(drop=True), refusal)
    assert gateway.charge(request()).kind == UNKNOWN


def test_a_refused_secret_raises_credentials_refused(server, gateway):
    server.on("POST", charge_path(), error(401, "UNAUTHORIZED"))
    with pytest.raises(CredentialsRefused):
        gateway.charge(request())


def test_a_429_is_rate_limited(server, gateway):
    server.on("POST", charge_path(), Act(429, {"type": "TOO_MANY"}, headers={"Retry-After": "3"}))
    result = gateway.charge(request())
    assert (result.kind, result.retry_after) == (RATE_LIMITED, 3.0)


def test_a_4xx_not_in_portones_shape_is_a_foreign_reply(server, gateway):
    server.on("POST", charge_path(), Act(404, "<html>Not Found</html>", "text/html"))
    result = gateway.charge(request())
    assert (result.kind, result.code) == (UNKNOWN, FOREIGN_REPLY)


def test_an_unexpected_error_type_is_unknown(server, gateway):
    server.on("POST", charge_path(), error(409, "SOMETHING_NEW"))
    assert gateway.charge(request()).kind == UNKNOWN


def test_a_dropped_reply_is_resent_with_the_same_key(server, gateway):
    server.on("POST", charge_path(), Act(drop=True),
              Act(200, {"payment": {"pgTxId": "p", "paidAt": "x"}}))  # fmt: skip
    server.on("GET", f"/payments/{UID}", Act(200, v2_payment()))
    assert gateway.charge(request()).kind == PAID
    keys = server.keys("POST", charge_path())
    assert keys == [f'"charge-{UID}"'] * 2


def test_a_charge_that_never_answers_is_unknown_after_bounded_resends(server, gateway):
    server.on("POST", charge_path(), Act(delay=1.0))
    result = gateway.charge(request())
    assert result.kind == UNKNOWN  # never NOT_SENT: the bytes left
    keys = server.keys("POST", charge_path())
    assert len(keys) == 3 and len(set(keys)) == 1  # 1 + max_retries, one key


def test_a_charge_sends_nothing_more_once_its_time_budget_is_spent(server, monkeypatch):
    """Many resends allowed, but none after the budget: the charge ends (unknown) long before
    the ledger's pending lease would let another try take the row over."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_PORTONE_TEST", _conn_json(server.url, max_retries=20, exchange_budget_s=1.2)
    )
    server.on("POST", charge_path(), Act(delay=1.0))
    started = time.monotonic()
    result = PortOneV2Gateway.from_conn_id("portone_test").charge(request())
    assert result.kind == UNKNOWN
    assert len(server.keys("POST", charge_path())) <= 3
    assert time.monotonic() - started < 5


def test_an_outstanding_request_is_waited_out_with_the_same_key(server, gateway):
    outstanding = error(409, "IDEMPOTENCY_OUTSTANDING_REQUEST")
    server.on("POST", charge_path(), outstanding,
              Act(200, {"payment": {"pgTxId": "p", "paidAt": "x"}}))  # fmt: skip
    server.on("GET", f"/payments/{UID}", Act(200, v2_payment()))
    assert gateway.charge(request()).kind == PAID
    assert len(set(server.keys("POST", charge_path()))) == 1


def test_an_outstanding_request_that_never_finishes_is_unknown(server, gateway):
    server.on("POST", charge_path(), error(409, "IDEMPOTENCY_OUTSTANDING_REQUEST"))
    assert gateway.charge(request()).kind == UNKNOWN
    assert len(server.requests("POST", charge_path())) == 3


def test_a_server_that_cannot_be_reached_is_not_sent(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", _conn_json(f"http://127.0.0.1:{port}"))
    assert gateway_for(CONN_ID).charge(request()).kind == NOT_SENT


def test_idempotency_keys_fit_the_header_and_are_stable(server, gateway):
    long_uid = "x" * 300
    odd_uid = 'sub "q"-20261201-01'
    for uid in (long_uid, odd_uid, "short", long_uid):
        gateway.charge(request(uid))
    keys = [s.headers["Idempotency-Key"] for s in server.seen if s.method == "POST"]
    for key in keys:
        assert key.startswith('"') and key.endswith('"')
        inner = key[1:-1]
        assert 16 <= len(inner) <= 256 and inner.replace("-", "").replace("_", "").isalnum()
    assert keys[0] == keys[3] and len(set(keys[:3])) == 3


# -- lookups ----------------------------------------------------------------------------------


def test_look_up_maps_a_v2_payment(server, gateway):
    cancelled = v2_payment(
        status="PARTIAL_CANCELLED", cancelledAt="2026-12-02T00:00:01Z",
        amount={"total": 9900, "taxFree": 0, "discount": 0, "paid": 9900, "cancelled": 1000,
                "cancelledTaxFree": 0},
        cancellations=[cancellation(1000, "refund r1")],
    )  # fmt: skip
    server.on("GET", f"/payments/{UID}", Act(200, cancelled))
    found = gateway.look_up(UID)
    assert found.kind == FOUND
    p = found.decisive
    assert (p.imp_uid, p.merchant_uid, p.status, p.amount, p.cancel_amount) == (
        UID, UID, api.PAID, 9900, 1000,
    )  # fmt: skip
    assert (p.customer_uid, p.pg_provider, p.pg_tid) == (BILLING_KEY, "NICEPAY_V2", "pg-tx-1")
    assert (p.started_at, p.paid_at, p.cancelled_at) == (1796083205, 1796083207, 1796169601)


def test_a_v1_payment_keeps_its_imp_uid(server, gateway):
    server.on("GET", f"/payments/{UID}",
              Act(200, v2_payment(version="V1", transactionId="imp_123")))  # fmt: skip
    assert gateway.look_up(UID).decisive.imp_uid == "imp_123"


def test_a_failed_payment_carries_the_pg_message(server, gateway):
    server.on("GET", f"/payments/{UID}", Act(200, v2_payment(status="FAILED")))
    p = gateway.look_up(UID).decisive
    assert (p.status, p.fail_reason, p.failed_at) == (api.FAILED, "잔액 부족", 1796083207)


@pytest.mark.parametrize("status", ["READY", "PAY_PENDING"])
def test_ready_and_pending_are_in_progress(server, gateway, status):
    server.on("GET", f"/payments/{UID}", Act(200, v2_payment(status=status)))
    assert gateway.look_up(UID).decisive.status == api.READY


def test_portones_payment_not_found_is_absent(server, gateway):
    server.on("GET", f"/payments/{UID}", error(404, "PAYMENT_NOT_FOUND"))
    assert gateway.look_up(UID).kind == ABSENT
    assert server.requests("GET", f"/payments/{UID}")[0].query == {"storeId": ["store-1"]}


@pytest.mark.parametrize(
    "reply",
    [
        Act(404, "<html>Not Found</html>", "text/html"),
        Act(404, {"error": "no route"}),
        Act(404, {"type": "ROUTE_NOT_FOUND"}),
        Act(200, {"id": UID}),
    ],
)
def test_a_404_in_another_shape_is_unreachable(server, gateway, reply):
    server.on("GET", f"/payments/{UID}", reply)
    assert gateway.look_up(UID).kind == UNREACHABLE


def test_payments_between_reads_every_page_of_the_window(server, gateway):
    since, until = 1796083200, 1796169600  # 2026-12-01T00:00Z .. 2026-12-02T00:00Z
    late = v2_payment("late-20261202-01", requestedAt="2026-12-02T00:00:00Z")
    server.on(
        "GET", "/payments-by-cursor",
        Act(200, {"items": [{"payment": v2_payment("a-20261201-01"), "cursor": "c1"},
                            {"payment": v2_payment("b-20261201-01"), "cursor": "c2"}]}),
        Act(200, {"items": [{"payment": late, "cursor": "c3"}]}),
        Act(200, {"items": []}),
    )  # fmt: skip
    ids = [p.merchant_uid for p in gateway.payments_between(since, until)]
    assert ids == ["a-20261201-01", "b-20261201-01"]  # until is exclusive
    bodies = [json.loads(s.query["requestBody"][0]) for s in server.seen]
    assert bodies[0] == {"from": "2026-12-01T00:00:00Z", "until": "2026-12-02T00:00:00Z",
                         "size": 1000, "storeId": "store-1"}  # fmt: skip
    assert [b.get("cursor") for b in bodies] == [None, "c2", "c3"]


def test_payments_between_raises_rather_than_end_early(server, gateway):
    server.on(
        "GET", "/payments-by-cursor",
        Act(200, {"items": [{"payment": v2_payment(), "cursor": "c1"}]}),
        Act(502, "<html>Bad Gateway</html>", "text/html"),
    )  # fmt: skip
    with pytest.raises(GatewayUnavailable):
        list(gateway.payments_between(1796083200, 1796169600))


def test_missing_billing_keys_are_the_deleted_and_unknown_ones(server, gateway):
    issued = {"status": "ISSUED", "billingKey": "k1", "merchantId": "m", "storeId": "s",
              "channels": [], "customer": {}, "issuedAt": "2026-11-01T00:00:00Z"}  # fmt: skip
    server.on("GET", "/billing-keys/k1", Act(200, issued))
    server.on("GET", "/billing-keys/k2", Act(200, {**issued, "billingKey": "k2",
                                                   "status": "DELETED"}))  # fmt: skip
    server.on("GET", "/billing-keys/k3", error(404, "BILLING_KEY_NOT_FOUND"))
    assert gateway.missing_billing_keys(["k1", "k2", "k3"]) == ["k2", "k3"]


def test_billing_keys_are_looked_up_a_few_at_a_time(server, gateway):
    issued = {"status": "ISSUED", "billingKey": "k", "merchantId": "m", "storeId": "s",
              "channels": [], "customer": {}, "issuedAt": "2026-11-01T00:00:00Z"}  # fmt: skip
    for i in range(8):
        server.on("GET", f"/billing-keys/k{i}", Act(200, issued, delay=0.3))
    started = time.monotonic()
    assert gateway.missing_billing_keys([f"k{i}" for i in range(8)]) == []
    assert time.monotonic() - started < 1.5  # one at a time takes 2.4 s


def test_a_billing_key_check_behind_a_foreign_404_raises(server, gateway):
    server.on("GET", "/billing-keys/k1", Act(404, "<html>nope</html>", "text/html"))
    with pytest.raises(GatewayUnavailable):
        gateway.missing_billing_keys(["k1"])


# -- payment and cancel -----------------------------------------------------------------------


def test_payment_comes_with_its_succeeded_cancellations(server, gateway):
    doc = v2_payment(cancellations=[cancellation(1000, "r1"), cancellation(500, "r2", "FAILED")])
    server.on("GET", f"/payments/{UID}", Act(200, doc))
    payment, history = gateway.payment(UID)
    assert payment.imp_uid == UID
    assert [(h.amount, h.reason) for h in history] == [(1000, "r1")]


def test_payment_absent_and_unavailable(server, gateway):
    server.on("GET", "/payments/gone", error(404, "PAYMENT_NOT_FOUND"))
    server.on("GET", "/payments/proxy", Act(404, "<html>x</html>", "text/html"))
    with pytest.raises(PaymentAbsent):
        gateway.payment("gone")
    with pytest.raises(GatewayUnavailable):
        gateway.payment("proxy")


def _refundable(server) -> None:
    after = v2_payment(
        status="PARTIAL_CANCELLED", cancelledAt="2026-12-02T00:00:01Z",
        amount={"total": 9900, "taxFree": 0, "discount": 0, "paid": 9900, "cancelled": 1000,
                "cancelledTaxFree": 0},
        cancellations=[cancellation(1000, "[r1] refund")],
    )  # fmt: skip
    server.on("GET", f"/payments/{UID}", Act(200, after))


def test_cancel_sends_the_checksum_and_returns_the_balance(server, gateway):
    _refundable(server)
    server.on("POST", f"/payments/{UID}/cancel",
              Act(200, {"cancellation": cancellation(1000, "[r1] refund")}))  # fmt: skip
    payment = gateway.cancel(UID, amount=1000, reason="[r1] refund", checksum=9900)
    assert payment.cancel_amount == 1000
    sent = server.requests("POST", f"/payments/{UID}/cancel")[0]
    assert sent.body == {"amount": 1000, "reason": "[r1] refund",
                         "currentCancellableAmount": 9900, "storeId": "store-1"}  # fmt: skip


def test_cancel_keys_replay_a_retry_and_separate_another_refund(server, gateway):
    _refundable(server)
    server.on("POST", f"/payments/{UID}/cancel",
              Act(200, {"cancellation": cancellation(1000, "[r1] refund")}))  # fmt: skip
    gateway.cancel(UID, amount=1000, reason="[r1] refund", checksum=9900)
    gateway.cancel(UID, amount=1000, reason="[r1] refund", checksum=9900)  # the same refund
    gateway.cancel(UID, amount=1000, reason="[r1] refund", checksum=8900)  # after the first
    gateway.cancel(UID, amount=500, reason="[r1] refund", checksum=9900)
    gateway.cancel(UID, amount=1000, reason="[r2] refund", checksum=9900)  # another refund
    keys = server.keys("POST", f"/payments/{UID}/cancel")
    assert keys[0] == keys[1]
    assert len(set(keys)) == 4


def test_cancel_keys_of_different_refunds_never_coincide(server, gateway):
    refused = error(409, "PAYMENT_NOT_PAID")
    server.on("POST", "/payments/p-1/cancel", refused)
    server.on("POST", "/payments/p/cancel", refused)
    # Joined with "-", these two refunds' words read the same: "p-1-2-3-refund".
    for payment_id, checksum, amount, reason in (("p-1", 2, 3, "refund"), ("p", 1, 2, "3-refund")):
        with pytest.raises(RefundRefused):
            gateway.cancel(payment_id, amount=amount, reason=reason, checksum=checksum)
    keys = server.keys("POST", "/payments/p-1/cancel") + server.keys("POST", "/payments/p/cancel")
    assert len(set(keys)) == 2


@pytest.mark.parametrize(
    "type_, status",
    [("CANCELLABLE_AMOUNT_CONSISTENCY_BROKEN", 409), ("PAYMENT_ALREADY_CANCELLED", 409),
     ("CANCEL_AMOUNT_EXCEEDS_CANCELLABLE_AMOUNT", 409)],
)  # fmt: skip
def test_a_refused_cancel_is_refund_refused(server, gateway, type_, status):
    server.on("POST", f"/payments/{UID}/cancel", error(status, type_))
    with pytest.raises(RefundRefused, match=type_):
        gateway.cancel(UID, amount=1000, reason="r", checksum=9900)


def test_a_cancel_without_an_answer_is_unknown_after_resends_with_one_key(server, gateway):
    server.on("POST", f"/payments/{UID}/cancel", Act(drop=True))
    with pytest.raises(RefundOutcomeUnknown):
        gateway.cancel(UID, amount=1000, reason="r", checksum=9900)
    keys = server.keys("POST", f"/payments/{UID}/cancel")
    assert len(keys) == 3 and len(set(keys)) == 1


def test_a_cancel_refused_after_a_resend_is_unknown(server, gateway):
    broken = error(409, "CANCELLABLE_AMOUNT_CONSISTENCY_BROKEN")
    server.on("POST", f"/payments/{UID}/cancel", Act(drop=True), broken)
    with pytest.raises(RefundOutcomeUnknown):
        gateway.cancel(UID, amount=1000, reason="r", checksum=9900)


def test_a_requested_but_unfinished_cancel_is_unknown(server, gateway):
    server.on("POST", f"/payments/{UID}/cancel",
              Act(200, {"cancellation": cancellation(1000, "r", "REQUESTED")}))  # fmt: skip
    with pytest.raises(RefundOutcomeUnknown):
        gateway.cancel(UID, amount=1000, reason="r", checksum=9900)


def test_a_cancel_that_could_not_be_sent_is_unavailable(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", _conn_json(f"http://127.0.0.1:{port}"))
    with pytest.raises(GatewayUnavailable):
        gateway_for(CONN_ID).cancel(UID, amount=1000, reason="r", checksum=9900)


def test_a_refused_secret_on_cancel_is_credentials_refused(server, gateway):
    server.on("POST", f"/payments/{UID}/cancel", error(403, "FORBIDDEN"))
    with pytest.raises(CredentialsRefused):
        gateway.cancel(UID, amount=1000, reason="r", checksum=9900)


# -- secrets ----------------------------------------------------------------------------------


def test_no_secret_in_any_error_or_log(server, gateway, caplog):
    caplog.set_level(logging.DEBUG)
    echo = f"<html>echo Authorization: PortOne {SECRET}</html>"
    server.on("POST", charge_path(), Act(401, echo, "text/html"))
    server.on("POST", charge_path("u2-20261201-01"), Act(400, echo, "text/html"))
    server.on("POST", charge_path("u3-20261201-01"), Act(503, echo, "text/html"))
    server.on("GET", f"/payments/{UID}", Act(500, {"type": "X", "message": SECRET}))
    server.on("GET", "/payments-by-cursor", Act(403, echo, "text/html"))
    server.on("POST", f"/payments/{UID}/cancel", Act(502, echo, "text/html"))
    texts = []
    with pytest.raises(CredentialsRefused) as refused:
        gateway.charge(request())
    texts.append(str(refused.value))
    for uid in ("u2-20261201-01", "u3-20261201-01"):
        result = gateway.charge(request(uid))
        texts.append(f"{result.code} {result.reason}")
    texts.append(str(gateway.look_up(UID).reason))
    for call in (
        lambda: list(gateway.payments_between(0, 1)),
        lambda: gateway.cancel(UID, amount=1, reason="r", checksum=2),
        lambda: gateway.payment(UID),
    ):
        with pytest.raises(Exception) as raised:
            call()
        texts.append(str(raised.value))
    texts.append(PortOneHook(CONN_ID).test_connection()[1])
    assert all(t and t != "None" for t in texts)
    assert not [t for t in texts + [caplog.text] if SECRET in t]


# -- against the emulator's V2 mode (``iamport-emulator --api v2``) ----------------------------


@pytest.fixture
def emulator_v2(tmp_path, monkeypatch):
    """The emulator in V2 mode over real HTTP on loopback, as the ``portone_test`` connection."""
    pytest.importorskip("iamport_billing.emulator.v2", reason="the emulator has no V2 mode here")
    from iamport_billing.emulator import EmulatorConfig, run_emulator_in_thread

    config = EmulatorConfig(db_path=str(tmp_path / "emulator.db"), api="v2", seed=7)
    with run_emulator_in_thread(config) as handle:
        conn = {
            "conn_type": "portone", "host": handle.url, "password": config.api_secret,
            "extra": {"store_id": config.store_id, "read_timeout": 5, "connect_timeout": 2},
        }  # fmt: skip
        monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))
        yield handle


def issue(emulator, card: str) -> str:
    """A billing key for a test card, issued through the emulator's POST /billing-keys."""
    import requests

    card = {"number": card.replace("-", ""), "expiryYear": "30", "expiryMonth": "12"}
    r = requests.post(
        f"{emulator.url}/billing-keys",
        json={"method": {"card": {"credential": card}}},
        headers={"Authorization": f"PortOne {emulator.config.api_secret}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return r.json()["billingKeyInfo"]["billingKey"]


def emulator_stats(emulator) -> dict[str, Any]:
    import requests

    return requests.get(f"{emulator.url}/__emulator__/stats", timeout=5).json()


def test_emulator_charge_look_up_and_refund(emulator_v2):
    from iamport_billing.emulator import CARD_ALWAYS_PAID

    key = issue(emulator_v2, CARD_ALWAYS_PAID)
    gateway = gateway_for(CONN_ID)
    result = gateway.charge(request(customer_uid=key))
    assert result.kind == PAID and result.payment.amount == 9900
    found = gateway.look_up(UID)
    assert found.kind == FOUND and found.decisive.status == api.PAID
    refunded = gateway.cancel(
        result.payment.imp_uid, amount=1000, reason="[r1] part", checksum=9900
    )
    assert refunded.cancel_amount == 1000
    payment, history = gateway.payment(result.payment.imp_uid)
    assert payment.net_amount == 8900 and [(h.amount, h.reason) for h in history] == [
        (1000, "[r1] part")
    ]
    assert [p.merchant_uid for p in gateway.payments_between(0, 2**31)] == [UID]


def test_emulator_decline_and_missing_billing_key(emulator_v2):
    from iamport_billing.emulator import CARD_SOFT_DECLINE, SOFT_DECLINE_REASON

    key = issue(emulator_v2, CARD_SOFT_DECLINE)
    gateway = gateway_for(CONN_ID)
    declined = gateway.charge(request(customer_uid=key))
    assert (declined.kind, declined.payment.fail_reason) == (DECLINED, SOFT_DECLINE_REASON)
    assert gateway.charge(request("u2-20261201-01", customer_uid="no-such-key")).kind == (
        NO_BILLING_KEY
    )
    assert gateway.look_up("never-charged-20261201-01").kind == ABSENT
    assert gateway.missing_billing_keys([key, "no-such-key"]) == ["no-such-key"]


def test_emulator_a_dropped_reply_is_replayed_under_the_same_key(emulator_v2):
    import requests
    from iamport_billing.emulator import CARD_ALWAYS_PAID

    key = issue(emulator_v2, CARD_ALWAYS_PAID)
    requests.post(
        f"{emulator_v2.url}/__emulator__/faults", json={"drop_after_commit_rate": 1.0}, timeout=5
    ).raise_for_status()
    result = gateway_for(CONN_ID).charge(request(customer_uid=key))
    assert result.kind == PAID and result.payment.amount == 9900
    stats = emulator_stats(emulator_v2)
    assert stats["faults"] == {"drop_after_commit": 1}  # the first reply was lost
    assert stats["idempotency"] == {"claimed": 1, "replay": 1}  # the resend was replayed
    assert stats["charges"] == {"committed": 1}  # charged once


def test_emulator_refuses_a_wrong_secret(emulator_v2, monkeypatch):
    conn = json.loads(_conn_json(emulator_v2.url))  # SECRET is not the emulator's
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))
    with pytest.raises(CredentialsRefused):
        gateway_for(CONN_ID).charge(request())
    ok, message = PortOneHook(CONN_ID).test_connection()
    assert not ok and "refused" in message


@pytest.fixture
def v2_dag_world(emulator_v2, airflow_db, ledger, monkeypatch):
    """The DAGs billing through the ``portone`` connection on the V2 emulator."""
    monkeypatch.setenv("IAMPORT_BILLING_IAMPORT_CONN_ID", CONN_ID)
    monkeypatch.setenv("IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS", "0.1")
    monkeypatch.setenv("IAMPORT_BILLING_TASK_RETRIES", "0")
    # dag.test() cannot finish a run with deadline alerts (see RELIABILITY.md).
    monkeypatch.setattr("iamport_billing.alerts.deadline_alerts", lambda cfg, *, starts_at: [])
    return ledger, emulator_v2


@pytest.mark.airflow
def test_emulator_the_daily_dag_bills_through_v2(v2_dag_world):
    from datetime import date

    import pendulum
    from chaos_support import load_dags, run_dag
    from iamport_billing.emulator import CARD_ALWAYS_PAID, CARD_HARD_DECLINE, CARD_SOFT_DECLINE
    from support import add_subscriptions, run_daily

    ledger, emulator = v2_dag_world
    day = date(2026, 11, 26)
    keys = {c: issue(emulator, c) for c in (CARD_ALWAYS_PAID, CARD_SOFT_DECLINE, CARD_HARD_DECLINE)}
    add_subscriptions(
        ledger,
        [("p1", keys[CARD_ALWAYS_PAID], 9900), ("soft1", keys[CARD_SOFT_DECLINE], 5000),
         ("hard1", keys[CARD_HARD_DECLINE], 7000), ("nokey1", "billing-key-unknown", 3000)],
        day,
    )  # fmt: skip
    run_daily(day)
    subs = dict(ledger.query("SELECT subscription_id, status FROM billing_subscriptions"))
    assert subs == {
        "p1": "active", "soft1": "active", "hard1": "payment_method_required",
        "nokey1": "payment_method_required",
    }  # fmt: skip
    rows = ledger.query(
        "SELECT merchant_uid, status, imp_uid, paid_amount FROM billing_charge_attempts "
        "WHERE subscription_id IN ('p1', 'soft1', 'hard1')"
    )
    outcomes = {r[0]: tuple(r[1:]) for r in rows}
    assert outcomes["p1-20261126-01"] == ("paid", "p1-20261126-01", 9900)
    assert outcomes["soft1-20261126-01"][0] == "failed"
    assert outcomes["hard1-20261126-01"][0] == "failed"
    # Each sent once: three charges, one refused for its unknown billing key.
    assert emulator_stats(emulator)["charges"] == {"committed": 3, "unknown_customer": 1}
    _, states = run_dag(load_dags().get_dag("iamport_billing_reconcile"), pendulum.now("UTC"))
    assert states["reconcile"] == "success"  # the V2 listing agrees with the ledger


def test_emulator_refunds_through_the_cancel_operator(emulator_v2, ledger):
    from datetime import date

    import requests
    from iamport_billing.charging import ChargeEngine
    from iamport_billing.emulator import CARD_ALWAYS_PAID
    from iamport_billing.operators.cancel import CancelPaymentOperator
    from iamport_billing.policy import ChargeCandidate
    from ops_support import RUN, SETTINGS
    from support import add_subscriptions

    day, uid = date(2026, 11, 26), "c1-20261126-01"
    key = issue(emulator_v2, CARD_ALWAYS_PAID)
    add_subscriptions(ledger, [("c1", key, 10_000)], day)
    gateway = gateway_for(CONN_ID)
    ChargeEngine(gateway, ledger, SETTINGS, RUN).charge_batch(
        [ChargeCandidate("c1", key, 10_000, day, name="plan")]
    )
    paid = ledger.get_attempt(uid).imp_uid
    assert paid == uid  # a V2 payment is known by its paymentId

    def cancel(request_id: str, amount: int):
        return CancelPaymentOperator(
            task_id="cancel", reason="customer asked", request_id=request_id, imp_uid=paid,
            amount=amount, iamport_conn_id=CONN_ID,
        ).execute({})  # fmt: skip

    cancel("rq-1", 3000)
    assert cancel("rq-2", 2000)["remaining"] == 5000
    cancel("rq-2", 2000)  # the same refund again: settled from the cancel history
    stats = requests.get(f"{emulator_v2.url}/__emulator__/stats", timeout=5).json()
    assert stats["requests"]["POST /payments/{payment_id}/cancel"] == 2
    payment, history = gateway.payment(paid)
    assert (payment.cancel_amount, [h.amount for h in history]) == (5000, [3000, 2000])
    gateway.close()
    attempt = ledger.get_attempt(uid)
    assert (attempt.status, attempt.cancel_amount) == ("cancelled", 5000)
