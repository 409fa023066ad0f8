"""A gateway seam: what stands in front of Iamport, or goes wrong inside it.

"I could not ask" must never read as "Iamport has no record": that is how a client charges
twice. These tests drive IamportHook against the emulator's foreign/hostile switches over real
HTTP on loopback, and against a raw stub server for replies no emulator switch produces; the
last section asks either gateway (V1, V2) the same questions through the gateway interface.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from iamport_billing.emulator.__main__ import build_parser
from iamport_billing.emulator.config import CARD_ALWAYS_PAID, EmulatorConfig
from iamport_billing.emulator.server import cli_args
from iamport_billing.emulator.store import customer_row
from iamport_billing.errors import (
    IamportAuthError,
    IamportCancelOutcomeUnknown,
    IamportNotFound,
    IamportOutcomeUnknown,
    IamportTokenUnavailable,
    IamportTransportError,
    IamportUnexpectedReply,
)
from iamport_billing.gateways import gateway_for
from iamport_billing.gateways.base import (
    ABSENT,
    FOREIGN_REPLY,
    FOUND,
    PAID,
    UNKNOWN,
    UNREACHABLE,
    ChargeRequest,
    GatewayUnavailable,
    PaymentAbsent,
    RefundOutcomeUnknown,
)
from iamport_billing.hooks.iamport import TOKEN_CACHE, IamportHook, clean_excerpt
from support import emulator_payments, requests_received

CONN_ENV = "AIRFLOW_CONN_IAMPORT_DEFAULT"


def stats(emulator) -> dict:
    return requests.get(f"{emulator.url}/__emulator__/stats", timeout=5).json()


def set_faults(emulator, **faults) -> dict:
    r = requests.post(f"{emulator.url}/__emulator__/faults", json=faults, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def use_conn(monkeypatch, **extra) -> None:
    """Change the iamport_default connection's extras (read_timeout, header_style, ...)."""
    conn = json.loads(os.environ[CONN_ENV])
    conn["extra"] = {**conn.get("extra", {}), **extra}
    monkeypatch.setenv(CONN_ENV, json.dumps(conn))


@pytest.fixture
def paying(emulator) -> str:
    """A customer_uid with a card that is always approved."""
    emulator.store.save_customers([customer_row("paying", CARD_ALWAYS_PAID, int(time.time()))])
    return "paying"


@pytest.fixture
def charged(hook, paying) -> str:
    """A merchant_uid Iamport has a paid record of."""
    assert hook.charge_again(paying, "charged-1", 1000, "plan").is_paid
    return "charged-1"


# -- a proxy's 404 is not Iamport saying "no record" -------------------------------------------


def test_foreign_json_404_on_find_all_raises_could_not_ask_instead_of_empty(
    hook, emulator, charged
):
    set_faults(emulator, foreign_404_json=True)
    with pytest.raises(IamportUnexpectedReply) as err:
        hook.find_all_payments(charged)
    assert not isinstance(err.value, IamportNotFound)
    assert err.value.http_status == 404 and "not found" in err.value.body_excerpt


def test_foreign_html_404_on_find_all_raises_with_clean_text(hook, emulator, charged):
    set_faults(emulator, foreign_404_html=True)
    with pytest.raises(IamportUnexpectedReply) as err:
        hook.find_all_payments(charged)
    assert "<" not in str(err.value) and ">" not in str(err.value)
    assert "404 Not Found" in err.value.body_excerpt


def test_foreign_404_on_find_payment_is_not_not_found(hook, emulator, charged):
    set_faults(emulator, foreign_404_json=True)
    with pytest.raises(IamportUnexpectedReply):
        hook.find_payment(charged, "paid")


def test_foreign_404_on_get_payment_is_not_not_found(hook, emulator, charged):
    imp_uid = hook.find_payment(charged).imp_uid
    set_faults(emulator, foreign_404_html=True)
    with pytest.raises(IamportUnexpectedReply):
        hook.get_payment(imp_uid)


