"""``airflow backfill create`` on the daily DAG, run by a real scheduler (LocalExecutor):
overlapping ranges, reprocessing failed and completed runs, never charge a period twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import pendulum
import psycopg2
import pytest
import requests
from alert_receivers import http_receiver
from iamport_billing.emulator import EmulatorConfig, seed_customers, start_emulator_process
from iamport_billing.emulator.server import bind_socket
from iamport_billing.warehouse.ledger import Ledger
from support import (
    HARD_DECLINE_CARD,
    PAYING_CARD,
    SOFT_DECLINE_CARD,
    add_subscriptions,
    emulator_payments,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
AIRFLOW = str(Path(sys.executable).parent / "airflow")
DAG_ID = "iamport_billing_daily"


def free_port() -> int:
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    return port


class Airflow:
    """A throwaway Airflow: PostgreSQL metadata (the CLI and the scheduler write at once, which
    SQLite answers with 'database is locked'), the execution API and a LocalExecutor scheduler."""

    def __init__(self, home: Path, extra_env: dict[str, str], metadata_db: str):
        self.home = home
        self.db = metadata_db
        port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
            **extra_env,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": (
                f"postgresql+psycopg2://postgres@127.0.0.1:5432/{metadata_db}"
            ),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": "e2e-test-jwt-secret",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            # Only the backfills create runs: no scheduled run of "yesterday" joins in.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            **{k: v for k, v in extra_env.items() if k.startswith("AIRFLOW")},
        }
        self.port = port
        self.procs: list[subprocess.Popen] = []

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    def cli_parallel(self, *commands: tuple[str, ...]) -> None:
        procs = [
            subprocess.Popen([AIRFLOW, *c], env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for c in commands
        ]  # fmt: skip
        for proc in procs:
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, out[-3000:]

    def start(self, name: str, *args: str) -> None:
        log = open(self.home / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.procs.append(subprocess.Popen([AIRFLOW, *args], env=self.env, stdout=log, stderr=log))

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=self.db)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()

    def wait_for_backfill(self, timeout: float) -> list[tuple]:
        """Wait until the latest backfill completed; return its runs (logical date, state)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.query("SELECT id, completed_at FROM backfill ORDER BY id DESC LIMIT 1")
            if rows and rows[0][1] is not None:
                return self.query(
                    "SELECT logical_date, state FROM dag_run WHERE backfill_id = %s "
                    "ORDER BY logical_date",
                    (rows[0][0],),
                )
            time.sleep(1)
        logs = "\n".join(
            (self.home / f"{n}.log").read_text(errors="replace")[-1500:]
            for n in ("scheduler", "api-server")
        )
        raise AssertionError(f"backfill not done in {timeout} s; logs:\n{logs}")


@pytest.fixture
def receiver():
    with http_receiver() as rx:
        yield rx


@pytest.fixture
def services(tmp_path: Path, receiver, postgres_database):
    emu_db = tmp_path / "emulator.db"
    emulator = start_emulator_process(EmulatorConfig(db_path=str(emu_db), seed=3))
    warehouse = tmp_path / "warehouse.db"
    conns = {
        "AIRFLOW_CONN_IAMPORT_DEFAULT": json.dumps({
            "conn_type": "iamport", "host": emulator.url, "login": emulator_config_key(),
            "password": "imp_test_secret", "extra": {"read_timeout": 5, "max_retries": 1},
        }),
        "IAMPORT_BILLING_TASK_RETRIES": "0",
        "AIRFLOW_CONN_BILLING_WAREHOUSE": json.dumps(
            {"conn_type": "sqlite", "host": str(warehouse)}
        ),
        "IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS": "0.1",
        # An alert channel also gives the daily DAG its DeadlineAlert (run by the scheduler).
        "IAMPORT_BILLING_ALERT_WEBHOOK_CONN_ID": "alert_hook",
        "AIRFLOW_CONN_ALERT_HOOK": json.dumps(
            {"conn_type": "http", "host": receiver.url, "password": "hook-secret-token"}
        ),
    }  # fmt: skip
    airflow = Airflow(tmp_path / "airflow", conns, postgres_database)
    airflow.home.mkdir()
    try:
        airflow.cli("db", "migrate")
        api = ("--apps", "execution", "--host", "127.0.0.1", "--port", str(airflow.port))
        airflow.start("api-server", "api-server", *api, "--workers", "1")
        airflow.cli("dags", "reserialize")
        airflow.cli_parallel(
            ("dags", "unpause", DAG_ID), ("pools", "set", "iamport_api", "4", "Iamport API calls")
        )
        airflow.start("scheduler", "scheduler")
        yield airflow, emulator, emu_db, warehouse
    finally:
        airflow.stop()
        emulator.stop()


