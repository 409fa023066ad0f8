"""A warehouse that returns garbage, and a server that answers garbage.

Bad due rows go through the real daily DAG: each is recorded ``rejected`` with a reason, none
reaches the API (every hostile customer has a valid billing key, so a leak would be a payment),
the good rows are charged, and the run's alert counts them. Malformed charge replies leave the
ledger row ``unknown`` (money may have moved), and the next run resolves it by lookup. Both run
on Iamport V1 and PortOne V2 (``gateway_api``).
"""

from __future__ import annotations

import json
import math
import re
import threading
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from chaos_support import (
    CHARGE_ENDPOINTS,
    AlertReceiver,
    gateway_payment_id,
    logical,
    run_dag,
    without_dag_deadlines,
)
from conftest import conn_env
from iamport_billing.charging import ChargeEngine, ChargeSettings
from iamport_billing.emulator.store import seed_customers
from iamport_billing.gateways import gateway_for
from iamport_billing.hooks.iamport import TOKEN_CACHE
from iamport_billing.policy import ChargeCandidate, merchant_uid_for
from iamport_billing.warehouse.ledger import Ledger
from support import PAYING_CARD, emulator_payments

pytestmark = pytest.mark.airflow

DAY = date(2027, 4, 14)
SQL_NAME = "'; DROP TABLE billing_runs; --"

# subscription_id -> (customer_uid, amount, currency, name, billing_date, expected code);
# every row gets a billing key, so a row that leaked to the API would be paid.
HOSTILE: dict[Any, tuple[Any, ...]] = {
    "h-null-cust": (None, 1000, "KRW", "plan", DAY, "missing_customer_uid"),
    "h-empty-cust": ("", 1000, "KRW", "plan", DAY, "missing_customer_uid"),
    "h-blank-cust": ("   ", 1000, "KRW", "plan", DAY, "missing_customer_uid"),
    "h-long-cust": ("c" * 81, 1000, "KRW", "plan", DAY, "customer_uid_too_long"),
    "h-padded-cust": (" cust-h-padded ", 1000, "KRW", "plan", DAY, "invalid_customer_uid"),
    "h-ctrl-cust": ("cust-\x00h", 1000, "KRW", "plan", DAY, "invalid_customer_uid"),
    "h-zero": ("cust-h-zero", 0, "KRW", "plan", DAY, "non_positive_amount"),
    "h-negative": ("cust-h-negative", -5000, "KRW", "plan", DAY, "non_positive_amount"),
    "h-fraction": ("cust-h-fraction", 1000.5, "KRW", "plan", DAY, "invalid_amount"),
    "h-over-cap": ("cust-h-over-cap", 10_000_001, "KRW", "plan", DAY, "amount_over_cap"),
    "h-text-amount": ("cust-h-text-amount", "ten thousand", "KRW", "plan", DAY, "invalid_amount"),
    "h-null-amount": ("cust-h-null-amount", None, "KRW", "plan", DAY, "invalid_amount"),
    "h-nan": ("cust-h-nan", "NaN", "KRW", "plan", DAY, "invalid_amount"),
    "h-infinity": ("cust-h-infinity", math.inf, "KRW", "plan", DAY, "invalid_amount"),
    "h-usd": ("cust-h-usd", 1000, "USD", "plan", DAY, "unsupported_currency"),
    "h-long-sub-id-makes-merchant-uid-too-long": (
        "cust-h-long-sub",
        1000,
        "KRW",
        "plan",
        DAY,
        "merchant_uid_too_long",
    ),
    "h'; DROP TABLE x;--": ("cust-h-sql-id", 1000, "KRW", "plan", DAY, "invalid_subscription_id"),
    "": ("cust-h-empty-id", 1000, "KRW", "plan", DAY, "missing_subscription_id"),
    "h-ctrl-name": ("cust-h-ctrl-name", 1000, "KRW", "plan\r\nBcc: x", DAY, "invalid_name"),
    "h-long-name": ("cust-h-long-name", 1000, "KRW", "n" * 41, DAY, "name_too_long"),
    "h-future": ("cust-h-future", 1000, "KRW", "plan", "2999-01-01", "billing_date_in_future"),
    "h-past": ("cust-h-past", 1000, "KRW", "plan", "1999-01-01", "billing_date_too_old"),
    "h-bad-date": ("cust-h-bad-date", 1000, "KRW", "plan", "31/02/2027", "invalid_billing_date"),
    "g-dup": ("cust-g-dup", 1000, "KRW", "plan", DAY, "duplicate_in_due_query"),
}
# Valid, if odd: charged with the value shown, the name stored and sent verbatim.
GOOD = {
    "g-plain": ("cust-g-plain", 9900, "KRW", "Monthly plan", 9900),
    "g-sql-name": ("cust-g-sql-name", 5000, "KRW", SQL_NAME, 5000),
    "g-korean": ("cust-g-korean", 12000, "krw", "프리미엄 '월간' 요금제", 12000),
    "g-numeric-text": ("cust-g-numeric-text", "15000", "KRW", "plan", 15000),
    "g-integral-float": ("cust-g-integral-float", 7000.0, "KRW", "plan", 7000),
}