def test_foreign_404_on_bulk_billing_keys_raises_instead_of_reporting_missing(
    hook, emulator, paying
):
    set_faults(emulator, foreign_404_json=True)
    with pytest.raises(IamportUnexpectedReply):
        hook.get_billing_keys([paying, "ghost"])


def test_foreign_404_on_one_billing_key_is_not_not_found(hook, emulator, paying):
    set_faults(emulator, foreign_404_html=True)
    with pytest.raises(IamportUnexpectedReply):
        hook.get_billing_key(paying)


def test_a_proxy_misrouting_only_payment_lookups_leaves_billing_keys_to_iamport(
    hook, emulator, charged, paying
):
    set_faults(emulator, foreign_404_payment_lookups=True)
    with pytest.raises(IamportUnexpectedReply):
        hook.find_all_payments(charged)
    assert hook.get_billing_key(paying).customer_uid == paying


def test_foreign_404_on_list_payments_raises_instead_of_ending_the_listing(hook, emulator, charged):
    set_faults(emulator, foreign_404_json=True)
    with pytest.raises(IamportUnexpectedReply):
        list(hook.list_payments("paid"))


def test_iamports_own_404_envelope_still_means_absent(hook, emulator, paying):
    assert hook.find_all_payments("never-charged") == []
    with pytest.raises(IamportNotFound):
        hook.find_payment("never-charged")
    assert hook.get_billing_keys([paying, "ghost"]).missing == ["ghost"]


def test_foreign_404_applies_to_lookups_only_not_to_charges(hook, emulator, paying):
    hook.get_token()
    set_faults(emulator, foreign_404_json=True)
    assert hook.charge_again(paying, "charge-through-404", 1000, "plan").is_paid


# -- wrong shapes ------------------------------------------------------------------------------


def test_findall_bare_list_is_a_typed_error_not_an_attribute_error(hook, emulator, charged):
    set_faults(emulator, findall_bare_list=True)
    with pytest.raises(IamportUnexpectedReply, match="wrong shape"):
        hook.find_all_payments(charged)


def test_findall_bare_list_is_a_list_inside_iamports_envelope(hook, emulator, charged):
    token = hook.get_token().token
    set_faults(emulator, findall_bare_list=True)
    r = requests.get(
        f"{emulator.url}/payments/findAll/{charged}", headers={"Authorization": token}, timeout=5
    )
    body = r.json()
    assert r.status_code == 200 and body["code"] == 0
    assert [p["merchant_uid"] for p in body["response"]] == [charged]


# -- the cancel POST is never resent -----------------------------------------------------------


def test_dropped_cancel_reply_is_unknown_and_refunds_exactly_once(hook, emulator, charged):
    paid = hook.find_payment(charged, "paid")
    set_faults(emulator, drop_cancel_reply=True)
    with pytest.raises(IamportCancelOutcomeUnknown) as err:
        hook.cancel_payment(imp_uid=paid.imp_uid, amount=300, reason="partial")
    assert isinstance(err.value, IamportOutcomeUnknown) and err.value.imp_uid == paid.imp_uid
    set_faults(emulator, drop_cancel_reply=False)
    stored = emulator.store.get_payment(paid.imp_uid)
    assert [h["amount"] for h in stored["cancel_history"]] == [300]
    assert stored["cancel_amount"] == 300
    assert requests_received(emulator, "POST /payments/cancel") == 1


def test_cancel_read_timeout_is_unknown_and_not_resent(emulator, monkeypatch, charged):
    use_conn(monkeypatch, read_timeout=0.3, max_retries=3)
    hook = IamportHook()
    imp_uid = hook.find_payment(charged, "paid").imp_uid
    set_faults(emulator, latency_ms=800)
    with pytest.raises(IamportCancelOutcomeUnknown):
        hook.cancel_payment(imp_uid=imp_uid, amount=300, reason="slow")
    set_faults(emulator, latency_ms=0)
    time.sleep(1.2)  # the emulator finishes the cancel the client gave up on
    assert hook.get_payment(imp_uid).cancel_amount == 300
    assert requests_received(emulator, "POST /payments/cancel") == 1
    hook.close()


