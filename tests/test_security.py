"""Secrets stay secret, TLS stays on, the emulator stays on loopback, card data stays masked.

The secret test runs the whole daily DAG (with expiring tokens and server errors, so error
paths log too) and greps everything it left behind for imp_secret and every token the emulator
ever issued: captured stdout/stderr and log records, the Airflow task logs, the run's XComs,
every ledger column, and every column of the emulator's payments and customers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sqlite3
import ssl
import threading
import time
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from chaos_support import load_dags, logical, run_dag, seed_population, without_dag_deadlines
from iamport_billing.emulator.config import EmulatorConfig
from iamport_billing.emulator.server import register_card, start_emulator_process
from iamport_billing.errors import IamportTransportError
from iamport_billing.hooks.iamport import TOKEN_CACHE, IamportHook, settings_from_connection
from iamport_billing.warehouse.ledger import Ledger

# Screens and messages, not money: SQLite is enough.
WAREHOUSES = ["sqlite"]

DAY = date(2027, 5, 20)
SECRET = "sek-" + os.urandom(12).hex()


def _texts_of_sqlite(path: Path | str, tables: list[str]) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return "\n".join(
            repr(row)
            for t in tables
            for row in conn.execute(f"SELECT * FROM {t}")  # noqa: S608
        )
    finally:
        conn.close()


@pytest.fixture
def secret_emulator(emulator_config):
    emulator_config.imp_secret = SECRET
    emulator_config.token_ttl_s = 2  # several tokens get issued during one run
    emulator_config.error_rate = 0.05
    return emulator_config


@pytest.mark.airflow
def test_no_secret_or_token_in_logs_xcom_ledger_or_emulator_rows(
    airflow_db, sqlite_warehouse, secret_emulator, emulator, monkeypatch, capfd, caplog
):
    monkeypatch.setattr("iamport_billing.alerts.deadline_alerts", lambda cfg, *, starts_at: [])
    monkeypatch.setenv("IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS", "0.1")
    monkeypatch.setenv("IAMPORT_BILLING_TASK_RETRY_DELAY_SECONDS", "1")
    caplog.set_level("DEBUG")
    started = time.time()
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        ledger.init_schema()
        seed_population(ledger, emulator.config.db_path, DAY, 120, prefix="sec")
    without_dag_deadlines()
    dr, states = run_dag(load_dags().get_dag("iamport_billing_daily"), logical(DAY), batch_size=40)
    assert states["plan"] == "success" and all(
        s == "success" for k, s in states.items() if k.startswith("charge[")
    ), states

    tokens = [
        r[0] for r in sqlite3.connect(emulator.config.db_path).execute("SELECT token FROM tokens")
    ]
    assert len(tokens) >= 1
    out, err = capfd.readouterr()
    task_logs = "".join(
        p.read_text(errors="replace")
        for p in (airflow_db / "logs").rglob("*")
        if p.is_file() and p.stat().st_mtime >= started
    )
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        xcoms = session.execute(
            select(XComModel.key, XComModel.value).where(
                XComModel.dag_id == dr.dag_id, XComModel.run_id == dr.run_id
            )
        ).all()
    assert xcoms, "the run pushed no XCom"
    everything = {
        "stdout/stderr": out + err,
        "log records": caplog.text,
        "task logs": task_logs,
        "xcom": repr(xcoms),
        "ledger": _texts_of_sqlite(
            sqlite_warehouse, ["billing_charge_attempts", "billing_subscriptions", "billing_runs"]
        ),
        "emulator payments and customers": _texts_of_sqlite(
            emulator.config.db_path, ["payments", "customers"]
        ),
    }
    captured = everything["stdout/stderr"] + everything["log records"]
    assert "charge customer_uid=" in captured  # the charge logs were captured
    for where, text in everything.items():
        assert SECRET not in text, f"imp_secret found in {where}"
        for token in tokens:
            assert token not in text, f"an access token found in {where}"


def test_an_error_naming_the_request_never_carries_the_secret(emulator, monkeypatch):
    """Wrong credentials and a refused connection: the messages name the problem only."""
    conn = json.loads(os.environ["AIRFLOW_CONN_IAMPORT_DEFAULT"])
    for host, password in ((conn["host"], SECRET), ("http://127.0.0.1:9", SECRET)):
        monkeypatch.setenv(
            "AIRFLOW_CONN_IAMPORT_DEFAULT",
            json.dumps({**conn, "host": host, "password": password, "extra": {"max_retries": 0}}),
        )
        TOKEN_CACHE.clear()
        with pytest.raises(Exception) as err:  # noqa: B017 - any error type, none may leak
            IamportHook().get_token()
        assert SECRET not in str(err.value) and SECRET not in repr(err.value.__dict__)


# -- TLS and plain http -----------------------------------------------------------------------


def _conn(**kw):
    from airflow.sdk import Connection

    base = {"conn_id": "x", "conn_type": "iamport", "login": "k", "password": "s"}
    return Connection(**{**base, **kw})


@pytest.mark.parametrize(
    "conn",
    [
        {"host": "api.example.com", "schema": "http"},
        {"host": "http://127.0.0.1.nip.io"},
        {"host": "http://localhost.example.com:8000"},
        {"host": "http://10.0.0.8"},
        {"host": "http://[fd00::2]:8080"},
    ],
    ids=["schema-http", "loopback-lookalike", "localhost-lookalike", "private-ip", "ipv6-ula"],
)
def test_plain_http_to_anything_but_loopback_is_refused(conn):
    with pytest.raises(ValueError, match="plain http"):
        settings_from_connection(_conn(**conn))


@pytest.mark.parametrize("host", ["http://127.0.0.1:8000", "http://[::1]:8000", "http://localhost"])
def test_plain_http_to_loopback_is_allowed(host):
    assert settings_from_connection(_conn(host=host)).base_url == host


def _self_signed_https_server(tmp_path: Path) -> ThreadingHTTPServer:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256())
    )  # fmt: skip
    pem = tmp_path / "server.pem"
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.dumps({"code": 0, "message": None, "response": {
                "access_token": "t" * 40, "now": 1, "expired_at": 1801}}).encode()  # fmt: skip
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_tls_certificates_are_verified_unless_explicitly_turned_off(tmp_path, monkeypatch):
    server = _self_signed_https_server(tmp_path)
    url = f"https://127.0.0.1:{server.server_port}"
    base = {"conn_type": "iamport", "host": url, "login": "k", "password": "s"}
    try:
        monkeypatch.setenv("AIRFLOW_CONN_IAMPORT_DEFAULT", json.dumps({**base, "extra": {}}))
        TOKEN_CACHE.clear()
        with pytest.raises(IamportTransportError, match="SSLError"):
            IamportHook().get_token()
        monkeypatch.setenv(
            "AIRFLOW_CONN_IAMPORT_DEFAULT", json.dumps({**base, "extra": {"verify_tls": False}})
        )
        TOKEN_CACHE.clear()
        assert IamportHook().get_token().token == "t" * 40
    finally:
        server.shutdown()
        TOKEN_CACHE.clear()


# -- the emulator's bind, and card data -------------------------------------------------------


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_emulator_binds_to_loopback_by_default(tmp_path):
    from iamport_billing.emulator.__main__ import build_parser

    assert EmulatorConfig().host == "127.0.0.1"
    assert build_parser().parse_args([]).host == "127.0.0.1"
    assert EmulatorConfig(host="0.0.0.0").admin_enabled is False
    with start_emulator_process(EmulatorConfig(db_path=str(tmp_path / "e.db"))) as proc:
        port = int(proc.url.rsplit(":", 1)[1])
        assert proc.url.startswith("http://127.0.0.1:")
        assert requests.get(f"{proc.url}/__emulator__/stats", timeout=5).ok
        outside = _non_loopback_address()
        if outside is not None:
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://{outside}:{port}/__emulator__/stats", timeout=3)


def test_card_data_beyond_the_masked_number_is_stored_nowhere(
    airflow_db, sqlite_warehouse, emulator, monkeypatch
):
    card, expiry, birth, pwd = "4242-4242-4242-4242", "2031-07", "880514", "37"
    digits = card.replace("-", "")
    customer = register_card(
        emulator.url, "cust-card", card, expiry=expiry, birth=birth, pwd_2digit=pwd
    )
    assert customer["card_number"] == "4242-42**-****-4242"
    monkeypatch.setattr("iamport_billing.alerts.deadline_alerts", lambda cfg, *, starts_at: [])
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        ledger.init_schema()
        from support import add_subscriptions

        add_subscriptions(ledger, [("card1", "cust-card", 1000)], DAY)
    without_dag_deadlines()
    _, states = run_dag(load_dags().get_dag("iamport_billing_daily"), logical(DAY))
    assert states["report"] == "success"
    payments = _texts_of_sqlite(emulator.config.db_path, ["payments", "customers"])
    assert "4242-42**-****-4242" in payments
    warehouse = _texts_of_sqlite(
        sqlite_warehouse, ["billing_charge_attempts", "billing_subscriptions", "billing_runs"]
    )
    for where, text in (("emulator", payments), ("ledger", warehouse)):
        assert digits not in text.replace("-", ""), f"full card number in the {where}"
        assert f"'{birth}'" not in text and "2031-07" not in text and "'37'" not in text, where
    assert "4242" not in warehouse  # the ledger keeps no card data at all
    for path in Path(emulator.config.db_path).parent.glob("emulator.db*"):
        assert digits.encode() not in path.read_bytes(), path.name