# The default due query, plus a hand-written table the way a careless warehouse view adds
# rows: a NULL subscription_id, a subscription listed twice, billing dates of its own.
DUE_QUERY = """
SELECT subscription_id, customer_uid, amount, currency, name,
       next_billing_date AS billing_date, buyer_name, buyer_email, buyer_tel
FROM billing_subscriptions
WHERE status = 'active' AND next_billing_date <= :billing_date
UNION ALL
SELECT subscription_id, customer_uid, amount, currency, name, billing_date,
       NULL, buyer_email, NULL
FROM hostile_due
"""


@pytest.fixture
def world(airflow_db, sqlite_warehouse, gateway_api, emulator, monkeypatch):
    receiver = AlertReceiver()
    monkeypatch.setenv(conn_env("alert_webhook"), json.dumps(receiver.conn))
    monkeypatch.setenv("IAMPORT_BILLING_ALERT_WEBHOOK_CONN_ID", "alert_webhook")
    monkeypatch.setenv("IAMPORT_BILLING_DUE_QUERY", DUE_QUERY)
    monkeypatch.setenv("IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS", "0.1")
    monkeypatch.setattr("iamport_billing.alerts.deadline_alerts", lambda cfg, *, starts_at: [])
    with Ledger.from_conn_id("billing_warehouse") as led:
        led.init_schema()
        yield led, emulator, receiver
    receiver.close()


def seed_hostile(ledger: Ledger, emulator) -> None:
    stamp = ledger.stamp()
    subs = [
        (sub, cust, amount, cur, name, bdate)
        for sub, (cust, amount, cur, name, bdate, _) in HOSTILE.items()
        if bdate == DAY and sub != "g-dup"
    ] + [(sub, cust, amount, cur, name, DAY) for sub, (cust, amount, cur, name, _) in GOOD.items()]
    ledger.executemany(
        "INSERT INTO billing_subscriptions (subscription_id, customer_uid, amount, currency, "
        "name, status, next_billing_date, billing_anchor_day, updated_at) "
        "VALUES (%s, %s, %s, %s, %s, 'active', %s, 14, %s)",
        [(s, c, a, cur, n, d.isoformat(), stamp) for s, c, a, cur, n, d in subs],
    )
    ledger.execute(
        "CREATE TABLE hostile_due (subscription_id, customer_uid, amount, currency, name, "
        "billing_date, buyer_email)"
    )
    extra = [
        (sub, cust, amount, cur, name, bdate, None)
        for sub, (cust, amount, cur, name, bdate, _) in HOSTILE.items()
        if bdate != DAY
    ] + [
        (None, "cust-h-null-id", 1000, "KRW", "plan", DAY.isoformat(), None),
        ("g-dup", "cust-g-dup", 1000, "KRW", "plan", DAY.isoformat(), None),
        ("g-dup", "cust-g-dup", 1000, "KRW", "plan", DAY.isoformat(), None),
        ("h-ctrl-buyer", "cust-h-ctrl-buyer", 1000, "KRW", "plan", DAY.isoformat(), "a@b\x07"),
    ]
    ledger.executemany("INSERT INTO hostile_due VALUES (%s, %s, %s, %s, %s, %s, %s)", extra)
    customers = {str(v[0]) for v in HOSTILE.values() if v[0]} | {v[0] for v in GOOD.values()}
    customers |= {"cust-h-null-id", "cust-h-ctrl-buyer", "cust-h-padded", "cust-g-dup"}
    seed_customers(emulator.config.db_path, [(c, PAYING_CARD) for c in customers])


EXPECTED_CODES = {
    **{sub: v[5] for sub, v in HOSTILE.items()},
    None: "missing_subscription_id",
    "h-ctrl-buyer": "invalid_buyer",
}