def test_cancel_5xx_is_unknown_and_not_resent(emulator, monkeypatch, charged):
    use_conn(monkeypatch, max_retries=3)
    hook = IamportHook()
    imp_uid = hook.find_payment(charged, "paid").imp_uid
    set_faults(emulator, error_rate=1.0)
    with pytest.raises(IamportCancelOutcomeUnknown):
        hook.cancel_payment(imp_uid=imp_uid, amount=300, reason="5xx")
    assert requests_received(emulator, "POST /payments/cancel") == 1
    hook.close()


# -- getToken ----------------------------------------------------------------------------------


def test_token_403_is_credentials_refused(hook, emulator):
    set_faults(emulator, token_status=403)
    with pytest.raises(IamportAuthError, match=r"credentials.*imp_key/imp_secret") as err:
        hook.get_token()
    assert err.value.http_status == 403


def test_token_502_html_is_token_unavailable_with_clean_text(emulator, monkeypatch, paying):
    use_conn(monkeypatch, max_retries=0)
    set_faults(emulator, token_status=502)
    with pytest.raises(IamportTokenUnavailable) as err:
        IamportHook().charge_again(paying, "no-token-1", 1000, "plan")
    text = str(err.value)
    assert isinstance(err.value, IamportTransportError) and err.value.http_status == 502
    assert "nothing was sent" in text and "502 Bad Gateway" in text
    assert "<" not in text and "html" not in text.lower()
    assert requests_received(emulator, "POST /subscribe/payments/again") == 0


def test_token_502_makes_test_connection_fail_with_clean_text(emulator, monkeypatch):
    use_conn(monkeypatch, max_retries=0)
    set_faults(emulator, token_status=502)
    ok, message = IamportHook().test_connection()
    assert not ok and "502 Bad Gateway" in message and "<" not in message


def test_already_expired_token_fails_test_connection(hook, emulator):
    set_faults(emulator, token_already_expired=True)
    ok, message = hook.test_connection()
    assert not ok and "already expired" in message


def test_already_expired_token_is_not_fetched_again_on_every_call(hook, emulator, paying):
    set_faults(emulator, token_already_expired=True)
    for i in range(5):
        assert hook.charge_again(paying, f"expired-token-{i}", 1000, "plan").is_paid
    assert requests_received(emulator, "POST /users/getToken") == 1


def test_already_expired_token_is_warned_about_once(hook, emulator, charged, caplog):
    set_faults(emulator, token_already_expired=True)
    TOKEN_CACHE.clear()
    caplog.set_level(logging.WARNING, logger="iamport_billing.hooks.iamport")
    for _ in range(5):
        hook.find_payment(charged)
    TOKEN_CACHE._tokens.clear()  # the grace window over: the same token comes back
    hook.find_payment(charged)
    warnings = [r for r in caplog.records if "already expired" in r.getMessage()]
    assert len(warnings) == 1


def test_bearer_refused_server_works_with_raw_header_style(emulator, monkeypatch, paying):
    set_faults(emulator, bearer_refused=True)
    use_conn(monkeypatch, header_style="raw")
    assert IamportHook().charge_again(paying, "raw-header-1", 1000, "plan").is_paid


def test_bearer_refused_server_with_bearer_style_is_an_auth_error(hook, emulator, paying):
    set_faults(emulator, bearer_refused=True)
    with pytest.raises(IamportAuthError, match="unauthorized after a token refresh"):
        hook.charge_again(paying, "bearer-1", 1000, "plan")
    assert stats(emulator)["payments"] == {}


# -- charges the gateway records differently ---------------------------------------------------