def emulator_config_key() -> str:
    return EmulatorConfig(db_path=":memory:").imp_key


def test_overlapping_backfills_never_charge_a_period_twice(services, receiver, monkeypatch):
    """A PG outage fails two runs; ``--reprocess-behavior failed`` re-runs them, then an
    overlapping ``completed`` backfill re-runs settled dates: every period is paid once."""
    airflow, emulator, emu_db, warehouse = services
    today = pendulum.now("Asia/Seoul").date()
    days = [today - timedelta(days=n) for n in (5, 4, 3)]
    monkeypatch.setenv(
        "AIRFLOW_CONN_BILLING_WAREHOUSE",
        json.dumps({"conn_type": "sqlite", "host": str(warehouse)}),
    )
    cards = []
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        ledger.init_schema()
        for i, day in enumerate(days):
            rows = [(f"s{i}{j}", f"cust-s{i}{j}", 1000 * (i + 1) + j) for j in range(3)]
            add_subscriptions(ledger, rows, day)
            cards += [(c, PAYING_CARD) for _, c, _ in rows]
        add_subscriptions(ledger, [("soft", "cust-soft", 500), ("hard", "cust-hard", 700)], days[0])
    seed_customers(
        emu_db, [*cards, ("cust-soft", SOFT_DECLINE_CARD), ("cust-hard", HARD_DECLINE_CARD)]
    )

    def backfill(start: date, end: date, behavior: str) -> list[str]:
        airflow.cli(
            "backfill", "create", "--dag-id", DAG_ID, "--from-date", f"{start}T00:00:00+09:00",
            "--to-date", f"{end}T23:59:59+09:00", "--reprocess-behavior", behavior,
            "--max-active-runs", "2",
        )  # fmt: skip
        return [state for _, state in airflow.wait_for_backfill(timeout=120)]

    set_faults(emulator.url, error_rate=1.0)  # the PG is down: every call answers 5xx
    assert backfill(days[0], days[1], "none") == ["failed", "failed"]
    set_faults(emulator.url, error_rate=0.0)
    assert backfill(days[0], days[1], "failed") == ["success", "success"]
    assert backfill(days[1], days[2], "completed") == ["success", "success"]

    payments = emulator_payments(emu_db)
    periods = Counter(tuple(p["merchant_uid"].rsplit("-", 2)[:2]) for p in payments)
    paid = Counter(
        tuple(p["merchant_uid"].rsplit("-", 2)[:2]) for p in payments if p["status"] == "paid"
    )
    assert sorted(sub for sub, _ in paid) == sorted(c[5:] for c, _ in cards)
    assert set(paid.values()) == {1}
    assert periods[("soft", f"{days[0]:%Y%m%d}")] == periods[("hard", f"{days[0]:%Y%m%d}")] == 1

    # The outage runs alerted from the workers: failed tasks, with date and run link.
    failed = [b for b in receiver.bodies() if b["kind"] == "task_failed"]
    assert {b["billing_date"] for b in failed} == {days[0].isoformat(), days[1].isoformat()}
    assert {b["title"].split(": task ")[1].split()[0] for b in failed} >= {"charge[0]"}
    assert all(b["run_url"] for b in failed)
    assert all("hook-secret-token" not in r["raw"] for r in receiver.requests)


def set_faults(url: str, **faults: float) -> None:
    requests.post(f"{url}/__emulator__/faults", json=faults, timeout=5).raise_for_status()
