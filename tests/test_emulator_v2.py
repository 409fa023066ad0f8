"""The emulator's PortOne V2 mode over real HTTP on loopback: routes, errors, Idempotency-Key,
signed webhooks and faults; every answer validated against the official V2 spec."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
from emulator_fixtures import Api, ApiV2, validate_v2_response
from iamport_billing.emulator import (
    CARD_ALWAYS_PAID,
    CARD_HARD_DECLINE,
    CARD_SOFT_DECLINE,
    HARD_DECLINE_REASON,
    SOFT_DECLINE_REASON,
    EmulatorConfig,
    EmulatorHandle,
    issue_billing_key,
    run_emulator_in_thread,
    seed_customers,
    start_emulator_process,
)
from iamport_billing.emulator.__main__ import build_parser
from iamport_billing.emulator.config import CARD_SHORT_PAID
from iamport_billing.emulator.server import cli_args
from standardwebhooks import Webhook

PAY = "/payments/{paymentId}/billing-key"
CANCEL = "/payments/{paymentId}/cancel"
PAYMENT = "/payments/{paymentId}"
BILLING_KEY = "/billing-keys/{billingKey}"
NO_FAULTS = {
    "latency_ms": 0, "latency_jitter_ms": 0, "error_rate": 0, "rate_limit_rate": 0,
    "drop_after_commit_rate": 0, "clock_offset_s": 0, "foreign_404_json": False,
    "charge_foreign_404": False, "charge_status_ready": False, "drop_cancel_reply": False,
    "paid_amount_multiplier": 1,
}  # fmt: skip
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"emulator-v2-test-webhook-secret!").decode()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def key() -> str:
    return f"idem-{uuid.uuid4().hex}"


@dataclass
class Receiver:
    """A webhook endpoint on loopback; answers 500 to the first ``failures`` deliveries."""

    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    failures: int = 0

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.received

    def of(self, payment_id: str) -> list[dict[str, Any]]:
        return [
            r for r in self.received if json.loads(r["body"])["data"]["paymentId"] == payment_id
        ]


@contextmanager
def webhook_receiver() -> Iterator[Receiver]:
    receiver = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            failing = receiver.failures > 0
            receiver.failures -= failing
            receiver.received.append(
                {"headers": {k.lower(): v for k, v in self.headers.items()},
                 "body": raw.decode(), "answered": 500 if failing else 204}
            )  # fmt: skip
            self.send_response(500 if failing else 204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/portone"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def start(db_path: Path, **overrides: Any) -> EmulatorHandle:
    return run_emulator_in_thread(
        EmulatorConfig(db_path=str(db_path), api="v2", seed=7, **overrides)
    )


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as r:
        yield r


@pytest.fixture(scope="module")
def emulator(
    tmp_path_factory: pytest.TempPathFactory, receiver: Receiver
) -> Iterator[EmulatorHandle]:
    db = tmp_path_factory.mktemp("emulator-v2") / "emulator.db"
    with start(db, webhook_url=receiver.url, webhook_secret=WEBHOOK_SECRET) as handle:
        yield handle


@pytest.fixture
def api(emulator: EmulatorHandle) -> Iterator[ApiV2]:
    yield ApiV2(emulator.url)
    set_faults(emulator.url, **NO_FAULTS)
    requests.post(f"{emulator.url}/__emulator__/release", timeout=5)


@pytest.fixture
def billing_key(api: ApiV2) -> str:
    return api.issue(CARD_ALWAYS_PAID)


def set_faults(url: str, **faults: Any) -> None:
    r = requests.post(f"{url}/__emulator__/faults", json=faults, timeout=5)
    assert r.status_code == 200, r.text


def db_payments(handle: EmulatorHandle, payment_id: str) -> list[str]:
    with sqlite3.connect(handle.config.db_path) as conn:
        rows = conn.execute(
            "SELECT status FROM payments WHERE merchant_uid = ? ORDER BY seq", (payment_id,)
        ).fetchall()
    return [r[0] for r in rows]


def get_payment(api: ApiV2, payment_id: str) -> dict[str, Any]:
    r = api.call("GET", PAYMENT, paymentId=payment_id)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for_held(url: str) -> dict[str, str]:
    for _ in range(250):
        held = requests.get(f"{url}/__emulator__/stats", timeout=5).json()["held"]
        if held:
            return held
        time.sleep(0.02)
    raise AssertionError("no charge was held")


# -- auth -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [None, "PortOne wrong-secret", "Bearer portone_test_api_secret", "portone_test_api_secret"],
    ids=["none", "wrong-secret", "bearer", "bare-secret"],
)
def test_anything_but_portone_and_the_secret_is_401_unauthorized(
    api: ApiV2, header: str | None
) -> None:
    r = api.call("GET", PAYMENT, paymentId="any", auth=header or False)
    assert r.status_code == 401 and r.json()["type"] == "UNAUTHORIZED"


def test_a_401_charges_nothing(api: ApiV2, emulator: EmulatorHandle, billing_key: str) -> None:
    payment_id = uid("pay")
    body = {"billingKey": billing_key, "orderName": "n", "amount": {"total": 1}, "currency": "KRW"}
    r = api.call("POST", PAY, paymentId=payment_id, json=body, auth="PortOne nope")
    assert r.status_code == 401
    assert db_payments(emulator, payment_id) == []


# -- billing keys ---------------------------------------------------------------------------------


def test_issue_billing_key_then_get_it_issued_with_masked_card(api: ApiV2) -> None:
    billing_key = api.issue(CARD_ALWAYS_PAID, customer={"id": "cust-1", "name": {"full": "홍길동"}})
    info = api.call("GET", BILLING_KEY, billingKey=billing_key).json()
    assert (info["status"], info["billingKey"]) == ("ISSUED", billing_key)
    assert info["methods"][0]["card"]["number"] == "4242-42**-****-4242"
    assert info["customer"] == {"id": "cust-1", "name": "홍길동"}


def test_full_card_number_never_reaches_the_db_file(api: ApiV2, emulator: EmulatorHandle) -> None:
    api.issue("4111-1111-1111-1111")
    assert b"4111111111111111" not in Path(emulator.config.db_path).read_bytes()


@pytest.mark.parametrize(
    "credential",
    [
        {"number": "4242", "expiryYear": "30", "expiryMonth": "12"},
        {"number": "4242-4242-4242-4242", "expiryYear": "30", "expiryMonth": "12"},
        {"number": "4242424242424242", "expiryYear": "2030", "expiryMonth": "12"},
        {"number": "4242424242424242", "expiryYear": "30", "expiryMonth": "13"},
        {"number": "4242424242424242", "expiryYear": "30"},
    ],
    ids=["short", "dashes", "4-digit-year", "month-13", "no-month"],
)
def test_issue_with_invalid_card_credentials_is_400_invalid_request(
    api: ApiV2, credential: dict[str, str]
) -> None:
    body = {"method": {"card": {"credential": credential}}}
    r = api.call("POST", "/billing-keys", json=body)
    assert r.status_code == 400 and r.json()["type"] == "INVALID_REQUEST"


def test_delete_billing_key_then_it_reads_deleted_and_charges_are_refused(
    api: ApiV2, emulator: EmulatorHandle, billing_key: str
) -> None:
    r = api.call("DELETE", BILLING_KEY, billingKey=billing_key)
    assert r.status_code == 200 and r.json()["deletedAt"]
    info = api.call("GET", BILLING_KEY, billingKey=billing_key).json()
    assert (info["status"], info["deletedAt"]) == ("DELETED", r.json()["deletedAt"])
    payment_id = uid("pay")
    charge = api.pay(payment_id, billing_key)
    assert charge.status_code == 409 and charge.json()["type"] == "BILLING_KEY_ALREADY_DELETED"
    again = api.call("DELETE", BILLING_KEY, billingKey=billing_key)
    assert again.status_code == 409 and again.json()["type"] == "BILLING_KEY_ALREADY_DELETED"
    assert db_payments(emulator, payment_id) == []


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_unknown_billing_key_is_404_billing_key_not_found(api: ApiV2, method: str) -> None:
    r = api.call(method, BILLING_KEY, billingKey="billing-key-nope")
    assert r.status_code == 404 and r.json()["type"] == "BILLING_KEY_NOT_FOUND"


# -- charges --------------------------------------------------------------------------------------


def test_pay_answers_pg_tx_id_and_paid_at_and_the_payment_reads_paid(
    api: ApiV2, emulator: EmulatorHandle, billing_key: str
) -> None:
    payment_id = uid("pay")
    r = api.pay(payment_id, billing_key, total=12_000, customData='{"plan": "pro"}')
    assert r.status_code == 200
    payment = get_payment(api, payment_id)
    assert payment["status"] == "PAID" and payment["billingKey"] == billing_key
    assert (payment["pgTxId"], payment["paidAt"]) == (
        r.json()["payment"]["pgTxId"],
        r.json()["payment"]["paidAt"],
    )
    assert payment["amount"]["total"] == payment["amount"]["paid"] == 12_000
    assert payment["customData"] == '{"plan": "pro"}'
    assert db_payments(emulator, payment_id) == ["paid"]


@pytest.mark.parametrize(
    ("card", "reason", "pg_code"),
    [
        (CARD_SOFT_DECLINE, SOFT_DECLINE_REASON, "51"),
        (CARD_HARD_DECLINE, HARD_DECLINE_REASON, "41"),
    ],
    ids=["soft", "hard"],
)
def test_a_decline_is_502_pg_provider_and_the_payment_reads_failed(
    api: ApiV2, emulator: EmulatorHandle, card: str, reason: str, pg_code: str
) -> None:
    payment_id = uid("pay")
    r = api.pay(payment_id, api.issue(card))
    assert r.status_code == 502
    assert (r.json()["type"], r.json()["pgCode"], r.json()["pgMessage"]) == (
        "PG_PROVIDER",
        pg_code,
        reason,
    )
    payment = get_payment(api, payment_id)
    assert payment["status"] == "FAILED"
    assert payment["failure"] == {"reason": reason, "pgCode": pg_code, "pgMessage": reason}
    assert db_payments(emulator, payment_id) == ["failed"]


@pytest.mark.parametrize(
    ("card", "multiplier", "recorded"),
    [(CARD_SHORT_PAID, 1.0, 9000), (CARD_ALWAYS_PAID, 2.0, 20_000)],
    ids=["short-paid-card", "paid-amount-multiplier"],
)
def test_paid_with_another_amount_reads_so(
    api: ApiV2, card: str, multiplier: float, recorded: int
) -> None:
    payment_id = uid("pay")
    set_faults(api.url, paid_amount_multiplier=multiplier)
    assert api.pay(payment_id, api.issue(card), total=10_000).status_code == 200
    assert get_payment(api, payment_id)["amount"]["paid"] == recorded


def test_pay_a_paid_payment_id_again_is_409_already_paid_and_charges_nothing(
    api: ApiV2, emulator: EmulatorHandle, billing_key: str
) -> None:
    payment_id = uid("pay")
    assert api.pay(payment_id, billing_key).status_code == 200
    r = api.pay(payment_id, billing_key)
    assert r.status_code == 409 and r.json()["type"] == "ALREADY_PAID"
    assert db_payments(emulator, payment_id) == ["paid"]


def test_a_payment_id_admits_five_attempts_then_max_transaction_count_reached(
    api: ApiV2, emulator: EmulatorHandle
) -> None:
    payment_id, declining = uid("pay"), api.issue(CARD_SOFT_DECLINE)
    assert [api.pay(payment_id, declining).status_code for _ in range(5)] == [502] * 5
    r = api.pay(payment_id, api.issue(CARD_ALWAYS_PAID))
    assert r.status_code == 400 and r.json()["type"] == "MAX_TRANSACTION_COUNT_REACHED"
    assert db_payments(emulator, payment_id) == ["failed"] * 5


def test_a_failed_attempt_then_a_paid_one_reads_paid(api: ApiV2, billing_key: str) -> None:
    payment_id = uid("pay")
    assert api.pay(payment_id, api.issue(CARD_SOFT_DECLINE)).status_code == 502
    assert api.pay(payment_id, billing_key).status_code == 200
    assert get_payment(api, payment_id)["status"] == "PAID"


def test_pay_with_unknown_billing_key_is_404_and_charges_nothing(
    api: ApiV2, emulator: EmulatorHandle
) -> None:
    payment_id = uid("pay")
    r = api.pay(payment_id, "billing-key-nope")
    assert r.status_code == 404 and r.json()["type"] == "BILLING_KEY_NOT_FOUND"
    assert db_payments(emulator, payment_id) == []


@pytest.mark.parametrize(
    "change",
    [
        {"billingKey": None}, {"orderName": None}, {"amount": None}, {"currency": None},
        {"amount": {"total": 0}}, {"amount": {"total": "1000"}}, {"amount": {"total": 10.5}},
        {"amount": {"total": 100, "taxFree": 200}}, {"currency": "won"},
        {"customer": "someone"}, {"installmentMonth": -1},
    ],
    ids=["no-billingKey", "no-orderName", "no-amount", "no-currency", "total=0",
         "total-string", "total-float", "taxFree>total", "currency", "customer", "installment"],
)  # fmt: skip
def test_pay_with_invalid_body_is_400_invalid_request_and_charges_nothing(
    api: ApiV2, emulator: EmulatorHandle, billing_key: str, change: dict[str, Any]
) -> None:
    payment_id = uid("pay")
    body = {
        "billingKey": billing_key,
        "orderName": "n",
        "amount": {"total": 100},
        "currency": "KRW",
    }
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}
    r = api.call("POST", PAY, paymentId=payment_id, json=body)
    assert r.status_code == 400 and r.json()["type"] == "INVALID_REQUEST"
    assert db_payments(emulator, payment_id) == []


def test_pay_with_a_body_that_is_not_json_is_400(api: ApiV2) -> None:
    r = api.call("POST", PAY, paymentId=uid("pay"), data="{not json")
    assert r.status_code == 400 and r.json()["type"] == "INVALID_REQUEST"


def test_a_held_charge_reads_ready_then_paid(
    api: ApiV2, emulator: EmulatorHandle, billing_key: str
) -> None:
    payment_id = uid("pay")
    requests.post(f"{api.url}/__emulator__/hold", json={"charges": 1}, timeout=5)
    replies: list[requests.Response] = []
    stuck = threading.Thread(target=lambda: replies.append(api.pay(payment_id, billing_key)))
    stuck.start()
    assert wait_for_held(api.url) == {payment_id: billing_key}
    ready = get_payment(api, payment_id)
    requests.post(f"{api.url}/__emulator__/release", timeout=5)
    stuck.join(10)
    assert ready["status"] == "READY" and db_payments(emulator, payment_id) == ["paid"]
    assert get_payment(api, payment_id)["transactionId"] == ready["transactionId"]


# -- lookups --------------------------------------------------------------------------------------


def test_unknown_payment_is_404_payment_not_found(api: ApiV2) -> None:
    r = api.call("GET", PAYMENT, paymentId=uid("pay"))
    assert r.status_code == 404 and r.json()["type"] == "PAYMENT_NOT_FOUND"


def test_a_v1_payment_reads_in_v2_with_its_imp_uid_as_transaction_id(
    api: ApiV2, emulator: EmulatorHandle
) -> None:
    """V1 and V2 emulators on one database: a V1 -> V2 switch keeps history."""
    v1_config = EmulatorConfig(db_path=emulator.config.db_path, seed=1)
    with run_emulator_in_thread(v1_config) as v1:
        old = Api(v1.url)
        customer_uid, merchant_uid = uid("cust"), uid("order")
        old.register(customer_uid, CARD_ALWAYS_PAID)
        imp_uid = old.charge(customer_uid, merchant_uid, amount=5000)["response"]["imp_uid"]
    payment = get_payment(api, merchant_uid)
    assert (payment["status"], payment["transactionId"]) == ("PAID", imp_uid)
    assert payment["billingKey"] == customer_uid and payment["amount"]["total"] == 5000


def test_payments_by_cursor_pages_through_a_time_range(tmp_path: Path, receiver: Receiver) -> None:
    with start(tmp_path / "cursor.db") as handle:
        api = ApiV2(handle.url)
        billing_key = api.issue(CARD_ALWAYS_PAID)
        ids = [uid("pay") for _ in range(5)]
        for payment_id in ids:
            assert api.pay(payment_id, billing_key).status_code == 200
        seen, cursor = [], None
        while True:
            query = {"size": 2, **({"cursor": cursor} if cursor else {})}
            r = api.call("GET", "/payments-by-cursor", params={"requestBody": json.dumps(query)})
            items = r.json()["items"]
            if not items:
                break
            seen += [i["payment"]["id"] for i in items]
            cursor = items[-1]["cursor"]
        assert seen == ids
        later = {"from": "2999-01-01T00:00:00Z", "until": "2999-02-01T00:00:00Z"}
        r = api.call("GET", "/payments-by-cursor", params={"requestBody": json.dumps(later)})
        assert r.json() == {"items": []}
        bad = api.call("GET", "/payments-by-cursor", params={"requestBody": '{"cursor": "x"}'})
        assert bad.status_code == 400 and bad.json()["type"] == "INVALID_REQUEST"


# -- refunds --------------------------------------------------------------------------------------


def paid(api: ApiV2, billing_key: str, total: int = 10_000) -> str:
    payment_id = uid("pay")
    assert api.pay(payment_id, billing_key, total=total).status_code == 200
    return payment_id


def cancel(api: ApiV2, payment_id: str, **body: Any) -> requests.Response:
    idempotency_key = body.pop("idempotency_key", None)
    return api.call(
        "POST", CANCEL, paymentId=payment_id, json={"reason": "refund", **body},
        idempotency_key=idempotency_key,
    )  # fmt: skip


def test_cancel_part_then_the_rest(api: ApiV2, billing_key: str) -> None:
    payment_id = paid(api, billing_key)
    first = cancel(api, payment_id, amount=3000, currentCancellableAmount=10_000)
    assert first.status_code == 200 and first.json()["cancellation"]["totalAmount"] == 3000
    partial = get_payment(api, payment_id)
    assert partial["status"] == "PARTIAL_CANCELLED" and partial["amount"]["cancelled"] == 3000
    rest = cancel(api, payment_id, currentCancellableAmount=7000)
    assert rest.json()["cancellation"]["totalAmount"] == 7000
    full = get_payment(api, payment_id)
    assert full["status"] == "CANCELLED"
    assert [c["totalAmount"] for c in full["cancellations"]] == [3000, 7000]


def test_cancel_with_a_stale_cancellable_amount_is_refused_and_cancels_nothing(
    api: ApiV2, billing_key: str
) -> None:
    payment_id = paid(api, billing_key)
    r = cancel(api, payment_id, amount=1000, currentCancellableAmount=9000)
    assert r.status_code == 409 and r.json()["type"] == "CANCELLABLE_AMOUNT_CONSISTENCY_BROKEN"
    assert get_payment(api, payment_id)["status"] == "PAID"


@pytest.mark.parametrize(
    ("setup", "status", "type_"),
    [
        ("over", 409, "CANCEL_AMOUNT_EXCEEDS_CANCELLABLE_AMOUNT"),
        ("cancelled", 409, "PAYMENT_ALREADY_CANCELLED"),
        ("failed", 409, "PAYMENT_NOT_PAID"),
        ("absent", 404, "PAYMENT_NOT_FOUND"),
    ],
)
def test_cancel_refusals(api: ApiV2, billing_key: str, setup: str, status: int, type_: str) -> None:
    payment_id, body = uid("pay"), {}
    if setup in ("over", "cancelled"):
        payment_id = paid(api, billing_key)
    if setup == "over":
        body = {"amount": 10_001}
    if setup == "cancelled":
        assert cancel(api, payment_id).status_code == 200
    if setup == "failed":
        assert api.pay(payment_id, api.issue(CARD_SOFT_DECLINE)).status_code == 502
    r = cancel(api, payment_id, **body)
    assert r.status_code == status and r.json()["type"] == type_


def test_cancel_without_reason_is_400(api: ApiV2, billing_key: str) -> None:
    payment_id = paid(api, billing_key)
    r = api.call("POST", CANCEL, paymentId=payment_id, json={"amount": 100})
    assert r.status_code == 400 and r.json()["type"] == "INVALID_REQUEST"
    assert get_payment(api, payment_id)["status"] == "PAID"


# -- Idempotency-Key ------------------------------------------------------------------------------


def test_a_key_seen_before_replays_the_first_answer_without_charging_again(
    api: ApiV2, emulator: EmulatorHandle, billing_key: str
) -> None:
    payment_id, k = uid("pay"), key()
    first = api.pay(payment_id, billing_key, idempotency_key=k)
    second = api.pay(payment_id, billing_key, idempotency_key=k)
    assert (second.status_code, second.content) == (first.status_code, first.content)
    assert first.status_code == 200 and db_payments(emulator, payment_id) == ["paid"]
    # Without the key, the same request is executed: the paymentId is paid already.
    assert api.pay(payment_id, billing_key).status_code == 409


def test_a_decline_is_replayed_as_it_was(api: ApiV2, emulator: EmulatorHandle) -> None:
    payment_id, k, declining = uid("pay"), key(), api.issue(CARD_HARD_DECLINE)
    first = api.pay(payment_id, declining, idempotency_key=k)
    second = api.pay(payment_id, declining, idempotency_key=k)
    assert (second.status_code, second.content) == (502, first.content)
    assert db_payments(emulator, payment_id) == ["failed"]


def test_a_cancel_with_a_key_seen_before_refunds_once(api: ApiV2, billing_key: str) -> None:
    payment_id, k = paid(api, billing_key), key()
    first = cancel(api, payment_id, amount=1000, idempotency_key=k)
    second = cancel(api, payment_id, amount=1000, idempotency_key=k)
    assert (second.status_code, second.content) == (200, first.content)
    assert get_payment(api, payment_id)["amount"]["cancelled"] == 1000


def test_a_key_whose_first_request_is_held_is_409_outstanding(
    api: ApiV2, emulator: EmulatorHandle, billing_key: str
) -> None:
    payment_id, k = uid("pay"), key()
    requests.post(f"{api.url}/__emulator__/hold", json={"charges": 1}, timeout=5)
    replies: list[requests.Response] = []
    stuck = threading.Thread(
        target=lambda: replies.append(api.pay(payment_id, billing_key, idempotency_key=k))
    )
    stuck.start()
    wait_for_held(api.url)
    retry = api.pay(payment_id, billing_key, idempotency_key=k)
    requests.post(f"{api.url}/__emulator__/release", timeout=5)
    stuck.join(10)
    assert retry.status_code == 409 and retry.json()["type"] == "IDEMPOTENCY_OUTSTANDING_REQUEST"
    after = api.pay(payment_id, billing_key, idempotency_key=k)
    assert replies[0].status_code == 200 and after.content == replies[0].content
    assert db_payments(emulator, payment_id) == ["paid"]


def test_a_key_whose_first_request_is_in_its_latency_is_409_outstanding(
    api: ApiV2, billing_key: str
) -> None:
    payment_id, k = uid("pay"), key()
    set_faults(api.url, latency_ms=800)
    replies: list[requests.Response] = []
    slow = threading.Thread(
        target=lambda: replies.append(api.pay(payment_id, billing_key, idempotency_key=k))
    )
    slow.start()
    time.sleep(0.3)
    started = time.monotonic()
    retry = api.pay(payment_id, billing_key, idempotency_key=k, validate=False)
    answered_in = time.monotonic() - started
    slow.join(10)
    validate_v2_response("POST", PAY, retry.status_code, retry.json())
    assert retry.status_code == 409 and retry.json()["type"] == "IDEMPOTENCY_OUTSTANDING_REQUEST"
    assert answered_in < 0.5  # at once, not after a latency of its own
    assert replies[0].status_code == 200


def test_a_key_is_kept_three_hours_of_the_emulator_clock(
    api: ApiV2, emulator: EmulatorHandle, billing_key: str
) -> None:
    payment_id, k = uid("pay"), key()
    first = api.pay(payment_id, billing_key, idempotency_key=k)
    set_faults(api.url, clock_offset_s=3 * 3600 - 60)
    assert api.pay(payment_id, billing_key, idempotency_key=k).content == first.content
    set_faults(api.url, clock_offset_s=3 * 3600 + 60)
    executed = api.pay(payment_id, billing_key, idempotency_key=k)
    assert executed.status_code == 409 and executed.json()["type"] == "ALREADY_PAID"
    assert db_payments(emulator, payment_id) == ["paid"]


@pytest.mark.parametrize(
    "header",
    ["idem-unquoted-0123456789", '"too-short"', '"' + "k" * 257 + '"', '"bad"quote-0123456789"',
     '"' + "é" * 20 + '"'],
    ids=["unquoted", "short", "long", "inner-quote", "non-ascii"],
)  # fmt: skip
def test_a_malformed_key_is_400_invalid_request_and_charges_nothing(
    api: ApiV2, emulator: EmulatorHandle, billing_key: str, header: str
) -> None:
    payment_id = uid("pay")
    body = {"billingKey": billing_key, "orderName": "n", "amount": {"total": 1}, "currency": "KRW"}
    r = api.call(
        "POST", PAY, paymentId=payment_id, json=body,
        headers={"Idempotency-Key": header.encode().decode("latin-1")},
    )  # fmt: skip
    assert r.status_code == 400 and r.json()["type"] == "INVALID_REQUEST"
    assert db_payments(emulator, payment_id) == []


def test_a_key_reused_for_another_request_is_400_and_charges_nothing(
    api: ApiV2, emulator: EmulatorHandle, billing_key: str
) -> None:
    k, other = key(), uid("pay")
    assert api.pay(uid("pay"), billing_key, idempotency_key=k).status_code == 200
    r = api.pay(other, billing_key, idempotency_key=k)
    assert r.status_code == 400 and r.json()["type"] == "INVALID_REQUEST"
    assert db_payments(emulator, other) == []


def test_a_401_does_not_use_up_the_key(api: ApiV2, billing_key: str) -> None:
    payment_id, k = uid("pay"), key()
    body = {"billingKey": billing_key, "orderName": "n", "amount": {"total": 1}, "currency": "KRW"}
    refused = api.call(
        "POST", PAY, paymentId=payment_id, json=body, auth="PortOne nope", idempotency_key=k
    )
    assert refused.status_code == 401
    r = api.call("POST", PAY, paymentId=payment_id, json=body, idempotency_key=k)
    assert r.status_code == 200


def test_keys_survive_a_restart(tmp_path: Path) -> None:
    db, payment_id, k = tmp_path / "restart.db", uid("pay"), key()
    with start(db) as first_run:
        api = ApiV2(first_run.url)
        billing_key = api.issue(CARD_ALWAYS_PAID)
        first = api.pay(payment_id, billing_key, idempotency_key=k)
    with start(db) as second_run:
        again = ApiV2(second_run.url).pay(payment_id, billing_key, idempotency_key=k)
    assert (again.status_code, again.content) == (200, first.content)


def test_a_key_in_flight_when_the_process_dies_is_free_after_the_restart(tmp_path: Path) -> None:
    """The claim of a request that never finished answers nothing: the retry runs."""
    config = EmulatorConfig(db_path=str(tmp_path / "crash.db"), api="v2")
    payment_id, k = uid("pay"), key()
    with start_emulator_process(config, log_path=tmp_path / "first.log") as process:
        api = ApiV2(process.url)
        billing_key = api.issue(CARD_ALWAYS_PAID)
        requests.post(f"{process.url}/__emulator__/hold", json={"charges": 1}, timeout=5)
        threading.Thread(
            target=lambda: pytest.raises(
                requests.ConnectionError, api.pay, payment_id, billing_key, idempotency_key=k
            ),
            daemon=True,
        ).start()
        wait_for_held(process.url)
        process.kill()
    with start_emulator_process(config, log_path=tmp_path / "second.log") as process:
        retry = ApiV2(process.url).pay(payment_id, billing_key, idempotency_key=k)
    assert retry.status_code == 200


# -- webhooks -------------------------------------------------------------------------------------


def verified(delivery: dict[str, Any]) -> dict[str, Any]:
    return Webhook(WEBHOOK_SECRET).verify(delivery["body"], delivery["headers"])


def test_a_paid_charge_sends_a_signed_transaction_paid_webhook(
    api: ApiV2, emulator: EmulatorHandle, receiver: Receiver, billing_key: str
) -> None:
    payment_id = paid(api, billing_key)
    deadline = time.monotonic() + 10
    while not receiver.of(payment_id) and time.monotonic() < deadline:
        time.sleep(0.02)
    (delivery,) = receiver.of(payment_id)
    event = verified(delivery)
    assert event["type"] == "Transaction.Paid"
    assert event["data"] == {
        "paymentId": payment_id,
        "storeId": emulator.config.store_id,
        "transactionId": get_payment(api, payment_id)["transactionId"],
    }
    assert delivery["headers"]["webhook-id"].startswith("msg_")


def test_a_tampered_webhook_fails_verification(
    api: ApiV2, receiver: Receiver, billing_key: str
) -> None:
    payment_id = paid(api, billing_key)
    deadline = time.monotonic() + 10
    while not receiver.of(payment_id) and time.monotonic() < deadline:
        time.sleep(0.02)
    delivery = receiver.of(payment_id)[0]
    with pytest.raises(Exception, match="signature"):
        verified({**delivery, "body": delivery["body"].replace(payment_id, "pay-other")})


def test_decline_and_cancel_webhooks_name_their_transaction_events(
    api: ApiV2, receiver: Receiver, billing_key: str
) -> None:
    declined = uid("pay")
    api.pay(declined, api.issue(CARD_SOFT_DECLINE))
    refunded = paid(api, billing_key)
    cancel(api, refunded, amount=1000)
    cancel(api, refunded)
    deadline = time.monotonic() + 10
    while len(receiver.of(refunded)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [verified(d)["type"] for d in receiver.of(declined)] == ["Transaction.Failed"]
    assert sorted(verified(d)["type"] for d in receiver.of(refunded)) == [
        "Transaction.Cancelled",
        "Transaction.Paid",
        "Transaction.PartialCancelled",
    ]


def test_a_failed_delivery_is_retried_under_the_same_webhook_id(tmp_path: Path) -> None:
    with webhook_receiver() as failing:
        failing.failures = 2
        with start(
            tmp_path / "retry.db", webhook_url=failing.url, webhook_secret=WEBHOOK_SECRET
        ) as handle:
            api = ApiV2(handle.url)
            paid(api, api.issue(CARD_ALWAYS_PAID))
            deliveries = failing.wait_for(3)
            listed = requests.get(f"{handle.url}/__emulator__/webhooks", timeout=5).json()
        assert [d["answered"] for d in deliveries] == [500, 500, 204]
        assert len({d["headers"]["webhook-id"] for d in deliveries}) == 1
        assert len({d["body"] for d in deliveries}) == 1
        assert all(verified(d) for d in deliveries)
        (webhook,) = listed["webhooks"]
        assert (webhook["attempts"], webhook["last_status"]) == (3, 204)


def test_redeliver_sends_the_same_webhook_id_and_body(
    api: ApiV2, receiver: Receiver, billing_key: str
) -> None:
    payment_id = paid(api, billing_key)
    deadline = time.monotonic() + 10
    while not receiver.of(payment_id) and time.monotonic() < deadline:
        time.sleep(0.02)
    webhook_id = receiver.of(payment_id)[0]["headers"]["webhook-id"]
    r = requests.post(f"{api.url}/__emulator__/webhooks/{webhook_id}/redeliver", timeout=5)
    assert r.status_code == 200
    while len(receiver.of(payment_id)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    first, second = receiver.of(payment_id)
    assert second["headers"]["webhook-id"] == webhook_id and second["body"] == first["body"]
    assert verified(second)


def test_skip_webhook_sends_none(api: ApiV2, receiver: Receiver, billing_key: str) -> None:
    payment_id = uid("pay")
    assert api.pay(payment_id, billing_key, skipWebhook=True).status_code == 200
    marker = paid(api, billing_key)  # webhooks go in order: once this one is in, so is the first
    deadline = time.monotonic() + 10
    while not receiver.of(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert receiver.of(marker) and receiver.of(payment_id) == []


# -- faults ---------------------------------------------------------------------------------------


def test_error_rate_answers_5xx_and_charges_nothing(
    api: ApiV2, emulator: EmulatorHandle, billing_key: str
) -> None:
    payment_id = uid("pay")
    set_faults(api.url, error_rate=1.0)
    replies = [api.pay(payment_id, billing_key, validate=False) for _ in range(10)]
    assert {r.status_code for r in replies} <= {500, 502, 503}
    json_ones = [r.json() for r in replies if r.headers["content-type"] == "application/json"]
    assert json_ones and all(b["type"] == "INTERNAL_SERVER_ERROR" for b in json_ones)
    assert db_payments(emulator, payment_id) == []


def test_a_key_answered_by_an_emulated_fault_is_not_used_up(
    api: ApiV2, emulator: EmulatorHandle, billing_key: str
) -> None:
    payment_id, k = uid("pay"), key()
    set_faults(api.url, rate_limit_rate=1.0)
    limited = api.pay(payment_id, billing_key, idempotency_key=k, validate=False)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
    set_faults(api.url, rate_limit_rate=0)
    assert api.pay(payment_id, billing_key, idempotency_key=k).status_code == 200
    assert db_payments(emulator, payment_id) == ["paid"]


def test_drop_after_commit_then_the_same_key_replays_the_paid_answer(tmp_path: Path) -> None:
    """A real process, so the drop is a real TCP reset."""
    config = EmulatorConfig(
        db_path=str(tmp_path / "drop.db"), api="v2", drop_after_commit_rate=1.0, seed=3
    )
    with start_emulator_process(config, log_path=tmp_path / "emulator.log") as process:
        api = ApiV2(process.url)
        billing_key = api.issue(CARD_ALWAYS_PAID)
        payment_id, k = uid("pay"), key()
        with pytest.raises(requests.ConnectionError):
            api.pay(payment_id, billing_key, idempotency_key=k)
        set_faults(process.url, drop_after_commit_rate=0)
        retry = api.pay(payment_id, billing_key, idempotency_key=k)
        assert retry.status_code == 200
        assert get_payment(api, payment_id)["pgTxId"] == retry.json()["payment"]["pgTxId"]


def test_foreign_404_answers_lookups_for_the_gateway(api: ApiV2, billing_key: str) -> None:
    payment_id = paid(api, billing_key)
    set_faults(api.url, foreign_404_json=True)
    r = api.call("GET", PAYMENT, paymentId=payment_id, validate=False)
    assert (r.status_code, r.json()) == (404, {"error": "not found"})


def test_charge_foreign_404_answers_html_and_charges_nothing(
    api: ApiV2, emulator: EmulatorHandle, billing_key: str
) -> None:
    payment_id = uid("pay")
    set_faults(api.url, charge_foreign_404=True)
    r = api.pay(payment_id, billing_key, validate=False)
    assert r.status_code == 404 and "nginx" in r.text
    assert db_payments(emulator, payment_id) == []


def test_charge_status_ready_leaves_the_payment_ready(api: ApiV2, billing_key: str) -> None:
    payment_id = uid("pay")
    set_faults(api.url, charge_status_ready=True)
    r = api.pay(payment_id, billing_key)
    assert r.status_code == 502 and r.json()["type"] == "PG_PROVIDER"
    assert get_payment(api, payment_id)["status"] == "READY"


def test_drop_cancel_reply_commits_the_cancel(tmp_path: Path) -> None:
    config = EmulatorConfig(db_path=str(tmp_path / "dropc.db"), api="v2", drop_cancel_reply=True)
    with start_emulator_process(config, log_path=tmp_path / "emulator.log") as process:
        api = ApiV2(process.url)
        payment_id = paid(api, api.issue(CARD_ALWAYS_PAID))
        with pytest.raises(requests.ConnectionError):
            cancel(api, payment_id)
        assert get_payment(api, payment_id)["status"] == "CANCELLED"


def test_stats_count_v2_requests_charges_and_idempotency(api: ApiV2, billing_key: str) -> None:
    k = key()
    api.pay(uid("pay"), billing_key, idempotency_key=k)
    stats = requests.get(f"{api.url}/__emulator__/stats", timeout=5).json()
    assert stats["requests"]["POST /payments/{payment_id}/billing-key"] >= 1
    assert stats["charges"]["committed"] >= 1
    assert stats["idempotency"]["claimed"] >= 1
    assert stats["payments"]["paid"] >= 1


# -- running it -----------------------------------------------------------------------------------


def test_issue_billing_key_helper_issues_a_chargeable_key(api: ApiV2) -> None:
    billing_key = issue_billing_key(api.url, CARD_SOFT_DECLINE)
    assert api.pay(uid("pay"), billing_key).json()["pgMessage"] == SOFT_DECLINE_REASON
    with pytest.raises(RuntimeError, match="HTTP 401"):
        issue_billing_key(api.url, CARD_ALWAYS_PAID, api_secret="wrong")


def test_seeded_billing_keys_are_chargeable(api: ApiV2, emulator: EmulatorHandle) -> None:
    billing_key = uid("seeded-key")
    assert seed_customers(emulator.config.db_path, [(billing_key, CARD_ALWAYS_PAID)]) == 1
    assert api.pay(uid("pay"), billing_key).status_code == 200


def test_cli_takes_api_v2_and_its_flags(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["--api", "v2", "--webhook-url", "http://127.0.0.1:1/h", "--store-id", "store-x"]
    )
    assert (args.api, args.webhook_url, args.store_id) == ("v2", "http://127.0.0.1:1/h", "store-x")
    assert build_parser().parse_args([]).api == "v1"
    config = EmulatorConfig(api="v2", webhook_url="http://127.0.0.1:1/h",
                            webhook_secret=WEBHOOK_SECRET)  # fmt: skip
    line = cli_args(config, 8099)
    assert line[line.index("--api") + 1] == "v2" and WEBHOOK_SECRET not in line
    assert config.api_secret not in line and config.api_secret not in repr(config)


@pytest.mark.parametrize(
    "changes",
    [{"api": "v3"}, {"webhook_url": "http://x"}, {"webhook_secret": "secret"},
     {"webhook_secret": "whsec_not base64!"}],
    ids=["api", "url-without-secret", "no-prefix", "not-base64"],
)  # fmt: skip
def test_config_refuses_bad_v2_settings(changes: dict[str, str]) -> None:
    with pytest.raises(ValueError) as e:
        EmulatorConfig(**changes)  # type: ignore[arg-type]
    assert "secret!" not in str(e.value)


def test_a_process_takes_the_api_secret_from_the_environment(tmp_path: Path) -> None:
    config = EmulatorConfig(db_path=str(tmp_path / "p.db"), api="v2", api_secret="s3cr3t-v2")
    with start_emulator_process(config, log_path=tmp_path / "emulator.log") as process:
        assert (
            ApiV2(process.url, "s3cr3t-v2").call("GET", PAYMENT, paymentId="x").status_code == 404
        )
        assert ApiV2(process.url).call("GET", PAYMENT, paymentId="x").status_code == 401
    assert "s3cr3t-v2" not in (tmp_path / "emulator.log").read_text()


# -- the validator --------------------------------------------------------------------------------


def test_the_validator_rejects_a_payment_missing_a_required_field(
    api: ApiV2, billing_key: str
) -> None:
    payment = get_payment(api, paid(api, billing_key))
    validate_v2_response("GET", PAYMENT, 200, payment)
    del payment["paidAt"]
    with pytest.raises(jsonschema.ValidationError):
        validate_v2_response("GET", PAYMENT, 200, payment)


def test_the_validator_rejects_a_date_time_that_is_not_rfc_3339(
    api: ApiV2, billing_key: str
) -> None:
    payment = get_payment(api, paid(api, billing_key))
    with pytest.raises(jsonschema.ValidationError):
        validate_v2_response("GET", PAYMENT, 200, {**payment, "paidAt": "1764457221"})


def test_the_validator_rejects_a_field_the_spec_does_not_name(api: ApiV2, billing_key: str) -> None:
    payment = get_payment(api, paid(api, billing_key))
    with pytest.raises(jsonschema.ValidationError):
        validate_v2_response("GET", PAYMENT, 200, {**payment, "imp_uid": "imp_1"})


def test_the_validator_rejects_an_unknown_tag_and_a_wrong_status(api: ApiV2) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate_v2_response("GET", PAYMENT, 200, {"status": "SHIPPED", "id": "x"})
    with pytest.raises(AssertionError):
        validate_v2_response("POST", PAY, 400, {"type": "ALREADY_PAID", "message": "m"})
    with pytest.raises(jsonschema.ValidationError):
        validate_v2_response("POST", PAY, 502, {"type": "PG_PROVIDER", "message": "no code"})