def test_charge_status_ready_is_returned_as_ready(hook, emulator, paying):
    set_faults(emulator, charge_status_ready=True)
    payment = hook.charge_again(paying, "ready-1", 1000, "plan")
    assert payment.status == "ready" and not payment.is_paid and not payment.is_failed
    assert hook.find_payment("ready-1").status == "ready"


def test_paid_amount_multiplier_records_another_amount(hook, emulator, paying):
    set_faults(emulator, paid_amount_multiplier=10)
    payment = hook.charge_again(paying, "tenfold-1", 1000, "plan")
    assert payment.is_paid and payment.amount == 10_000


# -- the switches themselves -------------------------------------------------------------------


def test_switches_are_off_by_default_and_reported_by_the_faults_endpoint(emulator):
    faults = requests.get(f"{emulator.url}/__emulator__/faults", timeout=5).json()
    assert faults["foreign_404_json"] is False and faults["token_status"] is None
    assert faults["paid_amount_multiplier"] == 1.0
    assert set_faults(emulator, bearer_refused="true", token_status=502)["bearer_refused"] is True
    assert set_faults(emulator, token_status=0)["token_status"] is None


@pytest.mark.parametrize(
    "bad",
    [
        {"token_status": 200},
        {"paid_amount_multiplier": 0},
        {"foreign_404_json": "maybe"},
        {"foreign_404_json": True, "foreign_404_html": True},
    ],
    ids=["token_status=200", "multiplier=0", "not-a-bool", "both-404s"],
)
def test_invalid_switch_values_are_refused(emulator, bad):
    r = requests.post(f"{emulator.url}/__emulator__/faults", json=bad, timeout=5)
    assert r.status_code == 400


def test_foreign_404_is_not_iamports_envelope(emulator, charged):
    set_faults(emulator, foreign_404_json=True)
    r = requests.get(f"{emulator.url}/payments/find/{charged}", timeout=5)
    assert r.status_code == 404 and r.json() == {"error": "not found"}
    set_faults(emulator, foreign_404_json=False, foreign_404_html=True)
    r = requests.get(f"{emulator.url}/subscribe/customers/paying", timeout=5)
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")


def test_switches_round_trip_through_the_command_line(tmp_path):
    config = EmulatorConfig(
        db_path=str(tmp_path / "e.db"), foreign_404_html=True, findall_bare_list=True,
        drop_cancel_reply=True, token_status=502, bearer_refused=True,
        token_already_expired=True, charge_status_ready=True, paid_amount_multiplier=10,
    )  # fmt: skip
    args = build_parser().parse_args(cli_args(config, 8099))
    assert (args.foreign_404_html, args.foreign_404_json, args.findall_bare_list) == (
        True,
        False,
        True,
    )
    assert (args.drop_cancel_reply, args.token_status, args.bearer_refused) == (True, 502, True)
    assert (args.token_already_expired, args.charge_status_ready) == (True, True)
    assert args.paid_amount_multiplier == 10


# -- replies no emulator switch produces (a raw stub server) -----------------------------------

GOOD_TOKEN = {
    "code": 0,
    "message": None,
    "response": {"access_token": "t" * 40, "now": 1_700_000_000, "expired_at": 1_700_001_800},
}
PAYMENT = {
    "imp_uid": "imp_1", "merchant_uid": "m-1", "status": "paid", "amount": 1000,
    "cancel_amount": 0, "currency": "KRW", "sandbox": False,
}  # fmt: skip


class _Stub(BaseHTTPRequestHandler):
    """Answers by path prefix: ``routes[prefix] = (status, content_type, body_text)``."""

    routes: dict[str, tuple[int, str, str]] = {}

    def _answer(self) -> None:
        status, ctype, body = 404, "text/plain", ""
        for prefix, reply in sorted(self.routes.items(), key=lambda kv: -len(kv[0])):
            if self.path.startswith(prefix):
                status, ctype, body = reply
                break
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Stub.routes = {"/users/getToken": (200, "application/json", json.dumps(GOOD_TOKEN))}
    monkeypatch.setenv(
        CONN_ENV,
        json.dumps(
            {
                "conn_type": "iamport", "host": f"http://127.0.0.1:{server.server_address[1]}",
                "login": "k", "password": "stub-secret-value", "extra": {"max_retries": 0},
            }
        ),
    )  # fmt: skip
    TOKEN_CACHE.clear()
    yield _Stub.routes
    server.shutdown()
    TOKEN_CACHE.clear()


