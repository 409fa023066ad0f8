"""Gateway webhooks over HTTP (the plugin's webhook app under FastAPI's TestClient), with the
real V1 emulator as the gateway behind ``gateway_for`` and a real ledger on each database.

The lookup is gateway-agnostic, so PortOne V2-signed webhooks are checked against V1 payments.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from datetime import UTC, date, datetime, timedelta

import pytest
from iamport_billing.charging import ChargeEngine, ChargeSettings
from iamport_billing.gateways import gateway_for
from iamport_billing.policy import ChargeCandidate, merchant_uid_for
from standardwebhooks.webhooks import Webhook
from support import (
    PAYING_CARD,
    SOFT_DECLINE_CARD,
    crashed_pending_row,
    emulator_payments,
    faults,
    register_cards,
)

DAY = date(2026, 11, 26)
RUN = {"dag_id": "test", "run_id": "run-1", "task_id": "charge[0]", "try_number": 1}
# Standard Webhooks' documented test vector (the standardwebhooks package's own tests).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = '{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
LOOKUP = "GET /payments/findAll/{merchant_uid}"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


CURRENT, PREVIOUS = new_secret(), new_secret()


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """The ``portone_webhook`` connection: the current secret and the one being rotated out."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_PORTONE_WEBHOOK",
        json.dumps(
            {"conn_type": "generic", "password": CURRENT, "extra": {"previous_secret": PREVIOUS}}
        ),
    )
    return CURRENT, PREVIOUS


@pytest.fixture
def client(secrets):
    from fastapi.testclient import TestClient
    from iamport_billing.webhooks.app import create_app

    with TestClient(create_app()) as c:
        yield c


def transaction_event(payment_id: str, kind: str = "Transaction.Paid") -> bytes:
    return json.dumps(
        {
            "type": kind,
            "timestamp": datetime.now(UTC).isoformat(),
            "data": {"paymentId": payment_id, "storeId": "store-test", "transactionId": "tx-1"},
        }
    ).encode()


def signed(
    body: bytes, secret: str = CURRENT, *, msg_id: str = "msg_1", at: datetime | None = None
):
    at = at or datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body.decode()),
        "content-type": "application/json",
    }


def post_v2(client, body: bytes, headers):
    return client.post("/portone", content=body, headers=headers)


def lookups(emulator) -> int:
    """findAll requests the emulator received (the webhook's one lookup per payment)."""
    import requests

    counts = requests.get(f"{emulator.url}/__emulator__/stats", timeout=5).json()["requests"]
    return sum(n for endpoint, n in counts.items() if endpoint.startswith(LOOKUP))


def rows(ledger) -> dict[str, tuple]:
    found = ledger.query(
        "SELECT merchant_uid, status, imp_uid, updated_at FROM billing_charge_attempts"
    )
    return {r[0]: r[1:] for r in found}


def unknown_charge(ledger, emulator, sub: str = "a") -> str:
    """A charge the gateway took whose answer was lost: the real engine leaves it unknown
    (the emulator drops the connection after committing; no lookup round)."""
    register_cards(emulator, [(f"cust-{sub}", PAYING_CARD)])
    faults(emulator, drop_after_commit_rate=1.0)
    gateway = gateway_for("iamport_default")
    try:
        engine = ChargeEngine(
            gateway, ledger, ChargeSettings(max_concurrency=1, max_resend_rounds=0), RUN
        )
        result = engine.charge_batch([ChargeCandidate(sub, f"cust-{sub}", 1000, DAY, name="p")])
    finally:
        gateway.close()
        faults(emulator, drop_after_commit_rate=0.0)
    uid = merchant_uid_for(sub, DAY, 1)
    assert result.unknown_merchant_uids == [uid]
    assert rows(ledger)[uid][0] == "unknown"
    return uid


# -- signatures -----------------------------------------------------------------------------------


def test_the_documented_vector_signs_as_documented_and_is_refused_as_stale(client):
    at = datetime.fromtimestamp(VECTOR_TIMESTAMP, UTC)
    assert Webhook(VECTOR_SECRET).sign(VECTOR_ID, at, VECTOR_BODY) == VECTOR_SIGNATURE
    headers = {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TIMESTAMP),
        "webhook-signature": VECTOR_SIGNATURE,
    }
    assert post_v2(client, VECTOR_BODY.encode(), headers).status_code == 401


def test_the_documented_vector_re_signed_now_is_accepted(client, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_PORTONE_WEBHOOK",
        json.dumps({"conn_type": "generic", "password": VECTOR_SECRET}),
    )
    body = json.dumps({"type": "Vector.Test", "data": {}}).encode()
    r = post_v2(client, body, signed(body, VECTOR_SECRET, msg_id=VECTOR_ID))
    assert (r.status_code, r.json()) == (200, {"result": "ignored"})