def test_every_kind_of_bad_row_is_rejected_with_its_reason_and_never_sent(world, caplog):
    ledger, emulator, receiver = world
    seed_hostile(ledger, emulator)
    caplog.set_level("INFO")
    without_dag_deadlines()
    from chaos_support import load_dags

    # Nearly every row here is bad on purpose: lift the rejected-share guardrail for this run.
    _, states = run_dag(
        load_dags().get_dag("iamport_billing_daily"), logical(DAY), max_rejected_share=1.0
    )
    assert states["plan"] == "success" and states["report"] == "success", states

    rejected = ledger.query(
        "SELECT subscription_id, error_code, error_message FROM billing_charge_attempts "
        "WHERE status = 'rejected'"
    )
    got = {sub: code for sub, code, _ in rejected}
    assert len(EXPECTED_CODES) >= 25
    assert got == EXPECTED_CODES
    assert all(message for _, _, message in rejected)

    # None of them reached the API; every good row did, once, with its value and verbatim name.
    payments = emulator_payments(emulator.config.db_path)
    assert sorted((p["merchant_uid"], int(p["amount"]), p["name"]) for p in payments) == sorted(
        (merchant_uid_for(sub, DAY, 1), want, name) for sub, (_, _, _, name, want) in GOOD.items()
    )
    stats = requests.get(f"{emulator.url}/__emulator__/stats", timeout=5).json()
    assert stats["requests"][CHARGE_ENDPOINTS[emulator.config.api]] == len(GOOD)
    assert ledger.query("SELECT COUNT(*) FROM billing_runs")[0][0] == 1  # SQL name was data

    # Ops are told: the alert and the plan log name each one with its reason.
    (alert,) = receiver.of_kind("rejected_rows")
    assert alert["counts"] == {"rejected": len(EXPECTED_CODES)}
    for sub, code in EXPECTED_CODES.items():
        named = f"{sub or '(no subscription_id)'}: "
        assert any(d.startswith(named) and d.endswith(f"({code})") for d in alert["details"])
        assert f"rejected {sub}: " in caplog.text and f"({code})" in caplog.text


@pytest.mark.parametrize("warehouse", ["postgres", "mariadb"], indirect=True)
def test_typed_warehouse_due_query_returning_text_nan_infinity_and_duplicates_is_rejected(
    airflow_db, warehouse, emulator, monkeypatch
):
    """With a typed amount column, garbage arrives through a due query that returns text.
    V1 only: the rows are refused before any gateway is chosen (the test above covers V2)."""
    extra = [
        ("p-nan", "NaN", ":billing_date"), ("p-inf", "Infinity", ":billing_date"),
        ("p-text", "12,000", ":billing_date"), ("p-bool", "true", ":billing_date"),
        ("p-hex", "0x10", ":billing_date"), ("p-far", "1000", "'2999-12-31'"),
        ("p-ok", "1000", ":billing_date"),
    ]  # fmt: skip
    rows = " UNION ALL ".join(
        f"SELECT '{sub}', 'cust-{sub}', '{amount}', 'KRW', 'plan', {day}, NULL, NULL, NULL"
        for sub, amount, day in extra
    )
    due = f"""
    SELECT subscription_id, customer_uid, CAST(amount AS CHAR(20)) AS amount, currency, name,
           CAST(next_billing_date AS CHAR(10)) AS billing_date, buyer_name, buyer_email,
           buyer_tel
    FROM billing_subscriptions WHERE status = 'active' AND next_billing_date <= :billing_date
    UNION ALL {rows}
    """
    monkeypatch.setenv("IAMPORT_BILLING_DUE_QUERY", due)
    monkeypatch.setattr("iamport_billing.alerts.deadline_alerts", lambda cfg, *, starts_at: [])
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        ledger.init_schema()
        from support import add_subscriptions

        add_subscriptions(ledger, [("p-ok", "cust-p-ok", 1000)], DAY)  # and again via VALUES
        customers = ["cust-p-nan", "cust-p-inf", "cust-p-text", "cust-p-bool", "cust-p-hex",
                     "cust-p-far", "cust-p-ok"]  # fmt: skip
        seed_customers(emulator.config.db_path, [(c, PAYING_CARD) for c in customers])
        from chaos_support import load_dags

        _, states = run_dag(
            load_dags().get_dag("iamport_billing_daily"), logical(DAY), max_rejected_share=1.0
        )
        got = dict(
            ledger.query(
                "SELECT subscription_id, error_code FROM billing_charge_attempts "
                "WHERE status = 'rejected'"
            )
        )
    assert got == {
        "p-nan": "invalid_amount", "p-inf": "invalid_amount", "p-text": "invalid_amount",
        "p-bool": "invalid_amount", "p-hex": "invalid_amount",
        "p-far": "billing_date_in_future", "p-ok": "duplicate_in_due_query",
    }  # fmt: skip
    assert emulator_payments(emulator.config.db_path) == []
    assert states["report"] == "success"


# -- malformed replies: unknown, then resolved ------------------------------------------------


class _Garbler:
    """A proxy in front of the emulator that forwards a charge, then mangles the reply."""

    def __init__(self, upstream: str, charge_path: str, reply: tuple[int, str, str]):
        self.upstream = upstream
        self.reply = reply
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                r = requests.request(
                    self.command, outer.upstream + self.path, data=body, headers=headers,
                    timeout=10,
                )  # fmt: skip
                status, ctype, text = r.status_code, r.headers["content-type"], r.text
                if self.command == "POST" and re.fullmatch(charge_path, self.path):
                    status, ctype, text = outer.reply
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"