def _json(status: int, body: object) -> tuple[int, str, str]:
    return status, "application/json", json.dumps(body)


def test_whole_body_bare_list_on_find_all_is_could_not_ask(stub):
    stub["/payments/findAll/"] = _json(200, [PAYMENT])
    with pytest.raises(IamportUnexpectedReply):
        IamportHook().find_all_payments("m-1")


def test_empty_404_on_find_all_is_could_not_ask(stub):
    stub["/payments/findAll/"] = (404, "text/plain", "")
    with pytest.raises(IamportUnexpectedReply):
        IamportHook().find_all_payments("m-1")


def test_paged_object_missing_fields_is_could_not_ask(stub):
    stub["/payments/findAll/"] = _json(200, {"code": 0, "message": None, "response": {"x": 1}})
    with pytest.raises(IamportUnexpectedReply, match="wrong shape"):
        IamportHook().find_all_payments("m-1")


def test_payment_missing_fields_on_lookup_is_could_not_ask_not_a_type_error(stub):
    stub["/payments/"] = _json(200, {"code": 0, "message": None, "response": {"imp_uid": "i"}})
    with pytest.raises(IamportUnexpectedReply):
        IamportHook().get_payment("imp_1")


def test_envelope_404_on_the_status_listing_raises_instead_of_ending_it(stub):
    stub["/payments/status/"] = _json(404, {"code": 1, "message": "없음", "response": None})
    with pytest.raises(Exception) as err:
        list(IamportHook().list_payments("paid"))
    assert not isinstance(err.value, IamportNotFound)


def test_billing_keys_207_with_wrong_shape_is_could_not_ask(stub):
    stub["/subscribe/customers"] = _json(207, {"code": 0, "message": None, "response": {}})
    with pytest.raises(IamportUnexpectedReply):
        IamportHook().get_billing_keys(["a", "b"])


def test_billing_key_code_1_with_another_message_is_not_absence(stub):
    stub["/subscribe/customers/"] = _json(200, {"code": 1, "message": "점검중", "response": None})
    with pytest.raises(Exception) as err:
        IamportHook().get_billing_key("a")
    assert not isinstance(err.value, IamportNotFound)


def test_malformed_200_on_charge_stays_outcome_unknown(stub):
    stub["/subscribe/payments/again"] = _json(
        200, {"code": 0, "message": None, "response": {"imp_uid": "imp_1", "amount": "lots"}}
    )
    with pytest.raises(IamportOutcomeUnknown) as err:
        IamportHook().charge_again("c", "m-shape", 1000, "plan")
    assert err.value.merchant_uid == "m-shape"


def test_malformed_200_on_cancel_is_cancel_outcome_unknown(stub):
    stub["/payments/cancel"] = _json(200, {"code": 0, "message": None, "response": []})
    with pytest.raises(IamportCancelOutcomeUnknown):
        IamportHook().cancel_payment(merchant_uid="m-1", reason="r")


def test_non_envelope_reply_on_cancel_is_cancel_outcome_unknown(stub):
    stub["/payments/cancel"] = (404, "text/html", "<html><body>Not Found</body></html>")
    with pytest.raises(IamportCancelOutcomeUnknown, match="Not Found") as err:
        IamportHook().cancel_payment(merchant_uid="m-1", reason="r")
    assert err.value.merchant_uid == "m-1" and "<" not in str(err.value)


