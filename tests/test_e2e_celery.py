"""CeleryExecutor for real: api-server, scheduler, dag-processor, triggerer and two Celery
workers as processes, Redis (127.0.0.1:6379) as broker, PostgreSQL for the metadata, Celery's
results and the billing warehouse, the emulator as a process. The daily DAG charges 20,000
subscriptions over both workers; one worker is SIGKILLed while it runs charge tasks. The run
must still end with every charge exactly once, and the gateway connection's shared limit held.

The Celery settings are read from deploy/celery.env, the file docker-compose.yaml uses."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from types import SimpleNamespace

import pendulum
import psutil
import pytest
import requests
from conftest import ARTIFACTS, scratch_database
from iamport_billing.devserver import DAG_ID, AirflowApi, AirflowStack, gateway_conn
from iamport_billing.emulator import EmulatorConfig, start_emulator_process
from iamport_billing.policy import SEOUL
from iamport_billing.sample_data import seed_sample
from iamport_billing.warehouse.ledger import Ledger
from support import celery_env, emulator_payments, login

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(1500)]

USER, PASSWORD = "ops", "e2e-celery-password"
SUBSCRIPTIONS = 20_000
# The gateway connection's limit for the whole deployment (all workers, all tasks).
LIMIT_PER_SECOND = 150
KILL_AFTER_SETTLED = 5_000
BROKER = "redis://127.0.0.1:6379/0"


def pg(db_name: str) -> dict:
    return {
        "conn_type": "postgres", "host": "127.0.0.1", "port": 5432, "login": "postgres",
        "schema": db_name,
    }  # fmt: skip


def settled(db_name: str) -> int:
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", user="postgres", dbname=db_name) as conn:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM billing_charge_attempts WHERE status IN ('paid', 'failed')"
            )
            return cur.fetchone()[0]


def ledger_rows(db_name: str) -> list[dict]:
    import psycopg2
    import psycopg2.extras

    with psycopg2.connect(host="127.0.0.1", user="postgres", dbname=db_name) as conn:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute("SELECT * FROM billing_charge_attempts")
            return [dict(r) for r in cur.fetchall()]


def running_tasks(worker: psutil.Process) -> int:
    """Task processes under a Celery worker: its pool processes fork one per running task."""
    return sum(len(child.children()) for child in worker.children())


@pytest.fixture(scope="module")
def celery(tmp_path_factory):
    redis = pytest.importorskip("redis")
    redis.Redis.from_url(BROKER).ping()  # .ci/run starts Redis when it is down
    root = tmp_path_factory.mktemp("celery")
    due = pendulum.now(SEOUL).date().subtract(days=1)
    # Tasks go to a queue of this run's own, so no other Celery on this Redis takes them.
    queue = f"billing_e2e_{uuid.uuid4().hex[:8]}"
    # The shared limit's Redis keys are per gateway connection id: one of this run's own.
    gateway_id = f"iamport_{queue}"
    with (
        scratch_database("iamport_celery_meta") as meta,
        scratch_database("iamport_celery_wh") as wh,
    ):
        mp = pytest.MonkeyPatch()
        mp.setenv("AIRFLOW_CONN_BILLING_WAREHOUSE", json.dumps(pg(wh)))
        emulator_db = root / "emulator.db"
        with Ledger.from_conn_id("billing_warehouse") as ledger:
            counts = seed_sample(ledger, emulator_db, due, n=SUBSCRIPTIONS, seed=11)
        emulator_cfg = EmulatorConfig(db_path=str(emulator_db), latency_ms=20, seed=11)
        emulator = start_emulator_process(emulator_cfg, log_path=root / "emulator.log")
        conn = gateway_conn(emulator.url, emulator_cfg)
        conn["extra"] |= {
            "requests_per_second": LIMIT_PER_SECOND,
            "max_in_flight": 48,
            "rate_limit_redis_conn_id": "billing_rate_limit",
        }
        stack = AirflowStack(
            home=root / "airflow",
            sql_alchemy_conn=f"postgresql+psycopg2://postgres@127.0.0.1:5432/{meta}",
            users={USER: ("admin", PASSWORD)},
            extra_env={
                **celery_env(),
                "AIRFLOW__CELERY__BROKER_URL": BROKER,
                "AIRFLOW__CELERY__RESULT_BACKEND": (
                    f"db+postgresql://postgres@127.0.0.1:5432/{meta}"
                ),
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
                "AIRFLOW__CORE__PARALLELISM": "16",
                f"AIRFLOW_CONN_{gateway_id.upper()}": json.dumps(conn),
                "IAMPORT_BILLING_IAMPORT_CONN_ID": gateway_id,
                "AIRFLOW_CONN_BILLING_WAREHOUSE": json.dumps(pg(wh)),
                "AIRFLOW_CONN_BILLING_RATE_LIMIT": json.dumps(
                    {"conn_type": "redis", "host": "127.0.0.1", "port": 6379, "extra": {"db": 1}}
                ),
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                "IAMPORT_BILLING_APPROVAL_TIMEOUT_MINUTES": "0",
                "IAMPORT_BILLING_TASK_RETRY_DELAY_SECONDS": "3",
                "IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS": "0.2",
            },
        )
        try:
            stack.migrate()
            stack.start()
            stack.start_worker("worker1")
            stack.start_worker("worker2")
            stack.wait_ready(180)
            api = AirflowApi(stack.url, USER, PASSWORD)
            api.set_pool("iamport_api", 8, "Iamport charge batches in flight")
            api.wait_for_dag(DAG_ID, 180, stack)
            run_id = api.trigger(DAG_ID, {"batch_size": 500, "max_concurrency": 8})
            started = time.monotonic()
            api.unpause(DAG_ID)
            victim = psutil.Process(stack.processes["worker1"].pid)
            deadline = time.monotonic() + 900
            while settled(wh) < KILL_AFTER_SETTLED or not running_tasks(victim):
                stack.check_alive()
                assert time.monotonic() < deadline, f"no kill point in 900 s\n{stack.tail()}"
                time.sleep(0.5)
            killed = {"tasks": running_tasks(victim), "settled": settled(wh)}
            stack.kill("worker1")
            state = api.wait_for_run(DAG_ID, run_id, 1200, stack)
            elapsed = time.monotonic() - started
            yield SimpleNamespace(
                stack=stack, api=api, run_id=run_id, state=state, wh=wh, due=due,
                counts=counts, emulator=emulator, emulator_db=emulator_db, killed=killed,
                elapsed=elapsed, root=root,
            )  # fmt: skip
        finally:
            stack.stop()
            emulator.stop()
            mp.undo()


def charge_instances(celery) -> list[dict]:
    tis = celery.api.ok(
        "GET",
        f"/api/v2/dags/{DAG_ID}/dagRuns/{celery.run_id}/taskInstances",
        params={"limit": 500, "task_id": "charge"},
    )["task_instances"]
    return [t for t in tis if t["task_id"] == "charge"]


def test_the_run_succeeds_after_a_worker_was_killed_mid_run(celery):
    states = celery.api.task_states(DAG_ID, celery.run_id)
    assert celery.state == "success", states
    assert set(states.values()) == {"success"}, states
    assert celery.killed["tasks"] >= 1


def test_the_killed_workers_charge_tasks_were_retried_elsewhere(celery):
    tries = [t["try_number"] for t in charge_instances(celery)]
    assert len(tries) >= SUBSCRIPTIONS // 500
    # A task caught finishing as its worker died needs no retry: at least one did.
    assert 1 <= sum(1 for n in tries if n >= 2) <= celery.killed["tasks"], tries


def test_both_workers_ran_charge_tasks(celery):
    logs = celery.root / "airflow" / "logs"
    for worker in ("worker1", "worker2"):
        text = (logs / f"{worker}.log").read_text(errors="replace")
        assert "execute_workload" in text and "received" in text, worker


def test_every_subscription_was_charged_exactly_once(celery):
    payments = emulator_payments(celery.emulator_db)
    uids = [p["merchant_uid"] for p in payments]
    assert len(uids) == len(set(uids)), "a merchant_uid reached the gateway as two payments"
    paid_subscriptions = Counter(p["merchant_uid"].rsplit("-", 2)[0] for p in payments
                                 if p["status"] == "paid")  # fmt: skip
    assert set(paid_subscriptions.values()) == {1}
    assert len(paid_subscriptions) == celery.counts.paying


def test_no_result_was_lost(celery):
    rows = ledger_rows(celery.wh)
    paid_ledger = {(r["merchant_uid"], r["imp_uid"]) for r in rows if r["status"] == "paid"}
    paid_gateway = {
        (p["merchant_uid"], p["imp_uid"])
        for p in emulator_payments(celery.emulator_db)
        if p["status"] == "paid"
    }
    assert paid_ledger == paid_gateway
    statuses = Counter(r["status"] for r in rows)
    declined = celery.counts.soft_decline + celery.counts.hard_decline
    # PostgreSQL's integer amount column stores the sample's bad-fraction row (9,900.5) as
    # 9,901: a valid row, of a customer without a billing key.
    assert statuses == {
        "paid": celery.counts.paying,
        "failed": declined + celery.counts.no_billing_key + 1,
        "rejected": celery.counts.invalid - 1,
    }


def test_the_gateway_limit_held_across_both_workers(celery):
    log = requests.get(f"{celery.emulator.url}/__emulator__/rate-log", timeout=10).json()
    per_second = {int(s): c["accepted"] + c["refused"] for s, c in log.items()}
    busiest = max(per_second.values())
    assert busiest <= LIMIT_PER_SECOND * 1.05, sorted(per_second.items())[-20:]
    record_figures(celery, per_second)


def record_figures(celery, per_second: dict[int, int]) -> None:
    """The two-worker figures for BENCHMARKS.md, from the ledger and the emulator's log."""
    rows = [r for r in ledger_rows(celery.wh) if r["status"] in ("paid", "failed")]
    first = min(r["requested_at"] for r in rows)
    last = max(r["completed_at"] for r in rows)
    charging_s = (last - first).total_seconds()
    busy = [n for n in per_second.values() if n]
    figures = {
        "charges": len(rows),
        "charging_seconds": round(charging_s, 1),
        "charges_per_second": round(len(rows) / charging_s, 1),
        "limit_per_second": LIMIT_PER_SECOND,
        "busiest_second": max(busy),
        "median_busy_second": sorted(busy)[len(busy) // 2],
        "run_seconds": round(celery.elapsed, 1),
        "killed_at_settled": celery.killed["settled"],
        "tasks_killed": celery.killed["tasks"],
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "celery-two-workers.json").write_text(json.dumps(figures, indent=2))
    print("two-worker figures:", figures)


def test_billing_page_after_the_celery_run_in_headless_chromium(celery, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, day = celery.stack.url, celery.due.isoformat()
    login(browser, url, USER, PASSWORD)
    browser.get(f"{url}/billing/")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg rect.bar"))
    ARTIFACTS.mkdir(exist_ok=True)
    overview = ARTIFACTS / "billing-page-after-celery.png"
    browser.save_screenshot(str(overview))
    text = browser.find_element(By.TAG_NAME, "body").text
    assert day in text
    assert f"{celery.counts.paying:,}" in text or f"{celery.counts.paying}" in text

    browser.get(f"{url}/billing/dates/{day}")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.TAG_NAME, "table"))
    by_date = ARTIFACTS / "billing-date-after-celery.png"
    browser.save_screenshot(str(by_date))
    for shot in (overview, by_date):
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 1280