HTML_502 = (502, "text/html", "<html><body><h1>502 Bad Gateway</h1></body></html>")
# The charge's path and its mangled replies, per API.
CHARGE_PATHS = {"v1": "/subscribe/payments/again", "v2": "/payments/[^/?]+/billing-key"}
GARBLED = {
    ("v1", "truncated_json"): (200, "application/json", '{"code": 0, "response": {"imp_uid": "'),
    ("v1", "html_error_page"): HTML_502,
    ("v1", "wrong_types"): (200, "application/json", '{"code": "zero", "response": [1, 2]}'),
    ("v1", "code_0_without_payment"): (200, "application/json", '{"code": 0, "response": null}'),
    # V2: every try is mangled (the hook resends a 5xx or a 200 that is not JSON under the
    # same Idempotency-Key).
    ("v2", "truncated_json"): (200, "application/json", '{"payment": {"paidAt": "2027-'),
    ("v2", "html_error_page"): HTML_502,
    ("v2", "foreign_html_404"): (404, "text/html", "<html><body>404 Not Found</body></html>"),
    ("v2", "unknown_error_type"): (400, "application/json", '{"type": "NEW_KIND_OF_ERROR"}'),
    ("v2", "error_without_type"): (500, "application/json", '{"message": "oops"}'),
}
# A V2 200 in JSON is PortOne's "paid", whatever its body says: the record decides at once.
PAID_AT_ONCE = {
    ("v2", "wrong_types"): (200, "application/json", '{"payment": [1, 2]}'),
    ("v2", "no_payment_summary"): (200, "application/json", "{}"),
}


@pytest.mark.parametrize(("gateway_api", "kind"), sorted(GARBLED), indirect=["gateway_api"])
def test_garbled_charge_reply_leaves_unknown_then_lookup_settles_it(
    gateway_api, kind, sqlite_warehouse, emulator, monkeypatch
):
    first, first_row, later, row, paid = _charge_through_garbler(
        GARBLED[gateway_api, kind], emulator, monkeypatch
    )
    assert first.unknown_merchant_uids == [UID]
    assert first_row.status == "unknown" and first_row.error_message
    assert later.counts == {"resolved_paid": 1}
    assert (row.status, row.imp_uid, row.amount) == ("paid", paid, 4000)


@pytest.mark.parametrize(("gateway_api", "kind"), sorted(PAID_AT_ONCE), indirect=["gateway_api"])
def test_a_v2_200_with_an_unreadable_body_is_paid_by_the_record(
    gateway_api, kind, sqlite_warehouse, emulator, monkeypatch
):
    first, first_row, later, row, paid = _charge_through_garbler(
        PAID_AT_ONCE[gateway_api, kind], emulator, monkeypatch
    )
    assert first.unknown_merchant_uids == [] and first_row.status == "paid"
    assert later.counts.get("resolved_paid", 0) == 0
    assert (row.status, row.imp_uid, row.amount) == ("paid", paid, 4000)


UID = merchant_uid_for("g1", DAY, 1)


def _charge_through_garbler(reply: tuple[int, str, str], emulator, monkeypatch) -> tuple:
    """One charge through a proxy that mangles the charge's reply, then a second run through
    it: the first result and ledger row, the second's, the gateway id of the one payment."""
    api = emulator.config.api
    garbler = _Garbler(emulator.url, CHARGE_PATHS[api], reply)
    conn = json.loads(__import__("os").environ[conn_env("iamport_default")])
    monkeypatch.setenv(conn_env("iamport_default"), json.dumps({**conn, "host": garbler.url}))
    TOKEN_CACHE.clear()
    seed_customers(emulator.config.db_path, [("cust-g", PAYING_CARD)])
    candidate = ChargeCandidate("g1", "cust-g", 4000, DAY, name="plan")
    run = {"dag_id": "d", "run_id": "r1", "task_id": "charge[0]", "try_number": 1}
    settings = ChargeSettings(unknown_settle_seconds=0, max_resend_rounds=0)
    gateway = gateway_for("iamport_default")
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        ledger.init_schema()
        first = ChargeEngine(gateway, ledger, settings, run).charge_batch([candidate])
        first_row = ledger.get_attempt(UID)
        # The money did move: the next run asks the gateway before anything else.
        later = ChargeEngine(
            gateway, ledger, ChargeSettings(pending_lease_seconds=0), {**run, "run_id": "r2"}
        ).charge_batch([candidate])
        row = ledger.get_attempt(UID)
    gateway.close()
    garbler.server.shutdown()
    (paid,) = emulator_payments(emulator.config.db_path)
    return first, first_row, later, row, gateway_payment_id(paid, api)