def test_token_reply_without_a_token_is_token_unavailable(stub):
    stub["/users/getToken"] = _json(200, {"code": 0, "message": None, "response": {"now": 1}})
    with pytest.raises(IamportTokenUnavailable):
        IamportHook().get_token()


def test_token_403_html_page_is_credentials_refused_with_clean_text(stub):
    stub["/users/getToken"] = (403, "text/html", "<html><body><h1>Forbidden</h1></body></html>")
    with pytest.raises(IamportAuthError, match="credentials") as err:
        IamportHook().get_token()
    assert "Forbidden" in str(err.value) and "<" not in str(err.value)


def test_token_error_echoing_the_secret_never_shows_it(stub):
    stub["/users/getToken"] = (502, "text/html", "<pre>imp_secret=stub-secret-value</pre>")
    with pytest.raises(IamportTokenUnavailable) as err:
        IamportHook().get_token()
    assert "stub-secret-value" not in str(err.value)


def test_clean_excerpt_strips_markup_and_caps_length():
    page = (
        "<html>\r\n<head><title>502 Bad Gateway</title><style>p{x:1}</style></head>\r\n"
        "<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>"
        "\r\n</body>\r\n</html>\r\n"
    )
    assert clean_excerpt(page) == "502 Bad Gateway nginx"
    assert clean_excerpt(b"<p>a &amp; b</p>") == "a & b"
    assert clean_excerpt({"error": "not found"}) == '{"error": "not found"}'
    long = clean_excerpt("x " * 500)
    assert len(long) <= 120 and long.endswith("…")
    assert clean_excerpt("<html><body>trunc<di") == "trunc"


# -- both gateways: the emulator's switches through the gateway interface ----------------------
# The hook tests above are V1's words (envelopes, getToken, the Bearer switch, findAll's
# shape); these ask the same questions of either gateway and expect the same answers.


@pytest.fixture
def gateway(gateway_api, emulator):
    """The gateway ``gateway_for`` picks for the emulator's connection (V1 or V2)."""
    gw = gateway_for("iamport_default", pool_maxsize=4)
    yield gw
    gw.close()


@pytest.fixture
def paid_uid(gateway, paying) -> str:
    """A merchant_uid the gateway holds a paid record of."""
    assert gateway.charge(ChargeRequest("both-1", paying, 1000, "plan")).kind == PAID
    return "both-1"


def payment_id(gateway, merchant_uid: str) -> str:
    found = gateway.look_up(merchant_uid)
    assert found.kind == FOUND, found
    return found.decisive.imp_uid


def refunded(emulator, merchant_uid: str) -> int:
    (row,) = [
        p for p in emulator_payments(emulator.config.db_path) if p["merchant_uid"] == merchant_uid
    ]
    return int(row["cancel_amount"])


PROXY_404S = ["foreign_404_json", "foreign_404_html"]


@pytest.mark.parametrize("switch", PROXY_404S)
def test_a_proxys_404_on_a_lookup_is_unreachable_never_absent(gateway, emulator, paid_uid, switch):
    set_faults(emulator, **{switch: True})
    assert gateway.look_up(paid_uid).kind == UNREACHABLE
    assert gateway.look_up("never-charged").kind == UNREACHABLE


@pytest.mark.parametrize("switch", PROXY_404S)
def test_a_proxys_404_on_a_payment_or_a_listing_raises_unavailable(
    gateway, emulator, paid_uid, switch
):
    pid = payment_id(gateway, paid_uid)
    set_faults(emulator, **{switch: True})
    with pytest.raises(GatewayUnavailable):
        gateway.payment(pid)
    with pytest.raises(GatewayUnavailable):
        list(gateway.payments_between(int(time.time()) - 3600, int(time.time()) + 60))


def test_a_proxys_404_on_billing_keys_raises_instead_of_reporting_missing(
    gateway, emulator, paying
):
    set_faults(emulator, foreign_404_json=True)
    with pytest.raises(GatewayUnavailable):
        gateway.missing_billing_keys([paying, "ghost"])


