"""Helpers shared by tests: seeding the warehouse and auditing the emulator's payments."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import pytest
from iamport_billing.warehouse.ledger import Ledger


def add_subscriptions(
    ledger: Ledger,
    rows: Iterable[Sequence[Any]],
    billing_date: date,
    *,
    status: str = "active",
    anchor_day: int | None = None,
) -> None:
    """Insert (subscription_id, customer_uid, amount[, name]) rows due on ``billing_date``."""
    ledger.add_subscriptions(
        [
            {
                "subscription_id": r[0],
                "customer_uid": r[1],
                "amount": r[2],
                "name": r[3] if len(r) > 3 else "Monthly plan",
                "status": status,
                "next_billing_date": billing_date,
                "billing_anchor_day": anchor_day or billing_date.day,
            }
            for r in rows
        ]
    )


@contextmanager
def airflow_api(home: Path, users: dict[str, tuple[str, str]]) -> Iterator[Any]:
    """Airflow's API server app in-process (TestClient) on the test metadata DB, behind
    SimpleAuthManager with these users (name -> (role, password))."""
    from airflow.api_fastapi.app import create_app, purge_cached_app
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
    from fastapi.testclient import TestClient

    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({name: pw for name, (_, pw) in users.items()}))
    mp = pytest.MonkeyPatch()
    mp.setenv("AIRFLOW__CORE__AUTH_MANAGER", f"{SimpleAuthManager.__module__}.SimpleAuthManager")
    mp.setenv(
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
        ",".join(f"{name}:{role}" for name, (role, _) in users.items()),
    )
    mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords))
    mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    mp.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "test-jwt-secret-" + "x" * 64)
    purge_cached_app()
    try:
        with TestClient(create_app()) as client:
            yield client
    finally:
        purge_cached_app()
        mp.undo()


def bearer(client: Any, user: str, password: str) -> dict[str, str]:
    r = client.post("/auth/token", json={"username": user, "password": password})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def attempt_row(merchant_uid: str, status: str, billing_date: date, **fields: Any) -> dict:
    """A ledger attempt as the page and reports read it: subscription = the uid's first part."""
    subscription_id = merchant_uid.split("-")[0]
    row = {
        "merchant_uid": merchant_uid,
        "subscription_id": subscription_id,
        "billing_date": billing_date,
        "attempt_no": 1,
        "customer_uid": "cust-" + subscription_id,
        "amount": 9_900,
        "currency": "KRW",
        "status": status,
        "requested_at": datetime.combine(billing_date, time(1, 0, 5), tzinfo=UTC),
    }
    row.update(fields)
    return row


def crashed_pending_row(
    ledger: Ledger, sub: str, billing_date: date, *, attempt_no: int = 1,
    dag_id: str = "iamport_billing_daily",
) -> str:  # fmt: skip
    """A write-ahead row (9,900 KRW) whose worker died before the POST, an hour ago."""
    from datetime import UTC, datetime, timedelta

    from iamport_billing.policy import merchant_uid_for

    uid = merchant_uid_for(sub, billing_date, attempt_no)
    ledger.claim(
        [{"merchant_uid": uid, "subscription_id": sub, "billing_date": billing_date,
          "attempt_no": attempt_no, "customer_uid": f"cust-{sub}", "amount": 9900,
          "currency": "KRW", "dag_id": dag_id, "run_id": "crashed", "name": "plan"}],
        "crashed-claim",
    )  # fmt: skip
    ledger.execute(
        "UPDATE billing_charge_attempts SET requested_at = %s WHERE merchant_uid = %s",
        [ledger.stamp(datetime.now(UTC) - timedelta(hours=1)), uid],
    )
    return uid


def requests_received(emulator: Any, endpoint: str) -> int:
    """How many requests the emulator got for ``endpoint``, e.g. ``POST /payments/cancel``."""
    import requests

    stats = requests.get(f"{emulator.url}/__emulator__/stats", timeout=5).json()
    return stats["requests"].get(endpoint, 0)


def faults(emulator: Any, **switches: Any) -> None:
    """Set the emulator's fault and foreign/hostile switches at runtime."""
    import requests

    requests.post(
        f"{emulator.url}/__emulator__/faults", json=switches, timeout=5
    ).raise_for_status()


def paid_at_gateway(emulator: Any) -> list[str]:
    """merchant_uids the emulator holds as paid, sorted."""
    return sorted(
        p["merchant_uid"]
        for p in emulator_payments(emulator.config.db_path)
        if p["status"] == "paid"
    )


def run_daily(day: date, **params: Any) -> tuple[Any, dict[str, str]]:
    """One iamport_billing_daily run for ``day`` through dag.test()."""
    from chaos_support import load_dags, logical, run_dag

    return run_dag(load_dags().get_dag("iamport_billing_daily"), logical(day), **params)


def emulator_payments(db_path: Path | str) -> list[dict[str, Any]]:
    """Every payment the emulator ever accepted, straight from its SQLite file."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM payments ORDER BY seq")]
    finally:
        conn.close()


PAYING_CARD = "4242-4242-4242-4242"
SOFT_DECLINE_CARD = "4000-0000-0000-0002"
HARD_DECLINE_CARD = "4000-0000-0000-0069"


def register_cards(emulator: Any, cards: Iterable[tuple[str, str]]) -> None:
    """Store billing keys (customer_uid, test card number) straight into the emulator."""
    import time

    from iamport_billing.emulator.store import customer_row

    now = int(time.time())
    emulator.store.save_customers(customer_row(uid, card, now) for uid, card in cards)


def login(browser: Any, url: str, user: str, password: str) -> None:
    """Sign in to Airflow in the browser (SimpleAuthManager's form); the JWT cookie follows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{url}/auth/login?next={url}/billing/")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.NAME, "password"))
    browser.find_element(By.NAME, "username").send_keys(user)
    browser.find_element(By.NAME, "password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 60).until(lambda d: d.get_cookie("_token"))


CELERY_ENV_FILE = "deploy/celery.env"


def celery_env() -> dict[str, str]:
    """The Celery settings file docker-compose.yaml reads (``env_file``), as a mapping: the
    Celery end-to-end test runs with exactly these."""
    from conftest import REPO

    settings = {}
    for line in (REPO / CELERY_ENV_FILE).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, value = line.split("=", 1)
            settings[name.strip()] = value.strip()
    return settings
