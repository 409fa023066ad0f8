"""IamportHook against the emulator over real HTTP on loopback (and a raw stub server for
replies no honest server sends)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from iamport_billing.emulator.config import CARD_ALWAYS_PAID as PAYING_CARD
from iamport_billing.emulator.config import CARD_HARD_DECLINE as HARD_DECLINE_CARD
from iamport_billing.emulator.config import CARD_SOFT_DECLINE as SOFT_DECLINE_CARD
from iamport_billing.emulator.store import customer_row
from iamport_billing.errors import (
    IamportAuthError,
    IamportBillingKeyMissing,
    IamportNotFound,
    IamportOutcomeUnknown,
    IamportRequestRejected,
    IamportTransportError,
)
from iamport_billing.hooks.iamport import IamportHook, settings_from_connection


def register_cards(emulator, cards) -> None:
    """Store billing keys (customer_uid, test card number) straight into the emulator."""
    now = int(time.time())
    emulator.store.save_customers(customer_row(uid, card, now) for uid, card in cards)


def stats(emulator) -> dict:
    return requests.get(f"{emulator.url}/__emulator__/stats", timeout=5).json()


def tokens_issued(emulator) -> int:
    """getToken requests the emulator answered (reused, extended or new)."""
    return stats(emulator)["requests"].get("POST /users/getToken", 0)


def set_faults(emulator, **faults) -> None:
    requests.post(f"{emulator.url}/__emulator__/faults", json=faults, timeout=5).raise_for_status()


@pytest.fixture
def cards(emulator):
    register_cards(
        emulator,
        [("paying", PAYING_CARD), ("soft", SOFT_DECLINE_CARD), ("hard", HARD_DECLINE_CARD)],
    )


def test_hundred_charges_use_one_token(hook, emulator, cards):
    for i in range(100):
        assert hook.charge_again("paying", f"reuse-{i}", 1000, "plan").is_paid
    assert tokens_issued(emulator) == 1
    assert hook.token_requests == 1


def test_token_expiring_mid_batch_is_renewed(emulator_config, emulator, cards):
    set_faults(emulator, token_ttl_s=2)
    hook = IamportHook()
    paid = 0
    deadline = time.monotonic() + 5
    i = 0
    while time.monotonic() < deadline:
        paid += hook.charge_again("paying", f"ttl-{i}", 1000, "plan").is_paid
        i += 1
        time.sleep(0.05)
    assert paid == i
    assert stats(emulator)["tokens"].get("issued", 0) >= 2


def test_a_401_refreshes_the_token_once_and_resends(hook, emulator, cards):
    from iamport_billing.api_types import AccessToken
    from iamport_billing.hooks.iamport import TOKEN_CACHE

    key = hook._token_key()
    TOKEN_CACHE._tokens[key] = (AccessToken("0" * 40, 2**31, 0), time.monotonic() + 3600)
    payment = hook.charge_again("paying", "after-401", 1000, "plan")
    assert payment.is_paid
    assert hook.token_requests == 1


def test_card_decline_is_a_failed_payment_not_an_error(hook, cards):
    payment = hook.charge_again("soft", "decline-1", 1000, "plan")
    assert payment.status == "failed"
    assert "잔액" in payment.fail_reason
    assert payment.imp_uid


def test_unknown_customer_is_a_rejection_naming_the_missing_billing_key(hook, emulator):
    with pytest.raises(IamportBillingKeyMissing) as err:
        hook.charge_again("nobody", "nobody-1", 1000, "plan")
    assert err.value.code == 1
    assert stats(emulator)["payments"].get("paid", 0) == 0


def test_duplicate_merchant_uid_after_payment_is_rejected(hook, cards):
    hook.charge_again("paying", "dup-1", 1000, "plan")
    with pytest.raises(IamportRequestRejected) as err:
        hook.charge_again("paying", "dup-1", 1000, "plan")
    assert "이미" in err.value.api_message


def test_server_error_on_charge_is_unknown_not_a_failure(hook, emulator, cards):
    hook.get_token()
    set_faults(emulator, error_rate=1.0)
    with pytest.raises(IamportOutcomeUnknown) as err:
        hook.charge_again("paying", "five-hundred", 1000, "plan")
    assert err.value.merchant_uid == "five-hundred"


def test_dropped_response_is_unknown_and_exactly_one_payment_exists(hook, emulator, cards):
    hook.get_token()
    set_faults(emulator, drop_after_commit_rate=1.0)
    with pytest.raises(IamportOutcomeUnknown):
        hook.charge_again("paying", "dropped-1", 1000, "plan")
    set_faults(emulator, drop_after_commit_rate=0.0)
    payments = hook.find_all_payments("dropped-1")
    assert [p.status for p in payments] == ["paid"]


def test_read_timeout_on_charge_is_unknown_and_charges_once(emulator, monkeypatch, cards):
    conn = json.loads(__import__("os").environ["AIRFLOW_CONN_IAMPORT_DEFAULT"])
    conn["extra"]["read_timeout"] = 0.3
    monkeypatch.setenv("AIRFLOW_CONN_IAMPORT_DEFAULT", json.dumps(conn))
    hook = IamportHook()
    hook.get_token()
    set_faults(emulator, latency_ms=1000)
    with pytest.raises(IamportOutcomeUnknown):
        hook.charge_again("paying", "slow-1", 1000, "plan")
    set_faults(emulator, latency_ms=0)
    time.sleep(1.5)
    assert [p.status for p in IamportHook().find_all_payments("slow-1")] == ["paid"]


def test_lookups_retry_server_errors_and_rate_limits(emulator, monkeypatch, cards):
    conn = json.loads(__import__("os").environ["AIRFLOW_CONN_IAMPORT_DEFAULT"])
    conn["extra"]["max_retries"] = 8
    monkeypatch.setenv("AIRFLOW_CONN_IAMPORT_DEFAULT", json.dumps(conn))
    hook = IamportHook()
    hook.charge_again("paying", "lookup-1", 1000, "plan")
    set_faults(emulator, error_rate=0.4, rate_limit_rate=0.2, seed=3)
    for _ in range(5):
        assert hook.find_payment("lookup-1", "paid").is_paid
    set_faults(emulator, error_rate=0.0, rate_limit_rate=0.0)
    injected = stats(emulator)["faults"]
    assert injected.get("error", 0) + injected.get("rate_limit", 0) > 0


def test_lookups_of_missing_payments_are_not_found(hook):
    with pytest.raises(IamportNotFound):
        hook.find_payment("never-charged")
    assert hook.find_all_payments("never-charged") == []
    with pytest.raises(IamportNotFound):
        hook.get_payment("imp_000000000000")


def test_billing_keys_single_and_bulk(hook, cards):
    assert hook.get_billing_key("paying").card_number.endswith("4242")
    lookup = hook.get_billing_keys(["paying", "ghost", "soft"])
    assert sorted(b.customer_uid for b in lookup.found) == ["paying", "soft"]
    assert lookup.missing == ["ghost"]
    with pytest.raises(IamportNotFound):
        hook.get_billing_key("ghost")
    assert hook.delete_billing_key("soft", reason="test").customer_uid == "soft"


def test_partial_then_full_cancel_with_checksum(hook, cards):
    paid = hook.charge_again("paying", "refund-1", 10000, "plan")
    part = hook.cancel_payment(imp_uid=paid.imp_uid, amount=3000, reason="partial", checksum=10000)
    assert part.cancel_amount == 3000
    with pytest.raises(IamportRequestRejected):
        hook.cancel_payment(imp_uid=paid.imp_uid, amount=1000, reason="stale", checksum=10000)
    full = hook.cancel_payment(merchant_uid="refund-1", reason="rest", checksum=7000)
    assert full.cancel_amount == 10000 and full.status == "cancelled"


def test_list_payments_pages_through_everything(hook, cards):
    for i in range(25):
        hook.charge_again("paying", f"page-{i}", 1000, "plan")
    listed = list(hook.list_payments("paid", limit=10))
    assert len({p.merchant_uid for p in listed}) == 25


def test_wrong_credentials_give_a_clear_error(emulator, monkeypatch):
    conn = json.loads(__import__("os").environ["AIRFLOW_CONN_IAMPORT_DEFAULT"])
    conn["password"] = "wrong-secret-value"
    monkeypatch.setenv("AIRFLOW_CONN_IAMPORT_DEFAULT", json.dumps(conn))
    with pytest.raises(IamportAuthError, match="refused imp_key/imp_secret") as err:
        IamportHook().get_token()
    assert "wrong-secret-value" not in str(err.value)
    ok, message = IamportHook().test_connection()
    assert not ok and "refused" in message


def test_test_connection_succeeds_against_the_emulator(hook):
    ok, message = hook.test_connection()
    assert ok, message


def test_raw_authorization_header_style_works(emulator, monkeypatch, cards):
    conn = json.loads(__import__("os").environ["AIRFLOW_CONN_IAMPORT_DEFAULT"])
    conn["extra"]["header_style"] = "raw"
    monkeypatch.setenv("AIRFLOW_CONN_IAMPORT_DEFAULT", json.dumps(conn))
    assert IamportHook().charge_again("paying", "raw-1", 1000, "plan").is_paid


def test_secret_and_token_never_reach_logs_or_reprs(hook, emulator, cards, caplog):
    caplog.set_level(logging.DEBUG)
    token = hook.get_token()
    hook.charge_again("paying", "secret-1", 1000, "plan")
    try:
        hook.charge_again("nobody", "secret-2", 1000, "plan")
    except IamportBillingKeyMissing as e:
        caplog.records.append(logging.makeLogRecord({"msg": str(e)}))
    text = caplog.text + repr(hook.settings) + repr(token)
    assert "imp_test_secret" not in text
    assert token.token not in text


class _StubHandler(BaseHTTPRequestHandler):
    reply: tuple[int, str, str] = (200, "application/json", "{}")

    def _answer(self) -> None:
        if self.path.endswith("/users/getToken"):
            body = json.dumps(
                {
                    "code": 0,
                    "message": None,
                    "response": {
                        "access_token": "t" * 40,
                        "now": 1.5e9,
                        "expired_at": 1.5e9 + 1800,
                    },
                }
            )
            status, ctype = 200, "application/json"
        else:
            status, ctype, body = self.reply
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stub(monkeypatch):
    from iamport_billing.hooks.iamport import TOKEN_CACHE

    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_IAMPORT_DEFAULT",
        json.dumps(
            {
                "conn_type": "iamport",
                "host": f"http://127.0.0.1:{server.server_address[1]}",
                "login": "k",
                "password": "s",
                "extra": {"max_retries": 0},
            }
        ),
    )
    TOKEN_CACHE.clear()
    yield _StubHandler
    server.shutdown()
    TOKEN_CACHE.clear()


def test_float_now_and_null_message_are_tolerated(stub):
    payment = {"imp_uid": "imp_1", "merchant_uid": "m", "status": "paid", "amount": 10, "x": 1}
    stub.reply = (
        200,
        "application/json",
        json.dumps({"code": 0, "message": None, "response": payment}),
    )
    assert IamportHook().get_payment("imp_1").is_paid


def test_non_envelope_error_body_reports_status_and_excerpt(stub):
    stub.reply = (400, "application/json", json.dumps({"error": "bad gateway config"}))
    with pytest.raises(IamportTransportError, match="HTTP 400.*bad gateway config"):
        IamportHook().get_payment("imp_1")


def test_non_json_body_on_lookup_is_a_clear_transport_error(stub):
    stub.reply = (200, "text/html", "<html><body>Maintenance</body></html>")
    with pytest.raises(IamportTransportError, match="non-JSON.*Maintenance"):
        IamportHook().get_payment("imp_1")


def test_non_json_body_on_charge_is_unknown(stub):
    stub.reply = (200, "text/html", "<html>truncated")
    with pytest.raises(IamportOutcomeUnknown):
        IamportHook().charge_again("c", "m-1", 1000, "plan")


def test_truncated_json_on_charge_is_unknown(stub):
    stub.reply = (200, "application/json", '{"code": 0, "response": {"imp_uid": "imp_')
    with pytest.raises(IamportOutcomeUnknown):
        IamportHook().charge_again("c", "m-2", 1000, "plan")


def test_wrong_types_on_charge_are_unknown(stub):
    stub.reply = (200, "application/json", json.dumps({"code": "zero", "response": []}))
    with pytest.raises(IamportOutcomeUnknown):
        IamportHook().charge_again("c", "m-3", 1000, "plan")


def test_refused_connection_on_charge_is_a_transport_error_not_unknown(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_IAMPORT_DEFAULT",
        json.dumps(
            {
                "conn_type": "iamport",
                "host": "http://127.0.0.1:9",
                "login": "k",
                "password": "s",
                "extra": {"max_retries": 1},
            }
        ),
    )
    with pytest.raises(IamportTransportError):
        IamportHook().get_token()


def test_charge_to_a_closed_port_is_not_unknown_because_nothing_was_sent(monkeypatch):
    from iamport_billing.api_types import AccessToken
    from iamport_billing.hooks.iamport import TOKEN_CACHE

    monkeypatch.setenv(
        "AIRFLOW_CONN_IAMPORT_DEFAULT",
        json.dumps(
            {
                "conn_type": "iamport",
                "host": "http://127.0.0.1:9",
                "login": "k",
                "password": "s",
                "extra": {"max_retries": 2},
            }
        ),
    )
    hook = IamportHook()
    TOKEN_CACHE._tokens[hook._token_key()] = (
        AccessToken("t" * 40, 2**31, 0),
        time.monotonic() + 60,
    )
    try:
        with pytest.raises(IamportTransportError) as err:
            hook.charge_again("c", "closed-1", 1000, "plan")
        assert not isinstance(err.value, IamportOutcomeUnknown)
    finally:
        TOKEN_CACHE.clear()


def _conn(**kw):
    from airflow.sdk import Connection

    base = {"conn_id": "x", "conn_type": "iamport", "login": "k", "password": "s"}
    return Connection(**{**base, **kw})


def test_plain_http_to_a_remote_host_is_refused():
    with pytest.raises(ValueError, match="plain http"):
        settings_from_connection(_conn(host="http://api.example.com"))
    allowed = settings_from_connection(
        _conn(host="http://api.example.com", extra=json.dumps({"allow_insecure_http": True}))
    )
    assert allowed.base_url == "http://api.example.com"


def test_default_base_url_is_iamport_over_tls():
    s = settings_from_connection(_conn())
    assert s.base_url == "https://api.iamport.kr" and s.verify_tls


def test_provider_registers_the_iamport_connection_type(airflow_db):
    out = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "providers", "hooks", "-o", "json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    types = {h["connection_type"]: h for h in json.loads(out[out.index("[{") :])}
    assert types["iamport"]["class"] == "iamport_billing.hooks.iamport.IamportHook"
    assert types["portone"]["class"] == "iamport_billing.hooks.portone.PortOneHook"


def test_a_404_that_is_not_iamports_envelope_on_charge_is_unknown(stub):
    stub.reply = (404, "text/html", "<html>Not Found</html>")
    with pytest.raises(IamportOutcomeUnknown):
        IamportHook().charge_again("c", "m-404", 1000, "plan")


def test_iamports_404_on_charge_means_no_billing_key(stub):
    stub.reply = (
        404,
        "application/json",
        json.dumps({"code": 1, "message": "없음", "response": None}),
    )
    with pytest.raises(IamportBillingKeyMissing):
        IamportHook().charge_again("c", "m-404b", 1000, "plan")