def broken(kind: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    headers = signed(body)
    if kind == "tampered body":
        return body.replace(b"Transaction.Paid", b"Transaction.Cancelled"), headers
    if kind == "wrong secret":
        return body, signed(body, new_secret())
    if kind == "stale timestamp":
        return body, signed(body, at=datetime.now(UTC) - timedelta(minutes=6))
    if kind == "future timestamp":
        return body, signed(body, at=datetime.now(UTC) + timedelta(minutes=6))
    if kind == "garbage signature":
        return body, {**headers, "webhook-signature": "garbage"}
    missing = kind.removeprefix("missing ")
    return body, {k: v for k, v in headers.items() if k != missing}


@pytest.mark.parametrize("warehouse", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    "kind",
    [
        "tampered body", "wrong secret", "stale timestamp", "future timestamp",
        "garbage signature", "missing webhook-id", "missing webhook-timestamp",
        "missing webhook-signature",
    ],
)  # fmt: skip
def test_an_unverified_webhook_is_refused_and_changes_nothing(client, ledger, emulator, kind):
    uid = unknown_charge(ledger, emulator)
    before = rows(ledger)
    body, headers = broken(kind, transaction_event(uid))
    r = post_v2(client, body, headers)
    assert r.status_code == 401, r.text
    assert rows(ledger) == before
    assert lookups(emulator) == 0
    assert ledger.query("SELECT COUNT(*) FROM billing_webhook_events") == [(0,)]


@pytest.mark.parametrize("warehouse", ["sqlite"], indirect=True)
def test_the_previous_secret_still_verifies_during_rotation(client, ledger, emulator):
    uid = unknown_charge(ledger, emulator)
    body = transaction_event(uid)
    r = post_v2(client, body, signed(body, PREVIOUS))
    assert (r.status_code, r.json()) == (200, {"result": "settled"})
    assert rows(ledger)[uid][0] == "paid"


def test_without_configured_secrets_every_webhook_is_refused_unhandled(client, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_PORTONE_WEBHOOK")
    body = transaction_event("a-20261126-01")
    assert post_v2(client, body, signed(body)).status_code == 503


def test_a_body_over_the_limit_is_refused_before_it_is_read(client):
    body = b"{" + b" " * (64 * 1024) + b"}"
    assert post_v2(client, body, signed(body)).status_code == 413
    assert client.post("/iamport", content=body).status_code == 413


def test_malformed_bodies_are_refused(client):
    body = b"not json"
    assert post_v2(client, body, signed(body)).status_code == 400
    body = json.dumps({"type": "Transaction.Paid", "data": {}}).encode()
    assert post_v2(client, body, signed(body)).status_code == 400
    assert client.post("/iamport", data={"imp_uid": "imp_1"}).status_code == 400
    assert client.post("/iamport", json={"merchant_uid": "x" * 65}).status_code == 400


# -- PortOne V2 -----------------------------------------------------------------------------------


def test_a_signed_webhook_settles_an_unknown_charge_within_seconds(client, ledger, emulator):
    uid = unknown_charge(ledger, emulator)
    (payment,) = emulator_payments(emulator.config.db_path)
    body = transaction_event(uid)
    started = time.monotonic()
    r = post_v2(client, body, signed(body))
    assert (r.status_code, r.json()) == (200, {"result": "settled"})
    status, got_imp_uid, _ = rows(ledger)[uid]
    assert time.monotonic() - started < 5
    assert status == "paid"
    assert got_imp_uid == payment["imp_uid"]


def test_an_event_replayed_100_times_changes_one_row_and_costs_one_lookup(client, ledger, emulator):
    uid = unknown_charge(ledger, emulator)
    other = unknown_charge(ledger, emulator, "b")
    body = transaction_event(uid)
    headers = signed(body, msg_id="msg_replayed")
    answers = [post_v2(client, body, headers) for _ in range(100)]
    assert {a.status_code for a in answers} == {200}
    assert answers[0].json() == {"result": "settled"}
    after = rows(ledger)
    assert after[uid][0] == "paid" and after[other][0] == "unknown"
    assert lookups(emulator) == 1


def test_concurrent_deliveries_of_one_event_make_one_lookup(client, ledger, emulator):
    """Twenty deliveries at once while the gateway answers slowly: one handler looks up, the
    others are told to come back (409) or find the row settled."""
    uid = unknown_charge(ledger, emulator)
    body = transaction_event(uid)
    headers = signed(body, msg_id="msg_burst")
    faults(emulator, latency_ms=800)
    answers: list = []

    def deliver() -> None:
        answers.append(post_v2(client, body, headers))

    threads = [threading.Thread(target=deliver) for _ in range(20)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    faults(emulator, latency_ms=0)
    results = sorted(str(a.json().get("result", a.status_code)) for a in answers)
    assert results.count("settled") == 1, results
    assert set(results) <= {"settled", "409", "nothing_to_settle", "duplicate"}, results
    assert rows(ledger)[uid][0] == "paid"
    assert lookups(emulator) == 1


def test_replays_of_an_event_the_gateway_cannot_settle_look_up_once(client, ledger, emulator):
    """A pending row the gateway never saw: the first delivery looks, the id is then done."""
    uid = crashed_pending_row(ledger, "never-sent", DAY)
    before = rows(ledger)
    body = transaction_event(uid)
    headers = signed(body, msg_id="msg_absent")
    answers = [post_v2(client, body, headers).json() for _ in range(100)]
    assert answers[0] == {"result": "absent"}
    assert answers[1:] == [{"result": "duplicate"}] * 99
    assert rows(ledger) == before
    assert lookups(emulator) == 1


def test_an_unreachable_gateway_answers_503_and_the_redelivery_settles(client, ledger, emulator):
    uid = unknown_charge(ledger, emulator)
    body = transaction_event(uid)
    headers = signed(body, msg_id="msg_retry")
    faults(emulator, foreign_404_payment_lookups=True)
    first = post_v2(client, body, headers)
    assert first.status_code == 503
    assert rows(ledger)[uid][0] == "unknown"
    faults(emulator, foreign_404_payment_lookups=False)
    again = post_v2(client, body, headers)
    assert (again.status_code, again.json()) == (200, {"result": "settled"})
    assert rows(ledger)[uid][0] == "paid"


@pytest.mark.parametrize("card", [SOFT_DECLINE_CARD, PAYING_CARD], ids=["declined", "paid"])
def test_a_charge_its_engine_is_sending_is_settled_only_by_money_moving(
    client, ledger, emulator, card
):
    """A fresh pending row (its engine is between the POST and recording the answer): a
    decline is the engine's to record; a payment is recorded whoever brings it."""
    register_cards(emulator, [("cust-f", card)])
    gateway = gateway_for("iamport_default")
    try:
        engine = ChargeEngine(gateway, ledger, ChargeSettings(), RUN)
        planned, _ = engine.plan([ChargeCandidate("f", "cust-f", 1000, DAY, name="p")])
        (owned,) = engine.claim(planned)
        gateway.hook.charge_again("cust-f", owned.merchant_uid, 1000, "p")  # type: ignore[attr-defined]
    finally:
        gateway.close()
    body = transaction_event(owned.merchant_uid)
    r = post_v2(client, body, signed(body))
    expected = ("left_to_owner", "pending") if card == SOFT_DECLINE_CARD else ("settled", "paid")
    assert (r.json()["result"], rows(ledger)[owned.merchant_uid][0]) == expected


@pytest.mark.parametrize("warehouse", ["sqlite"], indirect=True)
def test_an_unknown_event_type_is_accepted_and_ignored(client, ledger, emulator):
    uid = unknown_charge(ledger, emulator)
    before = rows(ledger)
    body = transaction_event(uid, kind="BillingKey.Deleted")
    r = post_v2(client, body, signed(body))
    assert (r.status_code, r.json()) == (200, {"result": "ignored"})
    assert rows(ledger) == before
    assert lookups(emulator) == 0


# -- Iamport V1 -----------------------------------------------------------------------------------


def test_a_v1_webhook_for_a_merchant_uid_not_in_the_ledger_changes_nothing(
    client, ledger, emulator
):
    register_cards(emulator, [("cust-x", PAYING_CARD)])
    gateway = gateway_for("iamport_default")
    try:  # paid at the gateway under a merchant_uid the ledger has never seen
        gateway.hook.charge_again("cust-x", "not-ours-1", 1000, "plan")  # type: ignore[attr-defined]
    finally:
        gateway.close()
    r = client.post("/iamport", data={"imp_uid": "imp_x", "merchant_uid": "not-ours-1",
                                      "status": "paid"})  # fmt: skip
    assert (r.status_code, r.json()) == (200, {"result": "nothing_to_settle"})
    assert rows(ledger) == {}
    assert lookups(emulator) == 0
    assert ledger.query("SELECT COUNT(*) FROM billing_webhook_events") == [(0,)]


@pytest.mark.parametrize("as_json", [False, True], ids=["form", "json"])
def test_a_v1_webhook_is_only_a_reason_to_look_up(client, ledger, emulator, as_json):
    uid = unknown_charge(ledger, emulator)
    # What the webhook claims is never taken as the outcome: the lookup decides.
    fields = {"imp_uid": "imp_forged", "merchant_uid": uid, "status": "failed"}
    r = client.post("/iamport", **({"json": fields} if as_json else {"data": fields}))
    assert (r.status_code, r.json()) == (200, {"result": "settled"})
    status, imp_uid, _ = rows(ledger)[uid]
    assert status == "paid" and imp_uid != "imp_forged"
    assert lookups(emulator) == 1


def test_a_v1_webhook_for_a_settled_charge_costs_no_lookup(client, ledger, emulator):
    uid = unknown_charge(ledger, emulator)
    assert client.post("/iamport", json={"merchant_uid": uid}).json() == {"result": "settled"}
    settled = rows(ledger)
    answers = [client.post("/iamport", json={"merchant_uid": uid}).json() for _ in range(20)]
    assert answers == [{"result": "nothing_to_settle"}] * 20
    assert rows(ledger) == settled
    assert lookups(emulator) == 1


@pytest.mark.parametrize("warehouse", ["sqlite"], indirect=True)
def test_a_v1_flood_makes_one_lookup_at_a_time(client, ledger, emulator):
    """The gateway keeps the payment 'ready' (nothing settles) and answers slowly: twenty
    deliveries at once make one lookup; the others find it in flight."""
    faults(emulator, charge_status_ready=True)
    uid = unknown_charge(ledger, emulator)
    faults(emulator, latency_ms=800)
    answers: list[dict] = []

    def deliver() -> None:
        answers.append(client.post("/iamport", json={"merchant_uid": uid}).json())

    threads = [threading.Thread(target=deliver) for _ in range(20)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    faults(emulator, latency_ms=0)
    assert sorted(a["result"] for a in answers) == ["lookup_in_flight"] * 19 + ["still_open"]
    assert lookups(emulator) == 1
    assert rows(ledger)[uid][0] == "unknown"


# -- secrets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("warehouse", ["sqlite"], indirect=True)
def test_no_secret_reaches_a_log_or_an_answer(client, ledger, emulator, caplog, monkeypatch):
    caplog.set_level("DEBUG")
    uid = unknown_charge(ledger, emulator)
    body = transaction_event(uid)
    answers = [
        post_v2(client, body, signed(body)),  # current secret
        post_v2(client, body, signed(body, PREVIOUS, msg_id="msg_2")),
        post_v2(client, body, signed(body, new_secret(), msg_id="msg_3")),
        post_v2(client, body, {"webhook-id": "m", "webhook-timestamp": "x",
                               "webhook-signature": "v1,AAAA"}),
    ]  # fmt: skip
    monkeypatch.setenv(  # a secret that is not base64: refused, and logged without its text
        "AIRFLOW_CONN_PORTONE_WEBHOOK",
        json.dumps({"conn_type": "generic", "password": "whsec_%%%not-base64-" + CURRENT[6:]}),
    )
    answers.append(post_v2(client, body, signed(body, msg_id="msg_4")))
    assert [a.status_code for a in answers] == [200, 200, 401, 401, 401]
    text = caplog.text + "".join(a.text for a in answers)
    for secret in (CURRENT, PREVIOUS):
        assert secret[6:] not in text


# -- mounted by Airflow ---------------------------------------------------------------------------


@pytest.mark.airflow
@pytest.mark.parametrize("warehouse", ["sqlite"], indirect=True)
def test_airflow_mounts_the_receiver_outside_its_login(
    airflow_db, ledger, emulator, secrets, tmp_path, monkeypatch
):
    """Airflow's own API server app (plugin loaded by entry point, SimpleAuthManager): the
    Billing page wants a login, the webhook receiver does not and settles through it."""
    from airflow.api_fastapi.app import create_app, purge_cached_app
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
    from fastapi.testclient import TestClient

    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"ops": "ops-password"}))
    manager = f"{SimpleAuthManager.__module__}.{SimpleAuthManager.__name__}"
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", manager)
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "ops:viewer")
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords))
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "test-webhooks-jwt-" + "x" * 64)
    uid = unknown_charge(ledger, emulator)
    body = transaction_event(uid)
    purge_cached_app()
    try:
        with TestClient(create_app()) as airflow:
            assert airflow.get("/billing/").status_code == 401
            r = airflow.post("/billing-hooks/iamport", data={"merchant_uid": "not-ours-1"})
            assert (r.status_code, r.json()) == (200, {"result": "nothing_to_settle"})
            r = airflow.post("/billing-hooks/portone", content=body, headers=signed(body))
            assert (r.status_code, r.json()) == (200, {"result": "settled"})
    finally:
        purge_cached_app()
    assert rows(ledger)[uid][0] == "paid"