def test_a_proxy_misrouting_payment_lookups_leaves_billing_keys_to_the_gateway(
    gateway, emulator, paid_uid, paying
):
    set_faults(emulator, foreign_404_payment_lookups=True)
    assert gateway.look_up(paid_uid).kind == UNREACHABLE
    assert gateway.missing_billing_keys([paying, "ghost"]) == ["ghost"]


def test_the_gateways_own_no_record_is_absent(gateway, emulator, paid_uid):
    assert gateway.look_up("never-charged").kind == ABSENT
    with pytest.raises(PaymentAbsent):
        gateway.payment("never-charged")


def test_a_proxys_lookup_404_does_not_touch_charges(gateway, emulator, paying):
    set_faults(emulator, foreign_404_json=True)
    assert gateway.charge(ChargeRequest("through-404", paying, 1000, "plan")).kind == PAID


def test_a_foreign_404_on_the_charge_is_unknown_and_charges_nothing(gateway, emulator, paying):
    set_faults(emulator, charge_foreign_404=True)
    result = gateway.charge(ChargeRequest("foreign-charge", paying, 1000, "plan"))
    assert (result.kind, result.code) == (UNKNOWN, FOREIGN_REPLY)
    set_faults(emulator, charge_foreign_404=False)
    assert emulator_payments(emulator.config.db_path) == []
    assert gateway.look_up("foreign-charge").kind == ABSENT


def test_a_charge_left_ready_is_unknown(gateway, emulator, paying):
    set_faults(emulator, charge_status_ready=True)
    result = gateway.charge(ChargeRequest("ready-1", paying, 1000, "plan"))
    assert result.kind == UNKNOWN
    assert gateway.look_up("ready-1").decisive.status == "ready"


def test_a_paid_record_of_another_amount_is_paid_with_that_amount(gateway, emulator, paying):
    set_faults(emulator, paid_amount_multiplier=10)
    result = gateway.charge(ChargeRequest("tenfold-1", paying, 1000, "plan"))
    assert result.kind == PAID and result.payment.amount == 10_000


def test_a_dropped_cancel_reply_refunds_exactly_once(gateway, emulator, paid_uid):
    """V1 never resends a cancel (unknown); V2 resends it under the same Idempotency-Key and
    gets the first answer replayed. Either way the money goes back once."""
    pid = payment_id(gateway, paid_uid)
    set_faults(emulator, drop_cancel_reply=True)
    try:
        answer = gateway.cancel(pid, amount=300, reason="partial", checksum=1000).cancel_amount
    except RefundOutcomeUnknown:
        answer = None
    set_faults(emulator, drop_cancel_reply=False)
    assert refunded(emulator, paid_uid) == 300
    assert answer == (None if emulator.config.api == "v1" else 300)


def test_a_slow_cancel_is_applied_once_however_the_client_gives_up(
    gateway_api, emulator, monkeypatch, paid_uid
):
    """The client's read timeout fires while the gateway works: V1 does not resend; V2
    resends under the same key and meets 409 IDEMPOTENCY_OUTSTANDING_REQUEST, then the
    replay. The refund lands once."""
    use_conn(monkeypatch, read_timeout=0.3, max_retries=3)
    gateway = gateway_for("iamport_default")
    pid = payment_id(gateway, paid_uid)
    set_faults(emulator, latency_ms=800)
    try:
        gateway.cancel(pid, amount=300, reason="slow", checksum=1000)
    except RefundOutcomeUnknown:
        pass
    set_faults(emulator, latency_ms=0)
    time.sleep(1.2)  # the emulator finishes what the client gave up on
    assert refunded(emulator, paid_uid) == 300
    gateway.close()


