"""The Iamport V1 emulator over real HTTP on loopback: semantics, spec conformance, faults."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
from emulator_fixtures import Api, validate_response
from iamport_billing.emulator import (
    CARD_ALWAYS_PAID,
    CARD_HARD_DECLINE,
    CARD_SOFT_DECLINE,
    HARD_DECLINE_REASON,
    SOFT_DECLINE_REASON,
    EmulatorConfig,
    EmulatorHandle,
    mask_card_number,
    register_card,
    run_emulator_in_thread,
    seed_customers,
    start_emulator_process,
)

OTHER_CARD = "5555-4444-3333-1111"
DUPLICATE_MESSAGE = (
    "이미 주문이 이루어진 건입니다. (동일한 merchant_uid로 결제 또는 취소된 기록이 있습니다)"
)
NO_FAULTS = {
    "latency_ms": 0,
    "latency_jitter_ms": 0,
    "error_rate": 0,
    "rate_limit_rate": 0,
    "drop_after_commit_rate": 0,
}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def start(tmp_path: Path, **overrides: object) -> EmulatorHandle:
    return run_emulator_in_thread(
        EmulatorConfig(db_path=str(tmp_path / "emulator.db"), seed=7, **overrides)  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorHandle]:
    with start(tmp_path_factory.mktemp("emulator")) as handle:
        yield handle


@pytest.fixture
def api(emulator: EmulatorHandle) -> Iterator[Api]:
    client = Api(emulator.url)
    yield client
    requests.post(f"{emulator.url}/__emulator__/faults", json=NO_FAULTS, timeout=5)


@pytest.fixture
def customer(api: Api) -> str:
    customer_uid = uid("cust")
    api.register(customer_uid, CARD_ALWAYS_PAID)
    return customer_uid


def db_payments(handle: EmulatorHandle, merchant_uid: str) -> list[sqlite3.Row]:
    """Audit straight from the SQLite file, as a test of 'what was really charged'."""
    with sqlite3.connect(handle.config.db_path) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(
            "SELECT * FROM payments WHERE merchant_uid = ? ORDER BY seq", (merchant_uid,)
        ).fetchall()


def set_faults(api: Api, **faults: float) -> None:
    r = requests.post(f"{api.url}/__emulator__/faults", json=faults, timeout=5)
    assert r.status_code == 200, r.text


# -- tokens ------------------------------------------------------------------------------------


def test_get_token_issues_40_hex_token_valid_for_ttl(api: Api) -> None:
    token = api.get_token()
    assert len(token["access_token"]) == 40
    int(token["access_token"], 16)
    assert token["expired_at"] - token["now"] == 1800
    assert abs(token["now"] - time.time()) < 5


def test_get_token_again_returns_same_token_and_expiry(api: Api) -> None:
    first, second = api.get_token(), api.get_token()
    assert second["access_token"] == first["access_token"]
    assert second["expired_at"] == first["expired_at"]


def test_get_token_accepts_form_body(api: Api) -> None:
    r = api.call(
        "POST", "/users/getToken", auth=False,
        data={"imp_key": "imp_test_key", "imp_secret": "imp_test_secret"},
    )  # fmt: skip
    assert r.json()["code"] == 0 and r.json()["message"] is None


def test_get_token_with_wrong_secret_is_401_envelope(api: Api) -> None:
    r = api.call(
        "POST", "/users/getToken", auth=False,
        json={"imp_key": "imp_test_key", "imp_secret": "wrong"},
    )  # fmt: skip
    assert r.status_code == 401
    assert r.json()["code"] == -1 and r.json()["response"] is None and r.json()["message"]


def test_get_token_in_last_window_extends_same_token(tmp_path: Path) -> None:
    with start(tmp_path, token_ttl_s=3, token_extend_window_s=2, token_extend_s=10) as handle:
        api = Api(handle.url)
        first = api.get_token()
        time.sleep(1.2)  # now within the last 2 s
        second = api.get_token()
    assert second["access_token"] == first["access_token"]
    assert second["expired_at"] == first["expired_at"] + 10


def test_get_token_after_expiry_issues_new_token(tmp_path: Path) -> None:
    with start(tmp_path, token_ttl_s=1) as handle:
        api = Api(handle.url)
        first = api.get_token()
        time.sleep(1.5)
        second = api.get_token()
    assert second["access_token"] != first["access_token"]
    assert second["expired_at"] > first["expired_at"]


def test_expired_token_is_401(tmp_path: Path) -> None:
    with start(tmp_path, token_ttl_s=1) as handle:
        api = Api(handle.url)
        token = api.token
        time.sleep(1.5)
        r = api.call("GET", "/payments/{imp_uid}", imp_uid="imp_000000000000", auth=token)
    assert r.status_code == 401


def test_missing_token_is_401(api: Api) -> None:
    r = api.call("GET", "/payments/{imp_uid}", imp_uid="imp_000000000000", auth=False)
    assert r.status_code == 401 and r.json()["code"] == -1


def test_unknown_token_is_401(api: Api) -> None:
    r = api.call("GET", "/payments/{imp_uid}", imp_uid="imp_000000000000", auth="0" * 40)
    assert r.status_code == 401


@pytest.mark.parametrize("style", ["Bearer {}", "{}", "bearer {}"])
def test_both_authorization_forms_are_accepted(api: Api, customer: str, style: str) -> None:
    r = api.call(
        "GET", "/subscribe/customers/{customer_uid}", customer_uid=customer,
        auth=style.format(api.token),
    )  # fmt: skip
    assert r.status_code == 200 and r.json()["response"]["customer_uid"] == customer


# -- billing keys ------------------------------------------------------------------------------


def test_register_billing_key_returns_masked_card(api: Api) -> None:
    customer_uid = uid("cust")
    customer = api.register(customer_uid, CARD_ALWAYS_PAID, customer_name="홍길동")
    assert customer["customer_uid"] == customer_uid
    assert customer["card_number"] == "4242-42**-****-4242"
    assert customer["customer_name"] == "홍길동"
    assert customer["inserted"] > 0 and customer["sandbox"] is False


def test_full_card_number_never_reaches_the_db_file(api: Api, emulator: EmulatorHandle) -> None:
    api.register(uid("cust"), "4111-1111-1111-1111")
    api.register(uid("cust"), "4111111111111111")
    db = Path(emulator.config.db_path)
    raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    assert b"4111111111111111" not in raw and b"4111-1111-1111-1111" not in raw


def test_mask_card_number_keeps_first_six_and_last_four() -> None:
    assert mask_card_number("4242424242424242") == "4242-42**-****-4242"
    assert mask_card_number("3782-822463-10005") == "3782-82**-***0-005"


def test_register_with_invalid_card_number_is_refused(api: Api) -> None:
    r = api.call(
        "POST", "/subscribe/customers/{customer_uid}", customer_uid=uid("cust"),
        json={"card_number": "1234", "expiry": "2030-12"},
    )  # fmt: skip
    assert r.status_code == 200 and r.json()["code"] != 0 and r.json()["response"] is None


def test_get_billing_key(api: Api, customer: str) -> None:
    r = api.call("GET", "/subscribe/customers/{customer_uid}", customer_uid=customer)
    assert r.json()["response"]["card_number"] == "4242-42**-****-4242"


def test_get_unknown_billing_key_is_404_code_1(api: Api) -> None:
    r = api.call("GET", "/subscribe/customers/{customer_uid}", customer_uid="nobody")
    assert r.status_code == 404
    assert r.json()["code"] == 1
    assert r.json()["message"] == "요청하신 customer_uid(nobody)로 등록된 정보를 찾을 수 없습니다."


def test_delete_billing_key_returns_it_and_removes_it(api: Api, customer: str) -> None:
    r = api.call(
        "DELETE", "/subscribe/customers/{customer_uid}", customer_uid=customer,
        params={"reason": "user left"},
    )  # fmt: skip
    assert r.json()["response"]["customer_uid"] == customer
    again = api.call("GET", "/subscribe/customers/{customer_uid}", customer_uid=customer)
    assert again.status_code == 404


def test_delete_unknown_billing_key_is_404_code_1(api: Api) -> None:
    r = api.call("DELETE", "/subscribe/customers/{customer_uid}", customer_uid="nobody")
    assert r.status_code == 404 and r.json()["code"] == 1


def test_register_again_replaces_the_card(api: Api, customer: str) -> None:
    api.register(customer, CARD_HARD_DECLINE)
    r = api.call("GET", "/subscribe/customers/{customer_uid}", customer_uid=customer)
    assert r.json()["response"]["card_number"] == "4000-00**-****-0069"


def test_bulk_lookup_all_found_is_200(api: Api, customer: str) -> None:
    other = uid("cust")
    api.register(other, OTHER_CARD)
    params = [("customer_uid[]", customer), ("customer_uid[]", other)]
    r = api.call("GET", "/subscribe/customers", params=params)
    assert r.status_code == 200
    assert [c["customer_uid"] for c in r.json()["response"]] == [customer, other]


def test_bulk_lookup_some_found_is_207(api: Api, customer: str) -> None:
    params = [("customer_uid[]", customer), ("customer_uid[]", "nobody")]
    r = api.call("GET", "/subscribe/customers", params=params)
    assert r.status_code == 207 and r.json()["code"] == 0
    assert [c["customer_uid"] for c in r.json()["response"]] == [customer]


def test_bulk_lookup_none_found_is_404(api: Api) -> None:
    r = api.call("GET", "/subscribe/customers", params=[("customer_uid[]", "nobody")])
    assert r.status_code == 404


# -- charges -----------------------------------------------------------------------------------


def test_charge_on_4242_is_paid_with_full_payment(api: Api, customer: str) -> None:
    merchant_uid = uid("order")
    reply = api.charge(customer, merchant_uid, 9900, buyer_name="홍길동", custom_data={"a": 1})
    p = reply["response"]
    assert reply["code"] == 0 and reply["message"] is None
    assert p["status"] == "paid" and p["amount"] == 9900 and p["cancel_amount"] == 0
    assert (
        p["imp_uid"].startswith("imp_") and len(p["imp_uid"]) == 16 and p["imp_uid"][4:].isdigit()
    )
    assert p["paid_at"] > 0 and p["failed_at"] == 0 and p["apply_num"] and p["pg_tid"]
    assert (
        p["pg_provider"] == "nice" and p["card_name"] and p["card_number"] == "4242-42**-****-4242"
    )
    assert (p["customer_uid"], p["customer_uid_usage"]) == (customer, "payment")
    assert (p["channel"], p["pay_method"], p["sandbox"]) == ("api", "card", False)
    assert p["buyer_name"] == "홍길동" and p["custom_data"] == '{"a": 1}'
    assert p["receipt_url"].startswith(api.url + "/receipts/")


def test_charge_on_other_card_number_is_paid(api: Api) -> None:
    customer_uid = uid("cust")
    api.register(customer_uid, OTHER_CARD)
    assert api.charge(customer_uid, uid("order"))["response"]["status"] == "paid"


@pytest.mark.parametrize(
    ("card", "reason"),
    [(CARD_SOFT_DECLINE, SOFT_DECLINE_REASON), (CARD_HARD_DECLINE, HARD_DECLINE_REASON)],
    ids=["soft", "hard"],
)
def test_charge_on_decline_card_is_failed_payment(api: Api, card: str, reason: str) -> None:
    customer_uid = uid("cust")
    api.register(customer_uid, card)
    reply = api.charge(customer_uid, uid("order"))
    p = reply["response"]
    assert reply["code"] == 0
    assert p["status"] == "failed" and p["fail_reason"] == reason
    assert p["failed_at"] > 0 and p["paid_at"] == 0 and p["imp_uid"].startswith("imp_")


def test_charge_accepts_form_body(api: Api, customer: str) -> None:
    body = {"customer_uid": customer, "merchant_uid": uid("order"), "amount": "5000", "name": "n"}
    r = api.call("POST", "/subscribe/payments/again", data=body)
    assert r.json()["response"]["status"] == "paid" and r.json()["response"]["amount"] == 5000


def test_charge_unknown_customer_is_code_1_and_charges_nothing(
    api: Api, emulator: EmulatorHandle
) -> None:
    merchant_uid = uid("order")
    reply = api.charge("nobody", merchant_uid)
    assert reply == {"code": 1, "message": "등록되지 않은 구매자입니다.", "response": None}
    assert db_payments(emulator, merchant_uid) == []


def test_charge_duplicate_after_paid_is_refused_and_charges_nothing(
    api: Api, emulator: EmulatorHandle, customer: str
) -> None:
    merchant_uid = uid("order")
    api.charge(customer, merchant_uid)
    reply = api.charge(customer, merchant_uid)
    assert reply == {"code": 1, "message": DUPLICATE_MESSAGE, "response": None}
    assert len(db_payments(emulator, merchant_uid)) == 1


def test_charge_duplicate_after_cancelled_is_refused(api: Api, customer: str) -> None:
    merchant_uid = uid("order")
    api.charge(customer, merchant_uid)
    api.call("POST", "/payments/cancel", json={"merchant_uid": merchant_uid, "reason": "r"})
    assert api.charge(customer, merchant_uid)["message"] == DUPLICATE_MESSAGE


def test_charge_same_merchant_uid_after_failed_is_new_attempt(
    api: Api, emulator: EmulatorHandle
) -> None:
    customer_uid, merchant_uid = uid("cust"), uid("order")
    api.register(customer_uid, CARD_SOFT_DECLINE)
    failed = api.charge(customer_uid, merchant_uid)["response"]
    api.register(customer_uid, CARD_ALWAYS_PAID)
    paid = api.charge(customer_uid, merchant_uid)["response"]
    assert (failed["status"], paid["status"]) == ("failed", "paid")
    assert failed["imp_uid"] != paid["imp_uid"]
    assert [r["status"] for r in db_payments(emulator, merchant_uid)] == ["failed", "paid"]


def test_a_held_charge_reaches_iamport_only_when_released(
    api: Api, emulator: EmulatorHandle
) -> None:
    customer_uid, merchant_uid = uid("cust"), uid("order")
    api.register(customer_uid, CARD_ALWAYS_PAID)
    requests.post(f"{api.url}/__emulator__/hold", json={"charges": 1}, timeout=5)
    first: dict[str, Any] = {}
    stuck = threading.Thread(target=lambda: first.update(api.charge(customer_uid, merchant_uid)))
    stuck.start()
    held = _wait_for_held(api.url)
    # Meanwhile a second request for the merchant_uid passes, on a card now declining.
    api.register(customer_uid, CARD_SOFT_DECLINE)
    second = api.charge(customer_uid, merchant_uid)["response"]
    api.register(customer_uid, CARD_ALWAYS_PAID)
    released = requests.post(f"{api.url}/__emulator__/release", timeout=5).json()["released"]
    stuck.join(10)
    assert held == {merchant_uid: customer_uid} and released == [merchant_uid]
    assert (second["status"], first["response"]["status"]) == ("failed", "paid")
    assert [r["status"] for r in db_payments(emulator, merchant_uid)] == ["failed", "paid"]


def _wait_for_held(url: str) -> dict[str, str]:
    for _ in range(200):
        held = requests.get(f"{url}/__emulator__/stats", timeout=5).json()["held"]
        if held:
            return held
        time.sleep(0.02)
    raise AssertionError("no charge was held")


@pytest.mark.parametrize(
    "change",
    [
        {"merchant_uid": "m" * 41},
        {"customer_uid": "c" * 81},
        {"amount": 0},
        {"amount": -100},
        {"amount": "abc"},
        {"amount": True},
        {"name": None},
    ],
    ids=["merchant_uid>40", "customer_uid>80", "amount=0", "amount<0", "amount=abc",
         "amount=true", "no-name"],
)  # fmt: skip
def test_charge_with_invalid_fields_is_refused_and_charges_nothing(
    api: Api, emulator: EmulatorHandle, customer: str, change: dict[str, object]
) -> None:
    merchant_uid = uid("order")
    body = {"customer_uid": customer, "merchant_uid": merchant_uid, "amount": 1000, "name": "n"}
    body.update(change)
    r = api.call("POST", "/subscribe/payments/again", json={k: v for k, v in body.items() if v})
    assert r.status_code == 200 and r.json()["code"] != 0 and r.json()["response"] is None
    assert db_payments(emulator, str(body["merchant_uid"])) == []


def test_receipt_url_serves_html(api: Api, customer: str) -> None:
    payment = api.charge(customer, uid("order"))["response"]
    r = requests.get(payment["receipt_url"], timeout=5)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert payment["imp_uid"] in r.text


def test_concurrent_charges_on_one_merchant_uid_pay_exactly_once(
    api: Api, emulator: EmulatorHandle, customer: str
) -> None:
    merchant_uid = uid("order")
    token = api.token
    barrier = threading.Barrier(20)
    replies: list[dict[str, object]] = []

    def charge() -> None:
        body = {"customer_uid": customer, "merchant_uid": merchant_uid, "amount": 1000, "name": "n"}
        barrier.wait()
        r = requests.post(
            f"{api.url}/subscribe/payments/again", json=body,
            headers={"Authorization": token}, timeout=30,
        )  # fmt: skip
        replies.append(r.json())

    threads = [threading.Thread(target=charge) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["code"] for r in replies) == [0] + [1] * 19
    assert [r["status"] for r in db_payments(emulator, merchant_uid)] == ["paid"]


# -- lookups -----------------------------------------------------------------------------------


def test_get_payment_by_imp_uid(api: Api, customer: str) -> None:
    payment = api.charge(customer, uid("order"))["response"]
    r = api.call("GET", "/payments/{imp_uid}", imp_uid=payment["imp_uid"])
    assert r.json()["response"] == payment


def test_get_unknown_payment_is_404(api: Api) -> None:
    r = api.call("GET", "/payments/{imp_uid}", imp_uid="imp_999999999999")
    assert r.status_code == 404 and r.json()["message"] == "존재하지 않는 결제정보입니다."


def test_find_returns_latest_attempt(api: Api) -> None:
    customer_uid, merchant_uid = uid("cust"), uid("order")
    api.register(customer_uid, CARD_SOFT_DECLINE)
    api.charge(customer_uid, merchant_uid)
    latest = api.charge(customer_uid, merchant_uid)["response"]
    r = api.call("GET", "/payments/find/{merchant_uid}", merchant_uid=merchant_uid)
    assert r.json()["response"]["imp_uid"] == latest["imp_uid"]


def test_find_with_status_paid(api: Api, customer: str) -> None:
    merchant_uid = uid("order")
    paid = api.charge(customer, merchant_uid)["response"]
    r = api.call(
        "GET", "/payments/find/{merchant_uid}/{payment_status}",
        merchant_uid=merchant_uid, payment_status="paid",
    )  # fmt: skip
    assert r.json()["response"]["imp_uid"] == paid["imp_uid"]


def test_find_with_status_and_no_such_payment_is_404(api: Api, customer: str) -> None:
    merchant_uid = uid("order")
    api.charge(customer, merchant_uid)
    r = api.call(
        "GET", "/payments/find/{merchant_uid}/{payment_status}",
        merchant_uid=merchant_uid, payment_status="failed",
    )  # fmt: skip
    assert r.status_code == 404


def test_find_unknown_merchant_uid_is_404(api: Api) -> None:
    r = api.call("GET", "/payments/find/{merchant_uid}", merchant_uid="no-such-order")
    assert r.status_code == 404


def test_find_all_pages_through_every_attempt(api: Api) -> None:
    customer_uid, merchant_uid = uid("cust"), uid("order")
    api.register(customer_uid, CARD_SOFT_DECLINE)
    imp_uids = [api.charge(customer_uid, merchant_uid)["response"]["imp_uid"] for _ in range(3)]
    template = "/payments/findAll/{merchant_uid}"
    first = api.call("GET", template, merchant_uid=merchant_uid, params={"limit": 2}).json()
    second = api.call(
        "GET", template, merchant_uid=merchant_uid, params={"limit": 2, "page": 2}
    ).json()  # fmt: skip
    assert (first["response"]["total"], first["response"]["previous"]) == (3, 0)
    assert (first["response"]["next"], second["response"]["previous"]) == (2, 1)
    assert second["response"]["next"] == 0
    listed = [p["imp_uid"] for p in first["response"]["list"] + second["response"]["list"]]
    assert listed == imp_uids[::-1]


def test_find_all_with_status_filters(api: Api) -> None:
    customer_uid, merchant_uid = uid("cust"), uid("order")
    api.register(customer_uid, CARD_SOFT_DECLINE)
    api.charge(customer_uid, merchant_uid)
    api.register(customer_uid, CARD_ALWAYS_PAID)
    api.charge(customer_uid, merchant_uid)
    r = api.call(
        "GET", "/payments/findAll/{merchant_uid}/{payment_status}",
        merchant_uid=merchant_uid, payment_status="paid",
    )  # fmt: skip
    assert [p["status"] for p in r.json()["response"]["list"]] == ["paid"]


def test_find_all_unknown_merchant_uid_is_404(api: Api) -> None:
    r = api.call("GET", "/payments/findAll/{merchant_uid}", merchant_uid="no-such-order")
    assert r.status_code == 404


def test_status_lists_payments_in_time_window(api: Api, customer: str) -> None:
    paid = api.charge(customer, uid("order"))["response"]
    window = {"from": paid["paid_at"] - 1, "to": paid["paid_at"] + 1, "limit": 1000}
    r = api.call("GET", "/payments/status/{payment_status}", payment_status="paid", params=window)
    assert paid["imp_uid"] in [p["imp_uid"] for p in r.json()["response"]["list"]]
    assert all(p["status"] == "paid" for p in r.json()["response"]["list"])
    past = {"from": paid["paid_at"] - 100, "to": paid["paid_at"] - 50}
    empty = api.call("GET", "/payments/status/{payment_status}", payment_status="paid", params=past)
    assert empty.json()["response"] == {"total": 0, "previous": 0, "next": 0, "list": []}


def test_status_all_defaults_to_last_90_days(api: Api, customer: str) -> None:
    paid = api.charge(customer, uid("order"))["response"]
    r = api.call(
        "GET", "/payments/status/{payment_status}", payment_status="all",
        params={"limit": 1000, "sorting": "-started"},
    )  # fmt: skip
    assert r.json()["response"]["list"][0]["imp_uid"] == paid["imp_uid"]


@pytest.mark.parametrize(
    ("template", "params"),
    [
        ("/payments/status/{payment_status}", {"payment_status": "bogus"}),
        ("/payments/findAll/{merchant_uid}/{payment_status}",
         {"merchant_uid": "x", "payment_status": "all"}),
    ],
    ids=["status", "findAll"],
)  # fmt: skip
def test_unsupported_status_is_400(api: Api, template: str, params: dict[str, str]) -> None:
    r = api.call("GET", template, **params)
    assert r.status_code == 400 and r.json()["message"] == "지원되지 않는 상태값입니다."


# -- cancel ------------------------------------------------------------------------------------


def cancel(api: Api, **body: object) -> dict[str, object]:
    r = api.call("POST", "/payments/cancel", json={"reason": "test", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_cancel_full(api: Api, customer: str) -> None:
    payment = api.charge(customer, uid("order"), 10_000)["response"]
    p = cancel(api, imp_uid=payment["imp_uid"])["response"]
    assert p["status"] == "cancelled" and p["cancel_amount"] == 10_000 and p["cancelled_at"] > 0
    assert len(p["cancel_history"]) == 1 and p["cancel_history"][0]["amount"] == 10_000


def test_cancel_partial_then_rest(api: Api, customer: str) -> None:
    merchant_uid = uid("order")
    api.charge(customer, merchant_uid, 10_000)
    first = cancel(api, merchant_uid=merchant_uid, amount=3000, checksum=10_000)["response"]
    assert (first["status"], first["cancel_amount"]) == ("cancelled", 3000)
    rest = cancel(api, merchant_uid=merchant_uid, checksum=7000)["response"]
    assert rest["cancel_amount"] == 10_000
    assert [h["amount"] for h in rest["cancel_history"]] == [3000, 7000]


def test_cancel_with_checksum_mismatch_is_refused(api: Api, customer: str) -> None:
    payment = api.charge(customer, uid("order"), 10_000)["response"]
    reply = cancel(api, imp_uid=payment["imp_uid"], amount=1000, checksum=9000)
    assert reply["code"] != 0 and reply["response"] is None
    r = api.call("GET", "/payments/{imp_uid}", imp_uid=payment["imp_uid"])
    assert r.json()["response"]["cancel_amount"] == 0


def test_cancel_more_than_remaining_is_refused(api: Api, customer: str) -> None:
    payment = api.charge(customer, uid("order"), 10_000)["response"]
    reply = cancel(api, imp_uid=payment["imp_uid"], amount=10_001)
    assert reply["code"] != 0 and reply["response"] is None


def test_cancel_already_fully_cancelled_is_nothing_to_cancel(api: Api, customer: str) -> None:
    payment = api.charge(customer, uid("order"))["response"]
    cancel(api, imp_uid=payment["imp_uid"])
    reply = cancel(api, imp_uid=payment["imp_uid"])
    assert reply == {"code": 1, "message": "취소할 결제건이 존재하지 않습니다.", "response": None}


def test_cancel_failed_payment_is_nothing_to_cancel(api: Api) -> None:
    customer_uid = uid("cust")
    api.register(customer_uid, CARD_HARD_DECLINE)
    payment = api.charge(customer_uid, uid("order"))["response"]
    assert cancel(api, imp_uid=payment["imp_uid"])["code"] == 1


def test_cancel_imp_uid_wins_over_merchant_uid(api: Api, customer: str) -> None:
    merchant_uid = uid("order")
    api.charge(customer, merchant_uid)
    reply = cancel(api, imp_uid="imp_999999999999", merchant_uid=merchant_uid)
    assert reply["code"] == 1


# -- faults ------------------------------------------------------------------------------------


def test_error_rate_answers_5xx_before_doing_anything(
    api: Api, emulator: EmulatorHandle, customer: str
) -> None:
    token = api.token
    set_faults(api, error_rate=1.0)
    merchant_uid = uid("order")
    body = {"customer_uid": customer, "merchant_uid": merchant_uid, "amount": 1000, "name": "n"}
    replies = [
        requests.post(
            f"{api.url}/subscribe/payments/again", json=body,
            headers={"Authorization": token}, timeout=5,
        )
        for _ in range(20)
    ]  # fmt: skip
    assert {r.status_code for r in replies} <= {500, 502, 503}
    assert {r.headers["content-type"].split(";")[0] for r in replies} == {
        "text/html",
        "application/json",
    }
    assert db_payments(emulator, merchant_uid) == []


def test_rate_limit_answers_429_with_retry_after(
    api: Api, emulator: EmulatorHandle, customer: str
) -> None:
    token = api.token
    set_faults(api, rate_limit_rate=1.0)
    merchant_uid = uid("order")
    body = {"customer_uid": customer, "merchant_uid": merchant_uid, "amount": 1000, "name": "n"}
    r = requests.post(
        f"{api.url}/subscribe/payments/again", json=body, headers={"Authorization": token},
        timeout=5,
    )  # fmt: skip
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert db_payments(emulator, merchant_uid) == []


def test_latency_delays_answers(api: Api) -> None:
    set_faults(api, latency_ms=300, latency_jitter_ms=0)
    started = time.monotonic()
    api.get_token()
    assert time.monotonic() - started >= 0.3


def test_faults_endpoint_rejects_invalid_values(api: Api) -> None:
    r = requests.post(f"{api.url}/__emulator__/faults", json={"error_rate": 2}, timeout=5)
    assert r.status_code == 400
    r = requests.post(f"{api.url}/__emulator__/faults", json={"nonsense": 1}, timeout=5)
    assert r.status_code == 400


def test_stats_count_requests_tokens_faults_and_payments(api: Api, customer: str) -> None:
    api.charge(customer, uid("order"))
    set_faults(api, rate_limit_rate=1.0)
    requests.get(f"{api.url}/payments/imp_1", timeout=5)
    stats = requests.get(f"{api.url}/__emulator__/stats", timeout=5).json()
    assert stats["requests"]["POST /subscribe/payments/again"] >= 1
    assert stats["requests"]["GET /payments/{imp_uid}"] >= 1
    assert stats["tokens"]["issued"] >= 1
    assert stats["faults"]["rate_limit"] >= 1
    assert stats["payments"]["paid"] >= 1


def test_drop_after_commit_resets_connection_but_payment_is_committed(tmp_path: Path) -> None:
    """Runs the real console entry point as a process, so the drop is a real TCP reset."""
    db_path = tmp_path / "emulator.db"
    seed_customers(db_path, [("cust-drop", CARD_ALWAYS_PAID)])
    config = EmulatorConfig(db_path=str(db_path), drop_after_commit_rate=1.0, seed=3)
    with start_emulator_process(config, log_path=tmp_path / "emulator.log") as process:
        api = Api(process.url)
        body = {"customer_uid": "cust-drop", "merchant_uid": "order-drop", "amount": 1000,
                "name": "n"}  # fmt: skip
        with pytest.raises(requests.ConnectionError):
            api.session.post(
                f"{process.url}/subscribe/payments/again", json=body,
                headers={"Authorization": api.token}, timeout=10,
            )  # fmt: skip
        with sqlite3.connect(db_path) as conn:
            statuses = conn.execute(
                "SELECT status FROM payments WHERE merchant_uid = 'order-drop'"
            ).fetchall()
        assert statuses == [("paid",)]
        found = api.call("GET", "/payments/find/{merchant_uid}/{payment_status}",
                         merchant_uid="order-drop", payment_status="paid")  # fmt: skip
        assert found.json()["response"]["amount"] == 1000
    assert "ASGI" not in (tmp_path / "emulator.log").read_text()  # uvicorn did not answer a 500


# -- seeding and helpers -----------------------------------------------------------------------


def test_seed_customers_into_running_emulator_db(api: Api, emulator: EmulatorHandle) -> None:
    uids = [uid("seeded") for _ in range(500)]
    assert seed_customers(emulator.config.db_path, [(u, CARD_ALWAYS_PAID) for u in uids]) == 500
    assert api.charge(uids[-1], uid("order"))["response"]["status"] == "paid"


def test_register_card_helper_issues_billing_key(api: Api) -> None:
    customer_uid = uid("cust")
    customer = register_card(api.url, customer_uid, CARD_SOFT_DECLINE)
    assert customer["card_number"] == "4000-00**-****-0002"


# -- spec conformance --------------------------------------------------------------------------


def test_every_endpoint_answers_per_official_spec(api: Api) -> None:
    """Api.call validates each answer; this drives every endpoint and status the emulator uses."""
    customer_uid, merchant_uid = uid("cust"), uid("order")
    api.register(customer_uid, CARD_ALWAYS_PAID, customer_email="a@example.com")
    payment = api.charge(customer_uid, merchant_uid)["response"]
    calls = [
        ("GET", "/subscribe/customers/{customer_uid}", {"customer_uid": customer_uid}),
        ("GET", "/subscribe/customers/{customer_uid}", {"customer_uid": "nobody"}),
        ("GET", "/subscribe/customers",
         {"params": [("customer_uid[]", customer_uid), ("customer_uid[]", "nobody")]}),
        ("GET", "/payments/{imp_uid}", {"imp_uid": payment["imp_uid"]}),
        ("GET", "/payments/find/{merchant_uid}", {"merchant_uid": merchant_uid}),
        ("GET", "/payments/findAll/{merchant_uid}", {"merchant_uid": merchant_uid}),
        ("GET", "/payments/status/{payment_status}", {"payment_status": "paid"}),
        ("POST", "/payments/cancel", {"json": {"imp_uid": payment["imp_uid"], "amount": 1}}),
        ("POST", "/payments/cancel", {"json": {"imp_uid": payment["imp_uid"], "checksum": 1}}),
        ("POST", "/subscribe/payments/again",
         {"json": {"customer_uid": customer_uid, "merchant_uid": merchant_uid, "amount": 1,
                   "name": "n"}}),
        ("DELETE", "/subscribe/customers/{customer_uid}", {"customer_uid": customer_uid}),
    ]  # fmt: skip
    statuses = [api.call(method, template, **kw).status_code for method, template, kw in calls]
    assert statuses == [200, 404, 207, 200, 200, 200, 200, 200, 200, 200, 200]


def test_spec_validator_rejects_a_payment_missing_a_required_field(api: Api, customer: str) -> None:
    reply = api.charge(customer, uid("order"))
    del reply["response"]["sandbox"]
    with pytest.raises(jsonschema.ValidationError):
        validate_response("POST", "/subscribe/payments/again", 200, reply)


def test_spec_validator_rejects_float_for_integer_field(api: Api, customer: str) -> None:
    reply = api.charge(customer, uid("order"))
    reply["response"]["paid_at"] = float(reply["response"]["paid_at"])
    with pytest.raises(jsonschema.ValidationError):
        validate_response("POST", "/subscribe/payments/again", 200, reply)


def test_iamport_hook_round_trip(
    api: Api, emulator: EmulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The project's client (raw Authorization header) drives the emulator end to end."""
    from iamport_billing.errors import IamportBillingKeyMissing, IamportRequestRejected
    from iamport_billing.hooks.iamport import IamportHook

    conn = {
        "conn_type": "iamport", "host": emulator.url, "login": "imp_test_key",
        "password": "imp_test_secret", "extra": {"header_style": "raw"},
    }  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_IAMPORT_EMULATOR", json.dumps(conn))
    customer_uid, merchant_uid = uid("cust"), uid("order")
    api.register(customer_uid, CARD_ALWAYS_PAID)
    hook = IamportHook("iamport_emulator")
    paid = hook.charge_again(customer_uid, merchant_uid, 1000, "plan")
    assert paid.is_paid and hook.find_payment(merchant_uid, "paid").imp_uid == paid.imp_uid
    with pytest.raises(IamportRequestRejected):
        hook.charge_again(customer_uid, merchant_uid, 1000, "plan")
    with pytest.raises(IamportBillingKeyMissing):
        hook.charge_again("nobody", uid("order"), 1000, "plan")
    refund = hook.cancel_payment(imp_uid=paid.imp_uid, amount=400, reason="r", checksum=1000)
    assert refund.net_amount == 600
    hook.close()
