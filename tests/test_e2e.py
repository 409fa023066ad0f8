"""A real Airflow end to end: PostgreSQL metadata DB, api-server, scheduler, dag-processor and
triggerer (LocalExecutor) as processes, the emulator as a process, a SQLite warehouse with a few
hundred subscriptions. iamport_billing_daily is triggered through the REST API; the ledger is
checked against the emulator, the Billing page behind Airflow's login, in headless Chromium."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pendulum
import pytest
import requests
from conftest import ARTIFACTS, PG_DSN
from iamport_billing.devserver import (
    DAG_ID,
    AirflowApi,
    AirflowStack,
    gateway_conn,
    sqlite_conn,
)
from iamport_billing.emulator import EmulatorConfig, start_emulator_process
from iamport_billing.policy import SEOUL
from iamport_billing.sample_data import seed_sample
from iamport_billing.warehouse.ledger import Ledger
from support import emulator_payments, login

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(600)]

USER, PASSWORD = "ops", "e2e-ops-password"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"e2e webhook secret, 32 bytes long").decode()
SUBSCRIPTIONS = 300


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    """Everything started once for the module; always stopped and dropped afterwards."""
    psycopg2 = pytest.importorskip("psycopg2")
    root = tmp_path_factory.mktemp("e2e")
    db_name = f"iamport_e2e_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(PG_DSN)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {db_name}")

    warehouse, emulator_db = root / "warehouse.db", root / "emulator.db"
    # Due yesterday (Seoul), so the triggered run (billing date: today) charges them all, under
    # yesterday's merchant_uids. The scheduler makes no cron runs (use_job_schedule=False).
    due = pendulum.now(SEOUL).date().subtract(days=1)
    mp = pytest.MonkeyPatch()
    mp.setenv("AIRFLOW_CONN_BILLING_WAREHOUSE", json.dumps(sqlite_conn(warehouse)))
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        counts = seed_sample(ledger, emulator_db, due, n=SUBSCRIPTIONS, seed=5)
    emulator_cfg = EmulatorConfig(db_path=str(emulator_db), latency_ms=5, seed=5)
    emulator = start_emulator_process(emulator_cfg, log_path=root / "emulator.log")
    stack = AirflowStack(
        home=root / "airflow",
        sql_alchemy_conn=f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db_name}",
        users={USER: ("admin", PASSWORD)},
        extra_env={
            "AIRFLOW_CONN_IAMPORT_DEFAULT": json.dumps(gateway_conn(emulator.url, emulator_cfg)),
            "AIRFLOW_CONN_BILLING_WAREHOUSE": json.dumps(sqlite_conn(warehouse)),
            "AIRFLOW_CONN_PORTONE_WEBHOOK": json.dumps(
                {"conn_type": "generic", "password": WEBHOOK_SECRET}
            ),
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            # Approvals on, answered or left to time out within the test (the sweep every 2 s).
            "IAMPORT_BILLING_APPROVAL_TIMEOUT_MINUTES": "0.75",
            "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "2",
            "IAMPORT_BILLING_TASK_RETRY_DELAY_SECONDS": "3",
            "IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS": "0.2",
        },
    )
    try:
        stack.migrate()
        stack.start()
        stack.wait_ready(180)
        api = AirflowApi(stack.url, USER, PASSWORD)
        api.set_pool("iamport_api", 4, "Iamport charge batches in flight")
        api.wait_for_dag(DAG_ID, 180, stack)
        run_id = api.trigger(DAG_ID, {"batch_size": 100, "max_concurrency": 8})
        api.unpause(DAG_ID)
        state = api.wait_for_run(DAG_ID, run_id, 300, stack)
        yield SimpleNamespace(
            stack=stack, api=api, run_id=run_id, state=state, warehouse=warehouse,
            emulator=emulator, emulator_db=emulator_db, emulator_cfg=emulator_cfg,
            counts=counts, due=due,
        )  # fmt: skip
    finally:
        stack.stop()
        emulator.stop()
        mp.undo()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")
        admin.close()


def ledger_rows(path: Path) -> list[dict]:
    import sqlite3

    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM billing_charge_attempts")]
    finally:
        conn.close()


def test_triggered_run_succeeds_with_every_charge_batch(airflow):
    states = airflow.api.task_states(DAG_ID, airflow.run_id)
    assert airflow.state == "success", states
    assert all(s == "success" for s in states.values()), states
    batches = -(-(SUBSCRIPTIONS - airflow.counts.invalid) // 100)
    assert sum(1 for task in states if task.startswith("charge[")) == batches


def test_every_attempt_was_written_by_the_triggered_run(airflow):
    rows = ledger_rows(airflow.warehouse)
    assert {(r["dag_id"], r["run_id"]) for r in rows} == {(DAG_ID, airflow.run_id)}


def test_ledger_matches_the_emulator_payments(airflow):
    rows = ledger_rows(airflow.warehouse)
    payments = emulator_payments(airflow.emulator_db)
    paid_ledger = {
        (r["merchant_uid"], r["imp_uid"], r["amount"]) for r in rows if r["status"] == "paid"
    }
    paid_emulator = {
        (p["merchant_uid"], p["imp_uid"], int(p["amount"]))
        for p in payments
        if p["status"] == "paid"
    }
    assert paid_ledger == paid_emulator
    assert len(paid_ledger) == airflow.counts.paying
    merchant_uids = [p["merchant_uid"] for p in payments]
    assert len(merchant_uids) == len(set(merchant_uids)), "a merchant_uid was charged twice"
    by_status = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    declined = airflow.counts.soft_decline + airflow.counts.hard_decline
    assert by_status == {
        "paid": airflow.counts.paying,
        "failed": declined + airflow.counts.no_billing_key,
        "rejected": airflow.counts.invalid,
    }


def test_the_api_server_has_the_plugin_once_and_no_plugin_import_error(airflow):
    plugins = airflow.api.ok("GET", "/api/v2/plugins")["plugins"]
    assert [p["name"] for p in plugins].count("iamport_billing") == 1
    assert airflow.api.ok("GET", "/api/v2/plugins/importErrors")["total_entries"] == 0


def test_billing_page_refuses_anonymous_requests(airflow):
    r = requests.get(f"{airflow.stack.url}/billing/", timeout=30)
    assert r.status_code in (401, 403)


def test_billing_page_shows_the_run_to_a_logged_in_user(airflow):
    r = airflow.api.call("GET", "/billing/")
    assert r.status_code == 200
    assert airflow.run_id in r.text
    assert f">{airflow.counts.paying}</a>" in r.text


def test_charge_task_links_to_the_billing_page(airflow):
    links = airflow.api.ok(
        "GET",
        f"/api/v2/dags/{DAG_ID}/dagRuns/{airflow.run_id}/taskInstances/charge/links",
        params={"map_index": 0},
    )
    url = links["extra_links"]["Billing"]
    assert url.endswith(quote(airflow.run_id, safe=""))
    assert url.startswith(f"{airflow.stack.url}/billing/attempts?dag_id={DAG_ID}&run_id=")
    assert airflow.api.session.get(url, timeout=30).status_code == 200


def test_iamport_connection_form_has_labelled_fields_and_placeholders(airflow):
    meta = airflow.api.ok("GET", "/ui/connections/hook_meta")
    (form,) = [m for m in meta if m["connection_type"] == "iamport"]
    fields = form["standard_fields"]
    assert fields["host"] == {
        "hidden": False,
        "title": "API base URL",
        "placeholder": "https://api.iamport.kr",
    }
    assert fields["password"]["title"] == "imp_secret (REST API secret)"
    assert fields["password"]["hidden"] is False
    assert fields["port"]["hidden"] is True
    extras = form["extra_fields"]
    assert extras["read_timeout"]["schema"]["title"] == "Read timeout (s)"
    assert "***" not in json.dumps(extras)


def test_connection_test_button_reaches_the_emulator(airflow):
    body = {
        "connection_id": "iamport_check",
        "conn_type": "iamport",
        "host": airflow.emulator.url,
        "login": airflow.emulator_cfg.imp_key,
        "password": airflow.emulator_cfg.imp_secret,
    }
    good = airflow.api.ok("POST", "/api/v2/connections/test", json=body)
    bad = airflow.api.ok("POST", "/api/v2/connections/test", json={**body, "password": "wrong"})
    assert good["status"] is True, good
    assert bad["status"] is False
    assert "wrong" not in bad["message"]


def test_billing_page_in_headless_chromium(airflow, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = airflow.stack.url
    browser.get(f"{url}/billing/")
    assert "Sign in to Airflow" in browser.page_source  # no cookie yet: the login link page
    login(browser, url, USER, PASSWORD)
    browser.get(f"{url}/billing/")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg rect.bar"))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "billing-page.png"
    browser.save_screenshot(str(shot))

    text = browser.find_element(By.TAG_NAME, "body").text
    assert "Billing runs by billing date" in text
    assert airflow.due.isoformat() in text
    assert f"{airflow.counts.paying}" in text
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg rect.bar")) == 1
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    browser.get(f"{url}/plugin/billing")  # the "Billing" nav entry: the page in Airflow's UI
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.TAG_NAME, "iframe"))
    time.sleep(2)
    browser.save_screenshot(str(ARTIFACTS / "billing-in-airflow-nav.png"))
    frame = browser.find_element(By.TAG_NAME, "iframe")
    browser.switch_to.frame(frame)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg rect.bar"))
    assert "Billing runs by billing date" in browser.find_element(By.TAG_NAME, "body").text
    browser.switch_to.default_content()


def test_every_billing_page_fits_a_1280_pixel_window(airflow, browser):
    """No page scrolls sideways in a 1280-px browser window (after the login test above)."""
    url, day = airflow.stack.url, airflow.due.isoformat()
    a_subscription = ledger_rows(airflow.warehouse)[0]["subscription_id"]
    assert browser.execute_script("return window.outerWidth") == 1280
    overflow = {}
    for path in ("/", f"/dates/{day}", "/attempts", f"/subscriptions/{a_subscription}"):
        browser.get(f"{url}/billing{path}")
        assert "Iamport billing" in browser.title, path
        wide, shown = browser.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        if wide > shown:
            overflow[path] = (wide, shown)
    assert overflow == {}


def test_a_portone_webhook_settles_an_unknown_charge_within_5_seconds(airflow, tmp_path):
    """PortOne (the emulator in V2 mode, on the same payments database as the stack's gateway)
    sends its signed webhook to the real api-server: the ledger's unknown row for that charge
    is settled by the api-server's lookup within 5 s of the payment, with no login."""
    from iamport_billing.emulator import seed_customers
    from iamport_billing.emulator.config import CARD_ALWAYS_PAID
    from support import crashed_pending_row

    day = airflow.due
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        uid = crashed_pending_row(ledger, "webhook-sub", day)
        ledger.execute(
            "UPDATE billing_charge_attempts SET status = 'unknown' WHERE merchant_uid = %s", [uid]
        )
    seed_customers(str(airflow.emulator_db), [("cust-webhook-sub", CARD_ALWAYS_PAID)])
    portone = EmulatorConfig(
        db_path=str(airflow.emulator_db), api="v2", seed=9,
        webhook_url=f"{airflow.stack.url}/billing-hooks/portone", webhook_secret=WEBHOOK_SECRET,
    )  # fmt: skip
    with start_emulator_process(portone, log_path=tmp_path / "portone.log") as v2:
        paid = requests.post(
            f"{v2.url}/payments/{uid}/billing-key",
            json={"billingKey": "cust-webhook-sub", "orderName": "plan", "currency": "KRW",
                  "amount": {"total": 9900}},
            headers={"Authorization": f"PortOne {portone.api_secret}"},
            timeout=10,
        )  # fmt: skip
        paid_at = time.monotonic()
        assert paid.status_code == 200, paid.text
        status = "unknown"
        while status != "paid" and time.monotonic() - paid_at < 5:
            time.sleep(0.2)
            status = {r["merchant_uid"]: r for r in ledger_rows(airflow.warehouse)}[uid]["status"]
        sent = requests.get(f"{v2.url}/__emulator__/webhooks", timeout=5).json()
    assert status == "paid", f"still {status} 5 s after the payment; webhooks sent: {sent}"


def _approval_request(api, run_id: str, timeout: float = 120.0) -> dict:
    """The run's question once its task waits for input, as a person finds it, and 10 s more:
    an answer that reaches the task before the scheduler has processed the parked workload's
    executor event meets an Airflow 3.3 race that fails the task (nothing charged, the answer
    not recorded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = api.task_states(DAG_ID, run_id).get("approve")
        found = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/hitlDetails")
        if state == "awaiting_input" and found.ok and found.json()["hitl_details"]:
            time.sleep(10)
            return found.json()["hitl_details"][0]
        time.sleep(1)
    raise TimeoutError(f"run {run_id} never asked for approval")


def test_a_plan_over_its_guardrails_waits_for_a_person_through_the_rest_api(airflow):
    """The real scheduler and api-server: a plan over max_count asks; Reject and the timeout's
    default charge nothing and fail the run; Approve charges exactly the plan, once."""
    from iamport_billing.emulator import seed_customers
    from iamport_billing.emulator.config import CARD_ALWAYS_PAID
    from support import add_subscriptions

    today = pendulum.now(SEOUL).date()
    subs = [(f"approve-{i}", f"cust-approve-{i}", 7_000 + i) for i in range(4)]
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        add_subscriptions(ledger, subs, today)
    seed_customers(str(airflow.emulator_db), [(c, CARD_ALWAYS_PAID) for _, c, _ in subs])

    def charged() -> list[str]:
        return sorted(
            p["merchant_uid"] for p in emulator_payments(airflow.emulator_db)
            if p["merchant_uid"].startswith("approve-")
        )  # fmt: skip

    api, outcomes, approve_states = airflow.api, {}, {}
    for answer in ("Reject", None, "Approve"):
        run_id = api.trigger(DAG_ID, {"max_count": 2})
        asked = _approval_request(api, run_id)
        assert "charges planned, over max_count 2" in asked["body"]
        if answer:
            ti = asked["task_instance"]
            api.ok(
                "PATCH",
                f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/"
                f"{ti['map_index']}/hitlDetails",
                json={"chosen_options": [answer]},
            )
        outcomes[answer] = (api.wait_for_run(DAG_ID, run_id, 180, airflow.stack), charged())
        approve_states[answer] = api.task_states(DAG_ID, run_id)["approve"]
    assert outcomes["Reject"] == ("failed", [])
    assert outcomes[None] == ("failed", [])  # no answer within 45 s: the default, Reject
    assert outcomes["Approve"] == ("success", sorted(f"{s}-{today:%Y%m%d}-01" for s, _, _ in subs))
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        decisions = ledger.query(
            "SELECT approval, approved_by FROM billing_runs WHERE guardrail IS NOT NULL "
            "ORDER BY created_at"
        )
    # The Airflow race above fails the approve task before it records the answer; the plan
    # then stays held (nothing charged either way).
    rejected = ("rejected", USER) if approve_states["Reject"] == "success" else ("awaiting", None)
    assert [tuple(d) for d in decisions] == [
        rejected,
        ("rejected", "the timeout's default (Reject)"),
        ("approved", USER),
    ]
    assert approve_states["Reject"] in ("success", "failed")
    assert approve_states["Approve"] == "success"