def test_a_cancel_answered_5xx_is_unknown_and_applied_nowhere(gateway, emulator, paid_uid):
    pid = payment_id(gateway, paid_uid)
    set_faults(emulator, error_rate=1.0)
    with pytest.raises(RefundOutcomeUnknown):
        gateway.cancel(pid, amount=300, reason="5xx", checksum=1000)
    set_faults(emulator, error_rate=0.0)
    assert refunded(emulator, paid_uid) == 0


@pytest.mark.parametrize("gateway_api", ["v2"], indirect=True)
def test_a_charge_outstanding_for_ever_is_unknown_then_the_one_payment(
    gateway_api, emulator, monkeypatch, paying
):
    """V2 only (V1 has no Idempotency-Key): the first send is held in the network, every
    resend meets 409 IDEMPOTENCY_OUTSTANDING_REQUEST: unknown, never a second charge. Once
    the first lands, a resend of the same charge is answered by its replay."""
    use_conn(monkeypatch, read_timeout=1, max_retries=1)
    requests.post(f"{emulator.url}/__emulator__/hold", json={"charges": 1}, timeout=5)
    gateway = gateway_for("iamport_default")
    charge = ChargeRequest("held-1", paying, 1000, "plan")
    assert gateway.charge(charge).kind == UNKNOWN
    assert stats(emulator)["idempotency"].get("outstanding", 0) >= 1
    requests.post(f"{emulator.url}/__emulator__/release", timeout=5)
    deadline = time.monotonic() + 10
    while not emulator_payments(emulator.config.db_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    again = gateway.charge(replace(charge, resend=True))
    gateway.close()
    assert again.kind == PAID and stats(emulator)["idempotency"].get("replay", 0) >= 1
    assert [p["status"] for p in emulator_payments(emulator.config.db_path)] == ["paid"]


def test_a_refund_whose_answer_was_lost_settles_from_the_cancel_history(
    gateway, emulator, monkeypatch, sqlite_warehouse, paid_uid
):
    """The cancel applies and its answer is lost (no resend): the refund is unknown; the
    next try finds its marker in the gateway's cancel history: done, nothing sent."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowException, AirflowFailException
    from iamport_billing.operators.cancel import CancelPaymentOperator

    def a_try(n: int) -> dict:
        op = CancelPaymentOperator(task_id="cancel", merchant_uid=paid_uid, amount=300,
                                   reason="lost answer", resend_after_seconds=0)  # fmt: skip
        ti = SimpleNamespace(dag_id="refund", run_id="r1", task_id="cancel", map_index=-1,
                             try_number=n)  # fmt: skip
        return op.execute({"ti": ti})

    use_conn(monkeypatch, max_retries=0)
    set_faults(emulator, drop_cancel_reply=True)
    with pytest.raises(AirflowException, match="cancel history") as lost:
        a_try(1)
    assert not isinstance(lost.value, AirflowFailException)
    summary = a_try(2)  # the switch is still on: a POST would be lost
    assert (summary["refund_status"], summary["sent"]) == ("done", False)
    assert refunded(emulator, paid_uid) == 300


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_v2_cancel_answered_5xx_in_portones_shape_is_unknown_not_refused(monkeypatch, status):
    """V2 only (V1's cancel 5xx is the emulator test above): a 5xx proves nothing about a
    cancel, even in PortOne's {type, message} shape; recorded as refused, a person would
    refund again what may have gone back."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    error = {"type": "INTERNAL_SERVER_ERROR", "message": "일시적인 서버 오류입니다."}
    _Stub.routes = {"/payments/": _json(status, error)}
    url = f"http://127.0.0.1:{server.server_address[1]}"
    conn = {
        "conn_type": "portone",
        "host": url,
        "password": "v2-secret",
        "extra": {"max_retries": 0},
    }
    monkeypatch.setenv(CONN_ENV, json.dumps(conn))
    gateway = gateway_for("iamport_default")
    try:
        with pytest.raises(RefundOutcomeUnknown):
            gateway.cancel("pay-1", amount=300, reason="r", checksum=1000)
    finally:
        gateway.close()
        server.shutdown()
